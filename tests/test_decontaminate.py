"""decontaminate: rotated and embedding near-copies of eval images are dropped, the rest kept; the eval index
is cached on disk under a key that follows the files and the model."""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import tasks.decontaminate as decontaminate
from models.perceptual_hash import dct_hash
from rs5m.config import DecontaminateConfig, PipelineConfig
from storage.arrays import write_arrays
from storage.atomic import write_parquet
from storage.layout import Layout
from storage.markers import Manifest, sha256_file, write_manifest
from storage.schemas import DEDUP_SCHEMA
from tasks.decontaminate import (
    DECONTAMINATE,
    EvalIndex,
    EvalSetError,
    EvalSetIndex,
    build_eval_index,
    decontaminate_shard,
)
from tasks.embed import shared_encoder
from tests.helpers import near, unit

DIM = 64
RNG = np.random.default_rng(11)


@pytest.fixture(scope="module")
def originals(shared_data: Path) -> list[bytes]:
    folders = sorted((shared_data / "rsscn7" / "images").iterdir())
    return [sorted(folder.glob("*.jpg"))[3].read_bytes() for folder in folders]


def rotated(data: bytes) -> bytes:
    with Image.open(io.BytesIO(data)) as image:
        out = io.BytesIO()
        image.rotate(270, expand=True).save(out, "JPEG", quality=70)
    return out.getvalue()


def dedup_table(ids: list[str], images: list[bytes]) -> pa.Table:
    rows = [
        {
            "sample_id": sample_id,
            "source": "web",
            "url": f"https://example.org/{sample_id}.jpg",
            "sha256": hashlib.sha256(image).hexdigest(),
            "phash": dct_hash(image).tobytes(),
            "clip_score": 0.3,
        }
        for sample_id, image in zip(ids, images, strict=True)
    ]
    return pa.Table.from_pylist(rows, schema=DEDUP_SCHEMA)


def eval_set(name: str, paths: list[str], images: list[bytes], embeddings: np.ndarray) -> EvalSetIndex:
    hashes = np.stack([dct_hash(image) for image in images])
    return EvalSetIndex(name, tuple(paths), hashes, embeddings.astype(np.float16))


def test_rotated_and_embedding_copies_are_dropped_others_kept(originals: list[bytes]) -> None:
    ucm_emb = unit(RNG.standard_normal((3, DIM)))
    aid_emb = unit(RNG.standard_normal((1, DIM)))
    index = EvalIndex(
        (
            eval_set("ucm", ["sub/e0.jpg", "e1.jpg", "e2.jpg"], originals[:3], ucm_emb),
            eval_set("aid", ["x/e3.png"], [originals[3]], aid_emb),
        )
    )
    ids = ["rot", "emb", "two-sets", "clean-a", "clean-b"]
    images = [rotated(originals[0]), originals[4], rotated(originals[3]), originals[5], originals[6]]
    image_emb = np.stack(
        [
            unit(RNG.standard_normal(DIM)),
            near(ucm_emb[1], 0.97, RNG),
            near(ucm_emb[2], 0.99, RNG),  # also an embedding copy of a ucm image
            unit(RNG.standard_normal(DIM)),
            near(ucm_emb[0], 0.90, RNG),  # related, below the threshold
        ]
    ).astype(np.float16)
    outcome = decontaminate_shard(dedup_table(ids, images), image_emb, index, DecontaminateConfig())
    rows = {r["sample_id"]: r for r in outcome.decisions.to_pylist()}

    assert [r["sample_id"] for r in outcome.decisions.to_pylist()] == ids
    assert re.fullmatch(r"eval set ucm: sub/e0\.jpg \(hamming \d\)", rows["rot"]["detail"])
    assert re.fullmatch(r"eval set ucm: e1\.jpg \(cosine 0\.9[67]\d\)", rows["emb"]["detail"])
    # one entry per matched set, perceptual preferred within a set; the lead counts "eval set <name>:"
    assert re.fullmatch(
        r"eval set ucm: e2\.jpg \(cosine 0\.99\d\); eval set aid: x/e3\.png \(hamming \d\)|"
        r"eval set aid: x/e3\.png \(hamming \d\); eval set ucm: e2\.jpg \(cosine 0\.99\d\)",
        rows["two-sets"]["detail"],
    )
    assert {k: r["reason"] for k, r in rows.items()} == {
        "rot": "contaminated",
        "emb": "contaminated",
        "two-sets": "contaminated",
        "clean-a": None,
        "clean-b": None,
    }
    scores = {k: dict(r["scores"]) for k, r in rows.items()}
    assert scores["rot"]["eval_hamming"] <= 5 and "eval_hamming" not in scores["clean-a"]
    assert abs(scores["clean-b"]["eval_cosine"] - 0.90) < 2e-3
    assert outcome.kept.column("sample_id").to_pylist() == ["clean-a", "clean-b"]
    np.testing.assert_array_equal(outcome.arrays["image"], image_emb[3:])

    perceptual_off = DecontaminateConfig(perceptual_max_distance=None)
    outcome = decontaminate_shard(dedup_table(ids, images), image_emb, index, perceptual_off)
    assert outcome.kept.column("sample_id").to_pylist() == ["rot", "clean-a", "clean-b"]
    empty = decontaminate_shard(dedup_table(ids, images), image_emb, EvalIndex(()), DecontaminateConfig())
    assert empty.kept.num_rows == 5


