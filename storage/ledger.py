"""The ledger: one Parquet file per (stage, shard), one row per sample that entered the stage."""

from __future__ import annotations

import pyarrow as pa

from storage.schemas import DECISION_SCHEMA, LEDGER_SCHEMA


def ledger_rows(decisions: pa.Table, *, run_id: str, stage: str, config_hash: str) -> pa.Table:
    """Stamp a stage's decisions with who made them, in LEDGER_SCHEMA column order."""
    decisions = decisions.cast(DECISION_SCHEMA)
    n = decisions.num_rows
    stamped = {
        "run_id": pa.array([run_id] * n, pa.string()),
        "stage": pa.array([stage] * n, pa.string()),
        "config_hash": pa.array([config_hash] * n, pa.string()),
    }
    columns = [stamped[f.name] if f.name in stamped else decisions.column(f.name) for f in LEDGER_SCHEMA]
    return pa.Table.from_arrays(columns, schema=LEDGER_SCHEMA)
