"""The released dataset (storage/dataset.py) and the shard stage that publishes it (tasks/shard.py)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from rs5m.config import PipelineConfig, ShardConfig, SourceConfig
from storage.atomic import write_parquet
from storage.dataset import (
    DATASET_SCHEMA,
    DatasetPlan,
    current_release,
    dataset_dir,
    read_dataset_manifest,
    write_dataset,
)
from storage.layout import Layout
from storage.markers import Manifest, read_marker, sha256_file, write_manifest
from storage.schemas import DECONTAMINATE_SCHEMA, VALIDATE_SCHEMA
from tasks.shard import SHARD, MissingImageError, keep_all, publish_dataset, split_of

SHARDS = ("alpha-00000", "alpha-00001", "beta-00000")


def _image(rng: np.random.Generator, fmt: str) -> tuple[bytes, int, int]:
    width, height = (int(v) for v in rng.integers(16, 64, size=2))
    pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue(), width, height


def _fake_workdir(root: Path, per_shard: int = 40, seed: int = 0) -> tuple[Layout, dict[str, pa.Table]]:
    """validate/data shards with real image bytes, and decontaminate-like tables keeping about 3 in 4."""
    rng = np.random.default_rng(seed)
    layout = Layout(root)
    kept_tables = {}
    for shard in SHARDS:
        rows = []
        for i in range(per_shard):
            fmt = "PNG" if i % 10 == 3 else "JPEG"
            data, width, height = _image(rng, fmt)
            sample_id = hashlib.sha256(f"{shard}/{i}".encode()).hexdigest()[:24]
            rows.append(
                {
                    "sample_id": sample_id,
                    "source": shard.split("-")[0],
                    "url": f"http://127.0.0.1/{shard}/{i}.{fmt.lower()}",
                    "caption": f"satellite image {i} of {shard}" if i % 7 else None,
                    "extra": json.dumps({"row": i, "licence": "cc-by"}),
                    "matched_keyword": "satellite",
                    "image": data,
                    "sha256": hashlib.sha256(data).hexdigest(),
                    "width": width,
                    "height": height,
                    "image_format": fmt,
                }
            )
        write_parquet(layout.data("validate", shard), pa.Table.from_pylist(rows, VALIDATE_SCHEMA))
        kept = [
            {
                **{k: v for k, v in row.items() if k != "image"},
                "phash": bytes(rng.integers(0, 256, size=32, dtype=np.uint8)),
                "clip_score": float(rng.random()),
                "rs_score": float(rng.random()),
                "group_id": row["sample_id"] if i % 5 == 0 else None,
            }
            for i, row in enumerate(rows)
            if i % 4 != 1  # dropped by some earlier stage: its bytes stay in validate but must not ship
        ]
        rng.shuffle(kept)  # upstream order is not the dataset's order
        kept_tables[shard] = pa.Table.from_pylist(kept, DECONTAMINATE_SCHEMA)
    return layout, kept_tables


def _config(root: Path, **shard: object) -> PipelineConfig:
    return PipelineConfig(
        workdir=root,
        sources=[SourceConfig(name="alpha", path="unused.parquet", format="parquet")],
        shard=ShardConfig(**shard),
    )


def _publish(layout: Layout, tables: dict[str, pa.Table], **shard: object) -> dict:
    return publish_dataset(layout, _config(layout.root, **shard), keep_all(tables, {})).extra


def _originals(layout: Layout) -> dict[str, bytes]:
    table = pa.concat_tables(pq.read_table(layout.data("validate", s)) for s in SHARDS)
    return dict(zip(table.column("sample_id").to_pylist(), table.column("image").to_pylist(), strict=True))


def _parts(layout: Layout, split: str) -> list[pa.Table]:
    manifest = read_dataset_manifest(layout)
    return [
        pq.read_table(layout.root / f.path)
        for f in manifest.files
        if f.kind == "parquet" and f.split == split
    ]


def _folder_files(layout: Layout) -> set[str]:
    """The current release's files, relative to its folder (as the manifest names them)."""
    root = layout.release.resolve()
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def test_rows_budget_closes_parts_and_keeps_every_kept_sample_once(tmp_path: Path) -> None:
    layout, tables = _fake_workdir(tmp_path)
    published = _publish(layout, tables, rows_per_shard=7, val_fraction=0.2)
    expected_ids = sorted(i for t in tables.values() for i in t.column("sample_id").to_pylist())
    seen = []
    for split in ("train", "val"):
        parts = _parts(layout, split)
        sizes = [p.num_rows for p in parts]
        assert sizes[:-1] == [7] * (len(sizes) - 1) and 1 <= sizes[-1] <= 7
        assert published["rows"][split] == sum(sizes)
        for part in parts:
            assert part.schema == DATASET_SCHEMA
            assert set(part.column("split").to_pylist()) == {split}
            seen += part.column("sample_id").to_pylist()
    assert sorted(seen) == expected_ids


