"""Hostile servers against the real download path (download_shard -> img2dataset's spawned workers ->
tasks.fetch): every URL ends within a bound computed from the config, with exactly one decision and the
right reason, and the servers' own request logs show how many attempts each URL got.

Two download_shard calls (img2dataset costs ~4 s of start-up each):
- `direct`: every fault on a loopback server, allow_private_networks=True as in tests/test_download.py.
- `proxied`: allow_private_networks=False, the production setting. With it a 127.0.0.1 URL is refused
  before any request, so the URLs name public-looking hosts (img.example.com) and reach the loopback
  server through an HTTP proxy (http_proxy, honoured by urllib in the workers; no_proxy lets 127.0.0.1 be
  reached directly, as it would be without a proxy). The proxy serves the faults itself: for urllib this
  is what a public host answering with a redirect to a private address looks like, and the proxy's log
  records every URL urllib requests, redirect targets included.
The details asserted ("... (after 2 attempts)", "redirect to ...", the deadline) are written only by
tasks.fetch: if its guards were not active inside the workers, these tests would fail.
"""

from __future__ import annotations

import dataclasses
import email.utils
import http.server
import importlib
import io
import math
import pickle
import socket
import struct
import threading
import time
import types
import urllib.parse
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

from rs5m.config import DownloadConfig
from storage.schemas import KEPT
from tasks import fetch
from tasks.download import download_shard, failure_reason, fetch_policy
from tests.helpers import free_port, keyword_shard

IMG2DATASET_STARTUP_S = 60.0  # img2dataset's start-up: ~4 s, 15-25 s seen on a loaded 2-core machine
IMG2DATASET_TAIL_S = 10.0  # after the last URL: writing its parquet shard, stopping its processes
TRICKLE_INTERVAL_S = 0.4
TRICKLE_LIMIT_S = 120.0  # a trickle ends by itself (past any bound here): without the guards, tests fail
UA_TOKEN = "rs5m-fault-test"


def _jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise((96, 96), 64).convert("RGB").save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


JPEG = _jpeg()


@dataclasses.dataclass(frozen=True)
class Request:
    host: str
    path: str
    at: float  # time.monotonic()
    wall: float  # time.time()
    user_agent: str | None


class FaultServer(http.server.ThreadingHTTPServer):
    """Serves one fault per path (FAULTS) and logs every request and every accepted connection."""

    daemon_threads = True
    request_queue_size = 128  # 30 connections at once: a full backlog would delay connects past timeout_s

    def __init__(self, redirect_port: int = 0) -> None:
        super().__init__(("127.0.0.1", 0), _FaultHandler)
        self.redirect_port = redirect_port  # where the redirect faults point
        self.lock = threading.Lock()
        self.requests: list[Request] = []
        self.connections = 0
        self.trickle_ended: dict[str, float] = {}  # path -> time.monotonic() when the client went away
        self.retry_at = 0.0  # the HTTP-date the /retry-after-date path asked for, as time.time()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)

    @property
    def port(self) -> int:
        return self.server_address[1]

    def verify_request(self, request: object, client_address: object) -> bool:
        with self.lock:
            self.connections += 1
        return True

    def record(self, request: Request) -> int:
        """Log `request`; how many requests its path has had, this one included."""
        with self.lock:
            self.requests.append(request)
            return sum(1 for r in self.requests if (r.host, r.path) == (request.host, request.path))

    def log_for(self, path: str, host: str | None = None) -> list[Request]:
        with self.lock:
            return [r for r in self.requests if r.path == path and (host is None or r.host == host)]

    def trickle_end(self, path: str) -> float:
        """When the client of a trickled response went away. The server notices at its next write, up to
        one interval after the download call returned."""
        waited_until = time.monotonic() + 5 * TRICKLE_INTERVAL_S
        while time.monotonic() < waited_until:
            with self.lock:
                if path in self.trickle_ended:
                    return self.trickle_ended[path]
            time.sleep(TRICKLE_INTERVAL_S / 4)
        raise AssertionError(f"the server never saw the client of {path} go away")

    def start(self) -> FaultServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        self.shutdown()
        self.server_close()
        self.thread.join()


