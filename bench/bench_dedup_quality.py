"""Perceptual dedup quality on real RS images: the 256-bit hash against the 64-bit one it replaced (issue 11).

Originals: every RSSCN7 JPEG, UC Merced TIFF and BigEarthNet patch (v1 and v2, RGB as the rs3 stage makes it)
under ../shared/data. For each transform (rotations, flips, transpose, JPEG q50/q75, 0.5x/0.75x resizing, a 2.5%
centre crop, the crop rotated) it hashes the copies and reports recall: the share of copies within the threshold
of their own original (the rotation/flip-invariant distance, min over the 8 dihedral variants). Then false
merges: pairs of distinct originals within the threshold, and the closest distinct pair. Last, chance pairs:
--queries random hashes against --base random hashes (1M by default), found within the threshold with faiss,
per pair compared, beside the binomial expectation. The baseline (64-bit: 8x8 block of a 32x32 thumbnail, 11
bits) is computed here in the same process, by the same sign-bit construction (DctSignHash(32, 8)).

    .venv/bin/python bench/bench_dedup_quality.py                  # ~2 min on 2 cores
    .venv/bin/python bench/bench_dedup_quality.py --base 200000    # quicker chance-pair estimate
"""

from __future__ import annotations

from _common import SHARED_DATA  # first: sys.path and the offline environment

import argparse
import io
import math
import sys
import time

import faiss
import numpy as np
import tifffile
from PIL import Image

from models import perceptual_hash
from tasks.rs3.bigearthnet import rgb_composite
from tests.test_perceptual_hash import COPIES, _jpeg  # the copies the test requires rates of


