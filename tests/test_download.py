"""tasks/download.py: URL blocking (pure) and one real img2dataset run against a loopback HTTP server."""

from __future__ import annotations

import hashlib
import http.server
import io
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pytest
from PIL import Image

from rs5m.config import DownloadConfig
from storage.schemas import DOWNLOAD_SCHEMA, KEPT, KEYWORD_SCHEMA
from tasks import download
from tasks.download import REASONS, download_shard, failure_reason, url_block_reason
from tests.helpers import free_port, keyword_shard

SLOW_SECONDS = (
    120.0  # far beyond the timeout (and a loaded machine's slowest run): the run must not wait for it
)
TIMEOUT_SECONDS = 3.0  # generous: a loaded 2-core machine must not turn fast answers into timeouts


def _image_bytes(fmt: str, colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), colour).save(buffer, fmt)
    return buffer.getvalue()


JPEG = _image_bytes("JPEG", (20, 120, 200))
PNG = _image_bytes("PNG", (200, 40, 10))
HTML = b"<!doctype html><html><body>not an image</body></html>"
TRUNCATED_JPEG = JPEG[: len(JPEG) // 2]

# path -> (status, content type, body)
ROUTES: dict[str, tuple[int, str, bytes]] = {
    "/a.jpg": (200, "image/jpeg", JPEG),
    "/b.png": (200, "image/png", PNG),
    "/missing.jpg": (404, "text/plain", b"not found"),
    "/page.html": (200, "text/html", HTML),
    "/truncated.jpg": (200, "image/jpeg", TRUNCATED_JPEG),
}


class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the stdlib's signature
        pass

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        if self.path == "/slow.jpg":
            time.sleep(SLOW_SECONDS)
            status, content_type, body = ROUTES["/a.jpg"]
        elif self.path == "/redirect.jpg":
            self.send_response(302)
            self.send_header("Location", "/a.jpg")
            self.end_headers()
            return
        elif self.path == "/opted-out.jpg":
            status, content_type, body = ROUTES["/a.jpg"]
            self.send_response(status)
            self.send_header("X-Robots-Tag", "noai")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        else:
            status, content_type, body = ROUTES.get(self.path, (404, "text/plain", b""))
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up on /slow.jpg
            pass


@pytest.fixture(scope="module")
def server_url() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True  # the /slow.jpg handler must not keep the test process alive
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def _config(**overrides: object) -> DownloadConfig:
    fields = {"processes": 1, "threads": 8, "timeout_s": TIMEOUT_SECONDS, "allow_private_networks": True}
    return DownloadConfig(**{**fields, **overrides})


def _by_id(table: pa.Table) -> dict[str, dict]:
    return {row["sample_id"]: row for row in table.to_pylist()}


# The paths requested by the one real img2dataset run, in input order.
RUN_PATHS = [
    "/a.jpg",
    "/missing.jpg",
    "/b.png",
    "/page.html",
    "/slow.jpg",
    "/truncated.jpg",
    "/redirect.jpg",
    "/opted-out.jpg",
]


@pytest.fixture(scope="module")
def run(server_url: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One download_shard call, made from a worker thread as Prefect's task runner does."""
    urls = [server_url + path for path in RUN_PATHS]
    urls += [f"http://127.0.0.1:{free_port()}/refused.jpg", "ftp://127.0.0.1/a.jpg"]
    shard = keyword_shard(urls)
    scratch = tmp_path_factory.mktemp("download-scratch")
    sigint_before = signal.getsignal(signal.SIGINT)
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=1) as pool:
        outcome = pool.submit(download_shard, shard, _config(), scratch).result()
    return {
        "shard": shard,
        "outcome": outcome,
        "seconds": time.perf_counter() - started,
        "sigint_before": sigint_before,
        "decisions": _by_id(outcome.decisions),
        "ids": dict(zip(RUN_PATHS + ["refused", "ftp"], shard.column("sample_id").to_pylist(), strict=True)),
    }


def test_every_row_gets_exactly_one_decision_in_input_order(run: dict) -> None:
    decisions = run["outcome"].decisions
    assert decisions.column("sample_id").to_pylist() == run["shard"].column("sample_id").to_pylist()
    assert set(decisions.column("reason").drop_null().to_pylist()) <= set(REASONS)


def test_kept_rows_hold_the_served_bytes_unchanged(run: dict) -> None:
    kept = run["outcome"].kept
    assert kept.schema == DOWNLOAD_SCHEMA
    served = {"/a.jpg": JPEG, "/b.png": PNG, "/page.html": HTML, "/truncated.jpg": TRUNCATED_JPEG}
    served["/redirect.jpg"] = JPEG  # urllib follows the 302 inside img2dataset
    kept_rows = _by_id(kept)
    for path, body in served.items():
        image = kept_rows[run["ids"][path]]["image"]
        assert hashlib.sha256(image).hexdigest() == hashlib.sha256(body).hexdigest(), path


def test_html_and_truncated_bodies_are_kept_for_validate_to_judge(run: dict) -> None:
    for path in ("/page.html", "/truncated.jpg"):
        assert run["decisions"][run["ids"][path]]["fate"] == KEPT


def test_survivors_keep_their_columns_and_input_order(run: dict) -> None:
    kept = run["outcome"].kept
    shard_rows = _by_id(run["shard"])
    kept_ids = kept.column("sample_id").to_pylist()
    assert kept_ids == [sid for sid in run["shard"].column("sample_id").to_pylist() if sid in set(kept_ids)]
    for row in kept.to_pylist():
        assert {name: row[name] for name in KEYWORD_SCHEMA.names} == shard_rows[row["sample_id"]]


@pytest.mark.parametrize(
    ("path", "reason", "detail"),
    [
        ("/missing.jpg", "http_error", "HTTP Error 404: Not Found"),
        ("/slow.jpg", "timeout", "timed out"),
        ("/opted-out.jpg", "download_error", "Use of image disallowed by X-Robots-Tag directive"),
        ("refused", "download_error", "Connection refused"),
        ("ftp", "blocked_url", "scheme 'ftp' is not http or https"),
    ],
)
def test_failures_get_their_reason_and_img2datasets_message(
    run: dict, path: str, reason: str, detail: str
) -> None:
    decision = run["decisions"][run["ids"][path]]
    assert decision["reason"] == reason
    assert detail in decision["detail"]


def test_the_timeout_bounds_the_run(run: dict) -> None:
    assert run["seconds"] < SLOW_SECONDS


def test_runs_outside_the_main_thread_and_leaves_sigint_alone(run: dict) -> None:
    # The module fixture ran download_shard in a worker thread; img2dataset's own handler would be installed.
    assert signal.getsignal(signal.SIGINT) is run["sigint_before"]


def test_private_hosts_are_blocked_without_starting_img2dataset(server_url: str, tmp_path: Path) -> None:
    urls = [server_url + "/a.jpg", "http://localhost/a.jpg", "http://[::1]/a.jpg", "http://10.0.0.1/a.jpg"]
    outcome = download_shard(keyword_shard(urls), _config(allow_private_networks=False), tmp_path)
    assert outcome.decisions.column("reason").to_pylist() == ["blocked_url"] * 4
    assert "loopback" in outcome.decisions.column("detail")[0].as_py()
    assert outcome.kept.num_rows == 0
    assert outcome.kept.schema == DOWNLOAD_SCHEMA
    assert list(tmp_path.iterdir()) == []


def test_a_row_img2dataset_did_not_report_is_recorded_not_lost(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def reports_first_row_only(requests: pa.Table, config: DownloadConfig, scratch_dir: Path) -> pa.Table:
        first = requests.column("sample_id")[0].as_py()
        return pa.Table.from_pylist(
            [{"sample_id": first, "status": "success", "error_message": None, "jpg": JPEG}],
            schema=download.RESULT_SCHEMA,
        )

    monkeypatch.setattr(download, "_run_img2dataset", reports_first_row_only)
    outcome = download_shard(
        keyword_shard(["http://127.0.0.1/a.jpg", "http://127.0.0.1/b.jpg"]), _config(), tmp_path
    )
    assert outcome.decisions.column("reason").to_pylist() == [None, "download_error"]
    assert outcome.decisions.column("detail")[1].as_py() == download.NOT_REPORTED
    assert outcome.kept.column("image").to_pylist() == [JPEG]


def test_duplicate_sample_ids_are_refused(tmp_path: Path) -> None:
    shard = keyword_shard(["http://127.0.0.1/a.jpg", "http://127.0.0.1/b.jpg"])
    shard = shard.set_column(0, "sample_id", pa.array(["same", "same"], pa.string()))
    with pytest.raises(ValueError, match="duplicate sample_id"):
        download_shard(shard, _config(), tmp_path)


def test_a_non_empty_scratch_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "img2dataset").mkdir()  # a finished run's output would be read back as this shard's results
    with pytest.raises(ValueError, match="not empty"):
        download_shard(keyword_shard(["http://127.0.0.1/a.jpg"]), _config(), tmp_path)


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        ("HTTP Error 404: Not Found", "http_error"),
        ("HTTP Error 500: Internal Server Error", "http_error"),
        ("timed out", "timeout"),
        ("<urlopen error timed out>", "timeout"),
        ("The read operation timed out", "timeout"),
        ("<urlopen error [Errno 111] Connection refused>", "download_error"),
        ("<urlopen error [Errno -2] Name or service not known>", "download_error"),
        ("Use of image disallowed by X-Robots-Tag directive", "download_error"),
    ],
)
def test_failure_reason(message: str, reason: str) -> None:
    assert failure_reason(message) == reason


