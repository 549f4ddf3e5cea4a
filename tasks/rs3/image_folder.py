"""A folder of images: MillionAID (`<split>/<L1>/[<L2>/]<L3>/P#######.jpg`, or flat for its test split) or
a user's own collection.

Every *.jpg, *.jpeg, *.png, *.tif, *.tiff and *.webp file under the folder, at any depth, is a sample
(extensions in any case; dot files and dot folders are skipped). With `class_from_folder` (MillionAID's
train split) the class is the image's parent folder; an image directly in the folder has none.

An optional metadata file joins per-image information: `source.metadata`, else `metadata.csv` or
`metadata.jsonl` in the folder. It has a `file` column (the image's path relative to the folder) and any of
`class` (overrides the folder class), `lat`, `lon` (degrees, both or neither) and `time` (ISO 8601; naive
means UTC); other columns go to extra_metadata. Empty CSV values and JSON nulls mean "not given". The file
is loaded once per listing and each image's row travels in `Listed.metadata`; its values are parsed when the
sample is read, so a bad value drops that image only (`malformed_metadata`). An image without a row has
null metadata; a row without an image is not a sample (nothing to caption). A metadata file that cannot be
joined at all (no `file` column, a line that is not one record, two rows for one image) stops the listing:
guessing which image a broken line meant would put metadata on the wrong image.

The image bytes are the file's own; whether they decode is a later stage's question.
"""

from __future__ import annotations

import csv
import json
import posixpath
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from rs5m.config import Rs3SourceConfig
from tasks.rs3 import (
    Dropped,
    FieldError,
    Listed,
    Rs3SourceError,
    Sample,
    absent,
    json_text,
    latitude,
    longitude,
    source_root,
    text,
    utc_time,
    walk_files,
)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".webp")
DEFAULT_METADATA = ("metadata.csv", "metadata.jsonl")
KNOWN_COLUMNS = ("file", "class", "lat", "lon", "time")


def list_source(source: Rs3SourceConfig) -> Iterator[Listed]:
    """The images under the folder in file order, each with its metadata row (JSON) if it has one."""
    root = source_root(source)
    rows = _load_metadata(source, root)
    found = False
    for file in walk_files(root):
        if file.lower().endswith(IMAGE_EXTENSIONS):
            found = True
            row = rows.get(file)
            yield Listed(file, None if row is None else json.dumps(row, ensure_ascii=False))
    if not found:
        raise Rs3SourceError.of(
            source, f"no image ({', '.join('*' + e for e in IMAGE_EXTENSIONS)}) at any depth"
        )


def read_sample(source: Rs3SourceConfig, listed: Listed) -> Sample | Dropped:
    """The image file's own bytes, the folder class and the parsed metadata row."""
    metadata: dict[str, Any] = {"file": listed.file}
    parent = PurePosixPath(listed.file).parent.name
    if source.class_from_folder and parent:
        metadata["class_label"] = parent
    if listed.metadata is not None:
        try:
            metadata.update(_row_metadata(json.loads(listed.metadata)))
        except FieldError as error:
            return Dropped("malformed_metadata", f"{listed.file}: metadata row: {error}")
    try:
        image = (source_root(source) / listed.file).read_bytes()
    except OSError as error:
        return Dropped("unreadable_image", f"{listed.file}: {error.strerror or error}")
    return Sample(image, metadata)


def _row_metadata(row: dict[str, Any]) -> dict[str, Any]:
    given = {key: value for key, value in row.items() if not absent(value)}
    metadata: dict[str, Any] = {}
    if "class" in given:
        metadata["class_label"] = text(given["class"], "class")
    if ("lat" in given) != ("lon" in given):
        raise FieldError(
            "lat" if "lat" in given else "lon", "given without its partner (lat and lon go together)"
        )
    if "lat" in given:
        metadata["latitude"] = latitude(given["lat"], "lat")
        metadata["longitude"] = longitude(given["lon"], "lon")
    if "time" in given:
        metadata["timestamp"] = utc_time(given["time"], "time")
    extra = {key: value for key, value in given.items() if key not in KNOWN_COLUMNS}
    if extra:
        metadata["extra_metadata"] = json_text(extra)
    return metadata


# ---------------------------------------------------------------- the metadata file


def _load_metadata(source: Rs3SourceConfig, root: Path) -> dict[str, dict[str, Any]]:
    """Rows of the metadata file by normalised `file`; {} when there is none."""
    if source.metadata is not None:
        path = Path(source.metadata)
        if not path.is_file():
            raise Rs3SourceError.of(source, "metadata file not found", path)
    else:
        present = [root / name for name in DEFAULT_METADATA if (root / name).is_file()]
        if not present:
            return {}
        if len(present) > 1:
            raise Rs3SourceError.of(
                source, f"both {' and '.join(DEFAULT_METADATA)}: set `metadata` to the one to use"
            )
        path = present[0]
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".jsonl"):
        raise Rs3SourceError.of(source, "metadata file must be .csv or .jsonl", path)
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            records = _csv_records(handle) if suffix == ".csv" else _jsonl_records(handle)
            return _index(records)
    except (_RecordError, OSError, UnicodeDecodeError) as error:
        raise Rs3SourceError.of(source, str(error), path) from error


class _RecordError(ValueError):
    """A metadata line that is not one record naming one image."""


def _csv_records(handle: Any) -> Iterator[tuple[int, dict[str, Any]]]:
    reader = csv.reader(handle)
    header = next(reader, None)
    if header is None or "file" not in header:
        raise _RecordError("no `file` column in the header")
    for fields in reader:
        if not fields:  # blank line
            continue
        if len(fields) != len(header):
            raise _RecordError(f"line {reader.line_num}: {len(fields)} fields, the header has {len(header)}")
        yield reader.line_num, dict(zip(header, fields, strict=True))


def _jsonl_records(handle: Any) -> Iterator[tuple[int, dict[str, Any]]]:
    for line_number, line in enumerate(handle, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise _RecordError(f"line {line_number}: not JSON: {error}") from None
        if not isinstance(record, dict):
            raise _RecordError(f"line {line_number}: not a JSON object")
        yield line_number, record


def _index(records: Iterator[tuple[int, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    lines: dict[str, int] = {}
    for line, record in records:
        file = record.get("file")
        if not isinstance(file, str) or not file.strip():
            raise _RecordError(f"line {line}: no `file`")
        key = posixpath.normpath(file.strip().replace("\\", "/"))
        if key in rows:
            raise _RecordError(f"lines {lines[key]} and {line} both describe {key!r}")
        rows[key], lines[key] = record, line
    return rows
