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
finished unit or one that reruns from scratch. A shard stage may decide a task's consecutive shards in one
call (run_shard_batches): steps 4 and 5 then cover the group, every other step stays per shard.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rs5m.config import PipelineConfig
from storage.arrays import read_arrays, write_arrays
from storage.atomic import remove_durably, remove_temporaries, sha256_file, write_json, write_parquet
from storage.layout import Layout, shard_name
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
    read_manifest,
    read_marker,
    remove_marker,
    stage_fingerprint,
    upstreams_identity,
    write_manifest,
    write_marker,
)
from storage.schemas import DROPPED, KEPT
from tasks.stage import ShardOutcome
from tasks.watchdog import heartbeat, watching


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


def upstream_checksum(layout: Layout, upstream: str, shard_id: str, manifest: Manifest | None = None) -> str:
    """The checksum the upstream stage recorded for the shard; `manifest` is the upstream's when the caller
    read it already (a task of many shards reads it once: it lists every shard of the stage)."""
    manifest = manifest or read_manifest(layout, upstream)
    if manifest is None or shard_id not in manifest.shards:
        raise StageInputError(f"stage {upstream!r} has not completed shard {shard_id!r}; run it first")
    return manifest.shards[shard_id]


def read_verified_table(
    layout: Layout, upstream: str, shard_id: str, expected_sha256: str, columns: list[str] | None = None
) -> pa.Table:
    """The upstream shard's table (or `columns` of it), after checking the file against the checksum its
    stage recorded."""
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
    return pq.read_table(path, columns=columns)


def with_images(table: pa.Table, images: pa.Table) -> pa.Table:
    """`table` with the `image` column of the rows of `images` that have its sample ids (every one must)."""
    position = {sample_id: row for row, sample_id in enumerate(images.column("sample_id").to_pylist())}
    try:
        rows = [position[sample_id] for sample_id in table.column("sample_id").to_pylist()]
    except KeyError as missing:
        raise DamagedInputError(f"sample {missing} has no image in its image stage's shard") from None
    return table.append_column("image", images.column("image").take(pa.array(rows, pa.int64())))


def _shard_inputs(
    layout: Layout, upstream: str, shard_id: str, images_from: str | None, manifest: Manifest | None = None
) -> dict[str, str]:
    inputs = {"data": upstream_checksum(layout, upstream, shard_id, manifest)}
    if images_from is not None:
        inputs["images"] = upstream_checksum(layout, images_from, shard_id)
    return inputs


def _reused(
    layout: Layout, stage: str, shard_id: str, fingerprint: str, inputs: dict[str, str], verify: Verification
) -> ShardSummary | None:
    """Step 1 and 2: the summary of a shard whose marker is current, or None after removing a stale marker."""
    marker = current_marker(layout, stage, shard_id, fingerprint, inputs, verify)
    if marker is not None:
        return ShardSummary(stage, shard_id, skipped=True, counts=marker.counts[shard_id])
    remove_marker(layout, stage, shard_id)
    return None


def _commit_marked(
    layout: Layout,
    *,
    stage: str,
    shard_id: str,
    outcome: ShardOutcome,
    output_schema: pa.Schema,
    run_id: str,
    fingerprint: str,
    inputs: dict[str, str],
) -> ShardSummary:
    """Step 6: the shard's files, then its marker."""
    committed = commit_shard(layout, stage, shard_id, outcome, output_schema, run_id, fingerprint)
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
    return ShardSummary(stage, shard_id, skipped=False, counts=committed.counts)