def write_eval_folder(folder: Path, images: list[bytes]) -> None:
    (folder / "nested").mkdir(parents=True)
    for position, image in enumerate(images):
        (folder / ("nested" if position % 2 else "") / f"img{position}.jpg").write_bytes(image)
    (folder / "notes.txt").write_text("not an image")


def config_for(tmp_path: Path, folder: Path, **decon) -> PipelineConfig:
    return PipelineConfig(
        workdir=tmp_path / "work",
        sources=[{"name": "web", "path": "x.parquet", "format": "parquet"}],
        clip={"model": "rs5m-tiny-vit", "device": "cpu", "num_workers": 0},
        decontaminate={"eval_sets": [{"name": "rsscn7", "path": str(folder)}], **decon},
    )


def test_eval_index_is_cached_and_keyed_by_files(
    tmp_path: Path, originals: list[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "eval"
    write_eval_folder(folder, originals[:3])
    config = config_for(tmp_path, folder)
    layout = Layout(config.workdir)

    index = build_eval_index(layout, config)
    (built,) = index.sets
    assert built.paths == ("img0.jpg", "img2.jpg", "nested/img1.jpg")
    encoder = shared_encoder(config.clip).encoder
    expected = encoder.encode_images([(folder / p).read_bytes() for p in built.paths])
    np.testing.assert_array_equal(built.embeddings, expected)
    (cached,) = (layout.root / "cache" / "eval").iterdir()
    assert cached.name.startswith("rsscn7-") and cached.suffix == ".npz"

    monkeypatch.setattr(decontaminate, "shared_encoder", lambda _config: pytest.fail("cache not used"))
    again = build_eval_index(layout, config).sets[0]
    np.testing.assert_array_equal(again.hashes, built.hashes)
    fingerprint = DECONTAMINATE.fingerprint(config)
    os.utime(folder / "img0.jpg", ns=(1, 1))  # touched, same content: same key (content is hashed)
    assert DECONTAMINATE.fingerprint(config) == fingerprint
    moved = tmp_path / "moved-eval"
    shutil.copytree(folder, moved)  # the same images elsewhere: same eval set
    assert DECONTAMINATE.fingerprint(config_for(tmp_path, moved)) == fingerprint
    (folder / "img0.jpg").write_bytes((folder / "img2.jpg").read_bytes())  # changed content: new key
    assert DECONTAMINATE.fingerprint(config) != fingerprint
    with pytest.raises(pytest.fail.Exception, match="cache not used"):
        build_eval_index(layout, config)

    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    monkeypatch.undo()
    with pytest.raises(EvalSetError, match="broken.jpg"):
        build_eval_index(layout, config)
    with pytest.raises(EvalSetError, match="not a folder"):
        build_eval_index(layout, config_for(tmp_path, tmp_path / "missing"))


def test_stage_drops_eval_copies_through_the_harness(tmp_path: Path, originals: list[bytes]) -> None:
    folder = tmp_path / "eval"
    write_eval_folder(folder, originals[:2])
    # random weights place all images close together: test the embedding path at identity only
    config = config_for(tmp_path, folder, embedding_min_similarity=0.9999)
    layout = Layout(config.workdir)
    ids = ["copy", "rot", "other"]
    images = [originals[0], rotated(originals[1]), originals[4]]
    encoder = shared_encoder(config.clip).encoder
    write_arrays(layout, "dedup", "00000", {"image": encoder.encode_images(images)}, rows=3)
    write_parquet(layout.data("dedup", "00000"), dedup_table(ids, images))
    checksum = sha256_file(layout.data("dedup", "00000"))
    write_manifest(layout, Manifest("dedup", "f", None, {"00000": checksum}, {}, {}, "r0", "now"))

    summary = DECONTAMINATE.run(layout, "00000", config, "r1")
    assert summary.counts == {"kept": 1, "dropped:contaminated": 2}
    ledger = {r["sample_id"]: r for r in pq.read_table(layout.ledger("decontaminate", "00000")).to_pylist()}
    assert ledger["copy"]["detail"] == "eval set rsscn7: img0.jpg (hamming 0)"
    assert dict(ledger["copy"]["scores"])["eval_cosine"] > 0.9999
    assert ledger["rot"]["detail"].startswith("eval set rsscn7: nested/img1.jpg (hamming")
    assert np.load(layout.array("decontaminate", "00000", "image")).shape[0] == 1
    assert DECONTAMINATE.run(layout, "00000", config, "r2").skipped
