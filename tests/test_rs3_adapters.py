"""RS3 format adapters (tasks/rs3/) on the real files of ../shared/data/rs3_formats and on fixtures written
here in the same formats: what each format yields, and that every bad sample gets one drop with a reason."""

from __future__ import annotations

import io
import json
import pickle
import re
import shutil
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import tifffile
from PIL import Image
from pyproj import Transformer

from rs5m import demo_rs3
from rs5m.config import Rs3SourceConfig
from storage.schemas import RS3_METADATA_FIELDS
from tasks.rs3 import READ_REASONS, Dropped, Rs3SourceError, Sample, list_source, read_sample
from tests.helpers import missing_data

RS3_SCHEMA = pa.schema(RS3_METADATA_FIELDS)
UTM_ZONE = re.compile(r"^\d{1,2}[C-HJ-NP-X]$")  # zone number + latitude band (no I or O)


@pytest.fixture(scope="module")
def rs3_formats(shared_data: Path) -> Path:
    folder = shared_data / "rs3_formats"
    if not folder.is_dir():
        missing_data(f"{folder} is absent: these tests read the real RS3 dataset files")
    return folder


def config(fmt: str, path: Path, **options) -> Rs3SourceConfig:
    return Rs3SourceConfig(name=f"test_{fmt}", format=fmt, path=str(path), **options)


def read_all(source: Rs3SourceConfig) -> dict[str, Sample | Dropped]:
    """Every listed sample's one fate, checking what holds for every format: files listed once and in
    order, a known drop reason, metadata that fits the RS3 columns and names its own file."""
    listed = list(list_source(source))
    files = [item.file for item in listed]
    assert files == sorted(files) and len(set(files)) == len(files)
    fates = {item.file: read_sample(source, item) for item in listed}
    for file, fate in fates.items():
        if isinstance(fate, Dropped):
            assert fate.reason in READ_REASONS and fate.detail
        else:
            assert fate.metadata["file"] == file
            assert set(fate.metadata) <= set(RS3_SCHEMA.names)
            pa.Table.from_pylist([fate.metadata], schema=RS3_SCHEMA)  # the values have the columns' types
    return fates


def stretch(band: np.ndarray) -> np.ndarray:
    """The documented BigEarthNet stretch, computed independently: reflectance 0-0.3 onto 0-255, half up."""
    return np.clip(np.floor(band.astype(np.float64) * 255 / 3000 + 0.5), 0, 255).astype(np.uint8)


