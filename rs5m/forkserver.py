"""multiprocessing's forkserver, shared by everything in a process that starts children from it.

A process has one forkserver, started on first use with the modules it imports then (its preload), and each
child is a fork of it, so a child starts in milliseconds with those modules imported. The preload is a
process-wide setting and the server starts once, so it names what every kind of child in the project runs,
whichever starts the server first: the CLIP decode pool (models/clip.py; and the main module, as spawn
would import it) and img2dataset's workers and logger (tasks/img2dataset_processes.py). Importing these
costs the server some seconds once per process, where spawned children paid it each; a run starts the server
at its beginning (`start`, flows/pipelines.py), so that those seconds overlap its first stages.
Standard library only.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.forkserver
from multiprocessing.context import BaseContext

PRELOAD = ["__main__", "models.clip", "img2dataset", "tasks.fetch", "tasks.img2dataset_output"]


def available() -> bool:
    return "forkserver" in multiprocessing.get_all_start_methods()


def context() -> BaseContext:
    """The forkserver context, its preload set (no effect on a server already running)."""
    forkserver = multiprocessing.get_context("forkserver")
    forkserver.set_forkserver_preload(PRELOAD)
    return forkserver


def start() -> None:
    """Start the server now, without waiting for it: it imports its preload (some seconds) while the caller
    goes on, and the first child forked later waits only for what is left of that."""
    if available():
        context()
        multiprocessing.forkserver.ensure_running()
