"""Runs a stage function over one shard and commits the result through storage/.

The same steps for every stage and unit (a shard; a source for ingest; the whole stage for a global stage):
1. skip the unit if its marker is current: same fingerprint and inputs, and every file the marker records
   still on disk with the size and (runner.verify: checksum) the sha256 it was written with;
2. otherwise delete the marker first (durably): from here on the unit is "not done", whatever happens;
3. read the input, checking it against the checksum the upstream stage recorded;
4. call the pure stage function (watched: a shard that stops making progress fails, tasks/watchdog.py);
5. check that every input sample got exactly one decision, with a reason the stage declared;
6. write survivors, ledger and arrays (each atomically and durably), then the marker with their digests.
So a marker never describes files other than those on disk, and a kill at any moment leaves either a
finished unit or one that reruns from scratch.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rs5m.config import PipelineConfig
from storage.arrays import read_arrays, write_arrays
from storage.atomic import remove_durably, remove_temporaries, sha256_file, write_json, write_parquet
from storage.layout import Layout
from storage.ledger import ledger_rows
from storage.markers import (
    GLOBAL_UNIT,
    FileDigests,
    Manifest,
    Marker,
    Verification,
    current_marker,
    digest_files,
    invalidate_manifest,
    manifest_identity,
    read_manifest,
    read_marker,
    remove_marker,
    stage_fingerprint,
    write_manifest,
    write_marker,
)
from storage.schemas import DROPPED, KEPT
from tasks.stage import ShardOutcome
from tasks.watchdog import watching


class StageInputError(RuntimeError):
    """A stage was asked to run before the stage it reads from was complete."""


class ShardContractError(RuntimeError):
    """A stage function lost or invented samples, or used a reason it did not declare: a bug, never a data
    problem."""


class DamagedInputError(RuntimeError):
    """An input file differs from what its stage recorded: damaged on disk after it was written."""


@dataclass(frozen=True)
class ShardSummary:
    stage: str
    shard_id: str
    skipped: bool
    counts: dict[str, int] = field(default_factory=dict)


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def check_outcome(
    input_ids: pa.ChunkedArray | pa.Array | None,
    outcome: ShardOutcome,
    reasons: Mapping[str, str],
    stage: str,
) -> None:
    """Every input sample has exactly one decision (input_ids None: a source read by ingest, whose ids must
    only be distinct), every drop has a reason the stage declared, and the survivors are exactly the kept
    samples, in order."""
    decided = outcome.decisions.column("sample_id")
    ids = decided.to_pylist()
    if len(set(ids)) != len(ids):
        raise ShardContractError(
            f"stage {stage!r}: {len(ids)} decisions for {len(set(ids))} distinct samples"
        )
    if input_ids is not None:
        if len(ids) != len(input_ids):
            raise ShardContractError(f"stage {stage!r}: {len(ids)} decisions for {len(input_ids)} inputs")
        if set(ids) != set(input_ids.to_pylist()):
            raise ShardContractError(f"stage {stage!r}: decisions do not name the same samples as the input")
    fates = outcome.decisions.column("fate")
    unknown_fates = set(pc.unique(fates).to_pylist()) - {KEPT, DROPPED}
    if unknown_fates:
        raise ShardContractError(f"stage {stage!r}: unknown fate(s) {sorted(unknown_fates)}")
    dropped_reasons = pc.filter(outcome.decisions.column("reason"), pc.equal(fates, DROPPED))
    undeclared = set(pc.unique(dropped_reasons).to_pylist()) - set(reasons)
    if undeclared:
        raise ShardContractError(
            f"stage {stage!r} dropped samples with undeclared reason(s) {sorted(map(str, undeclared))}; "
            f"its declared reasons are {sorted(reasons)}"
        )
    kept_ids = pc.filter(decided, pc.equal(fates, KEPT)).to_pylist()
    if kept_ids != outcome.kept.column("sample_id").to_pylist():
        raise ShardContractError(
            f"stage {stage!r}: survivors differ from the samples decided 'kept' (or their order does)"
        )


@dataclass(frozen=True)
class CommittedShard:
    sha256: str  # of the data file: what the next stage checks its input against
    counts: dict[str, int]
    files: FileDigests


def commit_shard(
    layout: Layout,
    stage: str,
    shard_id: str,
    outcome: ShardOutcome,
    schema: pa.Schema,
    run_id: str,
    fingerprint: str,
) -> CommittedShard:
    """Write one shard's survivors, arrays and ledger, each atomically and durably."""
    kept = outcome.kept.select(schema.names).cast(schema)
    written = write_arrays(layout, stage, shard_id, outcome.arrays, rows=kept.num_rows)
    write_parquet(layout.data(stage, shard_id), kept)
    write_parquet(
        layout.ledger(stage, shard_id),
        ledger_rows(outcome.decisions, run_id=run_id, stage=stage, config_hash=fingerprint),
    )
    data = layout.data(stage, shard_id)
    files = digest_files(layout, [data, layout.ledger(stage, shard_id), *written])
    return CommittedShard(files[layout.relative(data)]["sha256"], outcome.counts(), files)


