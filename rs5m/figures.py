"""The run report with pictures, for people: the funnel as a chart, the filter's score histograms with their
thresholds, thumbnail galleries of kept images and of dropped images per reason (dedup groups and
contaminated pairs side by side), RS3 caption figures, where the RS3 images are, and each training run's
loss curve and scorecard.

Read from the DuckDB catalog like rs5m/report.py (and WORKDIR/train/<run>/ for training). The chart functions
each return one PNG; `report_sections` gathers the sections once, and two renderers write them:
`report_markdown` for the Prefect artifact `rs5m-report` and `report_html` for `rs5m report WORKDIR --html
FILE`. Pictures are inlined as data: URIs: the Prefect UI renders a Markdown image token as an <img> with
the link as its src (charts), and raw <img> tags inline after DOMPurify, which keeps data: sources
(thumbnails); the HTML file must work without a network.

matplotlib is imported inside the chart functions: `rs5m report` without pictures stays fast.
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
from PIL import Image

from rs5m.config import FilterConfig
from rs5m.report import FunnelReport, funnel_matrices, newest_config
from storage.catalog import open_catalog
from storage.layout import Layout, TrainLayout
from storage.runs import read_run_records
from tasks.pipeline import DATA_PIPELINES, PIPELINE_OF

THUMB_PX = 96  # longest side: a gallery row of a dozen fits the UI's width
THUMB_QUALITY = 70  # JPEG; ~3 KB a thumbnail keeps the artifact (stored in Prefect's database) small
KEPT_SHOWN = 24
DROPPED_SHOWN = 8  # per stage and reason
GROUPS_SHOWN = 6  # dedup groups and contaminated pairs
COPIES_SHOWN = 4  # dropped copies shown beside each group's keeper
CHART_DPI = 80
SCORE_STAGES = ("filter", "rs3_score")  # the stages that record clip_score and rs_score in the ledger
SCORES = ("clip_score", "rs_score")
PLACES_SHOWN = 15  # rows of the country and UTM-zone tables


@dataclass(frozen=True)
class Picture:
    alt: str
    data: bytes
    mime: str = "image/png"
    title: str = ""  # shown on hover (Markdown) or under the picture (HTML)

    def data_uri(self) -> str:
        return f"data:{self.mime};base64,{base64.b64encode(self.data).decode('ascii')}"


Cell = str | Picture | list[Picture]


@dataclass(frozen=True)
class Table:
    header: list[str]
    rows: list[list[Cell]]


@dataclass(frozen=True)
class Gallery:
    pictures: list[Picture]
    total: int  # how many the pictures were chosen from


Block = str | Picture | list[Picture] | Table | Gallery  # str: a paragraph; list: charts side by side


@dataclass
class Section:
    title: str
    blocks: list[Block] = field(default_factory=list)


# ---------------------------------------------------------------- charts (PNG bytes)


def _png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=CHART_DPI, bbox_inches="tight")
    return buffer.getvalue()


def _figure(width: float, height: float) -> Any:
    # Figure without pyplot: no global state, no GUI backend, safe in Prefect's task threads
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def funnel_chart(report: FunnelReport) -> bytes:
    """Per data pipeline (and the release), the rows entering and kept by each complete stage."""
    stages = report.complete
    names = [f"{stage.info.name} ({PIPELINE_OF[stage.info.name]})" for stage in stages][::-1]
    entered = [sum(c["in"] for c in stage.sources.values()) for stage in stages][::-1]
    kept = [sum(c["kept"] for c in stage.sources.values()) for stage in stages][::-1]
    figure = _figure(8, 0.45 * len(stages) + 1.2)
    axes = figure.subplots()
    positions = range(len(stages))
    axes.barh(positions, entered, color="#d0d7e1", label="in")
    axes.barh(positions, kept, color="#2f6db5", label="kept")
    for y, (n_in, n_kept) in enumerate(zip(entered, kept, strict=True)):
        axes.text(n_in, y, f" {n_kept} / {n_in}", va="center", fontsize=8)
    axes.set_yticks(list(positions), names, fontsize=8)
    axes.set_xlabel("rows")
    axes.set_xlim(0, max(entered, default=1) * 1.25 or 1)
    axes.legend(loc="lower right", fontsize=8)
    axes.set_title("Funnel: rows in and kept per stage")
    return _png(figure)


def score_histogram(kept: Sequence[float], dropped: Sequence[float], name: str, threshold: float) -> bytes:
    """One score's distribution, kept and dropped rows stacked, the keep threshold as a red line."""
    figure = _figure(5, 3)
    axes = figure.subplots()
    axes.hist([list(kept), list(dropped)], bins=30, stacked=True, color=["#2f6db5", "#d9822b"])
    axes.axvline(threshold, color="#c0392b", linestyle="--", linewidth=1.5)
    axes.legend(["threshold", "kept", "dropped"], fontsize=8)
    axes.set_title(f"{name} (keep if >= {threshold:g})", fontsize=10)
    axes.set_xlabel(name)
    axes.set_ylabel("rows")
    return _png(figure)


