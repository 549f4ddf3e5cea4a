"""Bounded task counts: past `runner.max_tasks_per_stage` units, a stage's Prefect task handles a batch of
consecutive units. The result is the one a task per unit gives, each unit's failure is still its own (the
batch's other units commit), and the Prefect server sees at most that many task runs per stage."""

from __future__ import annotations

import json
from pathlib import Path
from uuid import UUID

import pytest
import yaml

from flows.stages import unit_batches
from tasks.retry import UnitsFailed, is_transient
from tests.helpers import canonical, free_port, rs5m

SOURCES = ("harbour", "farms", "coast", "city", "fields")


@pytest.mark.parametrize(("units", "most"), [(10, 3), (10, 10), (3, 1000), (7, 2), (0, 4), (5, 1)])
def test_batches_are_consecutive_even_and_at_most_the_bound(units: int, most: int) -> None:
    names = [f"u{i:03d}" for i in range(units)]
    batches = unit_batches(names, most)
    assert [unit for batch in batches for unit in batch] == names
    assert len(batches) == min(units, most)
    assert all(batches) and max(map(len, batches), default=0) - min(map(len, batches), default=0) <= 1


def test_a_batch_is_retried_when_any_of_its_failures_is_transient() -> None:
    assert is_transient(UnitsFailed({"a": ValueError("bad row"), "b": ConnectionResetError()}, []))
    assert not is_transient(UnitsFailed({"a": ValueError("bad row"), "b": FileNotFoundError("x")}, []))


def _config(tmp_path: Path, name: str, most: int | None, unreachable: bool = False) -> Path:
    sources = []
    for i, source in enumerate(SOURCES):
        path = tmp_path / f"{source}.jsonl"
        path.write_text(
            "".join(
                json.dumps({"url": f"http://images.example.org/{source}/{j}.jpg", "caption": caption}) + "\n"
                for j, caption in enumerate([f"aerial view of the {source} {i}", "a cat on a sofa"] * 3)
            )
        )
        sources.append({"name": source, "path": str(path), "format": "jsonl"})
    if unreachable:  # refused at once: a transient error, retried, then the source fails alone
        sources.insert(
            1, {"name": "unreachable", "path": f"http://127.0.0.1:{free_port()}/c.jsonl", "format": "jsonl"}
        )
    config = {"workdir": str(tmp_path / name), "sources": sources, "ingest": {"shard_rows": 4}}
    if most is not None:
        config["runner"] = {"max_tasks_per_stage": most}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _task_runs_per_stage(prefect_server, workdir: Path) -> dict[str, list[str]]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterParentFlowRunId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    (record,) = [json.loads(p.read_text()) for p in (workdir / "runs").glob("*.json")]
    with (
        temporary_settings({PREFECT_API_URL: prefect_server.api_url}),
        get_client(sync_client=True) as client,
    ):
        parent = UUID(record["run_id"])
        children = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent]))
        )
        names = {run.id: client.read_flow(run.flow_id).name for run in children}
        tasks = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=list(names))), limit=200
        )
    return {stage: sorted(t.name for t in tasks if names[t.flow_run_id] == stage) for stage in names.values()}


def test_batched_tasks_give_the_result_of_a_task_per_unit(tmp_path: Path, prefect_server) -> None:
    env = prefect_server.env()
    for name, most in (("per-unit", None), ("batched", 2)):
        result = rs5m("run", str(_config(tmp_path, name, most)), "--stages", "ingest,keyword", env=env)
        assert result.returncode == 0, result.stderr[-3000:]
    assert canonical(tmp_path / "batched") == canonical(tmp_path / "per-unit")
    assert "keyword: 10 of 10 units (0 reused, 10 run)" in result.stderr  # progress counts units, not tasks

    per_unit = _task_runs_per_stage(prefect_server, tmp_path / "per-unit")
    shards = list(json.loads((tmp_path / "batched" / "keyword" / "manifest.json").read_text())["shards"])
    assert len(shards) == 10 and per_unit["keyword"] == sorted(f"keyword-{s}" for s in shards)
    batched = _task_runs_per_stage(prefect_server, tmp_path / "batched")
    # ingest's units are the sources in config order, keyword's the shards in manifest order
    assert batched["ingest"] == ["ingest-city-to-fields", "ingest-harbour-to-coast"]
    first, last = shards[:5], shards[5:]
    assert batched["keyword"] == sorted(
        [f"keyword-{first[0]}-to-{first[-1]}", f"keyword-{last[0]}-to-{last[-1]}"]
    )


def test_a_failed_unit_in_a_batch_fails_alone(tmp_path: Path, prefect_server) -> None:
    config = _config(tmp_path, "work", 1, unreachable=True)  # every source in one ingest task
    result = rs5m("run", str(config), "--stages", "ingest", env=prefect_server.env())
    assert result.returncode == 1, result.stderr[-3000:]
    assert "unreachable" in result.stderr and "rerun the same command to resume" in result.stderr
    report = rs5m("report", str(tmp_path / "work"), "--json", env=prefect_server.env())
    funnel = json.loads(report.stdout)
    assert sorted(funnel["failed_sources"]) == ["unreachable"]
    (ingest,) = funnel["stages"]
    assert sorted(ingest["sources"]) == sorted(SOURCES)  # the batch's other units committed
