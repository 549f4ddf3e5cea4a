"""meta captions: the first half of every RS3 caption, filled from the image's own metadata.

RS5M built each FMoW / BigEarthNet caption as `meta_caption + " " + blip2_caption`, the meta caption one of
its geometa templates picked at random and filled from the image's metadata. We do the same, reproducibly,
with RS5M's templates shipped as a versioned file (tasks/templates/rs5m-v1.json, `meta.templates`) and two of
its faults fixed behind options.

Selection. A format tries its template families in order (FAMILIES_BY_FORMAT): richest first, and a row
never trades its class for place or time, because the class is what the caption must get right.
  fmow          fmow_complex, fmow_base, cc3m, yfcc14m_country_timestamp, yfcc14m_country, yfcc14m_timestamp
  bigearthnet   ben, cc3m, yfcc14m_country_timestamp, yfcc14m_country, yfcc14m_timestamp
  image_folder  cc3m, yfcc14m_country_timestamp, yfcc14m_country, yfcc14m_timestamp
(redcaps needs the same fields as yfcc14m_timestamp, so it could never be reached; a family missing from a
custom template file is skipped.) In the first family with at least one template whose placeholders are all
in the row's fields, one of those templates is picked by sha256(family NUL sample_id): the same sample
always gets the same template, and a missing field selects a template that does not need it. A row no
family can fill has no meta caption (tasks/rs3_caption.py decides its caption). Template ids are "<family>/<0-based index>".

Fields (caption_fields). A field that is missing, null or unusable is absent, never "None", "nan" or empty.
  country, city       offline reverse geocoding (reverse_geocode: nearest GeoNames place of >= 1000 people)
                      of latitude/longitude; for FMoW the adapter sets those to the first corner of the first
                      box, where RS5M took them. ISO names that break a sentence are shortened ("Korea,
                      Republic of" -> "South Korea"). No template uses city; it is there for new templates.
  season              meteorological seasons from the UTC month: Dec-Feb winter, Mar-May spring, Jun-Aug
                      summer, Sep-Nov autumn north of the equator (latitude >= 0), shifted by six months
                      south of it. `meta.season: rs5m` keeps RS5M's rule (the northern one everywhere, which
                      calls a January image of Sydney winter). Without a latitude the hemisphere is unknown:
                      the hemisphere rule leaves season absent rather than guess (rs5m needs no latitude).
  timestamp           "2012-04-02 10:32 UTC": the sources give UTC and local time would need a time-zone
                      lookup a caption reader cannot check. A time of exactly 00:00:00 is a date given
                      without a time (image-folder metadata) and is written as the date alone.
  month_year          "April 2012" (English month names, whatever the locale).
  class_label         the class, underscores as spaces, lower-case as in RS5M; for a row with labels but no
                      class (BigEarthNet) the joined labels, so the class-only family can still name them.
                      fMoW's false_detection (a box around none of its categories) is no class.
  class_labels        BigEarthNet's labels in their order, cleaned the same way, joined by "; " (several
                      labels contain a comma themselves: "beaches, dunes, sands").
  relative_location   the cell of a 3x3 grid holding the centre of the first bounding box, relative to
                      img_width x img_height: "top left", "top", "top right", "left", "center", "right",
                      "bottom left", "bottom", "bottom right" (cells [0, 1/3), [1/3, 2/3), [2/3, 1]). Absent
                      without a box, without the image size, or with a centre outside the image.
  ground_sample_distance  gsd in metres, two decimals, trailing zeros dropped ("0.51", "10").
  utm_zone            zone number + latitude band as the row gives it ("32T"); `meta.utm_zone: rs5m` writes
                      BigEarthNet's band as the hemisphere letter, as RS5M did ("29N" for 29U), although
                      "29N" is also a real band near the equator. FMoW's zone is written as given either way.
  cloud_cover_rate    integer percent (0-100).
  scan_direction      lower case ("forward").
  target_azimuth, off_nadir  degrees, one decimal, a trailing ".0" dropped (azimuth 0-360, off-nadir 0-90).
A text value whose whole content is "none", "nan" or "null" (a null that became text) is absent; text values
lose braces (no caption can show a placeholder-like brace) and have their white space collapsed.

Speed: per row (a shard is ~1000 rows). Reverse geocoding is a KD-tree query; results are cached by exact
coordinates (they repeat: the rgb and msrgb views of one FMoW capture share them), and `places` geocodes a whole shard in one query. The
first lookup loads the GeoNames table (about a second).
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import re
import string
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rs5m.config import RS3_FORMATS, MetaCaptionConfig
from tasks.shipped import resolve_shipped

TEMPLATES_DIR = Path(__file__).parent / "templates"
# Bumped when a fill or selection rule changes, so that a stage fingerprint can change with it (the template
# set's identity covers only the template file).
RULES_VERSION = "1"

# Every field caption_fields can fill; a template placeholder outside these is never filled.
FIELDS = (
    "country",
    "city",
    "season",
    "month_year",
    "timestamp",
    "class_label",
    "class_labels",
    "relative_location",
    "ground_sample_distance",
    "utm_zone",
    "cloud_cover_rate",
    "scan_direction",
    "target_azimuth",
    "off_nadir",
)

_FALLBACKS = ("cc3m", "yfcc14m_country_timestamp", "yfcc14m_country", "yfcc14m_timestamp")
FAMILIES_BY_FORMAT: dict[str, tuple[str, ...]] = {
    "fmow": ("fmow_complex", "fmow_base", *_FALLBACKS),
    "bigearthnet": ("ben", *_FALLBACKS),
    "image_folder": _FALLBACKS,
}

_MONTHS = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)
# Northern-hemisphere season of each month (index month - 1).
_SEASONS = ("winter",) * 2 + ("spring",) * 3 + ("summer",) * 3 + ("autumn",) * 3 + ("winter",)
_GRID = (
    ("top left", "top", "top right"),
    ("left", "center", "right"),
    ("bottom left", "bottom", "bottom right"),
)
_UTM_ZONE = re.compile(r"([0-9]{1,2})([C-HJ-NP-X])")  # latitude bands skip I and O
_NULL_WORDS = frozenset({"", "none", "nan", "null"})
# reverse_geocode's ISO-style names that read wrongly inside a sentence ("this image from Korea, Republic of
# shows ..."), or are outdated or misspelt there.
_COUNTRY_NAMES = {
    "BL": "Saint Barthelemy",
    "BN": "Brunei",
    "CD": "Democratic Republic of the Congo",
    "FK": "Falkland Islands",
    "FM": "Micronesia",
    "IR": "Iran",
    "KP": "North Korea",
    "KR": "South Korea",
    "LA": "Laos",
    "LY": "Libya",
    "MD": "Moldova",
    "RU": "Russia",
    "SY": "Syria",
    "TZ": "Tanzania",
    "VA": "Vatican City",
    "VG": "British Virgin Islands",
    "VI": "U.S. Virgin Islands",
}
# Bounds the memory of a long-running worker; a shard needs far fewer.
_PLACE_CACHE_SIZE = 100_000


@dataclass(frozen=True)
class TemplateSet:
    """Template families ({family: [template, ...]}), checked on construction: every placeholder is a plain
    `{name}` (no format spec, conversion, index or positional `{}`, because values arrive already formatted)
    and no literal brace ("{{") can reach a caption."""

    families: dict[str, list[str]]
    identity: str  # sha256 of the file: any change to the templates reruns the stage
    _needs: dict[str, list[frozenset[str]]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.families, dict) or not self.families:
            raise ValueError("a template set must map at least one family to its templates")
        needs: dict[str, list[frozenset[str]]] = {}
        for family, templates in self.families.items():
            if not isinstance(templates, list) or not templates:
                raise ValueError(f"template family {family!r} needs a non-empty list of templates")
            needs[family] = [_placeholders(t, f"{family}/{i}") for i, t in enumerate(templates)]
        object.__setattr__(self, "_needs", needs)

    @classmethod
    def read(cls, path: Path) -> TemplateSet:
        """The JSON file at path ({family: [template, ...]}); a ValueError names the file and the fault."""
        try:
            content = Path(path).read_bytes()
            data = json.loads(content)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"cannot read template set {path}: {error}") from None
        try:
            return cls(data, hashlib.sha256(content).hexdigest())
        except ValueError as error:
            raise ValueError(f"template set {path}: {error}") from None

    def eligible(self, family: str, present: set[str]) -> list[int]:
        """Indices of the family's templates whose placeholders are all in `present` (none for a family
        the set lacks)."""
        return [i for i, needs in enumerate(self._needs.get(family, ())) if needs <= present]


def _placeholders(template: Any, where: str) -> frozenset[str]:
    if not isinstance(template, str) or not template.strip():
        raise ValueError(f"template {where} must be a non-empty string")
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as error:  # an unmatched brace
        raise ValueError(f"template {where}: {error}") from None
    names = set()
    for literal, name, spec, conversion in parsed:
        if "{" in literal or "}" in literal:
            raise ValueError(f"template {where}: a literal brace would reach the caption")
        if name is None:
            continue
        if not name.isidentifier() or spec or conversion:
            raise ValueError(f"template {where}: {{{name}}} is not a plain {{name}} placeholder")
        names.add(name)
    return frozenset(names)


def resolve_templates(value: str) -> Path:
    """A shipped version ("rs5m-v1") or a file path -> the template file; ValueError naming what is missing."""
    return resolve_shipped(value, TEMPLATES_DIR, ".json", "template set")


def meta_caption(
    fields: Mapping[str, str], families: Sequence[str], templates: TemplateSet, sample_id: str
) -> tuple[str, str] | None:
    """(caption, template id) from the first family with a template the fields can fill, or None.

    The pick hashes the sample id (not a random draw), so a rerun writes the same captions; hashing the
    family too keeps the picks of different families independent."""
    present = {name for name, value in fields.items() if value}
    for family in families:
        eligible = templates.eligible(family, present)
        if eligible:
            digest = hashlib.sha256(f"{family}\0{sample_id}".encode()).hexdigest()
            index = eligible[int(digest[:16], 16) % len(eligible)]
            return templates.families[family][index].format_map(fields), f"{family}/{index}"
    return None


@dataclass(frozen=True)
class Place:
    """Where reverse geocoding puts a coordinate: the nearest GeoNames place and its country."""

    country: str | None
    city: str | None


_place_cache: dict[tuple[float, float], Place] = {}


def places(coordinates: Iterable[tuple[Any, Any]]) -> list[Place | None]:
    """The place of each (latitude, longitude), None where the pair is not a valid coordinate. One KD-tree
    query for every pair not already cached: a stage may call this on a whole shard first, after which
    caption_fields finds every row's place in the cache."""
    keys = [_location(latitude, longitude) for latitude, longitude in coordinates]
    found = _lookup([key for key in keys if key is not None])
    return [None if key is None else found[key] for key in keys]