def decoded(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as image:
        assert image.format == "PNG" and image.mode == "RGB"
        return np.asarray(image)


def utm_to_lat_lon(epsg: int, x: float, y: float) -> tuple[float, float]:
    lon, lat = Transformer.from_crs(f"EPSG:{epsg}", "EPSG:4326", always_xy=True).transform(x, y)
    return lat, lon


# ---------------------------------------------------------------- BigEarthNet on real files


def test_bigearthnet_v1_real_patches(rs3_formats: Path) -> None:
    root = rs3_formats / "bigearthnet" / "v1" / "BigEarthNet-v1.0"
    fates = read_all(config("bigearthnet", root))
    assert list(fates) == sorted(p.name for p in root.iterdir())
    assert len(fates) == 9
    for patch, sample in fates.items():
        assert isinstance(sample, Sample), sample
        document = json.loads((root / patch / f"{patch}_labels_metadata.json").read_text())
        bands = [tifffile.imread(root / patch / f"{patch}_{band}.tif") for band in ("B04", "B03", "B02")]
        rgb = decoded(sample.image)
        assert rgb.shape == (120, 120, 3)
        assert np.array_equal(rgb, np.stack([stretch(band) for band in bands], axis=-1))
        metadata = sample.metadata
        assert metadata["labels"] == document["labels"]
        assert metadata["timestamp"] == datetime.fromisoformat(document["acquisition_date"] + "+00:00")
        assert metadata["tile_source"] == document["tile_source"]
        zone = re.search(r"UTM zone (\d+)N", document["projection"])[1]
        assert UTM_ZONE.match(metadata["utm_zone"]) and metadata["utm_zone"][:-1] == zone
        corners = document["coordinates"]
        centre = ((corners["ulx"] + corners["lrx"]) / 2, (corners["uly"] + corners["lry"]) / 2)
        lat, lon = utm_to_lat_lon(32600 + int(zone), *centre)
        assert metadata["latitude"] == pytest.approx(lat, abs=1e-9)
        assert metadata["longitude"] == pytest.approx(lon, abs=1e-9)

    # One by hand: patch 4_55's centre is (605400, 5833440) in UTM 29N (central meridian 9 W): 105.4 km east
    # of the meridian at 52.6 N (about 67.7 km per degree of longitude) is 1.56 degrees east of it.
    one = fates["S2A_MSIL2A_20170617T113321_4_55"].metadata
    assert (one["latitude"], one["longitude"]) == (
        pytest.approx(52.6407, abs=1e-4),
        pytest.approx(-7.4423, abs=1e-4),
    )
    assert one["utm_zone"] == "29U"  # band U = 48-56 N; v1's "29N" is the hemisphere, not a band
    # The patch whose name lost a digit of its time: the JSON's acquisition_date is the truth.
    quirk = fates["S2A_MSIL2A_20180510T94033_19_86"].metadata
    assert quirk["timestamp"] == datetime(2018, 5, 10, 9, 40, 33, tzinfo=UTC)
    assert quirk["utm_zone"] == "35W"  # 64.9 N, Finland
    labels = fates["S2A_MSIL2A_20171221T112501_56_35"].metadata["labels"]
    assert "Land principally occupied by agriculture, with significant areas of natural vegetation" in labels


def test_bigearthnet_v2_real_patches(rs3_formats: Path) -> None:
    root = rs3_formats / "bigearthnet" / "v2"
    product = "S2A_MSIL2A_20170613T101031_N9999_R022_T33UUP"
    fates = read_all(config("bigearthnet", root))
    assert list(fates) == [f"{product}/{product}_75_43", f"{product}/{product}_89_18"]
    index = pq.read_table(root / "metadata.parquet", columns=["patch_id", "labels", "split", "country"])
    rows = {
        row["patch_id"]: row for row in index.filter(pc.starts_with(index["patch_id"], product)).to_pylist()
    }
    for file, sample in fates.items():
        assert isinstance(sample, Sample), sample
        patch = file.split("/")[1]
        folder = root / "BigEarthNet-S2" / file
        metadata = sample.metadata
        assert metadata["labels"] == rows[patch]["labels"]
        assert metadata["timestamp"] == datetime(2017, 6, 13, 10, 10, 31, tzinfo=UTC)  # from the product name
        assert metadata["tile_source"] == product
        extra = json.loads(metadata["extra_metadata"])
        assert (extra["split"], extra["country"]) == (rows[patch]["split"], "Austria")
        with tifffile.TiffFile(folder / f"{patch}_B04.tif") as tiff:
            tie = tiff.pages.first.tags["ModelTiepointTag"].value
        lat, lon = utm_to_lat_lon(32633, tie[3] + 600, tie[4] - 600)  # 120 px of 10 m from the upper left
        assert (metadata["latitude"], metadata["longitude"]) == (pytest.approx(lat), pytest.approx(lon))
        assert metadata["utm_zone"] == "33U"  # the MGRS tile T33UUP agrees
        bands = [tifffile.imread(folder / f"{patch}_{band}.tif") for band in ("B04", "B03", "B02")]
        assert np.array_equal(decoded(sample.image), np.stack([stretch(band) for band in bands], axis=-1))


# ---------------------------------------------------------------- BigEarthNet fixtures


def copy_patch(source: Path, target_root: Path, name: str) -> Path:
    """A real patch folder copied under another patch name (files renamed to match)."""
    folder = target_root / name
    folder.mkdir(parents=True)
    for file in source.iterdir():
        shutil.copyfile(file, folder / file.name.replace(source.name, name))
    return folder


def test_bigearthnet_v1_bad_patches(rs3_formats: Path, tmp_path: Path) -> None:
    real = rs3_formats / "bigearthnet" / "v1" / "BigEarthNet-v1.0" / "S2A_MSIL2A_20170617T113321_4_55"
    good = copy_patch(real, tmp_path, "P_0_0")

    def broken(name: str) -> Path:
        return copy_patch(real, tmp_path, name)

    def rewrite_json(folder: Path, drop: str | None = None, **changes) -> None:
        path = folder / f"{folder.name}_labels_metadata.json"
        document = {**json.loads(path.read_text()), **changes}
        document.pop(drop, None)
        path.write_text(json.dumps(document))

    (broken("P_1_0") / "P_1_0_labels_metadata.json").unlink()
    (broken("P_2_0") / "P_2_0_labels_metadata.json").write_text('{"labels": ["Pastures"], ')
    rewrite_json(broken("P_3_0"), projection='GEOGCS["WGS 84"]')
    rewrite_json(broken("P_4_0"), acquisition_date="17/06/2017")
    rewrite_json(broken("P_5_0"), drop="labels")
    rewrite_json(broken("P_6_0"), coordinates={"ulx": "west", "uly": 1, "lrx": 2, "lry": 3})
    (broken("P_7_0") / "P_7_0_B03.tif").unlink()
    (broken("P_8_0") / "P_8_0_B02.tif").write_bytes(b"II*\x00" + b"\xff" * 64)
    shutil.copyfile(real / f"{real.name}_B05.tif", broken("P_9_0") / "P_9_0_B04.tif")  # a 60x60 20 m band
    (tmp_path / ".cache").mkdir()  # hidden: not a patch

    fates = read_all(config("bigearthnet", tmp_path))
    assert isinstance(fates.pop(good.name), Sample)
    expected = {
        "P_1_0": ("missing_metadata", "P_1_0_labels_metadata.json"),
        "P_2_0": ("malformed_metadata", "not JSON"),
        "P_3_0": ("malformed_metadata", "projection"),
        "P_4_0": ("malformed_metadata", "acquisition_date"),
        "P_5_0": ("malformed_metadata", "labels"),
        "P_6_0": ("malformed_metadata", "coordinates.ulx"),
        "P_7_0": ("unreadable_image", "P_7_0_B03.tif: no such file"),
        "P_8_0": ("unreadable_image", "P_8_0_B02.tif"),
        "P_9_0": ("unreadable_image", "(60, 60)"),
    }
    assert {file: fate.reason for file, fate in fates.items()} == {f: r for f, (r, _) in expected.items()}
    for file, (_, detail) in expected.items():
        assert detail in fates[file].detail, fates[file].detail


def test_bigearthnet_v2_index_joins_and_exclusions(rs3_formats: Path, tmp_path: Path) -> None:
    real = rs3_formats / "bigearthnet" / "v2" / "BigEarthNet-S2"
    product = "S2A_MSIL2A_20170613T101031_N9999_R022_T33UUP"
    real_patch = real / product / f"{product}_75_43"
    bands = tmp_path / "BigEarthNet-S2"
    names = {suffix: f"{product}_{suffix}" for suffix in ("1_1", "1_2", "1_3", "1_4")}
    for name in names.values():
        copy_patch(real_patch, bands / product, name)
    no_geo = bands / product / names["1_4"] / f"{names['1_4']}_B04.tif"
    tifffile.imwrite(no_geo, tifffile.imread(no_geo))  # the same pixels without geo tags
    copy_patch(real_patch, bands / "not_a_product", "not_a_product_1_1")

    def index(rows: list[tuple[str, bool]]) -> pa.Table:
        return pa.table(
            {
                "patch_id": [patch for patch, _ in rows],
                "labels": [["Arable land", "Pastures"]] * len(rows),
                "split": ["train"] * len(rows),
                "country": ["Austria"] * len(rows),
                "contains_seasonal_snow": [False] * len(rows),
                "contains_cloud_or_shadow": [cloudy for _, cloudy in rows],
            }
        )

    pq.write_table(
        index([(names["1_1"], False), (names["1_4"], False), ("not_a_product_1_1", False)]),
        tmp_path / "metadata.parquet",
    )
    pq.write_table(
        index([(names["1_3"], True)]), tmp_path / "metadata_for_patches_with_snow_cloud_or_shadow.parquet"
    )

    fates = read_all(config("bigearthnet", tmp_path))
    reasons = {file.split("/")[1]: getattr(fate, "reason", "kept") for file, fate in fates.items()}
    assert reasons == {
        names["1_1"]: "kept",
        names["1_2"]: "missing_metadata",  # in neither parquet file
        names["1_3"]: "excluded_by_dataset",
        names["1_4"]: "malformed_metadata",  # B04 has no geo tags
        "not_a_product_1_1": "malformed_metadata",  # no time in the product name
    }
    assert "contains_cloud_or_shadow" in fates[f"{product}/{names['1_3']}"].detail
    assert "geo tags" in fates[f"{product}/{names['1_4']}"].detail


def test_bigearthnet_unlistable_sources(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "other" / "photos").mkdir(parents=True)
    (tmp_path / "v2").mkdir()
    pq.write_table(
        pa.table({"patch_id": ["x"], "labels": [["Pastures"]]}), tmp_path / "v2" / "metadata.parquet"
    )
    for folder, message in (
        ("empty", "no BigEarthNet layout"),
        ("other", "no BigEarthNet layout"),
        ("v2", "BigEarthNet-S2/"),
        ("absent", "no such folder"),
    ):
        with pytest.raises(Rs3SourceError, match=re.escape(message)) as raised:
            list(list_source(config("bigearthnet", tmp_path / folder)))
        assert "test_bigearthnet" in str(raised.value) and "\n" not in str(raised.value)
        assert str(pickle.loads(pickle.dumps(raised.value))) == str(raised.value)  # crosses processes


# ---------------------------------------------------------------- fMoW


def fmow_document(**overrides) -> dict:
    """A per-image JSON in fMoW's documented form (values may be strings, as in the real files)."""
    document = {
        "gsd": "0.5321",
        "img_width": "2050",
        "img_height": 1578,
        "country_code": "IND",
        "cloud_cover": 0,
        "timestamp": "2012-04-02T10:32:22Z",
        "scan_direction": "Forward",
        "utm": "43Q",
        "multi_resolution_dbl": 2.128,
        "pan_resolution_dbl": "0.532",
        "target_azimuth_dbl": "91.5",
        "off_nadir_angle_dbl": 17.25,
        "sun_azimuth_dbl": 140.1,
        "sun_elevation_dbl": 60.2,
        "approximate_wavelengths": [0.48, 0.545, 0.66],
        "raw_location": "POLYGON ((72.80 19.11, 72.83 19.11, 72.83 19.08, 72.80 19.08, 72.80 19.11))",
        "bounding_boxes": [
            {
                "ID": 7,
                "box": [100, 200, 300, 400],
                "category": "airport",
                "raw_location": "POLYGON ((72.8101 19.0902, 72.82 19.0902, 72.82 19.08, 72.8101 19.08, 72.8101 19.0902))",
            }
        ],
    }
    return {**document, **overrides}


def test_fmow_real_image_with_its_json(rs3_formats: Path, tmp_path: Path) -> None:
    real = rs3_formats / "fmow" / "fmow-rgb" / "train" / "airport" / "airport_0" / "airport_0_0_msrgb.jpg"
    scene = tmp_path / "train" / "airport" / "airport_0"
    scene.mkdir(parents=True)
    shutil.copyfile(real, scene / real.name)
    document = fmow_document(
        bounding_boxes={**fmow_document()["bounding_boxes"][0], "ID": "7", "box": ["100", 200, "300", 400]},
    )
    del document["cloud_cover"]
    (scene / "airport_0_0_msrgb.json").write_text(json.dumps(document))

    source = config("fmow", tmp_path / "train", views=["msrgb"])
    fates = read_all(source)
    sample = fates["airport/airport_0/airport_0_0_msrgb.jpg"]
    assert isinstance(sample, Sample), sample
    assert sample.image == real.read_bytes()  # the JPEG travels unchanged
    assert sample.metadata == {
        "file": "airport/airport_0/airport_0_0_msrgb.jpg",
        "view": "msrgb",
        "class_label": "airport",
        "timestamp": datetime(2012, 4, 2, 10, 32, 22, tzinfo=UTC),
        "latitude": 19.0902,  # first corner of the first box, lon lat order
        "longitude": 72.8101,
        "country_code": "IND",
        "utm_zone": "43Q",
        "gsd": 0.5321,
        "multi_resolution": 2.128,
        "scan_direction": "Forward",
        "target_azimuth": 91.5,
        "off_nadir_angle": 17.25,
        "img_width": 2050,
        "img_height": 1578,
        "raw_location": document["raw_location"],
        "bounding_boxes": [
            {
                "id": 7,
                "box": [100, 200, 300, 400],
                "category": "airport",
                "raw_location": document["bounding_boxes"]["raw_location"],
            }
        ],
        "extra_metadata": json.dumps(
            {
                "approximate_wavelengths": [0.48, 0.545, 0.66],
                "pan_resolution_dbl": "0.532",
                "sun_azimuth_dbl": 140.1,
                "sun_elevation_dbl": 60.2,
            },
            separators=(",", ":"),
        ),
    }
    with pytest.raises(Rs3SourceError, match=re.escape("no fMoW-rgb image (*_rgb.jpg)")):
        list(list_source(config("fmow", tmp_path / "train")))  # the default view is rgb: none here


def test_fmow_bad_and_odd_jsons(tmp_path: Path) -> None:
    scene = tmp_path / "port" / "port_3"
    scene.mkdir(parents=True)
    jsons = {
        0: None,  # no JSON
        1: "{broken",
        3: "[]",  # a gap in the view index before it
        4: json.dumps(fmow_document(gsd="half a metre")),
        5: json.dumps(fmow_document(timestamp="yesterday")),
        6: json.dumps(
            fmow_document(
                bounding_boxes=[{**fmow_document()["bounding_boxes"][0], "raw_location": "POINT (1 2)"}]
            )
        ),
        7: json.dumps(fmow_document(bounding_boxes=[{"ID": 1, "box": [1, 2, 3], "category": "port"}])),
        8: json.dumps(fmow_document(img_width=12.5)),
        9: json.dumps(fmow_document(bounding_boxes=[{"ID": 1, "box": [1, 2, 3, 4], "category": None}])),
        10: json.dumps(fmow_document(bounding_boxes={"ID": 2, "box": [1, 2, 3, 4], "category": "unknown"})),
        11: json.dumps({"unheard_of": {"a": 1}}),  # every field optional; unknown ones kept
    }
    for view, text in jsons.items():
        (scene / f"port_3_{view}_rgb.jpg").write_bytes(b"\xff\xd8 not checked here \xff\xd9")
        if text is not None:
            (scene / f"port_3_{view}_rgb.json").write_text(text)
    (scene / "port_3_0_msrgb.jpg").write_bytes(b"msrgb: not a configured view")
    (scene / ".port_3_2_rgb.jpg").write_bytes(b"hidden")
    test_split = tmp_path / "0011978"  # test/seq splits: no category level, boxes without category
    test_split.mkdir()
    (test_split / "0011978_0_rgb.jpg").write_bytes(b"jpeg")
    (test_split / "0011978_0_rgb.json").write_text(
        json.dumps(fmow_document(bounding_boxes=[{"ID": 3, "box": [1, 2, 3, 4]}]))
    )

    fates = read_all(config("fmow", tmp_path))
    dropped = {file: fate for file, fate in fates.items() if isinstance(fate, Dropped)}
    assert {file: fate.reason for file, fate in dropped.items()} == {
        "port/port_3/port_3_0_rgb.jpg": "missing_metadata",
        **{f"port/port_3/port_3_{view}_rgb.jpg": "malformed_metadata" for view in (1, 3, 4, 5, 6, 7, 8)},
    }
    details = [fate.detail for fate in dropped.values()]
    assert details == [
        "port/port_3/port_3_0_rgb.json: no such file",
        "port/port_3/port_3_1_rgb.json: not JSON: Expecting property name enclosed in double quotes: line 1 column 2 (char 1)",
        "port/port_3/port_3_3_rgb.json: not a JSON object but list",
        "port/port_3/port_3_4_rgb.json: gsd: not a number: 'half a metre'",
        "port/port_3/port_3_5_rgb.json: timestamp: not an ISO 8601 time: 'yesterday'",
        "port/port_3/port_3_6_rgb.json: bounding_boxes[0].raw_location: not a WKT POLYGON ((lon lat, ...)): 'POINT (1 2)'",
        "port/port_3/port_3_7_rgb.json: bounding_boxes[0].box: not [x, y, width, height]: [1, 2, 3]",
        "port/port_3/port_3_8_rgb.json: img_width: not a whole number: 12.5",
    ]
    assert fates["port/port_3/port_3_9_rgb.jpg"].metadata["class_label"] == "false_detection"
    single = fates["port/port_3/port_3_10_rgb.jpg"].metadata
    assert single["class_label"] == "false_detection" and single["bounding_boxes"][0]["id"] == 2
    bare = fates["port/port_3/port_3_11_rgb.jpg"].metadata
    assert bare == {
        "file": "port/port_3/port_3_11_rgb.jpg",
        "view": "rgb",
        "class_label": "port",
        "extra_metadata": '{"unheard_of":{"a":1}}',
    }
    test_sample = fates["0011978/0011978_0_rgb.jpg"].metadata
    assert "class_label" not in test_sample  # no category in the box, no category folder
    assert test_sample["bounding_boxes"][0]["category"] is None
    assert (test_sample["longitude"], test_sample["latitude"]) == (72.80, 19.11)  # the image's own polygon
    assert len(fates) == 12  # every rgb JPEG listed once, gaps and all; msrgb and the hidden file not


def test_fmow_unlistable_sources(tmp_path: Path) -> None:
    (tmp_path / "file.txt").write_text("not a folder")
    (tmp_path / "empty").mkdir()
    for path, message in (
        ("absent", "no such folder"),
        ("file.txt", "not a folder"),
        ("empty", "no fMoW-rgb image"),
    ):
        with pytest.raises(Rs3SourceError, match=re.escape(message)):
            list(list_source(config("fmow", tmp_path / path)))


# ---------------------------------------------------------------- image folder


def write_images(root: Path, files: list[str]) -> dict[str, bytes]:
    contents = {}
    for file in files:
        (root / file).parent.mkdir(parents=True, exist_ok=True)
        contents[file] = f"bytes of {file}".encode()
        (root / file).write_bytes(contents[file])
    return contents


def test_image_folder_classes_metadata_csv_and_odd_files(tmp_path: Path) -> None:
    root = tmp_path / "images"
    contents = write_images(
        root,
        [
            "agriculture_land/arable_land/dry_field/P0000001.jpg",
            "agriculture_land/arable_land/dry_field/P0000002.JPEG",
            "woodland/forest/P0000003.Png",
            "woodland/forest/P0000004.tiff",
            "woodland/forest/P0000005.webp",
            "woodland/forest/P0000006.TIF",
            "woodland/forest/P0000007.jpg",
            "woodland/forest/P0000008.jpg",
            "P0000009.jpg",
            "P0000010.jpg",
            "P0000011.jpg",
        ],
    )
    write_images(
        root, [".hidden.jpg", ".thumbnails/P0000001.jpg", "woodland/notes.txt", "woodland/forest/P1.gif"]
    )
    (root / "broken.jpg").symlink_to(root / "nowhere.jpg")  # listed, then unreadable
    (root / "woodland" / "forest" / "loop").symlink_to(root / "woodland")  # not walked forever
    elsewhere = tmp_path / "elsewhere"
    write_images(elsewhere, ["P0000012.jpg"])
    (root / "linked").symlink_to(elsewhere)  # a folder assembled from links is walked
    contents["linked/P0000012.jpg"] = (elsewhere / "P0000012.jpg").read_bytes()
    (root / "metadata.csv").write_text(
        "file,class,lat,lon,time,photographer\n"
        "agriculture_land/arable_land/dry_field/P0000001.jpg,,36.0652,-119.0171,2019-07-04T18:30:00,Ana\n"
        "./woodland/forest/P0000003.Png,shrubwood,,,2018-02-11 09:15:00+02:00,\n"
        "woodland/forest/P0000007.jpg,,95.0,10.0,,\n"
        "woodland/forest/P0000008.jpg,,45.0,,,\n"
        'P0000009.jpg,beach,-8.7184,115.1686,,"Smith, J."\n'
        "P0000010.jpg,,,,last tuesday,\n"
        "P0000099.jpg,ghost,1,1,,\n"  # no such image: not a sample
    )
    fates = read_all(config("image_folder", root))
    assert set(fates) == {*contents, "broken.jpg"}
    assert fates.pop("broken.jpg").reason == "unreadable_image"
    dropped = {file: fate.detail for file, fate in fates.items() if isinstance(fate, Dropped)}
    assert all(fates[file].reason == "malformed_metadata" for file in dropped)
    assert dropped == {
        "woodland/forest/P0000007.jpg": "woodland/forest/P0000007.jpg: metadata row: lat: latitude outside [-90, 90]: '95.0'",
        "woodland/forest/P0000008.jpg": "woodland/forest/P0000008.jpg: metadata row: lat: given without its partner (lat and lon go together)",
        "P0000010.jpg": "P0000010.jpg: metadata row: time: not an ISO 8601 time: 'last tuesday'",
    }
    samples = {file: fate for file, fate in fates.items() if isinstance(fate, Sample)}
    assert all(sample.image == contents[file] for file, sample in samples.items())  # bytes unchanged
    metadata = {file: sample.metadata for file, sample in samples.items()}
    assert metadata["agriculture_land/arable_land/dry_field/P0000001.jpg"] == {
        "file": "agriculture_land/arable_land/dry_field/P0000001.jpg",
        "class_label": "dry_field",
        "latitude": 36.0652,
        "longitude": -119.0171,
        "timestamp": datetime(2019, 7, 4, 18, 30, tzinfo=UTC),  # naive: UTC
        "extra_metadata": '{"photographer":"Ana"}',
    }
    assert metadata["woodland/forest/P0000003.Png"] == {
        "file": "woodland/forest/P0000003.Png",
        "class_label": "shrubwood",  # the row's class overrides the folder
        "timestamp": datetime(2018, 2, 11, 7, 15, tzinfo=UTC),
    }
    assert metadata["P0000009.jpg"]["class_label"] == "beach"
    assert metadata["P0000009.jpg"]["extra_metadata"] == '{"photographer":"Smith, J."}'
    assert metadata["P0000011.jpg"] == {"file": "P0000011.jpg"}  # flat, no row: nulls
    assert metadata["woodland/forest/P0000006.TIF"] == {
        "file": "woodland/forest/P0000006.TIF",
        "class_label": "forest",
    }

    unlabelled = read_all(config("image_folder", root, class_from_folder=False))
    assert "class_label" not in unlabelled["woodland/forest/P0000004.tiff"].metadata
    assert unlabelled["P0000009.jpg"].metadata["class_label"] == "beach"


def test_image_folder_metadata_jsonl_and_configured_file(tmp_path: Path) -> None:
    root = tmp_path / "images"
    write_images(root, ["a/1.jpg", "a/2.jpg", "b/3.jpg"])
    rows = [
        {"file": "a/1.jpg", "lat": 10.5, "lon": "20.25", "time": "2020-01-02T03:04:05Z", "tags": ["x", "y"]},
        {"file": "b/3.jpg", "class": None, "lat": None, "lon": None, "extra": 3},
    ]
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n\n")
    fates = read_all(config("image_folder", root))
    assert fates["a/1.jpg"].metadata == {
        "file": "a/1.jpg",
        "class_label": "a",
        "latitude": 10.5,
        "longitude": 20.25,
        "timestamp": datetime(2020, 1, 2, 3, 4, 5, tzinfo=UTC),
        "extra_metadata": '{"tags":["x","y"]}',
    }
    assert fates["b/3.jpg"].metadata == {
        "file": "b/3.jpg",
        "class_label": "b",
        "extra_metadata": '{"extra":3}',
    }

    elsewhere = tmp_path / "labels.csv"
    elsewhere.write_text("file,class\na/2.jpg,orchard\n")
    configured = read_all(config("image_folder", root, metadata=str(elsewhere)))
    assert configured["a/2.jpg"].metadata["class_label"] == "orchard"
    assert "latitude" not in configured["a/1.jpg"].metadata  # metadata.jsonl is not read when one is named


def test_listing_order_is_string_order_while_streaming_folders(tmp_path: Path) -> None:
    files = ["a/1.jpg", "a-1.jpg", "a.jpg", "a0.jpg", "a/b/2.jpg", "a/b-2.jpg", "B.jpg"]
    write_images(tmp_path, files)
    assert [item.file for item in list_source(config("image_folder", tmp_path))] == sorted(files)


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"metadata.csv": "name,class\n1.jpg,x\n"}, "no `file` column"),
        ({"metadata.csv": "file,class\n1.jpg,x,extra\n"}, "line 2: 3 fields, the header has 2"),
        ({"metadata.csv": "file,class\n1.jpg,x\n./1.jpg,y\n"}, "lines 2 and 3 both describe '1.jpg'"),
        ({"metadata.jsonl": '{"file": "1.jpg"}\n{"file": \n'}, "line 2: not JSON"),
        ({"metadata.jsonl": '["1.jpg"]\n'}, "line 1: not a JSON object"),
        ({"metadata.jsonl": '{"class": "x"}\n'}, "line 1: no `file`"),
        ({"metadata.csv": "file\n", "metadata.jsonl": ""}, "both metadata.csv and metadata.jsonl"),
        ({}, "no image"),
    ],
)
def test_image_folder_unlistable_metadata(tmp_path: Path, files: dict[str, str], message: str) -> None:
    if files:
        write_images(tmp_path, ["1.jpg"])
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(Rs3SourceError, match=re.escape(message)) as raised:
        list(list_source(config("image_folder", tmp_path)))
    assert str(raised.value).startswith("rs3 source 'test_image_folder' (image_folder): ")


