"""BigEarthNet-S2, v1.0 (the version RS5M used) and v2 (reBEN): 120x120 Sentinel-2 patches as an RGB PNG plus
their multi-labels, acquisition time and place.

The layout tells the versions apart: a `metadata.parquet` in the source folder is v2, patch folders
holding `<patch>_labels_metadata.json` (or `<patch>_B04.tif`) are v1.

- v1: `<patch>/<patch>_B??.tif` and `<patch>_labels_metadata.json` with `labels`, `coordinates` (ulx, uly,
  lrx, lry in UTM metres), `projection` (WKT naming "UTM zone 29N": zone and hemisphere), `tile_source` and
  `acquisition_date` ("YYYY-MM-DD HH:MM:SS", UTC as every Sentinel-2 time). All five are required: the
  dataset always writes them, so a missing one means a damaged file. The patch name is never parsed for a
  time: some v1 names lost a digit of it (`..._20180510T94033_19_86`); acquisition_date is the truth.
- v2: `metadata.parquet` (patch_id, labels, split, country, ...) indexes the patches; the bands are
  `BigEarthNet-S2/<S2 product>/<patch_id>/<patch_id>_B??.tif`. The listing walks those folders (the samples
  are the patches on disk) and joins each to its row; a patch found only in
  `metadata_for_patches_with_snow_cloud_or_shadow.parquet` is dropped as `excluded_by_dataset`, one in
  neither as `missing_metadata`. The time comes from the product name (`S2A_MSIL2A_20170613T101031_...`),
  the place from the B04 GeoTIFF's own geo tags (tie point, pixel scale, ProjectedCSTypeGeoKey 326zz/327zz).

latitude/longitude are the patch centre, converted from UTM with pyproj; utm_zone is the zone number with
the latitude band computed from that latitude ("29U"), not v1's hemisphere letter. RS5M captioned v1 with
"29N"; the meta-caption stage can still write that (meta.utm_zone: rs5m) from latitude's sign.

The RGB composite is B04, B03, B02 with one FIXED linear stretch for every patch:
`uint8 = clip(floor(value * 255 / 3000 + 1/2), 0, 255)` (round half up, in integer arithmetic), i.e. L2A
surface reflectance 0-0.3 (digital numbers 0-3000; BigEarthNet's L2A values are reflectance x 10,000, with
no offset in v1 or v2) onto 0-255. Land in the visible bands mostly lies in 0-0.3 (vegetation 0.02-0.1,
soil and built-up 0.1-0.3; the real patches' 99th percentiles are 400-2,300, up to 5,200 on snow), so the
map keeps most pixels unsaturated and only clouds, snow and bright roofs clip. A per-patch stretch would
make a dark forest and a bright field look alike; a fixed one keeps colours comparable across patches, which
is what a caption model and a reader of the images need. The PNG is lossless, so the stretch is the only
change.
"""

from __future__ import annotations

import functools
import io
import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import tifffile
from PIL import Image
from pyproj import Transformer

from rs5m.config import Rs3SourceConfig
from tasks.rs3 import (
    Dropped,
    FieldError,
    Listed,
    Rs3SourceError,
    Sample,
    hidden,
    json_text,
    latitude_band,
    number,
    read_json_object,
    source_root,
    text,
)

PATCH_SIDE = 120  # pixels of the 10 m bands (B02, B03, B04, B08): every patch is 1,200 m square
RGB_BANDS = ("B04", "B03", "B02")
REFLECTANCE_FULL_SCALE = 3000  # digital number shown as 255: reflectance 0.3 (see the module docstring)
V1_JSON_SUFFIX = "_labels_metadata.json"
V1_FIELDS = ("labels", "coordinates", "projection", "tile_source", "acquisition_date")
V2_INDEX = "metadata.parquet"
V2_EXCLUDED = "metadata_for_patches_with_snow_cloud_or_shadow.parquet"
V2_BANDS_FOLDER = "BigEarthNet-S2"
V2_COLUMNS = ("patch_id", "labels", "split", "country", "s2v1_name")  # not s1_name: the SAR twin
V2_FLAGS = ("contains_seasonal_snow", "contains_cloud_or_shadow")
_UTM_PROJECTION = re.compile(r"UTM zone (\d{1,2})([NS])\b")
_PRODUCT_TIME = re.compile(r"^S2[A-D]_MSIL2A_(\d{8}T\d{6})_")