class DctHash:
    """A sign-bit DCT hash (the module's construction, models/perceptual_hash.DctSignHash) with the
    threshold it is used at, and its distances computed here."""

    def __init__(self, name: str, side: int, block: int, max_distance: int) -> None:
        self.name, self.max_distance = name, max_distance
        self.hash = perceptual_hash.DctSignHash(side, block)
        self.bits = self.hash.bits

    def hashes(self, images: list[bytes]) -> np.ndarray:
        return self.hash.hashes(images)

    def variants(self, hashes: np.ndarray) -> np.ndarray:
        return self.hash.variants(hashes)

    def distances(self, queries: np.ndarray, base: np.ndarray) -> np.ndarray:
        """(len(queries), len(base)) rotation/flip-invariant Hamming distances."""
        variants = np.unpackbits(self.variants(queries), axis=2).astype(np.int32) * 2 - 1
        stored = np.unpackbits(base, axis=1).astype(np.int32) * 2 - 1
        agreements = np.einsum("qvb,nb->qvn", variants, stored)
        return ((self.bits - agreements) // 2).min(axis=1)

    def chance_pairs(self, n_base: int, n_queries: int, seed: int) -> tuple[int, float]:
        """(pairs found among n_queries x n_base random hashes, their binomial expectation)."""
        rng = np.random.default_rng(seed)
        nbytes = self.bits // 8
        base = rng.integers(0, 256, (n_base, nbytes), dtype=np.uint8)
        queries = rng.integers(0, 256, (n_queries, nbytes), dtype=np.uint8)
        base[:, 0] &= 0x7F
        queries[:, 0] &= 0x7F  # bit 0 (DC sign) is always 0 in a real hash
        index = faiss.IndexBinaryFlat(self.bits)
        index.add(base)
        limits, _, ids = index.range_search(self.variants(queries).reshape(-1, nbytes), self.max_distance + 1)
        query_of = np.repeat(np.arange(n_queries * 8) // 8, np.diff(limits.astype(np.int64)))
        found = np.unique(query_of * n_base + ids.astype(np.int64)).size
        informative = self.bits - 1
        within = sum(math.comb(informative, k) for k in range(self.max_distance + 1)) / 2**informative
        return found, 8 * within * n_base * n_queries


def originals() -> dict[str, list[Image.Image]]:
    sets: dict[str, list[Image.Image]] = {
        "RSSCN7": [
            Image.open(p).convert("RGB") for p in sorted((SHARED_DATA / "rsscn7" / "images").glob("*/*.jpg"))
        ],
        "UC Merced": [
            Image.open(p).convert("RGB")
            for p in sorted((SHARED_DATA / "ucm_captions" / "images").rglob("*.tif"))
        ],
    }
    patches = sorted((SHARED_DATA / "rs3_formats" / "bigearthnet").glob("v1/*/*/")) + sorted(
        (SHARED_DATA / "rs3_formats" / "bigearthnet").glob("v2/BigEarthNet-S2/*/*/")
    )
    bigearthnet = []
    for folder in patches:
        bands = [sorted(folder.glob(f"*_{band}*.tif")) for band in ("B04", "B03", "B02")]
        if all(bands):
            rgb = rgb_composite(*(tifffile.imread(paths[0]) for paths in bands))
            bigearthnet.append(Image.open(io.BytesIO(rgb)).convert("RGB"))
    sets["BigEarthNet RGB"] = bigearthnet
    if not any(sets.values()):
        sys.exit(f"bench_dedup_quality: no images under {SHARED_DATA} (needs ../shared/data)")
    return sets


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base", type=int, default=1_000_000, help="random hashes stored for chance pairs")
    parser.add_argument("--queries", type=int, default=2_000, help="random hashes searched against them")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    hashes = [
        DctHash("64-bit (before)", side=32, block=8, max_distance=11),
        DctHash(
            f"{perceptual_hash.HASH_BITS}-bit (now)",
            side=perceptual_hash._SIDE,
            block=perceptual_hash._BLOCK,
            max_distance=perceptual_hash.DEFAULT_MAX_DISTANCE,
        ),
    ]
    sets = originals()
    images = [im for group in sets.values() for im in group]
    print(
        "originals: "
        + ", ".join(f"{name} {len(group)}" for name, group in sets.items())
        + f" = {len(images)}"
    )
    encoded = [_jpeg(im) for im in images]
    copies = {name: [make(im) for im in images] for name, (make, _) in COPIES.items()}
    # the module's own hash must be what this bench measures
    assert np.array_equal(hashes[1].hashes(encoded[:20]), perceptual_hash.dct_hashes(encoded[:20]))

    print("\n| copy | " + " | ".join(f"{h.name} found (<= {h.max_distance})" for h in hashes) + " |")
    print("|---|" + "---|" * len(hashes))
    stored = [h.hashes(encoded) for h in hashes]
    for name, datas in copies.items():
        cells = []
        for h, base in zip(hashes, stored, strict=True):
            copy_hashes = h.hashes(datas)
            own = np.array(
                [h.distances(copy_hashes[i : i + 1], base[i : i + 1])[0, 0] for i in range(len(datas))]
            )
            cells.append(
                f"{np.mean(own <= h.max_distance):.1%} (median {np.median(own):.0f}, max {own.max()})"
            )
        print(f"| {name} | " + " | ".join(cells) + " |")

    print("\n| hash | distinct pairs | within the threshold (false merges) | closest distinct pair |")
    print("|---|---|---|---|")
    for h, base in zip(hashes, stored, strict=True):
        distance = h.distances(base, base).astype(np.int64)
        upper = distance[np.triu_indices(len(base), 1)]
        print(
            f"| {h.name} | {upper.size} | {int((upper <= h.max_distance).sum())} | {upper.min()} of {h.bits - 1} |"
        )

    print(
        f"\nchance pairs: {args.queries} random hashes against {args.base} ({args.queries * args.base:.1e} pairs)"
    )
    print(
        "| hash | found | expected (binomial) | found per pair | expected among 1M images |\n|---|---|---|---|---|"
    )
    for h in hashes:
        start = time.perf_counter()
        found, expected = h.chance_pairs(args.base, args.queries, args.seed)
        pairs = args.base * args.queries
        print(
            f"| {h.name} | {found} | {expected:.3g} | {found / pairs:.2g} | {expected / pairs * 1e12 / 2:.3g} |"
            f"  ({time.perf_counter() - start:.0f} s)"
        )


if __name__ == "__main__":
    main()
