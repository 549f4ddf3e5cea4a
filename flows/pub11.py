"""PUB11 flows: one flow per stage, each mapping one task over the stage's units (shards, or sources for
ingest), and the parent flow `pub11` that chains them and publishes the funnel as Prefect artifacts.

Flows pass the config, shard ids and the work directory; the data stays in Parquet under the work
directory. A stage's shards are independent, so a failed shard fails its stage only after the others
have finished and committed; the rerun then redoes just the missing shards.
"""

from __future__ import annotations

import os
import socket
from typing import Any
from uuid import UUID

from prefect import flow, get_run_logger, unmapped
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run
from prefect.states import Failed
from prefect.task_runners import ThreadPoolTaskRunner

from flows.run_control import ActiveRun, entered_stage, stoppable
from rs5m.config import PipelineConfig
from rs5m.report import FunnelReport, funnel_markdown, funnel_table_rows, load_funnel
from storage.catalog import COMPLETE, stage_states
from storage.layout import Layout
from storage.lock import workdir_lock
from storage.markers import read_manifest
from storage.runs import COMPLETED, FAILED, RUNNING, close_abandoned_runs, write_run_record
from tasks import decontaminate, dedup, download, embed, ingest, keyword, shard, validate
from tasks.filter import FILTER, filter_task
from tasks.harness import (
    GLOBAL_UNIT,
    GlobalStage,
    ShardStage,
    ShardSummary,
    StageInputError,
    begin_stage,
    complete_stage,
    fail_stage,
    now,
)
from tasks.pipeline import STAGE_ORDER, check_config, refresh_pub11_catalog


class StageFailed(RuntimeError):
    """Some units of a stage failed; the others are committed and a rerun resumes."""


def _run_id(run_id: str | None) -> str:
    return run_id or str(flow_run.get_id() or "local")


def _begin_stage(layout: Layout, stage: str, run_id: str) -> None:
    """The stage is about to rewrite its files: mark it running and rebuild the catalog, so that readers
    (and a killed run's work directory) show it and every later stage as not complete until it ends."""
    stage_run_id = flow_run.get_id()
    entered_stage(stage, UUID(str(stage_run_id)) if stage_run_id else None)
    begin_stage(layout, stage, run_id)
    refresh_pub11_catalog(layout)


def _fail_stage(layout: Layout, stage: str, run_id: str, error: BaseException) -> None:
    fail_stage(layout, stage, run_id, str(error))
    refresh_pub11_catalog(layout)


def _collect(units: list[str], futures: Any) -> tuple[list[ShardSummary], dict[str, str]]:
    """Wait for every unit's task; the summaries of those that completed, and unit -> error for the rest."""
    futures.wait()
    summaries: list[ShardSummary] = []
    failed: dict[str, str] = {}
    for unit, future in zip(units, futures, strict=True):
        if future.state.is_completed():
            summaries.append(future.result())
        else:
            failed[unit] = future.state.message or "failed"
            get_run_logger().error("%s failed: %s", unit, failed[unit])
    return summaries, failed


def _stage_result(stage: str, summaries: list[ShardSummary], failed: dict[str, str]) -> dict[str, Any]:
    return {
        "stage": stage,
        "units": len(summaries),
        "skipped": sum(s.skipped for s in summaries),
        "failed": failed,
    }


@flow(name="ingest", log_prints=True)
def ingest_flow(config: PipelineConfig, run_id: str | None = None) -> dict[str, Any]:
    """Read every source into ingest shards; a source that cannot be read fails alone."""
    layout, run_id = Layout(config.workdir), _run_id(run_id)
    with workdir_lock(layout, run_id):
        _begin_stage(layout, "ingest", run_id)
        futures = ingest.ingest_task.map(
            workdir=unmapped(str(layout.root)),
            source=config.sources,
            config=unmapped(config.ingest),
            runner=unmapped(config.runner),
            run_id=unmapped(run_id),
        )
        summaries, failed = _collect([s.name for s in config.sources], futures)
        return _complete_ingest(layout, config, run_id, summaries, failed)


def _complete_ingest(
    layout: Layout,
    config: PipelineConfig,
    run_id: str,
    summaries: list[ShardSummary],
    failed: dict[str, str],
) -> dict[str, Any]:
    complete_stage(
        layout,
        stage="ingest",
        upstream=None,
        unit_fingerprints={
            s.name: ingest.ingest_fingerprint(config.ingest, s)
            for s in config.sources
            if s.name not in failed
        },
        run_id=run_id,
        failed_sources=failed,
    )
    refresh_pub11_catalog(layout)
    return _stage_result("ingest", summaries, failed)


