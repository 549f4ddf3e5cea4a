"""Wall time and peak memory of embedding near-duplicate detection + grouping on planted groups.

For each size in --sizes, a child process generates planted near-duplicate groups (float16 storage,
--dup-fraction of the rows in groups of --group-size, member-to-member inner product ~0.98), then times
embedding_neighbours (--backend, default auto: flat up to 50k rows, IVF-SQ8 above, torch on cuda) and
group_by_keeper with random priorities, and reports ru_maxrss (the child's peak resident memory) before and
after. Pair recall is measured against every within-group pair at or above the threshold (computed
exactly per group) and, up to --recall-max rows, against an exact faiss IndexFlatIP range search (not capped
at k) from --recall-queries random query rows. Last, time and memory are extrapolated to 5M rows: IVF cost
grows as N^1.5 with nlist = 4 sqrt(N); memory is the float16 input plus the 8-bit codes, ids and probe lists
the IVF search holds (n * (3 * dim + 8 + 12 * nprobe) bytes) on top of the largest run's fixed overhead.

For each size in --perceptual-sizes, another child process times the perceptual-hash self-join
(hash_neighbours at DEFAULT_MAX_DISTANCE, --perceptual-backend) on uniformly random 256-bit DCT hashes (bit 0
cleared, as a real hash's DC bit always is), of which --copy-fraction of the rows are planted copies of distinct
other rows: a random rotation/flip of the source's hash (dihedral_variants) with 0..--max-flips random bit
flips, so every planted pair is within the threshold. It reports planted-pair recall, recall of every exact
pair of --perceptual-recall-queries sampled rows (numpy brute force over all 8 variants), and the pairs that are
not planted: matches between independent random hashes, to compare with their binomial expectation. Time is
extrapolated to 5M as N^2 for "flat" (IndexBinaryFlat) and N^1.5 for "ivf"; pairs between unrelated hashes grow
as N^2 whatever the backend; memory grows with N (the join's increment over the child's RSS after generating
the hashes and a 1000-row warm-up join, per row) plus ~BYTES_PER_PAIR per found pair.

    .venv/bin/python bench/bench_dedup.py --sizes 10000 100000 1000000 --dim 512 --perceptual-sizes 100000
"""

from __future__ import annotations

import _common  # noqa: F401 - the repository on sys.path, the offline environment

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from collections.abc import Iterator

import numpy as np

from models.near_duplicates import embedding_neighbours, group_by_keeper, planted_groups
from models.perceptual_hash import (
    DEFAULT_MAX_DISTANCE,
    FLAT_MAX_ROWS,
    HASH_BITS,
    HASH_BYTES,
    dihedral_variants,
    hash_neighbours,
)

TARGET_ROWS = 5_000_000
# hash_neighbours' peak per found pair: ~2 raw range-search matches (one from each end) held as int64 ids and
# distances, the (i, j) keys, their unique copy and the 8 variants gathered to recompute the distance.
BYTES_PER_PAIR = 150
# How search time grows with the number of hashes, per backend.
PERCEPTUAL_TIME_EXPONENT = {"flat": 2.0, "ivf": 1.5}


def peak_rss_mib() -> float:
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def exact_recall(embeddings: np.ndarray, pairs, threshold: float, n_queries: int, seed: int) -> dict:
    """Share of exact pairs (from a range search of sampled query rows) that embedding_neighbours found."""
    import faiss

    n = embeddings.shape[0]
    queries = np.sort(np.random.default_rng(seed).choice(n, size=min(n, n_queries), replace=False))
    index = faiss.IndexFlatIP(embeddings.shape[1])
    for begin in range(0, n, 65_536):
        index.add(embeddings[begin : begin + 65_536].astype(np.float32))
    limits, _, ids = index.range_search(embeddings[queries].astype(np.float32), threshold)
    truth_q = np.repeat(queries, np.diff(limits.astype(np.int64)))
    other = truth_q != ids
    # Both ends of a pair may be sampled queries: count each pair once.
    low, high = np.minimum(truth_q, ids)[other], np.maximum(truth_q, ids)[other]
    truth = set(zip(low.tolist(), high.tolist(), strict=True))
    found = set(zip(pairs[0].tolist(), pairs[1].tolist(), strict=True))
    return {
        "recall_queries": int(queries.size),
        "exact_pairs": len(truth),
        "recall": len(truth & found) / max(1, len(truth)),
    }


