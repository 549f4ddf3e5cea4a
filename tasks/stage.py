"""What every stage function returns for one shard, and the helpers that build it.

A stage function is pure: it takes the previous stage's shard table and returns the survivors plus one
decision per input sample. Counting, the ledger, markers and writes are done once, by the harness in
tasks/harness.py and storage/, so every stage counts the same way (DataTrove's `stat_update`, built in).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from storage.schemas import DECISION_SCHEMA, DROPPED, KEPT


@dataclass(frozen=True)
class ShardOutcome:
    kept: pa.Table
    decisions: pa.Table  # DECISION_SCHEMA, exactly one row per input sample
    # per-row arrays of the survivors (embeddings), row i belongs to kept row i; stored beside the shard
    arrays: Mapping[str, np.ndarray] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        """{"kept": n, "dropped:<reason>": n, ...}."""
        result: dict[str, int] = {KEPT: 0}
        grouped = self.decisions.group_by(["fate", "reason"], use_threads=False).aggregate(
            [([], "count_all")]
        )
        for fate, reason, n in zip(
            *(grouped.column(c).to_pylist() for c in ("fate", "reason", "count_all")), strict=True
        ):
            result[KEPT if fate == KEPT else f"{DROPPED}:{reason}"] = n
        return result


def decisions(
    sample_ids: Sequence[str] | pa.Array | pa.ChunkedArray,
    sources: Sequence[str] | pa.Array | pa.ChunkedArray,
    reasons: Sequence[str | None] | pa.Array | pa.ChunkedArray,
    details: Sequence[str | None] | pa.Array | pa.ChunkedArray | None = None,
    scores: Sequence[dict[str, float] | None] | None = None,
    group_ids: Sequence[str | None] | None = None,
    kept_sample_ids: Sequence[str | None] | None = None,
) -> pa.Table:
    """Build a decision table; a null reason means the sample was kept."""
    reason_array = (
        pa.array(reasons, pa.string()) if not isinstance(reasons, pa.Array | pa.ChunkedArray) else reasons
    )
    n = len(reason_array)
    fate = pc.if_else(pc.is_null(reason_array), pa.scalar(KEPT), pa.scalar(DROPPED))

    def column(values, type_):
        if values is None:
            return pa.nulls(n, type_)
        if isinstance(values, pa.Array | pa.ChunkedArray):
            return values.cast(type_)
        return pa.array(values, type_)

    return pa.table(
        [
            column(sample_ids, pa.string()),
            column(sources, pa.string()),
            fate,
            column(reason_array, pa.string()),
            column(details, pa.string()),
            column(scores, DECISION_SCHEMA.field("scores").type),
            column(group_ids, pa.string()),
            column(kept_sample_ids, pa.string()),
        ],
        schema=DECISION_SCHEMA,
    )


def split_by_reason(
    table: pa.Table, reasons: pa.Array, details: pa.Array | None = None, **kw
) -> ShardOutcome:
    """Keep the rows whose reason is null; every row gets its decision."""
    keep_mask = pc.is_null(reasons)
    return ShardOutcome(
        kept=table.filter(keep_mask),
        decisions=decisions(table.column("sample_id"), table.column("source"), reasons, details, **kw),
    )
