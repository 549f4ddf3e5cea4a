"""Perceptual near-duplicate detection for overhead image tiles, invariant to the 8 rotations/flips.

The hash is a DCT hash (pHash family): grayscale, resize to 64x64 with a fixed Lanczos filter, 2-D DCT-II,
keep the low-frequency 16x16 block, one bit per coefficient: 256 bits (32 bytes). Each bit is the coefficient's
SIGN (bit = coef > 0); the DC coefficient is always positive, so bit 0 is fixed at 0 and 255 bits carry
information.

Why sign bits rather than the classic "above the median" bits: the dihedral group then acts EXACTLY on the hash.
A transpose of the image transposes the DCT block; a left-right flip negates the coefficients with an odd column
frequency and an up-down flip those with an odd row frequency. So the hash of a rotated/flipped image is the
hash of the original with its 16x16 bit grid transposed and/or XORed with a parity mask, computed from the 256 bits
alone (`dihedral_variants`). With a median threshold the negations move the median and that identity breaks.

Why no canonical hash: picking one of the 8 variants (e.g. the lexicographically smallest) flips between
candidates whenever two are near-equal. Measured on the 350 RSSCN7 images, the canonical hash of a rotated
copy was 30+ bits from its original's for the worst 1-5% of images, whatever the threshold rule. Instead the distance between two
images is the minimum over the 8 variants of one of them, which is what a rotation-blind comparison should be;
the exact group action makes it symmetric. `hash_neighbours` searches with all 8 variants of each query against
the stored hashes (one per image), so storage stays one 32-byte hash per image and search costs 8 queries.

Why 256 bits, not the classic 64 (8x8 block of a 32x32 thumbnail, this module until issue 11): a short hash
cannot keep distinct scenes apart at scale. Measured on 571 real RS images (RSSCN7, UC Merced, BigEarthNet RGB;
bench/bench_dedup_quality.py), the closest two distinct originals were 13 of 63 bits apart while 2.5% centre
crops of the same images reached 19 bits (94.7% within the old threshold of 11); on a user's 1,800 aerial
scenes distinct pairs came within 9 bits. At 256 bits the distances concentrate: the closest distinct pair is
85 bits apart, rotations, flips, JPEG q50/q75 and 0.5x/0.75x resizing stay within 27 bits (100% found), and a
2.5% crop is within 64 bits 96.3% of the time. Hence `DEFAULT_MAX_DISTANCE = 64`: 21 bits below the closest
distinct pair. Two random hashes come within 64 bits with probability 8 x P(Binomial(255, 1/2) <= 64) = 2.9e-15
per pair (the 64-bit hash at 11 bits: 6.7e-7, i.e. ~3.3e5 chance pairs among 1M images; bench measures it). Much larger
crops stay out of reach of any global DCT hash: that is the embedding method's job.

Search backends (`hash_neighbours(backend=...)`), measured on random 256-bit hashes with 1% planted copies (a
random rotation/flip plus 0..24 flipped bits), one faiss thread, 2 noisy cores:
- "flat", IndexBinaryFlat: exact, every query variant against every stored hash, cost n^2. 30k self-join
  9.5 s, 100k 80 s, so about 2.5 h at 1M. (With the old 64-bit hash: 27 s at 100k.)
- "ivf", IndexBinaryIVF with round(4 * sqrt(n)) lists, k-means trained on a fixed-seed sample of 40 hashes per
  list, IVF_NPROBE = 64 lists scanned per query variant, cost about n^1.5. 100k: 17-34 s, planted-copy recall
  1.0 (nprobe 32: 0.998). Queries mode (400 planted copies against 30k): recall >= 0.99. It never reports a
  false pair and its distances are exact: it only misses pairs, mostly those far apart (crops), so the
  no-two-released-files-within-the-threshold guarantee of dedup holds for the pairs it finds.
"auto" (the default) uses "flat" up to FLAT_MAX_ROWS = 50k stored hashes and "ivf" above.

Undecodable input raises ValueError naming the image's index: images reach this module after the validate stage
has decoded them, so a failure here means corrupted storage, not a bad sample to drop. A caller that must
survive bad bytes hashes one image at a time with `dct_hash`.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from typing import TYPE_CHECKING, Literal

import numpy as np
from PIL import Image

if TYPE_CHECKING:  # imported where a search runs: `rs5m report` imports this module for HASH_BYTES
    import faiss

HASH_BYTES = 32
HASH_BITS = 256
DEFAULT_MAX_DISTANCE = 64
# hash_neighbours(backend="auto") searches exactly up to this many stored hashes, approximately (IVF) above.
FLAT_MAX_ROWS = 50_000
# Inverted lists the IVF backend scans per query variant; see the module docstring for recall and speed.
IVF_NPROBE = 64

Backend = Literal["auto", "flat", "ivf"]

_SIDE = 64  # grayscale thumbnail side the DCT runs on (32 let rotations move up to 27 bits, 64: 14)
_BLOCK = 16  # low-frequency block side: 16x16 = 256 bits
# JPEG draft decoding (DCT-domain downscale by 1/2..1/8) to at least this side: several times faster than a full
# decode and it changed no detection rate on RSSCN7.
_DRAFT_SIDE = 128
_IVF_LISTS_PER_SQRT_ROW = 4
_IVF_TRAIN_PER_LIST = 40
# Coefficients this close to zero count as 0 (bit 0): float noise on a flat image must not decide bits.
_ZERO_TOLERANCE = 1e-6


class DctSignHash:
    """The sign-bit DCT hash of a side x side grayscale thumbnail, its block x block low frequencies (one bit
    each), and the exact action of the 8 rotations/flips on it. The module's hash is DctSignHash(64, 16);
    bench/bench_dedup_quality.py also builds the 64-bit one it replaced, DctSignHash(32, 8), to compare."""

    def __init__(self, side: int, block: int) -> None:
        self.side, self.block = side, block
        self.bits = block * block
        self.nbytes = self.bits // 8
        # Orthonormal DCT-II basis, only the rows for the kept frequencies: block = B @ image @ B.T.
        k = np.arange(side)
        self.dct_rows = np.sqrt(2.0 / side) * np.cos(
            np.pi * (2 * k[None, :] + 1) * np.arange(block)[:, None] / (2 * side)
        )
        self.dct_rows[0] /= np.sqrt(2.0)
        parity = np.arange(block) % 2 == 1
        self.row_odd = np.broadcast_to(parity[:, None], (block, block))  # flipped by an up-down flip
        self.col_odd = np.broadcast_to(parity[None, :], (block, block))  # flipped by a left-right flip

    def thumbnail(self, image: bytes) -> np.ndarray:
        with Image.open(io.BytesIO(image)) as im:
            im.draft("L", (_DRAFT_SIDE, _DRAFT_SIDE))
            gray = im.convert("L").resize((self.side, self.side), Image.Resampling.LANCZOS)
        return np.asarray(gray, dtype=np.float64)

    def hash_thumbnails(self, thumbnails: np.ndarray) -> np.ndarray:
        blocks = self.dct_rows @ thumbnails @ self.dct_rows.T  # (n, block, block)
        bits = blocks.reshape(len(blocks), self.bits) > _ZERO_TOLERANCE
        bits[:, 0] = False  # DC: always positive, carries nothing
        return np.packbits(bits, axis=1)

    def hashes(self, images: Iterable[bytes]) -> np.ndarray:
        """Hashes of encoded images, shape (n, nbytes) uint8, in input order; ValueError naming the index of
        the first image PIL cannot decode."""
        thumbnails = []
        for index, image in enumerate(images):
            try:
                thumbnails.append(self.thumbnail(image))
            except (OSError, ValueError, Image.DecompressionBombError) as err:
                raise ValueError(f"image {index} cannot be decoded: {err}") from err
        if not thumbnails:
            return np.zeros((0, self.nbytes), dtype=np.uint8)
        return self.hash_thumbnails(np.stack(thumbnails))

    def variants(self, hashes: np.ndarray) -> np.ndarray:
        """The hashes of the 8 rotations/flips of each image, shape (n, 8, nbytes); variant 0 is the identity."""
        grids = np.unpackbits(self.checked(hashes), axis=1).reshape(-1, self.block, self.block).astype(bool)
        variants = []
        for oriented in (grids, grids.transpose(0, 2, 1)):
            for row_flip in (False, True):
                for col_flip in (False, True):
                    flipped = oriented ^ (row_flip & self.row_odd) ^ (col_flip & self.col_odd)
                    variants.append(np.packbits(flipped.reshape(-1, self.bits), axis=1))
        return np.stack(variants, axis=1)

    def checked(self, hashes: np.ndarray) -> np.ndarray:
        if hashes.dtype != np.uint8 or hashes.ndim != 2 or hashes.shape[1] != self.nbytes:
            raise ValueError(f"hashes must be (n, {self.nbytes}) uint8, got {hashes.shape} {hashes.dtype}")
        return np.ascontiguousarray(hashes)


_HASH = DctSignHash(_SIDE, _BLOCK)


def dct_hash(image: bytes) -> np.ndarray:
    """The 256-bit hash of one encoded image as 32 uint8. Raises ValueError when PIL cannot decode it."""
    try:
        thumbnail = _HASH.thumbnail(image)
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise ValueError(f"cannot decode image: {err}") from err
    return _HASH.hash_thumbnails(thumbnail[None])[0]


def dct_hashes(images: Iterable[bytes]) -> np.ndarray:
    """Hashes of encoded images, shape (n, 32) uint8 (faiss binary layout), in input order.

    Raises ValueError naming the index of the first image PIL cannot decode.
    """
    return _HASH.hashes(images)


def dihedral_variants(hashes: np.ndarray) -> np.ndarray:
    """The hashes of the 8 rotations/flips of each image, shape (n, 8, 32); variant 0 is the identity."""
    return _HASH.variants(hashes)


def hash_neighbours(
    hashes: np.ndarray,
    max_distance: int = DEFAULT_MAX_DISTANCE,
    *,
    queries: np.ndarray | None = None,
    backend: Backend = "auto",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs of images whose rotation/flip-invariant Hamming distance is <= max_distance.

    The distance is the minimum over the 8 dihedral variants. Without queries: a self-join of `hashes`, pairs
    (i, j) with i < j. With queries: (query row, hashes row) pairs, e.g. downloaded images against eval images.
    Returns (i, j, dist) as int64, int64, int32 arrays sorted by (i, j), one row per pair, dist always exact.

    backend: "flat" is exact brute force (cost grows as n^2); "ivf" is approximate (an inverted file over
    `hashes`, cost grows as n^1.5): it may miss pairs but never reports a false one. "auto" picks "flat" up to
    FLAT_MAX_ROWS rows of `hashes` and "ivf" above. See the module docstring for measured recall and times.
    """
    if not 0 <= max_distance < HASH_BITS:
        raise ValueError(f"max_distance must be in [0, {HASH_BITS}), got {max_distance}")
    if backend not in ("auto", "flat", "ivf"):
        raise ValueError(f"backend must be 'auto', 'flat' or 'ivf', got {backend!r}")
    base = _HASH.checked(hashes)
    probes = base if queries is None else _HASH.checked(queries)
    empty = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int32))
    if len(base) == 0 or len(probes) == 0:
        return empty

    import faiss

    approximate = backend == "ivf" or (backend == "auto" and len(base) > FLAT_MAX_ROWS)
    index = _ivf_index(base) if approximate else faiss.IndexBinaryFlat(HASH_BITS)
    if not approximate:
        index.add(base)
    probe_variants = dihedral_variants(probes)
    found_probes, found_bases = [], []
    # in blocks: faiss holds per-query search state (the IVF probe lists: ~3 KB a row) for a whole call
    for start in range(0, len(probes), _SEARCH_BLOCK_ROWS):
        block = probe_variants[start : start + _SEARCH_BLOCK_ROWS].reshape(-1, HASH_BYTES)
        limits, _, ids = index.range_search(block, max_distance + 1)
        rows = start + np.arange(len(block), dtype=np.int64) // 8
        found_probes.append(np.repeat(rows, np.diff(limits).astype(np.int64)))
        found_bases.append(ids.astype(np.int64))
    probe_ids, base_ids = np.concatenate(found_probes), np.concatenate(found_bases)
    if queries is None:
        if approximate:
            # Each pair has two chances, one from each side: keeping both lifted planted-copy recall from
            # ~0.99 to ~1.0 at no search cost.
            other = probe_ids != base_ids
            probe_ids, base_ids = (
                np.minimum(probe_ids, base_ids)[other],
                np.maximum(probe_ids, base_ids)[other],
            )
        else:
            # The group acts exactly, so d(g.h_i, h_j) = d(h_i, g^-1.h_j): the i < j half holds every pair.
            upper = probe_ids < base_ids
            probe_ids, base_ids = probe_ids[upper], base_ids[upper]
    if len(probe_ids) == 0:
        return empty
    # Several variants (and, for ivf, both sides) can match the same pair: one row each, sorted by (i, j).
    pair_keys = np.unique(probe_ids * len(base) + base_ids)
    probe_ids, base_ids = pair_keys // len(base), pair_keys % len(base)
    # Recomputed over all 8 variants: an approximate search may have matched a pair through a variant other
    # than the closest one.
    words = probe_variants.view(np.uint64)[probe_ids]  # (pairs, 8 variants, 4 words)
    differing = np.bitwise_count(words ^ base.view(np.uint64)[base_ids][:, None, :])
    distances = differing.sum(axis=2, dtype=np.int32).min(axis=1)
    return probe_ids, base_ids, distances.astype(np.int32)


