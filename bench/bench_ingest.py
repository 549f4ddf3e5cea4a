"""Throughput of the ingest stage (and of the keyword stage on its output) against bare pyarrow reads.

Builds a source of --rows real captions by repeating the CC3M validation TSV from ../shared/data/web_captions
(relative to the repository root). Every repeated row gets a unique URL (`?r=<i>` or `&r=<i>` appended), so
the rows are distinct and duplicate-row detection does not dominate. The source is written to a temporary
directory as a headerless TSV (caption<TAB>url), as a CSV with a header and quoted values (pyarrow's
writer), and as Parquet; then each repetition times, in alternating order:
  tsv  bare:   pacsv.read_csv with the parse options ingest uses,
  tsv  ingest: SourceIngester(source, IngestConfig(shard_rows)).shards(), fully consumed,
  csv  bare / ingest: the same for the CSV,
  pq   bare:   pq.read_table,
  pq   ingest: the same for the Parquet source,
  pq   stage:  ingest_source_shards (checksum, shards, Parquet data and ledger writes, marker), fresh work dir,
and, on the captions the stage wrote, keyword filter_shard per ingest shard. Medians over --repeats.

    .venv/bin/python bench/bench_ingest.py --rows 1000000
    .venv/bin/python bench/bench_ingest.py --rows 200000 --profile   # cProfile of one Parquet ingest
"""

from __future__ import annotations

from _common import SHARED_DATA  # first: sys.path and the offline environment

import argparse
import cProfile
import pstats
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from rs5m.config import IngestConfig, KeywordConfig, SourceConfig
from storage.layout import Layout
from tasks.ingest import SourceIngester, ingest_source_shards
from tasks.keyword import KeywordMatcher, filter_shard

DATA = SHARED_DATA / "web_captions"
CC3M_TSV = DATA / "Validation_GCC-1.1.0-Validation.tsv"
COLUMNS = ["caption", "url"]


def read_cc3m(path: Path) -> pa.Table:
    return pacsv.read_csv(
        path,
        read_options=pacsv.ReadOptions(column_names=COLUMNS),
        parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False),
        convert_options=pacsv.ConvertOptions(column_types={name: pa.string() for name in COLUMNS}),
    )