def run_shard(
    layout: Layout,
    *,
    stage: str,
    upstream: str,
    shard_id: str,
    schema_of: Callable[[pa.Schema], pa.Schema],
    reasons: Mapping[str, str],
    fingerprint: str,
    run_id: str,
    process: Callable[[pa.Table], ShardOutcome] | Callable[[pa.Table, Path], ShardOutcome],
    needs_scratch: bool = False,
    upstream_arrays: tuple[str, ...] = (),
    images_from: str | None = None,
    verify: Verification = "checksum",
    stall_timeout_s: float | None = None,
) -> ShardSummary:
    inputs = _shard_inputs(layout, upstream, shard_id, images_from)
    reused = _reused(layout, stage, shard_id, fingerprint, inputs, verify)
    if reused is not None:
        return reused
    with watching(stage, shard_id, stall_timeout_s):
        table = read_verified_table(layout, upstream, shard_id, inputs["data"])
        output_schema = schema_of(table.schema)
        if images_from is not None:
            images = read_verified_table(
                layout, images_from, shard_id, inputs["images"], ["sample_id", "image"]
            )
            table = with_images(table, images)
        extra: dict[str, object] = {}
        if needs_scratch:
            extra["scratch_dir"] = layout.fresh_scratch(stage, shard_id)
        if upstream_arrays:
            extra["arrays"] = read_arrays(layout, upstream, shard_id, upstream_arrays, rows=table.num_rows)
        outcome = process(table, **extra)
    check_outcome(table.column("sample_id"), outcome, reasons, stage)
    summary = _commit_marked(
        layout,
        stage=stage,
        shard_id=shard_id,
        outcome=outcome,
        output_schema=output_schema,
        run_id=run_id,
        fingerprint=fingerprint,
        inputs=inputs,
    )
    if needs_scratch:
        layout.remove_scratch(stage, shard_id)
    return summary


def split_outcome(outcome: ShardOutcome, sizes: Sequence[int]) -> list[ShardOutcome]:
    """The outcome of consecutive shards' rows decided together, cut back into one per shard: decisions by
    the shards' row counts (they are in input order), survivors and their arrays by how many of each shard's
    rows were kept."""
    kept_flags = pc.equal(outcome.decisions.column("fate"), KEPT)
    parts, start, kept_start = [], 0, 0
    for size in sizes:
        kept = pc.sum(kept_flags.slice(start, size)).as_py() or 0
        parts.append(
            ShardOutcome(
                kept=outcome.kept.slice(kept_start, kept),
                decisions=outcome.decisions.slice(start, size),
                arrays={name: rows[kept_start : kept_start + kept] for name, rows in outcome.arrays.items()},
            )
        )
        start, kept_start = start + size, kept_start + kept
    return parts


def run_shard_batches(
    layout: Layout,
    *,
    stage: str,
    upstream: str,
    shard_ids: Sequence[str],
    schema_of: Callable[[pa.Schema], pa.Schema],
    reasons: Mapping[str, str],
    fingerprint: str,
    run_id: str,
    process: Callable[[pa.Table], ShardOutcome],
    batch_rows: int,
    verify: Verification = "checksum",
    stall_timeout_s: float | None = None,
) -> tuple[list[ShardSummary], dict[str, BaseException]]:
    """A task's shards, with one call of `process` per group of consecutive shards that need it, each group
    about `batch_rows` rows: for a stage whose cost per call is mostly fixed. Each shard is still reused, read,
    committed and marked on its own (steps 1-3 and 6, as run_shard); a group's call and checks (steps 4-5)
    fail all of its shards, and the others go on. `process` must decide rows in input order: its outcome is
    cut back into shards by their row counts. Returns the summaries of the shards done and the errors of the
    others."""
    done: list[ShardSummary] = []
    errors: dict[str, BaseException] = {}
    group: list[tuple[str, dict[str, str], pa.Table]] = []

    def run_group() -> None:
        ids = [shard_id for shard_id, _, _ in group]
        try:
            with watching(stage, ids[0] if len(ids) == 1 else f"{ids[0]} to {ids[-1]}", stall_timeout_s):
                table = pa.concat_tables([table for _, _, table in group])
                outcome = process(table)
            check_outcome(table.column("sample_id"), outcome, reasons, stage)
            if not outcome.decisions.column("sample_id").equals(table.column("sample_id")):
                raise ShardContractError(
                    f"stage {stage!r} decides shards in batches, so its decisions must follow its input order"
                )
            parts = split_outcome(outcome, [table.num_rows for _, _, table in group])
        except Exception as error:  # the group's shards fail together; the task goes on with the next group
            errors.update(dict.fromkeys(ids, error))
            return
        for (shard_id, inputs, shard), part in zip(group, parts, strict=True):
            try:
                done.append(
                    _commit_marked(
                        layout,
                        stage=stage,
                        shard_id=shard_id,
                        outcome=part,
                        output_schema=schema_of(shard.schema),
                        run_id=run_id,
                        fingerprint=fingerprint,
                        inputs=inputs,
                    )
                )
            except Exception as error:
                errors[shard_id] = error

    rows = 0
    manifest = read_manifest(layout, upstream)
    for shard_id in shard_ids:
        try:
            inputs = _shard_inputs(layout, upstream, shard_id, None, manifest)
            reused = _reused(layout, stage, shard_id, fingerprint, inputs, verify)
            if reused is not None:
                done.append(reused)
                continue
            with watching(stage, shard_id, stall_timeout_s):
                table = read_verified_table(layout, upstream, shard_id, inputs["data"])
        except Exception as error:
            errors[shard_id] = error
            continue
        group.append((shard_id, inputs, table))
        rows += table.num_rows
        if rows >= batch_rows:
            run_group()
            group, rows = [], 0
    if group:
        run_group()
    return done, errors