def upstream_checksum(layout: Layout, upstream: str, shard_id: str) -> str:
    manifest = read_manifest(layout, upstream)
    if manifest is None or shard_id not in manifest.shards:
        raise StageInputError(f"stage {upstream!r} has not completed shard {shard_id!r}; run it first")
    return manifest.shards[shard_id]


def read_verified_table(layout: Layout, upstream: str, shard_id: str, expected_sha256: str) -> pa.Table:
    """The upstream shard's table, after checking the file against the checksum its stage recorded."""
    path = layout.data(upstream, shard_id)
    try:
        actual = sha256_file(path)
    except FileNotFoundError:
        actual = None
    if actual != expected_sha256:
        raise DamagedInputError(
            f"{layout.relative(path)} is {'missing' if actual is None else 'damaged'}: it does not match the "
            f"checksum stage {upstream!r} recorded; rerun the pipeline from {upstream!r} (it rebuilds the shard)"
        )
    return pq.read_table(path)


def run_shard(
    layout: Layout,
    *,
    stage: str,
    upstream: str,
    shard_id: str,
    schema: pa.Schema,
    reasons: Mapping[str, str],
    fingerprint: str,
    run_id: str,
    process: Callable[[pa.Table], ShardOutcome] | Callable[[pa.Table, Path], ShardOutcome],
    needs_scratch: bool = False,
    upstream_arrays: tuple[str, ...] = (),
    verify: Verification = "checksum",
    stall_timeout_s: float | None = None,
) -> ShardSummary:
    inputs = {"data": upstream_checksum(layout, upstream, shard_id)}
    marker = current_marker(layout, stage, shard_id, fingerprint, inputs, verify)
    if marker is not None:
        return ShardSummary(stage, shard_id, skipped=True, counts=marker.counts[shard_id])
    remove_marker(layout, stage, shard_id)
    with watching(stage, shard_id, stall_timeout_s):
        table = read_verified_table(layout, upstream, shard_id, inputs["data"])
        extra: dict[str, object] = {}
        if needs_scratch:
            extra["scratch_dir"] = layout.fresh_scratch(stage, shard_id)
        if upstream_arrays:
            extra["arrays"] = read_arrays(layout, upstream, shard_id, upstream_arrays, rows=table.num_rows)
        outcome = process(table, **extra)
    check_outcome(table.column("sample_id"), outcome, reasons, stage)
    committed = commit_shard(layout, stage, shard_id, outcome, schema, run_id, fingerprint)
    write_marker(
        layout,
        Marker(
            stage,
            shard_id,
            fingerprint,
            inputs,
            {shard_id: committed.sha256},
            {shard_id: committed.counts},
            run_id,
            now(),
            files=committed.files,
        ),
    )
    if needs_scratch:
        layout.remove_scratch(stage, shard_id)
    return ShardSummary(stage, shard_id, skipped=False, counts=committed.counts)


def begin_stage(layout: Layout, stage: str, run_id: str) -> None:
    """The stage is about to rewrite its files: it is not complete (its manifest goes) but running (its
    started record says since when, by which run) until complete_stage; temporaries that a killed writer
    left in its folder are removed (the caller holds the work directory's lock)."""
    invalidate_manifest(layout, stage)
    write_json(layout.started(stage), {"stage": stage, "run_id": run_id, "started_at": now()})
    remove_temporaries(layout.stage_dir(stage))


