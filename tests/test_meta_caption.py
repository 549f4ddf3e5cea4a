"""Meta captions (tasks/meta_caption.py): field rules on hand-built rows, reproducible template choice, and
no placeholder, null or broken spacing reaching a caption from any template with any field missing."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from rs5m.config import RS3_FORMATS, MetaCaptionConfig
from tasks.meta_caption import (
    FAMILIES_BY_FORMAT,
    FIELDS,
    TemplateSet,
    caption_fields,
    meta_caption,
    places,
    resolve_templates,
)

HEMISPHERE = MetaCaptionConfig()
RS5M = MetaCaptionConfig(season="rs5m", utm_zone="rs5m")
TEMPLATES = TemplateSet.read(resolve_templates("rs5m-v1"))
# What no caption may contain: a null written out, a placeholder brace, an empty value, a doubled space.
LEAK = re.compile(r"\b(?:None|nan|NaN|null)\b|[{}]|  |''|^\s|\s$")


def fmow_row(**changes) -> dict:
    """A complete FMoW row in Sydney in January, its box in the top-right cell."""
    row = {
        "file": "airport_terminal/airport_terminal_0/airport_terminal_0_0_rgb.jpg",
        "view": "rgb",
        "class_label": "airport_terminal",
        "labels": None,
        "timestamp": datetime(2016, 1, 29, 19, 5, 42, tzinfo=UTC),
        "latitude": -33.87,
        "longitude": 151.21,
        "country_code": "AUS",
        "utm_zone": "56H",
        "gsd": 0.5123,
        "multi_resolution": 2.05,
        "cloud_cover": 3.0,
        "scan_direction": "FORWARD",
        "target_azimuth": 87.77,
        "off_nadir_angle": 27.81,
        "img_width": 900,
        "img_height": 600,
        "bounding_boxes": [
            {
                "id": 1,
                "box": [700, 50, 100, 80],
                "category": "airport_terminal",
                "raw_location": "POLYGON (...)",
            }
        ],
        "raw_location": None,
        "tile_source": None,
        "extra_metadata": None,
    }
    return row | changes


def ben_row(**changes) -> dict:
    """A BigEarthNet patch in Ireland (zone 29, latitude 52 N: band U)."""
    row = {name: None for name in fmow_row()} | {
        "file": "S2A_MSIL2A_20170613T101031_N9999_R022_T29UPU/S2A_MSIL2A_20170613T101031_N9999_R022_T29UPU_48_57",
        "labels": ["Coniferous forest", "Beaches, dunes, sands", "Coniferous forest"],
        "timestamp": datetime(2017, 6, 13, 10, 10, 31, tzinfo=UTC),
        "latitude": 52.0,
        "longitude": -8.0,
        "utm_zone": "29U",
        "gsd": 10.0,
        "tile_source": "S2A_MSIL2A_20170613T101031_N9999_R022_T29UPU",
    }
    return row | changes


def test_shipped_templates_equal_rs5m_file(shared_data: Path) -> None:
    shipped = resolve_templates("rs5m-v1")
    assert shipped.read_bytes() == (shared_data / "rs5m_protocol" / "geometa_template.json").read_bytes()
    assert TEMPLATES.identity == hashlib.sha256(shipped.read_bytes()).hexdigest()


def test_every_placeholder_is_fillable_and_every_format_has_its_families() -> None:
    names = set()
    for family, templates in TEMPLATES.families.items():
        for template in templates:
            names |= set(re.findall(r"\{(\w+)\}", template))
        assert TEMPLATES.eligible(family, set(FIELDS)) == list(range(len(templates))), family
    assert names == set(FIELDS) - {"city"}
    assert set(FAMILIES_BY_FORMAT) == set(RS3_FORMATS)
    for families in FAMILIES_BY_FORMAT.values():
        assert set(families) <= set(TEMPLATES.families)


def test_fmow_fields() -> None:
    assert caption_fields(fmow_row(), HEMISPHERE, "fmow") == {
        "country": "Australia",
        "city": "Sydney",
        "season": "summer",  # January, south of the equator
        "timestamp": "2016-01-29 19:05 UTC",
        "month_year": "January 2016",
        "class_label": "airport terminal",
        "relative_location": "top right",
        "ground_sample_distance": "0.51",
        "utm_zone": "56H",
        "cloud_cover_rate": "3",
        "scan_direction": "forward",
        "target_azimuth": "87.8",
        "off_nadir": "27.8",
    }
    rs5m = caption_fields(fmow_row(), RS5M, "fmow")
    assert rs5m["season"] == "winter"  # RS5M's rule: December-February is winter everywhere
    assert rs5m["utm_zone"] == "56H"  # FMoW's zone is written as given under either rule


@pytest.mark.parametrize(
    ("month", "latitude", "hemisphere", "rs5m"),
    [
        (1, 48.0, "winter", "winter"),
        (2, -34.0, "summer", "winter"),
        (3, 48.0, "spring", "spring"),
        (4, -34.0, "autumn", "spring"),
        (7, 0.0, "summer", "summer"),  # the equator counts as north
        (7, -0.1, "winter", "summer"),
        (10, 48.0, "autumn", "autumn"),
        (11, -34.0, "spring", "autumn"),
        (12, -34.0, "summer", "winter"),
    ],
)
def test_season_by_month_and_hemisphere(month: int, latitude: float, hemisphere: str, rs5m: str) -> None:
    row = fmow_row(timestamp=datetime(2020, month, 15, 10, 30, tzinfo=UTC), latitude=latitude, longitude=10.0)
    assert caption_fields(row, HEMISPHERE, "fmow")["season"] == hemisphere
    assert caption_fields(row, RS5M, "fmow")["season"] == rs5m


def test_season_without_latitude_is_absent_unless_rs5m() -> None:
    row = fmow_row(latitude=None)
    assert "season" not in caption_fields(row, HEMISPHERE, "fmow")
    assert "country" not in caption_fields(row, HEMISPHERE, "fmow")
    assert caption_fields(row, RS5M, "fmow")["season"] == "winter"


def test_bigearthnet_fields() -> None:
    fields = caption_fields(ben_row(), HEMISPHERE, "bigearthnet")
    assert fields["utm_zone"] == "29U"
    assert caption_fields(ben_row(), RS5M, "bigearthnet")["utm_zone"] == "29N"
    assert caption_fields(ben_row(utm_zone="56H"), RS5M, "bigearthnet")["utm_zone"] == "56S"
    # labels in order, duplicates once, "; " because labels contain commas; also the class for cc3m
    assert fields["class_labels"] == "coniferous forest; beaches, dunes, sands"
    assert fields["class_label"] == fields["class_labels"]
    assert fields["country"] == "Ireland"
    assert fields["season"] == "summer"
    assert fields["ground_sample_distance"] == "10"
    assert "relative_location" not in fields


def test_country_from_coordinates() -> None:
    paris = caption_fields(fmow_row(latitude=48.8566, longitude=2.3522), HEMISPHERE, "fmow")
    assert (paris["country"], paris["city"]) == ("France", "Paris")
    seoul = caption_fields(fmow_row(latitude=37.5665, longitude=126.978), HEMISPHERE, "fmow")
    assert seoul["country"] == "South Korea"  # not reverse_geocode's "Korea, Republic of"
    batch = places([(48.8566, 2.3522), (None, 2.0), (91.0, 0.0), (48.8566, 2.3522), (-33.87, 151.21)])
    assert [p.country if p else None for p in batch] == ["France", None, None, "France", "Australia"]


@pytest.mark.parametrize(
    ("centre", "cell"),
    [
        ((100, 100), "top left"),
        ((450, 100), "top"),
        ((750, 100), "top right"),
        ((100, 300), "left"),
        ((450, 300), "center"),
        ((899, 300), "right"),
        ((0, 599), "bottom left"),
        ((450, 500), "bottom"),
        ((900, 600), "bottom right"),  # on the far edges: still inside
        ((300, 200), "center"),  # on a grid line: the cell to the lower right
    ],
)
def test_relative_location_grid(centre: tuple[int, int], cell: str) -> None:
    x, y = centre
    row = fmow_row(
        bounding_boxes=[{"id": 1, "box": [x - 10, y - 10, 20, 20], "category": "x", "raw_location": None}]
    )
    assert caption_fields(row, HEMISPHERE, "fmow")["relative_location"] == cell


@pytest.mark.parametrize(
    "changes",
    [
        {"bounding_boxes": None},
        {"bounding_boxes": []},
        {"img_width": None},
        {"img_height": 0},
        {"bounding_boxes": [{"id": 1, "box": None, "category": "x", "raw_location": None}]},
        {"bounding_boxes": [{"id": 1, "box": [1, 2, 3], "category": "x", "raw_location": None}]},
        {"bounding_boxes": [{"id": 1, "box": [950, 10, 20, 20], "category": "x", "raw_location": None}]},
        {"bounding_boxes": [{"id": 1, "box": [10, 10, -5, 20], "category": "x", "raw_location": None}]},
    ],
)
def test_relative_location_absent_without_usable_box(changes: dict) -> None:
    assert "relative_location" not in caption_fields(fmow_row(**changes), HEMISPHERE, "fmow")


def test_time_text() -> None:
    east = timezone(timedelta(hours=2))
    fields = caption_fields(fmow_row(timestamp=datetime(2012, 4, 2, 12, 32, tzinfo=east)), HEMISPHERE, "fmow")
    assert (fields["timestamp"], fields["month_year"]) == ("2012-04-02 10:32 UTC", "April 2012")
    naive = caption_fields(fmow_row(timestamp=datetime(2012, 4, 2, 10, 32, 59)), HEMISPHERE, "fmow")
    assert naive["timestamp"] == "2012-04-02 10:32 UTC"  # naive means UTC, as the schema stores it
    date_only = caption_fields(fmow_row(timestamp=datetime(2015, 6, 1, tzinfo=UTC)), HEMISPHERE, "fmow")
    assert date_only["timestamp"] == "2015-06-01"
    assert date_only["season"] == "winter"  # Sydney in June


@pytest.mark.parametrize(
    ("column", "value", "field", "text"),
    [
        ("gsd", 10.0, "ground_sample_distance", "10"),
        ("gsd", 0.5, "ground_sample_distance", "0.5"),
        ("cloud_cover", 12.6, "cloud_cover_rate", "13"),
        ("cloud_cover", 0, "cloud_cover_rate", "0"),
        ("target_azimuth", 359.97, "target_azimuth", "0"),
        ("target_azimuth", 30.04, "target_azimuth", "30"),
        ("off_nadir_angle", -0.0, "off_nadir", "0"),
        ("scan_direction", " REVERSE ", "scan_direction", "reverse"),
        ("class_label", "Dry_Field", "class_label", "dry field"),
        ("utm_zone", "05q", "utm_zone", "5Q"),
    ],
)
def test_value_formatting(column: str, value: object, field: str, text: str) -> None:
    assert caption_fields(fmow_row(**{column: value}), HEMISPHERE, "fmow")[field] == text


@pytest.mark.parametrize(
    ("column", "value", "field"),
    [
        ("gsd", float("nan"), "ground_sample_distance"),
        ("gsd", -1.0, "ground_sample_distance"),
        ("gsd", 0.001, "ground_sample_distance"),
        ("cloud_cover", 150.0, "cloud_cover_rate"),
        ("cloud_cover", True, "cloud_cover_rate"),
        ("target_azimuth", float("inf"), "target_azimuth"),
        ("off_nadir_angle", 95.0, "off_nadir"),
        ("scan_direction", "  ", "scan_direction"),
        ("scan_direction", "NaN", "scan_direction"),
        ("class_label", "None", "class_label"),
        ("class_label", "{}", "class_label"),
        ("utm_zone", "61T", "utm_zone"),
        ("utm_zone", "32I", "utm_zone"),
        ("utm_zone", "32", "utm_zone"),
        ("timestamp", "2012-04-02", "timestamp"),
        ("latitude", float("nan"), "country"),
        ("longitude", 200.0, "country"),
    ],
)
def test_unusable_values_are_absent(column: str, value: object, field: str) -> None:
    assert field not in caption_fields(fmow_row(**{column: value}), HEMISPHERE, "fmow")


def test_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown RS3 format"):
        caption_fields(fmow_row(), HEMISPHERE, "laion")


def test_fallback_order() -> None:
    def family(row: dict, source_format: str) -> str | None:
        fields = caption_fields(row, HEMISPHERE, source_format)
        chosen = meta_caption(fields, FAMILIES_BY_FORMAT[source_format], TEMPLATES, "sample")
        return chosen and chosen[1].split("/")[0]

    assert family(fmow_row(), "fmow") == "fmow_complex"
    assert family(fmow_row(gsd=None), "fmow") == "fmow_base"
    assert family(fmow_row(gsd=None, bounding_boxes=None), "fmow") == "cc3m"
    assert family(fmow_row(class_label=None), "fmow") == "yfcc14m_country_timestamp"
    assert family(ben_row(), "bigearthnet") == "ben"
    assert family(ben_row(utm_zone=None), "bigearthnet") == "cc3m"
    folder = {"file": "a.jpg", "class_label": "dense_residential"}
    assert family(folder, "image_folder") == "cc3m"
    place_time = {
        "file": "a.jpg",
        "latitude": 48.85,
        "longitude": 2.35,
        "timestamp": datetime(2020, 5, 1, 9, 0),
    }
    assert family(place_time, "image_folder") == "yfcc14m_country_timestamp"
    assert (
        family({"file": "a.jpg", "latitude": 48.85, "longitude": 2.35}, "image_folder") == "yfcc14m_country"
    )
    assert family({"file": "a.jpg", "timestamp": datetime(2020, 5, 1, 9, 0)}, "image_folder") is None
    for source_format in RS3_FORMATS:
        assert caption_fields({"file": "a.jpg"}, HEMISPHERE, source_format) == {}
        assert family({"file": "a.jpg"}, source_format) is None


def test_template_choice_is_reproducible_and_spread() -> None:
    fields = caption_fields(fmow_row(), HEMISPHERE, "fmow")
    first = meta_caption(fields, FAMILIES_BY_FORMAT["fmow"], TEMPLATES, "fmow/airport_terminal_0_0_rgb")
    assert first == meta_caption(
        fields, FAMILIES_BY_FORMAT["fmow"], TEMPLATES, "fmow/airport_terminal_0_0_rgb"
    )
    assert first is not None
    caption, template_id = first
    family, index = template_id.split("/")
    assert caption == TEMPLATES.families[family][int(index)].format_map(fields)
    picks = [meta_caption(fields, FAMILIES_BY_FORMAT["fmow"], TEMPLATES, f"sample-{i}") for i in range(2000)]
    chosen = Counter(pick[1] for pick in picks if pick)
    assert len(chosen) == 50  # all of fmow_complex, each about 40 times
    assert max(chosen.values()) < 80


def test_no_leak_from_any_template_with_any_field_missing() -> None:
    complete = caption_fields(fmow_row(), HEMISPHERE, "fmow") | caption_fields(
        ben_row(), HEMISPHERE, "bigearthnet"
    )
    assert set(complete) == set(FIELDS)
    variants = [complete] + [{k: v for k, v in complete.items() if k != missing} for missing in FIELDS]
    for family, templates in TEMPLATES.families.items():
        for index, template in enumerate(templates):
            single = TemplateSet({family: [template]}, "one template")
            for fields in variants:
                chosen = meta_caption(fields, [family], single, f"{family}/{index}")
                needed = set(re.findall(r"\{(\w+)\}", template))
                assert (chosen is not None) == (needed <= set(fields)), (family, index)
                if chosen is not None:
                    assert not LEAK.search(chosen[0]), chosen[0]
    # and through the real fallbacks, for every format and every missing field
    for source_format, families in FAMILIES_BY_FORMAT.items():
        for fields in variants:
            chosen = meta_caption(fields, families, TEMPLATES, source_format)
            assert chosen is not None and not LEAK.search(chosen[0])


def test_field_values_are_clean_for_messy_rows() -> None:
    messy = [
        fmow_row(class_label="  airport__terminal  ", scan_direction="for\tward", labels=["", None, "nan"]),
        fmow_row(class_label="{x}", scan_direction="null", labels=[]),
        ben_row(labels=[" Pastures ", "Inland_waters"], utm_zone=" 29u "),
        {"file": "x", "latitude": 0.0, "longitude": 0.0, "timestamp": datetime(2020, 3, 1, 0, 0, 1)},
    ]
    for row in messy:
        for source_format in RS3_FORMATS:
            for config in (HEMISPHERE, RS5M):
                for name, value in caption_fields(row, config, source_format).items():
                    assert name in FIELDS and value == " ".join(value.split()) and not LEAK.search(value), (
                        value
                    )


@pytest.mark.parametrize(
    ("content", "fault"),
    [
        ("[]", "at least one family"),
        ('{"a": []}', "non-empty list"),
        ('{"a": [""]}', "non-empty string"),
        ('{"a": ["{}"]}', "plain"),
        ('{"a": ["{x:.2f}"]}', "plain"),
        ('{"a": ["{x!r}"]}', "plain"),
        ('{"a": ["{x.y}"]}', "plain"),
        ('{"a": ["{{x}}"]}', "literal brace"),
        ('{"a": ["{x"]}', "a/0"),
        ("{", "cannot read"),
    ],
)
def test_bad_template_files_are_refused(tmp_path: Path, content: str, fault: str) -> None:
    path = tmp_path / "templates.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=re.escape(fault)):
        TemplateSet.read(path)


def test_resolve_templates(tmp_path: Path) -> None:
    assert resolve_templates("rs5m-v1").name == "rs5m-v1.json"
    with pytest.raises(ValueError, match="unknown template set version 'rs5m-v9'"):
        resolve_templates("rs5m-v9")
    custom = tmp_path / "mine.json"
    custom.write_text(json.dumps({"cc3m": ["an image of {class_label} and {unknown_field}."]}))
    templates = TemplateSet.read(resolve_templates(str(custom)))
    # an unknown placeholder is allowed but never filled; a family the file lacks is skipped
    assert meta_caption({"class_label": "a farm"}, ["fmow_complex", "cc3m"], templates, "s") is None


def test_fmow_false_detection_is_not_named_as_a_class() -> None:
    config = MetaCaptionConfig()
    row = {"class_label": "false_detection", "latitude": 48.85, "longitude": 2.35}
    fields = caption_fields(row, config, "fmow")
    assert "class_label" not in fields and fields["country"] == "France"
    caption, template = meta_caption(
        fields, FAMILIES_BY_FORMAT["fmow"], TemplateSet.read(resolve_templates("rs5m-v1")), "s1"
    )
    assert "false detection" not in caption and template.startswith("yfcc14m_country")
