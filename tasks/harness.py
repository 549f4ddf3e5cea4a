"""Runs a stage function over one shard and commits the result through storage/.

The same steps for every stage: skip a shard whose marker is current, read the input, call the pure stage
function, check that every input sample got exactly one decision, then write survivors, ledger and marker
(marker last: it is the commit point, so a kill at any moment leaves either a finished shard or one that
reruns from scratch).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rs5m.config import PipelineConfig
from storage.arrays import read_arrays, write_arrays
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
    write_arrays(layout, stage, shard_id, outcome.arrays, rows=kept.num_rows)
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
    upstream_arrays: tuple[str, ...] = (),
) -> ShardSummary:
    inputs = {"data": upstream_checksum(layout, upstream, shard_id)}
    marker = read_marker(layout, stage, shard_id)
    if marker_is_current(marker, fingerprint, inputs):
        return ShardSummary(stage, shard_id, skipped=True, counts=marker.counts[shard_id])
    table = pq.read_table(layout.data(upstream, shard_id))
    extra: dict[str, object] = {}
    if needs_scratch:
        extra["scratch_dir"] = layout.fresh_scratch(stage, shard_id)
    if upstream_arrays:
        extra["arrays"] = read_arrays(layout, upstream, shard_id, upstream_arrays, rows=table.num_rows)
    outcome = process(table, **extra)
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
    layout.remove_unlisted(stage, set(shards), set(unit_fingerprints), set(manifest.failed_sources))
    return manifest


@dataclass(frozen=True)
class ShardStage:
    """A stage that maps each upstream shard to one shard of its own.

    `sections` name the PipelineConfig sections whose output-affecting fields make up the stage's
    fingerprint (with `identity`: list hashes, model identity). `make_processor` turns the config into the
    pure per-shard function once per task (compile a keyword list, load a model), so a shard only pays for
    its own data. `upstream_arrays` names the upstream's per-row arrays (embeddings) the function reads.
    """

    name: str
    upstream: str
    schema: pa.Schema
    reasons: dict[str, str]
    sections: tuple[str, ...]
    make_processor: Callable[[PipelineConfig], Callable[..., ShardOutcome]]
    identity: Callable[[PipelineConfig], dict[str, str]] = lambda _config: {}
    needs_scratch: bool = False
    upstream_arrays: tuple[str, ...] = ()

    def fingerprint(self, config: PipelineConfig) -> str:
        sections = {name: config.section(name) for name in self.sections}
        return stage_fingerprint(self.name, sections, self.identity(config))

    def run(self, layout: Layout, shard_id: str, config: PipelineConfig, run_id: str) -> ShardSummary:
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
            upstream_arrays=self.upstream_arrays,
        )


GLOBAL_UNIT = "_all"
GlobalProcessor = Callable[[dict[str, pa.Table], dict[str, dict[str, np.ndarray]]], dict[str, ShardOutcome]]


@dataclass(frozen=True)
class GlobalStage:
    """A stage that must see every upstream shard at once (dedup, the final dataset) but still writes one
    output shard per upstream shard, so that per-shard stages can follow it.

    Its single marker records every upstream shard's checksum: a new or changed shard reruns the whole
    stage. `publish` (optional) writes what the stage makes besides its shards (the final dataset); it runs
    after the shards are committed and before the marker, and what it returns goes into the marker.
    """

    name: str
    upstream: str
    schema: pa.Schema
    reasons: dict[str, str]
    sections: tuple[str, ...]
    make_processor: Callable[[PipelineConfig], GlobalProcessor]
    identity: Callable[[PipelineConfig], dict[str, str]] = lambda _config: {}
    upstream_arrays: tuple[str, ...] = ()
    publish: Callable[[Layout, PipelineConfig, dict[str, ShardOutcome]], dict] | None = None

    def fingerprint(self, config: PipelineConfig) -> str:
        sections = {name: config.section(name) for name in self.sections}
        return stage_fingerprint(self.name, sections, self.identity(config))

    def run(self, layout: Layout, config: PipelineConfig, run_id: str) -> ShardSummary:
        upstream = read_manifest(layout, self.upstream)
        if upstream is None:
            raise StageInputError(f"stage {self.upstream!r} is not complete; run it first")
        inputs = dict(upstream.shards)
        fingerprint = self.fingerprint(config)
        marker = read_marker(layout, self.name, GLOBAL_UNIT)
        if marker_is_current(marker, fingerprint, inputs):
            return ShardSummary(
                self.name, GLOBAL_UNIT, skipped=True, counts=total_counts(marker.counts.values())
            )
        tables = {shard: pq.read_table(layout.data(self.upstream, shard)) for shard in inputs}
        arrays = {
            shard: read_arrays(layout, self.upstream, shard, self.upstream_arrays, rows=table.num_rows)
            for shard, table in tables.items()
        }
        outcomes = self.make_processor(config)(tables, arrays)
        if set(outcomes) != set(tables):
            raise ShardContractError(
                f"stage {self.name!r} returned shards {sorted(outcomes)} for {sorted(tables)}"
            )
        for shard, outcome in outcomes.items():
            check_outcome(tables[shard], outcome)
        outputs: dict[str, str] = {}
        counts: dict[str, dict[str, int]] = {}
        for shard in sorted(outcomes):
            outputs[shard], counts[shard] = commit_shard(
                layout, self.name, shard, outcomes[shard], self.schema, run_id, fingerprint
            )
        published = self.publish(layout, config, outcomes) if self.publish else {}
        write_marker(
            layout,
            Marker(
                self.name, GLOBAL_UNIT, fingerprint, inputs, outputs, counts, run_id, now(), extra=published
            ),
        )
        return ShardSummary(self.name, GLOBAL_UNIT, skipped=False, counts=total_counts(counts.values()))


def total_counts(per_shard: Iterable[dict[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for counts in per_shard:
        for key, n in counts.items():
            total[key] = total.get(key, 0) + n
    return total
