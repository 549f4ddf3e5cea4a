"""RS3 format adapters: list a label-only remote-sensing dataset in its own on-disk layout, and read each
sample as image bytes plus typed metadata (the columns of storage.schemas.RS3_METADATA_FIELDS).

Three formats (Rs3SourceConfig.format): `fmow` (fMoW-rgb JPEGs with a JSON each, tasks/rs3/fmow.py),
`bigearthnet` (v1.0 patch folders or v2/reBEN with metadata.parquet, tasks/rs3/bigearthnet.py) and
`image_folder` (MillionAID or any folder of images, tasks/rs3/image_folder.py). Each adapter module has the
same two functions as this one, over the same types, so adding a format is adding a module and a line in
`_ADAPTERS`.

Listing and reading are split so that the caller can shard a source by its listing (cheap: file names and
what an index already holds) and read shards in parallel. Both stream: a listing yields one sample at a
time in the order of `Listed.file` (Python string order, the same on every machine), and reading touches
only the files of one sample. A sample's bad data (a missing or malformed metadata file, a band that cannot
be read) never raises: `read_sample` returns `Dropped` with a reason from READ_REASONS, so every listed
sample gets exactly one fate. Only a source that cannot be listed at all raises `Rs3SourceError`.

Nothing here decodes an image the adapter does not compose itself: the bytes of JPEG/PNG/TIFF files travel
unchanged and are validated by a later stage; BigEarthNet's RGB PNG is made here from its band GeoTIFFs.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

from rs5m.config import Rs3SourceConfig


@dataclass(frozen=True)
class Listed:
    """One sample found by listing a source."""

    file: str  # relative to the source folder, "/"-separated; the sample's identity (BigEarthNet: the patch)
    metadata: str | None  # JSON object text of what the listing already knows (an index row), else None


@dataclass(frozen=True)
class Sample:
    """A readable sample: its image bytes and its metadata, keyed by RS3_METADATA_FIELDS names."""

    image: bytes  # fmow / image folder: the file's own bytes; BigEarthNet: PNG of the RGB composite
    metadata: dict[str, Any]  # only the fields known for this sample; a missing key means null


@dataclass(frozen=True)
class Dropped:
    """A listed sample that cannot be used, and why."""

    reason: str  # a key of READ_REASONS
    detail: str  # what and where: the file, the field, the parser's message


READ_REASONS: dict[str, str] = {
    "missing_metadata": "the sample's metadata is absent: fmow: no <image>.json beside the image; BigEarthNet "
    "v1: no <patch>_labels_metadata.json; v2: the patch is in neither metadata parquet file",
    "malformed_metadata": "the metadata cannot be used: not a JSON object, a required BigEarthNet field "
    "missing, or a value that does not parse (a number, a timestamp, a WKT polygon, a UTM projection, "
    "GeoTIFF geo tags, an image-folder metadata row's class/lat/lon/time); the detail names the field",
    "unreadable_image": "the image cannot be read: the file is missing or unreadable, or a BigEarthNet RGB "
    "band (B04, B03, B02) is missing, not a readable TIFF, or not a 120x120 single-band uint16 image",
    "excluded_by_dataset": "BigEarthNet v2 lists the patch in metadata_for_patches_with_snow_cloud_or_shadow"
    ".parquet: its authors exclude it (seasonal snow, cloud or cloud shadow), as RS5M's v1 did",
}


class Rs3SourceError(ValueError):
    """A source that cannot be listed at all; the one-line message names the source, its path and the
    problem. Made with `Rs3SourceError.of` (the plain one-argument constructor keeps it picklable)."""

    @classmethod
    def of(cls, source: Rs3SourceConfig, problem: str, path: str | Path | None = None) -> Rs3SourceError:
        return cls(f"rs3 source {source.name!r} ({source.format}): {path or source.path}: {problem}")


class FieldError(ValueError):
    """A metadata value that does not parse; adapters turn it into a `malformed_metadata` drop."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")


def list_source(source: Rs3SourceConfig) -> Iterator[Listed]:
    """Every sample of the source, in `Listed.file` order. Raises Rs3SourceError (when iteration starts) if
    the source cannot be listed: its path is missing or not a folder, or it has no recognisable layout."""
    yield from _adapter(source).list_source(source)


def read_sample(source: Rs3SourceConfig, listed: Listed) -> Sample | Dropped:
    """The sample's image and metadata, or why it cannot be used. Never raises for bad data."""
    return _adapter(source).read_sample(source, listed)


def _adapter(source: Rs3SourceConfig) -> ModuleType:
    # Imported here because the adapters import this module's types.
    from tasks.rs3 import bigearthnet, fmow, image_folder

    return {"fmow": fmow, "bigearthnet": bigearthnet, "image_folder": image_folder}[source.format]


# ---------------------------------------------------------------- helpers shared by the adapters


