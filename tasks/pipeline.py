"""The pipelines, as data: each is an ordered list of stage objects, and everything that runs, resumes,
catalogues or reports stages is derived from these lists (flows/, storage/catalog.py, rs5m/report.py).

- PUB11: web image-text pairs, from URL lists to filtered, scored samples.
- RS3: label-only remote-sensing datasets read in their own layouts, given meta captions and BLIP-2
  captions ranked with CLIP across rotations.
- release: dedup and decontamination over the union of the data pipelines the config has, then the
  released dataset (`subset` says which pipeline a row came from).

A new stage is one module in tasks/ and one line in a list. Stage names are folder names in the work
directory, unique across pipelines; source names are unique across pipelines too, so shard ids are.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass

import tasks.filter
from rs5m.config import ConfigError, PipelineConfig
from storage.catalog import refresh_catalog
from storage.layout import Layout
from tasks import (
    decontaminate,
    dedup,
    download,
    embed,
    ingest,
    keyword,
    rs3_caption,
    rs3_ingest,
    rs3_meta,
    rs3_read,
    shard,
    validate,
)
from tasks.harness import Report, Stage


@dataclass(frozen=True)
class Pipeline:
    name: str
    stages: tuple[Stage, ...]
    configured: Callable[[PipelineConfig], bool]  # whether a config asks for this pipeline
    image_stage: str | None = None  # the stage whose shards keep the image bytes (the release reads them)

    @property
    def stage_names(self) -> tuple[str, ...]:
        return tuple(stage.name for stage in self.stages)


PUB11 = Pipeline(
    "pub11",
    (ingest.INGEST, keyword.KEYWORD, download.DOWNLOAD, validate.VALIDATE, embed.EMBED, tasks.filter.FILTER),
    configured=lambda config: bool(config.sources),
    image_stage="validate",
)
RS3 = Pipeline(
    "rs3",
    (
        rs3_ingest.RS3_INGEST,
        rs3_read.RS3_READ,
        validate.validate_stage(
            "rs3_validate", "rs3_read", Report("(ours) invalid images removed", "dropped")
        ),
        rs3_meta.RS3_META,
        rs3_caption.RS3_CAPTION,
        embed.embed_stage(
            "rs3_embed", "rs3_caption", Report("(ours) embedded", "kept"), images_from="rs3_validate"
        ),
        tasks.filter.score_stage("rs3_score", "rs3_embed", Report("(ours) scored, none removed", "kept")),
    ),
    configured=lambda config: config.rs3 is not None,
    image_stage="rs3_validate",
)
RELEASE = Pipeline(
    "release",
    (dedup.DEDUP, decontaminate.DECONTAMINATE, shard.SHARD),
    configured=lambda config: True,
)
DATA_PIPELINES: tuple[Pipeline, ...] = (PUB11, RS3)
PIPELINES: tuple[Pipeline, ...] = (*DATA_PIPELINES, RELEASE)
STAGES: dict[str, Stage] = {stage.name: stage for pipeline in PIPELINES for stage in pipeline.stages}
STAGE_ORDER: tuple[str, ...] = tuple(STAGES)
PIPELINE_OF: dict[str, str] = {
    stage.name: pipeline.name for pipeline in PIPELINES for stage in pipeline.stages
}
PIPELINE_NAMES: tuple[str, ...] = tuple(pipeline.name for pipeline in PIPELINES)


def release_inputs(config: PipelineConfig) -> tuple[str, ...]:
    """What the release reads: the last stage of each data pipeline the config has."""
    return tuple(p.stages[-1].name for p in DATA_PIPELINES if p.configured(config))


def image_stages(config: PipelineConfig) -> dict[str, str]:
    """The stage holding each configured data pipeline's image bytes -> the pipeline's name."""
    return {p.image_stage: p.name for p in DATA_PIPELINES if p.configured(config) and p.image_stage}


def selected_pipelines(config: PipelineConfig, only: Collection[str] | None = None) -> list[Pipeline]:
    """The pipelines a run takes, in order: the data pipelines the config has (`only`: those named), then
    the release (which reads every data pipeline the config has)."""
    chosen = [p for p in DATA_PIPELINES if p.configured(config) and (only is None or p.name in only)]
    return [*chosen, RELEASE]


def selected_stages(
    config: PipelineConfig, pipelines: Collection[str] | None = None, stages: Collection[str] | None = None
) -> list[Stage]:
    return [
        stage
        for pipeline in selected_pipelines(config, pipelines)
        for stage in pipeline.stages
        if stages is None or stage.name in stages
    ]


def workdir_stage_order(layout: Layout) -> list[str]:
    """The stages to show for a work directory without its config (`rs5m report`, the catalog): those of
    each data pipeline that has run there (its first stage's folder exists), then the release."""
    present = [p for p in DATA_PIPELINES if layout.stage_dir(p.stages[0].name).is_dir()]
    return [stage.name for pipeline in [*present, RELEASE] for stage in pipeline.stages]


def refresh_workdir_catalog(layout: Layout) -> None:
    """Rebuild the work directory's DuckDB views (storage/catalog.py) over the stages it has."""
    order = workdir_stage_order(layout)
    refresh_catalog(layout, order, {name: STAGES[name].report.column for name in order})


def check_config(
    config: PipelineConfig, stages: Collection[str] | None = None, pipelines: Collection[str] | None = None
) -> None:
    """Raises ConfigError, before any work, when a selected stage's config names something missing or unfit: an
    unknown model, a checkpoint or hub weights that cannot be had, the GPU, prompts, a detector trained for
    another model, an eval folder. Computing each stage's fingerprint resolves all of these (hub weights are
    downloaded here), so a bad value fails now and not after hours of downloading."""
    checks = selected_stages(config, pipelines, stages)
    try:
        if any("clip" in stage.sections for stage in checks):
            from models.clip import ensure_loadable  # torch and open_clip: only when a stage uses CLIP

            ensure_loadable(embed.clip_spec(config.clip))
    except (OSError, ValueError, RuntimeError) as error:
        raise ConfigError(f"clip: {error}") from None
    for stage in checks:
        try:
            stage.preflight(config)
            stage.fingerprint(config)
        except (OSError, ValueError, RuntimeError) as error:
            raise ConfigError(f"stage {stage.name} ({', '.join(stage.sections)}): {error}") from None