def run_source(
    layout: Layout,
    *,
    stage: str,
    source: str,
    fingerprint: str,
    checksum: str | None,
    outcomes: Callable[[], Iterator[ShardOutcome]],
    schema: pa.Schema,
    reasons: Mapping[str, str],
    run_id: str,
    verify: Verification = "checksum",
    stall_timeout_s: float | None = None,
) -> ShardSummary:
    """Read one source into shards `<source>-00000`, ...; the source is the unit of resume (its marker lists
    its shards and their files), since reading it again is cheap next to everything downstream. A remote
    source (checksum None) is read again every run; its shards still resume downstream when their content
    is unchanged."""
    inputs = {"source": checksum or "remote (re-read every run)"}
    marker = (
        current_marker(layout, stage, source, fingerprint, inputs, verify) if checksum is not None else None
    )
    if marker is not None:
        return ShardSummary(stage, source, skipped=True, counts=total_counts(marker.counts.values()))
    remove_marker(layout, stage, source)
    outputs: dict[str, str] = {}
    counts: dict[str, dict[str, int]] = {}
    files: FileDigests = {}
    with watching(stage, source, stall_timeout_s):
        for index, outcome in enumerate(outcomes()):
            shard_id = shard_name(source, index)
            check_outcome(None, outcome, reasons, stage)
            committed = commit_shard(layout, stage, shard_id, outcome, schema, run_id, fingerprint)
            outputs[shard_id], counts[shard_id] = committed.sha256, committed.counts
            files.update(committed.files)
            heartbeat()
    write_marker(
        layout, Marker(stage, source, fingerprint, inputs, outputs, counts, run_id, now(), files=files)
    )
    return ShardSummary(stage, source, skipped=False, counts=total_counts(counts.values()))


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
    upstreams: tuple[str, ...],
    unit_fingerprints: dict[str, str],
    run_id: str,
    failed_sources: dict[str, str] | None = None,
) -> Manifest:
    """Record that every unit (shard, or source for a source stage) of a stage is done with the fingerprint
    it should have, from their markers. The manifest's fingerprint covers all units' fingerprints, and it
    records what it was built on: the upstream stages and the identity of their manifests now."""
    shards: dict[str, str] = {}
    counts: dict[str, dict[str, int]] = {}
    for unit, fingerprint in sorted(unit_fingerprints.items()):
        marker = read_marker(layout, stage, unit)
        if marker is None or marker.fingerprint != fingerprint:
            raise StageInputError(f"stage {stage!r}: unit {unit!r} is not done with the current config")
        shards.update(marker.outputs)
        counts.update(marker.counts)
    inherited: dict[str, str] = {}
    for upstream in upstreams:
        inherited.update(read_manifest(layout, upstream).failed_sources)
    manifest = Manifest(
        stage=stage,
        fingerprint=hashlib.sha256(json.dumps(sorted(set(unit_fingerprints.values()))).encode()).hexdigest()[
            :16
        ],
        upstream_identity=upstreams_identity(layout, upstreams),
        shards=dict(sorted(shards.items())),
        counts=dict(sorted(counts.items())),
        failed_sources={**inherited, **(failed_sources or {})},
        run_id=run_id,
        finished_at=now(),
        upstreams=list(upstreams),
    )
    write_manifest(layout, manifest)
    remove_durably(layout.started(stage))
    return manifest


