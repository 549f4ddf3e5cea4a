"""rs3_read: read each listed RS3 sample through its format's adapter (tasks/rs3/): the image bytes (a file's
own bytes; BigEarthNet's RGB composite as PNG) and the typed metadata columns (RS3_METADATA_FIELDS). A
sample whose metadata is missing or malformed, or whose image cannot be read, is dropped with the adapter's
reason; the image itself is validated by the next stage (rs3_validate, the same code as PUB11's validate).
"""

from __future__ import annotations

from collections.abc import Callable

import pyarrow as pa

from rs5m.config import PipelineConfig, Rs3SourceConfig
from storage.schemas import DOWNLOAD_SCHEMA, RS3_METADATA_FIELDS
from tasks.harness import Report, ShardStage
from tasks.rs3 import READ_REASONS, Dropped, Listed, read_sample
from tasks.stage import ShardOutcome, decisions
from tasks.watchdog import heartbeat

# What the stage adds to a listed row: every metadata column but `file` (listed already), then the image.
METADATA_FIELDS = tuple(f for f in RS3_METADATA_FIELDS if f.name != "file")
ADDED_FIELDS = (*METADATA_FIELDS, DOWNLOAD_SCHEMA.field("image"))


def read_shard(table: pa.Table, sources: dict[str, Rs3SourceConfig]) -> ShardOutcome:
    """Decide every listed row; survivors keep their columns (minus listed_metadata) and gain the metadata
    columns and `image`, in input order."""
    rows = table.select(["source", "file", "listed_metadata"]).to_pylist()
    reasons: list[str | None] = []
    details: list[str | None] = []
    images: list[bytes] = []
    metadata: list[dict] = []
    for row in rows:
        result = read_sample(sources[row["source"]], Listed(row["file"], row["listed_metadata"]))
        heartbeat()  # a sample can be a 50 MB JPEG or twelve band files
        if isinstance(result, Dropped):
            reasons.append(result.reason)
            details.append(result.detail)
            continue
        reasons.append(None)
        details.append(None)
        images.append(result.image)
        metadata.append({name: value for name, value in result.metadata.items() if name != "file"})
    keep = pa.array([reason is None for reason in reasons], pa.bool_())
    survivors = table.filter(keep).drop_columns(["listed_metadata"])
    added = pa.Table.from_pylist(metadata, schema=pa.schema(METADATA_FIELDS))
    kept = pa.Table.from_arrays(
        [*survivors.columns, *added.columns, pa.array(images, pa.large_binary())],
        schema=pa.schema([*survivors.schema, *ADDED_FIELDS]),
    )
    return ShardOutcome(
        kept=kept,
        decisions=decisions(table.column("sample_id"), table.column("source"), reasons, details),
    )


def _processor(config: PipelineConfig) -> Callable[[pa.Table], ShardOutcome]:
    sources = {source.name: source for source in config.rs3.sources}
    return lambda table: read_shard(table, sources)


def _read_identity(config: PipelineConfig) -> dict[str, str]:
    """How the sources are read (class from folder names, ...); their paths are left out (the listing's
    checksum covers the files)."""
    return {s.name: s.model_dump_json(exclude={"path", "metadata"}) for s in config.rs3.sources}


RS3_READ = ShardStage(
    name="rs3_read",
    upstream="rs3_ingest",
    reasons=READ_REASONS,
    sections=(),
    code_version="1",
    report=Report("(ours) images and metadata read", "kept"),
    drops=("listed_metadata",),
    adds=ADDED_FIELDS,
    make_processor=_processor,
    identity=_read_identity,
)
