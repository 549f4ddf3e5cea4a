"""How a run process ends (flows/run_control.py): SIGTERM and SIGINT end it at once with its record written
and its worker processes gone, even while a thread is stuck; a shard stuck in C code makes the watchdog
stop the run with where it was."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]

# A run whose only task thread is stuck for good (blocked on a lock nobody releases, as a thread waiting on
# a dead multiprocessing pool is) and which has a worker process of its own.
STUCK_RUN = """
import subprocess, sys, threading
from pathlib import Path
sys.path.insert(0, {repo!r})
import tasks.watchdog
from flows.run_control import ActiveRun, entered_stage, stoppable
from storage.layout import Layout
from storage.runs import write_run_record

tasks.watchdog.ESCALATE_AFTER_S = 1.0
layout = Layout(Path({root!r}))
record = {{"started_at": "t0", "stages": ["embed"]}}
write_run_record(layout, "run-1", {{**record, "status": "running"}})
worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
never = threading.Lock()
never.acquire()

def task():
    with tasks.watchdog.watching("embed", "web-00000", {stall_timeout_s}):
        never.acquire()

with stoppable(ActiveRun(layout, "run-1", record)):
    entered_stage("embed", None)
    thread = threading.Thread(target=task)
    thread.start()
    print(worker.pid, flush=True)
    thread.join()
"""


def start(tmp_path: Path, stall_timeout_s: float | None) -> tuple[subprocess.Popen, int]:
    script = STUCK_RUN.format(repo=str(REPO), root=str(tmp_path), stall_timeout_s=stall_timeout_s)
    process = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    worker = int(process.stdout.readline())  # the run is under way
    return process, worker


def record(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "runs" / "run-1.json").read_text())


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_ends_a_stuck_run_at_once(tmp_path: Path, signum: int, code: int) -> None:
    process, worker = start(tmp_path, stall_timeout_s=None)
    started = time.monotonic()
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == code
    assert time.monotonic() - started < 15
    assert f"interrupted by {signal.Signals(signum).name} during stage 'embed'" in stderr
    assert "rerun the same command to resume" in stderr
    assert record(tmp_path)["status"] == "interrupted" and record(tmp_path)["stage"] == "embed"
    assert not psutil.pid_exists(worker) or psutil.Process(worker).status() == psutil.STATUS_ZOMBIE


def test_a_shard_stuck_in_c_code_stops_the_run_with_where_it_was(tmp_path: Path) -> None:
    process, worker = start(tmp_path, stall_timeout_s=1.0)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 1
    final = record(tmp_path)
    assert final["status"] == "failed"
    assert "stage 'embed' shard 'web-00000' made no progress" in final["error"]
    assert ", in task" in final["error"]  # where it was stuck
    assert "blocked outside Python" in final["error"]
    assert "made no progress" in stderr
    assert not psutil.pid_exists(worker) or psutil.Process(worker).status() == psutil.STATUS_ZOMBIE


# A run with a multiprocessing pool that replaces the workers it sees die (as img2dataset's does, with
# maxtasksperchild): ending the children must not leave replacements behind.
REFILLING_POOL = """
import multiprocessing, sys, time
sys.path.insert(0, {repo!r})
import psutil
from flows.run_control import end_child_processes

def workers():
    return [c for c in psutil.Process().children() if "spawn_main" in " ".join(c.cmdline())]

if __name__ == "__main__":
    pool = multiprocessing.get_context("spawn").Pool(2, maxtasksperchild=1)
    pool.map_async(time.sleep, [30] * 8)
    while len(workers()) < 2:
        time.sleep(0.05)
    end_child_processes()
    time.sleep(3)  # long enough for a replacement to be spawned
    print(len(workers()), flush=True)
"""


def test_ending_the_children_leaves_no_pool_replacement_behind(tmp_path: Path) -> None:
    script = tmp_path / "run.py"  # a file: spawned workers import the main module by its path
    script.write_text(REFILLING_POOL.format(repo=str(REPO)))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["0"], result.stderr[-3000:]


# A run whose task thread keeps starting worker processes (as a download task does when img2dataset's pool
# breaks under it and it starts the next shard or a retry: a logger process and a new pool) while the run
# stops. What it starts after the sweep would outlive the run, holding its stdout: nothing may be started.
RESTARTING_RUN = """
import multiprocessing, subprocess, sys, threading, time
from pathlib import Path
sys.path.insert(0, {repo!r})
from flows.run_control import ActiveRun, entered_stage, stoppable
from storage.layout import Layout

def keep_starting():
    context = multiprocessing.get_context("spawn")
    while True:
        try:
            context.Process(target=time.sleep, args=(60,), daemon=True).start()
            subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        except Exception:
            pass  # as a retrying task does: try again
        time.sleep(0.02)

if __name__ == "__main__":
    with stoppable(ActiveRun(Layout(Path({root!r})), "run-1", {{"stages": ["download"]}})):
        entered_stage("download", None)
        threading.Thread(target=keep_starting, daemon=True).start()
        time.sleep(2)
        print("started", flush=True)
        time.sleep(600)
"""


def test_a_stopping_run_starts_no_process_that_would_outlive_it(tmp_path: Path) -> None:
    script = tmp_path / "run.py"
    script.write_text(RESTARTING_RUN.format(repo=str(REPO), root=str(tmp_path)))
    process = subprocess.Popen(
        [sys.executable, str(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert process.stdout.readline() == "started\n"
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
        time.sleep(1)  # a process started in the run's last moments is alive by now
        leftovers = [
            " ".join(p.cmdline())
            for p in psutil.process_iter()
            if _in_session(p, process.pid) and p.status() != psutil.STATUS_ZOMBIE
        ]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 143, process.stderr.read()[-3000:]
    assert leftovers == []


def _in_session(process: psutil.Process, session: int) -> bool:
    try:
        return os.getsid(process.pid) == session
    except (ProcessLookupError, psutil.Error):
        return False