def caption_length_histogram(words_per_source: dict[str, list[int]]) -> bytes:
    figure = _figure(5, 3)
    axes = figure.subplots()
    axes.hist(list(words_per_source.values()), bins=20, label=list(words_per_source), stacked=True)
    axes.legend(fontsize=8)
    axes.set_title("Model caption length (rs3_caption)", fontsize=10)
    axes.set_xlabel("words")
    axes.set_ylabel("images")
    return _png(figure)


QUALITY_BARS = (
    ("duplicate_share", "duplicates"),
    ("orientation_share", "orientation words"),
    ("top_equals_ssl_share", "top = ssl"),
    ("ssl_chosen_share", "ssl chosen"),
)


def caption_quality_chart(quality: dict[str, Any]) -> bytes:
    """The shares of rs5m/caption_quality.py per source, side by side."""
    import numpy as np

    sources = list(quality["sources"])
    figure = _figure(6, 3)
    axes = figure.subplots()
    width = 0.8 / max(len(sources), 1)
    positions = np.arange(len(QUALITY_BARS))
    for i, source in enumerate(sources):
        values = [quality["sources"][source].get(key) or 0.0 for key, _ in QUALITY_BARS]
        axes.bar(positions + i * width, values, width, label=source)
    axes.set_xticks(
        positions + width * (len(sources) - 1) / 2, [title for _, title in QUALITY_BARS], fontsize=8
    )
    axes.set_ylim(0, 1)
    axes.set_ylabel("share of images")
    axes.legend(fontsize=8)
    axes.set_title("Model caption quality per source", fontsize=10)
    return _png(figure)


def places_map(points: Sequence[tuple[float, float, str]]) -> bytes:
    """Longitude/latitude of the RS3 images per source, on the whole globe (no basemap: nothing to fetch)."""
    figure = _figure(7, 3.6)
    axes = figure.subplots()
    by_source: dict[str, list[tuple[float, float]]] = {}
    for lon, lat, source in points:
        by_source.setdefault(source, []).append((lon, lat))
    for source, coordinates in sorted(by_source.items()):
        axes.scatter(*zip(*coordinates, strict=True), s=12, label=source)
    axes.set_xlim(-180, 180)
    axes.set_ylim(-90, 90)
    axes.set_xticks(range(-180, 181, 60))
    axes.set_yticks(range(-90, 91, 30))
    axes.grid(True, linewidth=0.5, alpha=0.5)
    axes.axhline(0, color="grey", linewidth=0.8)
    axes.set_xlabel("longitude")
    axes.set_ylabel("latitude")
    axes.legend(fontsize=8, loc="lower left")
    axes.set_title("Where the RS3 images are", fontsize=10)
    return _png(figure)


def loss_chart(metrics: Sequence[dict[str, Any]], run_name: str) -> bytes:
    figure = _figure(6, 2.8)
    axes = figure.subplots()
    axes.plot([m["step"] for m in metrics], [m["loss"] for m in metrics], color="#2f6db5")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.grid(True, linewidth=0.5, alpha=0.5)
    axes.set_title(f"Training loss ({run_name})", fontsize=10)
    return _png(figure)


def thumbnail(image_bytes: bytes, alt: str, title: str = "") -> Picture | None:
    """A small JPEG of an image, or None when it cannot be decoded."""
    try:
        with Image.open(io.BytesIO(image_bytes)) as image:
            image.thumbnail((THUMB_PX, THUMB_PX))
            buffer = io.BytesIO()
            image.convert("RGB").save(buffer, format="JPEG", quality=THUMB_QUALITY)
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    return Picture(alt, buffer.getvalue(), "image/jpeg", title)


# ---------------------------------------------------------------- sections from the catalog


