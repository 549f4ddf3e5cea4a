"""ingest: formats, ids, duplicate and invalid rows, malformed lines, missing columns, HTTP sources, resume."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import re
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import tasks.ingest as ingest_module
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
    return ingest_with(source, shard_rows=shard_rows)


def ingest_with(source: SourceConfig, **config):
    config.setdefault("shard_rows", 1000)
    outcomes = list(SourceIngester(source, IngestConfig(**config)).shards())
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


# -- dirty web metadata: every non-blank line ends as exactly one row with a fate ------------------------


def nonblank_lines(path: Path, header: bool) -> int:
    return sum(1 for line in path.read_bytes().split(b"\n") if line.strip()) - header


def fates(decisions: pa.Table) -> list[tuple[int | None, str | None]]:
    """(line number named by the detail, reason) of every decision, in order."""
    result = []
    for row in decisions.to_pylist():
        found = re.search(r": line (\d+)[: ]", row["detail"] or "")
        result.append((int(found.group(1)) if found else None, row["reason"]))
    return result


def tsv_source(path: Path, **fields) -> SourceConfig:
    return SourceConfig(
        name="dirty", path=str(path), format="tsv", header=False, column_names=["caption", "url"], **fields
    )


def test_a_latin1_byte_drops_only_its_line_and_encoding_latin1_reads_it(tmp_path: Path) -> None:
    path = tmp_path / "cc.tsv"
    lines = [f"caption {i}\thttp://a.com/{i}.jpg".encode() for i in range(1, 8)]
    lines[3] = "vue aérienne du port\thttp://a.com/4.jpg".encode("latin-1")
    path.write_bytes(b"\n".join(lines) + b"\n")
    _, decisions, kept = ingest(tsv_source(path))
    assert decisions.num_rows == nonblank_lines(path, header=False) == 7
    assert fates(decisions) == [(None, None)] * 3 + [(4, "malformed_row")] + [(None, None)] * 3
    detail = decisions.column("detail")[3].as_py()
    assert detail.startswith("cc.tsv: line 4: invalid UTF-8 (") and " e9 " in detail and "vue a" in detail
    assert kept.column("caption").to_pylist() == [f"caption {i}" for i in (1, 2, 3, 5, 6, 7)]

    _, decisions, kept = ingest(tsv_source(path, encoding="latin-1"))
    assert decisions.num_rows == 7 and decisions.column("reason").null_count == 7
    assert kept.column("caption")[3].as_py() == "vue aérienne du port"


def test_an_unterminated_quote_drops_its_line_and_the_next_line_is_its_own_row(tmp_path: Path) -> None:
    path = tmp_path / "q.csv"
    path.write_text(
        "url,caption\n"
        "http://a.com/1.jpg,one\n"
        'http://a.com/2.jpg,"broken quote\n'
        "http://a.com/3.jpg,three\n"
        'http://a.com/4.jpg,"ok, ""quoted"""\n'
        'http://a.com/5.jpg,"broken again at the end'
    )
    _, decisions, kept = ingest(SourceConfig(name="q", path=str(path), format="csv"))
    assert decisions.num_rows == nonblank_lines(path, header=True) == 5
    assert fates(decisions) == [
        (None, None),
        (3, "malformed_row"),
        (None, None),
        (None, None),
        (6, "malformed_row"),
    ]
    assert decisions.column("detail")[1].as_py() == (
        "q.csv: line 3: quoted value not closed on its line (a line break inside a value needs "
        "multiline_values: true): 'http://a.com/2.jpg,\"broken quote'"
    )
    assert kept.column("caption").to_pylist() == ["one", "three", 'ok, "quoted"']


def test_many_broken_quotes_in_one_chunk_each_cost_one_line(tmp_path: Path) -> None:
    path = tmp_path / "many.csv"
    broken = {7, 8, 500, 2001, 4000, 6001}
    lines = ["url,caption"] + [
        f'http://a.com/{i}.jpg,"caption {i}' if i in broken else f"http://a.com/{i}.jpg,caption {i}"
        for i in range(2, 6002)
    ]
    path.write_text("\n".join(lines) + "\n")
    _, decisions, kept = ingest(SourceConfig(name="many", path=str(path), format="csv"), shard_rows=10_000)
    assert decisions.num_rows == 6000
    assert [line for line, reason in fates(decisions) if reason] == sorted(broken)
    assert kept.num_rows == 6000 - len(broken)
    assert kept.column("caption")[-1].as_py() == "caption 6000"


