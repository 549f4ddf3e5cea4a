"""Throughput of the keyword stage against bare RE2 passes over the same caption column.

Builds a column of --rows real captions by repeating the CC3M validation TSV and the img2dataset LAION-style
parquet from ../shared/data/web_captions (relative to the repository root), then times in one process, best
of --repeats (the cases take turns), and the median of the turns' own ratios:
  (a) one bare case-insensitive pass: pc.match_substring_regex with the matcher's own keyword alternation (its
      prefilter parts joined into one pattern) over the Unicode-lower-cased column (ignore_case on a pattern
      that large falls off RE2's DFA: see tasks/keyword.py),
  (e) the same pass over the ASCII-lower-cased column, as the matcher's prefilter runs it when its list holds no
      cased letter beyond ASCII (the shipped lists),
  (f) bare passes of the prefilter's parts over the ASCII-lower-cased column, or-ed, as the matcher runs them:
      the same as (e) for a prefilter of one part (every shipped list); a longer one is cut into parts because
      one pass of it falls off RE2's DFA, which makes (a) and (e) slow and (f) the baseline that counts,
  (b) one bare pc.match_substring_regex with a 13-keyword pattern,
  (c) KeywordMatcher.match,
  (d) filter_shard on an INGEST_SCHEMA table holding the column,
with the shipped keyword list --lists (default: the config's) and the exclusion, places and geonames lists it
was released with.
c/a and d/a are the matcher's and the stage's speed relative to a bare case-insensitive pass of their own
prefilter pattern; c/e and d/e relative to one pass of that pattern over ASCII-lower-cased text; c/f and d/f
relative to the cheapest passes of its parts.

Then the same rows as shards of --shard-rows (default: ingest's 10,000), as a stage sees them:
  (g) bare passes as (a), one per shard, and (h) as (f), one per shard,
  (i) filter_shard once per shard (a task of one shard, or keyword.batch_rows 1),
  (j) filter_shard once per group of consecutive shards of --batch-rows rows (default: keyword.batch_rows), with
      the concatenation and the cut back into shards that tasks/harness.py run_shard_batches adds;
i/g, j/g, i/h and j/h are the stage's speed relative to the bare passes a shard at a time.

    .venv/bin/python bench/bench_keyword.py --rows 2000000 [--lists rs-v1]
"""

from __future__ import annotations

from _common import SHARED_DATA  # first: sys.path and the offline environment

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from rs5m.config import IngestConfig, KeywordConfig
from storage.schemas import INGEST_SCHEMA
from tasks.harness import split_outcome
from tasks.keyword import RELEASED_WITH, KeywordMatcher, filter_shard, matches_any, released_config

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


