"""One writer per work directory (storage/lock.py): a second writer fails at once naming the first, or
waits; a lock left by a killed process is free; readers never block; run records of killed runs read as
interrupted."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from storage.layout import Layout
from storage.lock import WorkdirBusyError, is_held, read_holder, workdir_lock
from storage.runs import INTERRUPTED, RUNNING, close_abandoned_runs, effective_status, write_run_record

REPO = Path(__file__).resolve().parents[1]
HOLD = (
    "import sys, time; from pathlib import Path; sys.path.insert(0, {repo!r});"
    "from storage.layout import Layout; from storage.lock import workdir_lock;"
    "from storage.runs import write_run_record;"
    "layout = Layout(Path({root!r}));"
    "lock = workdir_lock(layout, 'run-A'); lock.__enter__();"
    "write_run_record(layout, 'run-A', {{'status': 'running', 'started_at': '1'}});"
    "print('held', flush=True); time.sleep(float(sys.argv[1]))"
)


def hold_in_subprocess(root: Path, seconds: float) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD.format(repo=str(REPO), root=str(root)), str(seconds)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout.readline().strip() == "held"  # an observable event, not a sleep
    return process


def test_a_second_writer_fails_at_once_naming_the_first(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    holder = hold_in_subprocess(tmp_path, 60)
    try:
        assert is_held(layout)
        started = time.monotonic()
        with pytest.raises(WorkdirBusyError) as raised, workdir_lock(layout, "run-B"):
            pass
        assert time.monotonic() - started < 10
        message = str(raised.value)
        assert "run run-A" in message and f"pid {holder.pid}" in message and "--wait" in message
        assert read_holder(layout)["run_id"] == "run-A"  # the loser wrote nothing
    finally:
        holder.kill()
        holder.wait()


def test_a_waiting_writer_gets_the_lock_when_the_first_ends(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    holder = hold_in_subprocess(tmp_path, 3)
    messages: list[str] = []
    holders: list[dict | None] = []

    def second() -> None:
        with workdir_lock(layout, "run-B", wait=True, on_wait=messages.append):
            holders.append(read_holder(layout))
            time.sleep(1)  # while the first process finishes exiting: it must not touch our record
            holders.append(read_holder(layout))

    thread = threading.Thread(target=second)
    thread.start()
    thread.join(60)
    holder.wait()
    assert [h and h["run_id"] for h in holders] == ["run-B", "run-B"]
    assert messages and "run run-A" in messages[0]
    assert not layout.lock_holder.exists()  # removed when run-B ended


def test_a_killed_holder_leaves_the_lock_free_and_its_run_reads_as_interrupted(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    holder = hold_in_subprocess(tmp_path, 60)
    record = {"run_id": "run-A", "status": RUNNING}
    assert effective_status(layout, record) == RUNNING
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    assert not is_held(layout)
    assert effective_status(layout, record) == INTERRUPTED  # a reader sees it at once
    with workdir_lock(layout, "run-B"):  # taken over without waiting
        write_run_record(layout, "run-B", {"status": RUNNING, "started_at": "2"})
        assert close_abandoned_runs(layout, "run-B") == ["run-A"]
        assert effective_status(layout, {"status": RUNNING}) == RUNNING  # run-B holds it
    assert not layout.lock_holder.exists()


def test_the_lock_is_reentrant_within_a_process(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    with workdir_lock(layout, "cli"):
        with workdir_lock(layout, "flow-run"):
            assert read_holder(layout)["run_id"] == "flow-run"
        assert is_held(layout)
    assert not is_held(layout)
