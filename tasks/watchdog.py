"""A shard that stops making progress fails, with where it was, instead of hanging the run for ever.

The harness runs every shard inside `watching(stage, shard_id, stall_timeout_s)`; stage functions call
`heartbeat()` as they progress (per batch). One watchdog thread per process looks at the shards being
worked on. A shard without a heartbeat for its stall timeout:
1. gets `ShardStalled` raised in its thread, with the thread's stack at that moment in the message; a
   thread waiting in Python code (a DataLoader or a queue with a timeout, a sleep) takes it at once and the
   shard fails alone, like any failed shard (the others commit; a rerun resumes);
2. if the thread is still inside the shard `ESCALATE_AFTER_S` later (blocked in C code, which an exception
   cannot interrupt), the whole process is told to stop: a SIGINT to the main thread, which the run's
   signal handling (flows/run_control.py) ends as a failed run with the stall's message (without that
   handling, it is a KeyboardInterrupt in the main thread).
"""

from __future__ import annotations

import ctypes
import signal
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

ESCALATE_AFTER_S = 30.0
CHECK_EVERY_S = 1.0


class ShardStalled(RuntimeError):
    """A shard made no progress for its stall timeout (the message says where it was)."""


@dataclass
class _Watch:
    stage: str
    shard_id: str
    timeout_s: float
    thread_id: int
    last_beat: float = field(default_factory=time.monotonic)
    message: str | None = None
    raised_at: float | None = None


_WATCHES: dict[int, _Watch] = {}
_LOCK = threading.Lock()
_watchdog: threading.Thread | None = None
_stalled_process: str | None = None  # set when the watchdog had to stop the whole process


def heartbeat() -> None:
    """The calling thread's shard made progress (cheap: call it per batch)."""
    watch = _WATCHES.get(threading.get_ident())
    if watch is not None:
        watch.last_beat = time.monotonic()


@contextmanager
def holding(lock: threading.Lock) -> Iterator[None]:
    """Holds `lock` (a shared model's), beating while waiting for it: waiting for another shard to finish
    with the model is not a stall of this one."""
    while not lock.acquire(timeout=1.0):
        heartbeat()
    try:
        yield
    finally:
        lock.release()


def stalled_process_message() -> str | None:
    """Why the watchdog interrupted the process, if it did."""
    return _stalled_process


@contextmanager
def watching(stage: str, shard_id: str, timeout_s: float | None) -> Iterator[None]:
    """Watch the calling thread while it works on one shard (timeout None: not watched)."""
    if timeout_s is None:
        yield
        return
    ident = threading.get_ident()
    watch = _Watch(stage, shard_id, timeout_s, ident)
    with _LOCK:
        _WATCHES[ident] = watch
    _ensure_watchdog()
    try:
        yield
    except ShardStalled as error:
        # the asynchronous exception carries no message: attach the one the watchdog wrote
        raise ShardStalled(watch.message or str(error)) from None
    finally:
        with _LOCK:
            _WATCHES.pop(ident, None)


def _ensure_watchdog() -> None:
    global _watchdog
    with _LOCK:
        if _watchdog is None or not _watchdog.is_alive():
            _watchdog = threading.Thread(target=_watch_loop, name="rs5m-watchdog", daemon=True)
            _watchdog.start()


def _watch_loop() -> None:
    global _stalled_process
    while True:
        time.sleep(CHECK_EVERY_S)
        now = time.monotonic()
        with _LOCK:
            watches = list(_WATCHES.values())
        for watch in watches:
            if watch.raised_at is None and now - watch.last_beat > watch.timeout_s:
                watch.message = _stall_message(watch, now)
                with _LOCK:  # only into a thread still inside its shard (watching() unregisters under it)
                    if _WATCHES.get(watch.thread_id) is watch:
                        watch.raised_at = now
                        _raise_in_thread(watch.thread_id)
            elif watch.raised_at is not None and now - watch.raised_at > ESCALATE_AFTER_S:
                _stalled_process = (
                    f"{watch.message}\nThe shard's thread did not stop within {ESCALATE_AFTER_S:.0f} s "
                    "(blocked outside Python), so the run was stopped."
                )
                with _LOCK:
                    _WATCHES.pop(watch.thread_id, None)
                signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)


def _stall_message(watch: _Watch, now: float) -> str:
    frame = sys._current_frames().get(watch.thread_id)
    where = "".join(traceback.format_stack(frame)[-8:]) if frame is not None else "(thread gone)\n"
    return (
        f"stage {watch.stage!r} shard {watch.shard_id!r} made no progress for {now - watch.last_beat:.0f} s "
        f"(runner.stall_timeout_s = {watch.timeout_s:g}); it was at:\n{where}"
        "Rerun to resume; raise runner.stall_timeout_s if the shard is only slow."
    )


def _raise_in_thread(thread_id: int) -> None:
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), ctypes.py_object(ShardStalled))
