"""Memory and time of remembering a source's sample ids: tasks/seen_ids.SeenIds against a dict of the ids.

Ingest must remember every id of a source to drop later repeats as `duplicate_row`. This draws --ids ids of
96 bits (sha256 of the row number, as ingest's ids are sha256 prefixes; 1% of them repeat an earlier id) and
feeds them in batches of --batch, as ingest does, each batch's ids made into 24-hex-digit strings as it comes
(ingest makes them per batch: what a dict keeps, it keeps alive), to
  dict:    the ids as keys of a dict of counts (ingest before SeenIds: update when a batch repeats nothing),
  SeenIds: sorted runs of the ids' 96 bits, counts of repeated ids in a dict,
each in a fresh state, alternating, --repeats times. It prints the time (untraced), the memory held after the
last batch and the peak while building (tracemalloc, which sees numpy's arrays too, in another build), in
bytes per distinct id, and SeenIds/dict ratios (medians over the repeats).

    .venv/bin/python bench/bench_seen_ids.py --ids 5000000
"""

from __future__ import annotations

import _common  # noqa: F401  first: sys.path and the offline environment

import argparse
import hashlib
import random
import statistics
import time
import tracemalloc
from collections.abc import Callable

from tasks.seen_ids import SeenIds


def make_batches(count: int, batch: int) -> list[list[int]]:
    rng = random.Random(0)
    keys: list[int] = []
    for row in range(count):
        if keys and rng.random() < 0.01:
            keys.append(rng.choice(keys))
        else:
            keys.append(int.from_bytes(hashlib.sha256(str(row).encode()).digest()[:12]))
    return [keys[start : start + batch] for start in range(0, count, batch)]


def as_ids(keys: list[int]) -> list[str]:
    return [f"{key:024x}" for key in keys]


def with_dict(batches: list[list[int]]) -> object:
    seen: dict[str, int] = {}
    for keys in batches:
        ids = as_ids(keys)
        if len(set(ids)) == len(ids) and seen.keys().isdisjoint(ids):
            seen.update(dict.fromkeys(ids, 0))
            continue
        for identity in ids:
            seen[identity] = seen.get(identity, -1) + 1
    return seen


def with_seen_ids(batches: list[list[int]]) -> object:
    seen = SeenIds()
    for keys in batches:
        seen.record(as_ids(keys))
    return seen


def measure(build: Callable[[list[list[int]]], object], batches: list[list[int]]) -> tuple[float, int, int]:
    """(seconds, bytes held after the build, peak bytes during it): timed in one build, memory traced in
    another (tracing slows every allocation)."""
    started = time.perf_counter()
    build(batches)
    seconds = time.perf_counter() - started
    tracemalloc.start()
    held = build(batches)
    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del held
    return seconds, current, peak


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ids", type=int, default=5_000_000)
    parser.add_argument("--batch", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    batches = make_batches(args.ids, args.batch)
    distinct = len({key for keys in batches for key in keys})
    print(f"{args.ids:,} ids ({distinct:,} distinct) in batches of {args.batch:,}")
    cases = {"dict": with_dict, "SeenIds": with_seen_ids}
    results: dict[str, list[tuple[float, int, int]]] = {name: [] for name in cases}
    for turn in range(args.repeats):
        for name in cases if turn % 2 == 0 else reversed(list(cases)):
            results[name].append(measure(cases[name], batches))
    for name, runs in results.items():
        seconds = statistics.median(run[0] for run in runs)
        held = statistics.median(run[1] for run in runs) / distinct
        peak = statistics.median(run[2] for run in runs) / distinct
        print(f"{name:8s} {seconds:7.2f} s   held {held:6.1f} B/id   peak {peak:6.1f} B/id")

    def ratio(field: int) -> float:
        return statistics.median(
            new[field] / old[field] for new, old in zip(results["SeenIds"], results["dict"], strict=True)
        )

    print(f"SeenIds/dict: time {ratio(0):.2f}, held memory {ratio(1):.3f}, peak memory {ratio(2):.3f}")


if __name__ == "__main__":
    main()
