"""dedup: one decision per sample across ALL shards: keep one sample of each group of duplicates.

Three methods, each optional (DedupConfig):
- exact: the same `url` (already normalised by ingest: scheme and host lower-cased, default port and fragment
  dropped) or the same `sha256` of the original bytes;
- perceptual: the `phash` column (256-bit rotation/flip-invariant DCT hash, models/perceptual_hash.py) within
  `perceptual_max_distance` bits, optionally confirmed by the image embeddings' cosine
  (`perceptual_min_similarity`: with real CLIP weights, a check against two distinct scenes of uniform texture
  whose hashes happen to be close);
- embedding: image embeddings (the upstream's "image" array) with inner product >= `embedding_min_similarity`
  (models/near_duplicates.py, `embedding_backend`, `embedding_k` neighbours per sample).

Grouping. Exact copies are collapsed first: rows sharing a url or a sha256 form one exact group (transitively:
same url as b, b same bytes as c puts all three together), represented by its member with the highest
clip_score. The perceptual and embedding searches then run over those representatives only, so a placeholder
image served a million times costs one row, not a million mutual pairs. Their pairs are grouped by
models.near_duplicates.group_by_keeper, a greedy cover: the representative linked to the most others keeps
them (ties: higher clip_score, then the lower global index, counting through the shards in sorted order and
their rows in order), and so on. Every dropped representative is DIRECTLY within a threshold of its keeper
(no chaining), and no two kept representatives are linked: no two released files are within the thresholds
of each other, for every pair the searches found (all of them with the exact backends; the approximate ones
may miss a few, models/perceptual_hash.py). The members of an exact group follow their representative. A
near-duplicate link is measured between representatives (for byte-identical copies that is the same as
measuring the copy itself).

Recorded per sample: `group_id` = the keeper's sample_id for every member of a group of two or more
(the keeper included, as a column on the kept rows too), null for samples without duplicates;
`kept_sample_id` = the keeper, for dropped samples. The reason is the strongest method that links the sample
to its keeper: exact > perceptual > embedding. Scores: {"hamming": bits, "cosine": inner product} between
the sample's and the keeper's representatives, whichever of the two linked them.

Cost of a new shard: the stage is global (one marker over every upstream shard's checksum), so any new or
changed filter shard reruns the whole stage: every shard table and embedding array is read again and the
exact grouping and both searches rerun over all samples. Hashes and embeddings themselves are not recomputed
(they are columns / arrays of the upstream stages); the searches dominate (the perceptual self-join is exact
brute force, ~51 s per 100k representatives on 2 cores; the embedding search is blockwise k-NN, see
models/near_duplicates.py). Every shard's ledger is rewritten, since a new sample may outrank an old keeper.
"""

from __future__ import annotations

import functools

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from models.near_duplicates import Pairs, embedding_neighbours, group_by_keeper
from models.perceptual_hash import HASH_BYTES, hash_neighbours
from rs5m.config import DedupConfig, PipelineConfig
from storage.schemas import DEDUP_SCHEMA
from tasks.harness import GlobalStage, Report
from tasks.stage import ShardOutcome, decisions

REASONS = {
    "duplicate_exact": "same url or same sha256 as the kept sample, or linked to it through copies that are",
    "duplicate_perceptual": "rotation/flip-invariant DCT hash within perceptual_max_distance bits of the kept sample",
    "duplicate_embedding": "image embedding cosine >= embedding_min_similarity with the kept sample",
}

# Arrays read from the filter stage and passed on for the kept rows.
ARRAYS = ("image", "text")


