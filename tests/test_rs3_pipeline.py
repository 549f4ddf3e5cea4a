"""`rs5m run CONFIG` with only `rs3:` sources runs RS3 and releases it alone, on the real files of
../shared/data/rs3_formats (BigEarthNet v1 and v2 patches, the real fMoW image with a JSON written beside a
copy of it): every listed image has one fate, the release holds only `subset: rs3` rows with their
metadata and meta captions, and `--pipeline pub11` on such a config is refused in one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import yaml

from tests.helpers import missing_data, rs5m

FMOW_JSON = {
    "gsd": "0.5",
    "img_width": 2050,
    "img_height": 1578,
    "country_code": "USA",
    "cloud_cover": 3,
    "timestamp": "2016-07-04T18:12:44Z",
    "scan_direction": "Forward",
    "utm": "15S",
    "target_azimuth_dbl": 131.2,
    "off_nadir_angle_dbl": 12.6,
    "raw_location": "POLYGON ((-93.30 37.25, -93.29 37.25, -93.29 37.24, -93.30 37.24, -93.30 37.25))",
    "bounding_boxes": {
        "ID": 1,
        "box": [1400, 200, 400, 300],
        "category": "airport",
        "raw_location": "POLYGON ((-93.298 37.248, -93.296 37.248, -93.296 37.246, -93.298 37.246, -93.298 37.248))",
    },
}


def test_an_rs3_only_config_runs_rs3_and_releases_it_alone(
    shared_data: Path, tmp_path: Path, prefect_server
) -> None:
    formats = shared_data / "rs3_formats"
    image = formats / "fmow" / "fmow-rgb" / "train" / "airport" / "airport_0" / "airport_0_0_msrgb.jpg"
    if not image.is_file() or not (formats / "bigearthnet" / "v2" / "metadata.parquet").is_file():
        missing_data(f"the real RS3 files are absent under {formats}")
    fmow = tmp_path / "fmow" / "airport" / "airport_0"
    fmow.mkdir(parents=True)
    shutil.copy(image, fmow / image.name)
    (fmow / "airport_0_0_msrgb.json").write_text(json.dumps(FMOW_JSON))
    shutil.copy(image, fmow / "airport_0_1_msrgb.jpg")  # a second view whose JSON is missing
    config = tmp_path / "rs3.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "workdir": "work",
                "rs3": {
                    "shard_rows": 4,
                    "caption": {"num_candidates": 4, "max_length": 16},
                    "sources": [
                        {
                            "name": "ben_v1",
                            "format": "bigearthnet",
                            "path": str(formats / "bigearthnet" / "v1" / "BigEarthNet-v1.0"),
                        },
                        {
                            "name": "ben_v2",
                            "format": "bigearthnet",
                            "path": str(formats / "bigearthnet" / "v2"),
                        },
                        {
                            "name": "fmow",
                            "format": "fmow",
                            "path": str(tmp_path / "fmow"),
                            "views": ["msrgb"],
                        },
                    ],
                },
                "clip": {"model": "rs5m-tiny-vit"},
                "dedup": {"embedding_min_similarity": None},
                "decontaminate": {"embedding_min_similarity": None},
            }
        )
    )
    refused = rs5m("run", str(config), "--pipeline", "pub11", env=prefect_server.env())
    assert refused.returncode == 2 and "the config has no pub11 sources" in refused.stderr

    result = rs5m("run", str(config), env=prefect_server.env())
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(rs5m("report", str(tmp_path / "work"), "--json", env=prefect_server.env()).stdout)
    assert [s["stage"] for s in report["stages"]] == [
        "rs3_ingest",
        "rs3_read",
        "rs3_validate",
        "rs3_meta",
        "rs3_caption",
        "rs3_embed",
        "rs3_score",
        "dedup",
        "decontaminate",
        "shard",
    ]
    listed = {name: counts["in"] for name, counts in report["stages"][0]["sources"].items()}
    assert listed == {"ben_v1": 9, "ben_v2": 2, "fmow": 2}
    read = report["stages"][1]["sources"]
    assert read["fmow"]["dropped"] == {"missing_metadata": 1}
    assert sum(report["remain"].values()) > 0 and report["incomplete"] == []

    released = pq.read_table(tmp_path / "work" / "dataset" / "train").to_pylist()
    released += (
        pq.read_table(tmp_path / "work" / "dataset" / "val").to_pylist()
        if (tmp_path / "work" / "dataset" / "val").exists()
        else []
    )
    assert {row["subset"] for row in released} == {"rs3"}
    by_file = {row["file"]: row for row in released}
    airport = by_file["airport/airport_0/airport_0_0_msrgb.jpg"]
    assert (
        airport["class_label"] == "airport"
        and airport["utm_zone"] == "15S"
        and airport["country"] == "United States"
    )
    assert (
        airport["caption"].startswith(airport["meta_caption"] + " ") and "airport" in airport["meta_caption"]
    )
    assert airport["caption"].endswith(" " + airport[airport["caption_choice"]])
    ben = [row for row in released if row["source"] == "ben_v1"]
    assert ben and all(row["labels"] and row["image_format"] == "PNG" for row in ben)
    assert all(f"utm zone {row['utm_zone']}" in row["caption"] for row in ben)
    # one fate per listed image, across the stages
    con = duckdb.connect(str(tmp_path / "work" / "catalog.duckdb"), read_only=True)
    final = con.sql(
        "SELECT sample_id, count(*) FILTER (WHERE fate = 'dropped') FROM ledger GROUP BY sample_id"
    ).fetchall()
    assert len(final) == 13 and all(drops <= 1 for _, drops in final)
