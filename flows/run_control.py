"""How a run ends when it is told to stop: Ctrl-C (SIGINT), SIGTERM (what `timeout`, a Prefect worker
cancelling a flow run and a container stop send), or the watchdog giving up on a stalled shard.

Work is committed unit by unit, atomically, so stopping never waits for a shard to finish. On the first
signal the run, at once: records its end (run record: interrupted, with the signal and the stage), tells
Prefect (its flow runs and their unfinished task runs become Cancelled, so the UI does not show them
running), refuses to start any new process, ends its worker processes (img2dataset pools, decode workers,
an ephemeral Prefect server), and exits with 128 + the signal number (130 for Ctrl-C, 143 for SIGTERM). A
second signal meanwhile exits at once. The stage that was running shows as interrupted in `rs5m report`, and rerunning the same command
resumes. Waiting for the threads instead is what hung runs for minutes: a task thread blocked in a
multiprocessing pool whose workers died never returns.

A signal reaches whichever thread the kernel picks, and Python runs its handlers only when the main thread
executes bytecode, which a main thread waiting on a future may not do for minutes. So the handlers are
installed in the main thread (where `rs5m run` and a Prefect worker's flow-run process call the parent flow),
but the work is done by a thread that watches the signal wake-up file descriptor, which the interpreter
writes from any thread the moment a signal arrives.
"""

from __future__ import annotations

import contextvars
import gc
import multiprocessing.process
import os
import signal
import subprocess
import sys
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

import psutil

from storage.layout import Layout
from storage.runs import FAILED, INTERRUPTED, write_run_record
from tasks.harness import now
from tasks.watchdog import stalled_process_message

REPORT_TIMEOUT_S = 3.0
CHILD_EXIT_GRACE_S = 1.0
CHILD_SWEEPS = 5
# Processes the standard library cleans up after us, if we leave them be: killing the resource tracker
# would leak the semaphores it is there to unlink.
_LEFT_ALONE = ("multiprocessing.resource_tracker",)


@dataclass
class ActiveRun:
    layout: Layout
    run_id: str
    record: dict[str, Any]
    flow_run_ids: list[UUID] = field(default_factory=list)  # the parent's, then the running stage's
    stage: str | None = None


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_active: ActiveRun | None = None
_stopping = False


@contextmanager
def stoppable(run: ActiveRun) -> Iterator[ActiveRun]:
    """While the block runs, SIGINT and SIGTERM end the run as described above (installed from the main
    thread only: Python allows nothing else)."""
    global _active
    _active = run
    if threading.current_thread() is not threading.main_thread():
        try:
            yield run
        finally:
            _active = None
        return
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    previous = {sig: signal.signal(sig, _noted) for sig in STOP_SIGNALS}
    previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    threading.Thread(target=_watch_signals, args=(read_fd,), name="rs5m-signals", daemon=True).start()
    try:
        yield run
    finally:
        _active = None
        signal.set_wakeup_fd(previous_fd)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        os.close(write_fd)  # the watcher reads end-of-file and ends


def _noted(_signum: int, _frame: Any) -> None:
    """The Python-level handler does nothing: the interpreter's own handler has already written the signal
    to the wake-up descriptor, where `_watch_signals` takes it."""


def _watch_signals(read_fd: int) -> None:
    with os.fdopen(read_fd, "rb", buffering=0) as wakeups:
        while byte := wakeups.read(1):
            signum = byte[0]
            if _stopping:  # a second signal while stopping: at once
                os._exit(128 + signum)
            threading.Thread(target=stop_run, args=(signum,), name="rs5m-stop", daemon=True).start()


def entered_stage(stage: str, flow_run_id: UUID | None) -> None:
    """Called by each stage flow as it starts: which stage and flow run a stop should report."""
    if _active is not None:
        _active.stage = stage
        _active.flow_run_ids = [*_active.flow_run_ids[:1], *([flow_run_id] if flow_run_id else [])]


def stop_run(signum: int) -> None:
    """End the process now, recording why (module doc); never returns."""
    global _stopping
    code = 128 + signum
    if _stopping:
        os._exit(code)
    _stopping = True
    run = _active
    stalled = stalled_process_message()
    if stalled is not None:
        status, message, code = FAILED, stalled, 1
    else:
        where = f" during stage {run.stage!r}" if run is not None and run.stage else ""
        status, message = INTERRUPTED, f"interrupted by {signal.Signals(signum).name}{where}"
    if run is not None:
        _record_end(run, status, message)
        _report_to_prefect(run, message)
        print(
            f"\nrs5m: run {status}: {message}\nWork committed so far is kept in {run.layout.root}; "
            "rerun the same command to resume.",
            file=sys.stderr,
            flush=True,
        )
    refuse_new_processes()
    end_child_processes()
    _release_semaphores()
    os._exit(code)


