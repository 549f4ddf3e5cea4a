"""ingest: read one source's metadata (Parquet, CSV, TSV, JSONL; local or fsspec URL) into shards.

Each row gets sample_id = hash(source name, normalised URL, raw caption). A row equal to an earlier row of
the same source on those three is dropped as `duplicate_row` (its own id is the kept id plus `~dupN`, and
kept_sample_id names the kept one); a row without an http(s) URL is dropped as `invalid_url`; a caption
over `max_caption_chars` as `caption_too_long`. The caption stays raw; the source's other columns travel in
`extra` as a JSON object.

Text sources (CSV, TSV, JSONL) are read in chunks of whole lines, transcoded to UTF-8 first when the
source names another encoding. One physical line is one row (CSV with `multiline_values`: one record): a
line that is not one readable row (wrong number of fields, a quote not closed on its line, bytes invalid
in the encoding, not a JSON object, over `max_line_bytes`) is dropped as `malformed_row`, its detail and
sample_id naming its file and line number, and never takes other lines with it. Blank lines are skipped.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import functools
import glob
import hashlib
import io
import itertools
import json
import operator
import os
import posixpath
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from rs5m.config import IngestConfig, SourceConfig
from storage.layout import Layout
from storage.markers import (
    Verification,
    stage_fingerprint,
)
from storage.schemas import INGEST_SCHEMA
from tasks.harness import Report, ShardSummary, SourceStage, run_source
from tasks.seen_ids import SeenIds
from tasks.stage import ShardOutcome, decisions

REASONS = {
    "duplicate_row": "same source, normalised URL and raw caption as an earlier row (kept_sample_id names it)",
    "invalid_url": "no http(s) URL with a host",
    "malformed_row": "a line of the source file that is not one readable row: wrong number of fields, broken "
    "quoting, a carriage return inside it, bytes invalid in the source's encoding, not a JSON object, longer "
    "than max_line_bytes "
    "(detail: `<file>: line N: <problem>: <the line's start>`)",
    "caption_too_long": "the caption is longer than ingest.max_caption_chars characters (detail: its length "
    "and the limit)",
}

READ_BATCH_ROWS = 65_536
# CSV/TSV/JSONL are read in chunks of whole lines of about this many bytes (a longer line stays whole, up to
# max_line_bytes); each chunk is parsed on its own, so nothing holds more than a chunk and a line.
CHUNK_BYTES = 8 << 20
# After a broken quote, the rest of its chunk is parsed in pieces starting at this size (doubling after each
# clean piece), so a further broken quote costs at most a small piece parsed twice. Also the window in which
# invalid UTF-8 is looked for line by line.
_PIECE_BYTES = 64 << 10
_ARROW_BLOCK_BYTES = 1 << 20
_RAW_PREFIX_BYTES = 1024  # of a malformed line: hashed into its sample_id
_SHOWN_BYTES = 200  # of a malformed line: shown in its detail
_BOM = b"\xef\xbb\xbf"
_NEWLINE = 10
_CARRIAGE_RETURN = 13
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


def malformed_sample_id(source: str, file: str, line: int, raw: bytes) -> str:
    """sample_id of a malformed line: sha256 of "<source>\\x1f<malformed>\\x1f<file>\\x1f<line>\\x1f<the
    line's first 1 KiB of raw bytes>\\x1f", first 24 hex digits; `file` as source_file_label names it."""
    parts = [
        source.encode(),
        b"<malformed>",
        file.encode("utf-8", "surrogateescape"),
        str(line).encode(),
        raw[:_RAW_PREFIX_BYTES],
    ]
    return hashlib.sha256(b"\x1f".join(parts) + b"\x1f").hexdigest()[:24]


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


def source_file_label(source: SourceConfig, path: str) -> str:
    """How details and malformed-row ids name one of the source's files, stable when the source's folder
    moves: a glob's file by its path below the glob's fixed leading folders, a single file or a URL by its
    base name."""
    if "://" in path:
        return posixpath.basename(urlsplit(path).path) or path
    if not glob.has_magic(source.path):
        return Path(path).name
    pattern = Path(source.path)
    fixed = next(i for i, part in enumerate(pattern.parts) if glob.has_magic(part))
    return Path(os.path.relpath(path, Path(*pattern.parts[:fixed]) if fixed else ".")).as_posix()


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


@dataclass(frozen=True)
class Malformed:
    """An input line that is not one readable row: its 1-based line number in its file, what is wrong with
    it, and the start of its raw bytes (hashed into its sample_id, and shown in its detail)."""

    line: int
    problem: str
    raw: bytes = b""

    def detail(self, file: str) -> str:
        joiner = " " if self.problem.startswith("is ") else ": "
        text = f"{file}: line {self.line}{joiner}{self.problem}"
        if self.raw:
            text += f": {self.raw[:_SHOWN_BYTES].decode('utf-8', 'replace')!r}"
        return text


