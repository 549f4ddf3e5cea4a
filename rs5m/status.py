"""`rs5m status WORKDIR`: the runs recorded in a work directory and who writes it now, read without the
lock and without torch (about a second).

Each run: its id, its status as it is now (a record still saying running while nobody holds the lock is a
killed run: interrupted), when it started and ended, and where it is: the stage it is running (with how many
of the stage's units this run has written so far) or the stage it stopped in. Then the lock's holder, when
a run (or `rs5m train`, `rs5m prune`) holds the work directory now.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from rs5m.terminal import TEXT_WIDTH, wrapped
from storage.layout import Layout
from storage.lock import is_held, read_holder
from storage.markers import read_manifest
from storage.runs import COMPLETED, RUNNING, effective_status, read_run_records

SHOWN_RUNS = 10  # the text shows the newest ones (--all: every one); --json has every run


def _started_records(layout: Layout) -> dict[str, dict[str, Any]]:
    """stage -> its started record (the stage is running, or stopped without completing)."""
    records = {}
    for path in layout.root.glob("*/started.json"):
        try:
            records[path.parent.name] = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            continue
    return records


def _units_total(layout: Layout, stage: str) -> int | None:
    """How many units the stage has, when its upstream's manifest says (None: a source stage)."""
    from tasks.harness import GlobalStage, ShardStage  # pyarrow and the stage modules: only for a running run
    from tasks.pipeline import STAGES

    info = STAGES.get(stage)
    if isinstance(info, GlobalStage):
        return 1
    if isinstance(info, ShardStage):
        manifest = read_manifest(layout, info.upstream)
        return len(manifest.shards) if manifest else None
    return None


def _units_written(layout: Layout, stage: str, run_id: str, since: str) -> int:
    """Units of the stage whose marker this run wrote since the stage started (units that were already
    current keep their older marker and are not counted)."""
    written = 0
    for path in layout.stage_dir(stage).joinpath("markers").glob("*.json"):
        try:
            marker = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            continue
        if marker.get("run_id") == run_id and marker.get("finished_at", "") >= since:
            written += 1
    return written


def run_status(layout: Layout, record: dict[str, Any], started: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One run as `rs5m status` shows it (also its --json)."""
    run_id = record.get("run_id", "?")
    status = effective_status(layout, record)
    stages = record.get("stages") or []
    mine = {stage: s for stage, s in started.items() if s.get("run_id") == run_id}
    stage = next((name for name in stages if name in mine), None) or record.get("stage")
    progress = None
    if status == RUNNING and stage is not None and stage in mine:
        progress = {
            "units_written": _units_written(layout, stage, run_id, mine[stage].get("started_at", "")),
            "units": _units_total(layout, stage),
        }
    return {
        "run_id": run_id,
        "status": status,
        "recorded_status": record.get("status", RUNNING),
        "started_at": record.get("started_at"),
        "finished_at": record.get("finished_at"),
        "pipelines": record.get("pipelines"),
        "stages": stages,
        "stage": None if status == COMPLETED else stage,
        "progress": progress,
        "error": record.get("error") or (mine.get(stage) or {}).get("failed"),
        "host": record.get("host"),
        "pid": record.get("pid"),
    }


def workdir_status(layout: Layout) -> dict[str, Any]:
    records = read_run_records(layout)
    started = _started_records(layout)
    holder = (
        (read_holder(layout) or {"run_id": None, "note": "no holder record"}) if is_held(layout) else None
    )
    return {
        "workdir": str(layout.root),
        "writer": holder,
        "runs": [run_status(layout, record, started) for record in records],
    }


def _when(stamp: str | None) -> str:
    """An ISO time as `2026-11-29 12:10:03 UTC` (as recorded when it is not ISO)."""
    if not stamp:
        return "?"
    try:
        moment = datetime.fromisoformat(stamp)
    except ValueError:
        return stamp
    zone = moment.tzname() or ""
    return moment.strftime("%Y-%m-%d %H:%M:%S") + (" UTC" if zone == "UTC" else f" {zone}".rstrip())


def _took(start: str | None, end: str | None) -> str:
    try:
        seconds = int((datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds())
    except (TypeError, ValueError):
        return ""
    hours, rest = divmod(max(seconds, 0), 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


def _where(run: dict[str, Any]) -> str | None:
    stages, stage = run["stages"], run["stage"]
    if stage is None:
        if run["status"] == COMPLETED and stages:
            return f"ran {len(stages)} stage{'s' * (len(stages) != 1)}: {stages[0]} to {stages[-1]}"
        return None
    position = f" (stage {stages.index(stage) + 1} of {len(stages)})" if stage in stages else ""
    if run["status"] == RUNNING:
        text = f"running stage {stage}{position}"
        progress = run["progress"]
        if progress:
            of = f" of {progress['units']}" if progress["units"] is not None else ""
            text += f": {progress['units_written']}{of} units written by this run so far"
        return text
    return f"stopped in stage {stage}{position}"


def status_text(status: dict[str, Any], show_all: bool = False, width: int = TEXT_WIDTH) -> str:
    lines = wrapped(f"Work directory {status['workdir']}", width)
    writer = status["writer"]
    if writer is None:
        lines.append("  no run is writing it now")
    else:
        lines += wrapped(
            f"  being written now by run {writer.get('run_id')} (host {writer.get('host')}, pid "
            f"{writer.get('pid')}, since {_when(writer.get('since'))}; command: {writer.get('command')})",
            width,
        )
    runs = status["runs"]
    if not runs:
        lines.append("  no runs recorded yet")
        return "\n".join(lines)
    shown = runs if show_all else runs[-SHOWN_RUNS:]
    older = len(runs) - len(shown)
    lines += [
        "",
        f"Runs, oldest first ({len(runs)} recorded" + (f"; the {older} older: --all)" if older else ")"),
    ]
    for run in shown:
        lines.append(f"  {run['run_id']}  {run['status']}")
        ended = run["finished_at"] or (None if run["status"] == RUNNING else "without recording its end")
        timing = f"started {_when(run['started_at'])}"
        if run["finished_at"]:
            timing += f", ended {_when(ended)} (took {_took(run['started_at'], ended)})"
        elif ended:
            timing += f", ended {ended}"
        lines += wrapped(f"    {timing}", width)
        where = _where(run)
        if where:
            lines += wrapped(f"    {where}", width)
        if run["error"] and run["status"] != COMPLETED:
            lines += wrapped(f"    {run['error']}", width)
    return "\n".join(lines)
