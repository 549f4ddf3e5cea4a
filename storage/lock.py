"""One writer per work directory.

A run (CLI, or a flow started by Prefect) holds `WORKDIR/.rs5m.lock` while it writes there: an OS file lock
(filelock's flock), so the kernel releases it when the holder dies, however it dies, and a lock left by a
killed run is simply free. Who holds it (run id, host, pid, command, since when) is written beside it, in
`.rs5m.lock.json`, for the message a second writer gets; that file is informative only, never trusted as
the lock. Readers (`rs5m report`, the catalog) never take the lock and never block.

The lock is re-entrant within a process (the CLI takes it, then the flow it starts takes it again), and
released when the outermost holder leaves. Network file systems: flock works on local disks and on NFSv4
(as a POSIX lock); on other shared file systems run one scheduler per work directory.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from filelock import FileLock, Timeout

from storage.atomic import remove_durably, write_json
from storage.layout import Layout

# A writer that finds the lock taken retries this long before giving up: a reader probing it (`is_held`)
# holds it for microseconds, which must not turn a run away.
PROBE_GRACE_S = 2.0
WAIT_MESSAGE_EVERY_S = 30.0


class WorkdirBusyError(RuntimeError):
    """Another run is writing the work directory."""


@dataclass
class _Held:
    lock: FileLock
    depth: int


_HELD: dict[str, _Held] = {}
_GUARD = threading.Lock()


def describe_holder(layout: Layout) -> str:
    """Who holds (or last held) the lock, from its record, in words."""
    holder = read_holder(layout)
    if holder is None:
        return "another process (no holder record)"
    return (
        f"run {holder.get('run_id')} (host {holder.get('host')}, pid {holder.get('pid')}, "
        f"since {holder.get('since')}; command: {holder.get('command')})"
    )


def read_holder(layout: Layout) -> dict[str, Any] | None:
    try:
        return json.loads(layout.lock_holder.read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None


@contextmanager
def workdir_lock(
    layout: Layout,
    run_id: str,
    *,
    wait: bool = False,
    on_wait: Callable[[str], None] | None = None,
) -> Iterator[None]:
    """Hold the work directory's writer lock for the block. `wait`: wait as long as it takes (calling
    `on_wait` with who holds it, now and every WAIT_MESSAGE_EVERY_S); else raise WorkdirBusyError at once."""
    key = str(layout.lock_file)
    with _GUARD:
        held = _HELD.get(key)
        if held is not None:
            held.depth += 1
    if held is not None:
        holder = read_holder(layout) or {}
        if holder.get("run_id") != run_id:  # the flow a command started: name the flow run from now on
            write_json(layout.lock_holder, {**holder, "run_id": run_id})
    else:
        layout.root.mkdir(parents=True, exist_ok=True)
        lock = FileLock(layout.lock_file, thread_local=False, is_singleton=False)
        _acquire(layout, lock, wait, on_wait)
        held = _Held(lock, 1)
        with _GUARD:
            _HELD[key] = held
        write_json(
            layout.lock_holder,
            {
                "run_id": run_id,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "command": " ".join(sys.argv)[:500],
                "since": datetime.now(UTC).isoformat(timespec="seconds"),
            },
        )
    try:
        yield
    finally:
        with _GUARD:
            held.depth -= 1
            last = held.depth == 0
            if last:
                del _HELD[key]
        if last:
            # only our own record: at interpreter exit the lock can be freed (FileLock's finalizer) before
            # this runs, and the next holder's record be there already
            if (read_holder(layout) or {}).get("pid") == os.getpid():
                remove_durably(layout.lock_holder)
            held.lock.release()


def _acquire(layout: Layout, lock: FileLock, wait: bool, on_wait: Callable[[str], None] | None) -> None:
    try:
        lock.acquire(timeout=PROBE_GRACE_S)
        return
    except Timeout:
        if not wait:
            raise WorkdirBusyError(
                f"work directory {layout.root} is being written by {describe_holder(layout)}; wait for it to "
                "end (rs5m run --wait), or stop it"
            ) from None
    while True:
        if on_wait is not None:
            on_wait(f"waiting for {describe_holder(layout)} to release {layout.root}")
        try:
            lock.acquire(timeout=WAIT_MESSAGE_EVERY_S)
            return
        except Timeout:
            continue


def is_held(layout: Layout) -> bool:
    """Whether a writer holds the lock now (by this process, or another). Probes for microseconds."""
    if str(layout.lock_file) in _HELD:
        return True
    if not layout.lock_file.exists():
        return False
    probe = FileLock(layout.lock_file, thread_local=False, is_singleton=False)
    try:
        probe.acquire(timeout=0)
    except Timeout:
        return True
    except OSError:
        return False  # a read-only work directory: nobody can be writing it
    probe.release()
    return False