@dataclass(frozen=True)
class SourceBatch:
    """Rows read from one file of a source: `table` holds the rows that parsed (url and caption columns
    as strings), `lines` their line numbers (None for Parquet), `malformed` the lines that did not parse."""

    file: str
    table: pa.Table
    lines: np.ndarray | None
    malformed: list[Malformed] = field(default_factory=list)


# -- reading text files: UTF-8 lines in chunks -----------------------------------------------------------

_MARK_ERRORS = "rs5m-ingest-mark"


def _mark_undecodable(error: UnicodeError) -> tuple[str, int]:
    """Decode error handler of the transcoder: each undecodable byte b becomes the lone surrogate
    U+DC00+b, whose UTF-8 form is invalid, so the UTF-8 check drops the line and names the byte."""
    if not isinstance(error, UnicodeDecodeError):
        raise error
    return "".join(chr(0xDC00 + byte) for byte in error.object[error.start : error.end]), error.end


codecs.register_error(_MARK_ERRORS, _mark_undecodable)


@functools.lru_cache(maxsize=64)
def _is_utf8(encoding: str) -> bool:
    return codecs.lookup(encoding).name == "utf-8"


class _Transcoder:
    """A binary reader over `raw` (in `encoding`) whose read() returns UTF-8, decoding incrementally."""

    def __init__(self, raw: Any, encoding: str) -> None:
        self._raw = raw
        self._decoder = codecs.getincrementaldecoder(encoding)(errors=_MARK_ERRORS)
        self._done = False

    def read(self, size: int) -> bytes:
        while not self._done:
            block = self._raw.read(size)
            self._done = not block
            text = self._decoder.decode(block, final=self._done)
            if text:
                return text.encode("utf-8", "surrogatepass")
        return b""


def _count_newlines(data: bytes) -> int:
    return int(np.count_nonzero(np.frombuffer(data, np.uint8) == _NEWLINE))


def _newlines(data: bytes) -> np.ndarray:
    """Positions of the b"\\n" bytes; line i of `data` is data[starts[i]:ends[i]] (see _line_bounds)."""
    return np.flatnonzero(np.frombuffer(data, np.uint8) == _NEWLINE)


def _line_start(ends: np.ndarray, index: int) -> int:
    return int(ends[index - 1]) + 1 if index else 0


def _drop_long_lines(data: bytes, first: int, limit: int, dropped: list[Malformed]) -> bytes:
    """`data` (whole lines) with every line over `limit` bytes emptied (its b"\\n" stays, so line numbers
    do not move), each recorded in `dropped`. About len(data)/limit rfind calls: no per-line work."""
    pos, counted, counted_to = 0, 0, 0
    kept: list[bytes] = []
    kept_from = 0
    while len(data) - pos > limit + 1:
        last_newline = data.rfind(b"\n", pos, pos + limit + 1)
        if last_newline >= 0:  # every line that starts in this window is at most `limit` bytes
            pos = last_newline + 1
            continue
        end = data.find(b"\n", pos + limit + 1)  # `data` ends with a newline
        counted += data.count(b"\n", counted_to, pos)
        counted_to = pos
        dropped.append(
            Malformed(
                first + counted,
                f"is longer than max_line_bytes ({end - pos:,} bytes > {limit:,})",
                data[pos : min(end, pos + _RAW_PREFIX_BYTES)],
            )
        )
        kept.append(data[kept_from:pos])
        kept_from, pos = end, end + 1
    if not kept:
        return data
    kept.append(data[kept_from:])
    return b"".join(kept)


# (first line number, whole lines ending with b"\n", their number, lines dropped before or in them)
_Chunk = tuple[int, bytes, int, list[Malformed]]


