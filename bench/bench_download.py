"""Overhead of the download stage against bare img2dataset calls over the same URLs.

A loopback HTTP server (127.0.0.1, in this process) serves --images distinct, deterministic 256x256 JPEGs.
The URL list is cut into pipeline shards of --shard-rows rows, and each repetition times, in alternating
order:
  bare:  one img2dataset.download call per pipeline shard, with the arguments download_shard passes
         (number_sample_per_shard = ceil(rows / processes), processes_count, thread_count, timeout,
         disable_all_reencoding, parquet output, ...), on a URL list written before the clock starts;
  stage: tasks.download.DOWNLOAD.run per shard in a fresh work directory whose keyword stage is already
         complete: URL checks, img2dataset, reading its output back, the Parquet data and ledger writes,
         the marker and the scratch clean-up.
Both call `tasks.download._img2dataset_download()` (img2dataset.download with its SIGINT handler
patched out), so they run the same function; the bench wraps it to add up the seconds spent inside it.
img2dataset's start-up (its pool and logger fork from the process's forkserver, tasks/img2dataset_processes.py;
the first call of the process starts that server) varies from call to call, so besides
the wall-time ratio the bench reports the stage's time outside img2dataset, which that noise does not touch,
and the ratio it implies: (bare + stage time outside img2dataset) / bare. img2dataset's own output goes to
a log file unless --verbose.

    .venv/bin/python bench/bench_download.py --images 1200 --repeats 3
"""

from __future__ import annotations

import _common  # noqa: F401 - the repository on sys.path, the offline environment

import argparse
import contextlib
import io
import math
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING
from unittest import mock

if TYPE_CHECKING:
    import pyarrow as pa

    from rs5m.config import DownloadConfig
    from storage.layout import Layout


# The heavy imports (pyarrow, prefect via tasks.download, img2dataset) live inside the functions: the
# forkserver img2dataset's workers fork from imports this file as its main module (rs5m/forkserver.py).

RUN_ID = "bench-download"
IMAGE_SIDE = 256


def make_jpegs(count: int) -> list[bytes]:
    """`count` distinct JPEGs: image i is a smooth upscaling of an 8x8 random grid seeded with i."""
    import numpy as np
    from PIL import Image

    images = []
    for index in range(count):
        grid = np.random.default_rng(index).integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
        image = Image.fromarray(grid).resize((IMAGE_SIDE, IMAGE_SIDE), Image.Resampling.BILINEAR)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=85)
        images.append(buffer.getvalue())
    return images


class ImageServer(ThreadingHTTPServer):
    daemon_threads = True
    # socketserver's default backlog of 5 drops connections when 2 x 16 download threads connect at once.
    request_queue_size = 256

    def __init__(self, images: list[bytes]) -> None:
        self.images = images
        super().__init__(("127.0.0.1", 0), ImageHandler)


class ImageHandler(BaseHTTPRequestHandler):
    server: ImageServer

    def do_GET(self) -> None:  # the name http.server dispatches to
        name = self.path.rsplit("/", 1)[-1]
        stem = name.removesuffix(".jpg")
        if not (name.endswith(".jpg") and stem.isdigit() and int(stem) < len(self.server.images)):
            self.send_error(404)
            return
        body = self.server.images[int(stem)]
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextlib.contextmanager
def output_to(log_path: Path | None) -> Iterator[None]:
    """Send this process's and its children's stdout/stderr (fd 1 and 2) to `log_path`; None: leave them."""
    if log_path is None:
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(log_path, "ab") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, copy in zip((1, 2), saved, strict=True):
            os.dup2(copy, fd)
            os.close(copy)


def shard_tables(urls: list[str], shard_rows: int) -> list[tuple[str, pa.Table]]:
    """(shard_id, KEYWORD_SCHEMA table) per pipeline shard of the URL list."""
    import pyarrow as pa

    from storage.schemas import KEYWORD_SCHEMA

    shards = []
    for index, start in enumerate(range(0, len(urls), shard_rows)):
        chunk = urls[start : start + shard_rows]
        shard_id = f"bench-{index:05d}"
        table = pa.table(
            {
                "sample_id": [f"{shard_id}-{row:06d}" for row in range(len(chunk))],
                "source": ["bench"] * len(chunk),
                "url": chunk,
                "caption": ["aerial view of a test pattern"] * len(chunk),
                "extra": pa.nulls(len(chunk), pa.string()),
                "matched_keyword": ["aerial view"] * len(chunk),
            },
            schema=KEYWORD_SCHEMA,
        )
        shards.append((shard_id, table))
    return shards


class TimedDownload:
    """The callable tasks.download._img2dataset_download() returns, adding up the seconds spent in it."""

    def __init__(self, download: Callable[..., None]) -> None:
        self.download = download
        self.seconds = 0.0

    def __call__(self, **arguments: object) -> None:
        start = time.perf_counter()
        try:
            self.download(**arguments)
        finally:
            self.seconds += time.perf_counter() - start


