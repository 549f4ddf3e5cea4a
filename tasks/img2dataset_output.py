"""img2dataset's own output in the run's process and in its logger process: off the terminal unless the run
is verbose (rs5m/verbosity.py; its download workers: tasks.fetch._follow_the_parent).

In the run's process img2dataset prints from the task's thread and from its pool's threads (main.py
"Starting the downloading of this file", reader.py's sharding lines and "check your bandwidth speed",
distributor.py's retry lines) and shows a tqdm bar over its pool's results (`0it [00:00, ?it/s]`, one per
shard). Pointing sys.stdout elsewhere would hide every thread's output (the run's progress, other tasks'),
so the names those modules print with are replaced in their own namespaces instead. Its logger process
prints speed lines per shard; a subclass that discards that process's output stands in for it.

Imports img2dataset (and so torch): import this module where img2dataset runs, not at a stage's import.
"""

from __future__ import annotations

import functools
import importlib
from typing import Any

from tqdm import tqdm

from rs5m.verbosity import discard_output_unless_verbose, is_verbose
from tasks.img2dataset_processes import ForkServerLoggerProcess

# by name: `img2dataset.main` the attribute is a function (the package re-exports it)
MAIN = importlib.import_module("img2dataset.main")
READER = importlib.import_module("img2dataset.reader")
DISTRIBUTOR = importlib.import_module("img2dataset.distributor")
PRINTING_MODULES = (MAIN, READER, DISTRIBUTOR)


class QuietLoggerProcess(ForkServerLoggerProcess):
    """img2dataset's logger process, its output discarded unless the run is verbose (decided in the child
    process, from the environment of the process that created it)."""

    def prepare_child(self) -> None:
        discard_output_unless_verbose()


def _discard(*args: Any, **kwargs: Any) -> None:
    """`print` in img2dataset's modules when the run is not verbose."""


def follow_verbosity() -> None:
    """Make img2dataset's output in this process (and its logger process) follow rs5m/verbosity.py now.
    Called before each img2dataset run, so it follows a change (tests run both ways in one process)."""
    verbose = is_verbose()
    for module in PRINTING_MODULES:
        if verbose:
            module.__dict__.pop("print", None)  # the builtin again
        else:
            module.print = _discard
    DISTRIBUTOR.tqdm = tqdm if verbose else functools.partial(tqdm, disable=True)
    MAIN.LoggerProcess = QuietLoggerProcess