def _require_upstream(layout: Layout, stage: ShardStage | GlobalStage) -> None:
    states = {s.stage: s.status for s in stage_states(layout, STAGE_ORDER)}
    if states[stage.upstream] != COMPLETE:
        raise StageInputError(
            f"stage {stage.name!r} reads stage {stage.upstream!r}, which is {states[stage.upstream]}; "
            f"run {stage.upstream!r} first (or the whole pipeline)"
        )


def _run_shard_stage(
    stage: ShardStage, task: Any, config: PipelineConfig, run_id: str | None
) -> dict[str, Any]:
    layout, run_id = Layout(config.workdir), _run_id(run_id)
    with workdir_lock(layout, run_id):
        _require_upstream(layout, stage)
        shard_ids = list(read_manifest(layout, stage.upstream).shards)
        _begin_stage(layout, stage.name, run_id)
        futures = task.map(
            workdir=unmapped(str(layout.root)),
            shard_id=shard_ids,
            config=unmapped(config),
            run_id=unmapped(run_id),
        )
        summaries, failed = _collect(shard_ids, futures)
        if failed:
            error = StageFailed(
                f"stage {stage.name!r}: {len(failed)} of {len(shard_ids)} shards failed "
                f"({', '.join(sorted(failed)[:5])}...); the others are committed, rerun to resume: "
                + "; ".join(f"{k}: {v}" for k, v in sorted(failed.items())[:3])
            )
            _fail_stage(layout, stage.name, run_id, error)
            raise error
        complete_stage(
            layout,
            stage=stage.name,
            upstream=stage.upstream,
            unit_fingerprints=dict.fromkeys(shard_ids, stage.fingerprint(config)),
            run_id=run_id,
        )
        refresh_pub11_catalog(layout)
        return _stage_result(stage.name, summaries, failed)


def _run_global_stage(
    stage: GlobalStage, task: Any, config: PipelineConfig, run_id: str | None
) -> dict[str, Any]:
    """One task over all shards (the stage needs them together); a new or changed shard reruns it whole."""
    layout, run_id = Layout(config.workdir), _run_id(run_id)
    with workdir_lock(layout, run_id):
        _require_upstream(layout, stage)
        _begin_stage(layout, stage.name, run_id)
        try:
            summary = task(workdir=str(layout.root), config=config, run_id=run_id)
        except Exception as error:
            _fail_stage(layout, stage.name, run_id, error)
            raise
        complete_stage(
            layout,
            stage=stage.name,
            upstream=stage.upstream,
            unit_fingerprints={GLOBAL_UNIT: stage.fingerprint(config)},
            run_id=run_id,
        )
        refresh_pub11_catalog(layout)
        return _stage_result(stage.name, [summary], {})


@flow(name="keyword", log_prints=True)
def keyword_flow(config: PipelineConfig, run_id: str | None = None) -> dict[str, Any]:
    """RS keyword filter over every ingest shard."""
    return _run_shard_stage(keyword.KEYWORD, keyword.keyword_task, config, run_id)


@flow(name="download", log_prints=True)
def download_flow(config: PipelineConfig, run_id: str | None = None) -> dict[str, Any]:
    """img2dataset over every keyword shard (each shard already runs processes x threads)."""
    return _run_shard_stage(download.DOWNLOAD, download.download_task, config, run_id)


@flow(name="validate", log_prints=True)
def validate_flow(config: PipelineConfig, run_id: str | None = None) -> dict[str, Any]:
    """Header checks, then full decode, of every downloaded image."""
    return _run_shard_stage(validate.VALIDATE, validate.validate_task, config, run_id)


@flow(name="embed", log_prints=True)
def embed_flow(config: PipelineConfig, run_id: str | None = None) -> dict[str, Any]:
    """CLIP image and caption embeddings and perceptual hashes of every validated image."""
    return _run_shard_stage(embed.EMBED, embed.embed_task, config, run_id)


@flow(name="filter", log_prints=True)
def filter_flow(config: PipelineConfig, run_id: str | None = None) -> dict[str, Any]:
    """clip_score and rs_score thresholds (scores from the stored embeddings: no model pass over images)."""
    return _run_shard_stage(FILTER, filter_task, config, run_id)


