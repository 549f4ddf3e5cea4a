"""One Prefect flow per stage, generated from the stage objects of tasks/pipeline.py: each maps one task over
the stage's units (its sources, its upstream's shards, or the single unit of a global stage), or over
batches of consecutive units past `runner.max_tasks_per_stage`, then records the stage complete. The Prefect
server sees at most that many task runs per stage, never one per sample; flows pass the config, unit ids and
the work directory, and the data stays in Parquet.

Units are independent: a failed unit fails its stage only after the others have committed, and the rerun
redoes just the missing ones. A source that cannot be read (a source stage's unit) fails alone: the stage
completes without it, the run ends Failed naming it, and a rerun picks it up.
"""

from __future__ import annotations

import time
from itertools import pairwise
from typing import Any, TextIO
from uuid import UUID

from prefect import Flow, flow, get_run_logger, task, unmapped
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect.runtime import flow_run, task_run
from prefect.task_runners import ThreadPoolTaskRunner

from flows.progress_line import ProgressLine
from flows.run_control import entered_stage
from rs5m.config import PipelineConfig
from storage.catalog import COMPLETE, stage_states
from storage.layout import Layout
from storage.lock import workdir_lock
from tasks.harness import (
    ShardSummary,
    SourceStage,
    Stage,
    StageInputError,
    begin_stage,
    complete_stage,
    fail_stage,
)
from tasks.pipeline import STAGES, refresh_workdir_catalog, workdir_stage_order
from tasks.retry import UnitsFailed, retry_if_transient


class StageFailed(RuntimeError):
    """Some units of a stage failed; the others are committed and a rerun resumes."""


def run_id_or_flow_run(run_id: str | None) -> str:
    return run_id or str(flow_run.get_id() or "local")


def _batch_run_name() -> str:
    parameters = task_run.parameters
    units = parameters["units"]
    return f"{parameters['stage']}-{units[0]}" + (f"-to-{units[-1]}" if len(units) > 1 else "")


@task(task_run_name=_batch_run_name, cache_policy=NO_CACHE)
def run_units(
    workdir: str, stage: str, units: list[str], config: PipelineConfig, run_id: str
) -> list[ShardSummary]:
    """Units of one stage through the stage object's plain code (tasks/). Every unit is tried; those that
    failed are raised together after the others committed."""
    done, errors = STAGES[stage].run_units(Layout(workdir), units, config, run_id)
    if errors:
        raise UnitsFailed(errors, done)
    return done


def _units_task(stage: Stage) -> Any:
    return run_units.with_options(
        name=f"{stage.name}-units",
        retries=stage.retries,
        retry_delay_seconds=list(stage.retry_delays_s),
        retry_condition_fn=retry_if_transient if stage.retries else None,
    )


UNITS_TASKS = {name: _units_task(stage) for name, stage in STAGES.items()}


def unit_batches(units: list[str], most: int) -> list[list[str]]:
    """The units in at most `most` batches of consecutive units, as even as can be (one unit each when they are
    no more than `most`)."""
    count = min(len(units), most)
    size, extra = divmod(len(units), count) if count else (0, 0)
    starts = [i * size + min(i, extra) for i in range(count + 1)]
    return [units[a:b] for a, b in pairwise(starts)]


class StageProgress:
    """A stage run's progress, moved as its units finish: units done of total, how many were reused (current
    markers) and how many ran, and rows/s of those. Shown in two places from this one count: the run's
    progress artifact in the Prefect UI (key rs5m-progress-<stage>), and the terminal (flows/progress_line.py:
    a live line while the stage runs, one plain line when it ends)."""

    # Each artifact update is a round trip to the Prefect server: per unit, a stage of thousands of shards
    # (or of reused ones, done in milliseconds) would spend more time reporting than working.
    ARTIFACT_INTERVAL_S = 2.0

    def __init__(self, stage: str, total: int, terminal: TextIO | None = None) -> None:
        self.stage, self.total = stage, total
        self.done = self.reused = self.rows = 0
        self.line = ProgressLine(self._description(0.0), total, terminal)
        self.artifact_id = create_progress_artifact(
            progress=self._percent(),
            key=f"rs5m-progress-{stage.replace('_', '-')}",
            description=self.describe(),
        )
        self.artifact_updated = time.monotonic()

    def __enter__(self) -> StageProgress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.finish()

    def unit_finished(self, summary: ShardSummary | None) -> None:
        self.done += 1
        if summary is not None and summary.skipped:
            self.reused += 1
        elif summary is not None:
            self.rows += sum(summary.counts.values())
        now = time.monotonic()
        if self.done == self.total or now - self.artifact_updated >= self.ARTIFACT_INTERVAL_S:
            update_progress_artifact(self.artifact_id, progress=self._percent(), description=self.describe())
            self.artifact_updated = now
        self.line.update(self.done, self.describe())

    def finish(self) -> None:
        self.line.finish(self.describe())

    def describe(self) -> str:
        return self._description(self.line.elapsed())

    def _description(self, elapsed: float) -> str:
        ran = self.done - self.reused
        text = f"{self.stage}: {self.done} of {self.total} units ({self.reused} reused, {ran} run)"
        if self.rows:
            text += f", {self.rows / max(elapsed, 1e-9):,.0f} rows/s"
        return text

    def _percent(self) -> float:
        return 100.0 * self.done / self.total if self.total else 100.0


