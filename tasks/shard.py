"""shard: publish the samples that survived every stage as the released dataset (storage/dataset.py).

Every row is kept (the stage decides nothing; its ledger says so). The split is a pure function of the
sample id, so a sample stays in its split whatever else changes in the dataset: val iff
int(sha256(sample_id)[:16], 16) / 2**64 < val_fraction.

Order within a split: upstream shard by shard (shard ids sorted: "<source>-<index>", so grouped by
source), and by sample_id within a shard. A global sort by sample_id would interleave every input shard
into every output part (sample ids are hashes), which needs an external sort, i.e. a second full copy of
the images; shard-major order reads each image once, holding one upstream shard's images at a time, and
is just as deterministic. Output parts span upstream shards.

The image bytes come from validate/data/<shard>.parquet (the one stored copy; shard ids are the same
through all stages), joined to the kept rows by sample_id.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from prefect import task
from prefect.cache_policies import NO_CACHE

from rs5m.config import PipelineConfig, ShardConfig
from storage.dataset import (
    DATASET_SCHEMA,
    DatasetPlan,
    current_release,
    manifest_path,
    release_id,
    write_dataset,
)
from storage.layout import Layout
from storage.markers import Marker, digest_files
from storage.schemas import DECONTAMINATE_SCHEMA
from tasks.harness import GlobalStage, Published, ShardSummary
from tasks.stage import ShardOutcome, decisions

REASONS: dict[str, str] = {}  # nothing is dropped here
IMAGE_STAGE = "validate"  # where the image bytes are stored
SPLIT_RULE = "val iff int(sha256(sample_id)[:16], 16) / 2**64 < val_fraction"
ORDER_RULE = "upstream shard id, then sample_id"


class MissingImageError(RuntimeError):
    """A kept sample has no image bytes in validate/data: a damaged work directory."""


def split_of(sample_id: str, val_fraction: float) -> str:
    position = int(hashlib.sha256(sample_id.encode()).hexdigest()[:16], 16) / 2**64
    return "val" if position < val_fraction else "train"


def keep_all(tables: dict[str, pa.Table], _arrays: dict) -> dict[str, ShardOutcome]:
    return {
        shard: ShardOutcome(
            kept=table,
            decisions=decisions(
                table.column("sample_id"), table.column("source"), pa.nulls(table.num_rows, pa.string())
            ),
        )
        for shard, table in tables.items()
    }


def dataset_rows(layout: Layout, shard_id: str, kept: pa.Table, config: ShardConfig) -> pa.Table:
    """One upstream shard's kept rows as DATASET_SCHEMA rows, sorted by sample_id, with their images."""
    kept = kept.take(pc.sort_indices(kept, [("sample_id", "ascending")]))
    # the file's two columns, then a take: faster than a pushed-down `isin` filter; only one upstream
    # shard's images are in memory at a time
    images = pq.read_table(layout.data(IMAGE_STAGE, shard_id), columns=["sample_id", "image"])
    positions = pc.index_in(kept.column("sample_id"), value_set=images.column("sample_id"))
    if positions.null_count:
        missing = kept.filter(pc.is_null(positions)).column("sample_id")[0]
        raise MissingImageError(
            f"{positions.null_count} kept sample(s) of shard {shard_id!r} have no image in "
            f"{layout.data(IMAGE_STAGE, shard_id)} (first: {missing})"
        )
    ids = kept.column("sample_id").to_pylist()
    phash = [None if value is None else value.hex() for value in kept.column("phash").to_pylist()]
    columns = {
        **{name: kept.column(name) for name in DATASET_SCHEMA.names if name in kept.column_names},
        "image": images.column("image").take(positions),
        "phash": pa.array(phash, pa.string()),
        "split": pa.array([split_of(i, config.val_fraction) for i in ids], pa.string()),
    }
    return pa.table({name: columns[name] for name in DATASET_SCHEMA.names}).cast(DATASET_SCHEMA)


def dataset_plan(layout: Layout, config: ShardConfig, outcomes: dict[str, ShardOutcome]) -> DatasetPlan:
    def batches() -> Iterator[pa.Table]:
        for shard_id in sorted(outcomes):
            kept = outcomes[shard_id].kept
            if kept.num_rows:
                yield dataset_rows(layout, shard_id, kept, config)

    return DatasetPlan(
        batches=batches(),
        rows_per_shard=config.rows_per_shard,
        bytes_per_shard=config.bytes_per_shard,
        webdataset=config.webdataset,
        description={"split_rule": SPLIT_RULE, "val_fraction": config.val_fraction, "order": ORDER_RULE},
    )


def publish_dataset(layout: Layout, config: PipelineConfig, outcomes: dict[str, ShardOutcome]) -> Published:
    manifest = write_dataset(layout, dataset_plan(layout, config.shard, outcomes))
    release = release_id(manifest)
    release_dir = layout.releases / release
    files = {
        layout.relative(release_dir / f.path): {"sha256": f.sha256, "bytes": f.bytes} for f in manifest.files
    }
    files.update(digest_files(layout, [release_dir / "manifest.json"]))
    extra = {
        "release": release,
        "manifest": str(manifest_path(layout)),
        "files": [f.path for f in manifest.files],
        "rows": manifest.totals["rows_per_split"],
    }
    return Published(extra, files)


def release_is_current(layout: Layout, marker: Marker) -> bool:
    """The release the marker recorded is the one `dataset` points at."""
    return current_release(layout) == marker.extra.get("release")


SHARD = GlobalStage(
    name="shard",
    upstream="decontaminate",
    schema=DECONTAMINATE_SCHEMA,
    reasons=REASONS,
    sections=("shard",),
    make_processor=lambda _config: keep_all,
    publish=publish_dataset,
    is_published=release_is_current,
)


@task(name="shard", task_run_name="shard-all", cache_policy=NO_CACHE)
def shard_task(workdir: str, config: PipelineConfig, run_id: str) -> ShardSummary:
    return SHARD.run(Layout(workdir), config, run_id)
