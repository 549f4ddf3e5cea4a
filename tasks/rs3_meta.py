"""rs3_meta: the meta caption of every RS3 image, filled from its metadata with RS5M's templates
(tasks/meta_caption.py has the rules): `meta_caption`, the template it came from, and the country and city
it was placed in. Every row is kept: an image with nothing to build one from (an unlabelled image folder
without metadata, like MillionAID's test split) gets null, and rs3_caption decides its caption. The image
bytes stay in rs3_validate (later stages read them from there).
"""

from __future__ import annotations

from collections.abc import Callable

import pyarrow as pa

from rs5m.config import MetaCaptionConfig, PipelineConfig
from storage.schemas import META_CAPTION_FIELDS, RS3_METADATA_FIELDS
from tasks.harness import Report, ShardStage
from tasks.meta_caption import (
    FAMILIES_BY_FORMAT,
    RULES_VERSION,
    TemplateSet,
    caption_fields,
    meta_caption,
    places,
    resolve_templates,
)
from tasks.stage import ShardOutcome, decisions


def meta_shard(
    table: pa.Table, config: MetaCaptionConfig, templates: TemplateSet, formats: dict[str, str]
) -> ShardOutcome:
    """Every row of an RS3 shard, kept, with the META_CAPTION_FIELDS columns (null where no template could
    be filled), in input order. `formats` maps a source name to its format."""
    names = ["sample_id", "source", *(f.name for f in RS3_METADATA_FIELDS if f.name in table.column_names)]
    rows = table.select(names).to_pylist()
    places((row.get("latitude"), row.get("longitude")) for row in rows)  # one geocoder query per shard
    captions: dict[str, list[str | None]] = {f.name: [] for f in META_CAPTION_FIELDS}
    for row in rows:
        source_format = formats[row["source"]]
        fields = caption_fields(row, config, source_format)
        made = meta_caption(fields, FAMILIES_BY_FORMAT[source_format], templates, row["sample_id"])
        for name, value in zip(
            ("meta_caption", "meta_template", "country", "city"),
            (*(made or (None, None)), fields.get("country"), fields.get("city")),
            strict=True,
        ):
            captions[name].append(value)
    survivors = table.drop_columns([name for name in ("image",) if name in table.column_names])
    kept = pa.Table.from_arrays(
        [*survivors.columns, *(pa.array(captions[f.name], f.type) for f in META_CAPTION_FIELDS)],
        schema=pa.schema([*survivors.schema, *META_CAPTION_FIELDS]),
    )
    kept_all = [None] * table.num_rows
    return ShardOutcome(
        kept=kept, decisions=decisions(table.column("sample_id"), table.column("source"), kept_all)
    )


def _templates(config: PipelineConfig) -> TemplateSet:
    return TemplateSet.read(resolve_templates(config.rs3.meta.templates))


def _processor(config: PipelineConfig) -> Callable[[pa.Table], ShardOutcome]:
    templates = _templates(config)
    formats = {source.name: source.format for source in config.rs3.sources}
    return lambda table: meta_shard(table, config.rs3.meta, templates, formats)


RS3_META = ShardStage(
    name="rs3_meta",
    upstream="rs3_validate",
    reasons={},
    sections=("rs3.meta",),
    code_version="2",
    report=Report("(RS3) meta captions", "kept"),
    drops=("image",),
    adds=tuple(META_CAPTION_FIELDS),
    make_processor=_processor,
    identity=lambda config: {"templates": _templates(config).identity, "rules": RULES_VERSION},
)
