"""Perceptual hash: rotation/flip/re-encode/resize/crop copies of real RS tiles (RSSCN7, UC Merced) are found;
distinct originals never merge."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models import perceptual_hash
from models.perceptual_hash import (
    DEFAULT_MAX_DISTANCE,
    HASH_BITS,
    HASH_BYTES,
    dct_hashes,
    dihedral_variants,
    hash_neighbours,
)
from tests.helpers import missing_data

T = Image.Transpose


def _jpeg(im: Image.Image, quality: int = 95) -> bytes:
    buffer = io.BytesIO()
    im.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def _centre_crop(im: Image.Image, fraction_per_side: float) -> Image.Image:
    w, h = im.size
    dx, dy = round(fraction_per_side * w), round(fraction_per_side * h)
    return im.crop((dx, dy, w - dx, h - dy))


def _scaled(im: Image.Image, scale: float) -> Image.Image:
    return im.resize((round(im.width * scale), round(im.height * scale)), Image.Resampling.LANCZOS)


# name -> (make the copy, required detection rate); bench/bench_dedup_quality.py measures the same copies
COPIES = {
    "rotate_90": (lambda im: _jpeg(im.transpose(T.ROTATE_90)), 0.99),
    "rotate_180": (lambda im: _jpeg(im.transpose(T.ROTATE_180)), 0.99),
    "rotate_270": (lambda im: _jpeg(im.transpose(T.ROTATE_270)), 0.99),
    "flip_horizontal": (lambda im: _jpeg(im.transpose(T.FLIP_LEFT_RIGHT)), 0.99),
    "flip_vertical": (lambda im: _jpeg(im.transpose(T.FLIP_TOP_BOTTOM)), 0.99),
    "transpose": (lambda im: _jpeg(im.transpose(T.TRANSPOSE)), 0.99),
    "jpeg_q50": (lambda im: _jpeg(im, 50), 0.99),
    "jpeg_q75": (lambda im: _jpeg(im, 75), 0.99),
    "resize_0.5x": (lambda im: _jpeg(_scaled(im, 0.5)), 0.99),
    "resize_0.75x": (lambda im: _jpeg(_scaled(im, 0.75)), 0.99),
    "centre_crop_2.5%": (lambda im: _jpeg(_centre_crop(im, 0.025)), 0.90),
    "crop_2.5%_rotated": (lambda im: _jpeg(_centre_crop(im, 0.025).transpose(T.ROTATE_270)), 0.90),
}


@pytest.fixture(scope="module")
def rsscn7_images(shared_data: Path) -> list[bytes]:
    rsscn7, ucm = shared_data / "rsscn7" / "images", shared_data / "ucm_captions" / "images"
    paths = sorted(rsscn7.glob("*/*.jpg")) + sorted(ucm.rglob("*.tif"))
    if not paths:
        missing_data(
            f"no RSSCN7 or UC Merced images under {shared_data}: this test needs the real public data"
        )
    return [path.read_bytes() for path in paths]


@pytest.fixture(scope="module")
def original_hashes(rsscn7_images: list[bytes]) -> np.ndarray:
    return dct_hashes(rsscn7_images)


def test_copies_are_found_and_originals_never_merge(
    rsscn7_images: list[bytes], original_hashes: np.ndarray, capsys: pytest.CaptureFixture[str]
) -> None:
    n = len(rsscn7_images)
    decoded = [Image.open(io.BytesIO(image)).convert("RGB") for image in rsscn7_images]

    i, j, dist = hash_neighbours(original_hashes)
    assert len(i) == 0, f"distinct originals merged: {list(zip(i, j, dist, strict=True))}"
    # Closest distinct originals, to report the margin: search far wider than the threshold.
    _, _, wide = hash_neighbours(original_hashes, HASH_BITS - 1)
    closest_originals = int(wide.min())

    rows = []
    for name, (make_copy, required) in COPIES.items():
        copy_hashes = dct_hashes(make_copy(im) for im in decoded)
        query, base, pair_dist = hash_neighbours(original_hashes, DEFAULT_MAX_DISTANCE, queries=copy_hashes)
        found = np.zeros(n, dtype=bool)
        found[query[query == base]] = True
        # Distance of every copy to its own original, for the table's worst case.
        q, b, d = hash_neighbours(original_hashes, HASH_BITS - 1, queries=copy_hashes)
        own = d[q == b]
        assert len(own) == n
        rows.append((name, found.mean(), required, int(np.median(own)), int(own.max())))
        # A copy may only match its own original: any other match is a false merge.
        assert np.all(query == base), f"{name}: copies matched other originals at {pair_dist[query != base]}"

    with capsys.disabled():
        print(f"\nperceptual hash on {n} RSSCN7 and UC Merced images, max_distance={DEFAULT_MAX_DISTANCE}")
        print("| copy | found | required | median bits | max bits |\n|---|---|---|---|---|")
        for name, rate, required, median, worst in rows:
            print(f"| {name} | {rate:.1%} | {required:.0%} | {median} | {worst} |")
        print(f"closest distinct originals: {closest_originals} bits")
    for name, rate, required, _, _ in rows:
        assert rate >= required, f"{name}: found {rate:.1%} < {required:.0%}"
    assert closest_originals > DEFAULT_MAX_DISTANCE


def test_hash_variants_match_hashes_of_transformed_thumbnails(rsscn7_images: list[bytes]) -> None:
    # The bit-level group action must equal hashing the rotated/flipped pixels: exact, no re-encoding noise.
    thumbnail = perceptual_hash._HASH.thumbnail(rsscn7_images[0])
    transformed = []
    for oriented in (thumbnail, thumbnail.T):
        for flip_rows in (False, True):
            for flip_cols in (False, True):
                pixels = oriented[::-1] if flip_rows else oriented
                transformed.append(pixels[:, ::-1] if flip_cols else pixels)
    expected = perceptual_hash._HASH.hash_thumbnails(np.stack(transformed))
    variants = dihedral_variants(perceptual_hash._HASH.hash_thumbnails(thumbnail[None]))[0]
    np.testing.assert_array_equal(variants, expected)
    assert len({bytes(v) for v in variants}) == 8


def test_planted_near_copies_are_found_among_random_hashes() -> None:
    rng = np.random.default_rng(7)
    hashes = rng.integers(0, 256, (3000, HASH_BYTES), dtype=np.uint8)
    # Plant near-copies: a rotated/flipped variant with up to max_distance flipped bits.
    sources = rng.choice(3000, 200, replace=False)
    planted = dihedral_variants(hashes[sources])[np.arange(200), rng.integers(0, 8, 200)]
    bits = np.unpackbits(planted, axis=1)
    for row in bits:
        row[rng.choice(HASH_BITS, rng.integers(0, DEFAULT_MAX_DISTANCE + 1), replace=False)] ^= 1
    hashes = np.concatenate([hashes, np.packbits(bits, axis=1)])

    i, j, dist = hash_neighbours(hashes, DEFAULT_MAX_DISTANCE)
    found = set(zip(i.tolist(), j.tolist(), strict=True))
    assert all((int(s), 3000 + k) in found for k, s in enumerate(sources))
    assert len(found) == len(i)  # one row per pair
    assert np.all(i < j) and np.all(dist <= DEFAULT_MAX_DISTANCE)


def test_undecodable_bytes_raise_naming_the_index(rsscn7_images: list[bytes]) -> None:
    with pytest.raises(ValueError, match="image 1 cannot be decoded"):
        dct_hashes([rsscn7_images[0], b"<html>not an image</html>"])
    assert dct_hashes([]).shape == (0, HASH_BYTES)


def _plant_copies(hashes: np.ndarray, sources: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random rotation/flip of each source hash with 0..24 bits flipped, like a re-encoded copy (real ones: a
    median of 1 bit, at most 26 for JPEG q50, test_copies_are_found_and_originals_never_merge)."""
    planted = dihedral_variants(hashes[sources])[np.arange(len(sources)), rng.integers(0, 8, len(sources))]
    bits = np.unpackbits(planted, axis=1)
    for row in bits:
        row[rng.choice(HASH_BITS, rng.integers(0, 25), replace=False)] ^= 1
    return np.packbits(bits, axis=1)


