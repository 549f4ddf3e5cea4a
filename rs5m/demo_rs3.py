"""Small label-only datasets in the real on-disk layouts of RS3's formats, for the offline demo and tests.

`write_demo_fmow`, `write_demo_bigearthnet_v1` and `write_demo_image_folder` each write one source folder
(the folder a Rs3SourceConfig's `path` names) and return, per sample (its `Listed.file`), the metadata the
adapter must read back: exactly `Sample.metadata` (RS3_METADATA_FIELDS names and Python types), so a test
can check the meta captions against it field by field. One sample per format is written broken on purpose;
its entry is `{"file": ..., "drop_reason": <reason>}` (DROP_REASON), so the demo's funnel shows a drop.

The data are designed, not sampled: several classes, places in both hemispheres, acquisition months across
the year, boxes in different cells of the image's 3x3 grid, and the real formats' quirks (fMoW's gaps in the
view index, numbers written as strings, a single bounding-box object instead of a list, a null category;
BigEarthNet's patch name with a lost digit of the time, a label containing a comma; image files with
upper-case extensions). BigEarthNet's southern-hemisphere patches are invented (the real dataset is all
European) so that the UTM 327zz path and the hemisphere's seasons are exercised.

Deterministic: fixed seeds per image (numpy PCG64), integer drawing (rs5m.demo's tile drawers), fixed JPEG
quality; the same bytes on every run with the same Pillow, numpy and tifffile.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import tifffile
from PIL import Image
from pyproj import Transformer

from rs5m.demo import _draw_tile, _jpeg
from storage.atomic import write_bytes, write_text
from tasks.rs3 import json_text, latitude_band

SEED = 3_000_017
DROP_REASON = "drop_reason"
FMOW_SIDE = 128  # pixels of the demo fMoW JPEGs (real ones are 0.3-60 MB; small keeps the demo fast)
GRID = 3  # the image's 3x3 grid, in which the boxes are placed
MSRGB_GAIN_PERCENT = (104, 98, 94)  # msrgb is the same capture, pan-sharpened multispectral: a bit warmer


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([SEED, *key])


def _tile(kind: str, side: int, *key: int) -> Image.Image:
    """A synthetic RS tile of the given kind (rs5m.demo's drawers, 256 px) resized to side."""
    return _draw_tile(_rng(*key), kind).resize((side, side), Image.Resampling.LANCZOS)


# ---------------------------------------------------------------- fMoW


@dataclass(frozen=True)
class _Capture:
    category: str
    scene: int  # <category>_<scene>
    view_index: int  # <t>: real scenes have gaps, so it is not always 0, 1, 2
    kind: str  # tile drawer
    country_code: str
    lat: float  # footprint centre
    lon: float
    time: str  # ISO, as fMoW writes it
    cell: tuple[int, int]  # (row, column) of the box in the 3x3 grid
    box_category: str | None  # None: written as null (a false detection)
    quirks: frozenset[str] = frozenset()  # "string_numbers", "single_box", "no_cloud_cover", "no_json"

    @property
    def stem(self) -> str:
        return f"{self.category}/{self.category}_{self.scene}/{self.category}_{self.scene}_{self.view_index}"


CAPTURES = (
    _Capture("airport", 0, 0, "roads", "USA", 47.449, -122.309, "2016-03-14T19:02:11Z", (0, 0), "airport"),
    _Capture("airport", 0, 2, "roads", "USA", 47.449, -122.309, "2016-08-02T19:10:40Z", (1, 1), "airport"),
    _Capture("crop_field", 3, 0, "fields", "BRA", -12.541, -55.722, "2015-01-20T13:45:03Z", (2, 2), "crop_field"),
    _Capture("port", 1, 0, "coast", "AUS", -33.853, 151.192, "2014-07-09T23:51:19Z", (0, 2), "port"),
    _Capture("dam", 0, 1, "river", "ZAF", -25.761, 27.853, "2017-05-02T08:20:00Z", (2, 0), "dam",
             frozenset({"no_cloud_cover"})),
    _Capture("hospital", 2, 0, "buildings", "JPN", 35.681, 139.767, "2013-10-30T01:33:47Z", (1, 0), "hospital",
             frozenset({"string_numbers", "single_box"})),
    _Capture("park", 0, 0, "forest", "FRA", 48.853, 2.349, "2012-04-02T10:32:22Z", (0, 1), "park"),
    _Capture("false_detection", 4, 0, "fields", "KEN", -1.292, 36.822, "2015-11-11T07:59:59Z", (1, 2), None),
    _Capture("stadium", 0, 0, "buildings", "GBR", 51.556, -0.280, "2016-06-21T11:00:00Z", (1, 1), "stadium",
             frozenset({"no_json"})),
)  # fmt: skip
_FOOTPRINT_DEG = 0.003  # side of a demo image's footprint, degrees


def _wkt(corners: list[tuple[float, float]]) -> str:
    """WKT polygon of (lon, lat) corners, closed, as fMoW writes raw_location."""
    points = [*corners, corners[0]]
    return "POLYGON ((" + ", ".join(f"{lon:.6f} {lat:.6f}" for lon, lat in points) + "))"


def _footprint(
    capture: _Capture, x: float, y: float, width: float, height: float
) -> list[tuple[float, float]]:
    """(lon, lat) corners of a pixel rectangle, clockwise from the top left, rounded as the WKT writes them."""
    west, north = capture.lon - _FOOTPRINT_DEG / 2, capture.lat + _FOOTPRINT_DEG / 2
    per_pixel = _FOOTPRINT_DEG / FMOW_SIDE

    def corner(px: float, py: float) -> tuple[float, float]:
        return round(west + px * per_pixel, 6), round(north - py * per_pixel, 6)

    return [corner(x, y), corner(x + width, y), corner(x + width, y + height), corner(x, y + height)]


def _fmow_document(capture: _Capture, index: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The capture's JSON as fMoW writes it, and the metadata the adapter reads from it (less file/view)."""
    cell = FMOW_SIDE // GRID
    row, column = capture.cell
    box = [column * cell + 6, row * cell + 6, cell - 12, cell - 12]
    box_corners = _footprint(capture, *box)
    image_wkt = _wkt(_footprint(capture, 0, 0, FMOW_SIDE, FMOW_SIDE))
    gsd, off_nadir, azimuth, cloud = 0.3 + 0.05 * index, 5.0 + 2.5 * index, 12.0 * index + 3.5, index % 4 * 5
    zone = int((capture.lon + 180) // 6) + 1
    utm = f"{zone}{latitude_band(capture.lat, 'lat')}"
    entry = {
        "ID": 1000 + index,
        "box": box,
        "category": capture.box_category,
        "raw_location": _wkt(box_corners),
    }
    numbers: dict[str, Any] = {
        "gsd": gsd,
        "img_width": FMOW_SIDE,
        "img_height": FMOW_SIDE,
        "cloud_cover": cloud,
        "multi_resolution_dbl": round(gsd * 4, 4),
        "target_azimuth_dbl": azimuth,
        "off_nadir_angle_dbl": off_nadir,
    }
    if "no_cloud_cover" in capture.quirks:
        del numbers["cloud_cover"]
    extra = {
        "pan_resolution_dbl": gsd,
        "multi_resolution_start_dbl": round(gsd * 4 - 0.01, 4),
        "multi_resolution_end_dbl": round(gsd * 4 + 0.01, 4),
        "sun_azimuth_dbl": 150.0 + index,
        "sun_elevation_dbl": 40.0 + index,
        "approximate_wavelengths": [0.48, 0.545, 0.66],
    }
    document = {
        **{
            key: str(value) if "string_numbers" in capture.quirks else value for key, value in numbers.items()
        },
        "country_code": capture.country_code,
        "timestamp": capture.time,
        "scan_direction": "Forward" if index % 2 == 0 else "Reverse",
        "utm": utm,
        "raw_location": image_wkt,
        "bounding_boxes": entry if "single_box" in capture.quirks else [entry],
        **extra,
    }
    category = capture.box_category or "false_detection"
    metadata = {
        "class_label": category,
        "timestamp": datetime.fromisoformat(capture.time).astimezone(UTC),
        "longitude": box_corners[0][0],
        "latitude": box_corners[0][1],
        "country_code": capture.country_code,
        "utm_zone": utm,
        "gsd": float(gsd),
        "multi_resolution": float(numbers["multi_resolution_dbl"]),
        "scan_direction": document["scan_direction"],
        "target_azimuth": float(azimuth),
        "off_nadir_angle": float(off_nadir),
        "img_width": FMOW_SIDE,
        "img_height": FMOW_SIDE,
        "bounding_boxes": [
            {"id": entry["ID"], "box": box, "category": category, "raw_location": entry["raw_location"]}
        ],
        "raw_location": image_wkt,
        "extra_metadata": json_text(extra),
    }
    if "cloud_cover" in numbers:
        metadata["cloud_cover"] = float(cloud)
    return document, metadata


def write_demo_fmow(root: Path) -> dict[str, dict[str, Any]]:
    """An fMoW-rgb split folder at root: 8 captures, each as rgb and msrgb JPEGs with their JSONs, and one
    capture without JSON (both views dropped: missing_metadata). Returns the metadata per image file of
    both views; a source with the default `views: [rgb]` lists only the *_rgb.jpg entries."""
    root = Path(root)
    expected: dict[str, dict[str, Any]] = {}
    for index, capture in enumerate(CAPTURES):
        rgb = _tile(capture.kind, FMOW_SIDE, 1, index)
        warmer = (np.asarray(rgb, dtype=np.int32) * MSRGB_GAIN_PERCENT + 50) // 100
        msrgb = Image.fromarray(np.clip(warmer, 0, 255).astype(np.uint8), "RGB")
        document, metadata = _fmow_document(capture, index)
        for view, image in (("rgb", rgb), ("msrgb", msrgb)):
            file = f"{capture.stem}_{view}.jpg"
            write_bytes(root / file, _jpeg(image))
            if "no_json" in capture.quirks:
                expected[file] = {"file": file, DROP_REASON: "missing_metadata"}
                continue
            write_text(root / f"{capture.stem}_{view}.json", json.dumps(document, indent=2))
            expected[file] = {"file": file, "view": view, **metadata}
    return expected


# ---------------------------------------------------------------- BigEarthNet v1


@dataclass(frozen=True)
class _Patch:
    name: str  # as v1 names it; one keeps the real quirk of a lost digit in the time
    acquired: str  # acquisition_date, "YYYY-MM-DD HH:MM:SS" (UTC)
    zone: int
    hemisphere: str  # N | S
    lat: float  # where the patch is designed to be (its centre lands within 60 m of it)
    lon: float
    labels: tuple[str, ...]
    kind: str  # tile drawer
    tile: str  # MGRS tile of the L1C product
    missing_band: str | None = None


PATCHES = (
    _Patch("S2A_MSIL2A_20170617T113321_36_85", "2017-06-17 11:33:21", 29, "N", 52.31, -6.89,
           ("Non-irrigated arable land", "Pastures"), "fields", "T29UPU"),
    _Patch("S2B_MSIL2A_20170914T093029_32_39", "2017-09-14 09:30:29", 34, "N", 44.72, 21.49,
           ("Broad-leaved forest", "Transitional woodland/shrub"), "forest", "T34TEQ"),
    _Patch("S2A_MSIL2A_20180510T94033_21_7", "2018-05-10 09:40:33", 35, "N", 64.89, 27.54,
           ("Coniferous forest", "Peatbogs"), "forest", "T35WPN"),
    _Patch("S2A_MSIL2A_20171221T112501_56_35", "2017-12-21 11:25:01", 29, "N", 39.36, -8.21,
           ("Complex cultivation patterns",
            "Land principally occupied by agriculture, with significant areas of natural vegetation"),
           "fields", "T29SND"),
    _Patch("S2A_MSIL2A_20180115T081241_12_40", "2018-01-15 08:12:41", 34, "S", -33.93, 18.86,
           ("Discontinuous urban fabric", "Vineyards"), "buildings", "T34HBH"),
    _Patch("S2B_MSIL2A_20180303T001209_77_3", "2018-03-03 00:12:09", 55, "S", -38.36, 144.95,
           ("Sea and ocean", "Beaches, dunes, sands"), "coast", "T55HCU"),
    _Patch("S2A_MSIL2A_20170821T102021_5_64", "2017-08-21 10:20:21", 32, "N", 46.95, 7.44,
           ("Coniferous forest", "Pastures"), "forest", "T32TLT", missing_band="B03"),
)  # fmt: skip
# Band -> pixel size (m): 10 m bands are 120 px, 20 m 60 px, 60 m 20 px (1,200 m patches).
BAND_RESOLUTION = {
    "B01": 60, "B02": 10, "B03": 10, "B04": 10, "B05": 20, "B06": 20, "B07": 20,
    "B08": 10, "B09": 60, "B11": 20, "B12": 20, "B8A": 20,
}  # fmt: skip
_PROJECTION = (
    'PROJCS["WGS 84 / UTM zone {zone}{hemisphere}",GEOGCS["WGS 84",DATUM["WGS_1984",SPHEROID["WGS 84",6378137,'
    '298.257223563,AUTHORITY["EPSG","7030"]],AUTHORITY["EPSG","6326"]],PRIMEM["Greenwich",0,AUTHORITY["EPSG",'
    '"8901"]],UNIT["degree",0.0174532925199433,AUTHORITY["EPSG","9122"]],AXIS["Latitude",NORTH],AXIS['
    '"Longitude",EAST],AUTHORITY["EPSG","4326"]],PROJECTION["Transverse_Mercator"],PARAMETER['
    '"latitude_of_origin",0],PARAMETER["central_meridian",{meridian}],PARAMETER["scale_factor",0.9996],'
    'PARAMETER["false_easting",500000],PARAMETER["false_northing",{false_northing}],UNIT["metre",1,AUTHORITY['
    '"EPSG","9001"]],AXIS["Easting",EAST],AXIS["Northing",NORTH],AUTHORITY["EPSG","{epsg}"]]'
)


def _epsg(patch: _Patch) -> int:
    return (32600 if patch.hemisphere == "N" else 32700) + patch.zone


def _bands(patch: _Patch, index: int) -> dict[str, np.ndarray]:
    """Twelve uint16 bands (reflectance x 10,000) from an RGB tile: visible bands from its colours, NIR high
    where it is green (vegetation), SWIR from brightness; coarser bands are block means."""
    rgb = np.asarray(_tile(patch.kind, 120, 2, index), dtype=np.int64)
    noise = _rng(3, index).integers(-20, 21, size=(4, 120, 120))
    red, green, blue = (rgb[..., c] * 3000 // 255 + noise[c] for c in range(3))
    nir = green * 5 // 2 - red // 2 + noise[3]
    fine = {
        "B02": blue, "B03": green, "B04": red, "B08": nir, "B05": (red + nir) // 2, "B06": (red + 3 * nir) // 4,
        "B07": nir, "B8A": nir + 40, "B11": (red + green) * 3 // 4, "B12": (red + blue) // 2,
        "B01": blue - 60, "B09": nir // 3,
    }  # fmt: skip
    bands = {}
    for band, resolution in BAND_RESOLUTION.items():
        side = 1200 // resolution
        block = fine[band].reshape(side, 120 // side, side, 120 // side).mean(axis=(1, 3))
        bands[band] = np.clip(np.rint(block), 1, 15000).astype(np.uint16)
    return bands


def _geotiff(pixels: np.ndarray, resolution: int, ulx: int, uly: int, patch: _Patch) -> bytes:
    """An uncompressed single-band GeoTIFF with BigEarthNet's geo tags (tie point at the upper-left corner)."""
    citation = f"WGS 84 / UTM zone {patch.zone}{patch.hemisphere}|"
    geo_keys = (
        1, 1, 0, 7,
        1024, 0, 1, 1,  # GTModelTypeGeoKey: projected
        1025, 0, 1, 1,  # GTRasterTypeGeoKey: pixel is area
        1026, 34737, len(citation), 0,  # GTCitationGeoKey
        2049, 34737, 7, len(citation),  # GeogCitationGeoKey "WGS 84|"
        2054, 0, 1, 9102,  # GeogAngularUnitsGeoKey: degree
        3072, 0, 1, _epsg(patch),  # ProjectedCSTypeGeoKey
        3076, 0, 1, 9001,  # ProjLinearUnitsGeoKey: metre
    )  # fmt: skip
    buffer = io.BytesIO()
    tifffile.imwrite(
        buffer,
        pixels,
        photometric="minisblack",
        metadata=None,
        software=False,
        rowsperstrip=34,
        extratags=[
            (33550, "d", 3, (float(resolution), float(resolution), 0.0), True),
            (33922, "d", 6, (0.0, 0.0, 0.0, float(ulx), float(uly), 0.0), True),
            (34735, "H", len(geo_keys), geo_keys, True),
            (34737, "s", 0, citation + "WGS 84|", True),
        ],
    )
    return buffer.getvalue()


def write_demo_bigearthnet_v1(root: Path) -> dict[str, dict[str, Any]]:
    """A BigEarthNet v1.0 folder at root: 6 patches (12 band GeoTIFFs + labels_metadata.json each) in UTM
    zones 29N, 34N, 35N, 34S and 55S, and one patch without its B03 (unreadable_image). Returns the metadata
    per patch folder."""
    root = Path(root)
    expected: dict[str, dict[str, Any]] = {}
    for index, patch in enumerate(PATCHES):
        to_utm = Transformer.from_crs("EPSG:4326", f"EPSG:{_epsg(patch)}", always_xy=True)
        x, y = to_utm.transform(patch.lon, patch.lat)
        ulx, uly = 60 * round((x - 600) / 60), 60 * round((y + 600) / 60)  # on BigEarthNet's 60 m grid
        folder = root / patch.name
        for band, pixels in _bands(patch, index).items():
            if band != patch.missing_band:
                tiff = _geotiff(pixels, BAND_RESOLUTION[band], ulx, uly, patch)
                write_bytes(folder / f"{patch.name}_{band}.tif", tiff)
        product_time = patch.acquired.replace("-", "").replace(" ", "T").replace(":", "")
        document = {
            "labels": list(patch.labels),
            "coordinates": {"ulx": ulx, "uly": uly, "lrx": ulx + 1200, "lry": uly - 1200},
            "projection": _PROJECTION.format(
                zone=patch.zone,
                hemisphere=patch.hemisphere,
                meridian=patch.zone * 6 - 183,
                false_northing=0 if patch.hemisphere == "N" else 10_000_000,
                epsg=_epsg(patch),
            ),
            "tile_source": f"{patch.name[:3]}_MSIL1C_{product_time}_N0206_R{index + 8:03d}_{patch.tile}_"
            f"{product_time}.SAFE",
            "acquisition_date": patch.acquired,
        }
        write_text(folder / f"{patch.name}_labels_metadata.json", json.dumps(document))  # one line, as v1
        if patch.missing_band is not None:
            expected[patch.name] = {"file": patch.name, DROP_REASON: "unreadable_image"}
            continue
        lon, lat = Transformer.from_crs(f"EPSG:{_epsg(patch)}", "EPSG:4326", always_xy=True).transform(
            ulx + 600, uly - 600
        )
        expected[patch.name] = {
            "file": patch.name,
            "labels": list(patch.labels),
            "timestamp": datetime.strptime(patch.acquired, "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC),
            "latitude": lat,
            "longitude": lon,
            "utm_zone": f"{patch.zone}{latitude_band(lat, 'lat')}",
            "tile_source": document["tile_source"],
        }
    return expected


# ---------------------------------------------------------------- image folder (MillionAID-like)

_DRY_FIELD = "agriculture_land/arable_land/dry_field"  # MillionAID's three levels; the class is the last
_FOREST = "woodland/forest"
# file, tile drawer, metadata.csv row (class, lat, lon, time, note) or None
_FOLDER_IMAGES: tuple[tuple[str, str, tuple[str, str, str, str, str] | None], ...] = (
    (f"{_DRY_FIELD}/P0000001.jpg", "fields", ("", "36.0652", "-119.0171", "2019-07-04T18:30:00", "")),
    (f"{_DRY_FIELD}/P0000002.jpg", "fields", None),
    (f"{_DRY_FIELD}/P0000003.JPG", "fields", ("", "-34.6037", "-58.3816", "", "")),
    (f"{_DRY_FIELD}/P0000009.jpg", "fields", ("", "north", "12.5", "", "")),
    (f"{_FOREST}/P0000004.jpg", "forest", ("", "61.2181", "24.5000", "2018-02-11 09:15:00+02:00", "snow cover")),
    (f"{_FOREST}/P0000005.jpeg", "forest", None),
    (f"{_FOREST}/P0000006.png", "forest", ("", "", "", "2020-10-01", "")),
    ("P0000007.jpg", "coast", ("beach", "-8.7184", "115.1686", "", "test split, flat")),
    ("P0000008.TIF", "river", None),
)  # fmt: skip
_MALFORMED_FOLDER_IMAGE = f"{_DRY_FIELD}/P0000009.jpg"  # lat "north"


def _encoded(image: Image.Image, file: str) -> bytes:
    suffix = Path(file).suffix.lower()
    if suffix in (".jpg", ".jpeg"):
        return _jpeg(image)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG" if suffix == ".png" else "TIFF")
    return buffer.getvalue()


def _folder_metadata(file: str, row: tuple[str, str, str, str, str] | None) -> dict[str, Any]:
    """What the adapter reads for a demo image: its folder class, then its metadata.csv row on top."""
    metadata: dict[str, Any] = {"file": file}
    folder = PurePosixPath(file).parent.name
    if folder:
        metadata["class_label"] = folder
    if row is None:
        return metadata
    label, lat, lon, time, note = row
    if label:
        metadata["class_label"] = label
    if lat:
        metadata.update(latitude=float(lat), longitude=float(lon))
    if time:
        parsed = datetime.fromisoformat(time)
        metadata["timestamp"] = (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).astimezone(UTC)
    if note:
        metadata["extra_metadata"] = json_text({"note": note})
    return metadata


def write_demo_image_folder(root: Path) -> dict[str, dict[str, Any]]:
    """A MillionAID-like folder at root: images in two class folders (nested as MillionAID's levels) and
    two directly in root (its flat test split), upper-case extensions, a metadata.csv giving lat/lon/time
    (and a class) for some, and one row whose lat does not parse (malformed_metadata). Returns the metadata
    per image file."""
    root = Path(root)
    expected: dict[str, dict[str, Any]] = {}
    csv_text = io.StringIO()
    writer = csv.writer(csv_text, lineterminator="\n")
    writer.writerow(["file", "class", "lat", "lon", "time", "note"])
    for index, (file, kind, row) in enumerate(_FOLDER_IMAGES):
        write_bytes(root / file, _encoded(_tile(kind, FMOW_SIDE, 4, index), file))
        if row is not None:
            writer.writerow([file, *row])
        if file == _MALFORMED_FOLDER_IMAGE:
            expected[file] = {"file": file, DROP_REASON: "malformed_metadata"}
        else:
            expected[file] = _folder_metadata(file, row)
    write_text(root / "metadata.csv", csv_text.getvalue())
    return expected


# The demo's RS3 sources: name -> (the folder under the demo's RS3 root, its writer). configs/demo.yaml names
# the same folders.
DEMO_RS3_SOURCES = {
    "fmow_like": ("fmow", write_demo_fmow),
    "bigearthnet_like": ("bigearthnet", write_demo_bigearthnet_v1),
    "millionaid_like": ("image_folder", write_demo_image_folder),
}


def write_demo_rs3(root: Path) -> dict[str, dict[str, dict[str, Any]]]:
    """Every demo RS3 source under root; per source name, what its writer returns."""
    return {name: writer(root / folder) for name, (folder, writer) in DEMO_RS3_SOURCES.items()}
