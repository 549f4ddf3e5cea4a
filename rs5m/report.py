"""The funnel per source in pipeline order, read from the DuckDB catalog (read-only, so it works while a
run is going), as text, JSON, Markdown and Prefect table rows."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rs5m.caption_quality import caption_quality, quality_table
from rs5m.terminal import TEXT_WIDTH, table, wrapped
from storage.catalog import COMPLETE, catalog_root, open_catalog, stage_states
from storage.layout import Layout
from storage.markers import read_manifest
from storage.runs import effective_status, read_run_records
from tasks.harness import Stage
from tasks.pipeline import PIPELINE_OF, RELEASE, STAGES, refresh_workdir_catalog, workdir_stage_order

SourceCounts = dict[str, Any]  # {"in": n, "kept": n, "dropped": {reason: n}}


@dataclass(frozen=True)
class StageFunnel:
    info: Stage
    status: str
    sources: dict[str, SourceCounts] = field(default_factory=dict)
    upstreams: list[str] = field(default_factory=list)  # what it was built on (its manifest's record)

    def measure(self, source: str) -> int:
        counts = self.sources.get(source)
        if counts is None:
            return 0
        if self.info.report.measure == "dropped":
            return sum(counts["dropped"].values())
        return counts[self.info.report.measure]


RANDOM_WEIGHTS_NOTE = (
    "CLIP has random weights (clip.pretrained is null): clip_score, rs_score and embedding similarities are "
    "noise; set clip.pretrained to real weights for a real dataset."
)
TINY_CAPTIONER = "blip2-tiny"  # models/blip2.py TINY (not imported: transformers takes seconds to load)
EXAMPLE_CHARS = 160  # of a caption shown in the text report (its end: the model caption)
TINY_CAPTIONER_NOTE = (
    "BLIP-2 is the shipped tiny model with random weights (rs3.caption.model: blip2-tiny): the model captions "
    "are gibberish; set rs3.caption.model to Salesforce/blip2-opt-2.7b for a real dataset."
)


@dataclass(frozen=True)
class FunnelReport:
    workdir: str
    stages: list[StageFunnel]
    failed_sources: dict[str, str]
    eval_overlap: dict[str, int] = field(
        default_factory=dict
    )  # eval set -> training samples dropped as copies
    notes: list[str] = field(default_factory=list)  # what makes the numbers meaningless (random weights)
    last_run: dict[str, Any] | None = (
        None  # run_id, status (as it is now: a killed run is interrupted), error
    )
    caption_quality: dict[str, Any] | None = None  # rs5m/caption_quality.py

    @property
    def complete(self) -> list[StageFunnel]:
        return [s for s in self.stages if s.status == COMPLETE]

    @property
    def released(self) -> bool:
        """Whether every stage is complete: only then are the survivors what remains in the dataset."""
        return len(self.complete) == len(self.stages)

    @property
    def sources(self) -> list[str]:
        names = {name for stage in self.complete for name in stage.sources}
        return sorted(names)

    def remain(self, source: str) -> int:
        return self.stages[-1].sources.get(source, {}).get("kept", 0) if self.released else 0

    def to_json(self) -> dict[str, Any]:
        return {
            "workdir": self.workdir,
            "stages": [
                {
                    "stage": s.info.name,
                    "pipeline": PIPELINE_OF[s.info.name],
                    "upstreams": s.upstreams,
                    "rs5m_column": s.info.report.column,
                    "sources": s.sources,
                }
                for s in self.complete
            ],
            "incomplete": [
                {"stage": s.info.name, "status": s.status} for s in self.stages if s.status != COMPLETE
            ],
            "remain": {name: self.remain(name) for name in self.sources} if self.released else {},
            "last_run": self.last_run,
            "failed_sources": self.failed_sources,
            "eval_overlap": self.eval_overlap,
            "caption_quality": self.caption_quality,
            "notes": self.notes,
        }


def load_funnel(layout: Layout) -> FunnelReport:
    if catalog_root(layout) != layout.root:
        # a moved or copied work directory: its views still name the files at the old place
        refresh_workdir_catalog(layout)
    order = workdir_stage_order(layout)
    states = stage_states(layout, order)
    status = {state.stage: state.status for state in states}
    built_on = {
        state.stage: state.manifest.upstreams or []
        for state in states
        if state.manifest is not None and state.manifest.upstreams is not None
    }
    con = open_catalog(layout)
    try:
        rows = con.sql("SELECT stage, source, fate, reason, n FROM funnel").fetchall()
        # decontaminate's detail starts "eval set <name>: ..." (tasks/decontaminate.py)
        overlap = dict(
            con.sql(
                "SELECT regexp_extract(detail, '^eval set ([^:]+):', 1) AS eval_set, count(*) FROM ledger "
                "WHERE stage = 'decontaminate' AND reason = 'contaminated' GROUP BY ALL ORDER BY eval_set"
            ).fetchall()
        )
    finally:
        con.close()
    per_stage: dict[str, dict[str, SourceCounts]] = {}
    for stage, source, fate, reason, n in rows:
        counts = per_stage.setdefault(stage, {}).setdefault(source, {"in": 0, "kept": 0, "dropped": {}})
        counts["in"] += n
        if fate == "kept":
            counts["kept"] += n
        else:
            counts["dropped"][reason] = counts["dropped"].get(reason, 0) + n
    stages = [
        StageFunnel(
            STAGES[name], status.get(name, "not_run"), per_stage.get(name, {}), built_on.get(name, [])
        )
        for name in order
    ]
    complete = [s for s in stages if s.status == COMPLETE]
    # failed sources accumulate downstream: the last complete stage's manifest names them all
    manifest = read_manifest(layout, complete[-1].info.name) if complete else None
    records = read_run_records(layout)
    last_run = None
    if records:
        newest = records[-1]
        last_run = {
            "run_id": newest["run_id"],
            "status": effective_status(layout, newest),
            "error": newest.get("error"),
            "stage": newest.get("stage"),
            # per stage it ran: units whose current marker was reused, and units it (re)computed
            "units": [
                {"stage": r["stage"], "reused": r["skipped"], "ran": r["units"] - r["skipped"]}
                for r in newest.get("results") or []
                if isinstance(r, dict) and {"stage", "units", "skipped"} <= set(r)
            ],
        }
    return FunnelReport(
        str(layout.root),
        stages,
        manifest.failed_sources if manifest else {},
        eval_overlap=overlap,
        notes=_notes(records, stages),
        last_run=last_run,
        caption_quality=caption_quality(layout, status),
    )


def newest_config(records: list[dict[str, Any]], stages: list[StageFunnel], stage_names: set[str]):
    """The config of the newest run that ran one of `stage_names`, if one of them is complete."""
    if not any(s.info.name in stage_names and s.status == COMPLETE for s in stages):
        return None
    ran = [r for r in records if stage_names & set(r.get("stages", []))]
    return max(ran, key=lambda r: r.get("started_at", ""))["config"] if ran else None


def _notes(records: list[dict[str, Any]], stages: list[StageFunnel]) -> list[str]:
    """Warnings about what the newest runs used: an unpretrained CLIP, the tiny random BLIP-2."""
    notes = []
    embedded = newest_config(records, stages, {"embed", "rs3_embed"})
    if embedded is not None and embedded.get("clip", {}).get("pretrained") is None:
        notes.append(RANDOM_WEIGHTS_NOTE)
    captioned = newest_config(records, stages, {"rs3_caption"})
    if (
        captioned is not None
        and (captioned.get("rs3") or {}).get("caption", {}).get("model") == TINY_CAPTIONER
    ):
        notes.append(TINY_CAPTIONER_NOTE)
    return notes


def _long_header(stage: StageFunnel) -> str:
    return f"{stage.info.report.column} ({stage.info.name})"


def funnel_matrices(
    report: FunnelReport, header_of: Callable[[StageFunnel], str] = _long_header
) -> list[tuple[str, list[str], list[list[str]]]]:
    """One table per data pipeline: its sources by its complete stages and the release's, each cell the
    number RS5M's table reports for that stage (the last stage's column is RS5M's `remain`)."""
    tables = []
    pipelines = dict.fromkeys(
        PIPELINE_OF[s.info.name] for s in report.stages if PIPELINE_OF[s.info.name] != RELEASE.name
    )
    for pipeline in pipelines:
        stages = [s for s in report.complete if PIPELINE_OF[s.info.name] in (pipeline, RELEASE.name)]
        sources = sorted({name for s in stages if PIPELINE_OF[s.info.name] == pipeline for name in s.sources})
        if not stages or not sources:
            continue
        header = ["source", *(header_of(s) for s in stages)]
        rows = []
        for name in [*sources, "total"]:
            names = sources if name == "total" else [name]
            rows.append([name, *(str(sum(stage.measure(n) for n in names)) for stage in stages)])
        tables.append((pipeline, header, rows))
    return tables


