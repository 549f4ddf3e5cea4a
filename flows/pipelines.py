"""The parent flows, derived from the pipelines of tasks/pipeline.py: `rs5m` runs every pipeline the config
has (PUB11 for web `sources:`, RS3 for `rs3:`) and then the release over their union; `pub11`, `rs3` and
`release` run one pipeline each (for deployments that schedule them apart). Each chains the stage flows of
flows/stages.py, holds the work directory's writer lock, keeps the run record, ends cleanly on SIGINT and
SIGTERM (flows/run_control.py), and publishes the funnel as Prefect artifacts.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Collection
from typing import Any
from uuid import UUID

from prefect import Flow, flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run
from prefect.settings import temporary_settings
from prefect.states import Failed

from flows.run_control import ActiveRun, stoppable
from flows.stages import run_id_or_flow_run, stage_flow_for
from rs5m import forkserver
from rs5m.caption_quality import quality_artifact_rows
from rs5m.config import PipelineConfig, as_pipeline_config
from rs5m.figures import report_markdown, report_sections
from rs5m.report import FunnelReport, funnel_markdown, funnel_table_rows, load_funnel
from storage.layout import Layout
from storage.lock import workdir_lock
from storage.runs import COMPLETED, FAILED, RUNNING, close_abandoned_runs, write_run_record
from tasks.harness import now
from tasks.pipeline import PIPELINES, RELEASE, Pipeline, check_config, selected_stages


def report_markdown_for(report: FunnelReport, workdir: str) -> str:
    """The pictures report (rs5m/figures.py); a figure that cannot be drawn leaves a line saying why, not a
    failed run: the data is complete by now."""
    try:
        return report_markdown(report_sections(Layout(workdir), report), workdir)
    except Exception as error:
        get_run_logger().exception("the pictures report failed")
        return f"# RS5M report\n\nThe pictures could not be made: {type(error).__name__}: {error}"


def publish_funnel(report: FunnelReport, workdir: str) -> None:
    create_table_artifact(
        key="rs5m-funnel", table=funnel_table_rows(report), description="Funnel per stage and source"
    )
    create_markdown_artifact(
        key="rs5m-summary", markdown=funnel_markdown(report, workdir), description="Run summary"
    )
    create_markdown_artifact(
        key="rs5m-report",
        markdown=report_markdown_for(report, workdir),
        description="Run report with pictures",
    )
    if report.eval_overlap:
        create_table_artifact(
            key="rs5m-eval-overlap",
            table=[{"eval_set": name, "contaminated": n} for name, n in report.eval_overlap.items()],
            description="Training samples dropped as near-copies of evaluation images, per evaluation set",
        )
    if report.caption_quality:
        create_table_artifact(
            key="rs5m-caption-quality",
            table=quality_artifact_rows(report.caption_quality),
            description="RS3 model captions per source: duplicates, length, orientation words, CLIP score",
        )


def run_pipelines(
    config: PipelineConfig,
    pipelines: Collection[str] | None,
    stages: Collection[str] | None,
    wait_for_lock: bool,
) -> Any:
    """The selected stages of the selected pipelines, in order, as one run of the work directory."""
    check_config(
        config, stages, pipelines
    )  # deployments and API-triggered runs fail here too, before any work
    layout, run_id = Layout(config.workdir), run_id_or_flow_run(None)
    selected = selected_stages(config, pipelines, stages)
    if any(stage.forks_processes for stage in selected):
        forkserver.start()
    with workdir_lock(layout, run_id, wait=wait_for_lock, on_wait=print):
        close_abandoned_runs(layout, run_id)
        record: dict[str, Any] = {
            "started_at": now(),
            "pipelines": sorted(pipelines) if pipelines else None,
            "stages": [stage.name for stage in selected],
            "config": config.model_dump(mode="json"),
            "host": socket.gethostname(),
            "pid": os.getpid(),
        }
        write_run_record(layout, run_id, {**record, "status": RUNNING})
        results = []
        parent = [UUID(run_id)] if flow_run.get_id() else []
        with stoppable(ActiveRun(layout, run_id, record, parent)):
            try:
                # A stage flow runs in this flow's process, which sends the run's heartbeats (Prefect's
                # detection of crashed runs); one more heartbeat thread per stage flow would add up to a
                # second to every stage, as Prefect joins it out of a 1 s sleep when the flow ends.
                with temporary_settings(updates={"flows.heartbeat_frequency": None}):
                    for stage in selected:
                        results.append(stage_flow_for(stage, config)(config=config, run_id=run_id))
                report = load_funnel(layout)
                publish_funnel(report, str(layout.root))
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


@flow(name="rs5m", log_prints=True)
def rs5m_flow(
    config: PipelineConfig | str,
    pipelines: list[str] | None = None,
    stages: list[str] | None = None,
    wait_for_lock: bool = False,
) -> Any:
    """Every pipeline the config has (PUB11 for web `sources:`, RS3 for `rs3:`; `pipelines` restricts the
    data pipelines), then the release over all of them; or only the listed `stages`. `config` is the config
    or a config file's path. One writer per work directory: a second run fails at once naming the first (or,
    with wait_for_lock, waits for it)."""
    return run_pipelines(as_pipeline_config(config), pipelines, stages, wait_for_lock)


def _pipeline_flow(pipeline: Pipeline) -> Flow:
    stage_names = ", ".join(pipeline.stage_names)

    @flow(name=pipeline.name, log_prints=True, description=f"The {pipeline.name} stages: {stage_names}")
    def pipeline_flow(
        config: PipelineConfig | str, stages: list[str] | None = None, wait_for_lock: bool = False
    ) -> Any:
        chosen = set(stages) if stages else set(pipeline.stage_names)
        names = [name for name in pipeline.stage_names if name in chosen]
        # the release belongs to every selection: pass the data pipeline's name, then keep only its stages
        selected = [pipeline.name] if pipeline is not RELEASE else []
        return run_pipelines(as_pipeline_config(config), selected, names, wait_for_lock)

    return pipeline_flow


PIPELINE_FLOWS: dict[str, Flow] = {pipeline.name: _pipeline_flow(pipeline) for pipeline in PIPELINES}
# module attributes, for deployment entrypoints (prefect.yaml: flows/pipelines.py:pub11_flow)
pub11_flow = PIPELINE_FLOWS["pub11"]
rs3_flow = PIPELINE_FLOWS["rs3"]
release_flow = PIPELINE_FLOWS["release"]