def planted_recall(
    embeddings: np.ndarray, labels: np.ndarray, pairs, threshold: float, group_size: int
) -> dict:
    """Share of the within-group pairs >= threshold (exact, every group) that embedding_neighbours found.

    Distinct groups and singletons are random directions (IP ~ N(0, 1/dim)), so these are all the exact
    pairs; the IndexFlatIP recall above checks that assumption on a sample.
    """
    n = embeddings.shape[0]
    members = np.flatnonzero(labels >= 0)
    members = members[np.argsort(labels[members], kind="stable")].reshape(-1, group_size)
    upper_i, upper_j = np.triu_indices(group_size, 1)
    truth = []
    for begin in range(0, len(members), 8192):
        groups = members[begin : begin + 8192]
        vectors = embeddings[groups].astype(np.float32)
        sims = np.einsum("gid,gjd->gij", vectors, vectors)[:, upper_i, upper_j]
        left, right = groups[:, upper_i][sims >= threshold], groups[:, upper_j][sims >= threshold]
        truth.append(np.minimum(left, right) * n + np.maximum(left, right))
    truth_keys = np.concatenate(truth)
    found_keys = pairs[0] * n + pairs[1]
    return {
        "planted_exact_pairs": int(truth_keys.size),
        "planted_recall": float(np.isin(truth_keys, found_keys).mean()),
    }


