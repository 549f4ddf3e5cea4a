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
EMBED_SCHEMA = pa.schema([*_METADATA_FIELDS, pa.field("phash", pa.binary(32))])
FILTER_SCHEMA = pa.schema(
    [*EMBED_SCHEMA, pa.field("clip_score", pa.float32()), pa.field("rs_score", pa.float32())]
)
DEDUP_SCHEMA = pa.schema([*FILTER_SCHEMA, pa.field("group_id", pa.string())])
DECONTAMINATE_SCHEMA = DEDUP_SCHEMA

# RS3: label-only remote-sensing datasets read in their own layouts (tasks/rs3/). Every row of every RS3
# format carries all of these columns, null where its format has no such field.
BOUNDING_BOX = pa.struct(
    [
        pa.field("id", pa.int64()),
        pa.field("box", pa.list_(pa.int64())),  # [x, y, width, height] in pixels of the image
        pa.field("category", pa.string()),
        pa.field("raw_location", pa.string()),  # WKT POLYGON ((lon lat, ...))
    ]
)
RS3_METADATA_FIELDS = [
    pa.field(
        "file", pa.string(), nullable=False
    ),  # the image file, or BigEarthNet patch, relative to the source
    pa.field("view", pa.string()),  # fmow: rgb | msrgb
    pa.field("class_label", pa.string()),  # fmow category, image-folder class (underscores kept)
    pa.field("labels", pa.list_(pa.string())),  # BigEarthNet's multi-labels
    pa.field("timestamp", pa.timestamp("ms", tz="UTC")),  # acquisition time (Parquet keeps ms, not s)
    pa.field("latitude", pa.float64()),  # where the image is, for place and hemisphere (README: RS3)
    pa.field("longitude", pa.float64()),
    pa.field("country_code", pa.string()),  # as the dataset gives it (fmow: ISO 3166-1 alpha-3)
    pa.field("utm_zone", pa.string()),  # zone number and latitude band, "32T"
    pa.field("gsd", pa.float64()),  # ground sample distance, metres
    pa.field("multi_resolution", pa.float64()),  # fmow multi_resolution_dbl
    pa.field("cloud_cover", pa.float64()),  # percent
    pa.field("scan_direction", pa.string()),
    pa.field("target_azimuth", pa.float64()),  # degrees
    pa.field("off_nadir_angle", pa.float64()),  # degrees
    pa.field("img_width", pa.int32()),  # as the metadata declares
    pa.field("img_height", pa.int32()),
    pa.field("bounding_boxes", pa.list_(BOUNDING_BOX)),
    pa.field("raw_location", pa.string()),  # the image footprint, WKT
    pa.field("tile_source", pa.string()),  # BigEarthNet: the Sentinel-2 product
    pa.field("extra_metadata", pa.string()),  # anything else the source gives, a JSON object
]
# What the meta-caption stage adds to RS3 rows (tasks/meta_caption.py); `caption` is then the final caption.
META_CAPTION_FIELDS = [
    pa.field("meta_caption", pa.string()),  # null when no template could be filled
    pa.field("meta_template", pa.string()),  # which template: "<family>/<index>"
    pa.field("country", pa.string()),  # reverse-geocoded from latitude/longitude (offline)
    pa.field("city", pa.string()),
]
# What the captioning stage adds to RS3 rows (tasks/rs3_caption.py): BLIP-2's candidates ranked by CLIP across
# rotations. Scores are cosine(image view, caption), float32; a candidate's view_scores follow the views
# rot0, rot90, rot180, rot270 (then hflip, vflip when rs3.caption.flips is set).
CAPTION_CANDIDATE = pa.struct(
    [
        pa.field("text", pa.string()),
        pa.field("mean_score", pa.float32()),
        pa.field("view_scores", pa.list_(pa.float32())),
    ]
)
MODEL_CAPTION_FIELDS = [
    pa.field("caption_choice", pa.string()),  # top_cap | ssl_cap | meta (no model captions configured)
    pa.field("caption_score", pa.float32()),  # the chosen model caption's mean score over the views
    pa.field("top_cap", pa.string()),  # the best candidate by mean score
    pa.field("top_cap_score", pa.float32()),
    pa.field("ssl_cap", pa.string()),  # the most rotation-stable of the best five (README: RS3 captions)
    pa.field("ssl_cap_score", pa.float32()),
    pa.field("ssl_cap_spread", pa.float32()),  # standard deviation of its scores across the views
    pa.field("caption_candidates", pa.list_(CAPTION_CANDIDATE)),  # the best five, best first
]