def test_bytes_budget_is_never_passed_and_every_part_is_filled_up_to_it(tmp_path: Path) -> None:
    layout, tables = _fake_workdir(tmp_path)
    budget = 20_000
    _publish(layout, tables, rows_per_shard=1000, bytes_per_shard=budget, val_fraction=0.0)
    parts = _parts(layout, "train")
    assert len(parts) >= 3
    lengths = [[len(b) for b in part.column("image").to_pylist()] for part in parts]
    for index, part_lengths in enumerate(lengths):
        assert sum(part_lengths) <= budget
        if index < len(parts) - 1:  # the next part's first image did not fit
            assert sum(part_lengths) + lengths[index + 1][0] > budget
    assert read_dataset_manifest(layout).totals["rows_per_split"] == {"train": 90, "val": 0}


def _synthetic_rows(image_sizes: list[int]) -> pa.Table:
    """DATASET_SCHEMA rows whose images are opaque bytes of given sizes (the writer never decodes)."""
    n = len(image_sizes)
    ids = [f"{i:04d}" for i in range(n)]
    return pa.table(
        {
            **{f.name: pa.nulls(n, f.type) for f in DATASET_SCHEMA},
            "image": pa.array(
                [bytes([i % 256]) * size for i, size in enumerate(image_sizes)], pa.large_binary()
            ),
            "source": pa.array(["s"] * n),
            "sample_id": pa.array(ids),
            "url": pa.array([f"http://127.0.0.1/{i}" for i in ids]),
            "split": pa.array(["train"] * n),
            "subset": pa.array(["pub11"] * n),
        }
    )


