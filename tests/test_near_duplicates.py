"""Embedding near-duplicate pairs (flat, IVF, torch backends) and keeper grouping without chaining."""

from __future__ import annotations

import numpy as np
import pytest

from models.near_duplicates import MAX_K, embedding_neighbours, group_by_keeper, planted_groups

THRESHOLD = 0.95
# Float32 sums in different orders differ by ~1e-7; pairs this close to the threshold may go either way.
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def planted() -> tuple[np.ndarray, np.ndarray]:
    # 600 groups of 4 (member-to-member IP ~0.99) + 2400 singletons, d=128, float16 like the pipeline stores.
    return planted_groups(600, 4, 2400, 128, 0.1, seed=3, dtype=np.float16)


def brute_force(queries: np.ndarray, base: np.ndarray, *, self_join: bool) -> np.ndarray:
    sims = queries.astype(np.float32) @ base.astype(np.float32).T
    if self_join:
        sims = np.triu(sims, k=1)
    return sims


def pair_set(rows: np.ndarray, cols: np.ndarray) -> set[tuple[int, int]]:
    return set(zip(rows.tolist(), cols.tolist(), strict=True))


def check_against_brute_force(pairs, sims: np.ndarray, min_recall: float) -> None:
    rows, cols, scores = pairs
    must_find = pair_set(*np.nonzero(sims >= THRESHOLD + TOLERANCE))
    assert must_find, "the data must contain near-duplicate pairs"
    found = pair_set(rows, cols)
    recall = len(must_find & found) / len(must_find)
    assert recall >= min_recall, f"pair recall {recall:.4f}"
    # Every returned pair is a true one, with its exact score.
    assert np.all(sims[rows, cols] >= THRESHOLD - TOLERANCE)
    np.testing.assert_allclose(scores, sims[rows, cols], atol=TOLERANCE)


@pytest.mark.parametrize(("backend", "min_recall"), [("flat", 1.0), ("torch", 1.0), ("ivf", 0.99)])
def test_self_join_matches_brute_force(planted, backend: str, min_recall: float) -> None:
    embeddings, labels = planted
    pairs = embedding_neighbours(embeddings, THRESHOLD, backend=backend, block_rows=1000)
    rows, cols, _ = pairs
    assert np.all(rows < cols)
    assert len(pair_set(rows, cols)) == rows.size
    check_against_brute_force(pairs, brute_force(embeddings, embeddings, self_join=True), min_recall)
    # Near-duplicates only ever link members of one planted group.
    assert np.all(labels[rows] >= 0)
    assert np.all(labels[rows] == labels[cols])


def test_backends_agree(planted) -> None:
    embeddings, _ = planted
    flat = pair_set(*embedding_neighbours(embeddings, THRESHOLD, backend="flat")[:2])
    torch_pairs = pair_set(*embedding_neighbours(embeddings, THRESHOLD, backend="torch")[:2])
    ivf = pair_set(*embedding_neighbours(embeddings, THRESHOLD, backend="ivf")[:2])
    assert torch_pairs == flat
    assert ivf <= flat
    assert len(ivf) >= 0.99 * len(flat)


@pytest.mark.parametrize("backend", ["flat", "ivf", "torch"])
def test_queries_mode(planted, backend: str) -> None:
    embeddings, _ = planted
    rng = np.random.default_rng(7)
    # Half the queries are slightly perturbed copies of base rows, half are unrelated.
    copies = embeddings[rng.choice(len(embeddings), 300, replace=False)].astype(np.float32)
    copies += rng.standard_normal(copies.shape, dtype=np.float32) * np.float32(0.05 / np.sqrt(128))
    unrelated = rng.standard_normal((300, 128), dtype=np.float32)
    queries = np.concatenate([copies, unrelated])
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    pairs = embedding_neighbours(embeddings, THRESHOLD, backend=backend, queries=queries)
    check_against_brute_force(pairs, brute_force(queries, embeddings, self_join=False), 0.99)
    assert np.all(pairs[0] < 300)
    assert set(range(300)) <= set(pairs[0].tolist())


def test_grouping_recovers_planted_groups(planted) -> None:
    embeddings, labels = planted
    n = len(embeddings)
    pairs = embedding_neighbours(embeddings, THRESHOLD, backend="flat")
    priority = np.random.default_rng(11).random(n)
    group_id, keeper = group_by_keeper(n, pairs, priority)
    assert group_id.dtype == np.int64 and keeper.dtype == np.int64
    # Keepers keep themselves; group ids are 0..G-1 and shared exactly by the rows with one keeper.
    assert np.all(keeper[keeper] == keeper)
    assert group_id.max() + 1 == np.unique(keeper).size
    assert np.all(group_id == group_id[keeper])
    for label in range(600):
        members = np.flatnonzero(labels == label)
        assert np.unique(keeper[members]).size == 1, f"planted group {label} split"
        assert keeper[members[0]] == members[np.argmax(priority[members])]
    singletons = np.flatnonzero(labels < 0)
    np.testing.assert_array_equal(keeper[singletons], singletons)
    member_sims = np.einsum("ij,ij->i", embeddings.astype(np.float32), embeddings[keeper].astype(np.float32))
    assert np.all(member_sims >= THRESHOLD - TOLERANCE)


