"""A stage that decides a task's shards in batches (tasks/harness.py run_shard_batches): it writes what one call
per shard writes, reuses done shards, fails a batch's shards together and leaves the others committed, and
refuses a function that does not keep its input order."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storage.atomic import write_parquet
from storage.layout import Layout
from storage.markers import Manifest, read_marker, sha256_file, write_manifest
from tasks.harness import ShardContractError, run_shard, run_shard_batches
from tasks.stage import ShardOutcome, split_by_reason

SCHEMA = pa.schema([("sample_id", pa.string()), ("source", pa.string()), ("value", pa.int64())])
REASONS = {"odd": "an odd value"}
SIZES = (7, 0, 13, 5, 9)  # rows of the upstream's shards, one of them empty
SHARDS = [f"web-{i:05d}" for i in range(len(SIZES))]


def upstream(root: Path) -> Layout:
    """A complete upstream stage "up" of SHARDS; sample ids are unique across shards, values run on."""
    layout = Layout(root)
    first = 0
    for shard, size in zip(SHARDS, SIZES, strict=True):
        values = list(range(first, first + size))
        table = pa.table(
            {"sample_id": [f"s{v:03d}" for v in values], "source": ["web"] * size, "value": values},
            schema=SCHEMA,
        )
        write_parquet(layout.data("up", shard), table)
        first += size
    checksums = {shard: sha256_file(layout.data("up", shard)) for shard in SHARDS}
    write_manifest(layout, Manifest("up", "f", None, checksums, {}, {}, "r0", "t"))
    return layout


class KeepEven:
    """Keeps even values, with a one-column array per survivor; counts its calls and the rows of each."""

    def __init__(self, fail_on: int | None = None) -> None:
        self.calls: list[int] = []
        self.fail_on = fail_on

    def __call__(self, table: pa.Table) -> ShardOutcome:
        self.calls.append(table.num_rows)
        values = table.column("value").to_pylist()
        if self.fail_on in values:
            raise ValueError(f"cannot decide value {self.fail_on}")
        outcome = split_by_reason(table, pa.array([None if v % 2 == 0 else "odd" for v in values]))
        kept = outcome.kept.column("value").to_numpy()
        return ShardOutcome(outcome.kept, outcome.decisions, {"value_twice": (2 * kept)[:, None]})


def batches(layout: Layout, process, batch_rows: int):
    return run_shard_batches(
        layout,
        stage="down",
        upstream="up",
        shard_ids=SHARDS,
        schema_of=lambda schema: schema,
        reasons=REASONS,
        fingerprint="even",
        run_id="r",
        process=process,
        batch_rows=batch_rows,
    )


def one_shard(layout: Layout, shard: str) -> None:
    run_shard(
        layout,
        stage="down",
        upstream="up",
        shard_id=shard,
        schema_of=lambda schema: schema,
        reasons=REASONS,
        fingerprint="even",
        run_id="r",
        process=KeepEven(),
    )


def outputs(layout: Layout, shard: str) -> tuple[list, list, list]:
    """A shard's survivors, its ledger (without who wrote it) and its array."""
    ledger = pq.read_table(layout.ledger("down", shard)).drop_columns(["run_id"]).to_pylist()
    array = np.load(layout.array("down", shard, "value_twice")).tolist()
    return pq.read_table(layout.data("down", shard)).to_pylist(), ledger, array


@pytest.mark.parametrize("batch_rows", [1, 15, 1000])
def test_batched_calls_write_what_a_call_per_shard_writes(tmp_path: Path, batch_rows: int) -> None:
    one_by_one = upstream(tmp_path / "one")
    for shard in SHARDS:
        one_shard(one_by_one, shard)
    batched, process = upstream(tmp_path / "batched"), KeepEven()
    done, errors = batches(batched, process, batch_rows)
    assert not errors and [s.shard_id for s in done] == SHARDS
    # groups of consecutive shards that reach batch_rows rows (the empty shard joins the next), then the rest
    assert process.calls == {1: [7, 13, 5, 9], 15: [20, 14], 1000: [34]}[batch_rows]
    for shard, size in zip(SHARDS, SIZES, strict=True):
        assert outputs(batched, shard) == outputs(one_by_one, shard)
        assert read_marker(batched, "down", shard).counts[shard] == {
            "kept": sum(1 for row in outputs(batched, shard)[1] if row["fate"] == "kept"),
            **({"dropped:odd": size - len(outputs(batched, shard)[0])} if size else {}),
        }


def test_a_failed_batch_fails_its_shards_together_and_a_rerun_redoes_only_them(tmp_path: Path) -> None:
    layout = upstream(tmp_path)
    one_shard(layout, SHARDS[0])
    process = KeepEven(fail_on=22)  # value 22 is in the fourth shard (20-24)
    done, errors = batches(layout, process, batch_rows=15)
    # the done shard is reused, not decided again: 0 + 13 + 5 rows (which fail together), then 9
    assert process.calls == [18, 9]
    assert [(s.shard_id, s.skipped) for s in done] == [(SHARDS[0], True), (SHARDS[4], False)]
    assert set(errors) == set(SHARDS[1:4]) and "cannot decide value 22" in str(errors[SHARDS[2]])
    assert all(read_marker(layout, "down", shard) is None for shard in SHARDS[1:4])

    again = KeepEven()
    done, errors = batches(layout, again, batch_rows=15)
    assert not errors and again.calls == [18]
    assert [s.skipped for s in done] == [True, False, False, False, True]


def test_a_function_that_reorders_its_rows_cannot_be_batched(tmp_path: Path) -> None:
    layout = upstream(tmp_path)

    def reversed_order(table: pa.Table) -> ShardOutcome:
        outcome = KeepEven()(table)
        backwards = [pa.array(range(t.num_rows - 1, -1, -1)) for t in (outcome.kept, outcome.decisions)]
        return ShardOutcome(outcome.kept.take(backwards[0]), outcome.decisions.take(backwards[1]))

    done, errors = batches(layout, reversed_order, batch_rows=1000)
    assert done == [] and set(errors) == set(SHARDS)
    assert isinstance(errors[SHARDS[0]], ShardContractError) and "input order" in str(errors[SHARDS[0]])
