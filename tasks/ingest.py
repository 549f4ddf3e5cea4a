"""ingest: read one source's metadata (Parquet, CSV, TSV, JSONL; local or fsspec URL) into shards.

Each row gets sample_id = hash(source name, normalised URL, raw caption). A row equal to an earlier row of
the same source on those three is dropped as `duplicate_row` (its own id is the kept id plus `~dupN`, and
kept_sample_id names the kept one); a row without an http(s) URL is dropped as `invalid_url`; a line the
CSV/JSON parser cannot read is dropped as `malformed_row`. The caption stays raw; the source's other
columns travel in `extra` as a JSON object.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from prefect import task
from prefect.cache_policies import NO_CACHE

from rs5m.config import IngestConfig, SourceConfig
from storage.layout import Layout, shard_name
from storage.markers import Marker, marker_is_current, read_marker, stage_fingerprint, write_marker
from storage.schemas import INGEST_SCHEMA
from tasks.harness import ShardSummary, commit_shard, now, total_counts
from tasks.retry import retry_if_transient
from tasks.stage import ShardOutcome, decisions

REASONS = {
    "duplicate_row": "same source, normalised URL and raw caption as an earlier row (kept_sample_id names it)",
    "invalid_url": "no http(s) URL with a host",
    "malformed_row": "the source file's line could not be parsed (detail: line and parser message)",
}

READ_BATCH_ROWS = 65_536
# A source's rows before they are cut into shards: INGEST_SCHEMA plus what each row's decision needs.
_ROWS_SCHEMA = pa.schema(
    [pa.field(name, pa.string()) for name in [*INGEST_SCHEMA.names, "reason", "detail", "kept_sample_id"]]
)
_DEFAULT_PORTS = {"http": 80, "https": 443}


class SourceError(ValueError):
    """A source that cannot be ingested as configured (missing file or column); names the file."""


def normalise_url(raw: str | None) -> str | None:
    """Lower-case scheme and host, drop default port and fragment; None if not an http(s) URL with a host."""
    if raw is None:
        return None
    text = raw.strip()
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname:
        return None
    host = parts.hostname.lower()
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    netloc = host if port in (None, _DEFAULT_PORTS[scheme]) else f"{host}:{port}"
    if parts.username or parts.password:
        userinfo = parts.username or ""
        if parts.password:
            userinfo += f":{parts.password}"
        netloc = f"{userinfo}@{netloc}"
    return urlunsplit((scheme, netloc, parts.path or "/", parts.query, ""))


def sample_id(source: str, url: str, caption: str | None) -> str:
    """sha256 of "<source>\\x1f<url>\\x1f<caption>\\x1f" (a null caption as "\\x00<null>"), first 24 hex digits."""
    return sample_ids(source, pa.array([url], pa.string()), pa.array([caption], pa.string()))[0]


# URLs that normalise_url returns unchanged: lower-case http(s) scheme and ASCII host name (no userinfo, port
# or brackets), a path, no fragment, a non-empty query or none, printable ASCII without spaces throughout.
_NORMAL_URL = r"^https?://[a-z0-9._-]+/[\x21\x22\x24-\x3e\x40-\x7e]*(\?[\x21\x22\x24-\x7e]+)?$"


def normalise_urls(raw: pa.Array) -> pa.Array:
    """normalise_url over a string array. One RE2 pass finds the URLs that are normal already (nearly all
    web URLs); only the others (upper case, ports, fragments, non-ASCII, invalid...) go through normalise_url."""
    others = pc.invert(pc.fill_null(pc.match_substring_regex(raw, _NORMAL_URL), False))
    if not pc.any(others).as_py():
        return raw
    normalised = [normalise_url(url) for url in raw.filter(others).to_pylist()]
    return pc.replace_with_mask(raw, others, pa.array(normalised, pa.string()))


def sample_ids(source: str, urls: pa.Array, captions: pa.Array) -> list[str]:
    """sample_id of every row (`urls` has no nulls), as a list: the hashed bytes are joined by Arrow."""
    payloads = pc.binary_join_element_wise(source, urls, pc.fill_null(captions, "\x00<null>"), "", "\x1f")
    sha256 = hashlib.sha256
    return [sha256(payload).hexdigest()[:24] for payload in payloads.cast(pa.binary()).to_pylist()]


def source_files(source: SourceConfig) -> list[str]:
    """The files a source names (a path, a glob, or one fsspec URL), in a fixed order."""
    if "://" in source.path:
        return [source.path]
    matches = sorted(glob.glob(source.path)) if glob.has_magic(source.path) else [source.path]
    if not matches or not Path(matches[0]).exists():
        raise SourceError(f"source {source.name!r}: no file at {source.path}")
    return matches


def source_checksum(source: SourceConfig) -> str | None:
    """sha256 over the source's local files; None for remote sources, which are re-read on every run
    (cheap, and downstream shards still resume: they compare the content of what ingest wrote)."""
    if "://" in source.path:
        return None
    digest = hashlib.sha256()
    for path in source_files(source):
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def _text_batches(source: SourceConfig, path: str, malformed: list[str]) -> Iterator[pa.Table]:
    delimiter = "\t" if source.format == "tsv" else ","
    with fsspec.open(path, "rb") as handle:
        if source.header:  # read the header ourselves: column types must be fixed before the first block
            first_line = handle.readline().decode("utf-8", "replace").rstrip("\r\n")
            names = next(csv.reader([first_line], delimiter=delimiter)) if first_line else []
        else:
            names = list(source.column_names or [])

        def on_invalid_row(row: Any) -> str:
            malformed.append(
                f"line {row.number}: {row.text[:200]!r} ({row.expected_columns} columns expected)"
            )
            return "skip"

        reader = pacsv.open_csv(
            handle,
            read_options=pacsv.ReadOptions(column_names=names, block_size=8 << 20),
            parse_options=pacsv.ParseOptions(
                delimiter=delimiter,
                quote_char='"' if source.format == "csv" else False,
                newlines_in_values=source.format == "csv",
                invalid_row_handler=on_invalid_row,
            ),
            convert_options=pacsv.ConvertOptions(
                column_types={n: pa.string() for n in names},
                strings_can_be_null=False,
                quoted_strings_can_be_null=False,
            ),
        )
        for batch in reader:
            yield pa.Table.from_batches([batch])


def _jsonl_batches(path: str, malformed: list[str]) -> Iterator[pa.Table]:
    rows: list[dict[str, Any]] = []
    with fsspec.open(path, "rt", encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError("not a JSON object")
            except ValueError as error:
                malformed.append(f"line {number}: {line[:200]!r} ({error})")
                continue
            rows.append(row)
            if len(rows) == READ_BATCH_ROWS:
                yield _rows_table(rows)
                rows = []
    if rows:
        yield _rows_table(rows)


def _rows_table(rows: list[dict[str, Any]]) -> pa.Table:
    names = list(dict.fromkeys(key for row in rows for key in row))
    return pa.table({n: pa.array([_as_text(row.get(n)) for row in rows], pa.string()) for n in names})


def _as_text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value)


def _parquet_batches(path: str) -> Iterator[pa.Table]:
    if "://" in path:  # remote: read whole, since HTTP servers need not support range requests
        with fsspec.open(path, "rb") as handle:
            file = pq.ParquetFile(io.BytesIO(handle.read()))
    else:
        file = pq.ParquetFile(path)
    for batch in file.iter_batches(batch_size=READ_BATCH_ROWS):
        yield pa.Table.from_batches([batch])


def read_source(source: SourceConfig, malformed: list[str]) -> Iterator[pa.Table]:
    """The source's rows in file order, in batches; unparseable lines are appended to `malformed`."""
    for path in source_files(source):
        if source.format == "parquet":
            batches = _parquet_batches(path)
        elif source.format == "jsonl":
            batches = _jsonl_batches(path, malformed)
        else:
            batches = _text_batches(source, path, malformed)
        for batch in batches:
            _require_columns(source, path, batch.column_names)
            yield batch


