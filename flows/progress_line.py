"""A run's progress on the terminal (stderr): on a terminal, and unless the run is verbose (log lines would
tear it), a live `rich` line with a bar, the time so far and an estimate of the rest while the work runs; in
every case plain lines, one when the work ends and, for long work (training), one now and then, so a CI
log or a Prefect worker's output gets progress without carriage returns or redraws.

Used for each stage of a pipeline run (flows/stages.py) and for training (flows/train.py)."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from rs5m.verbosity import is_verbose


class ProgressLine:
    """`total` units of work, `description` saying what is done so far. `plain_every_s`: off a live line,
    also write the description at most this often while the work runs (None: only when it ends)."""

    def __init__(
        self, description: str, total: int, terminal: TextIO | None = None, plain_every_s: float | None = None
    ) -> None:
        self.started = time.monotonic()
        self.terminal = sys.stderr if terminal is None else terminal
        self.plain_every_s = plain_every_s
        self.last_plain = self.started
        self.live: Progress | None = None
        if self.terminal.isatty() and not is_verbose():
            self.live = _live_progress(self.terminal)
            self.live_task = self.live.add_task(description, total=total)
            self.live.start()

    def update(self, completed: int, description: str) -> None:
        if self.live is not None:
            self.live.update(self.live_task, completed=completed, description=description)
        elif self.plain_every_s is not None and time.monotonic() - self.last_plain >= self.plain_every_s:
            self.last_plain = time.monotonic()
            self._write(description)

    def finish(self, description: str) -> None:
        """The final plain line, in place of the live one, with the time the work took. Written, not
        printed: flows log their prints (log_prints), and those reach the terminal only in a verbose run."""
        if self.live is not None:
            self.live.stop()
        self._write(f"{description}, {self.elapsed():.1f} s")

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def _write(self, line: str) -> None:
        self.terminal.write(line + "\n")
        self.terminal.flush()


class _CursorKeepingConsole(Console):
    """rich's Console, but it never hides the cursor: a run stopped by Ctrl-C or SIGTERM ends with os._exit
    (flows/run_control.py), with no chance to show it again, and the shell would be left without one."""

    def show_cursor(self, show: bool = True) -> bool:
        return False


def _live_progress(terminal: TextIO) -> Progress:
    """rich's live line: the description, a bar, the time so far and rich's estimate of the rest.
    Transient: ProgressLine.finish writes the plain line in its place."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(bar_width=20),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=_CursorKeepingConsole(file=terminal),
        transient=True,
        refresh_per_second=2,  # the elapsed time moves between units; more would only cost CPU
    )