@pytest.fixture(scope="module")
def planted_30k() -> tuple[np.ndarray, set[tuple[int, int]]]:
    """30k random hashes whose last 1% are near-copies of earlier rows, and those (source, copy) pairs."""
    rng = np.random.default_rng(11)
    n, n_planted = 30_000, 300
    hashes = rng.integers(0, 256, (n, HASH_BYTES), dtype=np.uint8)
    sources = rng.choice(n - n_planted, n_planted, replace=False)
    hashes[n - n_planted :] = _plant_copies(hashes, sources, rng)
    return hashes, set(zip(sources.tolist(), range(n - n_planted, n), strict=True))


def _rows(result: tuple[np.ndarray, np.ndarray, np.ndarray]) -> set[tuple[int, int, int]]:
    return set(zip(*(column.tolist() for column in result), strict=True))


def _assert_format(i: np.ndarray, j: np.ndarray, dist: np.ndarray) -> None:
    assert (i.dtype, j.dtype, dist.dtype) == (np.int64, np.int64, np.int32)
    assert np.all(np.lexsort((j, i)) == np.arange(len(i)))  # sorted by (i, j)
    assert len(set(zip(i.tolist(), j.tolist(), strict=True))) == len(i)  # one row per pair


def test_ivf_backend_finds_planted_copies_with_exact_distances(
    planted_30k: tuple[np.ndarray, set[tuple[int, int]]],
) -> None:
    hashes, planted = planted_30k
    exact = hash_neighbours(hashes, backend="flat")
    approximate = hash_neighbours(hashes, backend="ivf")

    i, j, dist = approximate
    _assert_format(i, j, dist)
    assert np.all(i < j)
    # Approximate means missed pairs only: every reported row, distance included, is in the exact answer.
    assert _rows(approximate) <= _rows(exact)
    found = set(zip(i.tolist(), j.tolist(), strict=True))
    recall = len(planted & found) / len(planted)
    assert planted <= set(zip(exact[0].tolist(), exact[1].tolist(), strict=True))
    assert recall >= 0.99, f"ivf found {recall:.1%} of planted copies"


