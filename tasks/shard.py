"""shard: publish the samples that survived every stage as the released dataset (storage/dataset.py).

Every row is kept (the stage decides nothing; its ledger says so). The split is a pure function of the
sample id, so a sample stays in its split whatever else changes in the dataset: val iff
int(sha256(sample_id)[:16], 16) / 2**64 < val_fraction.

Order within a split: upstream shard by shard (shard ids sorted: "<source>-<index>", so grouped by
source), and by sample_id within a shard. A global sort by sample_id would interleave every input shard
into every output part (sample ids are hashes), which needs an external sort, i.e. a second full copy of
the images; shard-major order reads each image once, holding one upstream shard's images at a time, and
is just as deterministic. Output parts span upstream shards.

The image bytes come from the image stage of the shard's pipeline (validate/data/<shard>.parquet for
PUB11, rs3_validate/data for RS3: shard ids are the same through all stages), joined to the kept rows by
sample_id; the pipeline names the row's `subset`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rs5m.config import PipelineConfig, ShardConfig
from storage.dataset import (
    DATASET_SCHEMA,
    MANIFEST_FILE,
    PARQUET_FOLDER,
    DatasetPlan,
    current_release,
    manifest_path,
    release_id,
    write_dataset,
)
from storage.layout import Layout
from storage.markers import Marker, digest_files
from tasks.harness import GlobalStage, Published, Report
from tasks.stage import ShardOutcome, decisions

REASONS: dict[str, str] = {}  # nothing is dropped here
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


def image_source(layout: Layout, shard_id: str, image_stages: dict[str, str]) -> tuple[str, str]:
    """(the stage that stores the shard's image bytes, its subset): the one that has the shard (shard ids
    are unique across pipelines). `image_stages` maps each pipeline's image stage to the pipeline's name
    (tasks/pipeline.py)."""
    for stage, subset in image_stages.items():
        if layout.data(stage, shard_id).exists():
            return stage, subset
    raise MissingImageError(f"no stage of {sorted(image_stages)} holds the images of shard {shard_id!r}")


def dataset_rows(
    layout: Layout, shard_id: str, kept: pa.Table, config: ShardConfig, image_stages: dict[str, str]
) -> pa.Table:
    """One upstream shard's kept rows as DATASET_SCHEMA rows, sorted by sample_id, with their images; the
    columns a subset does not have are null."""
    kept = kept.take(pc.sort_indices(kept, [("sample_id", "ascending")]))
    image_stage, subset = image_source(layout, shard_id, image_stages)
    # the file's two columns, then a take: faster than a pushed-down `isin` filter; only one upstream
    # shard's images are in memory at a time
    images = pq.read_table(layout.data(image_stage, shard_id), columns=["sample_id", "image"])
    positions = pc.index_in(kept.column("sample_id"), value_set=images.column("sample_id"))
    if positions.null_count:
        missing = kept.filter(pc.is_null(positions)).column("sample_id")[0]
        raise MissingImageError(
            f"{positions.null_count} kept sample(s) of shard {shard_id!r} have no image in "
            f"{layout.data(image_stage, shard_id)} (first: {missing})"
        )
    ids = kept.column("sample_id").to_pylist()
    phash = [None if value is None else value.hex() for value in kept.column("phash").to_pylist()]
    rows = kept.num_rows
    columns = {
        **{name: kept.column(name) for name in DATASET_SCHEMA.names if name in kept.column_names},
        "image": images.column("image").take(positions),
        "phash": pa.array(phash, pa.string()),
        "split": pa.array([split_of(i, config.val_fraction) for i in ids], pa.string()),
        "subset": pa.array([subset] * rows, pa.string()),
    }
    return pa.table({f.name: columns.get(f.name, pa.nulls(rows, f.type)) for f in DATASET_SCHEMA}).cast(
        DATASET_SCHEMA
    )


def dataset_plan(
    layout: Layout, config: ShardConfig, outcomes: dict[str, ShardOutcome], image_stages: dict[str, str]
) -> DatasetPlan:
    def batches() -> Iterator[pa.Table]:
        for shard_id in sorted(outcomes):
            kept = outcomes[shard_id].kept
            if kept.num_rows:
                yield dataset_rows(layout, shard_id, kept, config, image_stages)

    return DatasetPlan(
        batches=batches(),
        rows_per_shard=config.rows_per_shard,
        bytes_per_shard=config.bytes_per_shard,
        webdataset=config.webdataset,
        description={"split_rule": SPLIT_RULE, "val_fraction": config.val_fraction, "order": ORDER_RULE},
    )


def publish_dataset(layout: Layout, config: PipelineConfig, outcomes: dict[str, ShardOutcome]) -> Published:
    from tasks.pipeline import image_stages  # the pipelines' definition (tasks/pipeline.py) imports this

    manifest = write_dataset(layout, dataset_plan(layout, config.shard, outcomes, image_stages(config)))
    release = release_id(manifest)
    release_dir = layout.releases / release
    files = {
        layout.relative(release_dir / f.path): {"sha256": f.sha256, "bytes": f.bytes} for f in manifest.files
    }
    files.update(digest_files(layout, [release_dir / PARQUET_FOLDER / MANIFEST_FILE]))
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
    reasons=REASONS,
    sections=("shard",),
    code_version="2",  # 2: the release layout of storage/dataset.py format 2
    report=Report("remain", "kept"),
    inputs=lambda _config: ("decontaminate",),
    make_processor=lambda _config: keep_all,
    publish=publish_dataset,
    is_published=release_is_current,
)