def run_child(args: argparse.Namespace, n: int) -> dict:
    n_dup = int(n * args.dup_fraction) // args.group_size * args.group_size
    start = time.perf_counter()
    embeddings, labels = planted_groups(
        n_dup // args.group_size,
        args.group_size,
        n - n_dup,
        args.dim,
        args.noise,
        seed=args.seed,
        dtype=np.float16,
    )
    result = {"n": n, "dim": args.dim, "generate_s": time.perf_counter() - start}
    result["embeddings_mib"] = embeddings.nbytes / 2**20
    result["rss_after_generate_mib"] = peak_rss_mib()

    start = time.perf_counter()
    pairs = embedding_neighbours(
        embeddings, args.threshold, k=args.k, backend=args.backend, nprobe=args.nprobe
    )
    result["neighbours_s"] = time.perf_counter() - start
    priority = np.random.default_rng(args.seed + 1).random(n)
    start = time.perf_counter()
    group_id, keeper = group_by_keeper(n, pairs, priority)
    result["group_s"] = time.perf_counter() - start
    result["peak_rss_mib"] = peak_rss_mib()

    result["pairs"] = int(pairs[0].size)
    same_group = (labels[pairs[0]] == labels[pairs[1]]) & (labels[pairs[0]] >= 0)
    result["pairs_across_planted_groups"] = int((~same_group).sum())
    result["groups"] = int(group_id.max()) + 1
    result["planted_groups_plus_singletons"] = int(n_dup // args.group_size + n - n_dup)
    result["removed"] = int((keeper != np.arange(n)).sum())
    result.update(planted_recall(embeddings, labels, pairs, args.threshold, args.group_size))
    if n <= args.recall_max:
        result.update(exact_recall(embeddings, pairs, args.threshold, args.recall_queries, args.seed))
    return result


def planted_hash_copies(
    n: int, copy_fraction: float, max_flips: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """n random hashes, copy_fraction of them planted copies of distinct others; returns (hashes, pair keys).

    A copy is a random dihedral variant of its source with 0..max_flips of bits 1-255 flipped. Rows are shuffled;
    pair keys are min(i, j) * n + max(i, j) of each (source, copy) pair.
    """
    rng = np.random.default_rng(seed)
    n_copies = int(n * copy_fraction)
    n_sources = n - n_copies
    originals = rng.integers(0, 256, size=(n_sources, HASH_BYTES), dtype=np.uint8)
    originals[:, 0] &= 0x7F  # bit 0 (the DC coefficient's sign) is always 0 in a real hash
    sources = rng.choice(n_sources, size=n_copies, replace=False)
    turned = dihedral_variants(originals[sources])[np.arange(n_copies), rng.integers(0, 8, n_copies)]
    # The first `flips` of a random ordering of bits 1..255, per copy.
    flips = rng.integers(0, max_flips + 1, size=n_copies)
    rank = np.argsort(rng.random((n_copies, HASH_BITS - 1)), axis=1)
    flip_bits = np.zeros((n_copies, HASH_BITS), dtype=bool)
    flip_bits[:, 1:] = rank < flips[:, None]
    copies = turned ^ np.packbits(flip_bits, axis=1)

    order = rng.permutation(n)
    position = np.empty(n, dtype=np.int64)
    position[order] = np.arange(n)
    hashes = np.concatenate([originals, copies])[order]
    source_at, copy_at = position[sources], position[n_sources + np.arange(n_copies)]
    keys = np.minimum(source_at, copy_at) * n + np.maximum(source_at, copy_at)
    return hashes, keys


def random_pair_probability(max_distance: int) -> float:
    """Chance that a random hash is within max_distance of a given one under some rotation/flip: 8 variants,
    each a Binomial(255, 1/2) distance on the 255 informative bits (union bound; the variants are far apart)."""
    within = sum(math.comb(HASH_BITS - 1, k) for k in range(max_distance + 1)) / 2 ** (HASH_BITS - 1)
    return 8 * within


def exact_hash_pair_keys(hashes: np.ndarray, rows: np.ndarray, max_distance: int) -> np.ndarray:
    """Keys min(i, j) * n + max(i, j) of every pair within max_distance (over the 8 variants) with i in rows."""
    n = len(hashes)
    stored = hashes.view(np.uint64)  # (n, 4 words)
    variants = dihedral_variants(hashes[rows]).view(np.uint64)  # (rows, 8, 4)
    keys = []
    for row, row_variants in zip(rows.tolist(), variants, strict=True):
        distance = np.bitwise_count(row_variants[:, None] ^ stored[None, :]).sum(axis=2).min(axis=0)
        near = np.flatnonzero(distance <= max_distance)
        near = near[near != row]
        keys.append(np.minimum(near, row) * n + np.maximum(near, row))
    return np.unique(np.concatenate(keys))


def run_perceptual_child(args: argparse.Namespace, n: int) -> dict:
    backend = args.perceptual_backend
    if backend == "auto":
        backend = "flat" if n <= FLAT_MAX_ROWS else "ivf"
    result = {"n": n, "max_distance": DEFAULT_MAX_DISTANCE, "backend": backend}
    hashes, planted = planted_hash_copies(n, args.copy_fraction, args.max_flips, args.seed)
    # A small join first, so the fixed allocations (faiss, OpenMP threads) are in the baseline, not per row.
    hash_neighbours(hashes[:1000], DEFAULT_MAX_DISTANCE, backend=backend)
    result["rss_before_mib"] = peak_rss_mib()

    start = time.perf_counter()
    left, right, _ = hash_neighbours(hashes, DEFAULT_MAX_DISTANCE, backend=backend)
    result["neighbours_s"] = time.perf_counter() - start
    result["peak_rss_mib"] = peak_rss_mib()

    found = left * n + right
    result["pairs"] = int(found.size)
    result["planted_pairs"] = int(planted.size)
    result["planted_recall"] = float(np.isin(planted, found).mean()) if planted.size else 1.0
    result["pairs_not_planted"] = int((~np.isin(found, planted)).sum())
    result["expected_random_pairs"] = n * (n - 1) / 2 * random_pair_probability(DEFAULT_MAX_DISTANCE)

    rng = np.random.default_rng(args.seed + 1)
    rows = np.sort(rng.choice(n, size=min(n, args.perceptual_recall_queries), replace=False))
    truth = exact_hash_pair_keys(hashes, rows, DEFAULT_MAX_DISTANCE)
    result["recall_queries"] = int(rows.size)
    result["exact_pairs"] = int(truth.size)
    result["exact_recall"] = float(np.isin(truth, found).mean()) if truth.size else 1.0
    sampled = np.isin(left, rows) | np.isin(right, rows)
    result["pairs_beyond_exact"] = int((~np.isin(found[sampled], truth)).sum())
    return result


def report_perceptual(results: list[dict]) -> None:
    for result in results:
        print(
            f"perceptual n={result['n']:>9,} {result['backend']}  hash_neighbours(<= {result['max_distance']} bits) "
            f"{result['neighbours_s']:8.1f} s  peak RSS {result['peak_rss_mib']:6.0f} MiB (before the join "
            f"{result['rss_before_mib']:.0f})  "
            f"pairs {result['pairs']:,}  planted-pair recall {result['planted_recall']:.4f} of "
            f"{result['planted_pairs']:,}  not planted {result['pairs_not_planted']:,} "
            f"(binomial expectation for random hashes ~{result['expected_random_pairs']:,.0f})  exact-pair "
            f"recall {result['exact_recall']:.4f} of {result['exact_pairs']:,} (pairs of "
            f"{result['recall_queries']:,} sampled rows; found beyond them: {result['pairs_beyond_exact']})",
            flush=True,
        )
    largest = max(results, key=lambda r: r["n"])
    scale = TARGET_ROWS / largest["n"]
    per_row_mib = (largest["peak_rss_mib"] - largest["rss_before_mib"]) / largest["n"]
    random_pairs = largest["pairs_not_planted"] * scale**2
    memory_mib = largest["rss_before_mib"] + per_row_mib * TARGET_ROWS + random_pairs * BYTES_PER_PAIR / 2**20
    exponent = PERCEPTUAL_TIME_EXPONENT[largest["backend"]]
    expected_pairs = TARGET_ROWS * (TARGET_ROWS - 1) / 2 * random_pair_probability(largest["max_distance"])
    print(
        f"perceptual extrapolated to {TARGET_ROWS:,} rows from n={largest['n']:,} ({largest['backend']}, time ~ "
        f"N^{exponent:g}): ~{largest['neighbours_s'] * scale**exponent / 3600:.1f} h on this machine's cores, "
        f"~{random_pairs:,.0f} pairs between unrelated random hashes found (N^2; binomial expectation "
        f"{expected_pairs:,.0f}), peak RSS ~{memory_mib / 1024:.1f} GiB"
    )


def without_options(argv: list[str], options: tuple[str, ...]) -> list[str]:
    """argv minus each named option and the values that follow it."""
    kept: list[str] = []
    skipping = False
    for arg in argv:
        if arg.startswith("--"):
            skipping = arg in options
        if not skipping:
            kept.append(arg)
    return kept


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="*", default=[10_000, 100_000])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--threshold", type=float, default=0.95)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--backend", default="auto", choices=["auto", "flat", "ivf", "torch"])
    parser.add_argument("--nprobe", type=int, default=8)
    parser.add_argument("--dup-fraction", type=float, default=0.2)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--noise", type=float, default=0.15, help="member-to-member IP ~ 1/(1 + noise^2)")
    parser.add_argument("--recall-max", type=int, default=100_000, help="measure recall up to this many rows")
    parser.add_argument("--recall-queries", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--perceptual-sizes",
        type=int,
        nargs="*",
        default=[100_000],
        help="perceptual-hash self-join sizes (none: skip)",
    )
    parser.add_argument("--perceptual-backend", default="auto", choices=["auto", "flat", "ivf"])
    parser.add_argument(
        "--perceptual-recall-queries",
        type=int,
        default=2000,
        help="perceptual: rows whose exact pairs are brute-forced for recall",
    )
    parser.add_argument(
        "--copy-fraction", type=float, default=0.01, help="perceptual: share of rows planted as copies"
    )
    parser.add_argument(
        "--max-flips", type=int, default=24, help="perceptual: a copy has 0..this many bits flipped"
    )
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--perceptual-child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child is not None:
        print(json.dumps(run_child(args, args.child)))
        return
    if args.perceptual_child is not None:
        print(json.dumps(run_perceptual_child(args, args.perceptual_child)))
        return

    passthrough = without_options(sys.argv[1:], ("--sizes", "--perceptual-sizes"))
    results = []
    for n, result in run_children("--child", args.sizes, passthrough):
        results.append(result)
        recall = f"planted-pair recall {result['planted_recall']:.4f} of {result['planted_exact_pairs']:,}"
        if "recall" in result:
            recall += f", flat recall {result['recall']:.4f} of {result['exact_pairs']:,} (sampled queries)"
        print(
            f"n={n:>9,} d={result['dim']}  neighbours {result['neighbours_s']:8.1f} s  group {result['group_s']:6.2f} s  "
            f"peak RSS {result['peak_rss_mib']:8.0f} MiB (after generating {result['rss_after_generate_mib']:.0f}, "
            f"embeddings {result['embeddings_mib']:.0f})  pairs {result['pairs']:,} "
            f"cross-group {result['pairs_across_planted_groups']}  groups {result['groups']:,}/"
            f"{result['planted_groups_plus_singletons']:,}  {recall}",
            flush=True,
        )
    if results:
        report_embedding_extrapolation(results, args)
    perceptual_results = [
        result for _, result in run_children("--perceptual-child", args.perceptual_sizes, passthrough)
    ]
    if perceptual_results:
        report_perceptual(perceptual_results)