Measure = Literal["in", "kept", "dropped"]


@dataclass(frozen=True)
class Report:
    """Which column of RS5M's published tables a stage's count corresponds to, and which count it is."""

    column: str
    measure: Measure


def _no_identity(_config: PipelineConfig) -> dict[str, str]:
    return {}


def _no_preflight(_config: PipelineConfig) -> None:
    return None


def schema_after(input_schema: pa.Schema, adds: tuple[pa.Field, ...], drops: tuple[str, ...]) -> pa.Schema:
    """A stage's output schema: its input's columns (without `drops`, and without columns it re-adds), then
    `adds`. Columns a stage does not know travel on unchanged, so one stage serves datasets of any shape."""
    added = {f.name for f in adds}
    return pa.schema([f for f in input_schema if f.name not in drops and f.name not in added] + list(adds))


@dataclass(frozen=True, kw_only=True)
class Stage:
    """What every stage declares: its name (its folder), the reasons it may drop a sample for, the config
    sections and identity its fingerprint covers, its code version (bump it when the code changes what the
    stage writes: every unit reruns), and the RS5M column it reports. The kinds below add how the stage's
    units are found and run; executors (flows/, tests) use only `upstreams`, `units`, `run_units` (or
    `run_unit`) and `unit_fingerprints`."""

    name: str
    reasons: Mapping[str, str]
    sections: tuple[str, ...]
    code_version: str
    report: Report
    identity: Callable[[PipelineConfig], dict[str, str]] = _no_identity
    # checks before any work that the fingerprint does not make (a model's files can be loaded); raises
    preflight: Callable[[PipelineConfig], None] = _no_preflight
    retries: int = 0  # retries of a unit that failed for a transient reason (tasks/retry.py)
    retry_delays_s: tuple[float, ...] = (2, 10)
    concurrency: Literal["shard_concurrency", "download_concurrency"] = "shard_concurrency"
    # its units start processes from the run process's forkserver (rs5m/forkserver.py): a run that has such a
    # stage starts the server first thing, so that its imports overlap the stages before
    forks_processes: bool = False

    def fingerprint(self, config: PipelineConfig) -> str:
        sections = {name: config.section(name) for name in self.sections}
        return stage_fingerprint(self.name, sections, self.identity(config), self.code_version)

    def upstreams(self, config: PipelineConfig) -> tuple[str, ...]:
        raise NotImplementedError

    def units(self, layout: Layout, config: PipelineConfig) -> list[str]:
        raise NotImplementedError

    def run_unit(self, layout: Layout, unit: str, config: PipelineConfig, run_id: str) -> ShardSummary:
        raise NotImplementedError

    def run_units(
        self, layout: Layout, units: Sequence[str], config: PipelineConfig, run_id: str
    ) -> tuple[list[ShardSummary], dict[str, BaseException]]:
        """A task's units: every one is tried. Returns the summaries of those done and the errors of the
        others (which a rerun redoes)."""
        done: list[ShardSummary] = []
        errors: dict[str, BaseException] = {}
        for unit in units:
            try:
                done.append(self.run_unit(layout, unit, config, run_id))
            except Exception as error:  # the task's other units still run
                errors[unit] = error
        return done, errors

    def unit_fingerprints(self, config: PipelineConfig, units: Iterable[str]) -> dict[str, str]:
        return dict.fromkeys(units, self.fingerprint(config))