def _reasons(counts: SourceCounts) -> str:
    dropped = ", ".join(f"{reason} {n}" for reason, n in sorted(counts["dropped"].items()))
    return dropped or "none dropped"


def funnel_text(report: FunnelReport, width: int = TEXT_WIDTH) -> str:
    """The funnel for a terminal: no line is longer than `width` (tables too wide for it continue in blocks
    below, each repeating the source column; long lines wrap, indented)."""
    lines = [*wrapped(f"RS5M funnel for {report.workdir}", width), ""]
    if not report.complete:
        lines.append("No stage has completed yet.")
    else:
        for pipeline, header, rows in funnel_matrices(report, lambda stage: stage.info.name):
            lines += wrapped(
                f"{pipeline}: sources by stage, each cell the count RS5M's tables report for the stage "
                "(which count: below)",
                width,
            )
            lines += table([header, *rows], width, indent="  ")
            lines.append("")
        lines += wrapped(
            "Per stage (in -> kept; dropped by reason). RS5M column: what RS5M's tables report for it.", width
        )
        for stage in report.complete:
            lines += wrapped(
                f"  {stage.info.name} [RS5M: {stage.info.report.column}, the {stage.info.report.measure} count]",
                width,
            )
            for name, counts in sorted(stage.sources.items()):
                lines += wrapped(
                    f"    {name}: {counts['in']} -> {counts['kept']} ({_reasons(counts)})", width
                )
    for stage in report.stages:
        if stage.status != COMPLETE:
            lines.append(f"  {stage.info.name}: {stage.status.replace('_', ' ')}")
    if report.complete and not report.released:
        lines.append("  (incomplete: nothing is released until every stage is complete)")
    if report.last_run and report.last_run["status"] != "completed":
        run = report.last_run
        lines += wrapped(
            f"  last run {run['run_id']}: {run['status']}" + (f" ({run['error']})" if run["error"] else ""),
            width,
        )
    if report.last_run and report.last_run.get("units"):
        lines += wrapped(
            "  last run, units reused / run per stage: "
            + ", ".join(f"{u['stage']} {u['reused']}/{u['ran']}" for u in report.last_run["units"]),
            width,
        )
    for name, error in sorted(report.failed_sources.items()):
        lines += wrapped(f"  FAILED source {name}: {error}", width)
    if report.eval_overlap:
        lines += wrapped(
            "Evaluation-set overlap (training samples dropped as near-copies): " + _overlap(report), width
        )
    if report.caption_quality:
        lines += [
            "",
            *wrapped(
                "Model captions (rs3_caption; the chosen BLIP-2 caption, before the meta caption):", width
            ),
        ]
        header, rows = quality_table(report.caption_quality)
        lines += table([header, *rows], width)
        for source, examples in report.caption_quality["examples"].items():
            for example in examples:
                caption = example["caption"]
                shown = caption if len(caption) <= EXAMPLE_CHARS else f"...{caption[-EXAMPLE_CHARS:]}"
                lines += wrapped(f"  e.g. {source} {example['file']}:", width)
                lines += wrapped(f"      {shown!r}", width)
    for note in report.notes:
        lines += wrapped(f"NOTE: {note}", width)
    return "\n".join(lines)