def chain(dim: int = 8) -> np.ndarray:
    """a, b, c at angles 0, t, 2t in one plane: a~b and b~c (IP 0.97), not a~c (IP 0.88)."""
    step = np.arccos(0.97)
    points = np.zeros((3, dim), dtype=np.float32)
    points[:, 0] = np.cos(step * np.arange(3))
    points[:, 1] = np.sin(step * np.arange(3))
    return points


def test_a_chain_is_kept_by_its_middle_whatever_the_priorities() -> None:
    a, b, c = 0, 1, 2
    pairs = embedding_neighbours(chain(), THRESHOLD, backend="flat")
    assert pair_set(*pairs[:2]) == {(a, b), (b, c)}
    for priority in ([3.0, 2.0, 1.0], [1.0, 2.0, 3.0], [2.0, 3.0, 1.0]):
        group_id, keeper = group_by_keeper(3, pairs, np.array(priority))
        # b is within the threshold of both: one file released, each drop directly linked to it
        np.testing.assert_array_equal(keeper, [b, b, b])
        assert group_id.tolist() == [0, 0, 0]


def test_an_edge_crop_with_the_best_score_loses_to_the_original_beside_its_flips() -> None:
    crop, original, flip, flop = 0, 1, 2, 3
    # the crop is within the threshold of the original only; the flips of the original, of it and each other
    rows, cols = np.array([crop, original, original, flip]), np.array([original, flip, flop, flop])
    _, keeper = group_by_keeper(4, (rows, cols), np.array([0.9, 0.2, 0.3, 0.1]))
    np.testing.assert_array_equal(keeper, [original] * 4)


def test_keepers_are_never_linked_and_every_drop_is_linked_to_its_keeper() -> None:
    rng = np.random.default_rng(5)
    for trial in range(40):
        n = int(rng.integers(2, 60))
        m = int(rng.integers(0, 3 * n))
        rows, cols = rng.integers(0, n, m), rng.integers(0, n, m)
        priority = rng.random(n)
        priority[rng.random(n) < 0.1] = np.nan
        _, keeper = group_by_keeper(n, (rows, cols), priority)
        links = pair_set(rows, cols) | pair_set(cols, rows)
        kept = set(np.flatnonzero(keeper == np.arange(n)).tolist())
        assert not {(i, j) for i, j in links if i in kept and j in kept and i != j}, trial
        assert all((i, int(keeper[i])) in links for i in range(n) if keeper[i] != i), trial
        assert np.all(keeper[keeper] == keeper)


def test_keeper_ties_nan_and_redundant_pairs() -> None:
    rows, cols = np.array([0, 1, 2, 3, 4]), np.array([1, 0, 2, 4, 3])
    # Equal cover and priority: the lower index keeps; NaN ranks below every number; a self-pair is no link.
    group_id, keeper = group_by_keeper(6, (rows, cols), np.array([1.0, 1.0, 0.5, np.nan, 0.2, 9.0]))
    np.testing.assert_array_equal(keeper, [0, 0, 2, 4, 4, 5])
    np.testing.assert_array_equal(group_id, [0, 0, 1, 2, 2, 3])


def test_no_pairs_gives_singletons() -> None:
    empty = np.empty(0, np.int64)
    group_id, keeper = group_by_keeper(4, (empty, empty, np.empty(0, np.float32)), np.zeros(4))
    np.testing.assert_array_equal(keeper, np.arange(4))
    np.testing.assert_array_equal(group_id, np.arange(4))
    rows, cols, sims = embedding_neighbours(np.empty((0, 16), np.float32), THRESHOLD)
    assert rows.size == cols.size == sims.size == 0


def test_k_caps_neighbours_per_query() -> None:
    # Ten copies of one direction: all 45 pairs are near-duplicates, but each query keeps only k neighbours.
    copies = np.tile(chain()[:1], (10, 1))
    rows, cols, _ = embedding_neighbours(copies, THRESHOLD, k=2, backend="flat")
    # At most k + 1 hits per query (k others, or k + 1 when a tie pushes the row itself out of its list).
    assert rows.size <= 10 * 3 < 45
    assert np.bincount(np.concatenate([rows, cols]), minlength=10).min() >= 2
    with pytest.raises(ValueError, match="k must be"):
        embedding_neighbours(copies, THRESHOLD, k=MAX_K + 1)