ALLOWED_URLS = [
    "http://example.com/a.jpg",
    "https://example.com:8443/a.jpg?x=1#frag",
    "HTTPS://Example.COM/a.jpg",
    "https://8.8.8.8/a.jpg",
    "http://[2606:4700:4700::1111]/a.jpg",
    "http://exämple.com/a.jpg",
    "http://example.com./a.jpg",
    "http://08.0.0.1/a.jpg",  # not an inet_aton form (8 is no octal digit): a DNS name
    "http://1.2.3.4.5/a.jpg",
    "http://example.com#@127.0.0.1/",  # the @ is in the fragment
]

PRIVATE_URLS = [
    "http://localhost/a.jpg",
    "http://LOCALHOST./a.jpg",
    "http://images.localhost/a.jpg",
    "http://127.0.0.1/a.jpg",
    "http://127.0.0.1:8080/a.jpg",
    "http://127.1/a.jpg",
    "http://127.0.0.1./a.jpg",
    "http://2130706433/a.jpg",
    "http://0x7f.1/a.jpg",
    "http://0x7f000001/a.jpg",
    "http://0X7F.0.0.1/a.jpg",
    "http://017700000001/a.jpg",
    "http://0177.0.0.01/a.jpg",
    "http://127.000.000.001/a.jpg",
    "http://0/a.jpg",
    "http://0.0.0.0/a.jpg",
    "http://10.1.2.3/a.jpg",
    "http://172.16.0.1/a.jpg",
    "http://192.168.1.1/a.jpg",
    "http://169.254.169.254/latest/meta-data/",
    "http://100.64.0.1/a.jpg",
    "http://224.0.0.1/a.jpg",
    "http://240.0.0.1/a.jpg",
    "http://255.255.255.255/a.jpg",
    "http://[::1]/a.jpg",
    "http://[::]/a.jpg",
    "http://[::ffff:127.0.0.1]/a.jpg",
    "http://[::ffff:7f00:1]/a.jpg",
    "http://[::ffff:10.0.0.1]/a.jpg",
    "http://[fe80::1%25eth0]/a.jpg",
    "http://[fc00::1]/a.jpg",
    "http://[fd12:3456::1]/a.jpg",
    "http://[ff02::1]/a.jpg",
    "http://[2002:7f00:1::]/a.jpg",
    "http://[64:ff9b::7f00:1]/a.jpg",
    "http://127%2E0%2E0%2E1/a.jpg",
    "http://１２７.０.０.１/a.jpg",
    "http://127.0.0.1\u200b/a.jpg",
    "http://evil.example@127.0.0.1/a.jpg",
    " http://127.0.0.1/a.jpg",
]