@dataclass(frozen=True, kw_only=True)
class SourceStage(Stage):
    """A stage that reads each configured source into shards `<source>-00000`, ... (its units are the
    sources): the first stage of a pipeline. `read` yields one ShardOutcome per shard (decisions for every
    row read, kept rows in `schema`); `checksum` is the content checksum of the source's files, or None for
    a remote source (re-read every run); `source_identity` is what of the source's config changes its rows
    (the path is left out: the checksum covers the content, so moving a file reruns nothing)."""

    schema: pa.Schema
    sources: Callable[[PipelineConfig], Sequence[Any]]  # objects with a `name`
    read: Callable[[Any, PipelineConfig], Iterator[ShardOutcome]]
    checksum: Callable[[Any], str | None]
    source_identity: Callable[[Any], str]

    def upstreams(self, config: PipelineConfig) -> tuple[str, ...]:
        return ()

    def units(self, layout: Layout, config: PipelineConfig) -> list[str]:
        return [source.name for source in self.sources(config)]

    def source(self, config: PipelineConfig, name: str) -> Any:
        return next(s for s in self.sources(config) if s.name == name)

    def source_fingerprint(self, config: PipelineConfig, source: Any) -> str:
        sections = {name: config.section(name) for name in self.sections}
        identity = {**self.identity(config), "source": self.source_identity(source)}
        return stage_fingerprint(self.name, sections, identity, self.code_version)

    def unit_fingerprints(self, config: PipelineConfig, units: Iterable[str]) -> dict[str, str]:
        return {name: self.source_fingerprint(config, self.source(config, name)) for name in units}

    def run_unit(self, layout: Layout, unit: str, config: PipelineConfig, run_id: str) -> ShardSummary:
        source = self.source(config, unit)
        return run_source(
            layout,
            stage=self.name,
            source=unit,
            fingerprint=self.source_fingerprint(config, source),
            checksum=self.checksum(source),
            outcomes=lambda: self.read(source, config),
            schema=self.schema,
            reasons=self.reasons,
            run_id=run_id,
            verify=config.runner.verify,
            stall_timeout_s=config.runner.stall_timeout_s,
        )


