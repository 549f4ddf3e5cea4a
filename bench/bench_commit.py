"""Cost of the durable commit protocol (tasks/harness.py, storage/atomic.py) against the same writes without
it, in one process, best of --repeats:

  (a) commit: write one shard's data, ledger and an embedding array and its marker, as the harness does,
      with every file and folder synced (fsync of the file, then of its folder after the rename);
  (b) the same writes with the folder syncs turned off (files still fsynced, as before this protocol);
  (c) the skip check of a done shard: sizes only (runner.verify: size) and with sha256 (checksum).

The shard is --rows metadata rows (~ a keyword or filter shard) with a 512-d float16 array, written to the
folder given by --dir (default: a temporary folder; put it on the disk you care about).

    .venv/bin/python bench/bench_commit.py --rows 10000 --shards 20
"""

from __future__ import annotations

import _common  # noqa: F401 - the repository on sys.path, the offline environment

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

import storage.atomic
from storage.layout import Layout
from storage.markers import Marker, current_marker, write_marker
from tasks.harness import commit_shard
from tasks.stage import ShardOutcome, decisions


def shard(rows: int, rng: np.random.Generator) -> ShardOutcome:
    ids = [f"{i:024x}" for i in rng.integers(0, 2**62, size=rows)]
    table = pa.table(
        {
            "sample_id": ids,
            "source": ["laion"] * rows,
            "url": [f"https://example.com/images/{i}.jpg" for i in ids],
            "caption": [f"aerial view of a field number {i} near a river" for i in range(rows)],
        }
    )
    reasons = pa.nulls(rows, pa.string())
    return ShardOutcome(
        kept=table,
        decisions=decisions(table.column("sample_id"), table.column("source"), reasons),
        arrays={"image": rng.standard_normal((rows, 512)).astype(np.float16)},
    )


def commit(layout: Layout, outcome: ShardOutcome, index: int) -> None:
    shard_id = f"laion-{index:05d}"
    committed = commit_shard(layout, "bench", shard_id, outcome, outcome.kept.schema, "run", "fp")
    write_marker(
        layout,
        Marker(
            "bench", shard_id, "fp", {}, {shard_id: committed.sha256}, {}, "run", "t", files=committed.files
        ),
    )


def timed(layout: Layout, outcome: ShardOutcome, shards: int, sync_folders: bool) -> float:
    real = storage.atomic.fsync_dir
    if not sync_folders:
        storage.atomic.fsync_dir = lambda _folder: None
    try:
        start = time.perf_counter()
        for index in range(shards):
            commit(layout, outcome, index)
        return time.perf_counter() - start
    finally:
        storage.atomic.fsync_dir = real


def skip_checks(layout: Layout, shards: int, verify: str) -> float:
    start = time.perf_counter()
    for index in range(shards):
        assert current_marker(layout, "bench", f"laion-{index:05d}", "fp", {}, verify) is not None
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--shards", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()
    outcome = shard(args.rows, np.random.default_rng(0))
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        layout = Layout(Path(folder))
        durable, plain = [], []
        for _ in range(args.repeats):  # interleaved: the machine's noise hits both alike
            plain.append(timed(layout, outcome, args.shards, sync_folders=False))
            durable.append(timed(layout, outcome, args.shards, sync_folders=True))
        size = sum(p.stat().st_size for p in (layout.root / "bench").rglob("*") if p.is_file()) / args.shards
        sizes = min(skip_checks(layout, args.shards, "size") for _ in range(args.repeats))
        sums = min(skip_checks(layout, args.shards, "checksum") for _ in range(args.repeats))
    per_shard = {
        name: 1000 * min(times) / args.shards for name, times in (("plain", plain), ("durable", durable))
    }
    print(
        f"{args.shards} shards of {args.rows} rows ({size / 2**20:.1f} MiB of files each), best of {args.repeats}"
    )
    print(f"  commit without folder syncs: {per_shard['plain']:.1f} ms/shard")
    print(
        f"  commit, durable:             {per_shard['durable']:.1f} ms/shard "
        f"({per_shard['durable'] / per_shard['plain']:.3f}x)"
    )
    print(f"  skip check, size only:       {1000 * sizes / args.shards:.2f} ms/shard")
    print(f"  skip check, sha256:          {1000 * sums / args.shards:.1f} ms/shard")


if __name__ == "__main__":
    main()