def test_ivf_backend_in_queries_mode(planted_30k: tuple[np.ndarray, set[tuple[int, int]]]) -> None:
    hashes, _ = planted_30k
    rng = np.random.default_rng(12)
    sources = rng.choice(len(hashes), 400, replace=False)
    queries = np.concatenate(
        [_plant_copies(hashes, sources, rng), rng.integers(0, 256, (400, HASH_BYTES), dtype=np.uint8)]
    )

    exact = hash_neighbours(hashes, queries=queries, backend="flat")
    approximate = hash_neighbours(hashes, queries=queries, backend="ivf")

    _assert_format(*approximate)
    assert _rows(approximate) <= _rows(exact)
    found = set(zip(approximate[0].tolist(), approximate[1].tolist(), strict=True))
    recall = np.mean([(query, int(source)) in found for query, source in enumerate(sources)])
    assert recall >= 0.99, f"ivf found {recall:.1%} of planted copies"


def test_tiny_inputs_give_the_exact_answer_with_the_ivf_backend() -> None:
    # Below 80 rows the inverted file has one list, which every query scans: nothing can be missed.
    rng = np.random.default_rng(13)
    hashes = rng.integers(0, 256, (60, HASH_BYTES), dtype=np.uint8)
    hashes[30:] = _plant_copies(hashes, np.arange(30), rng)
    exact = hash_neighbours(hashes, backend="flat")
    assert len(exact[0]) >= 30
    for got, want in zip(hash_neighbours(hashes, backend="ivf"), exact, strict=True):
        np.testing.assert_array_equal(got, want)


def test_auto_backend_switches_to_ivf_above_flat_max_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    built = []
    build_ivf = perceptual_hash._ivf_index
    monkeypatch.setattr(perceptual_hash, "FLAT_MAX_ROWS", 1000)
    monkeypatch.setattr(
        perceptual_hash, "_ivf_index", lambda base: built.append(len(base)) or build_ivf(base)
    )
    hashes = np.random.default_rng(14).integers(0, 256, (1001, HASH_BYTES), dtype=np.uint8)

    hash_neighbours(hashes[:1000])
    assert built == []
    hash_neighbours(hashes)
    assert built == [1001]
    with pytest.raises(ValueError, match="backend"):
        hash_neighbours(hashes, backend="hnsw")  # type: ignore[arg-type]