def _record_end(run: ActiveRun, status: str, message: str) -> None:
    try:
        write_run_record(
            run.layout,
            run.run_id,
            {**run.record, "status": status, "error": message, "stage": run.stage, "finished_at": now()},
        )
    except OSError as error:  # a full disk must not keep the process from stopping
        print(f"rs5m: could not write the run record: {error}", file=sys.stderr)


def _report_to_prefect(run: ActiveRun, message: str) -> None:
    """Cancel the run's flow runs and their unfinished task runs, within REPORT_TIMEOUT_S."""
    if not run.flow_run_ids:
        return
    context = contextvars.copy_context()  # the flow's settings: which API (ephemeral or not) to talk to
    reporter = threading.Thread(
        target=context.run, args=(_cancel_flow_runs, run.flow_run_ids, message), daemon=True
    )
    reporter.start()
    reporter.join(REPORT_TIMEOUT_S)


def _cancel_flow_runs(flow_run_ids: list[UUID], message: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        TaskRunFilter,
        TaskRunFilterState,
        TaskRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.states import Cancelled

    try:
        with get_client(sync_client=True) as client:
            unfinished = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=flow_run_ids)),
                task_run_filter=TaskRunFilter(
                    state=TaskRunFilterState(
                        type=TaskRunFilterStateType(any_=[StateType.RUNNING, StateType.PENDING])
                    )
                ),
            )
            for task_run in unfinished:
                client.set_task_run_state(task_run.id, Cancelled(message=message), force=True)
            for flow_run_id in reversed(flow_run_ids):  # the stage's flow run, then the parent
                client.set_flow_run_state(flow_run_id, Cancelled(message=message), force=True)
    except Exception as error:  # the API may be gone (an ephemeral server hit by the same Ctrl-C)
        print(f"rs5m: could not tell Prefect the run stopped: {error}", file=sys.stderr)


def refuse_new_processes() -> None:
    """From now on, starting a process raises. The run's task threads go on while it stops, and one may start
    processes meanwhile (a download task starting the next shard, or retrying the one its pool broke under:
    img2dataset's logger and pool processes); one started after the last sweep would outlive the run."""

    def refused(*_args: Any, **_kwargs: Any) -> None:
        raise RuntimeError("the run is stopping: no new process is started")

    multiprocessing.process.BaseProcess.start = refused  # type: ignore[method-assign]
    subprocess.Popen._execute_child = refused  # type: ignore[attr-defined]


def end_child_processes() -> None:
    """Terminate every process this one started (recursively), then kill what is left after a grace; again
    until none is left, since a multiprocessing pool replaces the workers it sees die (img2dataset's does)."""
    _stop_pool_refills()
    for sweep in range(CHILD_SWEEPS):
        children = _children()
        if not children:
            return
        for child in children:
            with suppress(psutil.Error):
                if sweep == 0:
                    child.terminate()
                else:
                    child.kill()
        _, alive = psutil.wait_procs(children, timeout=CHILD_EXIT_GRACE_S)
        for child in alive:
            with suppress(psutil.Error):
                child.kill()


def _children() -> list[psutil.Process]:
    try:
        return [
            child
            for child in psutil.Process().children(recursive=True)
            if not any(name in " ".join(_cmdline(child)) for name in _LEFT_ALONE)
        ]
    except psutil.Error:
        return []


def _stop_pool_refills() -> None:
    """Tell each multiprocessing pool's worker-handler thread to stop replacing workers. Pool.terminate()
    would too, but it joins threads and takes the queue locks a killed worker may hold, so it can hang."""
    from multiprocessing.pool import TERMINATE, Pool

    for pool in _live_objects(Pool):
        handler = getattr(pool, "_worker_handler", None)
        if handler is not None:
            handler._state = TERMINATE


def _release_semaphores() -> None:
    """Unlink the named semaphores of this process's multiprocessing pools, as a normal exit's finalizers
    would (os._exit runs none): else the resource tracker cleans them up and warns of leaks."""
    from multiprocessing.synchronize import SemLock

    for semaphore in _live_objects(SemLock):
        name = getattr(getattr(semaphore, "_semlock", None), "name", None)
        if name:
            with suppress(OSError):
                SemLock._cleanup(name)


def _live_objects(kind: type) -> list[Any]:
    with warnings.catch_warnings():  # isinstance on some library objects (torch's) warns of deprecation
        warnings.simplefilter("ignore")
        return [obj for obj in gc.get_objects() if isinstance(obj, kind)]


def _cmdline(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except psutil.Error:
        return []
