"""Parquet schemas shared by every stage: the ledger and the shard tables each stage hands to the next."""

from __future__ import annotations

import pyarrow as pa

KEPT = "kept"
DROPPED = "dropped"

# One row per (sample, stage): the fate of every sample that entered that stage.
LEDGER_SCHEMA = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("stage", pa.string(), nullable=False),
        pa.field("fate", pa.string(), nullable=False),
        pa.field("reason", pa.string()),
        pa.field("detail", pa.string()),
        pa.field("scores", pa.map_(pa.string(), pa.float64())),
        pa.field("group_id", pa.string()),
        pa.field("kept_sample_id", pa.string()),
        pa.field("config_hash", pa.string(), nullable=False),
    ]
)

# What a stage function returns for its input samples; the harness adds run_id, stage and config_hash.
DECISION_SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("fate", pa.string(), nullable=False),
        pa.field("reason", pa.string()),
        pa.field("detail", pa.string()),
        pa.field("scores", pa.map_(pa.string(), pa.float64())),
        pa.field("group_id", pa.string()),
        pa.field("kept_sample_id", pa.string()),
    ]
)

# Columns every sample carries from ingest on. `extra` holds the source's other columns as a JSON object.
SAMPLE_FIELDS = [
    pa.field("sample_id", pa.string(), nullable=False),
    pa.field("source", pa.string(), nullable=False),
    pa.field("url", pa.string(), nullable=False),
    pa.field("caption", pa.string()),
    pa.field("extra", pa.string()),
]
INGEST_SCHEMA = pa.schema(SAMPLE_FIELDS)
KEYWORD_SCHEMA = pa.schema([*SAMPLE_FIELDS, pa.field("matched_keyword", pa.string())])
# large_binary: a shard of thousands of images can pass the 2 GiB that 32-bit offsets allow
DOWNLOAD_SCHEMA = pa.schema([*KEYWORD_SCHEMA, pa.field("image", pa.large_binary())])
VALIDATE_SCHEMA = pa.schema(
    [
        *DOWNLOAD_SCHEMA,
        pa.field("sha256", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("image_format", pa.string()),
    ]
)

# From embed on, shards carry metadata only: the image bytes stay in validate/data (stored once) and the
# embeddings in <stage>/arrays/. Shard ids are kept, so the final stage finds the bytes by shard id.
_METADATA_FIELDS = [f for f in VALIDATE_SCHEMA if f.name != "image"]
EMBED_SCHEMA = pa.schema([*_METADATA_FIELDS, pa.field("phash", pa.binary(8))])
FILTER_SCHEMA = pa.schema(
    [*EMBED_SCHEMA, pa.field("clip_score", pa.float32()), pa.field("rs_score", pa.float32())]
)
DEDUP_SCHEMA = pa.schema([*FILTER_SCHEMA, pa.field("group_id", pa.string())])
DECONTAMINATE_SCHEMA = DEDUP_SCHEMA