class _FaultHandler(http.server.BaseHTTPRequestHandler):
    server: FaultServer

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the stdlib's signature
        pass

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        # A proxy gets the absolute URL in the request line (GET http://img.example.com/ok.jpg HTTP/1.1).
        parts = urllib.parse.urlsplit(self.path)
        host = parts.netloc if parts.scheme else self.headers.get("Host", "")
        path = parts.path if parts.scheme else self.path
        number = self.server.record(
            Request(host, path, time.monotonic(), time.time(), self.headers["User-Agent"])
        )
        getattr(self, FAULTS.get(path, "not_found"))(path, number)

    # -- answers --

    def _send(
        self, status: int, body: bytes, headers: dict[str, str] | None = None, length: int | None = None
    ):
        try:
            self.send_response(status)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body) if length is None else length))
            self.end_headers()
            self.wfile.write(body)
        except OSError:  # the client went away
            pass
        self.close_connection = True

    def _reset(self) -> None:
        """Close with a TCP RST (SO_LINGER 0), not a FIN."""
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.rfile.close()  # its reference would keep the socket open past close()
        self.connection.close()
        self.close_connection = True

    def _trickle(self, path: str, prefix: bytes) -> None:
        started = time.monotonic()
        try:
            self.wfile.write(prefix)
            while (
                not self.server.stopping.wait(TRICKLE_INTERVAL_S)
                and time.monotonic() - started < TRICKLE_LIMIT_S
            ):
                self.wfile.write(b"x")
        except OSError:  # the client gave up: when is what the test checks
            with self.server.lock:
                self.server.trickle_ended[path] = time.monotonic()
        self.close_connection = True

    def ok(self, path: str, number: int) -> None:
        self._send(200, JPEG, {"Content-Type": "image/jpeg"})

    def not_found(self, path: str, number: int) -> None:
        self._send(404, b"not found", {"Content-Type": "text/plain"})

    def retry_after_once(self, path: str, number: int) -> None:
        if number == 1:
            self._send(429, b"slow down", {"Retry-After": "1"})
        else:
            self.ok(path, number)

    def retry_after_always(self, path: str, number: int) -> None:
        self._send(429, b"slow down", {"Retry-After": "1"})

    def retry_after_date_once(self, path: str, number: int) -> None:
        if number == 1:
            self.server.retry_at = math.ceil(time.time()) + 2  # 2-3 s from now: HTTP-dates have whole seconds
            self._send(
                503, b"back later", {"Retry-After": email.utils.formatdate(self.server.retry_at, usegmt=True)}
            )
        else:
            self.ok(path, number)

    def retry_after_too_long(self, path: str, number: int) -> None:
        self._send(429, b"slow down", {"Retry-After": "30"})

    def error_500(self, path: str, number: int) -> None:
        self._send(500, b"oops")

    def error_503(self, path: str, number: int) -> None:
        self._send(503, b"unavailable")

    def reset_in_headers(self, path: str, number: int) -> None:
        self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Ty")
        self._reset()

    def reset_in_body(self, path: str, number: int) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(JPEG)))
        self.end_headers()
        self.wfile.write(JPEG[: len(JPEG) // 2])
        self._reset()

    def short_body(self, path: str, number: int) -> None:
        self._send(200, JPEG, {"Content-Type": "image/jpeg"}, length=len(JPEG) + 1000)  # then a clean close

    def hang_up(self, path: str, number: int) -> None:
        self.close_connection = True  # no status line at all

    def trickle_body(self, path: str, number: int) -> None:
        self._trickle(path, b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nContent-Length: 100000\r\n\r\n")

    def trickle_headers(self, path: str, number: int) -> None:
        self._trickle(path, b"HTTP/1.1 200 OK\r\nX-Slow: ")

    def opted_out(self, path: str, number: int) -> None:
        self._send(200, JPEG, {"Content-Type": "image/jpeg", "X-Robots-Tag": "noai"})

    def _redirect(self, location: str) -> None:
        self._send(302, b"", {"Location": location})

    def redirect_ftp(self, path: str, number: int) -> None:
        self._redirect(f"ftp://127.0.0.1:{self.server.redirect_port}/a.jpg")

    def redirect_file(self, path: str, number: int) -> None:
        self._redirect("file:///etc/passwd")

    def redirect_loopback(self, path: str, number: int) -> None:
        self._redirect(f"http://127.0.0.1:{self.server.redirect_port}/target.jpg")

    def redirect_metadata(self, path: str, number: int) -> None:
        self._redirect("http://169.254.169.254/latest/meta-data/")

    def redirect_public(self, path: str, number: int) -> None:
        self._redirect("http://cdn.example.org/target.jpg")


FAULTS = {
    "/ok.jpg": "ok",
    "/target.jpg": "ok",
    "/missing.jpg": "not_found",
    "/retry-after-once.jpg": "retry_after_once",
    "/retry-after-always.jpg": "retry_after_always",
    "/retry-after-date.jpg": "retry_after_date_once",
    "/retry-after-too-long.jpg": "retry_after_too_long",
    "/error-500.jpg": "error_500",
    "/error-503.jpg": "error_503",
    "/reset-in-headers.jpg": "reset_in_headers",
    "/reset-in-body.jpg": "reset_in_body",
    "/short-body.jpg": "short_body",
    "/hang-up.jpg": "hang_up",
    "/trickle-body.jpg": "trickle_body",
    "/trickle-headers.jpg": "trickle_headers",
    "/opted-out.jpg": "opted_out",
    "/redirect-ftp.jpg": "redirect_ftp",
    "/redirect-file.jpg": "redirect_file",
    "/redirect-loopback.jpg": "redirect_loopback",
    "/redirect-metadata.jpg": "redirect_metadata",
    "/redirect-public.jpg": "redirect_public",
}


def run_bound_s(config: DownloadConfig, urls: int) -> float:
    """How long one download_shard call may take: start-up, every URL within its deadline, the tail."""
    rounds = math.ceil(urls / (config.threads * config.processes))
    return IMG2DATASET_STARTUP_S + rounds * fetch_policy(config).max_seconds_per_url + IMG2DATASET_TAIL_S


def _download(urls: list[str], config: DownloadConfig, scratch: Path) -> types.SimpleNamespace:
    """download_shard from a worker thread, as Prefect runs it; fails (instead of hanging) past the bound."""
    shard = keyword_shard(urls)
    bound = run_bound_s(config, len(urls))
    pool = ThreadPoolExecutor(max_workers=1)
    started = time.monotonic()
    try:
        outcome = pool.submit(download_shard, shard, config, scratch).result(timeout=bound + 5)
    finally:
        pool.shutdown(wait=False)
    finished = time.monotonic()
    seconds = finished - started
    ids = shard.column("sample_id").to_pylist()
    decisions = {row["sample_id"]: row for row in outcome.decisions.to_pylist()}
    kept = {row["sample_id"]: row["image"] for row in outcome.kept.to_pylist()}
    return types.SimpleNamespace(
        shard=shard,
        outcome=outcome,
        started=started,
        finished=finished,
        seconds=seconds,
        bound=bound,
        decision={url: decisions[sid] for url, sid in zip(urls, ids, strict=True)},
        image={url: kept.get(sid) for url, sid in zip(urls, ids, strict=True)},
    )


@pytest.fixture(scope="module")
def target() -> Iterator[FaultServer]:
    """Where the refused redirects point: it must never see a connection."""
    server = FaultServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def origin(target: FaultServer) -> Iterator[FaultServer]:
    server = FaultServer(redirect_port=target.port).start()
    yield server
    server.stop()


# -- direct: every fault, on loopback ------------------------------------------------------------------

DIRECT_CONFIG = DownloadConfig(
    processes=1,
    threads=32,
    timeout_s=1.0,  # a trickle of one byte every 0.4 s never trips it
    retries=1,
    max_retry_after_s=3.0,  # room for the HTTP-date form (2-3 s)
    user_agent_token=UA_TOKEN,
    allow_private_networks=True,
)
DEADLINE_S = fetch_policy(DIRECT_CONFIG).max_seconds_per_url  # 3 x 1 s x 2 attempts = 6 s

# path -> (reason or KEPT, requests the server must see, detail fragments)
DIRECT_EXPECTED: dict[str, tuple[str, int, tuple[str, ...]]] = {
    "/ok.jpg": (KEPT, 1, ()),
    "/missing.jpg": ("http_error", 1, ("HTTP Error 404: Not Found",)),  # final: not retried
    "/retry-after-once.jpg": (KEPT, 2, ()),
    "/retry-after-always.jpg": ("http_error", 2, ("HTTP Error 429: Too Many Requests (after 2 attempts)",)),
    "/retry-after-date.jpg": (KEPT, 2, ()),
    "/retry-after-too-long.jpg": (
        "http_error",
        1,
        ("HTTP Error 429", "not retried: Retry-After 30 s is over download.max_retry_after_s (3 s)"),
    ),
    "/error-500.jpg": ("http_error", 2, ("HTTP Error 500: Internal Server Error (after 2 attempts)",)),
    "/error-503.jpg": ("http_error", 2, ("HTTP Error 503: Service Unavailable (after 2 attempts)",)),
    "/reset-in-headers.jpg": ("download_error", 2, ("connection reset by the server", "after 2 attempts")),
    "/reset-in-body.jpg": ("download_error", 2, ("connection reset by the server", "after 2 attempts")),
    "/short-body.jpg": (
        "download_error",
        2,
        (
            f"body cut short: the connection ended after {len(JPEG)} of {len(JPEG) + 1000} bytes",
            "after 2 attempts",
        ),
    ),
    "/hang-up.jpg": ("download_error", 2, ("the server closed the connection without a response",)),
    "/trickle-body.jpg": (
        "timeout",
        1,
        (f"the URL's {DEADLINE_S:g} s limit (download.max_seconds_per_url) passed while reading the body",),
    ),
    "/trickle-headers.jpg": ("timeout", 1, ("passed before the response headers were complete",)),
    "/opted-out.jpg": ("download_error", 1, ("Use of image disallowed by X-Robots-Tag directive",)),
    "/redirect-ftp.jpg": (
        "blocked_url",
        1,
        ("redirect to ftp://127.0.0.1:", "/a.jpg: scheme 'ftp' is not http or https"),
    ),
    "/redirect-file.jpg": (
        "blocked_url",
        1,
        ("redirect to file:///etc/passwd: scheme 'file' is not http or https",),
    ),
    "/redirect-loopback.jpg": (KEPT, 1, ()),  # allow_private_networks=True: followed
}


@pytest.fixture(scope="module")
def direct(
    origin: FaultServer, target: FaultServer, tmp_path_factory: pytest.TempPathFactory
) -> types.SimpleNamespace:
    base = f"http://127.0.0.1:{origin.port}"
    urls = [base + path for path in DIRECT_EXPECTED]
    urls.append(f"http://127.0.0.1:{free_port()}/refused.jpg")
    run = _download(urls, DIRECT_CONFIG, tmp_path_factory.mktemp("faults-direct"))
    run.base = base
    first, last = (f(r.at for r in origin.requests) - run.started for f in (min, max))
    print(
        f"direct run: {run.seconds:.1f} s for {len(urls)} URLs (bound {run.bound:.0f} s), requests {first:.1f}-{last:.1f} s"
    )
    return run


def test_direct_run_ends_within_the_bound(direct: types.SimpleNamespace, origin: FaultServer) -> None:
    assert direct.seconds < direct.bound
    # Start-up aside: from the first request on, every URL ended within its deadline.
    first = min(request.at for request in origin.requests)
    assert direct.finished - first < DEADLINE_S + IMG2DATASET_TAIL_S


def test_every_url_has_one_decision(direct: types.SimpleNamespace) -> None:
    decisions = direct.outcome.decisions
    assert decisions.column("sample_id").to_pylist() == direct.shard.column("sample_id").to_pylist()


@pytest.mark.parametrize("path", list(DIRECT_EXPECTED))
def test_each_fault_gets_its_reason_and_attempts(
    direct: types.SimpleNamespace, origin: FaultServer, path: str
) -> None:
    expected_fate, expected_requests, fragments = DIRECT_EXPECTED[path]
    decision = direct.decision[direct.base + path]
    if expected_fate == KEPT:
        assert (decision["fate"], decision["reason"], decision["detail"]) == (KEPT, None, None)
    else:
        assert decision["reason"] == expected_fate, decision["detail"]
        assert failure_reason(decision["detail"]) == expected_fate
        for fragment in fragments:
            assert fragment in decision["detail"]
    assert len(origin.log_for(path)) == expected_requests


def test_a_refused_connection_is_retried_then_download_error(direct: types.SimpleNamespace) -> None:
    (decision,) = [d for url, d in direct.decision.items() if url.endswith("/refused.jpg")]
    assert decision["reason"] == "download_error"
    assert decision["detail"].startswith(
        "connection refused (ConnectionRefusedError: [Errno 111] Connection refused)"
    )
    assert decision["detail"].endswith("(after 2 attempts)")


def test_kept_bytes_are_the_served_bytes(direct: types.SimpleNamespace) -> None:
    for path in ("/ok.jpg", "/retry-after-once.jpg", "/retry-after-date.jpg", "/redirect-loopback.jpg"):
        assert direct.image[direct.base + path] == JPEG, path


def test_retry_after_seconds_is_waited_for(direct: types.SimpleNamespace, origin: FaultServer) -> None:
    for path in ("/retry-after-once.jpg", "/retry-after-always.jpg"):
        first, second = origin.log_for(path)
        assert second.at - first.at >= 1.0, path


def test_retry_after_http_date_is_waited_for(direct: types.SimpleNamespace, origin: FaultServer) -> None:
    first, second = origin.log_for("/retry-after-date.jpg")
    assert second.wall >= origin.retry_at - 0.01
    assert second.at - first.at >= 1.0


def test_a_trickling_body_ends_at_the_deadline_not_at_its_end(
    direct: types.SimpleNamespace, origin: FaultServer
) -> None:
    for path in ("/trickle-body.jpg", "/trickle-headers.jpg"):
        (request,) = origin.log_for(path)
        lasted = origin.trickle_end(path) - request.at
        # One byte every 0.4 s kept the 1 s timeout from tripping; the 6 s deadline ended it (the server
        # notices the client gone at its next write, within ~2 intervals).
        assert DEADLINE_S - 1 <= lasted <= DEADLINE_S + 3, (path, lasted)
    received = direct.decision[direct.base + "/trickle-body.jpg"]["detail"]
    assert int(received.split("(")[-1].split(" bytes")[0]) >= 10  # many reads, each within timeout_s


def test_refused_redirects_reach_nothing(direct: types.SimpleNamespace, target: FaultServer) -> None:
    assert target.connections == 1  # only /redirect-loopback.jpg's target, allowed here; never the ftp one
    assert [r.path for r in target.requests] == ["/target.jpg"]


def test_the_user_agent_is_img2datasets(direct: types.SimpleNamespace, origin: FaultServer) -> None:
    (request,) = origin.log_for("/ok.jpg")
    assert request.user_agent == fetch.user_agent(UA_TOKEN)
    assert request.user_agent.endswith(f"(compatible; {UA_TOKEN}; +https://github.com/rom1504/img2dataset)")


# -- proxied: allow_private_networks=False, public-looking hosts ----------------------------------------

PROXIED_CONFIG = DownloadConfig(
    processes=1, threads=8, timeout_s=3.0, retries=0, allow_private_networks=False
)
PROXIED_PATHS = ["/ok.jpg", "/redirect-loopback.jpg", "/redirect-metadata.jpg", "/redirect-public.jpg"]
PUBLIC_HOST = "img.example.com"


@pytest.fixture(scope="module")
def proxied(tmp_path_factory: pytest.TempPathFactory) -> Iterator[types.SimpleNamespace]:
    target = FaultServer().start()
    proxy = FaultServer(redirect_port=target.port).start()
    urls = [f"http://{PUBLIC_HOST}{path}" for path in PROXIED_PATHS]
    with pytest.MonkeyPatch.context() as env:
        for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "all_proxy", "https_proxy", "NO_PROXY"):
            env.delenv(name, raising=False)
        env.setenv("http_proxy", f"http://127.0.0.1:{proxy.port}")  # read by the spawned workers
        env.setenv("no_proxy", "127.0.0.1,localhost")  # a followed loopback redirect would go direct
        run = _download(urls, PROXIED_CONFIG, tmp_path_factory.mktemp("faults-proxied"))
    run.proxy, run.target = proxy, target
    print(f"proxied run: {run.seconds:.1f} s for {len(urls)} URLs (bound {run.bound:.0f} s)")
    yield run
    proxy.stop()
    target.stop()


def test_proxied_run_ends_within_the_bound(proxied: types.SimpleNamespace) -> None:
    assert proxied.seconds < proxied.bound


def test_public_urls_and_public_redirects_are_fetched(proxied: types.SimpleNamespace) -> None:
    for path in ("/ok.jpg", "/redirect-public.jpg"):
        decision = proxied.decision[f"http://{PUBLIC_HOST}{path}"]
        assert decision["fate"] == KEPT, decision["detail"]
        assert proxied.image[f"http://{PUBLIC_HOST}{path}"] == JPEG
    assert len(proxied.proxy.log_for("/target.jpg", host="cdn.example.org")) == 1  # the redirect, followed


def test_a_redirect_to_a_private_address_is_refused_before_any_request(
    proxied: types.SimpleNamespace,
) -> None:
    loopback = proxied.decision[f"http://{PUBLIC_HOST}/redirect-loopback.jpg"]
    assert loopback["reason"] == "blocked_url"
    assert loopback["detail"] == (
        f"redirect to http://127.0.0.1:{proxied.target.port}/target.jpg: "
        "host '127.0.0.1' is a non-public address (loopback: 127.0.0.1)"
    )
    metadata = proxied.decision[f"http://{PUBLIC_HOST}/redirect-metadata.jpg"]
    assert metadata["reason"] == "blocked_url"
    assert metadata["detail"].startswith("redirect to http://169.254.169.254/latest/meta-data/: ")
    assert "link-local" in metadata["detail"]
    assert proxied.target.connections == 0
    assert {r.host for r in proxied.proxy.requests} == {PUBLIC_HOST, "cdn.example.org"}
    assert len(proxied.proxy.log_for("/redirect-loopback.jpg")) == 1


# -- pure parts ------------------------------------------------------------------------------------------


def test_retry_after_forms() -> None:
    now = 1_700_000_000.0
    assert fetch.retry_after_seconds(None) is None
    assert fetch.retry_after_seconds("1") == 1.0
    assert fetch.retry_after_seconds(" 120 ") == 120.0
    assert fetch.retry_after_seconds(email.utils.formatdate(now + 30, usegmt=True), now=now) == 30.0
    assert fetch.retry_after_seconds(email.utils.formatdate(now - 30, usegmt=True), now=now) == 0.0
    assert fetch.retry_after_seconds("Wed, 21 Oct 2015 07:28:00 -0000", now=1445412480.0 - 5) == 5.0
    for unreadable in ("", "soon", "-1", "1.5", "Wed, 99 Foo 2015"):
        assert fetch.retry_after_seconds(unreadable) is None, unreadable


def test_default_limits_follow_timeout_and_retries() -> None:
    policy = fetch_policy(DownloadConfig(timeout_s=10, retries=2))
    assert (policy.max_seconds_per_url, policy.max_retry_after_s) == (90.0, 10.0)
    policy = fetch_policy(DownloadConfig(timeout_s=10, max_seconds_per_url=12, max_retry_after_s=0))
    assert (policy.max_seconds_per_url, policy.max_retry_after_s) == (12.0, 0.0)


@pytest.mark.parametrize(
    ("detail", "reason"),
    [
        ("redirect to file:///etc/passwd: scheme 'file' is not http or https", "blocked_url"),
        ("HTTP Error 503: Service Unavailable (after 2 attempts)", "http_error"),
        (
            "timed out: the URL's 6 s limit (download.max_seconds_per_url) passed while reading the body",
            "timeout",
        ),
        ("timed out: no progress for 2 s before the response headers were complete", "timeout"),
        ("connection reset by the server while reading the body (12 bytes received)", "download_error"),
        ("body cut short: the connection ended after 1 of 2 bytes (Content-Length)", "download_error"),
    ],
)
def test_fetch_details_map_to_reasons(detail: str, reason: str) -> None:
    assert failure_reason(detail) == reason


def test_a_newer_img2dataset_without_the_hook_is_refused() -> None:
    class Downloader:
        def download_shard(self, row: object) -> None:
            return None

    without = types.SimpleNamespace(Downloader=Downloader, download_image_with_retry=lambda *a: None)
    with pytest.raises(RuntimeError, match="no longer calls download_image_with_retry"):
        fetch.check_hook_point(without)


def test_guarded_downloader_takes_the_policy_of_its_thread_only(direct: types.SimpleNamespace) -> None:
    # After `direct`: img2dataset is imported here already, and tasks.download has installed the stand-in.
    img2dataset_main = importlib.import_module("img2dataset.main")
    downloader = importlib.import_module("img2dataset.downloader")
    assert img2dataset_main.Downloader is fetch.GuardedDownloader
    fetch.check_hook_point(downloader)  # img2dataset 1.47 calls download_image_with_retry by name
    arguments = {
        "sample_writer_class": None,
        "resizer": None,
        "thread_count": 1,
        "save_caption": False,
        "extract_exif": False,
        "output_folder": "unused",
        "column_list": ["url"],
        "timeout": 1,
        "number_sample_per_shard": 1,
        "oom_shard_count": 1,
        "compute_hash": None,
        "verify_hash_type": None,
        "encode_format": "jpg",
        "retries": 0,
        "user_agent_token": None,
        "disallowed_header_directives": None,
    }
    assert fetch.GuardedDownloader(**arguments).policy is None  # a bare img2dataset.download call: unchanged
    policy = fetch_policy(DIRECT_CONFIG)
    with fetch.policy_for_downloaders(policy):
        guarded = fetch.GuardedDownloader(**arguments)
        with ThreadPoolExecutor(max_workers=1) as pool:  # another thread's downloaders are not affected
            assert pool.submit(lambda: fetch.GuardedDownloader(**arguments).policy).result() is None
    assert pickle.loads(pickle.dumps(guarded)).policy == policy  # what the spawned workers receive
    assert isinstance(guarded.downloader, downloader.Downloader)