def _whole_lines(reader: Any, limit: int) -> Iterator[_Chunk]:
    """The file in chunks of whole lines of about CHUNK_BYTES; every chunk ends with b"\n" (one is added
    after a last line without it), a UTF-8 byte order mark at the start of the file is left out. A line
    over `limit` bytes is emptied in its chunk, or, when no newline comes within `limit` bytes, skipped up
    to the next newline without being held; either way it is reported as dropped. Clean input costs one
    copy of each block (joining the previous block's partial last line)."""
    line = 1
    carry = b""
    dropped: list[Malformed] = []
    block = reader.read(CHUNK_BYTES)
    while 0 < len(block) < len(_BOM) and (more := reader.read(CHUNK_BYTES)):
        block += more
    if block.startswith(_BOM):
        block = block[len(_BOM) :]
        if not block:
            block = reader.read(CHUNK_BYTES)
    while True:
        if not block:
            if carry:
                data = carry if carry.endswith(b"\n") else carry + b"\n"
                data = _drop_long_lines(data, line, limit, dropped)
                yield line, data, _count_newlines(data), dropped
            elif dropped:
                yield line, b"", 0, dropped
            return
        cut = block.rfind(b"\n") + 1
        if not cut:  # no line ends in this block
            carry += block
            if len(carry) > limit:
                size, prefix, carry = len(carry), carry[:_RAW_PREFIX_BYTES], b""
                while block := reader.read(CHUNK_BYTES):
                    end = block.find(b"\n")
                    if end >= 0:
                        size, carry = size + end, block[end + 1 :]
                        break
                    size += len(block)
                reason = f"is longer than max_line_bytes ({size:,} bytes > {limit:,})"
                dropped.append(Malformed(line, reason, prefix))
                line += 1
            block = reader.read(CHUNK_BYTES)
            continue
        if carry or cut < len(block):
            data = b"".join((carry, memoryview(block)[:cut]))
            carry = block[cut:]
        else:
            data = block
        data = _drop_long_lines(data, line, limit, dropped)
        n_lines = _count_newlines(data)
        yield line, data, n_lines, dropped
        dropped = []
        line += n_lines
        block = reader.read(CHUNK_BYTES)


def _valid_utf8(data: bytes) -> bool:
    offsets = pa.py_buffer(np.array([0, len(data)], np.int64))
    try:
        pa.Array.from_buffers(pa.large_string(), 1, [None, offsets, pa.py_buffer(data)]).validate(full=True)
    except pa.ArrowInvalid:
        return False
    return True


def _decode_problem(line: bytes, error: UnicodeDecodeError, encoding: str) -> str:
    """What is wrong with a line whose UTF-8 form does not decode: invalid UTF-8 in a UTF-8 source, or a
    byte the transcoder marked (U+DC00 + byte) in another encoding."""
    if not _is_utf8(encoding):
        try:
            marked = line[error.start : error.start + 3].decode("utf-8", "surrogatepass")
        except UnicodeDecodeError:
            marked = ""
        if len(marked) == 1 and 0xDC00 <= ord(marked) <= 0xDCFF:
            return f"not valid {encoding} (byte 0x{ord(marked) - 0xDC00:02x})"
    bad = line[error.start : error.end]
    return f"invalid UTF-8 ({error.reason}: {bad.hex(' ')} at byte {error.start})"


def _empty_lines(data: bytes, ends: np.ndarray, indices: Iterable[int]) -> bytes:
    """`data` with the given lines emptied (their b"\\n" stays)."""
    parts: list[bytes] = []
    kept_from = 0
    for index in sorted(indices):
        parts.append(data[kept_from : _line_start(ends, index)])
        kept_from = int(ends[index])
    parts.append(data[kept_from:])
    return b"".join(parts)


def _check_lines(
    data: bytes, first: int, encoding: str, lone_carriage_returns: bool, malformed: list[Malformed]
) -> bytes:
    """`data` with every line that does not decode as UTF-8 (after transcoding: that was not valid in
    `encoding`) emptied and recorded; with lone_carriage_returns, also every line holding a b"\\r" that is
    not part of a CRLF line end (CSV/TSV parsers would end the row there). Clean data costs two scans."""
    bad: dict[int, Malformed] = {}
    ends: np.ndarray | None = None
    if not _valid_utf8(data):  # find the bad lines: windows of lines checked at once, then line by line
        ends = _newlines(data)
        pos = 0
        while pos < len(data):
            end = len(data)
            if end - pos > _PIECE_BYTES:
                end = (
                    data.rfind(b"\n", pos, pos + _PIECE_BYTES) + 1 or data.find(b"\n", pos + _PIECE_BYTES) + 1
                )
            window = data[pos:end]
            if not _valid_utf8(window):
                index = int(np.searchsorted(ends, pos))
                for offset, line in enumerate(window.split(b"\n")[:-1]):
                    try:
                        line.decode("utf-8")
                    except UnicodeDecodeError as error:
                        problem = _decode_problem(line, error, encoding)
                        raw = line[:_RAW_PREFIX_BYTES]
                        bad[index + offset] = Malformed(first + index + offset, problem, raw)
            pos = end
    if lone_carriage_returns and b"\r" in data:
        codes = np.frombuffer(data, np.uint8)
        returns = np.flatnonzero(codes == _CARRIAGE_RETURN)
        lone = returns[codes[returns + 1] != _NEWLINE]  # `data` ends with b"\n": returns + 1 is in range
        if lone.size:
            ends = _newlines(data) if ends is None else ends
            for index in np.unique(np.searchsorted(ends, lone)).tolist():
                start, end = _line_start(ends, index), int(ends[index])
                problem = "carriage return inside the line, not at its end"
                raw = data[start : min(end, start + _RAW_PREFIX_BYTES)]
                bad.setdefault(index, Malformed(first + index, problem, raw))
    if not bad:
        return data
    malformed.extend(bad.values())
    assert ends is not None
    return _empty_lines(data, ends, bad)