@pytest.mark.parametrize("chunk_bytes", [None, 1 << 16])
def test_a_line_over_max_line_bytes_is_dropped_and_a_long_caption_is_caption_too_long(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk_bytes: int | None
) -> None:
    if chunk_bytes:  # the 2 MB line spans many blocks: skipped without being held
        monkeypatch.setattr(ingest_module, "CHUNK_BYTES", chunk_bytes)
    path = tmp_path / "long.csv"
    path.write_bytes(
        b"url,caption\n"
        b"http://a.com/1.jpg,one\n"
        b"http://a.com/2.jpg," + b"x" * (2 << 20) + b"\n"
        b"http://a.com/3.jpg," + "é".encode() * 5000 + b"\n"
        b"http://a.com/4.jpg,four\n"
    )
    _, decisions, kept = ingest(SourceConfig(name="long", path=str(path), format="csv"))
    assert decisions.num_rows == nonblank_lines(path, header=True) == 4
    assert fates(decisions) == [(None, None), (3, "malformed_row"), (None, "caption_too_long"), (None, None)]
    details = decisions.column("detail").to_pylist()
    assert details[1].startswith(
        "long.csv: line 3 is longer than max_line_bytes (2,097,171 bytes > 1,048,576): 'http://a.com/2.jpg,xxx"
    )
    assert details[2] == "caption of 5,000 characters, over max_caption_chars 4,096"
    assert kept.column("caption").to_pylist() == ["one", "four"]
    _, decisions, _ = ingest_with(
        SourceConfig(name="long", path=str(path), format="csv"), max_caption_chars=5000
    )
    assert decisions.column("reason").to_pylist() == [None, "malformed_row", None, None]


def test_a_file_without_any_newline_is_one_malformed_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ingest_module, "CHUNK_BYTES", 1 << 12)
    path = tmp_path / "blob.jsonl"
    path.write_bytes(b"{" + b"x" * 100_000)
    _, decisions, kept = ingest_with(
        SourceConfig(name="blob", path=str(path), format="jsonl"), max_line_bytes=10_000
    )
    assert fates(decisions) == [(1, "malformed_row")] and kept.num_rows == 0
    assert (
        "line 1 is longer than max_line_bytes (100,001 bytes > 10,000)"
        in decisions.column("detail")[0].as_py()
    )
    header_csv = tmp_path / "header.csv"
    header_csv.write_bytes(b"url," + b"c" * 20_000 + b"\nhttp://a.com/1.jpg,one\n")
    with pytest.raises(SourceError, match=r"header\.csv: the header line is longer than max_line_bytes"):
        ingest_with(SourceConfig(name="h", path=str(header_csv), format="csv"), max_line_bytes=10_000)


def test_crlf_a_byte_order_mark_and_no_newline_at_the_end(tmp_path: Path) -> None:
    path = tmp_path / "win.csv"
    path.write_bytes(
        b'\xef\xbb\xbfurl,caption\r\nhttp://a.com/1.jpg,one\r\n\r\nhttp://a.com/2.jpg,"two, quoted"\r\n'
        b"http://a.com/3.jpg,three"
    )
    _, decisions, kept = ingest(SourceConfig(name="win", path=str(path), format="csv"))
    assert decisions.num_rows == nonblank_lines(path, header=True) == 3
    assert decisions.column("reason").null_count == 3
    assert kept.column("caption").to_pylist() == ["one", "two, quoted", "three"]
    tsv = tmp_path / "win.tsv"
    tsv.write_bytes(b"\xef\xbb\xbfone\thttp://a.com/1.jpg\r\ntwo\thttp://a.com/2.jpg")
    _, _, kept = ingest(tsv_source(tsv))
    assert kept.column("caption").to_pylist() == ["one", "two"]


def test_a_carriage_return_inside_a_line_is_malformed(tmp_path: Path) -> None:
    path = tmp_path / "cr.tsv"
    path.write_bytes(b"one\thttp://a.com/1.jpg\ntw\ro\thttp://a.com/2.jpg\n   \nthree\thttp://a.com/3.jpg\n")
    _, decisions, _ = ingest(tsv_source(path))
    assert fates(decisions) == [(None, None), (2, "malformed_row"), (None, None)]
    assert "carriage return inside the line" in decisions.column("detail")[1].as_py()


