"""rs3_meta: the meta caption of every RS3 image, filled from its metadata with RS5M's templates
(tasks/meta_caption.py has the rules): `meta_caption`, the template it came from, and the country and city
it was placed in. Until RS3 part 2 adds BLIP-2 captions, the caption IS the meta caption, and an image with
nothing to build one from (an unlabelled image folder without metadata, like MillionAID's test split) is
held back as `no_caption_source`.
"""

from __future__ import annotations

from collections.abc import Callable

import pyarrow as pa

from rs5m.config import MetaCaptionConfig, PipelineConfig
from storage.schemas import META_CAPTION_FIELDS, RS3_METADATA_FIELDS, SAMPLE_FIELDS
from tasks.harness import Report, ShardStage
from tasks.meta_caption import (
    FAMILIES_BY_FORMAT,
    REASONS,
    RULES_VERSION,
    TemplateSet,
    caption_fields,
    meta_caption,
    places,
    resolve_templates,
)
from tasks.stage import ShardOutcome, decisions

CAPTION_FIELD = next(f for f in SAMPLE_FIELDS if f.name == "caption")
ADDED_FIELDS = (CAPTION_FIELD, *META_CAPTION_FIELDS)
NO_SOURCE = (
    "no metadata a meta caption can be built from (no class, place or time); RS3 part 2 captions such "
    "images with BLIP-2"
)


def meta_shard(
    table: pa.Table, config: MetaCaptionConfig, templates: TemplateSet, formats: dict[str, str]
) -> ShardOutcome:
    """Decide every row of an RS3 shard; survivors get their meta caption as `caption`, with the
    META_CAPTION_FIELDS columns, in input order. `formats` maps a source name to its format."""
    names = ["sample_id", "source", *(f.name for f in RS3_METADATA_FIELDS if f.name in table.column_names)]
    rows = table.select(names).to_pylist()
    places((row.get("latitude"), row.get("longitude")) for row in rows)  # one geocoder query per shard
    reasons: list[str | None] = []
    captions: dict[str, list[str | None]] = {f.name: [] for f in ADDED_FIELDS}
    for row in rows:
        source_format = formats[row["source"]]
        fields = caption_fields(row, config, source_format)
        made = meta_caption(fields, FAMILIES_BY_FORMAT[source_format], templates, row["sample_id"])
        reasons.append(None if made else "no_caption_source")
        if made:
            for name, value in zip(
                ("caption", "meta_caption", "meta_template", "country", "city"),
                (made[0], made[0], made[1], fields.get("country"), fields.get("city")),
                strict=True,
            ):
                captions[name].append(value)
    keep = pa.array([reason is None for reason in reasons], pa.bool_())
    survivors = table.filter(keep).drop_columns(["caption"])
    kept = pa.Table.from_arrays(
        [*survivors.columns, *(pa.array(captions[f.name], f.type) for f in ADDED_FIELDS)],
        schema=pa.schema([*survivors.schema, *ADDED_FIELDS]),
    )
    details = [NO_SOURCE if reason else None for reason in reasons]
    return ShardOutcome(
        kept=kept,
        decisions=decisions(table.column("sample_id"), table.column("source"), reasons, details),
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
    reasons=REASONS,
    sections=("rs3.meta",),
    code_version="1",
    report=Report("(RS3) meta captions", "kept"),
    drops=("caption",),
    adds=ADDED_FIELDS,
    make_processor=_processor,
    identity=lambda config: {"templates": _templates(config).identity, "rules": RULES_VERSION},
)
