"""seen_ids: the sample ids a source has produced so far, and how often each occurred, in about 14 bytes an id.

Ingest drops a row equal to an earlier row of its source as `duplicate_row`, so it must remember every id of
the source. A dict of the 24-hex-digit ids takes about 110 bytes an id: 1 GiB per 10M rows, out of reach for a
LAION-2B-sized source. An id is 96 bits (24 hex digits), held here as its first 64 bits in sorted runs with the
last 32 bits beside them: a row is looked up with a binary search of each run on its first 64 bits, and the few
equal ones are compared on all 96. Runs are merged as they grow (two runs of similar size become one), so a
source of n ids keeps about log2(n / batch) runs; the merge of the largest two needs about as much memory again
for a moment. Ids that occurred more than once (rare) have their count in a dict.
"""

from __future__ import annotations

import numpy as np

ID_HEX_DIGITS = 24
_KEY = np.dtype([("hi", ">u8"), ("lo", ">u4")])


class SeenIds:
    """Counts of the ids seen so far; `record` adds a batch and tells, per id, how often it occurred before."""

    def __init__(self) -> None:
        self._runs: list[tuple[np.ndarray, np.ndarray]] = []  # (first 64 bits sorted, last 32 bits beside)
        self._repeated: dict[tuple[int, int], int] = {}  # id -> occurrences, for ids seen more than once
        self._count = 0

    def __len__(self) -> int:
        """The number of distinct ids seen."""
        return self._count

    def record(self, ids: list[str]) -> np.ndarray:
        """Per id in order, how many times it occurred before it (in earlier batches or earlier in this
        batch); all of them are then counted as seen. Every id must be 24 hex digits."""
        if not ids:
            return np.zeros(0, np.int64)
        keys = _keys(ids)
        hi, lo = keys["hi"].astype(np.uint64), keys["lo"].astype(np.uint32)
        # Within the batch: occurrences in order, by a stable sort on the whole id.
        order = np.lexsort((lo, hi))
        sorted_hi, sorted_lo = hi[order], lo[order]
        starts = np.ones(len(ids), bool)
        starts[1:] = (sorted_hi[1:] != sorted_hi[:-1]) | (sorted_lo[1:] != sorted_lo[:-1])
        group = np.cumsum(starts) - 1
        first_of_group = np.flatnonzero(starts)
        within = np.empty(len(ids), np.int64)
        within[order] = np.arange(len(ids)) - first_of_group[group]
        # Across batches: each distinct id of the batch looked up in every run.
        unique_hi, unique_lo = sorted_hi[first_of_group], sorted_lo[first_of_group]
        before = self._occurrences(unique_hi, unique_lo)
        group_in_order = np.empty_like(group)
        group_in_order[order] = group
        repeats = before[group_in_order] + within
        sizes = np.diff(np.append(first_of_group, len(ids)))
        for index in np.flatnonzero((before > 0) | (sizes > 1)):  # rare: repeated ids
            key = (int(unique_hi[index]), int(unique_lo[index]))
            self._repeated[key] = int(before[index] + sizes[index])
        new = before == 0
        self._add_run(unique_hi[new], unique_lo[new])
        return repeats

    def _occurrences(self, hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
        """Per distinct id, how often it was seen before this batch (0: never)."""
        found = np.zeros(len(hi), np.int64)
        for run_hi, run_lo in self._runs:
            left = np.searchsorted(run_hi, hi)
            inside = left < len(run_hi)
            for index in np.flatnonzero(inside)[run_hi[left[inside]] == hi[inside]]:  # compare all 96 bits
                end = left[index] + 1
                while end < len(run_hi) and run_hi[end] == hi[index]:
                    end += 1
                if lo[index] in run_lo[left[index] : end]:
                    found[index] = self._repeated.get((int(hi[index]), int(lo[index])), 1)
        return found

    def _add_run(self, hi: np.ndarray, lo: np.ndarray) -> None:
        if not len(hi):
            return
        self._count += len(hi)
        self._runs.append((hi, lo))  # sorted on (hi, lo) by `record`
        while len(self._runs) > 1 and len(self._runs[-2][0]) <= 2 * len(self._runs[-1][0]):
            newer, older = self._runs.pop(), self._runs.pop()
            self._runs.append(_merged(older, newer))


def _merged(
    older: tuple[np.ndarray, np.ndarray], newer: tuple[np.ndarray, np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """Two runs as one, sorted on the first 64 bits: the newer run's ids placed among the older's by binary
    search (no sort of the whole, whose index array would take 8 bytes an id more)."""
    (older_hi, older_lo), (newer_hi, newer_lo) = older, newer
    at = np.searchsorted(older_hi, newer_hi, "right") + np.arange(len(newer_hi))
    hi = np.empty(len(older_hi) + len(newer_hi), np.uint64)
    lo = np.empty(len(hi), np.uint32)
    from_older = np.ones(len(hi), bool)
    from_older[at] = False
    hi[at], lo[at] = newer_hi, newer_lo
    hi[from_older], lo[from_older] = older_hi, older_lo
    return hi, lo


def _keys(ids: list[str]) -> np.ndarray:
    """The ids' 96 bits as (first 64, last 32) big-endian fields, parsed in one pass."""
    if set(map(len, ids)) != {ID_HEX_DIGITS}:
        bad = next(identity for identity in ids if len(identity) != ID_HEX_DIGITS)
        raise ValueError(f"not a sample id of {ID_HEX_DIGITS} hex digits: {bad!r}")
    return np.frombuffer(bytes.fromhex("".join(ids)), _KEY)