def _read_header(
    source: SourceConfig, path: str, chunks: Iterator[_Chunk]
) -> tuple[list[str] | None, Iterator[_Chunk]]:
    """The column names (header line or column_names) and the remaining chunks; SourceError if the header
    line cannot be read or lacks the configured columns. None for an empty file."""
    delimiter = "\t" if source.format == "tsv" else ","
    if not source.header:
        names = list(source.column_names or [])
        _require_columns(source, path, names)
        return names, chunks
    for first, data, n_lines, dropped in chunks:
        if any(item.line == 1 for item in dropped):
            raise SourceError(
                f"source {source.name!r}: {path}: the header line is longer than max_line_bytes"
            )
        if not data:
            continue
        end = data.find(b"\n")
        try:
            text = data[:end].rstrip(b"\r").decode("utf-8")
        except UnicodeDecodeError as error:
            raise SourceError(
                f"source {source.name!r}: {path}: the header line is not valid {source.encoding} "
                f"({error.reason}); set the source's encoding"
            ) from None
        names = next(csv.reader([text], delimiter=delimiter), [])
        _require_columns(source, path, names)
        rest = [(first + 1, data[end + 1 :], n_lines - 1, dropped)] if n_lines > 1 or dropped else []
        return names, itertools.chain(rest, chunks)
    return None, iter(())


_QUOTE_NOT_CLOSED = (
    "quoted value not closed on its line (a line break inside a value needs multiline_values: true)"
)