@flow(name="dedup", log_prints=True)
def dedup_flow(config: PipelineConfig, run_id: str | None = None) -> dict[str, Any]:
    """Exact, perceptual and embedding near-duplicates across all shards; the best clip_score is kept."""
    return _run_global_stage(dedup.DEDUP, dedup.dedup_task, config, run_id)


@flow(name="decontaminate", log_prints=True)
def decontaminate_flow(config: PipelineConfig, run_id: str | None = None) -> dict[str, Any]:
    """Drop training samples that near-copy an image of a configured evaluation set."""
    return _run_shard_stage(decontaminate.DECONTAMINATE, decontaminate.decontaminate_task, config, run_id)


@flow(name="shard", log_prints=True)
def shard_flow(config: PipelineConfig, run_id: str | None = None) -> dict[str, Any]:
    """The released dataset: Parquet shards (and optionally WebDataset tars), split and manifest."""
    return _run_global_stage(shard.SHARD, shard.shard_task, config, run_id)


STAGE_FLOWS = {
    "ingest": ingest_flow,
    "keyword": keyword_flow,
    "download": download_flow,
    "validate": validate_flow,
    "embed": embed_flow,
    "filter": filter_flow,
    "dedup": dedup_flow,
    "decontaminate": decontaminate_flow,
    "shard": shard_flow,
}


def _with_runner(stage: str, config: PipelineConfig):
    workers = config.runner.download_concurrency if stage == "download" else config.runner.shard_concurrency
    return STAGE_FLOWS[stage].with_options(task_runner=ThreadPoolTaskRunner(max_workers=workers))


def publish_funnel(report: FunnelReport, workdir: str) -> None:
    create_table_artifact(
        key="pub11-funnel", table=funnel_table_rows(report), description="PUB11 funnel per stage and source"
    )
    create_markdown_artifact(
        key="pub11-summary", markdown=funnel_markdown(report, workdir), description="PUB11 run summary"
    )
    if report.eval_overlap:
        create_table_artifact(
            key="pub11-eval-overlap",
            table=[{"eval_set": name, "contaminated": n} for name, n in report.eval_overlap.items()],
            description="Training samples dropped as near-copies of evaluation images, per evaluation set",
        )


@flow(name="pub11", log_prints=True)
def pub11_flow(config: PipelineConfig, stages: list[str] | None = None, wait_for_lock: bool = False):
    """The PUB11 pipeline: ingest -> keyword -> download -> validate -> embed -> filter -> dedup ->
    decontaminate -> shard (or the listed stages, in order). One writer per work directory: a second run
    fails at once naming the first (or, with wait_for_lock, waits for it)."""
    check_config(config, stages)  # deployments and API-triggered runs fail here too, before any work
    layout, run_id = Layout(config.workdir), _run_id(None)
    selected = [s for s in STAGE_ORDER if stages is None or s in stages]
    with workdir_lock(layout, run_id, wait=wait_for_lock, on_wait=print):
        close_abandoned_runs(layout, run_id)
        record: dict[str, Any] = {
            "started_at": now(),
            "stages": selected,
            "config": config.model_dump(mode="json"),
            "host": socket.gethostname(),
            "pid": os.getpid(),
        }
        write_run_record(layout, run_id, {**record, "status": RUNNING})
        results = []
        parent = [UUID(run_id)] if flow_run.get_id() else []
        with stoppable(ActiveRun(layout, run_id, record, parent)):
            try:
                for stage in selected:
                    results.append(_with_runner(stage, config)(config=config, run_id=run_id))
            except Exception as error:
                write_run_record(
                    layout,
                    run_id,
                    {
                        **record,
                        "status": FAILED,
                        "error": str(error),
                        "results": results,
                        "finished_at": now(),
                    },
                )
                raise
        report = load_funnel(layout)
        publish_funnel(report, str(layout.root))
        print(funnel_markdown(report, str(layout.root)))
        failed_sources = report.failed_sources
        status = FAILED if failed_sources else COMPLETED
        write_run_record(
            layout, run_id, {**record, "status": status, "finished_at": now(), "results": results}
        )
    if failed_sources:
        return Failed(
            message="sources failed and were skipped (the others completed): "
            + "; ".join(f"{name}: {error}" for name, error in sorted(failed_sources.items()))
        )
    return results