def test_jsonl_invalid_utf8_and_json_that_is_not_an_object(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(
        b'{"url": "http://a.com/1.jpg", "caption": "one"}\n'
        b'{"url": "http://a.com/2.jpg", "caption": "caf\xe9"}\n'
        b"\n"
        b"[1, 2]\n"
        b'"just a string"\n'
        b"{not json\n"
        b'{"url": "http://a.com/3.jpg", "caption": "three"}'
    )
    _, decisions, kept = ingest(SourceConfig(name="j", path=str(path), format="jsonl"))
    assert decisions.num_rows == nonblank_lines(path, header=False) == 6
    assert fates(decisions) == [
        (None, None),
        (2, "malformed_row"),
        (4, "malformed_row"),
        (5, "malformed_row"),
        (6, "malformed_row"),
        (None, None),
    ]
    details = decisions.column("detail").to_pylist()
    assert details[1].startswith(
        "bad.jsonl: line 2: invalid UTF-8 (invalid continuation byte: e9 at byte 45)"
    )
    assert details[2] == "bad.jsonl: line 4: valid JSON but not an object (a JSON array): '[1, 2]'"
    assert details[3].startswith("bad.jsonl: line 5: valid JSON but not an object (a JSON string)")
    assert details[4].startswith("bad.jsonl: line 6: not JSON (")
    assert kept.column("caption").to_pylist() == ["one", "three"]
    _, decisions, kept = ingest(SourceConfig(name="j", path=str(path), format="jsonl", encoding="latin-1"))
    assert kept.column("caption").to_pylist() == ["one", "café", "three"]


def test_other_encodings_are_transcoded_and_bytes_they_lack_are_malformed(tmp_path: Path) -> None:
    utf16 = tmp_path / "u16.csv"
    utf16.write_bytes(
        "url,caption\nhttp://a.com/1.jpg,vue aérienne\nhttp://a.com/2.jpg,港口\n".encode("utf-16")
    )
    _, _, kept = ingest(SourceConfig(name="u", path=str(utf16), format="csv", encoding="utf-16"))
    assert kept.column("caption").to_pylist() == ["vue aérienne", "港口"]
    cp1252 = tmp_path / "cp.csv"
    cp1252.write_bytes(
        b"url,caption\nhttp://a.com/1.jpg,\x93smart quotes\x94\nhttp://a.com/2.jpg,undefined \x81\n"
    )
    _, decisions, kept = ingest(SourceConfig(name="c", path=str(cp1252), format="csv", encoding="cp1252"))
    assert kept.column("caption").to_pylist() == ["\u201csmart quotes\u201d"]
    assert fates(decisions) == [(None, None), (3, "malformed_row")]
    assert decisions.column("detail")[1].as_py().startswith("cp.csv: line 3: not valid cp1252 (byte 0x81)")
    with pytest.raises(SourceError, match=r"cp\.csv: the header line is not valid utf-8"):
        cp1252.write_bytes(b"url,capti\xf3n\nhttp://a.com/1.jpg,one\n")
        ingest(SourceConfig(name="c", path=str(cp1252), format="csv"))


def test_bad_lines_at_the_same_line_of_two_files_get_distinct_ids_naming_their_files(tmp_path: Path) -> None:
    for folder in ("x", "y"):
        (tmp_path / "src" / folder).mkdir(parents=True)
        (tmp_path / "src" / folder / "part.jsonl").write_text(
            json.dumps({"url": f"http://a.com/{folder}.jpg", "caption": folder}) + "\n{broken\n"
        )
    source = SourceConfig(name="g", path=str(tmp_path / "src" / "*" / "part.jsonl"), format="jsonl")
    _, decisions, _ = ingest(source)
    bad = [row for row in decisions.to_pylist() if row["reason"] == "malformed_row"]
    assert [row["detail"].split(": not JSON")[0] for row in bad] == [
        "x/part.jsonl: line 2",
        "y/part.jsonl: line 2",
    ]
    assert bad[0]["sample_id"] != bad[1]["sample_id"]
    (tmp_path / "src").rename(tmp_path / "moved")  # ids do not depend on where the folder is
    moved = source.model_copy(update={"path": str(tmp_path / "moved" / "*" / "part.jsonl")})
    assert ingest(moved)[1].column("sample_id").to_pylist() == decisions.column("sample_id").to_pylist()


DIRTY_CSV = [
    b"url,caption,license",  # line 1: header
    b"http://a.com/1.jpg,one,cc0",
    b'http://a.com/2.jpg,"broken quote,cc0',
    b"http://a.com/3.jpg,three,cc0",
    b"http://a.com/4.jpg,caf\xe9,cc0",
    b"",
    b"http://a.com/5.jpg," + b"z" * 1000 + b",cc0",
    b'http://a.com/6.jpg,"quoted, with comma",cc0',
    b"http://a.com/7.jpg,too,many,fields",
    b"http://a.com/8.jpg,a\rb,cc0",
    b'http://a.com/9.jpg,"another broken,cc0',
    b"http://a.com/10.jpg,last,cc0",  # no newline after it
]
DIRTY_CSV_FATES = [
    (None, None),
    (3, "malformed_row"),
    (None, None),
    (5, "malformed_row"),
    (7, "malformed_row"),
    (None, None),
    (9, "malformed_row"),
    (10, "malformed_row"),
    (11, "malformed_row"),
    (None, None),
]


@pytest.mark.parametrize("newline", [b"\n", b"\r\n"])
@pytest.mark.parametrize("chunk_bytes", [7, 100, None])
def test_fates_do_not_depend_on_how_the_file_is_cut_into_chunks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, newline: bytes, chunk_bytes: int | None
) -> None:
    if chunk_bytes:
        monkeypatch.setattr(ingest_module, "CHUNK_BYTES", chunk_bytes)
    monkeypatch.setattr(ingest_module, "_PIECE_BYTES", 50)
    path = tmp_path / "dirty.csv"
    path.write_bytes(newline.join(DIRTY_CSV))
    _, decisions, kept = ingest_with(SourceConfig(name="d", path=str(path), format="csv"), max_line_bytes=300)
    assert decisions.num_rows == nonblank_lines(path, header=True) == len(DIRTY_CSV_FATES)
    assert fates(decisions) == DIRTY_CSV_FATES
    assert kept.column("caption").to_pylist() == ["one", "three", "quoted, with comma", "last"]
    assert len(set(decisions.column("sample_id").to_pylist())) == decisions.num_rows
    problems = [d.split(": ", 2)[1:] for d in decisions.column("detail").to_pylist() if d]
    assert [p[0].startswith("line ") for p in problems] == [True] * 6
    assert problems[0][1].startswith("quoted value not closed on its line")
    assert problems[1][1].startswith("invalid UTF-8")
    assert problems[2][0].startswith("line 7 is longer than max_line_bytes (1,023 bytes > 300)") or problems[
        2
    ][0].startswith("line 7 is longer than max_line_bytes (1,024 bytes > 300)")
    assert problems[3][1].startswith("4 fields, 3 expected")
    assert problems[4][1].startswith("carriage return inside the line")