def _lookup(locations: list[tuple[float, float]]) -> dict[tuple[float, float], Place]:
    found: dict[tuple[float, float], Place] = {}
    missing: list[tuple[float, float]] = []
    for location in dict.fromkeys(locations):
        place = _place_cache.get(location)
        if place is None:
            missing.append(location)
        else:
            found[location] = place
    if missing:
        import reverse_geocode  # loads scipy and its place table: only when a caption needs it

        for location, result in zip(missing, reverse_geocode.search(missing), strict=True):
            found[location] = Place(_country_name(result), _text(result.get("city")))
        if len(_place_cache) + len(missing) > _PLACE_CACHE_SIZE:
            _place_cache.clear()
        _place_cache.update((location, found[location]) for location in missing)
    return found


def _location(latitude: Any, longitude: Any) -> tuple[float, float] | None:
    lat, lon = _number(latitude), _number(longitude)
    if lat is None or lon is None or abs(lat) > 90 or abs(lon) > 180:
        return None
    return lat, lon


def _country_name(result: Mapping[str, Any]) -> str | None:
    return _COUNTRY_NAMES.get(result.get("country_code", "")) or _text(result.get("country"))


def caption_fields(row: Mapping[str, Any], config: MetaCaptionConfig, source_format: str) -> dict[str, str]:
    """The placeholder values one RS3 row can fill, formatted as caption text (rules: module docstring).

    `row` is a row of RS3_METADATA_FIELDS as pyarrow's to_pylist gives it; a field the row cannot fill is
    absent from the result."""
    if source_format not in RS3_FORMATS:
        raise ValueError(f"unknown RS3 format {source_format!r} (known: {', '.join(RS3_FORMATS)})")
    fields: dict[str, str | None] = {}
    location = _location(row.get("latitude"), row.get("longitude"))
    if location is not None:
        place = _lookup([location])[location]
        fields["country"], fields["city"] = place.country, place.city
    when = _utc(row.get("timestamp"))
    if when is not None:
        fields["timestamp"] = (
            f"{when:%Y-%m-%d}" if when.time() == datetime.min.time() else f"{when:%Y-%m-%d %H:%M} UTC"
        )
        fields["month_year"] = f"{_MONTHS[when.month - 1]} {when.year}"
        latitude = None if location is None else location[0]
        fields["season"] = _season(when.month, latitude, config.season)
    labels = row.get("labels")
    if isinstance(labels, list | tuple):
        joined = "; ".join(dict.fromkeys(label for label in map(_label, labels) if label))
        fields["class_labels"] = joined or None
    class_label = _label(row.get("class_label"))
    # fMoW's false_detection marks a box around nothing of its categories: no class to name
    fields["class_label"] = (None if class_label == "false detection" else class_label) or fields.get(
        "class_labels"
    )
    fields["relative_location"] = _relative_location(row)
    fields["ground_sample_distance"] = _bounded(row.get("gsd"), 0, math.inf, 2)
    if fields["ground_sample_distance"] == "0":  # below 5 mm: not a real ground sample distance
        fields["ground_sample_distance"] = None
    fields["utm_zone"] = _utm_zone(
        row.get("utm_zone"), config.utm_zone == "rs5m" and source_format == "bigearthnet"
    )
    cloud_cover = _number(row.get("cloud_cover"))
    if cloud_cover is not None and 0 <= cloud_cover <= 100:
        fields["cloud_cover_rate"] = str(round(cloud_cover))
    scan_direction = _text(row.get("scan_direction"))
    fields["scan_direction"] = scan_direction.lower() if scan_direction else None
    azimuth = _number(row.get("target_azimuth"))
    if azimuth is not None and 0 <= azimuth <= 360:
        fields["target_azimuth"] = _decimal(round(azimuth, 1) % 360, 1)  # 359.96 is 0, not 360
    fields["off_nadir"] = _bounded(row.get("off_nadir_angle"), 0, 90, 1)
    return {name: value for name, value in fields.items() if value}