def _require_columns(source: SourceConfig, path: str, columns: list[str]) -> None:
    for role, name in (("url_column", source.url_column), ("caption_column", source.caption_column)):
        if name not in columns:
            raise SourceError(
                f"source {source.name!r}: {path} has no column {name!r} (configured as {role}); "
                f"its columns are: {', '.join(columns)}"
            )


def _extra_json(batch: pa.Table, skip: set[str]) -> list[str | None]:
    extra_names = [n for n in batch.column_names if n not in skip]
    if not extra_names:
        return [None] * batch.num_rows
    rows = batch.select(extra_names).to_pylist()
    return [json.dumps(row, default=str, ensure_ascii=False) for row in rows]


class SourceIngester:
    """Turns a source's rows into ingest shards of `shard_rows` input rows each, remembering the ids seen
    so far (duplicate rows are detected across the whole source)."""

    def __init__(self, source: SourceConfig, config: IngestConfig) -> None:
        self.source = source
        self.config = config
        self._seen: dict[str, int] = {}

    def shards(self) -> Iterator[ShardOutcome]:
        malformed: list[str] = []
        pending = _ROWS_SCHEMA.empty_table()
        for batch in read_source(self.source, malformed):
            pending = pa.concat_tables([pending, self._rows(batch), self._malformed_rows(malformed)])
            malformed.clear()
            while pending.num_rows >= self.config.shard_rows:
                yield self._outcome(pending.slice(0, self.config.shard_rows))
                pending = pending.slice(self.config.shard_rows)
        pending = pa.concat_tables([pending, self._malformed_rows(malformed)])
        if pending.num_rows or not self._seen:
            yield self._outcome(pending)

    def _rows(self, batch: pa.Table) -> pa.Table:
        raw_urls = batch.column(self.source.url_column).cast(pa.string()).combine_chunks()
        captions = batch.column(self.source.caption_column).cast(pa.string()).combine_chunks()
        normalised = normalise_urls(raw_urls)
        urls = pc.coalesce(normalised, raw_urls, "")
        ids = sample_ids(self.source.name, urls, captions)
        n = len(ids)
        reasons: list[str | None] = [None] * n
        details: list[str | None] = [None] * n
        kept_ids: list[str | None] = [None] * n
        for row in pc.indices_nonzero(pc.is_null(normalised)).to_pylist():  # few rows
            raw_url = raw_urls[row].as_py() or ""
            reasons[row], details[row] = "invalid_url", f"not an http(s) URL: {raw_url[:200]!r}"
        seen = self._seen
        if len(set(ids)) == n and seen.keys().isdisjoint(ids):  # the usual batch: no repeats, no loop
            seen.update(dict.fromkeys(ids, 0))
            ids_to_check: list[str] = []
        else:
            ids_to_check = ids
        for row, identity in enumerate(ids_to_check):
            repeats = seen.get(identity)
            if repeats is None:
                seen[identity] = 0
                continue
            seen[identity] = repeats + 1
            ids[row] = f"{identity}~dup{repeats + 1}"
            if reasons[row] is None:
                reasons[row], kept_ids[row], details[row] = "duplicate_row", identity, f"same as {identity}"
        extras = _extra_json(batch, {self.source.url_column, self.source.caption_column})
        return pa.Table.from_arrays(
            [
                pa.array(ids, pa.string()),
                pa.array([self.source.name] * n, pa.string()),
                urls,
                captions,
                pa.array(extras, pa.string()),
                pa.array(reasons, pa.string()),
                pa.array(details, pa.string()),
                pa.array(kept_ids, pa.string()),
            ],
            schema=_ROWS_SCHEMA,
        )

    def _malformed_rows(self, malformed: list[str]) -> pa.Table:
        ids = []
        for message in malformed:
            identity = sample_id(self.source.name, "<malformed>", message)
            self._seen.setdefault(identity, 0)
            ids.append(identity)
        n = len(malformed)
        return pa.Table.from_arrays(
            [
                pa.array(ids, pa.string()),
                pa.array([self.source.name] * n, pa.string()),
                pa.array([""] * n, pa.string()),
                pa.nulls(n, pa.string()),
                pa.nulls(n, pa.string()),
                pa.array(["malformed_row"] * n, pa.string()),
                pa.array(malformed, pa.string()),
                pa.nulls(n, pa.string()),
            ],
            schema=_ROWS_SCHEMA,
        )

    def _outcome(self, rows: pa.Table) -> ShardOutcome:
        rows = rows.combine_chunks()
        return ShardOutcome(
            kept=rows.select(INGEST_SCHEMA.names).filter(pc.is_null(rows.column("reason"))),
            decisions=decisions(
                rows.column("sample_id"),
                rows.column("source"),
                rows.column("reason"),
                rows.column("detail"),
                kept_sample_ids=rows.column("kept_sample_id"),
            ),
        )


