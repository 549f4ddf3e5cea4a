"""An incremental rebuild: a source gains rows, the rebuild runs only the new shards of the per-shard stages
(the global stages rerun), the report says per stage how many units were reused and how many ran, and the
result equals a run from scratch on the grown sources (same ledger and release)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from rs5m import demo
from tasks.pipeline import PUB11, RELEASE
from tests.helpers import BIN, canonical, free_port, rs5m, write_demo_pub11_config

GROWN_SOURCE = "cc3m_like"


def report_json(workdir: Path) -> dict:
    result = subprocess.run(
        [str(BIN / "rs5m"), "report", str(workdir), "--json"], capture_output=True, text=True, timeout=180
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


@pytest.mark.xdist_group("incremental")
def test_a_grown_source_reruns_only_its_new_shards_and_matches_a_run_from_scratch(
    tmp_path: Path, prefect_server
) -> None:
    env = prefect_server.env()
    with demo.DemoServer(port=free_port()) as served:
        scratch_config = write_demo_pub11_config(tmp_path / "scratch", served.base_url)
        config = write_demo_pub11_config(tmp_path / "incremental", served.base_url)
        spec = yaml.safe_load(config.read_text())
        grown = config.parent / next(s["path"] for s in spec["sources"] if s["name"] == GROWN_SOURCE)
        lines = grown.read_text().splitlines(keepends=True)
        held_back = len(lines) // 3
        grown.write_text("".join(lines[:-held_back]))  # the source as it was before rows were appended

        first = rs5m("run", str(config), env=env)
        assert first.returncode == 0, first.stderr[-5000:]

        grown.write_text("".join(lines))  # rows appended
        rebuild = rs5m("run", str(config), env=env)
        assert rebuild.returncode == 0, rebuild.stderr[-5000:]
        scratch = rs5m("run", str(scratch_config), env=env)
        assert scratch.returncode == 0, scratch.stderr[-5000:]

    assert canonical(config.parent) == canonical(scratch_config.parent)
    after = report_json(config.parent)
    assert after["stages"] == report_json(scratch_config.parent)["stages"]
    units = {u["stage"]: u for u in after["last_run"]["units"]}
    assert list(units) == [*PUB11.stage_names, *RELEASE.stage_names]
    # ingest: only the grown source's unit reran; the other two sources were reused
    assert (units["ingest"]["reused"], units["ingest"]["ran"]) == (len(spec["sources"]) - 1, 1)
    # per-shard stages: the other sources' shards (and the grown one's unchanged leading shards) were reused
    for stage in PUB11.stage_names[1:]:
        assert units[stage]["reused"] > 0 and units[stage]["ran"] > 0, units[stage]
    # global stages rerun over everything
    for stage in ("dedup", "shard"):
        assert (units[stage]["reused"], units[stage]["ran"]) == (0, 1), units[stage]
    assert "units reused / run per stage: ingest 2/1" in rs5m("report", str(config.parent), env=env).stdout
