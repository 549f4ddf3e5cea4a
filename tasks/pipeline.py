"""The PUB11 stages in pipeline order, and which column of RS5M's published funnel each one feeds."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Literal

import tasks.filter
from models.clip import ensure_loadable
from rs5m.config import ConfigError, PipelineConfig
from storage.catalog import refresh_catalog
from storage.layout import Layout
from tasks import decontaminate, dedup, download, embed, ingest, keyword, shard, validate
from tasks.harness import GlobalStage, ShardStage


@dataclass(frozen=True)
class StageInfo:
    name: str
    rs5m_column: str  # the column of RS5M's PUB11 table this stage's `measure` corresponds to
    measure: Literal["in", "kept", "dropped"]
    reasons: dict[str, str]
    stage: ShardStage | GlobalStage | None  # None: ingest, fingerprinted per source


PUB11_STAGES: tuple[StageInfo, ...] = (
    StageInfo("ingest", "amount", "in", ingest.REASONS, None),
    StageInfo("keyword", "after RS keyword filtering", "kept", keyword.REASONS, keyword.KEYWORD),
    StageInfo("download", "downloaded", "kept", download.REASONS, download.DOWNLOAD),
    StageInfo("validate", "invalid images removed", "dropped", validate.REASONS, validate.VALIDATE),
    StageInfo("embed", "(ours) embedded", "kept", embed.REASONS, embed.EMBED),
    StageInfo("filter", "non-RS outliers removed", "dropped", tasks.filter.REASONS, tasks.filter.FILTER),
    StageInfo("dedup", "duplicates removed", "dropped", dedup.REASONS, dedup.DEDUP),
    StageInfo(
        "decontaminate",
        "(ours) eval-set copies removed",
        "dropped",
        decontaminate.REASONS,
        decontaminate.DECONTAMINATE,
    ),
    StageInfo("shard", "remain", "kept", shard.REASONS, shard.SHARD),
)
STAGE_ORDER: tuple[str, ...] = tuple(s.name for s in PUB11_STAGES)
RS5M_COLUMNS: dict[str, str] = {s.name: s.rs5m_column for s in PUB11_STAGES}


def refresh_pub11_catalog(layout: Layout) -> None:
    """Rebuild the work directory's DuckDB views for the PUB11 stages (storage/catalog.py)."""
    refresh_catalog(layout, STAGE_ORDER, RS5M_COLUMNS)


def check_config(config: PipelineConfig, stages: Collection[str] | None = None) -> None:
    """Raises ConfigError, before any work, when a selected stage's config names something missing or unfit: an
    unknown model, a checkpoint or hub weights that cannot be had, the GPU, prompts, a detector trained for
    another model, an eval folder. Computing each stage's fingerprint resolves all of these (hub weights are
    downloaded here), so a bad value fails now and not after hours of downloading."""
    checks = [
        info.stage
        for info in PUB11_STAGES
        if info.stage is not None and (stages is None or info.name in stages)
    ]
    try:
        if any("clip" in stage.sections for stage in checks):
            ensure_loadable(embed.clip_spec(config.clip))
    except (OSError, ValueError, RuntimeError) as error:
        raise ConfigError(f"clip: {error}") from None
    for stage in checks:
        try:
            stage.fingerprint(config)
        except (OSError, ValueError, RuntimeError) as error:
            raise ConfigError(f"stage {stage.name} ({', '.join(stage.sections)}): {error}") from None
