"""A stage of many small shards with a Prefect task per shard against batched tasks (runner.max_tasks_per_stage).

Writes one JSON-lines source of --shards x 10 synthetic captions (ingest.shard_rows 10, so the keyword stage
has --shards units), starts a `prefect server` of its own on loopback, then times `rs5m run --stages
ingest,keyword` on two work directories that differ only in runner.max_tasks_per_stage: --shards (a task
per shard) and --batched (default 50). The cases take turns, --repeats times; printed: the keyword stage's
time from its progress line and the whole command's, best of the turns, and batched / per shard.

    .venv/bin/python bench/bench_task_batches.py [--shards 1000] [--batched 50] [--repeats 1]
"""

from __future__ import annotations

import _common  # noqa: F401 - the repository on sys.path, the offline environment

import argparse
import json
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import yaml

from tests.helpers import BIN, PrefectServer, free_port  # the server the tests start, started the same way

ROWS_PER_SHARD = 10


def write_config(folder: Path, source: Path, most: int) -> Path:
    config = {
        "workdir": str(folder / "work"),
        "sources": [{"name": "web", "path": str(source), "format": "jsonl"}],
        "ingest": {"shard_rows": ROWS_PER_SHARD},
        "runner": {"max_tasks_per_stage": most},
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def timed_run(config: Path, env: dict[str, str]) -> tuple[float, float]:
    """(keyword stage seconds from its progress line, whole command seconds) of one run from scratch."""
    shutil.rmtree(config.parent / "work", ignore_errors=True)
    start = time.perf_counter()
    result = subprocess.run(
        [str(BIN / "rs5m"), "run", str(config), "--stages", "ingest,keyword"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    took = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"bench_task_batches: rs5m run failed:\n{result.stderr[-3000:]}")
    stage = re.search(r"^keyword: .*, ([\d.]+) s$", result.stderr, re.MULTILINE)
    if stage is None:
        raise SystemExit(f"bench_task_batches: no keyword progress line in:\n{result.stderr[-3000:]}")
    return float(stage.group(1)), took


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shards", type=int, default=1000, help="keyword units (default 1000)")
    parser.add_argument("--batched", type=int, default=50, help="max_tasks_per_stage of the batched case")
    parser.add_argument("--repeats", type=int, default=1, help="turns of the two cases (default 1)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-task-batches-") as tmp:
        root = Path(tmp)
        source = root / "captions.jsonl"
        with source.open("w") as out:
            for i in range(args.shards * ROWS_PER_SHARD):
                caption = f"aerial view of field {i}" if i % 3 == 0 else f"a cat on a sofa, number {i}"
                out.write(
                    json.dumps({"url": f"http://images.example.org/{i}.jpg", "caption": caption}) + "\n"
                )
        cases = {"task per shard": args.shards, f"batched ({args.batched} tasks)": args.batched}
        configs = {name: write_config(root / str(most), source, most) for name, most in cases.items()}
        server = PrefectServer(port=free_port(), home=root / "prefect-home")
        server.start()
        env = server.env()
        try:
            times: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}
            for _ in range(args.repeats):
                for name, config in configs.items():
                    times[name].append(timed_run(config, env))
        finally:
            server.stop()
    print(f"{args.shards:,} keyword shards of {ROWS_PER_SHARD} rows, a Prefect server on loopback")
    best = {name: (min(s for s, _ in runs), min(t for _, t in runs)) for name, runs in times.items()}
    for name, (stage, total) in best.items():
        print(
            f"{name:24s} keyword stage {stage:7.1f} s   whole run {total:7.1f} s   (best of {args.repeats})"
        )
    (per_shard_stage, per_shard_total), (batched_stage, batched_total) = best.values()
    print(
        f"batched / task per shard: keyword stage {per_shard_stage / batched_stage:.2f}x as fast, "
        f"whole run {per_shard_total / batched_total:.2f}x"
    )


if __name__ == "__main__":
    main()