def _season(month: int, latitude: float | None, rule: str) -> str | None:
    if rule == "rs5m":
        return _SEASONS[month - 1]
    if latitude is None:
        return None
    return _SEASONS[month - 1 if latitude >= 0 else (month + 5) % 12]


def _utc(value: Any) -> datetime | None:
    # value != value: pandas' NaT is a datetime that equals nothing
    if not isinstance(value, datetime) or value != value:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _relative_location(row: Mapping[str, Any]) -> str | None:
    boxes, width, height = (
        row.get("bounding_boxes"),
        _number(row.get("img_width")),
        _number(row.get("img_height")),
    )
    if not isinstance(boxes, list | tuple) or not boxes or not width or not height or width < 0 or height < 0:
        return None
    box = boxes[0].get("box") if isinstance(boxes[0], Mapping) else None
    if not isinstance(box, list | tuple) or len(box) != 4:
        return None
    x, y, w, h = (_number(v) for v in box)
    if x is None or y is None or w is None or h is None or w < 0 or h < 0:
        return None
    cx, cy = x + w / 2, y + h / 2
    if not (0 <= cx <= width and 0 <= cy <= height):
        return None
    return _GRID[min(int(3 * cy / height), 2)][min(int(3 * cx / width), 2)]


def _utm_zone(value: Any, hemisphere_letter: bool) -> str | None:
    text = _text(value)
    match = _UTM_ZONE.fullmatch(text.upper()) if text else None
    if match is None or not 1 <= int(match[1]) <= 60:
        return None
    band = match[2]
    if hemisphere_letter:
        band = "N" if band >= "N" else "S"  # bands C-M lie south of the equator, N-X north
    return f"{int(match[1])}{band}"


def _text(value: Any) -> str | None:
    """One clean line of text, or None for a non-string, a blank, or a null written as text."""
    if not isinstance(value, str):
        return None
    text = " ".join(value.replace("{", " ").replace("}", " ").split())
    return None if text.lower() in _NULL_WORDS else text


def _label(value: Any) -> str | None:
    text = _text(value.replace("_", " ")) if isinstance(value, str) else None
    return text.lower() if text else None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _bounded(value: Any, low: float, high: float, decimals: int) -> str | None:
    number = _number(value)
    return _decimal(number, decimals) if number is not None and low <= number <= high else None


def _decimal(value: float, decimals: int) -> str:
    text = f"{value + 0.0:.{decimals}f}"  # + 0.0 turns -0.0 into 0.0
    return text.rstrip("0").rstrip(".") if "." in text else text