def run_children(flag: str, sizes: list[int], passthrough: list[str]) -> Iterator[tuple[int, dict]]:
    """Run this script once per size with `flag SIZE` (each in its own process: ru_maxrss is the child's own
    peak) and yield (size, its JSON result); a failed child is reported and skipped."""
    for n in sizes:
        child = subprocess.run(
            [sys.executable, __file__, *passthrough, flag, str(n)],
            capture_output=True,
            text=True,
            check=False,
        )
        if child.returncode != 0:
            print(f"{flag} {n}: child failed ({child.returncode}):\n{child.stderr[-3000:]}", flush=True)
            continue
        yield n, json.loads(child.stdout.strip().splitlines()[-1])


def report_embedding_extrapolation(results: list[dict], args: argparse.Namespace) -> None:
    largest = max(results, key=lambda r: r["n"])
    scale = TARGET_ROWS / largest["n"]
    seconds = (largest["neighbours_s"] + largest["group_s"]) * scale**1.5
    per_row_mib = (3 * args.dim + 8 + 12 * args.nprobe) / 2**20
    fixed_mib = largest["peak_rss_mib"] - largest["n"] * per_row_mib
    memory_mib = fixed_mib + TARGET_ROWS * per_row_mib
    print(
        f"extrapolated to {TARGET_ROWS:,} rows from n={largest['n']:,}: ~{seconds / 60:.0f} min on this "
        f"machine's cores (time ~ N^1.5), peak RSS ~{memory_mib / 1024:.1f} GiB "
        f"(float16 embeddings alone: {TARGET_ROWS * args.dim * 2 / 2**30:.1f} GiB)"
    )


if __name__ == "__main__":
    main()