def _views(con: duckdb.DuckDBPyConnection) -> set[str]:
    return {row[0] for row in con.sql("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()}


def _columns(con: duckdb.DuckDBPyConnection, view: str) -> set[str]:
    return {row[0] for row in con.sql(f'DESCRIBE "{view}"').fetchall()}


class _Images:
    """Image bytes by sample id, from the image stages of the data pipelines (validate, rs3_validate)."""

    def __init__(self, con: duckdb.DuckDBPyConnection) -> None:
        views = _views(con)
        self.con = con
        self.stages = [p.image_stage for p in DATA_PIPELINES if p.image_stage in views]

    def thumbnails(self, sample_ids: Sequence[str], titles: dict[str, str] | None = None) -> list[Picture]:
        if not sample_ids or not self.stages:
            return []
        found: dict[str, bytes] = {}
        for stage in self.stages:
            rows = self.con.execute(
                f'SELECT sample_id, image FROM "{stage}" WHERE sample_id IN (SELECT unnest($ids))',
                {"ids": list(sample_ids)},
            ).fetchall()
            found.update(rows)
        pictures = [
            thumbnail(found[sid], sid, (titles or {}).get(sid, sid)) for sid in sample_ids if sid in found
        ]
        return [p for p in pictures if p is not None]


def _stage_positions(report: FunnelReport) -> dict[str, int]:
    return {stage.info.name: i for i, stage in enumerate(report.stages)}


def funnel_section(report: FunnelReport) -> Section:
    section = Section("Funnel")
    if not report.complete:
        section.blocks.append("No stage has completed yet.")
        return section
    section.blocks.append(Picture("funnel chart", funnel_chart(report)))
    for pipeline, header, rows in funnel_matrices(report):
        section.blocks.append(f"{pipeline}: sources by stage (the count RS5M's tables report for the stage)")
        section.blocks.append(Table(header, [list(row) for row in rows]))
    return section


def _scores_section(con: duckdb.DuckDBPyConnection, config: dict[str, Any] | None) -> Section | None:
    rows = con.sql(
        "SELECT stage, fate, scores['clip_score'], scores['rs_score'] FROM ledger "
        f"WHERE stage IN {SCORE_STAGES} AND scores IS NOT NULL"
    ).fetchall()
    if not rows:
        return None
    thresholds = {**FilterConfig().model_dump(), **((config or {}).get("filter") or {})}
    section = Section("Scores (clip_score, rs_score)")
    histograms = []
    for position, name in enumerate(SCORES, start=2):
        kept = [row[position] for row in rows if row[1] == "kept" and row[position] is not None]
        dropped = [row[position] for row in rows if row[1] != "kept" and row[position] is not None]
        threshold = float(thresholds[f"{name}_min"])
        histograms.append(Picture(f"{name} histogram", score_histogram(kept, dropped, name, threshold)))
    section.blocks.append(histograms)
    stages = sorted({row[0] for row in rows})
    section.blocks.append(
        f"{len(rows)} scored rows ({', '.join(stages)}); red line: the filter's threshold from the newest run's "
        "config (rs3_score scores without dropping)."
    )
    return section


def _kept_section(con: duckdb.DuckDBPyConnection, report: FunnelReport, images: _Images) -> Section | None:
    last = report.complete[-1].info.name if report.complete else None
    if last is None:
        return None
    (total,) = con.execute(
        "SELECT count(*) FROM ledger WHERE stage = $stage AND fate = 'kept'", {"stage": last}
    ).fetchall()[0]
    ids = [
        row[0]
        for row in con.execute(
            "SELECT sample_id FROM ledger WHERE stage = $stage AND fate = 'kept' ORDER BY sample_id LIMIT $n",
            {"stage": last, "n": KEPT_SHOWN},
        ).fetchall()
    ]
    title = "Kept images" + ("" if report.released else f" (so far: survivors of {last})")
    return Section(title, [Gallery(images.thumbnails(ids), total)])


def _dropped_rows(con: duckdb.DuckDBPyConnection, stage: str, reason: str, limit: int) -> list[tuple]:
    return con.execute(
        "SELECT sample_id, detail, kept_sample_id FROM ledger WHERE stage = $stage AND fate = 'dropped' "
        "AND reason = $reason ORDER BY sample_id LIMIT $n",
        {"stage": stage, "reason": reason, "n": limit},
    ).fetchall()


def _dedup_table(con: duckdb.DuckDBPyConnection, reason: str, images: _Images) -> Table:
    """Keeper beside its dropped copies, one row per group."""
    groups = con.execute(
        "SELECT kept_sample_id, list(sample_id ORDER BY sample_id) FROM ledger WHERE stage = 'dedup' "
        "AND fate = 'dropped' AND reason = $reason GROUP BY kept_sample_id ORDER BY kept_sample_id LIMIT $n",
        {"reason": reason, "n": GROUPS_SHOWN},
    ).fetchall()
    rows: list[list[Cell]] = []
    for keeper, copies in groups:
        shown = copies[:COPIES_SHOWN]
        rows.append(
            [
                images.thumbnails([keeper]) or keeper,
                images.thumbnails(shown) or ", ".join(shown),
                f"{len(copies)} dropped" + (f", {len(shown)} shown" if len(copies) > len(shown) else ""),
            ]
        )
    return Table(["kept", "dropped copies", "copies"], rows)


EVAL_MATCH = re.compile(r"eval set ([^:]+): (.+?) \((?:hamming|cosine) [^)]*\)")


def _contaminated_table(
    con: duckdb.DuckDBPyConnection, config: dict[str, Any] | None, images: _Images
) -> Table:
    """Each training image beside the evaluation image it copies (the detail names it, see decontaminate)."""
    eval_folders = {
        entry["name"]: Path(entry["path"])
        for entry in ((config or {}).get("decontaminate") or {}).get("eval_sets") or []
    }
    rows: list[list[Cell]] = []
    for sample_id, detail, _ in _dropped_rows(con, "decontaminate", "contaminated", GROUPS_SHOWN):
        match = EVAL_MATCH.search(detail or "")
        eval_picture: Cell = detail or ""
        if match and match.group(1) in eval_folders:
            eval_file = eval_folders[match.group(1)] / match.group(2)
            if eval_file.is_file():
                eval_picture = thumbnail(eval_file.read_bytes(), match.group(2), detail) or detail
        rows.append([images.thumbnails([sample_id]) or sample_id, eval_picture, detail or ""])
    return Table(["training image (dropped)", "evaluation image", "match"], rows)


def _dropped_section(
    con: duckdb.DuckDBPyConnection, report: FunnelReport, config: dict[str, Any] | None, images: _Images
) -> Section | None:
    position = _stage_positions(report)
    counts = sorted(
        con.sql("SELECT stage, reason, count(*) FROM ledger WHERE fate = 'dropped' GROUP BY ALL").fetchall(),
        key=lambda row: (position.get(row[0], len(position)), row[1]),
    )
    if not counts:
        return None
    section = Section("Dropped images per reason")
    without_images: list[list[Cell]] = []  # dropped before their images were validated: counts only
    for stage, reason, total in counts:
        heading = f"{stage} / {reason}: {total} dropped"
        if stage == "dedup":
            section.blocks += [heading, _dedup_table(con, reason, images)]
        elif stage == "decontaminate" and reason == "contaminated":
            section.blocks += [heading, _contaminated_table(con, config, images)]
        else:
            rows = _dropped_rows(con, stage, reason, DROPPED_SHOWN)
            pictures = images.thumbnails([row[0] for row in rows], {row[0]: row[1] or row[0] for row in rows})
            if pictures:
                section.blocks += [heading, Gallery(pictures, total)]
            else:
                without_images.append([stage, reason, str(total)])
    if without_images:
        section.blocks[:0] = [
            "Dropped before their images were validated (no pictures):",
            Table(["stage", "reason", "dropped"], without_images),
        ]
    return section


def _rs3_captions_section(con: duckdb.DuckDBPyConnection, report: FunnelReport) -> Section | None:
    if not report.caption_quality or "rs3_caption" not in _views(con):
        return None
    rows = con.sql(
        "SELECT source, CASE caption_choice WHEN 'top_cap' THEN top_cap ELSE ssl_cap END FROM rs3_caption "
        "WHERE caption_choice IN ('top_cap', 'ssl_cap')"
    ).fetchall()
    words: dict[str, list[int]] = {}
    for source, caption in rows:
        words.setdefault(source, []).append(len((caption or "").split()))
    charts = [
        Picture("caption length histogram", caption_length_histogram(dict(sorted(words.items())))),
        Picture("caption quality chart", caption_quality_chart(report.caption_quality)),
    ]
    return Section("RS3 model captions", [charts])


RS3_PLACE_STAGES = ("rs3_score", "rs3_embed", "rs3_caption", "rs3_meta", "rs3_validate", "rs3_read")


def _rs3_places_section(con: duckdb.DuckDBPyConnection) -> Section | None:
    views = _views(con)
    # the furthest complete RS3 stage: the images that remain
    stage = next((s for s in RS3_PLACE_STAGES if s in views and "country_code" in _columns(con, s)), None)
    if stage is None:
        return None
    section = Section(f"Where the RS3 images are ({stage})")
    points = con.sql(
        f'SELECT longitude, latitude, source FROM "{stage}" WHERE longitude IS NOT NULL AND latitude IS NOT NULL'
    ).fetchall()
    if points:
        section.blocks.append(Picture("map of RS3 images", places_map(points)))
    for column, title in (("country_code", "country"), ("utm_zone", "UTM zone")):
        counts = con.sql(
            f"SELECT coalesce({column}, '(none)'), count(*) AS n FROM \"{stage}\" GROUP BY ALL "
            f"ORDER BY n DESC, 1 LIMIT {PLACES_SHOWN}"
        ).fetchall()
        (distinct,) = con.execute(
            f"SELECT count(DISTINCT coalesce({column}, '(none)')) FROM \"{stage}\""
        ).fetchall()[0]
        section.blocks.append(f"Images per {title} ({len(counts)} of {distinct} shown, most images first):")
        section.blocks.append(Table([title, "images"], [[str(value), str(n)] for value, n in counts]))
    return section


def _scorecard_table(rows: list[dict[str, Any]]) -> Table:
    """Datasets and metrics by model, in percent (as flows/train.py's scorecard_text)."""
    models = list(dict.fromkeys(row["model"] for row in rows))
    value = {(row["model"], row["dataset"], row["metric"]): row["percent"] for row in rows}
    keys = dict.fromkeys((row["dataset"], row["metric"]) for row in rows)
    return Table(
        ["dataset", "metric", *models],
        [
            [
                dataset,
                metric,
                *(
                    "-" if value.get((m, dataset, metric)) is None else f"{value[(m, dataset, metric)]:.2f}"
                    for m in models
                ),
            ]
            for dataset, metric in keys
        ],
    )


def training_sections(layout: Layout) -> list[Section]:
    """Per training run of the work directory: its loss curve and, once evaluated, its scorecard."""
    sections = []
    runs_folder = TrainLayout(layout.root, "").root  # WORKDIR/train/, one folder per run
    for name in sorted(p.name for p in runs_folder.glob("*/")):
        run = TrainLayout(layout.root, name)
        metrics = (
            [json.loads(line) for line in run.metrics.read_text().splitlines() if line.strip()]
            if run.metrics.is_file()
            else []
        )
        if not metrics:
            continue
        section = Section(f"Training {name}", [Picture("loss curve", loss_chart(metrics, name))])
        scorecard = run.root / "scorecard.json"  # written by flows/train.py's evaluate_run
        if scorecard.exists():
            section.blocks += [
                "Scorecard (percent; base is the model before training):",
                _scorecard_table(json.loads(scorecard.read_text())["rows"]),
            ]
        sections.append(section)
    return sections


def report_sections(layout: Layout, report: FunnelReport) -> list[Section]:
    """Every section the work directory has data for, in reading order."""
    # thresholds and evaluation folders as the newest run had them
    config = newest_config(read_run_records(layout), report.stages, {s.info.name for s in report.stages})
    sections = [funnel_section(report)]
    con = open_catalog(layout)
    try:
        images = _Images(con)
        for section in (
            _scores_section(con, config),
            _kept_section(con, report, images),
            _dropped_section(con, report, config, images),
            _rs3_captions_section(con, report),
            _rs3_places_section(con),
        ):
            if section is not None:
                sections.append(section)
    finally:
        con.close()
    sections += training_sections(layout)
    if report.notes:
        sections.append(Section("Notes", list(report.notes)))
    return sections


# ---------------------------------------------------------------- renderers


def _markdown_text(text: str) -> str:
    # table cells and paragraphs: a pipe would split a cell, a newline would end it
    return text.replace("|", "\\|").replace("\n", " ")


def _markdown_image(picture: Picture) -> str:
    """A chart: a Markdown image token, which the Prefect UI renders as a block <img> (one per line)."""
    alt = re.sub(r"[\[\]\n]", " ", picture.alt)
    return f"![{alt}]({picture.data_uri()})"


def _inline_images(pictures: list[Picture]) -> str:
    # raw <img> tags: the UI's stylesheet shows Markdown images as blocks (a gallery would be one column),
    # HTML images inline; its sanitizer (DOMPurify) keeps <img> with data: sources, alt and title
    return " ".join(_html_image(p) for p in pictures)


def _markdown_cell(cell: Cell) -> str:
    if isinstance(cell, Picture):
        return _inline_images([cell])
    if isinstance(cell, list):
        return _inline_images(cell)
    return _markdown_text(cell)


def _shown(gallery: Gallery) -> str:
    return f"{len(gallery.pictures)} shown of {gallery.total}"


def report_markdown(sections: list[Section], workdir: str) -> str:
    """Markdown whose pictures are image tokens with data: URIs (what the Prefect UI renders as <img>)."""
    lines = [f"# RS5M report\n\nWork directory: `{workdir}`"]
    for section in sections:
        lines.append(f"\n## {section.title}\n")
        for block in section.blocks:
            if isinstance(block, Picture):
                lines.append(_markdown_image(block) + "\n")
            elif isinstance(block, list):
                lines.append(f"<div>{_inline_images(block)}</div>\n")
            elif isinstance(block, Gallery):
                lines.append(f"_{_shown(block)}_\n")
                lines.append(f"<div>{_inline_images(block.pictures)}</div>\n")
            elif isinstance(block, Table):
                lines.append("| " + " | ".join(_markdown_text(h) for h in block.header) + " |")
                lines.append("|" + "---|" * len(block.header))
                lines += ["| " + " | ".join(_markdown_cell(c) for c in row) + " |" for row in block.rows]
                lines.append("")
            else:
                lines.append(_markdown_text(block) + "\n")
    return "\n".join(lines)


HTML_STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #1d2330; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccd; padding-bottom: .2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: .5em 0 1em; } td, th { border: 1px solid #ccd; padding: 3px 8px; }
th { background: #eef1f6; } td { vertical-align: top; }
figure { display: inline-block; margin: 3px; width: 100px; vertical-align: top; }
figcaption { font-size: 10px; color: #556; overflow-wrap: anywhere; }
img.chart { max-width: 100%; margin: .3em .6em .3em 0; } .shown { color: #556; font-style: italic; }
"""


def _attribute(text: str) -> str:
    # also safe inside a Markdown table row: no pipe, no newline
    return html.escape(" ".join(text.split())).replace("|", "&#124;")


def _html_image(picture: Picture, css_class: str = "") -> str:
    return (
        f'<img src="{picture.data_uri()}" alt="{_attribute(picture.alt)}"'
        + (f' class="{css_class}"' if css_class else "")
        + (f' title="{_attribute(picture.title)}"' if picture.title else "")
        + ">"
    )


def _html_thumb(picture: Picture) -> str:
    # the caption is text, never a link: a sample's own URL must not make the file fetch anything
    return f"<figure>{_html_image(picture)}<figcaption>{html.escape(picture.alt)}</figcaption></figure>"


def _html_cell(cell: Cell) -> str:
    if isinstance(cell, Picture):
        return _html_thumb(cell)
    if isinstance(cell, list):
        return "".join(_html_thumb(p) for p in cell)
    return html.escape(cell)


def report_html(sections: list[Section], workdir: str) -> str:
    """One self-contained page: inline CSS, pictures as data: URIs, no scripts, nothing fetched."""
    body = [f"<h1>RS5M report</h1><p>Work directory: <code>{html.escape(workdir)}</code></p>"]
    for section in sections:
        body.append(f"<section><h2>{html.escape(section.title)}</h2>")
        for block in section.blocks:
            if isinstance(block, Picture):
                body.append(_html_image(block, "chart"))
            elif isinstance(block, list):
                body.append("<div>" + "".join(_html_image(p, "chart") for p in block) + "</div>")
            elif isinstance(block, Gallery):
                body.append(f'<p class="shown">{_shown(block)}</p><div class="gallery">')
                body += [_html_thumb(p) for p in block.pictures]
                body.append("</div>")
            elif isinstance(block, Table):
                body.append(
                    "<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in block.header) + "</tr>"
                )
                body += [
                    "<tr>" + "".join(f"<td>{_html_cell(c)}</td>" for c in row) + "</tr>" for row in block.rows
                ]
                body.append("</table>")
            else:
                body.append(f"<p>{html.escape(block)}</p>")
        body.append("</section>")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>RS5M report</title>'
        f"<style>{HTML_STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )
