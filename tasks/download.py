"""download: fetch every sample's image with img2dataset and keep the original bytes, unchanged.

One img2dataset run per input shard, written as one img2dataset parquet shard inside a scratch directory
the caller owns. Reencoding is disabled, so nothing is decoded or resized here: a 200 response is kept
whatever its body is (HTML, a truncated JPEG, nothing at all) and the validate stage decodes and drops it.
img2dataset then reports no width/height, so none are carried. It honours X-Robots-Tag opt-outs (noai,
noimageai, noindex, noimageindex) by default; those rows are download_error.

img2dataset starts a worker pool and a logger process for every call; they fork from a forkserver that
imported img2dataset (which imports torch) once per run process (tasks/img2dataset_processes.py), where
spawned interpreters would import it again each time (~6 s of CPU per process).

URL safety (`url_block_reason`, in tasks.fetch) refuses, before any request, URLs whose scheme is not
http(s) and, unless `allow_private_networks` is set, URLs whose host is literally `localhost` or a
non-public IP address in any form the resolver accepts (dotted, integer, octal, hex, short forms such as
127.1, IPv6 including IPv4-mapped and 6to4, percent-encoded or full-width digits). The host is checked
both as `urllib.parse.urlsplit` reads it and as urllib, which img2dataset uses, will connect to it.

Inside img2dataset's workers (tasks.fetch, installed as img2dataset.main.Downloader):
- every redirect target passes the same check before it is requested (else blocked_url, detail
  "redirect to <url>: <why>"), and only http(s) handlers exist (no ftp://, file://);
- each URL has a total deadline, `max_seconds_per_url` (default 3 x timeout_s x attempts) over all its
  attempts and waits: a trickling body or header block ends as timeout;
- retries (`retries`) are for transient failures only (408, 425, 429, 500, 502-504, timeouts, resets,
  cut-short bodies), waiting as Retry-After asks (seconds or HTTP-date) up to `max_retry_after_s` and
  never past the deadline; a longer Retry-After ends the URL at once.

Not covered (the checks read URLs only, never the network):
- DNS names that resolve to private addresses (`internal.example.com -> 10.0.0.5`), including DNS
  rebinding: for the original URL and for redirect targets alike. Resolving here would be neither
  deterministic nor sufficient, as urllib resolves again.
- DNS resolution time: the system resolver's own timeouts apply, outside the per-URL deadline; so does
  connecting to each address of a host in turn (timeout_s each).
- The size of a body: one fast enough to arrive within the deadline is held in memory whole.
Deployments that fetch untrusted URLs next to private services need an egress control that sees every
connection: a firewall on the download host or a filtering proxy (urllib honours http_proxy/https_proxy).
"""

from __future__ import annotations

import functools
import importlib
import math
import signal
import types
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rs5m.config import DownloadConfig
from storage.atomic import write_parquet
from storage.schemas import DOWNLOAD_SCHEMA, KEYWORD_SCHEMA
from tasks.fetch import (
    REDIRECT_PREFIX,
    FetchPolicy,
    GuardedDownloader,
    default_max_seconds_per_url,
    policy_for_downloaders,
    url_block_reason,
)
from tasks.harness import Report, ShardStage
from tasks.stage import ShardOutcome, split_by_reason

__all__ = ["DOWNLOAD", "REASONS", "download_shard", "failure_reason", "fetch_policy", "url_block_reason"]

REASONS = {
    "blocked_url": "refused before any request: not http(s), malformed, or a localhost/non-public IP host; "
    "or a redirect to such a URL, refused before it is followed",
    "http_error": "the server answered with an HTTP error status (404, 403, 500, 429, ...)",
    "timeout": "nothing for download.timeout_s, or the URL's total time (download.max_seconds_per_url) ran out",
    "download_error": "any other failure: connection refused or reset, body cut short, DNS failure, "
    "X-Robots-Tag opt-out, ...",
}

NOT_REPORTED = "img2dataset reported no result for this URL"
IMAGE_COLUMN = "jpg"  # img2dataset's parquet writer names the bytes column after encode_format

# The columns read back from img2dataset's parquet output: one row per URL it reported.
RESULT_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("status", pa.string()),
        ("error_message", pa.string()),
        (IMAGE_COLUMN, pa.binary()),
    ]
)


def download_shard(table: pa.Table, config: DownloadConfig, scratch_dir: Path) -> ShardOutcome:
    """Download a KEYWORD_SCHEMA shard; survivors come back in DOWNLOAD_SCHEMA, in input order.

    `scratch_dir` must exist and be empty; img2dataset's url list and output go there and the caller
    deletes it. Raises when img2dataset produced no output at all (an environment problem).
    """
    sample_ids = table.column("sample_id")
    if pc.count_distinct(sample_ids).as_py() != table.num_rows:
        raise ValueError("duplicate sample_id in the download input: results are joined by sample_id")
    block_details = [
        url_block_reason(url, config.allow_private_networks) for url in table.column("url").to_pylist()
    ]
    to_fetch = [row for row, detail in enumerate(block_details) if detail is None]
    if to_fetch:
        results = _run_img2dataset(
            table.take(to_fetch).select(["sample_id", "url"]), config, Path(scratch_dir)
        )
    else:
        results = RESULT_SCHEMA.empty_table()

    # Row i of the input <- its img2dataset row; null where img2dataset wrote none (or it was blocked).
    result_rows = pc.index_in(sample_ids, value_set=results.column("sample_id"))
    statuses = results.column("status").take(result_rows).to_pylist()
    messages = results.column("error_message").take(result_rows).to_pylist()
    reasons: list[str | None] = []
    details: list[str | None] = []
    for block_detail, status, message in zip(block_details, statuses, messages, strict=True):
        if block_detail is not None:
            reasons.append("blocked_url")
            details.append(block_detail)
        elif status is None:
            reasons.append("download_error")
            details.append(NOT_REPORTED)
        elif status == "success":
            reasons.append(None)
            details.append(None)
        else:
            detail = message or f"img2dataset status {status} without an error message"
            reasons.append(failure_reason(detail))
            details.append(detail)

    reason_array = pa.array(reasons, pa.string())
    outcome = split_by_reason(table, reason_array, pa.array(details, pa.string()))
    images = results.column(IMAGE_COLUMN).take(result_rows).filter(pc.is_null(reason_array))
    survivors = outcome.kept.select(KEYWORD_SCHEMA.names)
    kept = pa.Table.from_arrays([*survivors.columns, images.cast(pa.large_binary())], schema=DOWNLOAD_SCHEMA)
    return ShardOutcome(kept=kept, decisions=outcome.decisions)