class _DelimitedParser:
    """Parses chunks of whole, clean lines (valid UTF-8, no lone b"\\r", none over max_line_bytes) of a
    CSV or TSV file into rows, one physical line per row: a line with the wrong number of fields, or (CSV)
    a quote that is not closed on its line, is a Malformed line and never takes the next lines with it."""

    def __init__(self, source: SourceConfig, names: list[str]) -> None:
        self.names = names
        self.quoted = source.format == "csv"
        self._delimiter = "\t" if source.format == "tsv" else ","
        self._convert = pacsv.ConvertOptions(
            column_types={name: pa.string() for name in names},
            check_utf8=False,  # checked per chunk already (_check_lines)
            strings_can_be_null=False,
            quoted_strings_can_be_null=False,
        )

    def _read(self, data: bytes, exact: bool, invalid: list[tuple[int | None, str, int, int]]) -> pa.Table:
        """exact: one block, one thread, so invalid rows get their numbers and an unclosed quote runs to
        the end of `data` (split into blocks, pyarrow fails on it: "parser got out of sync")."""

        def on_invalid(row: Any) -> str:
            invalid.append((row.number, row.text, row.expected_columns, row.actual_columns))
            return "skip"

        return pacsv.read_csv(
            pa.py_buffer(data),
            read_options=pacsv.ReadOptions(
                column_names=self.names,
                use_threads=not exact,
                block_size=len(data) + 1 if exact else _ARROW_BLOCK_BYTES,
            ),
            parse_options=pacsv.ParseOptions(
                delimiter=self._delimiter,
                quote_char='"' if self.quoted else False,
                newlines_in_values=False,
                ignore_empty_lines=True,
                invalid_row_handler=on_invalid,
            ),
            convert_options=self._convert,
        )

    def parse(
        self, data: bytes, first: int, n_lines: int
    ) -> Iterator[tuple[pa.Table, np.ndarray, list[Malformed]]]:
        if not n_lines:
            return
        invalid: list[tuple[int | None, str, int, int]] = []
        try:  # the usual chunk: every line one row, read on all cores
            table = self._read(data, exact=False, invalid=invalid)
            # a quote left open on the last line of one of pyarrow's blocks swallows only its line break
            swallowed = self.quoted and b'"' in data and _first_row_with_newline(table) is not None
            if not invalid and table.num_rows == n_lines and not swallowed:
                yield table, np.arange(first, first + n_lines, dtype=np.int64), []
                return
        except pa.ArrowInvalid:
            pass
        yield from self._parse_exactly(data, first)

    def _parse_exactly(
        self, data: bytes, first: int
    ) -> Iterator[tuple[pa.Table, np.ndarray, list[Malformed]]]:
        offset, line, piece_bytes = 0, first, len(data)
        while offset < len(data):
            end = len(data)
            if end - offset > piece_bytes:
                end = (
                    data.rfind(b"\n", offset, offset + piece_bytes) + 1
                    or data.find(b"\n", offset + piece_bytes) + 1
                )
            piece = data[offset:end]
            table, lines, malformed, broken = self._parse_piece(piece, line)
            yield table, lines, malformed
            if broken is None:
                offset, line = end, line + _count_newlines(piece)
                piece_bytes *= 2
            else:  # read again from the line after the broken one, in small pieces
                index, broken_end = broken
                offset, line, piece_bytes = offset + broken_end + 1, line + index + 1, _PIECE_BYTES

    def _parse_piece(
        self, piece: bytes, first: int
    ) -> tuple[pa.Table, np.ndarray, list[Malformed], tuple[int, int] | None]:
        """Rows, their line numbers, malformed lines, and (index, end) of the first line whose quote is not
        closed on it (the rows after it are left out: the caller reads them again) or None."""
        invalid: list[tuple[int | None, str, int, int]] = []
        table = self._read(piece, exact=True, invalid=invalid)
        codes = np.frombuffer(piece, np.uint8)
        ends = _newlines(piece)
        starts = np.concatenate(([0], ends[:-1] + 1))
        lengths = ends - starts
        blank = (lengths == 0) | ((lengths == 1) & (codes[starts] == _CARRIAGE_RETURN))
        nonblank = np.flatnonzero(~blank)  # pyarrow numbers rows among these: row.number - 1 is the index
        is_row = np.ones(table.num_rows + len(invalid), dtype=bool)
        is_row[[number - 1 for number, *_ in invalid]] = False
        row_positions = np.flatnonzero(is_row)
        broken = None
        cut = self._first_broken(table, row_positions, invalid) if self.quoted else None
        if cut is not None:  # pyarrow's rows from this one on are wrong: the caller reads them again
            kept_rows = int(np.searchsorted(row_positions, cut))
            table, row_positions = table.slice(0, kept_rows), row_positions[:kept_rows]
            invalid = [item for item in invalid if item[0] - 1 < cut]
            index = int(nonblank[cut])
            start = _line_start(ends, index)
            broken = (index, int(ends[index]))
        elif len(nonblank) != len(is_row):
            raise RuntimeError(
                f"ingest: pyarrow read {len(is_row)} rows from {len(nonblank)} non-blank lines (lines {first}-"
                f"{first + len(ends) - 1}); cannot give each line its fate"
            )
        malformed = []
        for number, text, expected, actual in invalid:
            if text.strip():  # a line of spaces only is blank, as in JSONL
                line = first + int(nonblank[number - 1])
                problem = f"{actual} fields, {expected} expected"
                if self.quoted and _quote_left_open(text, self._delimiter):
                    problem = _QUOTE_NOT_CLOSED
                malformed.append(Malformed(line, problem, text.encode()[:_RAW_PREFIX_BYTES]))
        if broken is not None:
            problem = _QUOTE_NOT_CLOSED
            malformed.append(
                Malformed(
                    first + broken[0], problem, piece[start : min(broken[1], start + _RAW_PREFIX_BYTES)]
                )
            )
        return table, first + nonblank[row_positions], malformed, broken

    @staticmethod
    def _first_broken(
        table: pa.Table, row_positions: np.ndarray, invalid: list[tuple[int | None, str, int, int]]
    ) -> int | None:
        """Position (among the non-blank lines) of the first row, valid or not, with a line break inside:
        a quote left open there swallowed the lines after it."""
        found = [number - 1 for number, text, *_ in invalid if "\n" in text]
        row = _first_row_with_newline(table)
        if row is not None:
            found.append(int(row_positions[row]))
        return min(found, default=None)


def _first_row_with_newline(table: pa.Table) -> int | None:
    """The first row of a table of string columns with a b"\n" in a value (a scan of the value bytes)."""
    found = None
    for column in table.columns:
        base = 0
        for chunk in column.chunks:
            data = chunk.buffers()[2]
            if len(chunk) and data is not None:
                offsets = np.frombuffer(
                    chunk.buffers()[1], np.int32, count=len(chunk) + 1, offset=4 * chunk.offset
                )
                values = np.frombuffer(data, np.uint8, count=int(offsets[-1]))[offsets[0] :]
                hits = values == _NEWLINE
                if hits.any():
                    row = base + int(np.searchsorted(offsets, offsets[0] + hits.argmax(), side="right")) - 1
                    found = row if found is None else min(found, row)
                    break
            base += len(chunk)
    return found


