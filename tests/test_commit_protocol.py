"""The commit protocol of tasks/harness.py: a marker never describes files other than those on disk, damaged
files are detected and rebuilt (never read), undeclared reasons and lost samples are refused, a full disk
fails clearly and resumes, and a stalled shard fails with where it was."""

from __future__ import annotations

import errno
import multiprocessing
import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import storage.atomic
from storage.atomic import DiskFullError, write_parquet
from storage.layout import Layout
from storage.markers import Manifest, read_marker, sha256_file, write_manifest
from tasks.harness import (
    DamagedInputError,
    ShardContractError,
    check_outcome,
    run_shard,
)
from tasks.stage import ShardOutcome, split_by_reason
from tasks.watchdog import ShardStalled, heartbeat

SCHEMA = pa.schema([("sample_id", pa.string()), ("source", pa.string()), ("value", pa.int64())])
REASONS = {"too_low": "value below the threshold"}
SHARD = "web-00000"


def upstream(root: Path, rows: int = 20) -> Layout:
    """A complete upstream stage "up" with one shard of `rows` samples."""
    layout = Layout(root)
    table = pa.table(
        {
            "sample_id": [f"s{i:03d}" for i in range(rows)],
            "source": ["web"] * rows,
            "value": list(range(rows)),
        },
        schema=SCHEMA,
    )
    write_parquet(layout.data("up", SHARD), table)
    write_manifest(
        layout,
        Manifest("up", "f", None, {SHARD: sha256_file(layout.data("up", SHARD))}, {}, {}, "r0", "t"),
    )
    return layout


def threshold(minimum: int, reason: str = "too_low"):
    def process(table: pa.Table) -> ShardOutcome:
        values = table.column("value").to_pylist()
        outcome = split_by_reason(table, pa.array([None if v >= minimum else reason for v in values]))
        kept = outcome.kept
        return ShardOutcome(
            kept, outcome.decisions, {"emb": np.arange(kept.num_rows, dtype=np.float16)[:, None]}
        )

    return process


def run(layout: Layout, minimum: int, **kw):
    return run_shard(
        layout,
        stage="down",
        upstream="up",
        shard_id=SHARD,
        schema_of=lambda schema: schema,
        reasons=REASONS,
        fingerprint=f"threshold-{minimum}",
        run_id="r",
        process=kw.pop("process", threshold(minimum)),
        **kw,
    )


def kept_values(layout: Layout) -> list[int]:
    return pq.read_table(layout.data("down", SHARD)).column("value").to_pylist()


def crash_in_child(target, *args) -> int:
    """Run target in a forked child that dies with os._exit(137) where the target says; its exit code."""
    child = multiprocessing.get_context("fork").Process(target=target, args=args)
    child.start()
    child.join(60)
    return child.exitcode


def _rerun_under_y_crashing_before_the_marker(root: Path) -> None:
    import storage.markers

    storage.markers.write_marker = lambda *_a, **_k: os._exit(137)  # the data and ledger are written by then
    import tasks.harness

    tasks.harness.write_marker = storage.markers.write_marker
    run(Layout(root), minimum=15)


def test_a_crash_after_rewriting_under_another_config_never_leaves_the_old_marker(tmp_path: Path) -> None:
    layout = upstream(tmp_path)
    assert not run(layout, minimum=5).skipped  # config X
    x_values = kept_values(layout)
    # config Y rewrites data, ledger and arrays, then dies before its marker
    assert crash_in_child(_rerun_under_y_crashing_before_the_marker, tmp_path) == 137
    assert kept_values(layout) != x_values  # Y's data is on disk...
    assert read_marker(layout, "down", SHARD) is None  # ...and no marker claims it is X's
    summary = run(layout, minimum=5)  # back to X: not skipped, X's data rebuilt
    assert not summary.skipped and kept_values(layout) == x_values
    assert run(layout, minimum=5).skipped