def test_bytes_budget_is_inclusive_and_an_oversized_image_stands_alone(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    sizes = [1000] * 6 + [5000] + [1000] * 3
    batches = [_synthetic_rows(sizes).slice(0, 4), _synthetic_rows(sizes).slice(4)]
    manifest = write_dataset(layout, DatasetPlan(batches=batches, rows_per_shard=100, bytes_per_shard=3000))
    parts = [f for f in manifest.files if f.kind == "parquet"]
    assert [f.rows for f in parts] == [3, 3, 1, 3]
    assert [f.image_bytes for f in parts] == [3000, 3000, 5000, 3000]
    ids = [i for f in parts for i in pq.read_table(layout.root / f.path)["sample_id"].to_pylist()]
    assert ids == [f"{i:04d}" for i in range(10)]


def test_split_is_a_hash_of_the_sample_id_and_order_is_shard_then_sample_id(tmp_path: Path) -> None:
    layout, tables = _fake_workdir(tmp_path, per_shard=160)
    _publish(layout, tables, rows_per_shard=50, val_fraction=0.25)
    shard_of = {i: s for s, t in tables.items() for i in t.column("sample_id").to_pylist()}
    val_count = 0
    for split in ("train", "val"):
        ids = [i for part in _parts(layout, split) for i in part.column("sample_id").to_pylist()]
        assert ids == sorted(ids, key=lambda i: (shard_of[i], i))
        for sample_id in ids:
            position = int(hashlib.sha256(sample_id.encode()).hexdigest()[:16], 16) / 2**64
            assert (position < 0.25) == (split == "val")
        val_count += len(ids) if split == "val" else 0
    assert 0.17 < val_count / len(shard_of) < 0.33  # 360 samples: sd of the fraction is 0.023
    assert split_of("a", 0.0) == "train" and split_of("a", 0.5) in ("train", "val")


def test_manifest_matches_files_and_images_are_the_original_bytes(tmp_path: Path) -> None:
    layout, tables = _fake_workdir(tmp_path)
    _publish(layout, tables, rows_per_shard=16, val_fraction=0.2)
    manifest = read_dataset_manifest(layout)
    root = layout.root  # manifest paths hold from the work directory as from the release folder
    assert _folder_files(layout) == {f.path for f in manifest.files} | {"dataset/manifest.json"}
    for f in manifest.files:
        assert (f.bytes, f.sha256) == ((root / f.path).stat().st_size, sha256_file(root / f.path))
    assert manifest.totals["rows"] == sum(f.rows for f in manifest.files if f.kind == "parquet") == 90
    assert [c["name"] for c in manifest.schema] == DATASET_SCHEMA.names
    assert manifest.description["val_fraction"] == 0.2

    originals = _originals(layout)
    metadata = {row["sample_id"]: row for t in tables.values() for row in t.to_pylist()}
    for split in ("train", "val"):
        for part in _parts(layout, split):
            for row in part.to_pylist():
                assert row["image"] == originals[row["sample_id"]]
                assert hashlib.sha256(row["image"]).hexdigest() == row["sha256"]
                upstream = metadata[row["sample_id"]]
                assert row["phash"] == upstream["phash"].hex()
                assert (row["caption"], row["group_id"], row["width"]) == (
                    upstream["caption"],
                    upstream["group_id"],
                    upstream["width"],
                )


def test_webdataset_tars_hold_the_same_samples_with_the_documented_keys(tmp_path: Path) -> None:
    layout, tables = _fake_workdir(tmp_path)
    _publish(layout, tables, rows_per_shard=16, val_fraction=0.2, webdataset=True)
    manifest = read_dataset_manifest(layout)
    root = layout.root
    parquet = [f for f in manifest.files if f.kind == "parquet"]
    tars = [f for f in manifest.files if f.kind == "webdataset"]
    assert [f.path.replace("webdataset/", "dataset/").replace("shard-", "part-") for f in tars] == [
        f.path.replace(".parquet", ".tar") for f in parquet
    ]
    extensions = set()
    for part_file, tar_file in zip(parquet, tars, strict=True):
        rows = pq.read_table(root / part_file.path).to_pylist()
        with tarfile.open(root / tar_file.path) as tar:
            members = tar.getmembers()
            assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 and m.isfile() for m in members)
            contents = {m.name: tar.extractfile(m).read() for m in members}
        names = [m.name for m in members]
        assert [n.split(".")[0] for n in names[::3]] == [r["sample_id"] for r in rows]
        for index, row in enumerate(rows):
            key = row["sample_id"]
            ext = {"JPEG": "jpg", "PNG": "png"}[row["image_format"]]
            extensions.add(ext)
            # a sample's members are consecutive and in name order
            assert names[3 * index : 3 * index + 3] == sorted([f"{key}.{ext}", f"{key}.json", f"{key}.txt"])
            assert contents[f"{key}.{ext}"] == row["image"]
            assert contents[f"{key}.txt"].decode() == (row["caption"] or "")
            metadata = json.loads(contents[f"{key}.json"])
            assert set(metadata) == set(DATASET_SCHEMA.names) - {"image"}
            assert metadata["extra"] == json.loads(row["extra"])
            assert (metadata["split"], metadata["url"]) == (row["split"], row["url"])
    assert extensions == {"jpg", "png"}


def test_rerun_with_fewer_samples_removes_stale_files(tmp_path: Path) -> None:
    layout, tables = _fake_workdir(tmp_path)
    _publish(layout, tables, rows_per_shard=8, val_fraction=0.2, webdataset=True)
    before = _folder_files(layout)
    (dataset_dir(layout) / "train" / ".part-00000.parquet.tmp-killed").write_bytes(b"half")
    fewer = {shard: table.slice(0, 10) for shard, table in tables.items()}
    published = _publish(layout, fewer, rows_per_shard=8, val_fraction=0.2)
    after = _folder_files(layout)
    manifest = read_dataset_manifest(layout)
    assert after == {f.path for f in manifest.files} | {"dataset/manifest.json"}
    assert len(after) < len(before) and not layout.webdataset.exists()
    assert not layout.webdataset.is_symlink()  # no link left pointing at nothing
    assert sum(published["rows"].values()) == 30 == manifest.totals["rows"]


def test_same_inputs_give_byte_identical_files(tmp_path: Path) -> None:
    digests = []
    for name in ("first", "second"):
        layout, tables = _fake_workdir(tmp_path / name)
        _publish(layout, tables, rows_per_shard=16, bytes_per_shard=30_000, val_fraction=0.2, webdataset=True)
        digests.append({path: sha256_file(layout.root / path) for path in _folder_files(layout)})
    _publish(layout, tables, rows_per_shard=16, bytes_per_shard=30_000, val_fraction=0.2, webdataset=True)
    digests.append({path: sha256_file(layout.root / path) for path in _folder_files(layout)})
    assert digests[0] == digests[1] == digests[2]
    assert len(digests[0]) > 4


