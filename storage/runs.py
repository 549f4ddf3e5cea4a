"""Run records: runs/<run_id>.json, one per pipeline run, rewritten as the run progresses."""

from __future__ import annotations

import json
from typing import Any

from storage.atomic import write_json
from storage.layout import Layout


def write_run_record(layout: Layout, run_id: str, record: dict[str, Any]) -> None:
    write_json(layout.run_record(run_id), {"run_id": run_id, **record})


def read_run_record(layout: Layout, run_id: str) -> dict[str, Any] | None:
    try:
        return json.loads(layout.run_record(run_id).read_text())
    except FileNotFoundError:
        return None
