"""fMoW (Functional Map of the World), fMoW-rgb layout: one JPEG per view of a capture, a JSON beside it.

Layout: `<category>/<category>_<id>/<category>_<id>_<t>_{rgb,msrgb}.{jpg,json}` under a split folder
(train, val); the test and seq splits have no category level. The files are found by name at any depth
(`*_rgb.jpg`, `*_msrgb.jpg` for the configured views), so every split lists the same way, and the view
index `<t>` may have gaps (it often does).

The JSON (fMoW's README and baseline code): every field optional, numbers sometimes written as strings,
`bounding_boxes` a list of `{ID, box: [x, y, width, height], category, raw_location}` or, sometimes, a single
such object. A null or "unknown" category means false_detection; test JSONs have no category at all.
class_label is the first box's category, else the category folder. latitude/longitude are the first
corner of the first box's `raw_location` polygon (WKT, lon lat order), the point RS5M reverse-geocoded, else
of the image's own `raw_location`. Fields without a column (sun angles, pan_resolution_dbl, the
_start/_end/_min/_max variants, approximate_wavelengths, ...) are kept in extra_metadata.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import PurePosixPath
from typing import Any

from rs5m.config import Rs3SourceConfig
from tasks.rs3 import (
    Dropped,
    FieldError,
    Listed,
    Rs3SourceError,
    Sample,
    absent,
    integer,
    json_text,
    latitude,
    longitude,
    number,
    read_json_object,
    source_root,
    text,
    utc_time,
    walk_files,
)

# JSON field -> RS3 column, by the column's type.
FLOAT_FIELDS = {
    "gsd": "gsd",
    "multi_resolution_dbl": "multi_resolution",
    "cloud_cover": "cloud_cover",
    "target_azimuth_dbl": "target_azimuth",
    "off_nadir_angle_dbl": "off_nadir_angle",
}
INT_FIELDS = {"img_width": "img_width", "img_height": "img_height"}
TEXT_FIELDS = {
    "country_code": "country_code",
    "utm": "utm_zone",
    "scan_direction": "scan_direction",
    "raw_location": "raw_location",
}
MAPPED = {*FLOAT_FIELDS, *INT_FIELDS, *TEXT_FIELDS, "timestamp", "bounding_boxes"}
FALSE_DETECTION = "false_detection"
INT32_MAX = 2**31 - 1
_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_FIRST_CORNER = re.compile(rf"^\s*POLYGON\s*\(\(\s*({_NUMBER})\s+({_NUMBER})\s*[,)]", re.IGNORECASE)


def list_source(source: Rs3SourceConfig) -> Iterator[Listed]:
    """The JPEGs of the configured views under the split folder, in file order."""
    root = source_root(source)
    suffixes = tuple(f"_{view}.jpg" for view in source.views)
    found = False
    for file in walk_files(root):
        if file.endswith(suffixes):
            found = True
            yield Listed(file, None)
    if not found:
        wanted = ", ".join(f"*{suffix}" for suffix in suffixes)
        raise Rs3SourceError.of(source, f"no fMoW-rgb image ({wanted}) at any depth")


def read_sample(source: Rs3SourceConfig, listed: Listed) -> Sample | Dropped:
    """The JPEG's own bytes and the metadata of the JSON beside it."""
    root = source_root(source)
    json_file = listed.file[: -len(".jpg")] + ".json"
    document = read_json_object(root / json_file, json_file)
    if isinstance(document, Dropped):
        return document
    try:
        metadata = _metadata(listed.file, document)
    except FieldError as error:
        return Dropped("malformed_metadata", f"{json_file}: {error}")
    try:
        image = (root / listed.file).read_bytes()
    except OSError as error:
        return Dropped("unreadable_image", f"{listed.file}: {error.strerror or error}")
    return Sample(image, metadata)


