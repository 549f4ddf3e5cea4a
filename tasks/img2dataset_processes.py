"""How img2dataset's worker and logger processes start: forked from one forkserver per run process, which
has img2dataset imported, instead of spawned as fresh interpreters.

img2dataset starts a pool of workers and a logger process for every call, with the "spawn" method, and
each spawned interpreter imports img2dataset, torch included: about 6 s of CPU per process, 2-3 processes
per download shard, more than the downloads themselves take on small shards. A forkserver pays that import
once per run process (its preload, rs5m/forkserver.py); each child is then a fork of a single-threaded process
that already has the modules.

A forkserver's child would inherit the forkserver's environment and standard output and error, as they
were when it started; a spawned child inherits its caller's, as they are when it starts. `CallerState`
carries the caller's (the environment, and the files behind descriptors 1 and 2, passed as descriptors)
into every worker and logger, so proxies (http_proxy), verbosity (rs5m/verbosity.py) and where the output
goes follow the caller as they did with spawn. The forkserver ignores Ctrl-C and exits when the run process
is gone, and the workers die with it (tasks.fetch._follow_the_parent).

Imports img2dataset (and so torch): import this module where img2dataset runs, not at a stage's import.
"""

from __future__ import annotations

import importlib
import os
from multiprocessing import reduction
from multiprocessing.context import ForkServerContext, ForkServerProcess
from multiprocessing.pool import Pool
from typing import Any

from img2dataset.logger import LoggerProcess

from rs5m import forkserver

DISTRIBUTOR = importlib.import_module("img2dataset.distributor")
STANDARD_STREAMS = (1, 2)


class CallerState:
    """What a spawned child inherits from its caller: the environment, and where stdout and stderr go.
    Made in the caller; pickled while a forkserver child is being started, it carries the descriptors."""

    def __init__(self, environ: dict[str, str] | None = None, streams: tuple[Any, ...] = ()) -> None:
        self.environ = dict(os.environ) if environ is None else environ
        self.streams = streams  # in the child: the caller's descriptors 1 and 2, received

    def __reduce__(self) -> tuple[Any, ...]:
        return (CallerState, (self.environ, tuple(reduction.DupFd(fd) for fd in STANDARD_STREAMS)))

    def install(self) -> None:
        """In the child: make the caller's environment and standard streams its own."""
        if os.environ != self.environ:
            os.environ.clear()
            os.environ.update(self.environ)
        for fd, received in zip(STANDARD_STREAMS, self.streams, strict=True):
            descriptor = received.detach()
            os.dup2(descriptor, fd)
            os.close(descriptor)


def _install(state: CallerState) -> None:
    """The pool's worker initializer."""
    state.install()


class CallersForkServerContext(ForkServerContext):
    """The forkserver context, whose pools give every worker its caller's state (CallerState)."""

    def Pool(  # noqa: N802 - multiprocessing's name
        self,
        processes: int | None = None,
        initializer: Any = None,
        initargs: tuple[Any, ...] = (),
        maxtasksperchild: int | None = None,
    ) -> Pool:
        if initializer is not None:
            raise ValueError("img2dataset's pool now has an initializer: see tasks/img2dataset_processes.py")
        return super().Pool(processes, _install, (CallerState(),), maxtasksperchild)


FORKSERVER = CallersForkServerContext()


class ForkServerLoggerProcess(LoggerProcess):
    """img2dataset's logger process (a SpawnProcess) started from the forkserver, with its caller's state."""

    _start_method = "forkserver"
    _Popen = staticmethod(ForkServerProcess._Popen)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.caller = CallerState()

    def run(self) -> None:
        self.caller.install()
        self.prepare_child()
        super().run()

    def prepare_child(self) -> None:
        """In the child, once it has its caller's state, before img2dataset's logger runs."""


def _forkserver_context(method: str | None = None) -> ForkServerContext:
    """Stands in for `multiprocessing.get_context` in img2dataset.distributor (which asks for "spawn")."""
    return FORKSERVER


def start_from_forkserver() -> None:
    """Make img2dataset's pool (img2dataset.distributor) start its workers from the forkserver; its logger
    is a ForkServerLoggerProcess (installed by tasks.img2dataset_output). Idempotent."""
    if not callable(getattr(DISTRIBUTOR, "get_context", None)):
        raise RuntimeError(
            "img2dataset.distributor no longer starts its pool with multiprocessing.get_context: its "
            "workers cannot start from the forkserver; see tasks/img2dataset_processes.py"
        )
    forkserver.context()  # its preload: img2dataset, and what the workers and the logger unpickle
    DISTRIBUTOR.get_context = _forkserver_context
