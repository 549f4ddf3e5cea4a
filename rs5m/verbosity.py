"""How much a run shows on the terminal: by default its progress (flows/stages.py) and the warnings and
errors of Prefect and the libraries; with `--verbose` also Prefect's own log lines (task run created,
finished, ...) and img2dataset's output (its progress bar, its "check your bandwidth speed" advice, its
per-shard speed lines), as before there was a quiet default.

Carried by an environment variable so that processes the run starts (img2dataset's workers and logger
process) get it with the rest of the environment (tasks/img2dataset_processes.py). Standard library only:
img2dataset's workers import this module.
"""

from __future__ import annotations

import os

VERBOSE_ENV = "RS5M_VERBOSE"
# Prefect's documented override of its logging.yml (PREFECT_LOGGING_[PATH]_[TO]_[KEY]): the console handler
# only, so the API handler still gets every record and the UI keeps the run's logs. Read when Prefect
# configures its logging, at `import prefect`.
PREFECT_CONSOLE_LEVEL_ENV = "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL"
QUIET_CONSOLE_LEVEL = "WARNING"


def is_verbose() -> bool:
    """Whether this run shows everything (unset: no, as for a run a Prefect worker starts)."""
    return os.environ.get(VERBOSE_ENV, "").strip().lower() in ("1", "true", "yes")


def set_verbose(verbose: bool) -> None:
    """Choose for this process and those it starts. Must run before Prefect is imported: Prefect reads its
    console level then. A console level the user set in the environment is kept."""
    os.environ[VERBOSE_ENV] = "1" if verbose else "0"
    if not verbose:
        os.environ.setdefault(PREFECT_CONSOLE_LEVEL_ENV, QUIET_CONSOLE_LEVEL)


def discard_output_unless_verbose() -> None:
    """In a process img2dataset started: point its stdout and stderr (the file descriptors, so C libraries
    and its own threads too) at /dev/null unless the run is verbose. Nothing that matters is lost: the
    failure of every URL is recorded per row in the download ledger (download_error and its detail), and a
    run with no result at all fails the stage in the calling process."""
    if is_verbose():
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
    finally:
        os.close(devnull)
