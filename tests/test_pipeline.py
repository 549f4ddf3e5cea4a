"""End to end: `rs5m demo` against a real Prefect server, the funnel it reports, the Prefect API's view of
the run, a kill in the middle of a download shard, and stage reruns when a config section changes."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from urllib.parse import urlsplit
from uuid import UUID

import duckdb
import psutil
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml

from rs5m.demo import expected_contaminated, expected_dedup, expected_funnel, row_key
from storage.catalog import catalog_root
from storage.layout import Layout
from storage.lock import workdir_lock
from tests.helpers import BIN, DEMO_TIMEOUT_S, canonical, rs5m

PUB11 = ["ingest", "keyword", "download", "validate", "embed", "filter"]
RS3 = ["rs3_ingest", "rs3_read", "rs3_validate", "rs3_meta", "rs3_caption", "rs3_embed", "rs3_score"]
RELEASE = ["dedup", "decontaminate", "shard"]
STAGES = [*PUB11, *RS3, *RELEASE]
# shares the session's demo run with tests/test_crash_matrix.py
pytestmark = pytest.mark.xdist_group(name="demo")


def report_json(workdir: Path, env: dict[str, str] | None = None) -> dict:
    result = rs5m("report", str(workdir), "--json", env=env or dict(os.environ), timeout=180)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_demo_funnel_matches_the_corpus_design(demo_run: Path) -> None:
    report = report_json(demo_run)
    assert [s["stage"] for s in report["stages"]] == STAGES
    assert report["incomplete"] == [] and report["failed_sources"] == {}
    measured = {s["stage"]: s["sources"] for s in report["stages"]}
    designed = expected_funnel()
    assert {stage: measured[stage] for stage in designed} == designed
    web = set(measured["ingest"])
    survivors = sum(c["kept"] for c in measured["validate"].values())
    # the demo's random-weight CLIP scores are noise: its filter keeps everything, and says so
    assert sum(c["kept"] for c in measured["embed"].values()) == survivors
    assert sum(c["kept"] for c in measured["filter"].values()) == survivors
    assert any(note.startswith("CLIP has random weights") for note in report["notes"])
    assert any(note.startswith("BLIP-2 is the shipped tiny model") for note in report["notes"])
    dropped_as_copies = sum(sum(c["dropped"].values()) for n, c in measured["dedup"].items() if n in web)
    assert dropped_as_copies == sum(len(group) - 1 for group in expected_dedup())
    assert report["eval_overlap"] == {"demo_eval": len(expected_contaminated())}
    remain_web = sum(n for name, n in report["remain"].items() if name in web)
    assert remain_web == survivors - dropped_as_copies - len(expected_contaminated())


def test_dedup_finds_exactly_the_designed_groups(demo_run: Path) -> None:
    con = duckdb.connect(str(Layout(demo_run).catalog), read_only=True)
    rows = con.sql(
        "SELECT l.sample_id, l.fate, l.reason, l.kept_sample_id, e.source, e.url, e.caption "
        "FROM ledger l JOIN embed e USING (sample_id) WHERE l.stage = 'dedup'"
    ).fetchall()
    key_of = {sample_id: row_key(source, url, caption) for sample_id, _, _, _, source, url, caption in rows}
    groups: dict[str, set] = {}
    for sample_id, fate, reason, kept_id, *_ in rows:
        keeper = sample_id if fate == "kept" else kept_id
        assert fate == "kept" or reason in {"duplicate_exact", "duplicate_perceptual"}
        groups.setdefault(keeper, set()).add(key_of[sample_id])
    found = sorted(sorted(group) for group in groups.values() if len(group) > 1)
    assert found == sorted(sorted(group) for group in expected_dedup())


def test_decontamination_and_the_released_dataset(demo_run: Path) -> None:
    con = duckdb.connect(str(Layout(demo_run).catalog), read_only=True)
    contaminated = con.sql(
        "SELECT d.url FROM ledger l JOIN dedup d USING (sample_id) "
        "WHERE l.stage = 'decontaminate' AND l.reason = 'contaminated'"
    ).fetchall()
    assert {urlsplit(url).path for (url,) in contaminated} == expected_contaminated()
    manifest = json.loads((demo_run / "dataset" / "manifest.json").read_text())
    assert manifest["totals"]["rows"] == con.sql("SELECT count(*) FROM samples").fetchall()[0][0]
    parquet = [f for f in manifest["files"] if f["kind"] == "parquet"]
    tars = [f for f in manifest["files"] if f["kind"] == "webdataset"]
    assert parquet and len(tars) == len(parquet)
    released = duckdb.sql(
        f"SELECT sample_id, sha256, split FROM read_parquet('{demo_run / 'dataset'}/*/*.parquet')"
    ).fetchall()
    assert sorted(r[0] for r in released) == sorted(
        r[0] for r in con.sql("SELECT sample_id FROM samples").fetchall()
    )
    assert {split for *_, split in released} == {"train", "val"}


def test_funnel_invariants(demo_run: Path) -> None:
    report = report_json(demo_run)
    stages = report["stages"]
    for stage in stages:
        for counts in stage["sources"].values():
            assert counts["in"] == counts["kept"] + sum(counts["dropped"].values())
    by_name = {stage["stage"]: stage for stage in stages}
    for stage in stages:  # a stage reads what its upstreams kept (the release reads both pipelines)
        for name, counts in stage["sources"].items():
            upstream = [
                by_name[u]["sources"][name]["kept"]
                for u in stage["upstreams"]
                if name in by_name[u]["sources"]
            ]
            assert stage["upstreams"] == [] or counts["in"] == sum(upstream), (stage["stage"], name)
    sources = yaml.safe_load((demo_run / "demo-config.yaml").read_text())["sources"]
    con = duckdb.connect()
    for source in sources:
        path = source["path"]
        if source["format"] == "parquet":
            rows = con.sql(f"SELECT count(*) FROM read_parquet('{path}')").fetchall()[0][0]
        else:
            rows = sum(1 for line in Path(path).read_text().splitlines() if line.strip())
        assert stages[0]["sources"][source["name"]]["in"] == rows


def test_every_sample_has_exactly_one_final_fate(demo_run: Path) -> None:
    con = duckdb.connect(str(Layout(demo_run).catalog), read_only=True)
    per_stage = con.sql(
        "SELECT stage, count(*), count(DISTINCT sample_id) FROM ledger GROUP BY stage"
    ).fetchall()
    assert all(n == distinct for _, n, distinct in per_stage)
    # the last stage a sample reached decides its fate: dropped there with a reason, or kept by the last stage
    final = con.sql(
        "SELECT sample_id, arg_max(fate, s.position) AS fate, arg_max(l.stage, s.position) AS last_stage "
        "FROM ledger l JOIN stages s USING (stage) GROUP BY sample_id"
    ).fetchall()
    ingested = con.sql("SELECT count(*) FROM ledger WHERE stage IN ('ingest', 'rs3_ingest')").fetchall()[0][0]
    assert len(final) == ingested
    kept = {sid for sid, fate, stage in final if fate == "kept"}
    assert all(stage == STAGES[-1] for sid, fate, stage in final if fate == "kept")
    assert kept == {row[0] for row in con.sql("SELECT sample_id FROM samples").fetchall()}
    assert (
        con.sql("SELECT count(*) FROM ledger WHERE fate = 'dropped' AND reason IS NULL").fetchall()[0][0] == 0
    )


def test_report_text_names_rs5m_columns(demo_run: Path) -> None:
    result = rs5m("report", str(demo_run), env=dict(os.environ), timeout=180)
    assert result.returncode == 0
    for column in ("amount", "after RS keyword filtering", "downloaded", "invalid images removed", "remain"):
        assert column in result.stdout
    assert "laion_like" in result.stdout and "total" in result.stdout


def test_prefect_api_shows_the_run_its_tasks_and_artifacts(demo_run: Path, prefect_server) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterId,
        FlowRunFilterParentFlowRunId,
    )
    from prefect.settings import PREFECT_API_URL, temporary_settings

    (record,) = [json.loads(p.read_text()) for p in (demo_run / "runs").glob("*.json")]
    parent_id = UUID(record["run_id"])
    with (
        temporary_settings({PREFECT_API_URL: prefect_server.api_url}),
        get_client(sync_client=True) as client,
    ):
        parent = client.read_flow_run(parent_id)
        assert parent.state.is_completed()
        children = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent_id]))
        )
        flows = {client.read_flow(run.flow_id).name: run for run in children}
        assert sorted(flows) == sorted(STAGES)
        assert all(run.state.is_completed() for run in children)
        task_runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id for run in children])), limit=200
        )
        assert task_runs and all(t.state.is_completed() for t in task_runs)
        manifest = json.loads((demo_run / "keyword" / "manifest.json").read_text())
        keyword_tasks = [t for t in task_runs if t.flow_run_id == flows["keyword"].id]
        assert sorted(t.name for t in keyword_tasks) == sorted(f"keyword-{s}" for s in manifest["shards"])
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[parent_id]))
        )
        progress = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[r.id for r in children]))
        )
        # the run's process sends heartbeats (Prefect's detection of crashed runs) for the parent flow run only
        runs = [f"prefect.flow-run.{run_id}" for run_id in (parent_id, *(run.id for run in children))]
        deadline = time.monotonic() + 30  # the server stores events shortly after they arrive
        while True:
            heartbeats = client._client.post(
                "/events/filter",
                json={
                    "filter": {
                        "event": {"name": ["prefect.flow-run.heartbeat"]},
                        "any_resource": {"id": runs},
                    },
                    "limit": 50,
                },
            ).json()["events"]
            beating = {event["resource"]["prefect.resource.id"] for event in heartbeats}
            if runs[0] in beating or time.monotonic() > deadline:
                break
            time.sleep(1)
    assert beating == {runs[0]}
    # each stage's flow run moved a progress artifact to 100%, saying how many units ran
    progress_of = {a.key: a for a in progress if a.type == "progress"}
    assert set(progress_of) == {f"rs5m-progress-{name.replace('_', '-')}" for name in STAGES}
    for name in STAGES:
        artifact = progress_of[f"rs5m-progress-{name.replace('_', '-')}"]
        assert float(artifact.data) == 100.0, (name, artifact.data)
        assert artifact.description.startswith(f"{name}: "), artifact.description
    shards = len(manifest["shards"])
    assert progress_of["rs5m-progress-keyword"].description.startswith(
        f"keyword: {shards} of {shards} units (0 reused, {shards} run), "
    )
    by_key = {a.key: a for a in artifacts}
    assert {"rs5m-funnel", "rs5m-summary", "rs5m-eval-overlap", "rs5m-caption-quality"} <= set(by_key)
    quality = by_key["rs5m-caption-quality"].data
    quality = json.loads(quality) if isinstance(quality, str) else quality
    assert {row["source"] for row in quality} == {"fmow_like", "bigearthnet_like", "millionaid_like", "(all)"}
    overlap = by_key["rs5m-eval-overlap"].data
    overlap = json.loads(overlap) if isinstance(overlap, str) else overlap
    assert overlap == [{"eval_set": "demo_eval", "contaminated": len(expected_contaminated())}]
    table = by_key["rs5m-funnel"].data
    rows = json.loads(table) if isinstance(table, str) else table
    kept = {(r["stage"], r["source"]): r["kept"] for r in rows}
    report = report_json(demo_run)
    assert kept == {(s["stage"], n): c["kept"] for s in report["stages"] for n, c in s["sources"].items()}
    assert "RS5M funnel" in by_key["rs5m-summary"].data


def _wait_for_download_work(workdir: Path, process: subprocess.Popen, since: float) -> str:
    """Wait until img2dataset is writing a shard in this run (scratch files newer than `since`, the shard
    has no marker); its shard id."""
    scratch = workdir / "download" / "scratch"
    deadline = time.monotonic() + DEMO_TIMEOUT_S
    while time.monotonic() < deadline and process.poll() is None:
        for folder in scratch.glob("*") if scratch.exists() else []:
            if any(p.stat().st_mtime > since for p in folder.rglob("*.parquet")):
                return folder.name
        time.sleep(0.1)
    raise AssertionError("no download shard was in progress before the run ended or the deadline")


def _session_processes(session: int) -> list[psutil.Process]:
    alive = []
    for process in psutil.process_iter():
        try:
            if os.getsid(process.pid) == session and process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process)
        except (ProcessLookupError, psutil.Error):
            continue
    return alive


def _stop_mid_download(
    workdir: Path, args: list[str], env: dict[str, str], signum: int, whole_group: bool
) -> tuple[subprocess.CompletedProcess, str, float, list[psutil.Process]]:
    """Start a run, send `signum` while a download shard is half-done; (result, shard, seconds to exit,
    processes of the run's session still alive a few seconds after it exited)."""
    since = time.time()
    process = subprocess.Popen(
        args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        shard = _wait_for_download_work(workdir, process, since)
        sent = time.monotonic()
        if whole_group:
            os.killpg(process.pid, signum)  # what Ctrl-C in a terminal does
        else:
            process.send_signal(signum)  # what `timeout` and a Prefect worker do
        try:
            stdout, stderr = process.communicate(timeout=60)
        except subprocess.TimeoutExpired as expired:  # something of the run's holds its output open
            holders = [" ".join(p.cmdline()) for p in _session_processes(process.pid)]
            raise AssertionError(f"exit {process.poll()}; still running: {holders}") from expired
        took = time.monotonic() - sent
        deadline = time.monotonic() + 5
        while _session_processes(process.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        leftovers = _session_processes(process.pid)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    return subprocess.CompletedProcess(args, process.returncode, stdout, stderr), shard, took, leftovers


def test_kill_and_interrupt_mid_download_then_rerun_matches_the_uninterrupted_run(
    tmp_path: Path, demo_run: Path, prefect_server, demo_port: int
) -> None:
    workdir = tmp_path / "stopped"
    args = [str(BIN / "rs5m"), "demo", "--workdir", str(workdir), "--port", str(demo_port)]
    env = prefect_server.env()

    # SIGKILL of the whole process group: nothing can be recorded, readers still tell the truth
    since = time.time()
    process = subprocess.Popen(
        args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        while (
            time.monotonic() - since < DEMO_TIMEOUT_S and not (workdir / "keyword" / "manifest.json").exists()
        ):
            time.sleep(0.1)
        live = report_json(workdir)  # `rs5m report` reads the catalog while the run is going
        assert [s["stage"] for s in live["stages"]][:2] == ["ingest", "keyword"]
        killed_shard = _wait_for_download_work(workdir, process, since)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert not (workdir / "download" / "markers" / f"{killed_shard}.json").exists()
    after_kill = report_json(workdir)
    assert {"stage": "download", "status": "interrupted"} in after_kill["incomplete"]
    assert after_kill["last_run"]["status"] == "interrupted" and after_kill["remain"] == {}

    # Ctrl-C (SIGINT to the whole group, as a terminal sends it): prompt, recorded, nothing left running.
    # (SIGTERM to the run alone takes the same path: tests/test_run_control.py)
    for signum, whole_group, code in ((signal.SIGINT, True, 130),):
        result, shard, took, leftovers = _stop_mid_download(workdir, args, env, signum, whole_group)
        assert result.returncode == code, result.stderr[-3000:]
        assert took < 30, f"{signal.Signals(signum).name} took {took:.0f} s to end the run"
        assert f"interrupted by {signal.Signals(signum).name} during stage 'download'" in result.stderr
        assert not leftovers, [p.cmdline() for p in leftovers]
        assert not (workdir / "download" / "markers" / f"{shard}.json").exists()
        report = report_json(workdir)
        assert report["last_run"]["status"] == "interrupted"
        assert {"stage": "download", "status": "interrupted"} in report["incomplete"]
        _assert_cancelled_in_prefect(report["last_run"]["run_id"], prefect_server)

    result = rs5m("demo", "--workdir", str(workdir), "--port", str(demo_port), env=env)
    assert result.returncode == 0, result.stderr[-5000:]
    assert canonical(workdir) == canonical(demo_run)
    assert not [p for p in workdir.rglob("*") if ".tmp-" in p.name or ".building-" in p.name]


def _assert_cancelled_in_prefect(run_id: str, prefect_server) -> None:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with (
        temporary_settings({PREFECT_API_URL: prefect_server.api_url}),
        get_client(sync_client=True) as client,
    ):
        parent = client.read_flow_run(UUID(run_id))
    assert parent.state.is_cancelled(), parent.state


def test_report_on_a_moved_work_directory_rebuilds_the_catalog_there(tmp_path: Path, demo_run: Path) -> None:
    copied, moved = tmp_path / "copied", tmp_path / "moved"
    shutil.copytree(demo_run, copied)  # with the catalog, whose views name demo_run's files
    assert catalog_root(Layout(copied)) == demo_run
    expected = report_json(demo_run)["stages"]
    assert report_json(copied)["stages"] == expected
    assert catalog_root(Layout(copied)) == copied
    copied.rename(moved)  # the views now name files that no longer exist
    assert report_json(moved) == report_json(demo_run) | {"workdir": str(moved)}
    assert catalog_root(Layout(moved)) == moved
    (moved / "catalog.duckdb").unlink()
    assert report_json(moved)["stages"] == expected  # no catalog: built from the manifests


def copy_of_demo(demo_run: Path, workdir: Path) -> dict:
    """A copy of the reference run's work directory, and its resolved config pointed at the copy."""
    shutil.copytree(demo_run, workdir, ignore=shutil.ignore_patterns("catalog.duckdb*"))
    config = yaml.safe_load((workdir / "demo-config.yaml").read_text())
    config["workdir"] = str(workdir)
    for source in config["sources"]:
        source["path"] = str(workdir / "demo_sources" / Path(source["path"]).name)
    for eval_set in config["decontaminate"]["eval_sets"]:
        eval_set["path"] = str(workdir / Path(eval_set["path"]).name)
    for source in config["rs3"]["sources"]:
        source["path"] = str(workdir / Path(source["path"]).relative_to(demo_run))
    return config


def test_changing_a_stage_config_reruns_it_and_marks_later_stages_stale(
    tmp_path: Path, demo_run: Path, prefect_server
) -> None:
    workdir = tmp_path / "rerun"
    config = copy_of_demo(demo_run, workdir)
    empty_exclusions = tmp_path / "no-exclusions.txt"
    empty_exclusions.write_text("# no exclusions: every keyword hit counts\n")
    changed = tmp_path / "changed.yaml"
    changed.write_text(
        yaml.safe_dump({**config, "keyword": {**config["keyword"], "exclusions": str(empty_exclusions)}})
    )
    original = tmp_path / "original.yaml"
    original.write_text(yaml.safe_dump(config))
    ingest_marker = (workdir / "ingest" / "markers" / "laion_like.json").read_text()

    result = rs5m("run", str(changed), "--stages", "keyword", env=prefect_server.env())
    assert result.returncode == 0, result.stderr[-5000:]
    report = report_json(workdir)
    later = [*PUB11[PUB11.index("keyword") + 1 :], *RELEASE]  # RS3's stages do not read keyword
    assert {s["stage"]: s["status"] for s in report["incomplete"]} == dict.fromkeys(later, "stale")
    before = {s["stage"]: s["sources"] for s in report_json(demo_run)["stages"]}
    after = {s["stage"]: s["sources"] for s in report["stages"]}
    assert after["ingest"] == before["ingest"]
    assert sum(c["kept"] for c in after["keyword"].values()) > sum(
        c["kept"] for c in before["keyword"].values()
    )
    assert (workdir / "ingest" / "markers" / "laion_like.json").read_text() == ingest_marker

    # back to the original keyword config: keyword reruns, and download/validate are current again untouched
    result = rs5m("run", str(original), "--stages", "keyword", env=prefect_server.env())
    assert result.returncode == 0, result.stderr[-5000:]
    report = report_json(workdir)
    assert report["incomplete"] == []
    assert canonical(workdir)[1] == canonical(demo_run)[1]


def new_dedup_and_shard_config(demo_run: Path, workdir: Path) -> Path:
    """A copy of the demo whose dedup and shard configs changed: those stages have new work to write."""
    config = copy_of_demo(demo_run, workdir)
    config["dedup"]["exact"] = False  # copies found as perceptual duplicates (distance 0) instead
    config["shard"]["rows_per_shard"] = 16
    path = workdir.parent / f"{workdir.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_outputs(workdir: Path) -> tuple:
    return (
        canonical(workdir),
        (workdir / "dataset" / "manifest.json").read_text(),
        sorted(p.name for p in workdir.rglob("*") if ".tmp-" in p.name),
    )


@pytest.fixture(scope="module")
def uninterrupted_new_config(tmp_path_factory, demo_run: Path, prefect_server) -> tuple:
    workdir = tmp_path_factory.mktemp("new-config") / "uninterrupted"
    result = rs5m("run", str(new_dedup_and_shard_config(demo_run, workdir)), env=prefect_server.env())
    assert result.returncode == 0, result.stderr[-5000:]
    return run_outputs(workdir)


@pytest.mark.parametrize(
    ("module", "attribute", "nth", "crashed_in"),
    [
        ("tasks.harness", "commit_shard", 3, "dedup"),  # dedup has rewritten two shards of its new decisions
        ("storage.dataset", "_Part.commit", 2, "shard"),  # the shard stage has published one new part
    ],
)
def test_a_crash_inside_a_global_stage_then_rerun_matches_an_uninterrupted_run(
    tmp_path: Path,
    demo_run: Path,
    prefect_server,
    uninterrupted_new_config: tuple,
    module: str,
    attribute: str,
    nth: int,
    crashed_in: str,
) -> None:
    workdir = tmp_path / "crashed"
    config = new_dedup_and_shard_config(demo_run, workdir)
    crash = subprocess.run(
        [str(BIN / "python"), str(Path(__file__).parent / "crash_at.py"), module, attribute, str(nth)]
        + ["run", str(config)],
        capture_output=True,
        text=True,
        env=prefect_server.env(),
        timeout=DEMO_TIMEOUT_S,
    )
    assert crash.returncode == 137, crash.stderr[-3000:]
    incomplete = [s["stage"] for s in report_json(workdir)["incomplete"]]
    assert incomplete[0] == crashed_in
    result = rs5m("run", str(config), env=prefect_server.env())
    assert result.returncode == 0, result.stderr[-5000:]
    outputs = run_outputs(workdir)
    assert outputs == uninterrupted_new_config
    ledger, _ = outputs[0]
    assert outputs[0] != canonical(demo_run)  # the new config did change decisions
    assert not outputs[2]  # no temporaries left by the crash survive the rerun
    assert any("duplicate_perceptual" in row for row in ledger)


def test_concurrent_runs_on_one_work_directory_write_once(
    tmp_path: Path, demo_run: Path, prefect_server, uninterrupted_new_config: tuple
) -> None:
    workdir = tmp_path / "together"
    config = str(new_dedup_and_shard_config(demo_run, workdir))
    env = prefect_server.env()
    with workdir_lock(Layout(workdir), "a-run-of-this-test"):
        busy = rs5m("run", config, env=env)  # fails at once, naming the writer
    assert busy.returncode == 3, busy.stderr[-2000:]
    assert "is being written by run a-run-of-this-test" in busy.stderr and "--wait" in busy.stderr
    assert busy.stderr.count("\n") <= 3, busy.stderr  # a line, not a traceback

    runs = [
        subprocess.Popen(
            [str(BIN / "rs5m"), "run", config, "--wait"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    results = [run.communicate(timeout=DEMO_TIMEOUT_S) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], [err[-2000:] for _, err in results]
    assert run_outputs(workdir) == uninterrupted_new_config


def test_rs3_rows_carry_the_metadata_written_and_captions_built_from_it(
    demo_run: Path, tmp_path: Path
) -> None:
    from rs5m.config import MetaCaptionConfig
    from rs5m.demo_rs3 import DEMO_RS3_SOURCES, DROP_REASON, write_demo_rs3
    from tasks.meta_caption import (
        FAMILIES_BY_FORMAT,
        TemplateSet,
        caption_fields,
        meta_caption,
        resolve_templates,
    )

    written = write_demo_rs3(tmp_path / "rs3")  # the demo's files are deterministic: the same as it wrote
    formats = {name: folder for name, (folder, _) in DEMO_RS3_SOURCES.items()}  # folders are named by format
    assert set(formats) == set(written)
    released = (
        pa.concat_tables(pq.read_table(path) for path in sorted((demo_run / "dataset").glob("*/*.parquet")))
        .filter(pc.equal(pc.field("subset"), "rs3"))
        .to_pylist()
    )
    assert released and {row["source"] for row in released} == set(written)
    templates = TemplateSet.read(resolve_templates("rs5m-v1"))
    for row in released:
        metadata = written[row["source"]][row["file"]]
        for field, value in metadata.items():  # field by field, as written in the dataset's own format
            expected = pytest.approx(value) if isinstance(value, float) else value
            assert row[field] == expected, (row["file"], field)
        fields = caption_fields(metadata, MetaCaptionConfig(), formats[row["source"]])
        made = meta_caption(fields, FAMILIES_BY_FORMAT[formats[row["source"]]], templates, row["sample_id"])
        caption, template = made or (None, None)  # the flat image without metadata has no meta caption
        assert (row["meta_caption"], row["meta_template"]) == (caption, template)
        # the final caption: meta caption + the chosen BLIP-2 caption (image folders: the latter alone)
        chosen = row[row["caption_choice"]]
        assert chosen and chosen in {candidate["text"] for candidate in row["caption_candidates"]}
        prefixed = formats[row["source"]] != "image_folder" and caption is not None
        assert row["caption"] == (f"{caption} {chosen}" if prefixed else chosen)
        if caption is None:
            continue
        assert not any(bad in caption for bad in ("None", "nan", "{", "}"))
        if row["source"] == "bigearthnet_like":  # the latitude band (8 degrees each from 80 S), not N/S
            band = "CDEFGHJKLMNPQRSTUVWX"[min(int((metadata["latitude"] + 80) // 8), 19)]
            assert metadata["utm_zone"].endswith(band) and f"utm zone {metadata['utm_zone']}" in caption
        if formats[row["source"]] == "fmow":
            assert row["country"] in caption
    # the designed drops: each broken sample dropped by rs3_read with its reason; each fMoW capture
    # released once (its rgb and msrgb views are near-duplicates: dedup keeps one)
    con = duckdb.connect(str(Layout(demo_run).catalog), read_only=True)
    dropped = dict(
        con.sql(
            "SELECT i.file, l.reason FROM ledger l JOIN rs3_ingest i USING (sample_id) WHERE l.stage = 'rs3_read' AND l.fate = 'dropped'"
        ).fetchall()
    )
    assert dropped == {
        file: entry[DROP_REASON]
        for files in written.values()
        for file, entry in files.items()
        if DROP_REASON in entry
    }
    fmow = [row["file"] for row in released if row["source"] == "fmow_like"]
    captures = {file.rsplit("_", 1)[0] for file in fmow}
    assert (
        len(captures)
        == len(fmow)
        == len(
            {f.rsplit("_", 1)[0] for f in written["fmow_like"] if DROP_REASON not in written["fmow_like"][f]}
        )
    )


def test_caption_quality_report_measures_the_chosen_model_captions(demo_run: Path) -> None:
    from tasks.rs3_caption import names_orientation

    quality = report_json(demo_run)["caption_quality"]
    rows = pq.read_table(demo_run / "rs3_caption" / "data").to_pylist()
    by_source: dict[str, list[dict]] = {}
    for row in rows:
        by_source.setdefault(row["source"], []).append(row)
    assert set(quality["sources"]) == set(by_source)
    for source, group in [*by_source.items(), ("(all)", rows)]:
        measured = quality["all"] if source == "(all)" else quality["sources"][source]
        chosen = [row[row["caption_choice"]] for row in group]
        # words: split at RE2's \s (DuckDB), which leaves out Python's other whitespace characters
        words = sorted(len(re.split(r"[\t\n\f\r ]+", text)) for text in chosen)
        candidates = [c["text"] for row in group for c in row["caption_candidates"]]
        assert measured["images"] == len(group)
        assert measured["duplicate_share"] == pytest.approx(1 - len(set(chosen)) / len(chosen))
        assert measured["words_mean"] == pytest.approx(sum(words) / len(words))
        assert measured["words_max"] == words[-1]
        assert measured["orientation_share"] == pytest.approx(
            sum(map(names_orientation, chosen)) / len(chosen)
        )
        assert measured["candidate_orientation_share"] == pytest.approx(
            sum(map(names_orientation, candidates)) / len(candidates)
        )
        assert measured["caption_score_mean"] == pytest.approx(
            sum(row["caption_score"] for row in group) / len(group), abs=1e-6
        )
    examples = quality["examples"]["millionaid_like"]
    first = min(by_source["millionaid_like"], key=lambda row: row["sample_id"])
    assert examples[0]["sample_id"] == first["sample_id"] and examples[0]["caption"] == first["caption"]
    text = rs5m("report", str(demo_run), env=dict(os.environ), timeout=180).stdout
    assert "Model captions" in text and "orientation" in text


def test_the_demo_fine_tunes_on_its_release_and_scores_every_checkpoint(demo_run: Path) -> None:
    import open_clip
    import torch

    from models.clip import register_project_configs
    from rs5m.eval_cli import EvalRequest, json_safe, run_evaluation

    config = yaml.safe_load((demo_run / "demo-config.yaml").read_text())
    run = demo_run / "train" / config["train"]["run_name"]
    record = json.loads((run / "run.json").read_text())
    assert record["model"] == "rs5m-tiny-vit" and record["total_steps"] == config["train"]["steps"]
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, config["train"]["steps"] + 1))
    released = sum(
        1
        for path in (demo_run / "dataset" / "train").glob("*.parquet")
        for _ in pq.read_table(path).column("sample_id")
    )
    assert record["pairs"] == released
    # a checkpoint is a plain open_clip state dict
    register_project_configs()
    model = open_clip.create_model("rs5m-tiny-vit")
    model.load_state_dict(torch.load(run / "checkpoints" / "final.pt", map_location="cpu"))
    scorecard = json.loads((run / "scorecard.json").read_text())
    models = {entry["model"]: entry for entry in scorecard["models"]}
    assert list(models) == ["base", "step-000004", "final"]
    assert models["base"]["pretrained"] is None
    assert {(row["model"], row["dataset"]) for row in scorecard["rows"]} == {
        (model_name, dataset) for model_name in models for dataset in ("scenes", "captions")
    }
    # the scorecard's numbers are what `rs5m eval` gives for the same weights
    final = run_evaluation(
        EvalRequest(
            model="rs5m-tiny-vit",
            datasets=list(config["eval"]["datasets"].items()),
            pretrained=str(run / "checkpoints" / "final.pt"),
            num_workers=0,
        )
    )
    by_dataset = sorted(json_safe(final), key=lambda result: result["dataset"])  # the YAML dump sorts keys
    assert by_dataset == sorted(models["final"]["results"], key=lambda result: result["dataset"])
    assert (run / "loss.svg").read_text().startswith("<svg")
