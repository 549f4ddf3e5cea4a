"""multiprocessing's forkserver, shared by everything in a process that starts children from it.

A process has one forkserver, started on first use with the modules it imports then (its preload), and each
child is a fork of it. The preload is a process-wide setting, so the users add to it here rather than set
it: the CLIP decode pool (models/clip.py) and img2dataset's workers (tasks/img2dataset_processes.py) each
name what their children need, and whichever starts the server first gives it everything named so far.
Standard library only.
"""

from __future__ import annotations

import multiprocessing
from multiprocessing.context import BaseContext

_preload: dict[str, None] = {}  # an ordered set


def preload(*modules: str) -> None:
    """Have the forkserver import `modules` when it starts (no effect on one already running)."""
    _preload.update(dict.fromkeys(modules))
    multiprocessing.get_context("forkserver").set_forkserver_preload(list(_preload))


def available() -> bool:
    return "forkserver" in multiprocessing.get_all_start_methods()


def context(*modules: str) -> BaseContext:
    """The forkserver context, with `modules` added to its preload."""
    preload(*modules)
    return multiprocessing.get_context("forkserver")