def test_image_folder_configured_metadata_missing(tmp_path: Path) -> None:
    write_images(tmp_path, ["1.jpg"])
    with pytest.raises(Rs3SourceError, match="metadata file not found"):
        list(list_source(config("image_folder", tmp_path, metadata=str(tmp_path / "labels.csv"))))


# ---------------------------------------------------------------- demo writers


@pytest.mark.parametrize(
    ("fmt", "writer", "options"),
    [
        ("fmow", demo_rs3.write_demo_fmow, {"views": ["rgb", "msrgb"]}),
        ("bigearthnet", demo_rs3.write_demo_bigearthnet_v1, {}),
        ("image_folder", demo_rs3.write_demo_image_folder, {}),
    ],
)
def test_demo_writers_read_back_exactly(tmp_path: Path, fmt: str, writer, options: dict) -> None:
    expected = writer(tmp_path / "a")
    fates = read_all(config(fmt, tmp_path / "a", **options))
    assert set(fates) == set(expected)
    drops = {
        file: entry[demo_rs3.DROP_REASON] for file, entry in expected.items() if demo_rs3.DROP_REASON in entry
    }
    assert drops, "each demo format has a broken sample"
    for file, fate in fates.items():
        if file in drops:
            assert isinstance(fate, Dropped) and fate.reason == drops[file], fate
        else:
            assert isinstance(fate, Sample), fate
            assert fate.metadata == expected[file]

    assert writer(tmp_path / "b") == expected
    written = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert written == sorted(
        p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file()
    )
    assert all((tmp_path / "a" / p).read_bytes() == (tmp_path / "b" / p).read_bytes() for p in written)


def test_demo_datasets_cover_what_meta_captions_need(tmp_path: Path) -> None:
    fmow = [m for m in demo_rs3.write_demo_fmow(tmp_path / "fmow").values() if "view" in m]
    assert {m["latitude"] > 0 for m in fmow} == {True, False}
    assert len({m["timestamp"].month for m in fmow}) >= 6
    assert len({m["class_label"] for m in fmow}) >= 6
    assert len({tuple(m["bounding_boxes"][0]["box"][:2]) for m in fmow}) >= 6  # boxes in different cells
    patches = [m for m in demo_rs3.write_demo_bigearthnet_v1(tmp_path / "ben").values() if "labels" in m]
    assert len(patches) == 6
    assert {m["latitude"] > 0 for m in patches} == {True, False}
    assert len({m["utm_zone"] for m in patches}) >= 5
    assert all(UTM_ZONE.match(m["utm_zone"]) for m in patches)