@pytest.mark.parametrize("verify", ["checksum", "size"])
def test_damaged_outputs_are_detected_and_rebuilt(tmp_path: Path, verify: str) -> None:
    layout = upstream(tmp_path)
    run(layout, minimum=5)
    reference = {p: p.read_bytes() for p in (tmp_path / "down").rglob("*") if p.is_file()}
    data, array = layout.data("down", SHARD), layout.array("down", SHARD, "emb")

    array.write_bytes(array.read_bytes()[:-4])  # truncated: caught by size and checksum
    assert not run(layout, minimum=5, verify=verify).skipped
    damaged = bytearray(data.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF  # same size, other bytes: only a checksum sees it
    data.write_bytes(bytes(damaged))
    assert run(layout, minimum=5, verify=verify).skipped == (verify == "size")
    if verify == "checksum":
        after = {p: p.read_bytes() for p in (tmp_path / "down").rglob("*") if p.is_file()}
        assert {p: b for p, b in after.items() if "markers" not in p.parts} == {
            p: b for p, b in reference.items() if "markers" not in p.parts
        }


def test_a_damaged_input_is_never_read(tmp_path: Path) -> None:
    layout = upstream(tmp_path)
    path = layout.data("up", SHARD)
    damaged = bytearray(path.read_bytes())
    damaged[-20] ^= 0x01
    path.write_bytes(bytes(damaged))
    calls = []

    def spy(table: pa.Table) -> ShardOutcome:
        calls.append(table)
        return threshold(0)(table)

    with pytest.raises(DamagedInputError, match=r"up/data/web-00000.parquet is damaged.*rerun"):
        run(layout, minimum=0, process=spy)
    assert not calls


def test_undeclared_reasons_and_lost_samples_are_refused(tmp_path: Path) -> None:
    layout = upstream(tmp_path)
    with pytest.raises(ShardContractError, match=r"undeclared reason\(s\) \['too_lwo'\]"):
        run(layout, minimum=5, process=threshold(5, reason="too_lwo"))
    assert read_marker(layout, "down", SHARD) is None and not layout.data("down", SHARD).exists()

    table = pq.read_table(layout.data("up", SHARD))
    outcome = threshold(5)(table)
    lossy = ShardOutcome(outcome.kept, outcome.decisions.slice(1))
    with pytest.raises(ShardContractError, match="19 decisions for 20 inputs"):
        check_outcome(table.column("sample_id"), lossy, REASONS, "down")
    doubled = ShardOutcome(outcome.kept, pa.concat_tables([outcome.decisions, outcome.decisions.slice(0, 1)]))
    with pytest.raises(ShardContractError, match="distinct"):
        check_outcome(None, doubled, REASONS, "ingest")  # ingest: no input table, ids must still be unique


def test_a_full_disk_fails_clearly_and_a_rerun_after_freeing_space_completes(
    tmp_path: Path, monkeypatch
) -> None:
    layout = upstream(tmp_path)
    real = pq.write_table
    state = {"full": True}

    def write_table(table, where, **kw):
        if state["full"] and "ledger" in str(Path(where).parent):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(table, where, **kw)

    monkeypatch.setattr(storage.atomic.pq, "write_table", write_table)
    with pytest.raises(
        DiskFullError, match=r"no space left.*down/ledger/web-00000.parquet.*free space and rerun"
    ):
        run(layout, minimum=5)
    assert read_marker(layout, "down", SHARD) is None
    assert not list((tmp_path / "down").rglob(".*.tmp-*"))  # the failed write left no temporary
    state["full"] = False
    assert not run(layout, minimum=5).skipped
    assert kept_values(layout) == list(range(5, 20))


def test_writes_sync_the_file_and_its_folder(tmp_path: Path, monkeypatch) -> None:
    synced = []
    monkeypatch.setattr(storage.atomic, "fsync_dir", lambda folder: synced.append(Path(folder)))
    storage.atomic.write_json(tmp_path / "sub" / "marker.json", {"a": 1})
    assert synced == [tmp_path / "sub"]


def test_a_stalled_shard_fails_with_where_it_was(tmp_path: Path) -> None:
    layout = upstream(tmp_path)

    def progressing_then_stuck(table: pa.Table) -> ShardOutcome:
        for _ in range(3):
            time.sleep(0.5)
            heartbeat()  # progress: the stall clock restarts
        while True:
            time.sleep(0.05)  # no heartbeat any more

    started = time.monotonic()
    with pytest.raises(ShardStalled) as raised:
        run(layout, minimum=0, process=progressing_then_stuck, stall_timeout_s=2.0)
    assert 3.5 < time.monotonic() - started < 15
    message = str(raised.value)
    assert "stage 'down' shard 'web-00000' made no progress" in message
    assert "progressing_then_stuck" in message  # where it was
    assert read_marker(layout, "down", SHARD) is None


def _global_stage(minimum_from_config):
    from tasks.harness import GlobalStage, Report

    def make_processor(config):
        minimum = minimum_from_config(config)
        return lambda tables, _arrays: {shard: threshold(minimum)(t) for shard, t in tables.items()}

    return GlobalStage(
        name="dedup",
        reasons=REASONS,
        sections=("dedup",),
        code_version="1",
        report=Report("duplicates removed", "dropped"),
        inputs=lambda _config: ("up",),
        make_processor=make_processor,
    )


def _config(root: Path, exact: bool):
    from rs5m.config import DedupConfig, PipelineConfig, SourceConfig

    return PipelineConfig(
        workdir=root,
        sources=[SourceConfig(name="web", path="unused.tsv", format="tsv")],
        dedup=DedupConfig(exact=exact),
    )


STAGE = _global_stage(lambda config: 5 if config.dedup.exact else 15)


def _global_rerun_under_y_crashing_before_the_marker(root: Path) -> None:
    import tasks.harness

    tasks.harness.write_marker = lambda *_a, **_k: os._exit(137)
    STAGE.run(Layout(root), _config(root, exact=False), "r2")


def test_a_global_stage_rewritten_under_another_config_never_keeps_the_old_marker(tmp_path: Path) -> None:
    layout = upstream(tmp_path)
    x = _config(tmp_path, exact=True)
    assert not STAGE.run(layout, x, "r1").skipped
    x_values = pq.read_table(layout.data("dedup", SHARD)).column("value").to_pylist()
    assert crash_in_child(_global_rerun_under_y_crashing_before_the_marker, tmp_path) == 137
    assert read_marker(layout, "dedup", "_all") is None
    assert not STAGE.run(layout, x, "r3").skipped
    assert pq.read_table(layout.data("dedup", SHARD)).column("value").to_pylist() == x_values


def _ingest_crashing_after_the_first_shard(root: Path, source, config) -> None:
    import tasks.ingest

    real, calls = tasks.harness.commit_shard, []

    def commit_then_die(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os._exit(137)
        return real(*args, **kwargs)

    tasks.harness.commit_shard = commit_then_die
    tasks.ingest.ingest_source_shards(Layout(root), source, config, "r2")


def test_an_ingest_rewritten_under_another_config_never_keeps_the_old_marker(tmp_path: Path) -> None:
    from rs5m.config import IngestConfig, SourceConfig
    from tasks.ingest import ingest_source_shards

    path = tmp_path / "web.tsv"
    path.write_text(
        "url\tcaption\n" + "".join(f"http://example.com/{i}.jpg\taerial view {i}\n" for i in range(30))
    )
    source = SourceConfig(name="web", path=str(path), format="tsv")
    layout = Layout(tmp_path / "work")
    assert not ingest_source_shards(layout, source, IngestConfig(shard_rows=10), "r1").skipped
    first = pq.read_table(layout.data("ingest", "web-00000"))
    assert first.num_rows == 10
    code = crash_in_child(
        _ingest_crashing_after_the_first_shard, layout.root, source, IngestConfig(shard_rows=20)
    )
    assert code == 137
    assert pq.read_table(layout.data("ingest", "web-00000")).num_rows == 20  # rewritten under Y...
    assert read_marker(layout, "ingest", "web") is None  # ...and X's marker is gone
    assert not ingest_source_shards(layout, source, IngestConfig(shard_rows=10), "r3").skipped
    assert pq.read_table(layout.data("ingest", "web-00000")).equals(first)


def test_files_written_atomically_get_the_mode_a_plain_open_would(tmp_path: Path) -> None:
    from storage.atomic import write_text

    write_text(tmp_path / "atomic.txt", "x")
    (tmp_path / "plain.txt").write_text("x")
    assert (tmp_path / "atomic.txt").stat().st_mode == (tmp_path / "plain.txt").stat().st_mode