_SEARCH_BLOCK_ROWS = 65_536


def _ivf_index(base: np.ndarray) -> faiss.IndexBinaryIVF:
    # ~4 * sqrt(n) lists keeps both the coarse assignment (n * lists) and the list scans
    # (n * nprobe * n / lists) at n^1.5; capped so k-means gets _IVF_TRAIN_PER_LIST points per list (faiss
    # warns below 39).
    import faiss

    lists = round(_IVF_LISTS_PER_SQRT_ROW * np.sqrt(len(base)))
    lists = max(1, min(lists, len(base) // _IVF_TRAIN_PER_LIST))
    quantizer = faiss.IndexBinaryFlat(HASH_BITS)
    # Counting-based top-k, not a heap: the coarse assignment dominates the search (100k: 5.0 s, not 7.2).
    quantizer.use_heap = False
    index = faiss.IndexBinaryIVF(quantizer, HASH_BITS, lists)
    # A fixed-seed sample, not all rows: training time grows with lists, not n, and results are repeatable.
    sample_rows = np.random.default_rng(0).choice(
        len(base), min(len(base), _IVF_TRAIN_PER_LIST * lists), replace=False
    )
    index.train(base[np.sort(sample_rows)])
    index.add(base)
    index.nprobe = min(IVF_NPROBE, lists)
    return index