def bare_arguments(
    url_list: Path, output_folder: Path, rows: int, config: DownloadConfig
) -> dict[str, object]:
    """The arguments tasks.download._run_img2dataset passes to img2dataset.download (kept in step by hand)."""
    return {
        "url_list": str(url_list),
        "input_format": "parquet",
        "url_col": "url",
        "save_additional_columns": ["sample_id"],
        "output_folder": str(output_folder),
        "output_format": "parquet",
        "number_sample_per_shard": math.ceil(rows / config.processes),
        "processes_count": config.processes,
        "thread_count": config.threads,
        "timeout": config.timeout_s,
        "retries": config.retries,
        "user_agent_token": config.user_agent_token,
        "disable_all_reencoding": True,
        "encode_format": "jpg",
        "extract_exif": False,
        "compute_hash": None,
        "enable_wandb": False,
        "distributor": "multiprocessing",
    }


def run_bare(
    shards: list[tuple[str, pa.Table]], config: DownloadConfig, root: Path, log: Path | None
) -> tuple[float, float, int]:
    """(seconds, seconds in img2dataset, successes) for one img2dataset call per shard; the URL lists are
    written before the clock starts."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from tasks.download import _img2dataset_download

    download = TimedDownload(_img2dataset_download())
    calls = []
    for shard_id, table in shards:
        url_list = root / shard_id / "urls.parquet"
        url_list.parent.mkdir(parents=True)
        pq.write_table(table.select(["sample_id", "url"]), url_list, compression="zstd")
        calls.append(bare_arguments(url_list, root / shard_id / "img2dataset", table.num_rows, config))
    with output_to(log):
        start = time.perf_counter()
        for arguments in calls:
            download(**arguments)
        seconds = time.perf_counter() - start
    successes = 0
    for arguments in calls:
        for path in Path(arguments["output_folder"]).glob("*.parquet"):
            status = pq.read_table(path, columns=["status"]).column("status")
            successes += pc.sum(pc.equal(status, "success")).as_py() or 0
    return seconds, download.seconds, successes


def keyword_stage_done(workdir: Path, shards: list[tuple[str, pa.Table]]) -> Layout:
    """A Layout whose keyword stage holds `shards` and is complete (markers and manifest), as the
    download stage expects to find it."""
    from storage.layout import Layout
    from storage.markers import Marker, write_marker
    from storage.schemas import KEYWORD_SCHEMA
    from tasks.harness import commit_shard, complete_stage, now
    from tasks.stage import ShardOutcome, decisions

    layout = Layout(workdir)
    fingerprint = "bench-keyword"
    for shard_id, table in shards:
        outcome = ShardOutcome(
            kept=table,
            decisions=decisions(table.column("sample_id"), table.column("source"), [None] * table.num_rows),
        )
        sha, counts = commit_shard(layout, "keyword", shard_id, outcome, KEYWORD_SCHEMA, RUN_ID, fingerprint)
        write_marker(
            layout,
            Marker("keyword", shard_id, fingerprint, {}, {shard_id: sha}, {shard_id: counts}, RUN_ID, now()),
        )
    complete_stage(
        layout,
        stage="keyword",
        upstream=None,
        unit_fingerprints={shard_id: fingerprint for shard_id, _ in shards},
        run_id=RUN_ID,
    )
    return layout


def run_stage(
    shards: list[tuple[str, pa.Table]], config: DownloadConfig, root: Path, log: Path | None
) -> tuple[float, float, int]:
    """(seconds, seconds in img2dataset, kept) for DOWNLOAD.run over every shard of a fresh work directory."""
    import tasks.download
    from rs5m.config import PipelineConfig
    from tasks.download import DOWNLOAD

    layout = keyword_stage_done(root, shards)
    download = TimedDownload(tasks.download._img2dataset_download())
    kept = 0
    with (
        output_to(log),
        mock.patch.object(tasks.download, "_img2dataset_download", lambda: download),
    ):
        start = time.perf_counter()
        pipeline = PipelineConfig(
            workdir=layout.root,
            sources=[{"name": "bench", "path": "-", "format": "parquet"}],
            download=config,
        )
        summaries = [DOWNLOAD.run(layout, shard_id, pipeline, RUN_ID) for shard_id, _ in shards]
        seconds = time.perf_counter() - start
    for summary in summaries:
        if summary.skipped:
            raise RuntimeError(f"shard {summary.shard_id} was skipped: the work directory was not fresh")
        kept += summary.counts.get("kept", 0)
    if download.seconds == 0:
        raise RuntimeError("the stage did not call tasks.download._img2dataset_download: the timing is void")
    return seconds, download.seconds, kept


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=1200, help="distinct images served (default 1200)")
    parser.add_argument("--shard-rows", type=int, default=400, help="rows per pipeline shard (default 400)")
    parser.add_argument("--processes", type=int, default=2, help="img2dataset processes_count (default 2)")
    parser.add_argument("--threads", type=int, default=16, help="img2dataset thread_count (default 16)")
    parser.add_argument("--timeout", type=float, default=10.0, help="per-request timeout in s (default 10)")
    parser.add_argument("--repeats", type=int, default=3, help="repetitions of each case; medians count")
    parser.add_argument("--verbose", action="store_true", help="show img2dataset's output")
    args = parser.parse_args()

    import pyarrow as pa

    from rs5m.config import DownloadConfig
    from tasks.download import _img2dataset_download

    config = DownloadConfig(
        processes=args.processes,
        threads=args.threads,
        timeout_s=args.timeout,
        allow_private_networks=True,  # the server is on 127.0.0.1
    )
    start = time.perf_counter()
    images = make_jpegs(args.images)
    made_s = time.perf_counter() - start
    server = ImageServer(images)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    urls = [f"http://127.0.0.1:{port}/img/{index}.jpg" for index in range(args.images)]
    shards = shard_tables(urls, args.shard_rows)
    _img2dataset_download()  # import img2dataset (and torch) before any clock starts

    with tempfile.TemporaryDirectory(prefix="bench_download_") as temp:
        temp_dir = Path(temp)
        log = None if args.verbose else Path(tempfile.gettempdir()) / "bench_download_img2dataset.log"
        if log is not None:
            log.write_text("")
        print(
            f"{args.images:,} JPEGs ({IMAGE_SIDE}x{IMAGE_SIDE}, mean {sum(map(len, images)) / len(images) / 1024:.1f} "
            f"KiB, made in {made_s:.1f} s) at http://127.0.0.1:{port}/; {len(shards)} pipeline shards of "
            f"<= {args.shard_rows} rows -> {len(shards)} img2dataset calls per case, each with "
            f"number_sample_per_shard={math.ceil(min(args.shard_rows, args.images) / args.processes)}, "
            f"processes={args.processes}, threads={args.threads}, timeout={args.timeout:g} s; "
            f"pyarrow {pa.__version__}, {os.cpu_count()} CPUs"
        )
        if log is not None:
            print(f"img2dataset output: {log}")
        print("warm-up: one untimed bare call over the first shard ...", flush=True)
        run_bare(shards[:1], config, temp_dir / "warmup", log)

        times: dict[str, list[float]] = {"bare": [], "stage": []}
        outside: dict[str, list[float]] = {"bare": [], "stage": []}
        runners = {"bare": run_bare, "stage": run_stage}
        print(
            f"{'rep':>3s}  {'case':5s}  {'wall s':>7s}  {'in img2dataset s':>16s}  {'outside s':>9s}  "
            f"{'images/s':>8s}  {'ok':>5s}"
        )
        for repeat in range(args.repeats):
            order = ("bare", "stage") if repeat % 2 == 0 else ("stage", "bare")
            for case in order:
                seconds, inside, ok = runners[case](shards, config, temp_dir / f"{case}-{repeat}", log)
                times[case].append(seconds)
                outside[case].append(seconds - inside)
                flag = "" if ok == args.images else f"  <- {args.images - ok} not downloaded"
                print(
                    f"{repeat:3d}  {case:5s}  {seconds:7.2f}  {inside:16.2f}  {seconds - inside:9.3f}  "
                    f"{args.images / seconds:8.1f}  {ok:5d}{flag}",
                    flush=True,
                )
        server.shutdown()

    ratios = [stage / bare for stage, bare in zip(times["stage"], times["bare"], strict=True)]
    bare_s, stage_s = statistics.median(times["bare"]), statistics.median(times["stage"])
    stage_outside_s = statistics.median(outside["stage"])
    print(
        f"median wall: bare {bare_s:.2f} s ({args.images / bare_s:.1f} images/s), stage {stage_s:.2f} s "
        f"({args.images / stage_s:.1f} images/s), {len(shards)} img2dataset calls each\n"
        f"stage/bare wall: {stage_s / bare_s:.3f} (ratio of medians), {statistics.median(ratios):.3f} "
        f"(median of per-repeat ratios: {', '.join(f'{r:.3f}' for r in ratios)})\n"
        f"stage time outside img2dataset: median {stage_outside_s * 1000:.0f} ms "
        f"({stage_outside_s / len(shards) * 1000:.0f} ms per shard) -> stage/bare without img2dataset's "
        f"start-up noise: {(bare_s + stage_outside_s) / bare_s:.3f}; target <= 1.10"
    )


if __name__ == "__main__":
    main()