def _overlap(report: FunnelReport) -> str:
    return ", ".join(f"{name} {n}" for name, n in report.eval_overlap.items())


def funnel_markdown(report: FunnelReport, workdir: str) -> str:
    lines = [f"# RS5M funnel\n\nWork directory: `{workdir}`\n"]
    for pipeline, header, rows in funnel_matrices(report):
        lines.append(f"\n## {pipeline}\n")
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines.append("\nOutputs: `samples` and `ledger` views in `catalog.duckdb`; shards under `<stage>/data/`.")
    for name, error in sorted(report.failed_sources.items()):
        lines.append(f"\n**Failed source `{name}`**: {error}")
    if report.eval_overlap:
        lines.append(f"\nEvaluation-set overlap (dropped as near-copies): {_overlap(report)}")
    if report.caption_quality:
        header, rows = quality_table(report.caption_quality)
        lines.append("\n## Model captions (rs3_caption)\n")
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += [f"\n**Note:** {note}" for note in report.notes]
    return "\n".join(lines)


def funnel_table_rows(report: FunnelReport) -> list[dict[str, Any]]:
    return [
        {
            "stage": stage.info.name,
            "rs5m_column": stage.info.report.column,
            "source": name,
            "in": counts["in"],
            "kept": counts["kept"],
            "dropped": sum(counts["dropped"].values()),
            "reasons": _reasons(counts),
        }
        for stage in report.complete
        for name, counts in sorted(stage.sources.items())
    ]