def phash_matrix(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """A binary(8) `phash` column as ((n, 8) uint8 hashes, (n,) bool valid); null rows hold zeros."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    valid = np.asarray(array.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
    filled = array.fill_null(bytes(HASH_BYTES)).cast(pa.binary(HASH_BYTES))
    if len(filled) == 0:
        return np.zeros((0, HASH_BYTES), np.uint8), valid
    data = np.frombuffer(filled.buffers()[1], dtype=np.uint8)
    start = filled.offset * HASH_BYTES
    hashes = data[start : start + len(filled) * HASH_BYTES].reshape(-1, HASH_BYTES)
    return hashes.copy(), valid


def exact_components(keys: list[np.ndarray]) -> np.ndarray:
    """Label of each row such that rows sharing any key (int codes, -1 = no key) get the same label: the
    smallest row index of their connected component."""
    n = len(keys[0]) if keys else 0
    left, right = [], []
    for codes in keys:
        rows = np.flatnonzero(codes >= 0)
        # every row of a code is linked to the code's first row: a star, linear in the rows
        _, first, inverse = np.unique(codes[rows], return_index=True, return_inverse=True)
        left.append(rows)
        right.append(rows[first][inverse])
    a = np.concatenate(left) if left else np.zeros(0, np.int64)
    b = np.concatenate(right) if right else np.zeros(0, np.int64)
    label = np.arange(n, dtype=np.int64)
    # Hooking and pointer jumping: label[x] <= x always, so the label chains end and the loop terminates.
    while True:
        la, lb = label[a], label[b]
        differ = la != lb
        if not differ.any():
            return label
        low = np.minimum(la[differ], lb[differ])
        np.minimum.at(label, la[differ], low)
        np.minimum.at(label, lb[differ], low)
        while True:
            jumped = label[label]
            if np.array_equal(jumped, label):
                break
            label = jumped


def _codes(values: pa.ChunkedArray) -> np.ndarray:
    """Integer code per distinct non-empty string, -1 for null or empty."""
    values = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
    present = pc.and_(pc.is_valid(values), pc.not_equal(values, ""))
    encoded = pc.if_else(present, values, pa.scalar(None, pa.string())).dictionary_encode()
    return np.asarray(encoded.indices.fill_null(-1).to_numpy(zero_copy_only=False), dtype=np.int64)


def _pair_values(pairs: Pairs, n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The pair value (distance, similarity) recorded for each unordered pair (a[i], b[i]), NaN if absent."""
    i, j, values = pairs
    keys = np.minimum(i, j) * np.int64(n) + np.maximum(i, j)
    order = np.argsort(keys, kind="stable")
    keys, values = keys[order], np.asarray(values, np.float64)[order]
    wanted = np.minimum(a, b) * np.int64(n) + np.maximum(a, b)
    position = np.minimum(np.searchsorted(keys, wanted), max(len(keys) - 1, 0))
    result = np.full(len(wanted), np.nan)
    if len(keys):
        found = keys[position] == wanted
        result[found] = values[position[found]]
    return result


def _empty_pairs() -> Pairs:
    return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)


def dedup_shards(
    tables: dict[str, pa.Table], arrays: dict[str, dict[str, np.ndarray]], config: DedupConfig
) -> dict[str, ShardOutcome]:
    """Decide every row of every shard (each with sample_id, url, sha256, phash and clip_score: FILTER_SCHEMA,
    or RS3's rows); survivors keep their columns and gain group_id (DEDUP_SCHEMA), with their arrays."""
    shards = sorted(tables)
    sizes = [tables[shard].num_rows for shard in shards]
    bounds = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    n = int(bounds[-1])
    if n == 0:
        return {shard: _outcome(tables[shard], arrays.get(shard, {}), [], [], [], [], []) for shard in shards}
    whole = pa.concat_tables(
        [tables[shard].select(["sample_id", "url", "sha256", "phash", "clip_score"]) for shard in shards]
    )
    sample_ids = np.asarray(whole.column("sample_id").to_pylist(), dtype=object)
    priority = whole.column("clip_score").to_numpy(zero_copy_only=False).astype(np.float64)  # null -> NaN

    # exact groups, each represented by its highest-priority member (ties: the lower index)
    urls, shas = _codes(whole.column("url")), _codes(whole.column("sha256"))
    component = exact_components([urls, shas]) if config.exact else np.arange(n, dtype=np.int64)
    by_rank = np.lexsort((np.arange(n), -priority, component))  # NaN sorts last within each component
    is_first = np.ones(n, dtype=bool)
    is_first[1:] = component[by_rank][1:] != component[by_rank][:-1]
    representatives = by_rank[is_first]
    representatives.sort()  # node order = global order of the representatives: group_by_keeper's tie-break
    node_of_component = np.empty(n, dtype=np.int64)
    node_of_component[component[representatives]] = np.arange(len(representatives))
    node = node_of_component[component]
    n_nodes = len(representatives)

    rows = None
    if config.embedding_min_similarity is not None or config.perceptual_min_similarity is not None:
        # only the representatives' rows are read (the arrays are memory-mapped .npy files)
        shard_of = np.searchsorted(bounds, representatives, side="right") - 1
        rows = np.concatenate(
            [
                np.asarray(arrays[shard]["image"][representatives[shard_of == index] - bounds[index]])
                for index, shard in enumerate(shards)
            ]
        )
    perceptual = _empty_pairs()
    if config.perceptual_max_distance is not None:
        hashes, valid = phash_matrix(whole.column("phash"))
        hashed = representatives[valid[representatives]]
        nodes_hashed = node[hashed]
        i, j, distance = hash_neighbours(hashes[hashed], config.perceptual_max_distance)
        perceptual = (nodes_hashed[i], nodes_hashed[j], distance)
        if config.perceptual_min_similarity is not None:
            perceptual = _confirmed(perceptual, rows, config.perceptual_min_similarity)
    embedding = _empty_pairs()
    if config.embedding_min_similarity is not None:
        embedding = embedding_neighbours(
            rows,
            config.embedding_min_similarity,
            k=config.embedding_k,
            backend=config.embedding_backend,
        )
    links = (np.concatenate([perceptual[0], embedding[0]]), np.concatenate([perceptual[1], embedding[1]]))
    _, keeper_node = group_by_keeper(n_nodes, links, priority[representatives])

    keeper = representatives[keeper_node[node]]
    group_size = np.bincount(keeper, minlength=n)
    dropped = np.flatnonzero(keeper != np.arange(n))
    hamming = _pair_values(perceptual, n_nodes, node[dropped], keeper_node[node[dropped]])
    cosine = _pair_values(embedding, n_nodes, node[dropped], keeper_node[node[dropped]])
    url_values = whole.column("url").to_pylist()
    sha_values = whole.column("sha256").to_pylist()

    reasons: list[str | None] = [None] * n
    details: list[str | None] = [None] * n
    scores: list[dict[str, float] | None] = [None] * n
    for row, bits, similarity in zip(dropped.tolist(), hamming.tolist(), cosine.tolist(), strict=True):
        kept_id = sample_ids[keeper[row]]
        measured = {}
        if not np.isnan(bits):
            measured["hamming"] = bits
        if not np.isnan(similarity):
            measured["cosine"] = similarity
        scores[row] = measured or None
        if node[row] == node[keeper[row]]:
            reasons[row] = "duplicate_exact"
            details[row] = _exact_detail(row, int(keeper[row]), url_values, sha_values, kept_id)
        elif "hamming" in measured:
            reasons[row], details[row] = "duplicate_perceptual", f"hamming {int(bits)} to {kept_id}"
        else:
            reasons[row], details[row] = "duplicate_embedding", f"cosine {similarity:.3f} to {kept_id}"
    group_ids = [sample_ids[k] if group_size[k] > 1 else None for k in keeper.tolist()]
    kept_ids = [
        sample_ids[k] if reason is not None else None
        for k, reason in zip(keeper.tolist(), reasons, strict=True)
    ]

    outcomes = {}
    for index, shard in enumerate(shards):
        part = slice(int(bounds[index]), int(bounds[index + 1]))
        outcomes[shard] = _outcome(
            tables[shard],
            arrays.get(shard, {}),
            reasons[part],
            details[part],
            scores[part],
            group_ids[part],
            kept_ids[part],
        )
    return outcomes


