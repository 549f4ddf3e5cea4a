"""The DuckDB catalog: a small file of views over the Parquet that the stages wrote. It holds no data.

Views (rebuilt after every stage, and by `rs5m report` when the work directory was moved or copied, since
views name absolute paths; readers open the file read-only and briefly, so `rs5m report` works while a run
is going):
  catalog_info  root: the work directory the views were built for
  stages   stage, position, rs5m_column, status (complete | stale | running | failed | interrupted |
           not_run), as it was when the catalog was built (`stage_states` gives it as it is now)
  ledger   every fate of every complete, current stage
  funnel   stage, position, source, fate, reason, n
  samples  the survivors of the furthest complete, current stage
  <stage>  the survivors of each complete, current stage (ingest, keyword, ...)
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import duckdb

from storage.atomic import atomic_path
from storage.layout import Layout
from storage.lock import is_held
from storage.markers import Manifest, read_manifest, upstreams_identity

COMPLETE, STALE, RUNNING, FAILED, INTERRUPTED, NOT_RUN = (
    "complete",
    "stale",
    "running",
    "failed",
    "interrupted",
    "not_run",
)


@dataclass(frozen=True)
class StageState:
    stage: str
    status: str
    manifest: Manifest | None


def stage_states(layout: Layout, stage_order: Sequence[str]) -> list[StageState]:
    """Each stage's status, derived from the manifests: a stage is current only if it was built on the
    manifests its upstream stages have now, and they are all current. A manifest names its upstreams (one,
    or several for the release; an older manifest without them was built on the stage before it). A stage
    without a manifest that has started is running while a writer holds the work directory, failed if its
    run said so, and interrupted otherwise (its run was killed)."""
    states: list[StageState] = []
    status_of: dict[str, str] = {}
    writer_active: bool | None = None
    for position, stage in enumerate(stage_order):
        manifest = read_manifest(layout, stage)
        if manifest is None:
            started = _started_record(layout, stage)
            if started is None:
                status = NOT_RUN
            elif started.get("failed"):
                status = FAILED
            else:
                writer_active = is_held(layout) if writer_active is None else writer_active
                status = RUNNING if writer_active else INTERRUPTED
        else:
            upstreams = (
                manifest.upstreams
                if manifest.upstreams is not None
                else list(stage_order[position - 1 : position])  # older manifests: the stage before
            )
            current = all(status_of.get(upstream) == COMPLETE for upstream in upstreams)
            built_on_now = manifest.upstream_identity == upstreams_identity(layout, upstreams)
            status = COMPLETE if current and built_on_now else STALE
        status_of[stage] = status
        states.append(StageState(stage, status, manifest))
    return states


def _started_record(layout: Layout, stage: str) -> dict | None:
    try:
        return json.loads(layout.started(stage).read_text())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}  # half-readable: it started


def _sql_string(value: object) -> str:
    return "'" + str(value).replace("'", "''") + "'"


def _sql_list(paths: Sequence[Path]) -> str:
    return "[" + ", ".join(_sql_string(p) for p in paths) + "]"


def _view_statements(layout: Layout, states: list[StageState], stage_columns: dict[str, str]) -> list[str]:
    # DuckDB views hold absolute paths; the root they were built for tells a moved work directory apart
    statements = [f"CREATE VIEW catalog_info AS SELECT {_sql_string(layout.root)} AS root"]
    rows = ", ".join(
        f"('{s.stage}', {i}, '{stage_columns.get(s.stage, '')}', '{s.status}')" for i, s in enumerate(states)
    )
    statements.append(
        f"CREATE VIEW stages AS SELECT * FROM (VALUES {rows}) t(stage, position, rs5m_column, status)"
    )
    complete = [s for s in states if s.status == COMPLETE and s.manifest is not None]
    ledger_files = [layout.ledger(s.stage, shard) for s in complete for shard in sorted(s.manifest.shards)]
    if ledger_files:
        statements.append(f"CREATE VIEW ledger AS SELECT * FROM read_parquet({_sql_list(ledger_files)})")
    else:  # an empty view with the right columns keeps every query valid before the first stage ends
        statements.append(
            "CREATE VIEW ledger AS SELECT * FROM (SELECT NULL::VARCHAR run_id, NULL::VARCHAR sample_id, "
            "NULL::VARCHAR source, NULL::VARCHAR stage, NULL::VARCHAR fate, NULL::VARCHAR reason, "
            "NULL::VARCHAR detail, NULL::MAP(VARCHAR, DOUBLE) scores, NULL::VARCHAR group_id, "
            "NULL::VARCHAR kept_sample_id, NULL::VARCHAR config_hash) WHERE false"
        )
    statements.append(
        "CREATE VIEW funnel AS SELECT l.stage, s.position, l.source, l.fate, l.reason, count(*) AS n "
        "FROM ledger l JOIN stages s USING (stage) GROUP BY ALL ORDER BY s.position, l.source, l.fate, l.reason"
    )
    for state in complete:
        data_files = [layout.data(state.stage, shard) for shard in sorted(state.manifest.shards)]
        if data_files:
            statements.append(
                f'CREATE VIEW "{state.stage}" AS SELECT * FROM read_parquet({_sql_list(data_files)}, '
                "union_by_name = true)"
            )
    if complete and complete[-1].manifest.shards:
        statements.append(f'CREATE VIEW samples AS SELECT * FROM "{complete[-1].stage}"')
    return statements


def refresh_catalog(layout: Layout, stage_order: Sequence[str], stage_columns: dict[str, str]) -> Path:
    """Rebuild the catalog beside the old one and swap it in, so a reader never sees it half-built."""
    states = stage_states(layout, stage_order)
    with atomic_path(layout.catalog) as tmp:
        tmp.unlink()  # DuckDB refuses to open an empty non-database file
        con = duckdb.connect(str(tmp))
        try:
            for statement in _view_statements(layout, states, stage_columns):
                con.execute(statement)
        finally:
            con.close()
        Path(f"{tmp}.wal").unlink(missing_ok=True)
    return layout.catalog


def catalog_root(layout: Layout) -> Path | None:
    """The work directory the catalog's views were built for (None: no catalog, or one without the record)."""
    if not layout.catalog.exists():
        return None
    con = open_catalog(layout)
    try:
        return Path(con.sql("SELECT root FROM catalog_info").fetchall()[0][0])
    except duckdb.CatalogException:
        return None
    finally:
        con.close()


def open_catalog(layout: Layout, attempts: int = 20) -> duckdb.DuckDBPyConnection:
    """Open the catalog read-only; a swap in progress is retried briefly."""
    if not layout.catalog.exists():
        raise FileNotFoundError(f"no catalog in {layout.root}: has a run started there?")
    for attempt in range(attempts):
        try:
            return duckdb.connect(str(layout.catalog), read_only=True)
        except duckdb.IOException:
            if attempt == attempts - 1:
                raise
            time.sleep(0.05 * (attempt + 1))
    raise AssertionError("unreachable")
