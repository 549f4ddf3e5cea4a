"""The report with pictures (rs5m/figures.py): charts and thumbnails decode, the Markdown keeps its tables
whole, the HTML file fetches nothing, and on the demo run every section shows what the ledger holds."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import time
from html.parser import HTMLParser
from pathlib import Path

import duckdb
import pytest
from PIL import Image

from rs5m.figures import (
    COPIES_SHOWN,
    DROPPED_SHOWN,
    GROUPS_SHOWN,
    KEPT_SHOWN,
    THUMB_PX,
    Gallery,
    Picture,
    Section,
    Table,
    report_html,
    report_markdown,
    report_sections,
    score_histogram,
    thumbnail,
    training_sections,
)
from rs5m.report import load_funnel
from storage.layout import Layout
from tests.helpers import rs5m

MARKDOWN_BUDGET = 2_000_000  # bytes: Prefect keeps the artifact in its database
DATA_URI = re.compile(r'src="data:(image/(?:png|jpeg));base64,([A-Za-z0-9+/=]+)"')


def _jpeg(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (40, 120, 60)).save(buffer, format="JPEG")
    return buffer.getvalue()


def _decoded(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


class _Images(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.sources: list[str] = []
        self.headings: list[str] = []
        self._in_heading = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "img":
            self.sources.append(dict(attrs)["src"] or "")
        self._in_heading = tag == "h2"

    def handle_data(self, data: str) -> None:
        if self._in_heading:
            self.headings.append(data)
            self._in_heading = False


def test_thumbnail_is_a_small_decodable_jpeg() -> None:
    picture = thumbnail(_jpeg(400, 300), "sample-1")
    assert picture is not None and picture.mime == "image/jpeg"
    image = _decoded(picture.data)
    assert image.format == "JPEG" and max(image.size) == THUMB_PX and image.size[1] == 72
    assert thumbnail(b"<html>not an image</html>", "sample-2") is None


def test_score_histogram_is_a_png_with_the_threshold_in_its_title() -> None:
    png = score_histogram([0.3, 0.4, 0.5], [0.1, 0.15], "clip_score", 0.2)
    assert _decoded(png).format == "PNG"
    assert len(png) < 60_000


def test_markdown_keeps_table_rows_whole_and_galleries_inline() -> None:
    thumb = thumbnail(_jpeg(50, 50), "a|b", title="detail | with a pipe\nand a newline")
    sections = [
        Section("Dropped", ["stage | reason", Table(["kept", "copies"], [[thumb, [thumb, thumb]]])]),
        Section("Kept", [Gallery([thumb] * 3, total=10)]),
    ]
    markdown = report_markdown(sections, "/w")
    (row,) = [line for line in markdown.splitlines() if line.startswith("| <img")]
    assert len(re.findall(r"(?<!\\)\|", row)) == 3  # two cells: a pipe in a title would split one
    assert len(DATA_URI.findall(row)) == 3
    (gallery,) = [line for line in markdown.splitlines() if line.startswith("<div>")]
    assert len(DATA_URI.findall(gallery)) == 3 and "3 shown of 10" in markdown
    assert "stage \\| reason" in markdown


def test_html_is_one_self_contained_page() -> None:
    chart = Picture("chart", score_histogram([0.5], [0.1], "rs_score", 0.5))
    thumb = thumbnail(_jpeg(80, 80), "s1", title="caption from https://example.com/a.jpg")
    page = report_html([Section("Scores", [chart]), Section("Kept", [Gallery([thumb], 1)])], "/w")
    parser = _Images()
    parser.feed(page)
    assert parser.headings == ["Scores", "Kept"]
    assert all(src.startswith("data:image/") for src in parser.sources) and len(parser.sources) == 2
    assert "<script" not in page and "<link" not in page and "href=" not in page
    # the only URL is a sample's own, as text in a title (never a link or a source)
    assert re.findall(r"https?://[^\s\"<]+", page) == ["https://example.com/a.jpg"]


def test_training_section_has_the_loss_curve_and_the_scorecard(tmp_path: Path) -> None:
    run = tmp_path / "train" / "tiny"
    run.mkdir(parents=True)
    steps = [{"step": i, "epoch": 0, "loss": 3.0 - 0.1 * i, "lr": 1e-4} for i in range(1, 9)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(step) + "\n" for step in steps))
    rows = [
        {"model": model, "dataset": "scenes", "metric": "acc1", "percent": percent, "vs_base": None}
        for model, percent in (("base", 16.67), ("step-8", 33.33))
    ]
    (run / "scorecard.json").write_text(json.dumps({"models": [], "rows": rows}))
    (section,) = training_sections(Layout(tmp_path))
    assert section.title == "Training tiny"
    loss, _, scorecard = section.blocks
    assert isinstance(loss, Picture) and _decoded(loss.data).format == "PNG"
    assert isinstance(scorecard, Table) and scorecard.header == ["dataset", "metric", "base", "step-8"]
    assert scorecard.rows == [["scenes", "acc1", "16.67", "33.33"]]


def _ledger(workdir: Path, sql: str) -> list[tuple]:
    con = duckdb.connect(str(Layout(workdir).catalog), read_only=True)
    try:
        return con.sql(sql).fetchall()
    finally:
        con.close()


@pytest.mark.xdist_group(name="demo")
def test_demo_sections_show_what_the_ledger_holds(demo_run: Path) -> None:
    layout = Layout(demo_run)
    report = load_funnel(layout)
    started = time.monotonic()
    sections = {section.title: section for section in report_sections(layout, report)}
    elapsed = time.monotonic() - started
    assert list(sections)[:4] == [
        "Funnel",
        "Scores (clip_score, rs_score)",
        "Kept images",
        "Dropped images per reason",
    ]
    assert {"RS3 model captions", "Where the RS3 images are (rs3_score)"} <= set(sections)

    funnel_chart = sections["Funnel"].blocks[0]
    assert isinstance(funnel_chart, Picture) and _decoded(funnel_chart.data).format == "PNG"
    (histograms,) = [b for b in sections["Scores (clip_score, rs_score)"].blocks if isinstance(b, list)]
    assert [p.alt for p in histograms] == ["clip_score histogram", "rs_score histogram"]
    assert all(_decoded(p.data).format == "PNG" for p in histograms)

    ((kept,),) = _ledger(demo_run, "SELECT count(*) FROM ledger WHERE stage = 'shard' AND fate = 'kept'")
    (gallery,) = sections["Kept images"].blocks
    assert isinstance(gallery, Gallery) and gallery.total == kept
    assert len(gallery.pictures) == min(kept, KEPT_SHOWN)
    assert all(_decoded(p.data).format == "JPEG" for p in gallery.pictures)

    dropped = sections["Dropped images per reason"].blocks
    reasons = _ledger(
        demo_run, "SELECT stage, reason, count(*) FROM ledger WHERE fate = 'dropped' GROUP BY ALL"
    )
    headings = {b for b in dropped if isinstance(b, str) and b.endswith(" dropped")}
    (no_pictures,) = [
        b for b in dropped if isinstance(b, Table) and b.header == ["stage", "reason", "dropped"]
    ]
    without = {(row[0], row[1], int(row[2])) for row in no_pictures.rows}
    # every (stage, reason) of the ledger appears once: a gallery heading, or a row of the counts table
    assert {f"{s} / {r}: {n} dropped" for s, r, n in reasons if (s, r, n) not in without} == headings
    assert without < set(reasons) and {("keyword", "no_keyword")} <= {(s, r) for s, r, _ in without}
    for block in dropped:
        if isinstance(block, Gallery):
            assert 0 < len(block.pictures) <= DROPPED_SHOWN

    tables = {b.header[0]: b for b in dropped if isinstance(b, Table)}
    ((groups,),) = _ledger(
        demo_run,
        "SELECT count(DISTINCT kept_sample_id) FROM ledger WHERE stage = 'dedup' AND reason = 'duplicate_exact'",
    )
    dedup = tables["kept"]  # the first dedup reason's table: keeper beside its copies
    assert len(dedup.rows) == min(groups, GROUPS_SHOWN)
    for keeper, copies, _ in dedup.rows:
        assert isinstance(keeper, list) and len(keeper) == 1
        assert isinstance(copies, list) and 1 <= len(copies) <= COPIES_SHOWN
    ((contaminated,),) = _ledger(demo_run, "SELECT count(*) FROM ledger WHERE reason = 'contaminated'")
    pairs = tables["training image (dropped)"]
    assert len(pairs.rows) == min(contaminated, GROUPS_SHOWN)
    assert all(isinstance(row[1], Picture) for row in pairs.rows)  # the evaluation image, from its folder

    markdown = report_markdown(list(sections.values()), str(demo_run))
    assert len(markdown.encode()) < MARKDOWN_BUDGET
    print(f"pictures report: {len(markdown.encode())} bytes of Markdown, sections in {elapsed:.1f} s")


@pytest.mark.xdist_group(name="demo")
def test_report_html_command_writes_one_self_contained_file(demo_run: Path, tmp_path: Path) -> None:
    target = tmp_path / "report.html"
    started = time.monotonic()
    result = rs5m("report", str(demo_run), "--html", str(target), env=dict(os.environ), timeout=300)
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert "RS5M funnel" in result.stdout and str(target) in result.stderr
    page = target.read_text()
    parser = _Images()
    parser.feed(page)
    assert parser.headings[:4] == [
        "Funnel",
        "Scores (clip_score, rs_score)",
        "Kept images",
        "Dropped images per reason",
    ]
    assert len(parser.sources) > KEPT_SHOWN and all(s.startswith("data:image/") for s in parser.sources)
    for mime, data in DATA_URI.findall(page)[:5]:
        assert _decoded(base64.b64decode(data)).format == mime.split("/")[1].upper()
    assert "<script" not in page and "<link" not in page and "href=" not in page
    assert not re.search(r"https?://", page)  # the demo's URLs are its samples', never shown as links
    print(f"rs5m report --html: {len(page.encode())} bytes in {elapsed:.1f} s")
