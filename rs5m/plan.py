"""`rs5m run CONFIG --dry-run`: what a run would do, without running anything, taking the lock or writing.

For each selected stage, in run order: its units (the sources of a first stage, its upstream's shards, the
one unit of a global stage), how many are current (a marker with the stage's fingerprint now, the inputs the
upstream has now, and every file it records still there with its size), and how many would run, with why.
A stage reading an upstream that has no output yet cannot be planned unit by unit: its units are known once
the upstream has run. When an upstream has units to run, its output may change and then more of the stage
runs than counted here ("may be more").

Files are checked by size, not by checksum (the run's `runner.verify: checksum` also reads them all), so a
file damaged in place with its size unchanged shows as current here and reruns in the run. Computing the
fingerprints resolves the models, as the run's own check does (hub weights may be downloaded to their
cache); nothing is written in the work directory.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection
from dataclasses import asdict, dataclass, field
from typing import Any

from rs5m.config import PipelineConfig
from rs5m.terminal import TEXT_WIDTH, table, wrapped
from storage.catalog import COMPLETE, stage_states
from storage.layout import Layout
from storage.markers import GLOBAL_UNIT, Marker, damaged_file, read_manifest, read_marker
from tasks.harness import GlobalStage, ShardStage, SourceStage, Stage, StageInputError
from tasks.pipeline import PIPELINE_OF, selected_stages, workdir_stage_order

NOT_DONE = "not done yet"
CHANGED_CONFIG = "config or code changed"
CHANGED_INPUT = "its input changed"
DAMAGED = "files missing or changed"
NOT_PUBLISHED = "its release is not in place"
REMOTE = "remote source (read again every run)"
UNREADABLE = "source cannot be read now"


@dataclass
class StagePlan:
    stage: str
    pipeline: str
    units: int | None  # None: known once an upstream without output yet has run
    current: int
    to_run: int | None
    why: dict[str, int] = field(default_factory=dict)  # reason -> units that would run for it
    note: str | None = None


def _why_not_current(
    layout: Layout, marker: Marker | None, fingerprint: str, inputs: dict[str, str]
) -> str | None:
    """Why a unit would run (None: it is current and would be skipped)."""
    if marker is None:
        return NOT_DONE
    if marker.fingerprint != fingerprint:
        return CHANGED_CONFIG
    if marker.inputs != inputs:
        return CHANGED_INPUT
    if not marker.files or damaged_file(layout, marker.files, "size") is not None:
        return DAMAGED
    return None


def _unit_reasons(layout: Layout, stage: Stage, config: PipelineConfig) -> list[str | None]:
    """Per unit of the stage: why it would run, or None. StageInputError when an upstream has no output."""
    if isinstance(stage, SourceStage):
        reasons: list[str | None] = []
        for source in stage.sources(config):
            try:
                checksum = stage.checksum(source)
            except (OSError, ValueError):
                reasons.append(UNREADABLE)
                continue
            if checksum is None:
                reasons.append(REMOTE)
                continue
            marker = read_marker(layout, stage.name, source.name)
            fingerprint = stage.source_fingerprint(config, source)
            reasons.append(_why_not_current(layout, marker, fingerprint, {"source": checksum}))
        return reasons
    fingerprint = stage.fingerprint(config)
    if isinstance(stage, GlobalStage):
        shards = stage.upstream_shards(layout, config)  # StageInputError when an upstream has no manifest
        inputs = {shard: checksum for shard, (_, checksum) in sorted(shards.items())}
        marker = read_marker(layout, stage.name, GLOBAL_UNIT)
        why = _why_not_current(layout, marker, fingerprint, inputs)
        if why is None and not stage.is_published(layout, marker):
            why = NOT_PUBLISHED
        return [why]
    if isinstance(stage, ShardStage):
        upstream = read_manifest(layout, stage.upstream)
        images = read_manifest(layout, stage.images_from) if stage.images_from else None
        if upstream is None or (stage.images_from and images is None):
            missing = stage.upstream if upstream is None else stage.images_from
            raise StageInputError(f"stage {missing!r} has no output yet")
        reasons = []
        for shard, checksum in upstream.shards.items():
            inputs = {"data": checksum}
            if images is not None:
                inputs["images"] = images.shards.get(shard, "")
            reasons.append(
                _why_not_current(layout, read_marker(layout, stage.name, shard), fingerprint, inputs)
            )
        return reasons
    raise TypeError(f"stage {stage.name!r}: unknown kind {type(stage).__name__}")


def plan_run(
    config: PipelineConfig, pipelines: Collection[str] | None = None, stages: Collection[str] | None = None
) -> list[StagePlan]:
    """The plan of `rs5m run` with these selections (module docstring); reads only."""
    layout = Layout(config.workdir)
    selected = selected_stages(config, pipelines, stages)
    names = [stage.name for stage in selected]
    order = list(dict.fromkeys([*workdir_stage_order(layout), *names]))
    status = {state.stage: state.status for state in stage_states(layout, order)}
    plans: dict[str, StagePlan] = {}
    for stage in selected:
        upstreams = stage.upstreams(config)
        plan = StagePlan(stage.name, PIPELINE_OF[stage.name], None, 0, None)
        plans[stage.name] = plan
        unready = [u for u in upstreams if u not in plans and status.get(u) != COMPLETE]
        if unready:  # not selected and not complete: the run stops here (flows/stages.py)
            plan.note = (
                f"the run would fail here: it reads {', '.join(unready)}, which is "
                f"{' / '.join(status.get(u, 'not_run').replace('_', ' ') for u in unready)}; "
                "select it too, or run the whole pipeline"
            )
            continue
        try:
            reasons = _unit_reasons(layout, stage, config)
        except StageInputError:
            waits = [u for u in upstreams if u in plans]
            plan.note = f"units known once {', '.join(waits or upstreams)} has run: all of them run"
            continue
        plan.units = len(reasons)
        plan.current = reasons.count(None)
        plan.to_run = plan.units - plan.current
        plan.why = dict(Counter(reason for reason in reasons if reason is not None))
        changing = [u for u in upstreams if u in plans and (plans[u].to_run or plans[u].units is None)]
        if changing:
            plan.note = f"may be more once {', '.join(changing)} has run (if its output changes)"
    return list(plans.values())


def plan_json(
    config: PipelineConfig, plans: list[StagePlan], writer: dict[str, Any] | None
) -> dict[str, Any]:
    return {
        "workdir": str(config.workdir),
        "writer": writer,
        "stages": [asdict(plan) for plan in plans],
        "units_to_run": sum(plan.to_run or 0 for plan in plans),
        "stages_to_run": [plan.stage for plan in plans if plan.to_run or plan.units is None],
    }


def plan_text(config_path: str, plans: list[StagePlan], data: dict[str, Any], width: int = TEXT_WIDTH) -> str:
    lines = [
        *wrapped(f"Dry run of {config_path}: nothing was run, locked or written.", width),
        *wrapped(f"Work directory {data['workdir']}", width),
    ]
    writer = data["writer"]
    if writer is not None:
        lines += wrapped(
            f"  The work directory is being written now by run {writer.get('run_id')} (pid {writer.get('pid')}): "
            "a run now would wait for it (--wait) or fail (exit 3), and this plan may change as it goes.",
            width,
        )
    rows = [["pipeline", "stage", "units", "current", "to run"]]
    for plan in plans:
        unknown = "?" if plan.units is None else None
        rows.append(
            [
                plan.pipeline,
                plan.stage,
                unknown or str(plan.units),
                unknown or str(plan.current),
                "all" if plan.units is None else str(plan.to_run),
            ]
        )
    lines += ["", *table(rows, width, indent="  ", left=2)]
    details = []
    for plan in plans:
        why = ", ".join(f"{n} {reason}" for reason, n in sorted(plan.why.items()))
        for text in (why, plan.note):
            if text:
                details += wrapped(f"  {plan.stage}: {text}", width)
    if details:
        lines += ["", *details]
    total = data["units_to_run"]
    staged = data["stages_to_run"]
    lines.append("")
    if not staged:
        lines.append("Everything selected is current: a run would skip every unit.")
    else:
        lines += wrapped(
            f"A run would run {total} unit{'s' * (total != 1)}"
            + (" (and the units of stages not yet known)" if any(p.units is None for p in plans) else "")
            + f" in {len(staged)} stage{'s' * (len(staged) != 1)}: {', '.join(staged)}.",
            width,
        )
    lines += wrapped(
        "(Files were checked by size; the run also checks checksums as runner.verify says.)", width
    )
    return "\n".join(lines)
