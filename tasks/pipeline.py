"""The PUB11 stages in pipeline order, and which column of RS5M's published funnel each one feeds."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import tasks.filter
from tasks import decontaminate, dedup, download, embed, ingest, keyword, shard, validate


@dataclass(frozen=True)
class StageInfo:
    name: str
    rs5m_column: str  # the column of RS5M's PUB11 table this stage's `measure` corresponds to
    measure: Literal["in", "kept", "dropped"]
    reasons: dict[str, str]


PUB11_STAGES: tuple[StageInfo, ...] = (
    StageInfo("ingest", "amount", "in", ingest.REASONS),
    StageInfo("keyword", "after RS keyword filtering", "kept", keyword.REASONS),
    StageInfo("download", "downloaded", "kept", download.REASONS),
    StageInfo("validate", "invalid images removed", "dropped", validate.REASONS),
    StageInfo("embed", "(ours) embedded", "kept", embed.REASONS),
    StageInfo("filter", "non-RS outliers removed", "dropped", tasks.filter.REASONS),
    StageInfo("dedup", "duplicates removed", "dropped", dedup.REASONS),
    StageInfo("decontaminate", "(ours) eval-set copies removed", "dropped", decontaminate.REASONS),
    StageInfo("shard", "remain", "kept", shard.REASONS),
)
STAGE_ORDER: tuple[str, ...] = tuple(s.name for s in PUB11_STAGES)
RS5M_COLUMNS: dict[str, str] = {s.name: s.rs5m_column for s in PUB11_STAGES}