@pytest.mark.parametrize("batch_rows", [None, 1])
def test_multiline_values_reads_quoted_line_breaks_and_a_stray_quote_costs_its_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, batch_rows: int | None
) -> None:
    if batch_rows:
        monkeypatch.setattr(ingest_module, "READ_BATCH_ROWS", batch_rows)
    path = tmp_path / "multi.csv"
    path.write_text(
        "url,caption\n"
        'http://a.com/1.jpg,"two-line\n'  # line 2
        'caption"\n'
        "http://a.com/2.jpg,bad,EXTRA\n"  # line 4
        'http://a.com/3.jpg,"stray quote\n'  # line 5: its value would run to line 7, with 3 fields
        "http://a.com/4.jpg,four\n"
        'http://a.com/5.jpg,"five" and more,x\n'  # line 7
        "\n"
        'http://a.com/6.jpg,"unterminated at the end'  # line 9
    )
    source = SourceConfig(name="m", path=str(path), format="csv", multiline_values=True)
    _, decisions, kept = ingest(source)
    assert fates(decisions) == [
        (None, None),
        (4, "malformed_row"),
        (5, "malformed_row"),
        (None, None),
        (7, "malformed_row"),
        (9, "malformed_row"),
    ]
    details = decisions.column("detail").to_pylist()
    assert details[2].startswith(
        "multi.csv: line 5: 3 fields, 2 expected (a quoted value runs from this line to line 7)"
    )
    assert details[5].startswith("multi.csv: line 9: quoted value not closed before the end of the file")
    assert kept.column("caption").to_pylist() == ["two-line\ncaption", "four"]

    runaway = tmp_path / "runaway.csv"
    runaway.write_text(
        "url,caption\n"
        + 'http://a.com/0.jpg,"stray\n'
        + "".join(f"http://a.com/{i}.jpg,c{i}\n" for i in range(1, 40))
        + 'http://a.com/x.jpg,"closed here",extra\n'
    )
    _, decisions, kept = ingest_with(
        SourceConfig(name="r", path=str(runaway), format="csv", multiline_values=True), max_line_bytes=200
    )
    assert fates(decisions)[0] == (2, "malformed_row") and fates(decisions)[-1] == (42, "malformed_row")
    assert "still open after max_line_bytes (200 bytes)" in decisions.column("detail")[0].as_py()
    assert kept.column("caption").to_pylist() == [f"c{i}" for i in range(1, 40)]
