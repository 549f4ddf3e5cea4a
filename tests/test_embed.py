"""tasks/embed.py: real RSSCN7 JPEGs through embed_shard with the tiny random CLIP (offline)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from models.clip import ClipSpec, UndecodableImageError, load_clip
from models.perceptual_hash import dct_hashes
from storage.schemas import EMBED_SCHEMA, VALIDATE_SCHEMA
from tasks.embed import REASONS, embed_shard

TINY_DIM = 64


@pytest.fixture(scope="module")
def encoder():
    return load_clip(ClipSpec("rs5m-tiny-vit", seed=0, device="cpu"), num_workers=0)


@pytest.fixture(scope="module")
def rsscn7_images(shared_data: Path) -> list[bytes]:
    folder = shared_data / "rsscn7" / "images"
    if not folder.is_dir():
        pytest.skip(f"{folder} is absent: these tests embed real RSSCN7 JPEGs")
    # two per class: varied scenes
    return [p.read_bytes() for d in sorted(folder.iterdir()) for p in sorted(d.glob("*.jpg"))[:2]]


def validate_table(images: list[bytes | None], captions: list[str | None]) -> pa.Table:
    n = len(images)
    return pa.table(
        {
            "sample_id": [f"s{i:03d}" for i in range(n)],
            "source": ["web"] * n,
            "url": [f"http://127.0.0.1/{i}.jpg" for i in range(n)],
            "caption": captions,
            "extra": [None] * n,
            "matched_keyword": ["aerial"] * n,
            "image": images,
            "sha256": [hashlib.sha256(b or b"").hexdigest() for b in images],
            "width": [400] * n,
            "height": [400] * n,
            "image_format": ["JPEG"] * n,
        },
        schema=VALIDATE_SCHEMA,
    )


def captions_for(n: int) -> list[str | None]:
    return [None if i == 3 else f"an aerial view number {i} of farmland" for i in range(n)]


def test_every_row_kept_with_aligned_float16_arrays_and_phash(encoder, rsscn7_images):
    table = validate_table(rsscn7_images, captions_for(len(rsscn7_images)))
    outcome = embed_shard(table, encoder, batch_size=5)
    n = len(rsscn7_images)
    assert outcome.counts() == {"kept": n}
    assert outcome.kept.schema == EMBED_SCHEMA
    assert "image" not in outcome.kept.column_names
    assert outcome.kept.column("sample_id").to_pylist() == table.column("sample_id").to_pylist()
    assert outcome.kept.column("caption").to_pylist() == table.column("caption").to_pylist()
    for name in ("image", "text"):
        assert outcome.arrays[name].shape == (n, TINY_DIM)
        assert outcome.arrays[name].dtype == np.float16
    phash = np.frombuffer(b"".join(outcome.kept.column("phash").to_pylist()), np.uint8).reshape(n, 8)
    np.testing.assert_array_equal(phash, dct_hashes(rsscn7_images))
    # row i of each array belongs to kept row i: compare with one-at-a-time encodings
    for row in (0, 3, n - 1):
        single_image = encoder.encode_images([rsscn7_images[row]])[0].astype(np.float32)
        np.testing.assert_allclose(outcome.arrays["image"][row].astype(np.float32), single_image, atol=2e-3)
        single_text = encoder.encode_texts([table.column("caption")[row].as_py() or ""])[0]
        np.testing.assert_allclose(outcome.arrays["text"][row], single_text, atol=2e-3)
    # distinct images and captions give distinct rows (no broadcast or off-by-one copy)
    assert len({outcome.arrays["image"][i].tobytes() for i in range(n)}) == n


def test_deterministic(encoder, rsscn7_images):
    table = validate_table(rsscn7_images[:6], captions_for(6))
    first, second = embed_shard(table, encoder), embed_shard(table, encoder)
    assert first.kept.equals(second.kept)
    for name in ("image", "text"):
        np.testing.assert_array_equal(first.arrays[name], second.arrays[name])


def test_undecodable_bytes_are_dropped_and_the_rest_stay_aligned(encoder, rsscn7_images):
    images: list[bytes | None] = [rsscn7_images[0], b"<html>not an image</html>", rsscn7_images[1]]
    table = validate_table(images, ["a", "b", "c"])
    outcome = embed_shard(table, encoder)
    assert outcome.counts() == {"kept": 2, "dropped:unembeddable": 1}
    assert set(REASONS) == {"unembeddable"}
    dropped = outcome.decisions.filter(pc.equal(outcome.decisions.column("fate"), "dropped"))
    assert dropped.column("sample_id").to_pylist() == ["s001"]
    assert dropped.column("detail")[0].as_py().startswith("perceptual hash")
    expected = encoder.encode_images([rsscn7_images[0], rsscn7_images[1]])
    np.testing.assert_array_equal(outcome.arrays["image"], expected)
    assert outcome.arrays["text"].shape == (2, TINY_DIM)


class RejectingEncoder:
    """Delegates to a real encoder but rejects one image, as a decoder stricter than PIL would."""

    def __init__(self, encoder, rejected: bytes) -> None:
        self.encoder = encoder
        self.rejected = rejected

    def encode_images(self, images, batch_size=64):
        bad = [i for i, data in enumerate(images) if data == self.rejected]
        if bad:
            raise UndecodableImageError(bad, len(images))
        return self.encoder.encode_images(images, batch_size=batch_size)

    def encode_texts(self, texts):
        return self.encoder.encode_texts(texts)


def test_rows_the_encoder_rejects_are_dropped_with_phash_and_arrays_aligned(encoder, rsscn7_images):
    images = rsscn7_images[:4]
    table = validate_table(images, ["a", "b", "c", "d"])
    outcome = embed_shard(table, RejectingEncoder(encoder, rejected=images[2]))
    assert outcome.counts() == {"kept": 3, "dropped:unembeddable": 1}
    assert outcome.kept.column("sample_id").to_pylist() == ["s000", "s001", "s003"]
    kept_images = [images[0], images[1], images[3]]
    phash = np.frombuffer(b"".join(outcome.kept.column("phash").to_pylist()), np.uint8).reshape(3, 8)
    np.testing.assert_array_equal(phash, dct_hashes(kept_images))
    np.testing.assert_array_equal(outcome.arrays["image"], encoder.encode_images(kept_images))
    np.testing.assert_array_equal(outcome.arrays["text"], encoder.encode_texts(["a", "b", "d"]))
