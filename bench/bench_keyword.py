"""Throughput of the keyword stage against bare RE2 passes over the same caption column.

Builds a column of --rows real captions by repeating the CC3M validation TSV and the img2dataset LAION-style
parquet from ../shared/data/web_captions (relative to the repository root), then times in one process, best
of --repeats (the cases take turns):
  (a) one bare pc.match_substring_regex with the matcher's own keyword alternation (its prefilter pattern),
  (b) one bare pc.match_substring_regex with a 13-keyword pattern,
  (c) KeywordMatcher.match,
  (d) filter_shard on an INGEST_SCHEMA table holding the column,
with the shipped keyword and exclusion lists of --lists (default rs-v2; places: the default).
c/a and d/a are the matcher's and the stage's speed relative to the bare pass of their own prefilter pattern.

    .venv/bin/python bench/bench_keyword.py --rows 2000000 [--lists rs-v1]
"""

from __future__ import annotations

from _common import SHARED_DATA  # first: sys.path and the offline environment

import argparse
import sys
import time
from collections.abc import Callable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from rs5m.config import KeywordConfig
from storage.schemas import INGEST_SCHEMA
from tasks.keyword import KeywordMatcher, filter_shard

DATA = SHARED_DATA / "web_captions"
CC3M_TSV = DATA / "Validation_GCC-1.1.0-Validation.tsv"
LAION_PARQUET = DATA / "img2dataset_test_10000.parquet"
PATTERN_13 = (
    r"\b(aerial|satellite|drone|bird'?s[- ]eye|overhead view|from above|top view|orthophoto|landsat|sentinel|"
    r"remote sensing|google earth|aerial view)\b"
)


def real_captions() -> tuple[pa.Array, pa.Array]:
    """(captions, urls) of both source files, in file order."""
    missing = [str(p) for p in (CC3M_TSV, LAION_PARQUET) if not p.is_file()]
    if missing:
        sys.exit(
            f"bench_keyword: caption data not found: {', '.join(missing)} (expected ../shared/data/web_captions)"
        )
    cc3m = pacsv.read_csv(
        CC3M_TSV,
        read_options=pacsv.ReadOptions(column_names=["caption", "url"]),
        parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False),
        convert_options=pacsv.ConvertOptions(column_types={"caption": pa.string(), "url": pa.string()}),
    )
    laion = pq.read_table(LAION_PARQUET, columns=["TEXT", "URL"])
    captions = pa.concat_arrays(
        [cc3m.column("caption").combine_chunks(), laion.column("TEXT").combine_chunks()]
    )
    urls = pa.concat_arrays([cc3m.column("url").combine_chunks(), laion.column("URL").combine_chunks()])
    return captions, urls


def repeat_to(array: pa.Array, rows: int) -> pa.Array:
    copies = -(-rows // len(array))
    return pa.concat_arrays([array] * copies).slice(0, rows)


def best_of(repeats: int, cases: dict[str, Callable[[], object]]) -> dict[str, float]:
    """Each case's best time; the cases take turns, so a busy spell on the machine slows all of them."""
    best = dict.fromkeys(cases, float("inf"))
    for _ in range(repeats):
        for name, run in cases.items():
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--rows", type=int, default=2_000_000, help="caption rows to build (default 2,000,000)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per case; the best counts")
    parser.add_argument("--lists", default="rs-v2", help="shipped list version (default rs-v2)")
    args = parser.parse_args()

    captions, urls = real_captions()
    column = repeat_to(captions, args.rows)
    table = pa.table(
        {
            "sample_id": pc.cast(pa.array(range(args.rows), pa.int64()), pa.string()),
            "source": pa.array(["bench"] * args.rows, pa.string()),
            "url": repeat_to(urls, args.rows),
            "caption": column,
            "extra": pa.nulls(args.rows, pa.string()),
        },
        schema=INGEST_SCHEMA,
    )
    matcher = KeywordMatcher.from_config(KeywordConfig(keywords=args.lists, exclusions=args.lists))
    keyword, _ = matcher.match(column)
    print(
        f"{args.lists}: {args.rows:,} rows from {len(captions):,} real captions; "
        f"{args.rows - keyword.null_count:,} "
        f"kept; prefilter pattern {len(matcher.candidate_pattern):,} chars, {len(matcher.keywords)} keywords, "
        f"{len(matcher.exclusions)} exclusions; pyarrow {pa.__version__}, {pa.cpu_count()} CPU threads"
    )

    cases = {
        "a bare RE2, matcher alternation": lambda: pc.match_substring_regex(
            column, matcher.candidate_pattern, ignore_case=True
        ),
        "b bare RE2, 13 keywords": lambda: pc.match_substring_regex(column, PATTERN_13, ignore_case=True),
        "c KeywordMatcher.match": lambda: matcher.match(column),
        "d filter_shard": lambda: filter_shard(table, matcher),
    }
    rate = {}
    for name, seconds in best_of(args.repeats, cases).items():
        rate[name[0]] = args.rows / seconds
        print(f"{name:34s} {seconds:8.3f} s  {rate[name[0]] / 1e6:7.2f} M rows/s")
    print(
        f"c/a {rate['c'] / rate['a']:.2f}   d/a {rate['d'] / rate['a']:.2f}   "
        f"c/b {rate['c'] / rate['b']:.2f}   d/b {rate['d'] / rate['b']:.2f}"
    )


if __name__ == "__main__":
    main()
