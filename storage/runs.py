"""Run records: runs/<run_id>.json, one per pipeline run, rewritten as the run progresses.

`status` is running, completed, failed or interrupted. A run killed outright (SIGKILL, a lost machine)
cannot write its end: its record still says running while nobody holds the work directory's lock. Readers
show such a record as interrupted (`effective_status`), and the next writer rewrites it so
(`close_abandoned_runs`).
"""

from __future__ import annotations

import json
from typing import Any

from storage.atomic import write_json
from storage.layout import Layout
from storage.lock import is_held

RUNNING, COMPLETED, FAILED, INTERRUPTED = "running", "completed", "failed", "interrupted"
ABANDONED = "the run's process ended without recording its end (killed, or its machine was lost)"


def write_run_record(layout: Layout, run_id: str, record: dict[str, Any]) -> None:
    write_json(layout.run_record(run_id), {"run_id": run_id, **record})


def read_run_record(layout: Layout, run_id: str) -> dict[str, Any] | None:
    try:
        return json.loads(layout.run_record(run_id).read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def read_run_records(layout: Layout) -> list[dict[str, Any]]:
    """Every run record, oldest first."""
    records = [read_run_record(layout, path.stem) for path in layout.runs.glob("*.json")]
    return sorted((r for r in records if r), key=lambda r: r.get("started_at", ""))


def effective_status(layout: Layout, record: dict[str, Any]) -> str:
    """The record's status, except that a "running" run whose lock nobody holds was interrupted."""
    status = record.get("status", RUNNING)
    if status == RUNNING and not is_held(layout):
        return INTERRUPTED
    return status


def close_abandoned_runs(layout: Layout, current_run_id: str) -> list[str]:
    """Called by a writer holding the lock: every other record still saying running was interrupted."""
    closed = []
    for record in read_run_records(layout):
        if record.get("status") == RUNNING and record["run_id"] != current_run_id:
            write_run_record(layout, record["run_id"], {**record, "status": INTERRUPTED, "error": ABANDONED})
            closed.append(record["run_id"])
    return closed