def _quote_left_open(text: str, delimiter: str) -> bool:
    """Whether a CSV line (pyarrow's text of an invalid row) ends inside a quoted value."""
    try:
        fields = next(csv.reader([text + "\n"], delimiter=delimiter), [])
    except csv.Error:
        return False
    return bool(fields) and fields[-1].endswith("\n")


class _RecordTooLong(Exception):
    pass


def _multiline_rows(
    source: SourceConfig,
    config: IngestConfig,
    names: list[str],
    chunks: Iterator[_Chunk],
) -> Iterator[tuple[dict[str, list[str]], list[int], list[Malformed]]]:
    """multiline_values: CSV records whose quoted values may span lines, read with Python's csv module
    (exact line numbers). A chunk whose every line is one whole record is read in one call; otherwise
    record by record: a record that cannot be one row (wrong number of fields, a quote still open at the
    end of the file or after max_line_bytes) drops only its first line, as Malformed, and the lines after
    it are read again as records of their own."""
    limit = config.max_line_bytes
    if csv.field_size_limit() < limit:  # the module's limit is global; this only raises it
        csv.field_size_limit(limit)
    queue: deque[tuple[int, str]] = deque()  # lines to read record by record
    record: list[tuple[int, str]] = []  # the lines of the record being read
    malformed: list[Malformed] = []
    columns: dict[str, list[str]] = {name: [] for name in names}
    row_lines: list[int] = []
    at_end = False

    def next_lines() -> tuple[int, list[str]] | None:
        for first, data, _, dropped in chunks:
            malformed.extend(dropped)
            data = _check_lines(data, first, source.encoding, False, malformed)
            lines = [line + "\n" for line in data.decode("utf-8").split("\n")[:-1]]
            if lines:
                return first, lines
        return None

    def feed() -> Iterator[str]:
        nonlocal at_end
        size = 0  # of the record's lines, counted once it has more than one
        while True:
            if not queue:
                if not record:  # between records: the next chunk may be read whole again
                    return
                got = next_lines()
                if got is None:
                    at_end = True
                    return
                queue.extend(zip(itertools.count(got[0]), got[1]))
            item = queue.popleft()
            record.append(item)
            if len(record) == 2:
                size = len(record[0][1].encode())
            if len(record) > 1:
                size += len(item[1].encode())
                if size > limit:
                    raise _RecordTooLong
            yield item[1]

    def reject(problem: str) -> None:
        nonlocal at_end
        line, text = record[0]
        malformed.append(Malformed(line, problem, text.rstrip("\n").encode()[:_RAW_PREFIX_BYTES]))
        queue.extendleft(reversed(record[1:]))
        at_end = False

    def take_batch(final: bool) -> tuple[dict[str, list[str]], list[int], list[Malformed]]:
        """The rows so far and the malformed lines before the last of them (later ones, read ahead, wait
        for the next batch unless this is the last)."""
        nonlocal columns, row_lines, malformed
        last = row_lines[-1] if row_lines and not final else None
        batch = (columns, row_lines, [m for m in malformed if last is None or m.line <= last])
        columns, row_lines = {name: [] for name in names}, []
        malformed = [m for m in malformed if last is not None and m.line > last]
        return batch

    def new_reader() -> Iterator[list[str]]:
        return csv.reader(feed(), delimiter=",", quotechar='"')

    while True:
        if not queue:
            got = next_lines()
            if got is None:
                break
            first, lines = got
            whole = _single_line_records(lines, len(names))
            if whole is not None:
                indices, rows = whole
                for position, name in enumerate(names):  # no per-row objects: zip(*rows) would make some
                    columns[name].extend(map(operator.itemgetter(position), rows))
                row_lines.extend(first + index for index in indices)
                if len(row_lines) >= READ_BATCH_ROWS:
                    yield take_batch(final=False)
                continue
            queue.extend(zip(itertools.count(first), lines))
        reader = new_reader()
        while True:  # record by record, until the queue is empty between two records
            record.clear()
            try:
                fields = next(reader)
            except StopIteration:
                break
            except _RecordTooLong:
                reject(
                    f"a quoted value opened on this line is still open after max_line_bytes ({limit:,} bytes)"
                )
                reader = new_reader()
                continue
            except csv.Error as error:
                reject(str(error))
                reader = new_reader()
                continue
            if len(record) == 1 and _blank_record(fields):
                continue
            if at_end or len(fields) != len(names):
                if at_end:
                    problem = "quoted value not closed before the end of the file"
                else:
                    problem = f"{len(fields)} fields, {len(names)} expected"
                    if len(record) > 1:
                        problem += f" (a quoted value runs from this line to line {record[-1][0]})"
                reject(problem)
                reader = new_reader()
                continue
            for name, value in zip(names, fields, strict=True):
                columns[name].append(value)
            row_lines.append(record[0][0])
            if len(row_lines) >= READ_BATCH_ROWS:
                yield take_batch(final=False)
    yield take_batch(final=True)