def _metadata(file: str, document: dict[str, Any]) -> dict[str, Any]:
    metadata: dict[str, Any] = {"file": file, "view": file.rsplit("_", 1)[1].removesuffix(".jpg")}
    given = {key: value for key, value in document.items() if not absent(value)}
    for field, column in FLOAT_FIELDS.items():
        if field in given:
            metadata[column] = number(given[field], field)
    for field, column in INT_FIELDS.items():
        if field in given:
            value = integer(given[field], field)
            if not 0 < value <= INT32_MAX:
                raise FieldError(field, f"not a positive 32-bit size: {given[field]!r}")
            metadata[column] = value
    for field, column in TEXT_FIELDS.items():
        if field in given:
            metadata[column] = text(given[field], field)
    if "timestamp" in given:
        metadata["timestamp"] = utc_time(given["timestamp"], "timestamp")
    entries = _box_entries(document.get("bounding_boxes"))
    boxes = [_box(entry, f"bounding_boxes[{index}]") for index, entry in enumerate(entries)]
    if boxes:
        metadata["bounding_boxes"] = boxes
    category = boxes[0]["category"] if entries and "category" in entries[0] else _category_folder(file)
    if category is not None:
        metadata["class_label"] = category
    if boxes and boxes[0]["raw_location"] is not None:
        location = _first_corner(boxes[0]["raw_location"], "bounding_boxes[0].raw_location")
    elif "raw_location" in metadata:
        location = _first_corner(metadata["raw_location"], "raw_location")
    else:
        location = None
    if location is not None:
        metadata["longitude"], metadata["latitude"] = location
    extra = {key: value for key, value in document.items() if key not in MAPPED}
    if extra:
        metadata["extra_metadata"] = json_text(extra)
    return metadata


def _box_entries(value: Any) -> list[dict[str, Any]]:
    """The `bounding_boxes` objects: a list of them, or (sometimes, in fMoW) a single one."""
    if absent(value):
        return []
    entries = [value] if isinstance(value, dict) else value
    if not isinstance(entries, list):
        raise FieldError("bounding_boxes", f"not a list or an object: {value!r}")
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise FieldError(f"bounding_boxes[{index}]", f"not an object: {entry!r}")
    return entries


def _box(entry: dict[str, Any], field: str) -> dict[str, Any]:
    """One box as a BOUNDING_BOX dict; a null or "unknown" category is a false detection, and a box with no
    category key (test split) has a null category."""
    box: dict[str, Any] = {"id": None, "box": None, "category": None, "raw_location": None}
    if not absent(entry.get("ID")):
        box["id"] = integer(entry["ID"], f"{field}.ID")
    if not absent(entry.get("box")):
        coordinates = entry["box"]
        if not isinstance(coordinates, list) or len(coordinates) != 4:
            raise FieldError(f"{field}.box", f"not [x, y, width, height]: {coordinates!r}")
        box["box"] = [integer(c, f"{field}.box") for c in coordinates]
    if "category" in entry:
        named = None if absent(entry["category"]) else text(entry["category"], f"{field}.category")
        box["category"] = FALSE_DETECTION if named in (None, "unknown") else named
    if not absent(entry.get("raw_location")):
        box["raw_location"] = text(entry["raw_location"], f"{field}.raw_location")
    return box


def _category_folder(file: str) -> str | None:
    """`<category>/<category>_<id>/<image>` gives the category; test/seq splits (no category level) and
    any other layout give None, so a split name is never taken for a category."""
    parts = PurePosixPath(file).parts
    if len(parts) >= 3 and parts[-2].startswith(parts[-3] + "_"):
        return parts[-3]
    return None


def _first_corner(wkt: str, field: str) -> tuple[float, float]:
    """(longitude, latitude) of the first point of `POLYGON ((lon lat, lon lat, ...))`."""
    match = _FIRST_CORNER.match(wkt)
    if match is None:
        raise FieldError(field, f"not a WKT POLYGON ((lon lat, ...)): {wkt[:80]!r}")
    return longitude(match[1], field), latitude(match[2], field)