def _confirmed(pairs: Pairs, rows: np.ndarray, min_similarity: float) -> Pairs:
    """The pairs whose nodes' embeddings (rows, L2-normalised) have a cosine >= min_similarity."""
    i, j, distance = pairs
    cosine = np.einsum("ij,ij->i", rows[i].astype(np.float32), rows[j].astype(np.float32))
    confirmed = cosine >= min_similarity
    return i[confirmed], j[confirmed], distance[confirmed]


def _exact_detail(row: int, kept: int, urls: list[str], shas: list[str | None], kept_id: str) -> str:
    same = [
        name
        for name, values in (("url", urls), ("sha256", shas))
        if values[row] and values[row] == values[kept]
    ]
    if same:
        return f"same {' and '.join(same)} as {kept_id}"
    return f"same url or sha256 as another copy of {kept_id}"


def _outcome(
    table: pa.Table,
    arrays: dict[str, np.ndarray],
    reasons: list[str | None],
    details: list[str | None],
    scores: list[dict[str, float] | None],
    group_ids: list[str | None],
    kept_ids: list[str | None],
) -> ShardOutcome:
    keep = np.array([reason is None for reason in reasons], dtype=bool)
    kept = table.filter(pa.array(keep, pa.bool_())).append_column(
        "group_id", pa.array([g for g, k in zip(group_ids, keep, strict=True) if k], pa.string())
    )
    return ShardOutcome(
        kept=kept,
        decisions=decisions(
            table.column("sample_id"),
            table.column("source"),
            reasons,
            details,
            scores=scores,
            group_ids=group_ids,
            kept_sample_ids=kept_ids,
        ),
        arrays={name: np.asarray(arrays[name])[keep] for name in ARRAYS if name in arrays},
    )


def _release_inputs(config: PipelineConfig) -> tuple[str, ...]:
    # what the release reads is part of the pipelines' definition (tasks/pipeline.py), which imports this
    from tasks.pipeline import release_inputs

    return release_inputs(config)


DEDUP = GlobalStage(
    name="dedup",
    reasons=REASONS,
    sections=("dedup",),
    code_version="2",
    report=Report("duplicates removed", "dropped"),
    inputs=_release_inputs,
    adds=(DEDUP_SCHEMA.field("group_id"),),
    make_processor=lambda config: functools.partial(dedup_shards, config=config.dedup),
    upstream_arrays=ARRAYS,
)