def build_source(rows: int) -> pa.Table:
    """`rows` CC3M rows, repeated in file order, each URL made unique by a row-number query parameter."""
    if not CC3M_TSV.is_file():
        sys.exit(f"bench_ingest: caption data not found: {CC3M_TSV} (expected ../shared/data/web_captions)")
    cc3m = read_cc3m(CC3M_TSV).combine_chunks()
    copies = -(-rows // cc3m.num_rows)
    repeated = pa.concat_tables([cc3m] * copies).slice(0, rows).combine_chunks()
    urls = repeated.column("url")
    separator = pc.if_else(pc.match_substring(urls, "?"), "&r=", "?r=")
    numbers = pc.cast(pa.array(range(rows), pa.int64()), pa.string())
    unique_urls = pc.binary_join_element_wise(urls, separator, numbers, "")
    return pa.table({"caption": repeated.column("caption"), "url": unique_urls})


def write_tsv(path: Path, table: pa.Table) -> None:
    # CC3M has no tab, newline or quote inside a field, so the lines need no quoting (checked below).
    for column in table.columns:
        if pc.any(pc.match_substring_regex(column, '[\t\n\r"]')).as_py():
            raise ValueError("a field holds a tab, newline or quote: the TSV would not round-trip")
    with open(path, "w", encoding="utf-8", newline="") as handle:
        for caption, url in zip(
            table.column("caption").to_pylist(), table.column("url").to_pylist(), strict=True
        ):
            handle.write(f"{caption}\t{url}\n")


def consume(ingester: SourceIngester) -> tuple[int, int]:
    """(input rows decided, rows kept) over every shard."""
    decided = kept = 0
    for outcome in ingester.shards():
        decided += outcome.decisions.num_rows
        kept += outcome.kept.num_rows
    return decided, kept


def timed(run: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    result = run()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=1_000_000, help="source rows (default 1,000,000)")
    parser.add_argument("--shard-rows", type=int, default=100_000, help="ingest shard_rows (default 100,000)")
    parser.add_argument("--repeats", type=int, default=3, help="repetitions of each case; medians count")
    parser.add_argument("--profile", action="store_true", help="also cProfile one Parquet ingest")
    args = parser.parse_args()

    source_table = build_source(args.rows)
    config = IngestConfig(shard_rows=args.shard_rows)
    matcher = KeywordMatcher.from_config(KeywordConfig())
    with tempfile.TemporaryDirectory(prefix="bench_ingest_") as temp:
        temp_dir = Path(temp)
        tsv_path, parquet_path = temp_dir / "source.tsv", temp_dir / "source.parquet"
        csv_path = temp_dir / "source.csv"
        write_tsv(tsv_path, source_table)
        pacsv.write_csv(source_table.select(["url", "caption"]), csv_path)
        pq.write_table(source_table, parquet_path, compression="zstd")
        sources = {
            "tsv": SourceConfig(
                name="bench_tsv", path=str(tsv_path), format="tsv", header=False, column_names=COLUMNS
            ),
            "csv": SourceConfig(name="bench_csv", path=str(csv_path), format="csv"),
            "pq": SourceConfig(name="bench_pq", path=str(parquet_path), format="parquet"),
        }
        print(
            f"{args.rows:,} rows from {len(read_cc3m(CC3M_TSV)):,} CC3M captions, unique URLs; "
            f"TSV {tsv_path.stat().st_size / 2**20:.0f} MiB, Parquet {parquet_path.stat().st_size / 2**20:.0f} MiB; "
            f"shard_rows {args.shard_rows:,}; pyarrow {pa.__version__}, {pa.cpu_count()} CPU threads"
        )

        cases: dict[str, Callable[[int], object]] = {
            "tsv bare pacsv.read_csv": lambda _: read_cc3m(tsv_path),
            "tsv SourceIngester.shards": lambda _: consume(SourceIngester(sources["tsv"], config)),
            "csv bare pacsv.read_csv": lambda _: pacsv.read_csv(csv_path),
            "csv SourceIngester.shards": lambda _: consume(SourceIngester(sources["csv"], config)),
            "pq  bare pq.read_table": lambda _: pq.read_table(parquet_path),
            "pq  SourceIngester.shards": lambda _: consume(SourceIngester(sources["pq"], config)),
            "pq  ingest_source_shards": lambda repeat: ingest_source_shards(
                Layout(temp_dir / f"work-{repeat}"), sources["pq"], config, "bench-ingest"
            ),
        }
        times: dict[str, list[float]] = {name: [] for name in cases}
        for repeat in range(args.repeats):
            names = list(cases) if repeat % 2 == 0 else list(reversed(cases))
            for name in names:
                seconds, result = timed(lambda run=cases[name], r=repeat: run(r))
                times[name].append(seconds)
                if isinstance(result, tuple) and result != (args.rows, args.rows):
                    print(f"  {name}: decided/kept {result}, expected {args.rows:,} each")
            print(f"  repeat {repeat}: " + ", ".join(f"{n.split()[0]} {times[n][-1]:.2f} s" for n in names))

        # The keyword stage on what the ingest stage wrote, one shard at a time as the pipeline runs it.
        layout = Layout(temp_dir / "work-0")
        shard_paths = sorted(layout.stage_dir("ingest").glob("data/*.parquet"))
        shards = [pq.read_table(path) for path in shard_paths]
        keyword_times, kept = [], 0
        for _ in range(args.repeats):
            seconds, outcomes = timed(lambda: [filter_shard(shard, matcher) for shard in shards])
            keyword_times.append(seconds)
            kept = sum(outcome.kept.num_rows for outcome in outcomes)

        print(f"{'case':28s} {'median s':>8s}  {'rows/s':>10s}  runs")
        median = {name: statistics.median(values) for name, values in times.items()}
        median["keyword filter_shard"] = statistics.median(keyword_times)
        times["keyword filter_shard"] = keyword_times
        for name, seconds in median.items():
            runs = ", ".join(f"{value:.2f}" for value in times[name])
            print(f"{name:28s} {seconds:8.2f}  {args.rows / seconds:10,.0f}  {runs}")
        print(
            f"keyword: {len(shards)} shards, {kept:,} of {args.rows:,} rows kept\n"
            f"ingest/bare read: tsv {median['tsv SourceIngester.shards'] / median['tsv bare pacsv.read_csv']:.1f}x, "
            f"csv {median['csv SourceIngester.shards'] / median['csv bare pacsv.read_csv']:.1f}x, "
            f"parquet {median['pq  SourceIngester.shards'] / median['pq  bare pq.read_table']:.1f}x; "
            f"ingest_source_shards/SourceIngester (parquet): "
            f"{median['pq  ingest_source_shards'] / median['pq  SourceIngester.shards']:.2f}x"
        )

        if args.profile:
            profile = cProfile.Profile()
            profile.runcall(consume, SourceIngester(sources["pq"], config))
            print("\ncProfile of one Parquet SourceIngester.shards(), by own time:")
            pstats.Stats(profile, stream=sys.stdout).sort_stats("tottime").print_stats(18)


if __name__ == "__main__":
    main()