def list_source(source: Rs3SourceConfig) -> Iterator[Listed]:
    """v1: the patch folders (Listed.file = folder name). v2: the patch folders under BigEarthNet-S2
    (Listed.file = "<product>/<patch>"), each with its metadata row as JSON."""
    root = source_root(source)
    if (root / V2_INDEX).is_file():
        return _list_v2(source, root)
    patches = sorted(entry.name for entry in root.iterdir() if entry.is_dir() and not hidden(entry.name))
    if not any(_looks_like_v1_patch(root / patch) for patch in patches):
        raise Rs3SourceError.of(
            source,
            f"no BigEarthNet layout: neither {V2_INDEX} (v2) nor patch folders holding "
            f"<patch>/<patch>{V1_JSON_SUFFIX} (v1)",
        )
    return (Listed(patch, None) for patch in patches)


def read_sample(source: Rs3SourceConfig, listed: Listed) -> Sample | Dropped:
    root = source_root(source)
    if (root / V2_INDEX).is_file():
        return _read_v2(root / V2_BANDS_FOLDER / listed.file, listed)
    return _read_v1(root / listed.file, listed.file)


def rgb_composite(red: np.ndarray, green: np.ndarray, blue: np.ndarray) -> bytes:
    """The PNG of three uint16 bands under the fixed stretch (module docstring)."""
    bands = np.stack([red, green, blue], axis=-1).astype(np.int64)
    scaled = (bands * 255 + REFLECTANCE_FULL_SCALE // 2) // REFLECTANCE_FULL_SCALE
    buffer = io.BytesIO()
    Image.fromarray(np.clip(scaled, 0, 255).astype(np.uint8), "RGB").save(buffer, format="PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------- v1


def _looks_like_v1_patch(folder: Path) -> bool:
    names = (f"{folder.name}{V1_JSON_SUFFIX}", f"{folder.name}_B04.tif")
    return any((folder / name).is_file() for name in names)


def _read_v1(folder: Path, patch: str) -> Sample | Dropped:
    shown = f"{patch}/{patch}{V1_JSON_SUFFIX}"
    document = read_json_object(folder / f"{patch}{V1_JSON_SUFFIX}", shown)
    if isinstance(document, Dropped):
        return document
    try:
        metadata = _v1_metadata(patch, document)
    except FieldError as error:
        return Dropped("malformed_metadata", f"{shown}: {error}")
    bands = []
    for band in RGB_BANDS:
        read = _read_band(folder / f"{patch}_{band}.tif", f"{patch}/{patch}_{band}.tif")
        if isinstance(read, Dropped):
            return read
        bands.append(read.pixels)
    return Sample(rgb_composite(*bands), metadata)


def _v1_metadata(patch: str, document: dict[str, Any]) -> dict[str, Any]:
    for field in V1_FIELDS:
        if field not in document:
            raise FieldError(field, "missing (BigEarthNet v1 always writes it)")
    labels = _labels(document["labels"])
    corners = document["coordinates"]
    if not isinstance(corners, dict):
        raise FieldError("coordinates", f"not an object: {corners!r}")
    ulx, uly, lrx, lry = (
        number(corners.get(key), f"coordinates.{key}") for key in ("ulx", "uly", "lrx", "lry")
    )
    projection = text(document["projection"], "projection")
    match = _UTM_PROJECTION.search(projection)
    if match is None or not 1 <= int(match[1]) <= 60:
        raise FieldError("projection", f"names no 'UTM zone <1-60><N|S>': {projection[:60]!r}")
    zone, hemisphere = int(match[1]), match[2]
    acquired = text(document["acquisition_date"], "acquisition_date")
    try:
        taken = datetime.strptime(acquired, "%Y-%m-%d %H:%M:%S")
    except ValueError:
        raise FieldError("acquisition_date", f"not 'YYYY-MM-DD HH:MM:SS': {acquired!r}") from None
    epsg = (32600 if hemisphere == "N" else 32700) + zone
    return {
        "file": patch,
        "labels": labels,
        "timestamp": taken.replace(tzinfo=UTC),
        **_place(epsg, (ulx + lrx) / 2, (uly + lry) / 2, "coordinates"),
        "tile_source": text(document["tile_source"], "tile_source"),
    }


# ---------------------------------------------------------------- v2


def _list_v2(source: Rs3SourceConfig, root: Path) -> Iterator[Listed]:
    """Walk BigEarthNet-S2/<product>/<patch> in order and join each patch to its metadata row; the two
    parquet files (about 550,000 rows) are indexed in memory, reading only the columns used."""
    bands = root / V2_BANDS_FOLDER
    if not bands.is_dir():
        raise Rs3SourceError.of(
            source, f"{V2_INDEX} is here but {V2_BANDS_FOLDER}/ (the patch folders) is not"
        )
    tables = [_read_index(source, root / name) for name in (V2_INDEX, V2_EXCLUDED) if (root / name).is_file()]
    table = pa.concat_tables(tables, promote_options="permissive")
    rows = {patch_id: index for index, patch_id in enumerate(table.column("patch_id").to_pylist())}
    for product in sorted(p.name for p in bands.iterdir() if p.is_dir() and not hidden(p.name)):
        for patch in sorted(p.name for p in (bands / product).iterdir() if p.is_dir() and not hidden(p.name)):
            index = rows.get(patch)
            row = None if index is None else table.slice(index, 1).to_pylist()[0]
            yield Listed(f"{product}/{patch}", None if row is None else json.dumps(row, ensure_ascii=False))


def _read_index(source: Rs3SourceConfig, path: Path) -> pa.Table:
    try:
        schema = pq.read_schema(path)
        missing = {"patch_id", "labels"} - set(schema.names)
        if missing:
            raise Rs3SourceError.of(source, f"no column {', '.join(sorted(missing))}", path)
        wanted = [name for name in (*V2_COLUMNS, *V2_FLAGS) if name in schema.names]
        return pq.read_table(path, columns=wanted)
    except (OSError, pa.ArrowException) as error:
        raise Rs3SourceError.of(source, f"not a readable Parquet file: {error}", path) from error


def _read_v2(folder: Path, listed: Listed) -> Sample | Dropped:
    product, patch = listed.file.split("/")
    if listed.metadata is None:
        return Dropped("missing_metadata", f"{listed.file}: patch in neither {V2_INDEX} nor {V2_EXCLUDED}")
    row = json.loads(listed.metadata)
    flagged = [flag for flag in V2_FLAGS if row.get(flag)]
    if flagged:
        return Dropped("excluded_by_dataset", f"{listed.file}: {V2_EXCLUDED}: {', '.join(flagged)}")
    time = _PRODUCT_TIME.match(product)
    if time is None:
        return Dropped(
            "malformed_metadata", f"{listed.file}: product name has no S2?_MSIL2A_<YYYYMMDDTHHMMSS>_"
        )
    try:
        labels = _labels(row["labels"])
    except FieldError as error:
        return Dropped("malformed_metadata", f"{listed.file}: {V2_INDEX}: {error}")
    bands = []
    for band in RGB_BANDS:
        read = _read_band(
            folder / f"{patch}_{band}.tif", f"{listed.file}/{patch}_{band}.tif", geo=band == "B04"
        )
        if isinstance(read, Dropped):
            return read
        bands.append(read)
    try:
        place = _geotiff_place(bands[0].geo)
    except FieldError as error:
        return Dropped("malformed_metadata", f"{listed.file}/{patch}_B04.tif: {error}")
    extra = {key: value for key, value in row.items() if key not in ("patch_id", "labels", *V2_FLAGS)}
    metadata = {
        "file": listed.file,
        "labels": labels,
        "timestamp": datetime.strptime(time[1], "%Y%m%dT%H%M%S").replace(tzinfo=UTC),
        **place,
        "tile_source": product,
    }
    if extra:
        metadata["extra_metadata"] = json_text(extra)
    return Sample(rgb_composite(*(band.pixels for band in bands)), metadata)


def _geotiff_place(geo: dict[str, Any]) -> dict[str, Any]:
    """Patch centre from the tie point (pixel i, j at x, y) and pixel scale in the CRS of the EPSG code."""
    try:
        epsg = int(geo["ProjectedCSTypeGeoKey"])
        i, j, _, x, y, _ = (float(v) for v in geo["ModelTiepoint"][:6])
        scale_x, scale_y = (float(v) for v in geo["ModelPixelScale"][:2])
    except (KeyError, TypeError, ValueError) as error:
        raise FieldError(
            "geo tags", f"no usable ModelTiepoint/ModelPixelScale/ProjectedCSTypeGeoKey: {error}"
        ) from None
    if not (32601 <= epsg <= 32660 or 32701 <= epsg <= 32760):
        raise FieldError("ProjectedCSTypeGeoKey", f"{epsg} is not a WGS 84 / UTM zone (EPSG:326zz or 327zz)")
    centre = PATCH_SIDE / 2
    return _place(epsg, x + (centre - i) * scale_x, y - (centre - j) * scale_y, "geo tags")


# ---------------------------------------------------------------- shared


def _labels(value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(label, str) and label for label in value):
        raise FieldError("labels", f"not a list of class names: {value!r}")
    return value


def _place(epsg: int, x: float, y: float, field: str) -> dict[str, Any]:
    """latitude, longitude and utm_zone ("29U": zone number + latitude band) of a UTM point."""
    lon, lat = _to_wgs84(epsg).transform(x, y)
    if not (np.isfinite(lat) and np.isfinite(lon)):
        raise FieldError(field, f"UTM point ({x}, {y}) in EPSG:{epsg} has no latitude/longitude")
    return {"latitude": lat, "longitude": lon, "utm_zone": f"{epsg % 100}{latitude_band(lat, field)}"}


@functools.cache
def _to_wgs84(epsg: int) -> Transformer:
    """One transformer per UTM zone (building one takes milliseconds; pyproj's are thread-safe)."""
    return Transformer.from_crs(f"EPSG:{epsg}", "EPSG:4326", always_xy=True)


class _Band(NamedTuple):
    pixels: np.ndarray
    geo: dict[str, Any]  # tifffile's geotiff_metadata, when asked for


def _read_band(path: Path, shown: str, geo: bool = False) -> _Band | Dropped:
    """A 120x120 uint16 single-band TIFF's pixels (and GeoTIFF tags if geo); the shape and type are checked
    from the header before any pixel is decoded."""
    try:
        with tifffile.TiffFile(path) as tiff:
            page = tiff.pages.first
            if page.shape != (PATCH_SIDE, PATCH_SIDE) or page.dtype != np.uint16:
                return Dropped(
                    "unreadable_image",
                    f"{shown}: {page.dtype} {page.shape}, not uint16 ({PATCH_SIDE}, {PATCH_SIDE})",
                )
            return _Band(page.asarray(), (tiff.geotiff_metadata or {}) if geo else {})
    except FileNotFoundError:
        return Dropped("unreadable_image", f"{shown}: no such file")
    except Exception as error:  # a corrupt TIFF can fail anywhere in the decoder, with any exception type
        return Dropped("unreadable_image", f"{shown}: not a readable TIFF: {type(error).__name__}: {error}")
