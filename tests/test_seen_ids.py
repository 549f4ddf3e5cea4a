"""SeenIds: the compact set of a source's sample ids that ingest's duplicate_row rule reads."""

from __future__ import annotations

import random

import pytest

from tasks.seen_ids import SeenIds


def counted_before(batches: list[list[str]]) -> list[list[int]]:
    """What `record` must answer, from a plain dict of counts."""
    counts: dict[str, int] = {}
    answers = []
    for batch in batches:
        answer = []
        for identity in batch:
            answer.append(counts.get(identity, 0))
            counts[identity] = counts.get(identity, 0) + 1
        answers.append(answer)
    return answers


def test_repeats_within_and_across_batches() -> None:
    a, b, c = "a" * 24, "b" * 24, "0123456789abcdef01234567"
    batches = [[a, b, a], [c, a, c, c], [], [b]]
    seen = SeenIds()
    assert [seen.record(batch).tolist() for batch in batches] == [[0, 0, 1], [0, 2, 1, 2], [], [1]]
    assert len(seen) == 3


def test_ids_equal_on_their_first_64_bits_are_still_distinct() -> None:
    prefix = "f" * 16
    seen = SeenIds()
    assert seen.record([prefix + "00000001", prefix + "00000002"]).tolist() == [0, 0]
    assert seen.record([prefix + "00000003", prefix + "00000002", prefix + "00000001"]).tolist() == [0, 1, 1]
    assert len(seen) == 3


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_a_dict_over_many_batches_and_run_merges(seed: int) -> None:
    """Random batches of random sizes, some ids drawn again from the earlier ones (and some sharing the
    first 64 bits of an earlier id), through many run merges."""
    rng = random.Random(seed)
    pool: list[str] = []
    batches = []
    for _ in range(120):
        batch = []
        for _ in range(rng.randrange(0, 300)):
            roll = rng.random()
            if pool and roll < 0.05:
                identity = rng.choice(pool)
            elif pool and roll < 0.08:
                identity = rng.choice(pool)[:16] + f"{rng.getrandbits(32):08x}"
            else:
                identity = f"{rng.getrandbits(96):024x}"
            batch.append(identity)
            pool.append(identity)
        batches.append(batch)
    seen = SeenIds()
    assert [seen.record(batch).tolist() for batch in batches] == counted_before(batches)
    assert len(seen) == len(set(pool))
    assert len(seen._runs) < 12  # merged as they grow: about log2 of the batches


def test_an_id_that_is_not_24_hex_digits_is_refused() -> None:
    with pytest.raises(ValueError, match="not a sample id of 24 hex digits: 'abc'"):
        SeenIds().record(["a" * 24, "abc"])
    with pytest.raises(ValueError):
        SeenIds().record(["g" * 24])
