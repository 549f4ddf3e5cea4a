"""The fault matrix for kills: each stage of the demo pipelines after download (RS3's own stages once),
killed at each of its commit steps, then rerun, ends with the same data, ledger, arrays, manifest (and release) as the uninterrupted
demo run, shows as interrupted in between, and leaves no temporaries.

The kill is `os._exit(137)` on the N-th call of a commit function in a child process: no finally block
runs, as with SIGKILL or a lost machine, but at an exact point. The stages run through their plain
functions (tasks/, storage/), the same calls their flows make per unit, without Prefect. Download is killed
(SIGKILL, SIGINT, SIGTERM of the real `rs5m` process group) in tests/test_pipeline.py.
"""

from __future__ import annotations

import functools
import importlib
import multiprocessing
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from rs5m.config import PipelineConfig, parse_config
from storage.catalog import INTERRUPTED, stage_states
from storage.layout import Layout
from storage.markers import read_manifest
from tasks.pipeline import STAGE_ORDER
from tests.helpers import run_stage_directly

pytestmark = pytest.mark.xdist_group(name="demo")  # reuses the session's demo run (tests/conftest.py)

# Commit steps: a unit's data written but not its ledger (the second unit, after the first one committed);
# every unit committed but the stage's manifest not written; the release half-built (shard only).
STEPS = {
    "mid_unit": ("tasks.harness", "write_parquet", 4),
    "before_manifest": ("tasks.harness", "write_manifest", 1),
    "mid_release": ("storage.dataset", "_Part.commit", 2),
}
# Stages whose libraries run OpenMP thread pools (torch, faiss), which do not survive a fork: their child
# is spawned (a fresh interpreter), the others are forked (milliseconds).
SPAWNED = {"embed", "filter", "dedup", "decontaminate", "rs3_caption"}
# RS3's stages that run code of their own (its validate, embed and score are PUB11's stages' code)
RS3_OWN = ("rs3_ingest", "rs3_read", "rs3_meta", "rs3_caption")
CASES = [
    (stage, step)
    for stage in STAGE_ORDER
    if stage != "download" and (not stage.startswith("rs3_") or stage in RS3_OWN)
    for step in STEPS
    if (step != "mid_release" or stage == "shard") and (step == "mid_unit" or not stage.startswith("rs3_"))
]


def crash_during(
    root: str, stage: str, config: PipelineConfig, module: str, attribute: str, nth: int
) -> None:
    """In a child process: run the stage, ending the process on the nth call of module.attribute."""
    owner = importlib.import_module(module)
    *path, name = attribute.split(".")
    for part in path:
        owner = getattr(owner, part)
    original, calls = getattr(owner, name), []

    @functools.wraps(original)
    def crashing(*args, **kwargs):
        calls.append(1)
        if len(calls) == nth:
            os._exit(137)
        return original(*args, **kwargs)

    setattr(owner, name, crashing)
    run_stage_directly(Layout(Path(root)), stage, config, run_id="crashed")
    os._exit(0)  # the crash point was not reached


def stage_outputs(root: Path, stage: str) -> dict:
    """What a stage produced, without who or when: its current shards' data tables, ledger tables without
    run_id and arrays, the manifest's checksums and counts, and the release when there is one."""
    manifest = read_manifest(Layout(root), stage)
    assert manifest is not None, f"{stage} is not complete in {root}"
    folder = root / stage
    outputs: dict = {
        "manifest": (manifest.shards, manifest.counts, manifest.failed_sources),
        "data": {s: pq.read_table(folder / "data" / f"{s}.parquet") for s in manifest.shards},
        "ledger": {
            s: pq.read_table(folder / "ledger" / f"{s}.parquet").drop_columns(["run_id"])
            for s in manifest.shards
        },
        "arrays": {
            p.name: np.load(p).tobytes()
            for p in sorted((folder / "arrays").glob("*.npy"))
            if p.name.split(".")[0] in manifest.shards
        },
    }
    if stage == "shard":
        outputs["release"] = os.readlink(root / "release")
        outputs["release_manifest"] = (root / "dataset" / "manifest.json").read_text()
    return outputs


def demo_config(workdir: Path) -> PipelineConfig:
    """The demo run's resolved config, pointed at a copy of its work directory."""
    data = yaml.safe_load((workdir / "demo-config.yaml").read_text())
    data["workdir"] = str(workdir)
    for source in data["sources"]:
        source["path"] = str(workdir / "demo_sources" / Path(source["path"]).name)
    for eval_set in data["decontaminate"]["eval_sets"]:
        eval_set["path"] = str(workdir / Path(eval_set["path"]).name)
    for source in data["rs3"]["sources"]:
        source["path"] = str(workdir / "demo_rs3" / Path(source["path"]).name)
    return parse_config(data)


@pytest.mark.parametrize(("stage", "step"), CASES, ids=[f"{stage}-{step}" for stage, step in CASES])
def test_a_stage_killed_at_a_commit_step_reruns_to_the_uninterrupted_result(
    tmp_path: Path, demo_run: Path, stage: str, step: str
) -> None:
    workdir = tmp_path / "work"
    # the finished demo run with the stage's markers gone: every unit of the stage is redone, over the
    # files the previous run left (as when a changed config reruns it)
    shutil.copytree(demo_run, workdir, symlinks=True, ignore=shutil.ignore_patterns("catalog.duckdb*"))
    shutil.rmtree(workdir / stage / "markers")
    config = demo_config(workdir)
    module, attribute, nth = STEPS[step]
    context = multiprocessing.get_context("spawn" if stage in SPAWNED else "fork")
    child = context.Process(target=crash_during, args=(str(workdir), stage, config, module, attribute, nth))
    child.start()
    child.join(300)
    assert child.exitcode == 137, f"{stage}: the crash point was not reached (exit {child.exitcode})"

    layout = Layout(workdir)
    assert {s.stage: s.status for s in stage_states(layout, STAGE_ORDER)}[stage] == INTERRUPTED
    run_stage_directly(layout, stage, config, run_id="rerun")
    assert stage_outputs(workdir, stage) == stage_outputs(demo_run, stage)
    assert not [p for p in workdir.rglob("*") if ".tmp-" in p.name or ".building-" in p.name]