def test_failed_write_keeps_the_previous_release_whole(tmp_path: Path) -> None:
    layout, tables = _fake_workdir(tmp_path)
    _publish(layout, tables, rows_per_shard=16, val_fraction=0.2, webdataset=True)
    previous = _folder_files(layout)
    rows = pq.read_table(dataset_dir(layout) / "train" / "part-00000.parquet")

    def batches():
        yield rows
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_dataset(layout, DatasetPlan(batches=batches(), rows_per_shard=1000, webdataset=True))
    # the release readers see is the previous one, whole; the failed build left nothing behind
    assert _folder_files(layout) == previous
    assert read_dataset_manifest(layout) is not None
    assert [p.name for p in layout.releases.iterdir()] == [current_release(layout)]


def test_kept_sample_without_image_is_an_error(tmp_path: Path) -> None:
    layout, tables = _fake_workdir(tmp_path)
    shard = SHARDS[0]
    validate = pq.read_table(layout.data("validate", shard))
    write_parquet(layout.data("validate", shard), validate.slice(1))
    with pytest.raises(MissingImageError, match=shard):
        _publish(layout, {shard: tables[shard]})


def test_shard_stage_keeps_every_row_and_records_the_dataset_in_its_marker(tmp_path: Path) -> None:
    layout, tables = _fake_workdir(tmp_path)
    for shard, table in tables.items():
        write_parquet(layout.data("decontaminate", shard), table)
    write_manifest(
        layout,
        Manifest(
            stage="decontaminate",
            fingerprint="f",
            upstream_identity=None,
            shards={s: sha256_file(layout.data("decontaminate", s)) for s in tables},
            counts={},
            failed_sources={},
            run_id="r0",
            finished_at="t",
        ),
    )
    config = _config(tmp_path, rows_per_shard=20, val_fraction=0.2)
    summary = SHARD.run(layout, config, run_id="r1")
    assert not summary.skipped and summary.counts == {"kept": 90}
    for shard, table in tables.items():
        assert pq.read_table(layout.data("shard", shard)).equals(table)
        ledger = pq.read_table(layout.ledger("shard", shard))
        assert set(ledger.column("fate").to_pylist()) == {"kept"} and ledger.num_rows == table.num_rows
    marker = read_marker(layout, "shard", "_all")
    assert sum(marker.extra["rows"].values()) == 90
    assert marker.extra["files"] == [f.path for f in read_dataset_manifest(layout).files]
    assert SHARD.run(layout, config, run_id="r2").skipped


# The release as its users load it: Hugging Face datasets (both ways), open_clip_train's WebDataset loader
# (sample counts from sizes.json) and DuckDB, each on the folder as it is.