def fail_stage(layout: Layout, stage: str, run_id: str, error: str) -> None:
    """The stage ended without completing (its committed units stay; a rerun resumes)."""
    write_json(layout.started(stage), {"stage": stage, "run_id": run_id, "failed": error, "failed_at": now()})


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
    remove_durably(layout.started(stage))
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
            reasons=self.reasons,
            fingerprint=self.fingerprint(config),
            run_id=run_id,
            process=self.make_processor(config),
            needs_scratch=self.needs_scratch,
            upstream_arrays=self.upstream_arrays,
            verify=config.runner.verify,
            stall_timeout_s=config.runner.stall_timeout_s,
        )


GlobalProcessor = Callable[[dict[str, pa.Table], dict[str, dict[str, np.ndarray]]], dict[str, ShardOutcome]]


@dataclass(frozen=True)
class Published:
    """What a global stage made besides its shards (the release): recorded in its marker, and its files
    verified like the shards' before the stage is skipped."""

    extra: dict
    files: FileDigests


@dataclass(frozen=True)
class GlobalStage:
    """A stage that must see every upstream shard at once (dedup, the final dataset) but still writes one
    output shard per upstream shard, so that per-shard stages can follow it.

    Its single marker records every upstream shard's checksum: a new or changed shard reruns the whole
    stage. `publish` (optional) writes what the stage makes besides its shards (the final dataset); it runs
    after the shards are committed and before the marker, and what it returns goes into the marker.
    `is_published` tells whether what the marker records is still what readers see (the release in place).
    Global stages are not watched for stalls: their searches run in C code that no exception interrupts.
    """

    name: str
    upstream: str
    schema: pa.Schema
    reasons: dict[str, str]
    sections: tuple[str, ...]
    make_processor: Callable[[PipelineConfig], GlobalProcessor]
    identity: Callable[[PipelineConfig], dict[str, str]] = lambda _config: {}
    upstream_arrays: tuple[str, ...] = ()
    publish: Callable[[Layout, PipelineConfig, dict[str, ShardOutcome]], Published] | None = None
    is_published: Callable[[Layout, Marker], bool] = lambda _layout, _marker: True

    def fingerprint(self, config: PipelineConfig) -> str:
        sections = {name: config.section(name) for name in self.sections}
        return stage_fingerprint(self.name, sections, self.identity(config))

    def run(self, layout: Layout, config: PipelineConfig, run_id: str) -> ShardSummary:
        upstream = read_manifest(layout, self.upstream)
        if upstream is None:
            raise StageInputError(f"stage {self.upstream!r} is not complete; run it first")
        inputs = dict(upstream.shards)
        fingerprint = self.fingerprint(config)
        verify = config.runner.verify
        marker = current_marker(layout, self.name, GLOBAL_UNIT, fingerprint, inputs, verify)
        if marker is not None and self.is_published(layout, marker):
            return ShardSummary(
                self.name, GLOBAL_UNIT, skipped=True, counts=total_counts(marker.counts.values())
            )
        remove_marker(layout, self.name, GLOBAL_UNIT)
        tables = {
            shard: read_verified_table(layout, self.upstream, shard, checksum)
            for shard, checksum in inputs.items()
        }
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
            check_outcome(tables[shard].column("sample_id"), outcome, self.reasons, self.name)
        outputs: dict[str, str] = {}
        counts: dict[str, dict[str, int]] = {}
        files: FileDigests = {}
        for shard in sorted(outcomes):
            committed = commit_shard(
                layout, self.name, shard, outcomes[shard], self.schema, run_id, fingerprint
            )
            outputs[shard], counts[shard] = committed.sha256, committed.counts
            files.update(committed.files)
        published = self.publish(layout, config, outcomes) if self.publish else Published({}, {})
        write_marker(
            layout,
            Marker(
                self.name,
                GLOBAL_UNIT,
                fingerprint,
                inputs,
                outputs,
                counts,
                run_id,
                now(),
                extra=published.extra,
                files={**files, **published.files},
            ),
        )
        return ShardSummary(self.name, GLOBAL_UNIT, skipped=False, counts=total_counts(counts.values()))


def total_counts(per_shard: Iterable[dict[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for counts in per_shard:
        for key, n in counts.items():
            total[key] = total.get(key, 0) + n
    return total