def ingest_fingerprint(config: IngestConfig, source: SourceConfig) -> str:
    """The path is left out: the input checksum covers the content, so moving a file reruns nothing."""
    return stage_fingerprint(
        "ingest", {"ingest": config}, identity={"source": source.model_dump_json(exclude={"path"})}
    )


def ingest_source_shards(
    layout: Layout, source: SourceConfig, config: IngestConfig, run_id: str
) -> ShardSummary:
    """Ingest one source into shards `<source>-00000`, ...; the source is the unit of resume (its marker
    lists its shards), since reading it again is cheap next to everything downstream."""
    fingerprint = ingest_fingerprint(config, source)
    checksum = source_checksum(source)
    inputs = {"source": checksum or "remote (re-read every run)"}
    if checksum is not None and marker_is_current(
        read_marker(layout, "ingest", source.name), fingerprint, inputs
    ):
        marker = read_marker(layout, "ingest", source.name)
        return ShardSummary("ingest", source.name, skipped=True, counts=total_counts(marker.counts.values()))
    outputs: dict[str, str] = {}
    counts: dict[str, dict[str, int]] = {}
    for index, outcome in enumerate(SourceIngester(source, config).shards()):
        shard_id = shard_name(source.name, index)
        outputs[shard_id], counts[shard_id] = commit_shard(
            layout, "ingest", shard_id, outcome, INGEST_SCHEMA, run_id, fingerprint
        )
    write_marker(layout, Marker("ingest", source.name, fingerprint, inputs, outputs, counts, run_id, now()))
    return ShardSummary("ingest", source.name, skipped=False, counts=total_counts(counts.values()))


@task(
    name="ingest-source",
    task_run_name="ingest-{source.name}",
    retries=2,
    retry_delay_seconds=[2, 10],
    retry_condition_fn=retry_if_transient,
    cache_policy=NO_CACHE,
)
def ingest_task(workdir: str, source: SourceConfig, config: IngestConfig, run_id: str) -> ShardSummary:
    return ingest_source_shards(Layout(workdir), source, config, run_id)