ALWAYS_BLOCKED_URLS = [
    "ftp://example.com/a.jpg",
    "file:///etc/passwd",
    "gopher://example.com/",
    "javascript:alert(1)",
    "data:image/png;base64,AAAA",
    "//example.com/a.jpg",
    "example.com/a.jpg",
    "<URL:http://example.com/a.jpg>",
    "",
    "http:///a.jpg",
    "http://[::1/a.jpg",
    "http://example.com:99999/a.jpg",
    "http://example.com%20/a.jpg",
    "http://user:secret@example.com/a.jpg",  # urllib reads "secret@example.com" as the port
]


@pytest.mark.parametrize("url", ALLOWED_URLS)
def test_public_urls_pass(url: str) -> None:
    assert url_block_reason(url, allow_private=False) is None


@pytest.mark.parametrize("url", PRIVATE_URLS)
def test_private_hosts_are_blocked_unless_allowed(url: str) -> None:
    assert url_block_reason(url, allow_private=False) is not None
    assert url_block_reason(url, allow_private=True) is None


@pytest.mark.parametrize("url", ALWAYS_BLOCKED_URLS)
def test_bad_schemes_and_malformed_urls_are_always_blocked(url: str) -> None:
    assert url_block_reason(url, allow_private=False) is not None
    assert url_block_reason(url, allow_private=True) is not None


def test_block_reasons_name_the_problem() -> None:
    assert url_block_reason("http://0x7f.1/", allow_private=False) == (
        "host '0x7f.1' is a non-public address (loopback: 127.0.0.1)"
    )
    assert "link-local" in url_block_reason("http://169.254.169.254/", allow_private=False)
    assert "embedded IPv4" in url_block_reason("http://[::ffff:10.0.0.1]/", allow_private=False)
    assert url_block_reason("file:///etc/passwd", allow_private=True) == "scheme 'file' is not http or https"