def _collect(stage: str, batches: list[list[str]], futures: Any) -> tuple[list[ShardSummary], dict[str, str]]:
    """Wait for every batch's task, moving the stage's progress as each ends; the summaries of the units
    that completed, and unit -> error for the rest."""
    batch_of = {id(future): batch for batch, future in zip(batches, futures, strict=True)}
    summaries: list[ShardSummary] = []
    failed: dict[str, str] = {}
    with StageProgress(stage, sum(len(batch) for batch in batches)) as progress:
        for future in as_completed(list(futures)):
            future.wait()  # as_completed can yield before the future's Prefect state is final
            batch = batch_of[id(future)]
            if future.state.is_completed():
                done, errors = future.result(), {}
            else:
                error = future.result(raise_on_failure=False)
                if isinstance(error, UnitsFailed):
                    done, errors = error.done, error.messages()
                else:  # the task itself failed (crashed or cancelled): none of its units is known done
                    done, errors = [], dict.fromkeys(batch, future.state.message or "failed")
                for unit, message in errors.items():
                    get_run_logger().error("%s failed: %s", unit, message)
            summaries.extend(done)
            failed.update(errors)
            for summary in done:
                progress.unit_finished(summary)
            for _ in range(len(batch) - len(done)):
                progress.unit_finished(None)
    return summaries, failed


def _require_upstreams(layout: Layout, stage: Stage, config: PipelineConfig) -> None:
    order = list(dict.fromkeys([*workdir_stage_order(layout), *stage.upstreams(config)]))
    states = {s.stage: s.status for s in stage_states(layout, order)}
    for upstream in stage.upstreams(config):
        if states[upstream] != COMPLETE:
            raise StageInputError(
                f"stage {stage.name!r} reads stage {upstream!r}, which is {states[upstream].replace('_', ' ')}; "
                f"run {upstream!r} first (or the whole pipeline)"
            )


def run_stage(stage: Stage, config: PipelineConfig, run_id: str | None) -> dict[str, Any]:
    """Run every unit of the stage, then record it complete (or failed, keeping what committed)."""
    layout, run_id = Layout(config.workdir), run_id_or_flow_run(run_id)
    with workdir_lock(layout, run_id):
        _require_upstreams(layout, stage, config)
        units = stage.units(layout, config)
        stage_run_id = flow_run.get_id()
        entered_stage(stage.name, UUID(str(stage_run_id)) if stage_run_id else None)
        # from here until complete_stage, readers (and a killed run's work directory) show the stage and
        # every later one as not complete
        begin_stage(layout, stage.name, run_id)
        refresh_workdir_catalog(layout)
        # a task per unit, or per batch of units past runner.max_tasks_per_stage: the Prefect server slows
        # down at thousands of task runs
        batches = unit_batches(units, config.runner.max_tasks_per_stage)
        futures = UNITS_TASKS[stage.name].map(
            workdir=unmapped(str(layout.root)),
            stage=unmapped(stage.name),
            units=batches,
            config=unmapped(config),
            run_id=unmapped(run_id),
        )
        summaries, failed = _collect(stage.name, batches, futures)
        failed_sources = failed if isinstance(stage, SourceStage) else {}
        if failed and not failed_sources:
            error = StageFailed(
                f"stage {stage.name!r}: {len(failed)} of {len(units)} units failed "
                f"({', '.join(sorted(failed)[:5])}...); the others are committed, rerun to resume: "
                + "; ".join(f"{k}: {v}" for k, v in sorted(failed.items())[:3])
            )
            fail_stage(layout, stage.name, run_id, str(error))
            refresh_workdir_catalog(layout)
            raise error
        complete_stage(
            layout,
            stage=stage.name,
            upstreams=stage.upstreams(config),
            unit_fingerprints=stage.unit_fingerprints(config, [u for u in units if u not in failed_sources]),
            run_id=run_id,
            failed_sources=failed_sources,
        )
        refresh_workdir_catalog(layout)
        return {
            "stage": stage.name,
            "units": len(summaries),
            "skipped": sum(s.skipped for s in summaries),
            "failed": failed,
        }


def _stage_flow(stage: Stage) -> Flow:
    @flow(name=stage.name, log_prints=True, description=f"Stage {stage.name}: {stage.report.column}")
    def stage_flow(config: PipelineConfig, run_id: str | None = None) -> dict[str, Any]:
        return run_stage(stage, config, run_id)

    return stage_flow


STAGE_FLOWS: dict[str, Flow] = {name: _stage_flow(stage) for name, stage in STAGES.items()}


def stage_flow_for(stage: Stage, config: PipelineConfig) -> Flow:
    """The stage's flow with as many threads as the runner config allows it units at once."""
    workers = getattr(config.runner, stage.concurrency)
    return STAGE_FLOWS[stage.name].with_options(task_runner=ThreadPoolTaskRunner(max_workers=workers))