_SENTINEL = "\x00"


def _blank_record(fields: list[str]) -> bool:
    return not fields or (len(fields) == 1 and not fields[0].strip())


def _single_line_records(lines: list[str], n_fields: int) -> tuple[Sequence[int], list[list[str]]] | None:
    """(line indices, fields) of the non-blank lines when every line is one whole record of n_fields
    fields or blank, read in one call; None otherwise."""
    try:  # a sentinel line after the last: it stays a record of its own only if no quote is left open
        rows = list(csv.reader(itertools.chain(lines, (_SENTINEL,)), delimiter=",", quotechar='"'))
    except csv.Error:
        return None
    if len(rows) != len(lines) + 1 or rows[-1] != [_SENTINEL]:
        return None
    rows.pop()
    if n_fields > 1 and all(len(fields) == n_fields for fields in rows):
        return range(len(rows)), rows
    if not all(len(fields) == n_fields or _blank_record(fields) for fields in rows):
        return None
    indices = [i for i, fields in enumerate(rows) if len(fields) == n_fields and not _blank_record(fields)]
    return indices, [rows[i] for i in indices]


def _text_batches(source: SourceConfig, config: IngestConfig, path: str, label: str) -> Iterator[SourceBatch]:
    """A CSV or TSV file's rows: one physical line per row, or with multiline_values CSV records."""
    with _utf8_reader(path, source.encoding) as reader:
        names, chunks = _read_header(source, path, _whole_lines(reader, config.max_line_bytes))
        if names is None:
            return
        if source.multiline_values:
            for columns, lines, malformed in _multiline_rows(source, config, names, chunks):
                table = pa.table({name: pa.array(values, pa.string()) for name, values in columns.items()})
                yield SourceBatch(label, table, np.array(lines, np.int64), malformed)
            return
        parser = _DelimitedParser(source, names)
        for first, data, n_lines, dropped in chunks:
            malformed = list(dropped)
            data = _check_lines(data, first, source.encoding, True, malformed)
            parts = list(parser.parse(data, first, n_lines))
            tables = [table for table, _, _ in parts] or [_empty_table(names)]
            line_numbers = [numbers for _, numbers, _ in parts] or [np.empty(0, np.int64)]
            for _, _, bad in parts:
                malformed.extend(bad)
            yield SourceBatch(label, pa.concat_tables(tables), np.concatenate(line_numbers), malformed)


def _empty_table(names: list[str]) -> pa.Table:
    return pa.table({name: pa.array([], pa.string()) for name in names})


@contextlib.contextmanager
def _utf8_reader(path: str, encoding: str) -> Iterator[Any]:
    with fsspec.open(path, "rb") as handle:
        yield handle if _is_utf8(encoding) else _Transcoder(handle, encoding)


def _jsonl_batches(
    source: SourceConfig, config: IngestConfig, path: str, label: str
) -> Iterator[SourceBatch]:
    with _utf8_reader(path, source.encoding) as reader:
        for first, data, _, dropped in _whole_lines(reader, config.max_line_bytes):
            malformed = list(dropped)
            rows: list[dict[str, Any]] = []
            lines: list[int] = []
            for index, raw in enumerate(data.split(b"\n")[:-1]):
                if not raw.strip():
                    continue
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as error:
                    problem = _decode_problem(raw, error, source.encoding)
                    malformed.append(Malformed(first + index, problem, raw[:_RAW_PREFIX_BYTES]))
                    continue
                try:
                    row = json.loads(text)
                except ValueError as error:
                    malformed.append(Malformed(first + index, f"not JSON ({error})", raw[:_RAW_PREFIX_BYTES]))
                    continue
                if not isinstance(row, dict):
                    problem = f"valid JSON but not an object (a JSON {_json_kind(row)})"
                    malformed.append(Malformed(first + index, problem, raw[:_RAW_PREFIX_BYTES]))
                    continue
                rows.append(row)
                lines.append(first + index)
            table = _rows_table(rows)
            if rows:
                _require_columns(source, path, table.column_names)
            yield SourceBatch(label, table, np.array(lines, np.int64), malformed)


def _json_kind(value: Any) -> str:
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    return "number"


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