def test_hugging_face_datasets_loads_the_parquet_folder_and_the_card_names_the_splits(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")  # a dev dependency (pyproject.toml)
    layout, tables = _fake_workdir(tmp_path / "work")
    _publish(layout, tables, rows_per_shard=16, val_fraction=0.2, webdataset=True)
    rows = read_dataset_manifest(layout).totals["rows_per_split"]
    originals = _originals(layout)
    cache = str(tmp_path / "hf-cache")
    by_patterns = datasets.load_dataset("parquet", data_dir=str(layout.dataset), cache_dir=cache)
    by_card = datasets.load_dataset(str(layout.dataset), cache_dir=cache)  # the card's `configs`
    for loaded in (by_patterns, by_card):
        assert {name: split.num_rows for name, split in loaded.items()} == {
            "train": rows["train"],
            "validation": rows["val"],
        }
    train = by_card["train"].cast_column("image", datasets.Image())
    assert isinstance(train.features["image"], datasets.Image)
    for row in train.select(range(5)):
        original = Image.open(io.BytesIO(originals[row["sample_id"]]))
        assert row["image"].size == original.size and row["image"].format == original.format


def test_open_clip_train_reads_the_webdataset_with_its_sizes(tmp_path: Path) -> None:
    import argparse

    import open_clip
    import torch
    from open_clip_train.data import get_wds_dataset
    from torchvision import transforms

    layout, tables = _fake_workdir(tmp_path)
    _publish(layout, tables, rows_per_shard=16, val_fraction=0.2, webdataset=True)
    manifest = read_dataset_manifest(layout)
    rows = manifest.totals["rows_per_split"]
    tars = {
        s: sorted(f.path for f in manifest.files if f.kind == "webdataset" and f.split == s) for s in rows
    }
    sizes = json.loads((layout.webdataset / "train" / "sizes.json").read_text())
    assert sizes == {
        Path(f.path).name: f.rows for f in manifest.files if f.kind == "webdataset" and f.split == "train"
    }

    def shards(split: str) -> str:  # open_clip_train's brace notation, as on its command line
        return str(layout.webdataset / split / f"shard-{{00000..{len(tars[split]) - 1:05d}}}.tar")

    args = argparse.Namespace(
        train_data=shards("train"),
        val_data=shards("val"),
        train_num_samples=None,  # from sizes.json
        val_num_samples=None,
        train_data_upsampling_factors=None,
        dataset_resampled=False,
        seed=0,
        batch_size=8,
        workers=0,
        world_size=1,
    )
    preprocess = transforms.Compose([transforms.Resize((32, 32)), transforms.ToTensor()])
    train = get_wds_dataset(args, preprocess, is_train=True, tokenizer=open_clip.tokenize)
    assert train.dataloader.num_samples == -(-rows["train"] // 8) * 8  # whole batches covering the split
    images, texts = next(iter(train.dataloader))
    assert images.shape == (8, 3, 32, 32) and texts.dtype == torch.long
    val = get_wds_dataset(args, preprocess, is_train=False, tokenizer=open_clip.tokenize)
    assert sum(len(batch[0]) for batch in val.dataloader) == rows["val"]  # every sample, with image and text


def test_duckdb_queries_the_released_parquet_in_place(tmp_path: Path) -> None:
    import duckdb

    layout, tables = _fake_workdir(tmp_path)
    _publish(layout, tables, rows_per_shard=16, val_fraction=0.2, webdataset=True)
    manifest = read_dataset_manifest(layout)
    counted = duckdb.sql(
        f"SELECT split, source, count(*) FROM read_parquet('{layout.dataset}/*/*.parquet') GROUP BY ALL"
    ).fetchall()
    assert {(split, source): n for split, source, n in counted} == {
        (split, source): n
        for split, per_source in manifest.totals["rows_per_source"].items()
        for source, n in per_source.items()
    }
    card = (layout.dataset / "README.md").read_text()
    for split, per_source in manifest.totals["rows_per_source"].items():
        assert f"{split} {manifest.totals['rows_per_split'][split]}" in card
        assert sum(per_source.values()) == manifest.totals["rows_per_split"][split]


def test_a_release_of_the_older_layout_is_replaced_with_the_links_of_this_one(tmp_path: Path) -> None:
    layout, tables = _fake_workdir(tmp_path)
    old = layout.releases / "0123456789abcdef"  # format 1: Parquet and tars in the release folder itself
    (old / "train").mkdir(parents=True)
    (old / "manifest.json").write_text("{}")
    layout.dataset.symlink_to(Path("releases") / old.name)
    _publish(layout, tables, rows_per_shard=16, val_fraction=0.2, webdataset=True)
    assert (
        os.readlink(layout.dataset) == "release/dataset"
        and os.readlink(layout.webdataset) == "release/webdataset"
    )
    assert os.readlink(layout.release) == f"releases/{current_release(layout)}"
    assert [p.name for p in layout.releases.iterdir()] == [current_release(layout)]
    assert read_dataset_manifest(layout).format_version == 2


def test_a_work_directory_copied_with_its_links_followed_gets_its_links_back(tmp_path: Path) -> None:
    layout, tables = _fake_workdir(tmp_path / "original")
    _publish(layout, tables, rows_per_shard=16, val_fraction=0.2, webdataset=True)
    copy = Layout(tmp_path / "copy")
    shutil.copytree(
        layout.root, copy.root
    )  # symlinks=False: `release`, `dataset`, `webdataset` become folders
    assert not copy.release.is_symlink() and not copy.dataset.is_symlink()
    fewer = {shard: table.slice(0, 10) for shard, table in tables.items()}
    _publish(copy, fewer, rows_per_shard=16, val_fraction=0.2, webdataset=True)
    assert all(link.is_symlink() for link in (copy.release, copy.dataset, copy.webdataset))
    assert [p.name for p in copy.releases.iterdir()] == [current_release(copy)]
    assert read_dataset_manifest(copy).totals["rows"] == sum(
        f.rows for f in read_dataset_manifest(copy).files if f.kind == "parquet"
    )
