"""rs3_ingest: list each label-only RS dataset (an `rs3.sources` entry) in its own layout (tasks/rs3/) into
shards of `rs3.shard_rows` samples. A row names the sample (its file, or BigEarthNet patch, relative to the
source folder) and carries what the listing already knows (an index row, as JSON) for rs3_read; nothing is
read or decoded here, so listing a million-image dataset costs a directory walk.

sample_id = sample_id(source, url, null caption) with url = `rs3://<source>/<file>`: the same formula as
web rows, stable when the dataset's folder moves. The source's checksum is a digest of every file's path,
size and modification time under its folder (and its metadata file): a changed, added or removed file
lists the source again; unchanged shards then resume downstream.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa

from rs5m.config import PipelineConfig, Rs3SourceConfig
from storage.schemas import SAMPLE_FIELDS
from tasks.harness import Report, SourceStage
from tasks.ingest import sample_ids
from tasks.rs3 import Listed, list_source, walk_files
from tasks.stage import ShardOutcome, decisions

RS3_INGEST_SCHEMA = pa.schema(
    [
        *SAMPLE_FIELDS,
        pa.field("file", pa.string(), nullable=False),
        pa.field(
            "listed_metadata", pa.string()
        ),  # what the listing knew (an index row), JSON; read by rs3_read
    ]
)


def rs3_url(source: str, file: str) -> str:
    """Where an RS3 sample comes from, in the `url` column every row has."""
    return f"rs3://{source}/{file}"


def list_shards(source: Rs3SourceConfig, shard_rows: int) -> Iterator[ShardOutcome]:
    """The source's listing in shards of shard_rows samples (an empty source: one empty shard)."""
    batch: list[Listed] = []
    yielded = False
    for listed in list_source(source):
        batch.append(listed)
        if len(batch) == shard_rows:
            yield _outcome(source.name, batch)
            batch, yielded = [], True
    if batch or not yielded:
        yield _outcome(source.name, batch)


def _outcome(source: str, batch: list[Listed]) -> ShardOutcome:
    n = len(batch)
    urls = pa.array([rs3_url(source, listed.file) for listed in batch], pa.string())
    ids = pa.array(sample_ids(source, urls, pa.nulls(n, pa.string())), pa.string())
    sources = pa.array([source] * n, pa.string())
    table = pa.Table.from_arrays(
        [
            ids,
            sources,
            urls,
            pa.nulls(n, pa.string()),
            pa.nulls(n, pa.string()),
            pa.array([listed.file for listed in batch], pa.string()),
            pa.array([listed.metadata for listed in batch], pa.string()),
        ],
        schema=RS3_INGEST_SCHEMA,
    )
    return ShardOutcome(kept=table, decisions=decisions(ids, sources, pa.nulls(n, pa.string())))


def listing_digest(source: Rs3SourceConfig) -> str:
    """sha256 over the relative path, size and modification time of every file under the source's folder
    (and of its metadata file): cheap next to reading the images, it changes when any file does, and not
    when the whole folder moves."""
    digest = hashlib.sha256()
    root = Path(source.path)
    files = [(relative, root / relative) for relative in walk_files(root)] if root.is_dir() else []
    if source.metadata is not None:
        files.append((Path(source.metadata).name, Path(source.metadata)))
    for name, path in files:
        try:
            status = os.stat(path)
        except OSError:
            continue  # vanished while walking: the listing will say what is there
        digest.update(f"{name}\x1f{status.st_size}\x1f{status.st_mtime_ns}\x1e".encode())
    return digest.hexdigest()


def _sources(config: PipelineConfig) -> list[Rs3SourceConfig]:
    return list(config.rs3.sources) if config.rs3 is not None else []


RS3_INGEST = SourceStage(
    name="rs3_ingest",
    reasons={},
    sections=(),
    code_version="1",
    report=Report("(RS3) images listed", "in"),
    identity=lambda config: {"shard_rows": str(config.rs3.shard_rows)},
    schema=RS3_INGEST_SCHEMA,
    sources=_sources,
    read=lambda source, config: list_shards(source, config.rs3.shard_rows),
    checksum=listing_digest,
    source_identity=lambda source: source.model_dump_json(exclude={"path", "metadata"}),
)
