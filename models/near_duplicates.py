"""Embedding near-duplicate detection that scales to millions of samples, and grouping under a keeper.

`embedding_neighbours` finds pairs of L2-normalised embeddings whose inner product is >= a threshold by a
blockwise k-nearest-neighbour search (queries go in blocks of `block_rows`, so memory stays bounded) followed
by the threshold. Backends:

- "flat":  faiss IndexFlatIP, exact. Cost O(N^2 d): fine up to ~50k rows on a few cores.
- "ivf":   faiss IndexIVFScalarQuantizer (8-bit codes of the vectors themselves, not residuals: 1.4x faster
           scans, and exact re-scoring makes up the precision), nlist = 4*sqrt(N) lists trained by spherical
           k-means (KMEANS_ITERATIONS) on a sample of TRAIN_POINTS_PER_LIST * nlist rows, `nprobe` lists
           searched per query (default 8). The coarse assignment of every row is computed once and reused
           for adding and for searching it. Near-duplicates at IP >= 0.95 share a cell or sit in adjacent
           ones: nprobe 8 found >= 0.99 of the exact pairs of planted groups (bench/bench_dedup.py); raise
           it for lower thresholds.
- "torch": blockwise matmul + topk on torch's device (cuda if available, else cpu), exact up to the device's
           precision (float16 on cuda). faiss-gpu cannot be installed on the CUDA 13 GPU machine; this is the
           GPU path. It also runs (slowly) on cpu.
- "auto":  "torch" when cuda is available, else "flat" below FLAT_MAX_ROWS base rows and "ivf" above.

Every candidate is re-scored exactly (float32 dot product of the input rows), so the returned similarities
are exact and approximate backends (SQ8 codes, float16 matmul) only decide which pairs are candidates.

k-NN cap: each query keeps at most `k` neighbours, so a sample with more than k near-duplicates keeps only its
k most similar ones. In a self-join a pair is kept if either side finds it, and grouping only needs each
member linked to its keeper, so groups larger than k+1 still form as long as their members' top-k lists reach
the keeper; a group of thousands of identical images is only partly linked. Raise k (<= MAX_K) if that matters.

`group_by_keeper` turns pairs into groups without chaining, keeping the members that stand for the most others:
the unassigned sample with the most unassigned neighbours (ties: higher priority, then lower index) becomes a
keeper and claims those neighbours, repeatedly. So every dropped sample is directly within the threshold of its
keeper, and no two keepers are linked (a keeper's unassigned neighbours are all claimed when it is chosen):
released samples are pairwise beyond the thresholds, as far as the search found the pairs. In a chain a~b~c
(a !~ c) b keeps both; a crop at the edge of the threshold beside its original and the original's flips loses
to the original, which is close to all of them, whatever their priorities.

`planted_groups` makes synthetic normalised embeddings with planted near-duplicate groups, for tests and
benchmarks.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from pathlib import Path
from typing import Literal

import numpy as np

Backend = Literal["auto", "flat", "ivf", "torch"]

MAX_K = 64
FLAT_MAX_ROWS = 50_000
DEFAULT_NPROBE = 8
TRAIN_POINTS_PER_LIST = 20
KMEANS_ITERATIONS = 8
# Approximate scores (SQ8 codes, float16 matmul) may sit this far below the exact ones; candidates within it
# are re-scored exactly before the threshold is applied.
CANDIDATE_MARGIN = 0.02
RESCORE_CHUNK = 32_768
# Elements of one (query block x base) similarity matrix for the torch backend.
TORCH_BLOCK_ELEMENTS = {"cpu": 1 << 26, "cuda": 1 << 30}

Pairs = tuple[np.ndarray, np.ndarray, np.ndarray]


def embedding_neighbours(
    embeddings: np.ndarray,
    threshold: float,
    *,
    k: int = 32,
    backend: Backend = "auto",
    queries: np.ndarray | None = None,
    block_rows: int = 16_384,
    nprobe: int = DEFAULT_NPROBE,
    seed: int = 0,
) -> Pairs:
    """Pairs (i, j, sim) of rows with inner product >= threshold, sim exact float32.

    Self-join (queries None): i < j index `embeddings`, each pair once. With queries: i indexes `queries`,
    j indexes `embeddings`. Rows must be L2-normalised (float16 or float32). Each query keeps at most k
    neighbours (see the module docstring). `seed` fixes the IVF training sample.
    """
    base = _as_matrix(embeddings, "embeddings")
    query_rows = None if queries is None else _as_matrix(queries, "queries")
    if query_rows is not None and query_rows.shape[1] != base.shape[1]:
        raise ValueError(f"queries have dim {query_rows.shape[1]}, embeddings {base.shape[1]}")
    if not 1 <= k <= MAX_K:
        raise ValueError(f"k must be in 1..{MAX_K}, got {k}")
    if block_rows < 1:
        raise ValueError(f"block_rows must be >= 1, got {block_rows}")
    self_join = query_rows is None
    n_queries = base.shape[0] if self_join else query_rows.shape[0]
    if base.shape[0] == 0 or n_queries == 0:
        return _empty_pairs()
    chosen = _choose_backend(backend, base.shape[0])
    # A self-join finds each row itself; ask for one more neighbour so k others remain.
    k_search = min(k + 1 if self_join else k, base.shape[0])
    floor = threshold - CANDIDATE_MARGIN
    if chosen == "torch":
        blocks = _torch_candidates(base, query_rows, k_search, floor, block_rows)
    elif chosen == "flat":
        blocks = _flat_candidates(base, query_rows, k_search, floor, block_rows)
    else:
        blocks = _ivf_candidates(base, query_rows, k_search, floor, block_rows, nprobe, seed)
    query_source = base if self_join else query_rows
    found = []
    for rows, cols in blocks:
        if self_join:
            other = rows != cols
            rows, cols = np.minimum(rows[other], cols[other]), np.maximum(rows[other], cols[other])
        sims = _exact_scores(query_source, rows, base, cols)
        keep = sims >= threshold
        found.append((rows[keep], cols[keep], sims[keep]))
    if not found:
        return _empty_pairs()
    rows = np.concatenate([f[0] for f in found])
    cols = np.concatenate([f[1] for f in found])
    sims = np.concatenate([f[2] for f in found])
    # Sorted and unique by (i, j): a self-join pair is usually found from both ends.
    key = rows * np.int64(base.shape[0]) + cols
    _, first = np.unique(key, return_index=True)
    return rows[first], cols[first], sims[first]


def group_by_keeper(n: int, pairs: Pairs, priority: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(group_id, keeper) per sample from thresholded pairs; no chaining, no two keepers paired.

    Greedy cover (module docstring): the unassigned sample with the most unassigned neighbours becomes a keeper
    and claims them (ties: higher priority, NaN lowest, then the lower index). keeper[i] is the index kept for
    i's group (keeper[i] == i for keepers and singletons); group_id numbers the groups 0.. in order of their
    keeper's index. `pairs` is (i, j, ...) with any further arrays (scores) ignored; direction, duplicates and
    self-pairs do not matter.
    """
    priority = np.asarray(priority)
    if priority.shape != (n,):
        raise ValueError(f"priority must have shape ({n},), got {priority.shape}")
    rows = np.asarray(pairs[0], dtype=np.int64)
    cols = np.asarray(pairs[1], dtype=np.int64)
    if rows.shape != cols.shape:
        raise ValueError("pair arrays differ in length")
    if rows.size and (min(rows.min(), cols.min()) < 0 or max(rows.max(), cols.max()) >= n):
        raise ValueError(f"pair index out of range 0..{n - 1}")
    keeper = np.arange(n, dtype=np.int64)
    linked = rows != cols
    rows, cols = rows[linked], cols[linked]
    if rows.size:
        key = np.unique(np.minimum(rows, cols) * np.int64(n) + np.maximum(rows, cols))
        _claim_by_cover(n, key // n, key % n, priority, keeper)
    _, group_id = np.unique(keeper, return_inverse=True)
    return group_id.astype(np.int64), keeper


def planted_groups(
    n_groups: int,
    group_size: int,
    n_singletons: int,
    dim: int,
    noise: float,
    seed: int = 0,
    *,
    dtype: type = np.float32,
    chunk_rows: int = 65_536,
) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings (N, dim) L2-normalised, labels (N,)) with planted near-duplicate groups, rows shuffled.

    Each group member is normalise(centre + noise * g / sqrt(dim)) with g standard normal, so its inner product
    with the centre is ~ 1/sqrt(1 + noise^2) and with another member of its group ~ 1/(1 + noise^2) (noise 0.1:
    0.990; noise 0.15: 0.978), spread ~ noise^2 / sqrt(dim). Centres and singletons are independent random
    directions: their inner products are ~ N(0, 1/dim), far below any near-duplicate threshold for dim >= 64.
    labels[i] is the group of row i, -1 for singletons. Generated in chunks, so 1M x 512 float16 needs ~1 GiB.
    """
    rng = np.random.default_rng(seed)
    total = n_groups * group_size + n_singletons
    centres = _normalised(rng.standard_normal((n_groups, dim), dtype=np.float32))
    labels = np.concatenate(
        [np.repeat(np.arange(n_groups, dtype=np.int64), group_size), np.full(n_singletons, -1, np.int64)]
    )
    labels = labels[rng.permutation(total)]
    embeddings = np.empty((total, dim), dtype=dtype)
    for start in range(0, total, chunk_rows):
        chunk = labels[start : start + chunk_rows]
        rows = rng.standard_normal((chunk.size, dim), dtype=np.float32)
        member = chunk >= 0
        rows[member] = centres[chunk[member]] + rows[member] * np.float32(noise / math.sqrt(dim))
        embeddings[start : start + chunk.size] = _normalised(rows)
    return embeddings, labels


def _claim_by_cover(
    n: int, rows: np.ndarray, cols: np.ndarray, priority: np.ndarray, keeper: np.ndarray
) -> None:
    """The greedy cover over samples that have neighbours (unique pairs i < j); fills `keeper` in place."""
    # Rank 0 is the highest priority: lexsort's last key is primary; -priority puts NaN last.
    order = np.lexsort((np.arange(n), -priority.astype(np.float64)))
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)
    # Symmetric CSR adjacency: neighbours of u are neighbour[start[u]:start[u + 1]].
    src = np.concatenate([rows, cols])
    dst = np.concatenate([cols, rows])
    neighbour = dst[np.argsort(src, kind="stable")]
    start = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(src, minlength=n), out=start[1:])
    free_degree = np.diff(start)
    assigned = np.zeros(n, dtype=bool)
    # A max-heap on (free degree, priority) with lazy updates: an entry whose degree went stale is pushed again.
    heap = [(-int(free_degree[u]), int(rank[u]), u) for u in np.flatnonzero(free_degree).tolist()]
    heapq.heapify(heap)
    while heap:
        negative_degree, u_rank, u = heapq.heappop(heap)
        if assigned[u]:
            continue
        if -negative_degree != free_degree[u]:
            heapq.heappush(heap, (-int(free_degree[u]), u_rank, u))
            continue
        near = neighbour[start[u] : start[u + 1]]
        claimed = near[~assigned[near]]
        assigned[u] = True
        assigned[claimed] = True
        keeper[claimed] = u
        # u and its claimed members are no longer free: their neighbours lose them from their free degree.
        newly = np.concatenate([[u], claimed])
        touched = np.concatenate([neighbour[start[v] : start[v + 1]] for v in newly.tolist()])
        np.subtract.at(free_degree, touched, 1)


def _as_matrix(array: np.ndarray, name: str) -> np.ndarray:
    matrix = np.asarray(array)
    if matrix.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n, d), got shape {matrix.shape}")
    if matrix.dtype not in (np.float16, np.float32):
        matrix = matrix.astype(np.float32)
    return matrix


def _normalised(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def _empty_pairs() -> Pairs:
    return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32)


def _choose_backend(backend: Backend, n_base: int) -> str:
    if backend in ("flat", "ivf", "torch"):
        return backend
    if backend != "auto":
        raise ValueError(f"unknown backend {backend!r}")
    if _cuda_available():
        return "torch"
    return "flat" if n_base <= FLAT_MAX_ROWS else "ivf"


def _cuda_available() -> bool:
    # Importing torch costs seconds and ~300 MiB; without an NVIDIA device node cuda cannot be available.
    if not Path("/dev/nvidiactl").exists():
        return False
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def _float32_block(matrix: np.ndarray, begin: int, end: int) -> np.ndarray:
    return np.ascontiguousarray(matrix[begin:end], dtype=np.float32)


def _block_starts(n: int, block_rows: int) -> range:
    return range(0, n, block_rows)


def _candidates_from_knn(
    begin: int, sims: np.ndarray, ids: np.ndarray, floor: float
) -> tuple[np.ndarray, np.ndarray]:
    """(query row, base row) of the k-NN hits whose approximate similarity is >= floor."""
    hit_q, hit_slot = np.nonzero((sims >= floor) & (ids >= 0))
    return hit_q.astype(np.int64) + begin, ids[hit_q, hit_slot].astype(np.int64)


def _flat_candidates(base, query_rows, k_search, floor, block_rows):
    import faiss

    index = faiss.IndexFlatIP(base.shape[1])
    for begin in _block_starts(base.shape[0], block_rows):
        index.add(_float32_block(base, begin, begin + block_rows))
    source = base if query_rows is None else query_rows
    for begin in _block_starts(source.shape[0], block_rows):
        sims, ids = index.search(_float32_block(source, begin, begin + block_rows), k_search)
        yield _candidates_from_knn(begin, sims, ids, floor)


def ivf_list_count(n_base: int) -> int:
    """nlist = 4*sqrt(N), at most N / TRAIN_POINTS_PER_LIST so each list has training points."""
    return max(1, min(round(4 * math.sqrt(n_base)), n_base // TRAIN_POINTS_PER_LIST))


def _ivf_candidates(base, query_rows, k_search, floor, block_rows, nprobe, seed):
    import faiss

    n_base, dim = base.shape
    nlist = ivf_list_count(n_base)
    nprobe = min(nprobe, nlist)
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFScalarQuantizer(
        quantizer, dim, nlist, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT, False
    )
    index.cp.spherical = True
    index.cp.niter = KMEANS_ITERATIONS
    index.cp.min_points_per_centroid = 1
    train_rows = min(n_base, TRAIN_POINTS_PER_LIST * nlist)
    # Sorted sample indices read the (possibly memory-mapped) array front to back.
    sample = np.sort(np.random.default_rng(seed).choice(n_base, size=train_rows, replace=False))
    index.train(np.ascontiguousarray(base[sample], dtype=np.float32))
    index.nprobe = nprobe
    self_join = query_rows is None
    # Self-join: the coarse search of each base row (its nprobe nearest lists) gives both the list it is
    # stored in (the nearest) and the lists it is searched in, so the quantizer runs once per row.
    probes: deque[tuple[np.ndarray, np.ndarray]] = deque()
    for begin in _block_starts(n_base, block_rows):
        block = _float32_block(base, begin, begin + block_rows)
        list_sims, list_ids = quantizer.search(block, nprobe)
        nearest = np.ascontiguousarray(list_ids[:, 0])
        index.add_core(block.shape[0], faiss.swig_ptr(block), None, faiss.swig_ptr(nearest))
        if self_join:
            probes.append((list_sims, list_ids))
    source = base if self_join else query_rows
    for begin in _block_starts(source.shape[0], block_rows):
        block = _float32_block(source, begin, begin + block_rows)
        # popleft frees each block's probes once used.
        list_sims, list_ids = probes.popleft() if self_join else quantizer.search(block, nprobe)
        sims, ids = index.search_preassigned(block, k_search, list_ids, list_sims)
        yield _candidates_from_knn(begin, sims, ids, floor)


def _torch_candidates(base, query_rows, k_search, floor, block_rows):
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    # float16 matmul is fast on cuda and slow on cpu; scores are re-scored exactly afterwards.
    dtype = torch.float16 if device == "cuda" else torch.float32
    base_t = torch.from_numpy(np.ascontiguousarray(base)).to(device=device, dtype=dtype)
    source = base if query_rows is None else query_rows
    rows_per_block = max(1, min(block_rows, TORCH_BLOCK_ELEMENTS[device] // base.shape[0]))
    with torch.inference_mode():
        for begin in _block_starts(source.shape[0], rows_per_block):
            block = torch.from_numpy(np.ascontiguousarray(source[begin : begin + rows_per_block]))
            sims = block.to(device=device, dtype=dtype) @ base_t.T
            top_sims, top_ids = torch.topk(sims, k_search, dim=1)
            hit_q, hit_slot = torch.nonzero(top_sims >= floor, as_tuple=True)
            yield (
                hit_q.cpu().numpy().astype(np.int64) + begin,
                top_ids[hit_q, hit_slot].cpu().numpy().astype(np.int64),
            )


def _exact_scores(queries: np.ndarray, rows: np.ndarray, base: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """float32 inner products queries[rows] . base[cols], in chunks to bound the gathered rows."""
    sims = np.empty(rows.size, dtype=np.float32)
    for begin in range(0, rows.size, RESCORE_CHUNK):
        end = begin + RESCORE_CHUNK
        left = queries[rows[begin:end]].astype(np.float32)
        right = base[cols[begin:end]].astype(np.float32)
        sims[begin:end] = np.einsum("ij,ij->i", left, right)
    return sims