@dataclass(frozen=True, kw_only=True)
class ShardStage(Stage):
    """A stage that maps each upstream shard to one shard of its own.

    Its output keeps the input's columns, minus `drops`, plus `adds` (schema_after). `make_processor` turns
    the config into the pure per-shard function once per task (compile a keyword list, load a model), so a
    shard only pays for its own data. `upstream_arrays` names the upstream's per-row arrays (embeddings)
    the function reads. `images_from` names an earlier stage of the pipeline that keeps the image bytes: the
    function then sees its rows with their `image`, which is never written again (images are stored once).
    `batch_rows` (optional, from the config) makes a task call the function once per group of its
    consecutive shards of about that many rows (run_shard_batches), for a function whose cost per call is
    mostly fixed; it then must decide rows in input order.
    """

    upstream: str
    make_processor: Callable[[PipelineConfig], Callable[..., ShardOutcome]]
    adds: tuple[pa.Field, ...] = ()
    drops: tuple[str, ...] = ()
    needs_scratch: bool = False
    upstream_arrays: tuple[str, ...] = ()
    images_from: str | None = None
    batch_rows: Callable[[PipelineConfig], int] | None = None

    def __post_init__(self) -> None:
        if self.batch_rows is not None and (self.needs_scratch or self.upstream_arrays or self.images_from):
            raise ValueError(f"stage {self.name!r}: batch_rows is for a function of the table alone")

    def upstreams(self, config: PipelineConfig) -> tuple[str, ...]:
        return (self.upstream,)

    def units(self, layout: Layout, config: PipelineConfig) -> list[str]:
        manifest = read_manifest(layout, self.upstream)
        if manifest is None:
            raise StageInputError(f"stage {self.upstream!r} is not complete; run it first")
        return list(manifest.shards)

    def run_unit(self, layout: Layout, unit: str, config: PipelineConfig, run_id: str) -> ShardSummary:
        return self.run(layout, unit, config, run_id)

    def run_units(
        self, layout: Layout, units: Sequence[str], config: PipelineConfig, run_id: str
    ) -> tuple[list[ShardSummary], dict[str, BaseException]]:
        if self.batch_rows is None or len(units) < 2:
            return super().run_units(layout, units, config, run_id)
        return run_shard_batches(
            layout,
            stage=self.name,
            upstream=self.upstream,
            shard_ids=units,
            schema_of=lambda schema: schema_after(schema, self.adds, self.drops),
            reasons=self.reasons,
            fingerprint=self.fingerprint(config),
            run_id=run_id,
            process=self.make_processor(config),
            batch_rows=self.batch_rows(config),
            verify=config.runner.verify,
            stall_timeout_s=config.runner.stall_timeout_s,
        )

    def run(self, layout: Layout, shard_id: str, config: PipelineConfig, run_id: str) -> ShardSummary:
        return run_shard(
            layout,
            stage=self.name,
            upstream=self.upstream,
            shard_id=shard_id,
            schema_of=lambda schema: schema_after(schema, self.adds, self.drops),
            reasons=self.reasons,
            fingerprint=self.fingerprint(config),
            run_id=run_id,
            process=self.make_processor(config),
            needs_scratch=self.needs_scratch,
            upstream_arrays=self.upstream_arrays,
            images_from=self.images_from,
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


def _always_published(_layout: Layout, _marker: Marker) -> bool:
    return True


@dataclass(frozen=True, kw_only=True)
class GlobalStage(Stage):
    """A stage that must see every upstream shard at once (dedup, the final dataset) but still writes one
    output shard per upstream shard, so that per-shard stages can follow it. It may read several upstream
    stages (the release reads every data pipeline's last stage): their shard ids are distinct.

    Its single marker records every upstream shard's checksum: a new or changed shard reruns the whole
    stage. `publish` (optional) writes what the stage makes besides its shards (the final dataset); it runs
    after the shards are committed and before the marker, and what it returns goes into the marker.
    `is_published` tells whether what the marker records is still what readers see (the release in place).
    Global stages are not watched for stalls: their searches run in C code that no exception interrupts.
    """

    inputs: Callable[[PipelineConfig], tuple[str, ...]]
    make_processor: Callable[[PipelineConfig], GlobalProcessor]
    adds: tuple[pa.Field, ...] = ()
    drops: tuple[str, ...] = ()
    upstream_arrays: tuple[str, ...] = ()
    publish: Callable[[Layout, PipelineConfig, dict[str, ShardOutcome]], Published] | None = None
    is_published: Callable[[Layout, Marker], bool] = _always_published

    def fingerprint(self, config: PipelineConfig) -> str:
        sections = {name: config.section(name) for name in self.sections}
        identity = {**self.identity(config), "upstreams": ",".join(self.upstreams(config))}
        return stage_fingerprint(self.name, sections, identity, self.code_version)

    def upstreams(self, config: PipelineConfig) -> tuple[str, ...]:
        return self.inputs(config)

    def units(self, layout: Layout, config: PipelineConfig) -> list[str]:
        return [GLOBAL_UNIT]

    def run_unit(self, layout: Layout, unit: str, config: PipelineConfig, run_id: str) -> ShardSummary:
        return self.run(layout, config, run_id)

    def upstream_shards(self, layout: Layout, config: PipelineConfig) -> dict[str, tuple[str, str]]:
        """shard id -> (upstream stage, checksum), over every upstream."""
        shards: dict[str, tuple[str, str]] = {}
        for upstream in self.upstreams(config):
            manifest = read_manifest(layout, upstream)
            if manifest is None:
                raise StageInputError(f"stage {upstream!r} is not complete; run it first")
            for shard, checksum in manifest.shards.items():
                if shard in shards:
                    raise StageInputError(
                        f"shard {shard!r} comes from both {shards[shard][0]!r} and {upstream!r}: source names "
                        "must be unique across pipelines"
                    )
                shards[shard] = (upstream, checksum)
        return shards

    def run(self, layout: Layout, config: PipelineConfig, run_id: str) -> ShardSummary:
        sources = self.upstream_shards(layout, config)
        inputs = {shard: checksum for shard, (_, checksum) in sorted(sources.items())}
        fingerprint = self.fingerprint(config)
        verify = config.runner.verify
        marker = current_marker(layout, self.name, GLOBAL_UNIT, fingerprint, inputs, verify)
        if marker is not None and self.is_published(layout, marker):
            return ShardSummary(
                self.name, GLOBAL_UNIT, skipped=True, counts=total_counts(marker.counts.values())
            )
        remove_marker(layout, self.name, GLOBAL_UNIT)
        tables = {
            shard: read_verified_table(layout, upstream, shard, checksum)
            for shard, (upstream, checksum) in sorted(sources.items())
        }
        arrays = {
            shard: read_arrays(layout, sources[shard][0], shard, self.upstream_arrays, rows=table.num_rows)
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
            schema = schema_after(tables[shard].schema, self.adds, self.drops)
            committed = commit_shard(layout, self.name, shard, outcomes[shard], schema, run_id, fingerprint)
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