def read_source(source: SourceConfig, config: IngestConfig) -> Iterator[SourceBatch]:
    """The source's rows in file order, in batches, each with the lines of its file that did not parse."""
    for path in source_files(source):
        label = source_file_label(source, path)
        if source.format == "parquet":
            for table in _parquet_batches(path):
                _require_columns(source, path, table.column_names)
                yield SourceBatch(label, table, None)
        elif source.format == "jsonl":
            yield from _jsonl_batches(source, config, path, label)
        else:
            yield from _text_batches(source, config, path, label)


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
    so far in about 14 bytes each (duplicate rows are detected across the whole source). Rows and malformed
    lines keep file order."""

    def __init__(self, source: SourceConfig, config: IngestConfig) -> None:
        self.source = source
        self.config = config
        self._seen = SeenIds()

    def shards(self) -> Iterator[ShardOutcome]:
        pending = _ROWS_SCHEMA.empty_table()
        for batch in read_source(self.source, self.config):
            rows = self._rows(batch.table) if batch.table.num_rows else _ROWS_SCHEMA.empty_table()
            if batch.malformed:
                rows = self._with_malformed(rows, batch)
            pending = pa.concat_tables([pending, rows])
            while pending.num_rows >= self.config.shard_rows:
                yield self._outcome(pending.slice(0, self.config.shard_rows))
                pending = pending.slice(self.config.shard_rows)
        if pending.num_rows or not self._seen:
            yield self._outcome(pending)

    def _with_malformed(self, rows: pa.Table, batch: SourceBatch) -> pa.Table:
        """The batch's rows and its malformed lines' rows, in line order."""
        bad = self._malformed_rows(batch.file, batch.malformed)
        lines = np.concatenate(
            [
                batch.lines if batch.lines is not None else np.empty(0, np.int64),
                [m.line for m in batch.malformed],
            ]
        )
        return pa.concat_tables([rows, bad]).take(pa.array(np.argsort(lines, kind="stable")))

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
        limit = self.config.max_caption_chars
        lengths = pc.utf8_length(captions)
        for row in pc.indices_nonzero(pc.fill_null(pc.greater(lengths, limit), False)).to_pylist():
            if reasons[row] is None:
                reasons[row] = "caption_too_long"
                details[row] = (
                    f"caption of {lengths[row].as_py():,} characters, over max_caption_chars {limit:,}"
                )
        repeats = self._seen.record(ids)
        for row in np.flatnonzero(repeats).tolist():  # few rows
            identity = ids[row]
            ids[row] = f"{identity}~dup{repeats[row]}"
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

    def _malformed_rows(self, file: str, malformed: list[Malformed]) -> pa.Table:
        ids = [malformed_sample_id(self.source.name, file, item.line, item.raw) for item in malformed]
        self._seen.record(ids)  # each names its own file and line: never a repeat
        n = len(malformed)
        return pa.Table.from_arrays(
            [
                pa.array(ids, pa.string()),
                pa.array([self.source.name] * n, pa.string()),
                pa.array([""] * n, pa.string()),
                pa.nulls(n, pa.string()),
                pa.nulls(n, pa.string()),
                pa.array(["malformed_row"] * n, pa.string()),
                pa.array([item.detail(file) for item in malformed], pa.string()),
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


CODE_VERSION = "1"


def _source_identity(source: SourceConfig) -> str:
    """The path is left out: the input checksum covers the content, so moving a file reruns nothing."""
    return source.model_dump_json(exclude={"path"})


def ingest_fingerprint(config: IngestConfig, source: SourceConfig) -> str:
    return stage_fingerprint("ingest", {"ingest": config}, {"source": _source_identity(source)}, CODE_VERSION)


def ingest_source_shards(
    layout: Layout,
    source: SourceConfig,
    config: IngestConfig,
    run_id: str,
    verify: Verification = "checksum",
    stall_timeout_s: float | None = None,
) -> ShardSummary:
    """Ingest one source into shards `<source>-00000`, ... through the commit protocol every stage uses
    (tasks/harness.py run_source)."""
    return run_source(
        layout,
        stage="ingest",
        source=source.name,
        fingerprint=ingest_fingerprint(config, source),
        checksum=source_checksum(source),
        outcomes=lambda: SourceIngester(source, config).shards(),
        schema=INGEST_SCHEMA,
        reasons=REASONS,
        run_id=run_id,
        verify=verify,
        stall_timeout_s=stall_timeout_s,
    )


INGEST = SourceStage(
    name="ingest",
    reasons=REASONS,
    sections=("ingest",),
    code_version=CODE_VERSION,
    report=Report("amount", "in"),
    retries=2,
    schema=INGEST_SCHEMA,
    sources=lambda config: config.sources,
    read=lambda source, config: SourceIngester(source, config.ingest).shards(),
    checksum=source_checksum,
    source_identity=_source_identity,
)
