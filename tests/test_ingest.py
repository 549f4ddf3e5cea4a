"""ingest: formats, ids, duplicate and invalid rows, malformed lines, missing columns, HTTP sources, resume."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rs5m.config import IngestConfig, SourceConfig
from storage.layout import Layout
from storage.markers import read_marker
from tasks.ingest import SourceError, SourceIngester, ingest_source_shards, normalise_url, sample_id

ROWS = [
    ("https://Example.COM:443/a.jpg#frag", "Aerial view of a harbour"),
    ("http://example.com/b.jpg", 'a "quoted" caption, with comma'),
    ("ftp://example.com/c.jpg", "not http"),
    ("https://example.com/a.jpg", "Aerial view of a harbour"),  # same as row 0 after normalisation
    ("", "no url at all"),
    ("http://example.com/d.jpg", None),
]


def ingest(source: SourceConfig, shard_rows: int = 1000):
    outcomes = list(SourceIngester(source, IngestConfig(shard_rows=shard_rows)).shards())
    decisions = pa.concat_tables([o.decisions for o in outcomes])
    kept = pa.concat_tables([o.kept for o in outcomes])
    return outcomes, decisions, kept


def write_sources(tmp_path: Path) -> dict[str, SourceConfig]:
    pq.write_table(
        pa.table(
            {"URL": [u for u, _ in ROWS], "TEXT": [c for _, c in ROWS], "WIDTH": list(range(len(ROWS)))}
        ),
        tmp_path / "s.parquet",
    )
    (tmp_path / "s.jsonl").write_text(
        "\n".join(json.dumps({"url": u, "caption": c, "subreddit": "earthporn"}) for u, c in ROWS) + "\n"
    )
    with open(tmp_path / "s.csv", "w", newline="") as handle:
        import csv

        writer = csv.writer(handle)
        writer.writerow(["url", "caption", "license"])
        writer.writerows([(u, c if c is not None else "", "cc-by") for u, c in ROWS])
    (tmp_path / "s.tsv").write_text("".join(f"{c or ''}\t{u}\n" for u, c in ROWS))
    return {
        "parquet": SourceConfig(
            name="web",
            path=str(tmp_path / "s.parquet"),
            format="parquet",
            url_column="URL",
            caption_column="TEXT",
        ),
        "jsonl": SourceConfig(name="web", path=str(tmp_path / "s.jsonl"), format="jsonl"),
        "csv": SourceConfig(name="web", path=str(tmp_path / "s.csv"), format="csv"),
        "tsv": SourceConfig(
            name="web",
            path=str(tmp_path / "s.tsv"),
            format="tsv",
            header=False,
            column_names=["caption", "url"],
        ),
    }


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "csv", "tsv"])
def test_every_format_gives_one_decision_per_row_and_the_same_fates(tmp_path: Path, fmt: str) -> None:
    _, decisions, kept = ingest(write_sources(tmp_path)[fmt])
    assert decisions.num_rows == len(ROWS)
    reasons = decisions.column("reason").to_pylist()
    assert reasons[0] is None and reasons[1] is None
    assert reasons[2] == "invalid_url" and reasons[4] == "invalid_url"
    assert reasons[3] == "duplicate_row"
    assert decisions.column("kept_sample_id")[3].as_py() == decisions.column("sample_id")[0].as_py()
    assert (
        decisions.column("sample_id")[3].as_py().startswith(decisions.column("sample_id")[0].as_py() + "~dup")
    )
    assert kept.column("url")[0].as_py() == "https://example.com/a.jpg"
    assert kept.column("caption")[1].as_py() == 'a "quoted" caption, with comma'
    assert len(set(decisions.column("sample_id").to_pylist())) == len(ROWS)


def test_sample_ids_do_not_depend_on_the_file_format(tmp_path: Path) -> None:
    sources = write_sources(tmp_path)
    ids = {fmt: ingest(src)[1].column("sample_id").to_pylist()[:4] for fmt, src in sources.items()}
    assert ids["parquet"] == ids["jsonl"] == ids["csv"] == ids["tsv"]
    # the documented formula, computed independently of the ingest code
    payload = b"web\x1fhttps://example.com/a.jpg\x1fAerial view of a harbour\x1f"
    assert ids["parquet"][0] == hashlib.sha256(payload).hexdigest()[:24]
    assert (
        sample_id("web", "https://example.com/a.jpg", None)
        == hashlib.sha256(b"web\x1fhttps://example.com/a.jpg\x1f\x00<null>\x1f").hexdigest()[:24]
    )


def test_extra_columns_travel_as_json(tmp_path: Path) -> None:
    sources = write_sources(tmp_path)
    _, _, kept = ingest(sources["parquet"])
    assert json.loads(kept.column("extra")[1].as_py()) == {"WIDTH": 1}
    _, _, kept = ingest(sources["jsonl"])
    assert json.loads(kept.column("extra")[0].as_py()) == {"subreddit": "earthporn"}


def test_shards_hold_shard_rows_input_rows(tmp_path: Path) -> None:
    outcomes, decisions, _ = ingest(write_sources(tmp_path)["parquet"], shard_rows=4)
    assert [o.decisions.num_rows for o in outcomes] == [4, 2]
    assert decisions.num_rows == len(ROWS)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("HTTPS://Example.com:443/x?a=1#f", "https://example.com/x?a=1"),
        ("http://example.com:8080/x", "http://example.com:8080/x"),
        ("  http://example.com  ", "http://example.com/"),
        ("http://[::1]:80/x", "http://[::1]/x"),
        ("ftp://example.com/x", None),
        ("javascript:alert(1)", None),
        ("http:///nohost", None),
        ("http://example.com:99999/x", None),
        ("not a url", None),
        (None, None),
    ],
)
def test_normalise_url(raw: str | None, expected: str | None) -> None:
    assert normalise_url(raw) == expected


def test_malformed_csv_lines_are_recorded_not_lost(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(
        "url,caption\nhttp://a.com/1.jpg,one\nhttp://a.com/2.jpg,two,EXTRA,FIELDS\nhttp://a.com/3.jpg,three\n"
    )
    _, decisions, kept = ingest(SourceConfig(name="bad", path=str(path), format="csv"))
    assert decisions.num_rows == 3
    assert kept.column("caption").to_pylist() == ["one", "three"]
    (malformed,) = [r for r in decisions.to_pylist() if r["reason"] == "malformed_row"]
    assert "EXTRA" in malformed["detail"]


def test_malformed_jsonl_lines_are_recorded(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"url": "http://a.com/1.jpg", "caption": "one"}\n{not json\n[1, 2]\n')
    _, decisions, _ = ingest(SourceConfig(name="bad", path=str(path), format="jsonl"))
    assert decisions.column("reason").to_pylist() == [None, "malformed_row", "malformed_row"]


def test_missing_column_names_the_file_and_the_column(tmp_path: Path) -> None:
    path = tmp_path / "cols.csv"
    path.write_text("link,text\nhttp://a.com/1.jpg,one\n")
    with pytest.raises(
        SourceError,
        match=r"cols\.csv has no column 'url' \(configured as url_column\); its columns are: link, text",
    ):
        ingest(SourceConfig(name="cols", path=str(path), format="csv"))


def test_missing_file_names_the_source(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match=r"source 'gone': no file at .*nothing\.parquet"):
        ingest(SourceConfig(name="gone", path=str(tmp_path / "nothing.parquet"), format="parquet"))


def test_glob_sources_read_files_in_sorted_order(tmp_path: Path) -> None:
    for part in ("b", "a"):
        (tmp_path / f"part-{part}.jsonl").write_text(
            json.dumps({"url": f"http://x.com/{part}.jpg", "caption": part}) + "\n"
        )
    _, _, kept = ingest(SourceConfig(name="g", path=str(tmp_path / "part-*.jsonl"), format="jsonl"))
    assert kept.column("caption").to_pylist() == ["a", "b"]


@pytest.fixture()
def http_folder(tmp_path: Path):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *args: None  # type: ignore[method-assign]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield tmp_path, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.mark.parametrize("fmt", ["tsv", "parquet", "jsonl"])
def test_sources_over_http(http_folder, fmt: str) -> None:
    folder, base = http_folder
    local = write_sources(folder)[fmt]
    remote = local.model_copy(update={"path": f"{base}/s.{fmt}"})
    assert ingest(remote)[1].to_pylist() == ingest(local)[1].to_pylist()


def test_real_cc3m_tsv_and_laion_parquet(shared_data: Path) -> None:
    web = shared_data / "web_captions"
    cc3m = SourceConfig(
        name="cc3m",
        path=str(web / "Validation_GCC-1.1.0-Validation.tsv"),
        format="tsv",
        header=False,
        column_names=["caption", "url"],
    )
    outcomes, decisions, kept = ingest(cc3m, shard_rows=4000)
    assert decisions.num_rows == 15_833 and len(outcomes) == 4
    assert kept.column("caption")[0].as_py() == "author : a life in photography -- in pictures"
    laion = SourceConfig(
        name="laion",
        path=str(web / "img2dataset_test_10000.parquet"),
        format="parquet",
        url_column="URL",
        caption_column="TEXT",
    )
    _, decisions, kept = ingest(laion)
    assert decisions.num_rows == 10_000
    assert decisions.num_rows == kept.num_rows + sum(
        r is not None for r in decisions.column("reason").to_pylist()
    )


def test_ingest_resumes_from_its_marker_and_reruns_when_the_file_changes(tmp_path: Path) -> None:
    source = write_sources(tmp_path)["csv"]
    layout = Layout(tmp_path / "work")
    first = ingest_source_shards(layout, source, IngestConfig(shard_rows=4), run_id="r1")
    assert not first.skipped and first.counts["kept"] == 3
    marker = read_marker(layout, "ingest", "web")
    assert sorted(marker.outputs) == ["web-00000", "web-00001"]
    again = ingest_source_shards(layout, source, IngestConfig(shard_rows=4), run_id="r2")
    assert again.skipped and again.counts == first.counts
    resharded = ingest_source_shards(layout, source, IngestConfig(shard_rows=10), run_id="r3")
    assert not resharded.skipped
    with open(source.path, "a") as handle:
        handle.write("http://example.com/new.jpg,new row,cc0\n")
    changed = ingest_source_shards(layout, source, IngestConfig(shard_rows=10), run_id="r4")
    assert not changed.skipped and changed.counts["kept"] == 4