def source_root(source: Rs3SourceConfig) -> Path:
    """The source's folder; Rs3SourceError if it is missing or not a folder."""
    root = Path(source.path)
    if not root.exists():
        raise Rs3SourceError.of(source, "no such folder")
    if not root.is_dir():
        raise Rs3SourceError.of(source, "not a folder")
    return root


def hidden(name: str) -> bool:
    """Dot files and folders (.DS_Store, .ipynb_checkpoints, .git) are never samples."""
    return name.startswith(".")


def walk_files(root: Path) -> Iterator[str]:
    """Paths (relative, "/"-separated) of the non-hidden files under root, in Python string order.

    Streams one folder at a time: a folder's entries are sorted with "/" appended to sub-folder names, so a
    depth-first walk yields exactly the order of the joined paths ("a-b" before "a/b", as "-" < "/").
    Symbolic links to folders are followed (datasets are often assembled from links), except one that
    leads back to a folder above it, which would never end.
    """

    def walk(folder: Path, prefix: str, above: frozenset[tuple[int, int]]) -> Iterator[str]:
        with os.scandir(folder) as scan:
            entries = [(e.name + "/" if e.is_dir() else e.name, e) for e in scan if not hidden(e.name)]
        for key, entry in sorted(entries, key=lambda pair: pair[0]):
            if not key.endswith("/"):
                yield prefix + key
                continue
            status = entry.stat()
            identity = (status.st_dev, status.st_ino)
            if identity not in above:
                yield from walk(Path(entry.path), prefix + key, above | {identity})

    status = root.stat()
    return walk(root, "", frozenset({(status.st_dev, status.st_ino)}))


def read_json_object(path: Path, shown: str) -> dict[str, Any] | Dropped:
    """A metadata JSON file's object, or the drop it causes (`shown` is the path used in the detail)."""
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        return Dropped("missing_metadata", f"{shown}: no such file")
    except OSError as error:
        return Dropped("missing_metadata", f"{shown}: cannot be read: {error.strerror or error}")
    except UnicodeDecodeError as error:
        return Dropped("malformed_metadata", f"{shown}: not UTF-8: {error}")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        return Dropped("malformed_metadata", f"{shown}: not JSON: {error}")
    if not isinstance(value, dict):
        return Dropped("malformed_metadata", f"{shown}: not a JSON object but {type(value).__name__}")
    return value


def absent(value: Any) -> bool:
    """Null and blank strings mean "not given" in every format (a CSV cannot write null)."""
    return value is None or (isinstance(value, str) and not value.strip())


def number(value: Any, field: str) -> float:
    """A finite number, also when written as a string ("0.5"), as fMoW and CSV files do."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise FieldError(field, f"not a number: {value!r}")
    try:
        result = float(value)
    except ValueError:
        raise FieldError(field, f"not a number: {value!r}") from None
    if not math.isfinite(result):
        raise FieldError(field, f"not a finite number: {value!r}")
    return result


def integer(value: Any, field: str) -> int:
    """A whole number, also written as a string or as a float with no fraction ("640", 640.0)."""
    result = number(value, field)
    if not result.is_integer():
        raise FieldError(field, f"not a whole number: {value!r}")
    return int(result)


def text(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise FieldError(field, f"not a string: {value!r}")
    return value.strip()


def latitude(value: Any, field: str) -> float:
    result = number(value, field)
    if not -90 <= result <= 90:
        raise FieldError(field, f"latitude outside [-90, 90]: {value!r}")
    return result


def longitude(value: Any, field: str) -> float:
    result = number(value, field)
    if not -180 <= result <= 180:
        raise FieldError(field, f"longitude outside [-180, 180]: {value!r}")
    return result


def utc_time(value: Any, field: str) -> datetime:
    """An ISO 8601 time ("2012-04-02T10:32:22Z", "2019-05-01 08:00:00"; naive means UTC) as an aware UTC
    datetime, truncated to the second (the timestamp column's unit)."""
    if not isinstance(value, str):
        raise FieldError(field, f"not an ISO 8601 time: {value!r}")
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError:
        raise FieldError(field, f"not an ISO 8601 time: {value!r}") from None
    aware = parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)
    return aware.replace(microsecond=0)


LATITUDE_BANDS = "CDEFGHJKLMNPQRSTUVWX"  # 8 degrees each from 80 S; no I or O; X spans 72-84 N


def latitude_band(lat: float, field: str) -> str:
    """The UTM/MGRS latitude band letter of a latitude (29U: zone 29, band U = 48-56 N)."""
    if not -80 <= lat <= 84:
        raise FieldError(field, f"latitude {lat:.4f} is outside the UTM latitude bands (80 S to 84 N)")
    return LATITUDE_BANDS[min(int((lat + 80) // 8), len(LATITUDE_BANDS) - 1)]


def json_text(value: dict[str, Any]) -> str:
    """A JSON object as compact, key-sorted text: the same bytes on every run (extra_metadata)."""
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