def failure_reason(error_message: str) -> str:
    """Map an error message from the workers (tasks.fetch, or img2dataset's urllib text) to a reason."""
    if error_message.startswith("HTTP Error "):  # urllib.error.HTTPError: "HTTP Error 404: Not Found"
        return "http_error"
    if error_message.startswith(REDIRECT_PREFIX):  # "redirect to <url>: <why>", refused before following
        return "blocked_url"
    if "timed out" in error_message.lower():  # "timed out: ...", "<urlopen error timed out>", ...
        return "timeout"
    return "download_error"


def fetch_policy(config: DownloadConfig) -> FetchPolicy:
    """The limits the workers apply to every URL, defaults resolved (see DownloadConfig)."""
    return FetchPolicy(
        max_seconds_per_url=config.max_seconds_per_url
        or default_max_seconds_per_url(config.timeout_s, config.retries),
        max_retry_after_s=config.timeout_s if config.max_retry_after_s is None else config.max_retry_after_s,
        allow_private_networks=config.allow_private_networks,
    )


def _run_img2dataset(requests: pa.Table, config: DownloadConfig, scratch_dir: Path) -> pa.Table:
    """One img2dataset run over `requests` (sample_id, url); its per-URL rows (sample_id, status, ...)."""
    if any(scratch_dir.iterdir()):
        # img2dataset skips shards it finds already done in its output folder: stale results would be read.
        raise ValueError(f"scratch directory {scratch_dir} is not empty")
    url_list = scratch_dir / "urls.parquet"
    output_folder = scratch_dir / "img2dataset"
    write_parquet(url_list, requests)
    download = _img2dataset_download()
    with policy_for_downloaders(fetch_policy(config)):  # picked up by GuardedDownloader, in this thread
        download(
            url_list=str(url_list),
            input_format="parquet",
            url_col="url",
            save_additional_columns=["sample_id"],
            output_folder=str(output_folder),
            output_format="parquet",
            # img2dataset gives each of its shards to one process: split ours so every process has work.
            number_sample_per_shard=math.ceil(requests.num_rows / config.processes),
            processes_count=config.processes,
            thread_count=config.threads,
            timeout=config.timeout_s,
            retries=config.retries,
            user_agent_token=config.user_agent_token,
            disable_all_reencoding=True,
            encode_format=IMAGE_COLUMN,
            extract_exif=False,
            compute_hash=None,  # validate hashes the bytes it keeps
            enable_wandb=False,
            distributor="multiprocessing",
        )
    outputs = sorted(output_folder.glob("*.parquet"))
    if not outputs:
        raise RuntimeError(
            f"img2dataset wrote no output for {requests.num_rows} URLs (its own output shows with --verbose)"
        )
    return pa.concat_tables(pq.read_table(path, columns=RESULT_SCHEMA.names) for path in outputs)


# img2dataset.download installs a SIGINT handler (delete its temp folder, then sys.exit(0)). That raises
# outside the main thread, where Prefect runs tasks, and would turn Ctrl-C on a whole run into exit code 0.
_NO_SIGNAL_HANDLERS = types.SimpleNamespace(SIGINT=signal.SIGINT, signal=lambda signalnum, handler: None)


def _img2dataset_download() -> Callable[..., None]:
    """img2dataset.download (imported on first use: the import is slow), callable from any thread, its
    workers fetching through tasks.fetch when called inside `policy_for_downloaders`, its output shown
    only when the run is verbose (tasks/img2dataset_output.py)."""
    from tasks.img2dataset_output import follow_verbosity  # imports img2dataset
    from tasks.img2dataset_processes import start_from_forkserver

    main = importlib.import_module("img2dataset.main")  # `img2dataset.main` the attribute is a function
    follow_verbosity()  # its own output reaches the terminal only when the run is verbose
    start_from_forkserver()  # its processes fork from one that has img2dataset imported
    main.signal = _NO_SIGNAL_HANDLERS
    main.Downloader = GuardedDownloader  # pickled to the workers, where it installs the guards
    return main.download


DOWNLOAD = ShardStage(
    name="download",
    upstream="keyword",
    reasons=REASONS,
    sections=("download",),
    code_version="1",
    report=Report("downloaded", "kept"),
    retries=2,
    retry_delays_s=(5, 30),
    concurrency="download_concurrency",
    forks_processes=True,
    adds=(DOWNLOAD_SCHEMA.field("image"),),
    make_processor=lambda config: functools.partial(download_shard, config=config.download),
    needs_scratch=True,
)
