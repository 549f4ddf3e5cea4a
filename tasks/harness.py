"""Runs a stage function over one shard and commits the result through storage/.

The same steps for every stage: skip a shard whose marker is current, read the input, call the pure stage
function, check that every input sample got exactly one decision, then write survivors, ledger and marker
(marker last: it is the commit point, so a kill at any moment leaves either a finished shard or one that
reruns from scratch).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Generic, TypeVar

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel

from storage.atomic import write_parquet
from storage.layout import Layout
from storage.ledger import ledger_rows
from storage.markers import (
    Manifest,
    Marker,
    manifest_identity,
    marker_is_current,
    read_manifest,
    read_marker,
    sha256_file,
    stage_fingerprint,
    write_manifest,
    write_marker,
)
from tasks.stage import ShardOutcome

SectionT = TypeVar("SectionT", bound=BaseModel)


class StageInputError(RuntimeError):
    """A stage was asked to run before the stage it reads from was complete."""


class ShardContractError(RuntimeError):
    """A stage function lost or invented samples: a bug, never a data problem."""


@dataclass(frozen=True)
class ShardSummary:
    stage: str
    shard_id: str
    skipped: bool
    counts: dict[str, int] = field(default_factory=dict)


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def check_outcome(inputs: pa.Table, outcome: ShardOutcome) -> None:
    """Every input sample has exactly one decision, and the survivors are exactly the kept ones."""
    decided = outcome.decisions.column("sample_id")
    ids = decided.to_pylist()
    if len(ids) != inputs.num_rows or len(set(ids)) != len(ids):
        raise ShardContractError(
            f"{len(ids)} decisions ({len(set(ids))} distinct) for {inputs.num_rows} inputs"
        )
    if set(ids) != set(inputs.column("sample_id").to_pylist()):
        raise ShardContractError("decisions do not name the same samples as the input")
    kept_ids = pc.filter(decided, pc.equal(outcome.decisions.column("fate"), "kept")).to_pylist()
    if kept_ids != outcome.kept.column("sample_id").to_pylist():
        raise ShardContractError("survivors differ from the samples decided 'kept' (or their order does)")


def commit_shard(
    layout: Layout,
    stage: str,
    shard_id: str,
    outcome: ShardOutcome,
    schema: pa.Schema,
    run_id: str,
    fingerprint: str,
) -> tuple[str, dict[str, int]]:
    """Write one shard's survivors and ledger atomically; returns (sha256 of the data file, counts)."""
    kept = outcome.kept.select(schema.names).cast(schema)
    write_parquet(layout.data(stage, shard_id), kept)
    write_parquet(
        layout.ledger(stage, shard_id),
        ledger_rows(outcome.decisions, run_id=run_id, stage=stage, config_hash=fingerprint),
    )
    return sha256_file(layout.data(stage, shard_id)), outcome.counts()


def upstream_checksum(layout: Layout, upstream: str, shard_id: str) -> str:
    manifest = read_manifest(layout, upstream)
    if manifest is None or shard_id not in manifest.shards:
        raise StageInputError(f"stage {upstream!r} has not completed shard {shard_id!r}; run it first")
    return manifest.shards[shard_id]


def run_shard(
    layout: Layout,
    *,
    stage: str,
    upstream: str,
    shard_id: str,
    schema: pa.Schema,
    fingerprint: str,
    run_id: str,
    process: Callable[[pa.Table], ShardOutcome] | Callable[[pa.Table, Path], ShardOutcome],
    needs_scratch: bool = False,
) -> ShardSummary:
    inputs = {"data": upstream_checksum(layout, upstream, shard_id)}
    marker = read_marker(layout, stage, shard_id)
    if marker_is_current(marker, fingerprint, inputs):
        return ShardSummary(stage, shard_id, skipped=True, counts=marker.counts[shard_id])
    table = pq.read_table(layout.data(upstream, shard_id))
    if needs_scratch:
        outcome = process(table, scratch_dir=layout.fresh_scratch(stage, shard_id))
    else:
        outcome = process(table)
    check_outcome(table, outcome)
    sha, counts = commit_shard(layout, stage, shard_id, outcome, schema, run_id, fingerprint)
    write_marker(
        layout,
        Marker(stage, shard_id, fingerprint, inputs, {shard_id: sha}, {shard_id: counts}, run_id, now()),
    )
    if needs_scratch:
        layout.remove_scratch(stage, shard_id)
    return ShardSummary(stage, shard_id, skipped=False, counts=counts)


def complete_stage(
    layout: Layout,
    *,
    stage: str,
    upstream: str | None,
    unit_fingerprints: dict[str, str],
    run_id: str,
    failed_sources: dict[str, str] | None = None,
) -> Manifest:
    """Record that every unit (shard, or source for ingest) of a stage is done with the fingerprint it
    should have, from their markers. The manifest's fingerprint covers all units' fingerprints."""
    shards: dict[str, str] = {}
    counts: dict[str, dict[str, int]] = {}
    for unit, fingerprint in sorted(unit_fingerprints.items()):
        marker = read_marker(layout, stage, unit)
        if marker is None or marker.fingerprint != fingerprint:
            raise StageInputError(f"stage {stage!r}: unit {unit!r} is not done with the current config")
        shards.update(marker.outputs)
        counts.update(marker.counts)
    inherited = read_manifest(layout, upstream).failed_sources if upstream else {}
    manifest = Manifest(
        stage=stage,
        fingerprint=hashlib.sha256(json.dumps(sorted(set(unit_fingerprints.values()))).encode()).hexdigest()[
            :16
        ],
        upstream_identity=manifest_identity(layout, upstream) if upstream else None,
        shards=dict(sorted(shards.items())),
        counts=dict(sorted(counts.items())),
        failed_sources={**inherited, **(failed_sources or {})},
        run_id=run_id,
        finished_at=now(),
    )
    write_manifest(layout, manifest)
    return manifest


@dataclass(frozen=True)
class ShardStage(Generic[SectionT]):
    """A stage that maps each upstream shard to one shard of its own.

    `make_processor` turns the stage's config section into the pure per-shard function once per task
    (compile a keyword list, load a model), so a shard only pays for its own data.
    """

    name: str
    upstream: str
    schema: pa.Schema
    reasons: dict[str, str]
    make_processor: Callable[[SectionT], Callable[..., ShardOutcome]]
    identity: Callable[[SectionT], dict[str, str]] = lambda _config: {}
    needs_scratch: bool = False

    def fingerprint(self, config: SectionT) -> str:
        return stage_fingerprint(self.name, config, self.identity(config))

    def run(self, layout: Layout, shard_id: str, config: SectionT, run_id: str) -> ShardSummary:
        return run_shard(
            layout,
            stage=self.name,
            upstream=self.upstream,
            shard_id=shard_id,
            schema=self.schema,
            fingerprint=self.fingerprint(config),
            run_id=run_id,
            process=self.make_processor(config),
            needs_scratch=self.needs_scratch,
        )