def timed_turns(repeats: int, cases: dict[str, Callable[[], object]]) -> dict[str, list[float]]:
    """Each case's time in every turn; the cases take turns, so a busy spell on the machine slows all of
    the cases of that turn alike."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, run in cases.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return times


def lists_config(version: str) -> KeywordConfig:
    """The keyword config of a shipped keyword list version, with the lists it was released with."""
    if version not in RELEASED_WITH:
        sys.exit(f"bench_keyword: --lists {version!r}: choose one of {', '.join(RELEASED_WITH)}")
    return released_config(version)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--rows", type=int, default=2_000_000, help="caption rows to build (default 2,000,000)"
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="timed runs (turns) per case; the best and the median of the turns' ratios count",
    )
    parser.add_argument(
        "--lists",
        default=KeywordConfig().keywords,
        help=f"shipped keyword list version (default {KeywordConfig().keywords}), with the exclusion, places and "
        "geonames lists it was released with",
    )
    parser.add_argument(
        "--shard-rows",
        type=int,
        default=IngestConfig().shard_rows,
        help=f"rows per shard for cases g-j (default ingest.shard_rows, {IngestConfig().shard_rows:,})",
    )
    parser.add_argument(
        "--batch-rows",
        type=int,
        default=KeywordConfig().batch_rows,
        help=f"rows per call for case j (default keyword.batch_rows, {KeywordConfig().batch_rows:,})",
    )
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
    matcher = KeywordMatcher.from_config(lists_config(args.lists))
    alternation = "|".join(matcher.candidate_patterns)
    keyword, _ = matcher.match(column)
    print(
        f"{args.lists}: {args.rows:,} rows from {len(captions):,} real captions; "
        f"{args.rows - keyword.null_count:,} "
        f"kept; prefilter {len(alternation):,} chars in {len(matcher.candidate_patterns)} part(s), "
        f"{len(matcher.keywords)} keywords, "
        f"{len(matcher.exclusions)} exclusions; pyarrow {pa.__version__}, {pa.cpu_count()} CPU threads"
    )

    cases = {
        "a bare RE2, matcher alternation": lambda: pc.match_substring_regex(
            pc.utf8_lower(column), alternation
        ),
        "b bare RE2, 13 keywords": lambda: pc.match_substring_regex(column, PATTERN_13, ignore_case=True),
        "c KeywordMatcher.match": lambda: matcher.match(column),
        "d filter_shard": lambda: filter_shard(table, matcher),
        "e bare RE2, ASCII-lower-cased": lambda: pc.match_substring_regex(
            pc.ascii_lower(column), alternation
        ),
        "f bare RE2, the prefilter's parts": lambda: matches_any(
            pc.ascii_lower(column), matcher.candidate_patterns
        ),
    }
    times = {name[0]: seconds for name, seconds in timed_turns(args.repeats, cases).items()}
    for name in cases:
        best = min(times[name[0]])
        print(f"{name:34s} {best:8.3f} s  {args.rows / best / 1e6:7.2f} M rows/s (best of {args.repeats})")

    def speed(case: str, baseline: str) -> str:
        """Relative speed from the best times, and the median of the turns' own ratios (steadier when the
        machine is busy: both times of a turn come from the same few seconds)."""
        best = min(times[baseline]) / min(times[case])
        per_turn = statistics.median(b / c for b, c in zip(times[baseline], times[case], strict=True))
        return f"{case}/{baseline} {best:.2f} (median of turns {per_turn:.2f})"

    pairs = ("ca", "da", "ce", "de", "cf", "df", "cb", "db")
    print("   ".join(speed(case, baseline) for case, baseline in pairs))

    shards = [table.slice(start, args.shard_rows) for start in range(0, args.rows, args.shard_rows)]
    groups, group = [], []
    for shard in shards:
        group.append(shard)
        if sum(t.num_rows for t in group) >= args.batch_rows:
            groups.append(group)
            group = []
    groups += [group] if group else []

    def per_group() -> None:
        for members in groups:
            outcome = filter_shard(pa.concat_tables(members), matcher)
            split_outcome(outcome, [t.num_rows for t in members])

    def column_of(shard: pa.Table) -> pa.Array:
        return shard.column("caption").combine_chunks()

    shard_cases = {
        "g bare RE2 as (a), per shard": lambda: [
            pc.match_substring_regex(pc.utf8_lower(column_of(t)), alternation) for t in shards
        ],
        "h bare RE2 as (f), per shard": lambda: [
            matches_any(pc.ascii_lower(column_of(t)), matcher.candidate_patterns) for t in shards
        ],
        "i filter_shard, per shard": lambda: [filter_shard(t, matcher) for t in shards],
        "j filter_shard, per group": per_group,
    }
    print(
        f"{len(shards):,} shards of {args.shard_rows:,} rows; case j: {len(groups):,} group(s) of "
        f"{args.batch_rows:,} rows"
    )
    times = {name[0]: seconds for name, seconds in timed_turns(args.repeats, shard_cases).items()}
    for name in shard_cases:
        best = min(times[name[0]])
        print(f"{name:34s} {best:8.3f} s  {args.rows / best / 1e6:7.2f} M rows/s (best of {args.repeats})")
    print("   ".join(speed(case, baseline) for case, baseline in ("ig", "jg", "ih", "jh")))


if __name__ == "__main__":
    main()
