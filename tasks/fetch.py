"""Fetching one URL inside img2dataset's worker processes: URL checks, checked redirects, a total deadline
per URL and Retry-After.

img2dataset 1.47 fetches with `urllib.request.urlopen(request, timeout)` then `r.read()`
(`img2dataset.downloader.download_image`), retried at once by the module-level `download_image_with_retry`,
which `Downloader.download_shard` calls by its global name from a thread pool in its worker processes.
That lets a hostile server hold a URL for ever (a body or header block that trickles in never trips the
per-operation timeout), redirect anywhere urllib reaches (127.0.0.1, ftp://), and get retried at once
whatever its Retry-After says.

`GuardedDownloader` stands in for `img2dataset.main.Downloader` (tasks.download installs it): it wraps
img2dataset's own Downloader with a `FetchPolicy`. img2dataset pickles it to its workers, where
unpickling imports this module, and each call makes `download_with_retry` img2dataset's
`download_image_with_retry` while img2dataset works on the shard. Reading the shard, writing the results,
the X-Robots-Tag check (img2dataset's `is_disallowed`) and the User-Agent stay img2dataset's. The bytes are
returned as received.

Each attempt gets an opener with only http(s) handlers (no ftp://, file://, data:) whose connections are
watched: at the URL's deadline a timer shuts their sockets down, which ends whatever read is waiting
(connect, TLS, headers, body), and the body is read in chunks with the deadline checked between them.

Standard library only at import time (rs5m.verbosity is too): the workers import this module, and
img2dataset (which imports torch) is imported lazily.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import email.utils
import functools
import http.client
import io
import ipaddress
import signal
import socket
import sys
import threading
import time
import types
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC
from typing import Any

from rs5m.verbosity import discard_output_unless_verbose

ALLOWED_SCHEMES = ("http", "https")
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
REDIRECT_PREFIX = "redirect to "  # detail of a refused redirect: "redirect to <url>: <why>"
DISALLOWED_MESSAGE = "Use of image disallowed by X-Robots-Tag directive"  # img2dataset's wording
# img2dataset's User-Agent (img2dataset.downloader.download_image), so servers see the same client.
USER_AGENT = "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:72.0) Gecko/20100101 Firefox/72.0"
USER_AGENT_TOKEN = " (compatible; {token}; +https://github.com/rom1504/img2dataset)"
# Answers another attempt may change; other 4xx are final.
RETRYABLE_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
DEADLINE_TIMEOUTS = 3  # default max_seconds_per_url: this many timeout_s per attempt
CHUNK_BYTES = 1 << 16
HOOK = "download_image_with_retry"  # the img2dataset.downloader global replaced in the workers

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclasses.dataclass(frozen=True)
class FetchPolicy:
    """What img2dataset's arguments do not carry; pickled to the workers inside GuardedDownloader."""

    max_seconds_per_url: float  # every attempt and the waits between them
    max_retry_after_s: float
    allow_private_networks: bool


def default_max_seconds_per_url(timeout_s: float, retries: int) -> float:
    return DEADLINE_TIMEOUTS * timeout_s * (retries + 1)


# -- img2dataset integration --------------------------------------------------------------------------

_building = threading.local()


@contextmanager
def policy_for_downloaders(policy: FetchPolicy) -> Iterator[None]:
    """GuardedDownloaders built meanwhile in this thread (by img2dataset.main.download) carry `policy`.
    A thread-local, so concurrent download_shard calls with different configs each get their own."""
    previous = getattr(_building, "policy", None)
    _building.policy = policy
    try:
        yield
    finally:
        _building.policy = previous


class GuardedDownloader:
    """Stands in for `img2dataset.main.Downloader`: img2dataset's Downloader plus a FetchPolicy.

    Built without a policy (a bare img2dataset.download call, as bench/bench_download.py makes), it is
    img2dataset's Downloader, unchanged.
    """

    def __init__(self, **arguments: Any) -> None:
        from img2dataset import downloader  # noqa: PLC0415 - imports torch; only where img2dataset runs

        check_hook_point(downloader)
        self.downloader = downloader.Downloader(**arguments)
        self.policy: FetchPolicy | None = getattr(_building, "policy", None)

    def __call__(self, row: Any) -> Any:
        _follow_the_parent()
        if self.policy is None:
            return self.downloader(row)
        from img2dataset import downloader  # noqa: PLC0415 - already imported: this object unpickled

        check_hook_point(downloader)
        original = downloader.download_image_with_retry
        # One shard at a time per worker process (multiprocessing's pool), so a module global is safe here.
        downloader.download_image_with_retry = functools.partial(download_with_retry, policy=self.policy)
        try:
            return self.downloader(row)
        finally:
            downloader.download_image_with_retry = original


def _follow_the_parent() -> None:
    """In an img2dataset worker: ignore Ctrl-C (a terminal sends it to the whole process group; the run
    that owns this worker stops it itself, flows/run_control.py) and die with the run's process (Linux),
    so a stopped run leaves no worker finishing a download nobody will read. Its output stays off the
    terminal unless the run is verbose (rs5m/verbosity.py)."""
    discard_output_unless_verbose()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform == "linux":
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def check_hook_point(module: types.ModuleType) -> None:
    """Raise unless `module` (img2dataset.downloader) fetches through its global download_image_with_retry:
    a newer img2dataset that does not would make GuardedDownloader change nothing, silently."""
    if not callable(getattr(module, HOOK, None)) or not _uses_name(module.Downloader.download_shard, HOOK):
        raise RuntimeError(
            f"img2dataset's Downloader.download_shard no longer calls {HOOK} by name: the download guards "
            "(redirect checks, per-URL deadline, Retry-After) cannot be installed; see tasks/fetch.py"
        )


def _uses_name(function: Callable[..., Any], name: str) -> bool:
    codes = [function.__code__]
    while codes:
        code = codes.pop()
        if name in code.co_names:
            return True
        codes.extend(const for const in code.co_consts if isinstance(const, types.CodeType))
    return False


# -- one URL ------------------------------------------------------------------------------------------


def download_with_retry(
    row: tuple[Any, str],
    timeout: float,
    retries: int,
    user_agent_token: str | None,
    disallowed_header_directives: set[str] | None,
    *,
    policy: FetchPolicy,
) -> tuple[Any, io.BytesIO | None, str | None]:
    """img2dataset's download_image_with_retry contract: (key, the body or None, an error message or None)."""
    key, url = row
    try:
        body, error = fetch(url, timeout, retries, user_agent_token, disallowed_header_directives, policy)
    except Exception as error:  # noqa: BLE001 - a bug here must cost one URL, not the shard
        return key, None, f"download failed ({type(error).__name__}: {error})"
    return key, (io.BytesIO(body) if body is not None else None), error


def fetch(
    url: str,
    timeout: float,
    retries: int,
    user_agent_token: str | None,
    disallowed_header_directives: set[str] | None,
    policy: FetchPolicy,
) -> tuple[bytes | None, str | None]:
    """(body, None), or (None, why) after up to `retries + 1` attempts, all within the URL's deadline."""
    deadline = time.monotonic() + policy.max_seconds_per_url
    headers = {"User-Agent": user_agent(user_agent_token)}
    attempts = 0
    while True:
        attempts += 1
        try:
            body = _attempt(
                url, headers, timeout, deadline, policy, user_agent_token, disallowed_header_directives
            )
            return body, None
        except AttemptFailed as failed:
            failure = failed
        note = None
        if not failure.retryable or attempts > retries:
            break
        wait = failure.retry_after or 0.0
        if wait > policy.max_retry_after_s:
            note = (
                f"not retried: Retry-After {wait:.0f} s is over download.max_retry_after_s "
                f"({policy.max_retry_after_s:g} s)"
            )
            break
        if time.monotonic() + wait >= deadline:
            note = f"not retried: no time left in download.max_seconds_per_url ({policy.max_seconds_per_url:g} s)"
            break
        time.sleep(wait)
    extras = ([f"after {attempts} attempts"] if attempts > 1 else []) + ([note] if note else [])
    return None, f"{failure.detail} ({'; '.join(extras)})" if extras else failure.detail


def user_agent(token: str | None) -> str:
    return USER_AGENT + (USER_AGENT_TOKEN.format(token=token) if token else "")


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """The wait a Retry-After value asks for (RFC 9110: delay-seconds or an HTTP-date; a date in the past
    is 0), or None when there is none or it cannot be read. `now`: time.time() by default."""
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(min(int(value), 10**9))
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # "-0000": UTC, as HTTP-dates are
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class AttemptFailed(Exception):
    def __init__(self, detail: str, retryable: bool, retry_after: float | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.retryable = retryable
        self.retry_after = retry_after


class _RedirectRefused(Exception):
    pass


def _attempt(
    url: str,
    headers: dict[str, str],
    timeout: float,
    deadline: float,
    policy: FetchPolicy,
    user_agent_token: str | None,
    directives: set[str] | None,
) -> bytes:
    remaining = deadline - time.monotonic()
    if remaining <= 0:  # a socket timeout of 0 would mean non-blocking
        raise AttemptFailed(_deadline_detail(policy, None), retryable=False)
    socket_timeout = min(timeout, remaining)
    watch = _Watch(remaining)
    received: int | None = None  # bytes of body read, once the response headers are in
    try:
        opener = _opener(watch, policy.allow_private_networks)
        with opener.open(urllib.request.Request(url, headers=headers), timeout=socket_timeout) as response:
            if watch.expired:  # a header block cut off by the watch can look complete to http.client
                raise AttemptFailed(_deadline_detail(policy, None), retryable=False)
            if directives and _is_disallowed(response.headers, user_agent_token, directives):
                raise AttemptFailed(DISALLOWED_MESSAGE, retryable=False)
            expected = response.length  # Content-Length; None when chunked or absent
            body = bytearray()
            received = 0
            while chunk := response.read1(CHUNK_BYTES):
                body += chunk
                received = len(body)
                if time.monotonic() >= deadline:
                    break
            if watch.finish() or time.monotonic() >= deadline:
                raise AttemptFailed(_deadline_detail(policy, received), retryable=False)
            if expected is not None and received < expected:
                raise AttemptFailed(
                    f"body cut short: the connection ended after {received} of {expected} bytes (Content-Length)",
                    retryable=True,
                )
            return bytes(body)
    except AttemptFailed:
        raise
    except _RedirectRefused as refused:
        raise AttemptFailed(str(refused), retryable=False) from None
    except urllib.error.HTTPError as error:
        error.close()
        retry_after = retry_after_seconds(error.headers.get("Retry-After")) if error.headers else None
        # str(error) without line breaks (urllib's redirect-loop message has some)
        detail = " ".join(f"HTTP Error {error.code}: {error.reason}".split())
        raise AttemptFailed(detail, error.code in RETRYABLE_STATUSES, retry_after) from None
    except Exception as error:  # noqa: BLE001 - every failure becomes this URL's detail
        if watch.finish() or time.monotonic() >= deadline:
            raise AttemptFailed(_deadline_detail(policy, received), retryable=False) from None
        raise AttemptFailed(_describe(error, received, socket_timeout), retryable=True) from None
    finally:
        watch.finish()


def _is_disallowed(headers: Any, user_agent_token: str | None, directives: set[str]) -> bool:
    from img2dataset.downloader import is_disallowed  # noqa: PLC0415 - see the module doc

    return bool(is_disallowed(headers, user_agent_token, directives))


def _phase(received: int | None, error: BaseException) -> str:
    if received is not None:
        return f"while reading the body ({received} bytes received)"
    if isinstance(error, urllib.error.URLError):  # urllib wraps errors of connecting and sending only
        return "while connecting or sending the request"
    return "before the response headers were complete"


def _deadline_detail(policy: FetchPolicy, received: int | None) -> str:
    phase = (
        f"while reading the body ({received} bytes received)"
        if received is not None
        else "before the response headers were complete"
    )
    return f"timed out: the URL's {policy.max_seconds_per_url:g} s limit (download.max_seconds_per_url) passed {phase}"


def _describe(error: Exception, received: int | None, socket_timeout: float) -> str:
    phase = _phase(received, error)
    cause = error.reason if isinstance(error, urllib.error.URLError) else error
    if not isinstance(cause, BaseException):  # URLError("unknown url type: ...")
        return f"{cause} {phase}"
    name = type(cause).__name__
    if isinstance(cause, TimeoutError):
        return f"timed out: no progress for {socket_timeout:g} s {phase}"
    if isinstance(cause, http.client.RemoteDisconnected):
        return f"the server closed the connection without a response ({name})"
    if isinstance(cause, ConnectionRefusedError):
        return f"connection refused ({name}: {cause})"
    if isinstance(cause, ConnectionResetError):
        return f"connection reset by the server {phase} ({name}: {cause})"
    if isinstance(cause, http.client.IncompleteRead):
        return f"body cut short: the connection ended {phase} ({name})"
    if isinstance(cause, socket.gaierror):
        return f"host name lookup failed ({name}: {cause})"
    return f"download failed {phase} ({name}: {cause})"


class _Watch:
    """Shuts the attempt's sockets down when its time is up: a read waiting on one of them then ends."""

    def __init__(self, seconds: float) -> None:
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._expired = False
        self._finished = False
        self._timer = threading.Timer(max(seconds, 0.0), self._expire)
        self._timer.daemon = True
        self._timer.start()

    def add(self, sock: socket.socket) -> None:
        # A duplicate descriptor: it outlives urllib closing its own and, for https, the TLS wrapper
        # detaching the plain socket, so the shutdown always reaches the live connection.
        duplicate = sock.dup()
        with self._lock:
            if self._finished:
                duplicate.close()
                return
            self._sockets.append(duplicate)
            if self._expired:
                _shutdown(duplicate)

    def _expire(self) -> None:
        with self._lock:
            if self._finished:
                return
            self._expired = True
            for sock in self._sockets:
                _shutdown(sock)

    @property
    def expired(self) -> bool:
        with self._lock:
            return self._expired

    def finish(self) -> bool:
        """Stop watching (idempotent); whether the time was up first."""
        self._timer.cancel()
        with self._lock:
            self._finished = True
            sockets, self._sockets = self._sockets, []
            for sock in sockets:
                sock.close()
            return self._expired


def _shutdown(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # already closed by the peer
        sock.shutdown(socket.SHUT_RDWR)


def _opener(watch: _Watch, allow_private: bool) -> urllib.request.OpenerDirector:
    """urllib's default opener for http(s) only (no ftp, file or data handlers), watched connections, and
    redirects checked like the URLs themselves. Proxies from the environment are honoured."""
    opener = urllib.request.OpenerDirector()
    handlers: list[urllib.request.BaseHandler] = [
        urllib.request.ProxyHandler(),
        urllib.request.UnknownHandler(),
        _WatchedHTTPHandler(watch),
        urllib.request.HTTPDefaultErrorHandler(),
        _CheckedRedirectHandler(allow_private),
        urllib.request.HTTPErrorProcessor(),
    ]
    if hasattr(http.client, "HTTPSConnection"):  # Python built with ssl
        handlers.append(_WatchedHTTPSHandler(watch))
    for handler in handlers:
        opener.add_handler(handler)
    return opener


def _watched(connection_class: type[http.client.HTTPConnection], watch: _Watch) -> Callable[..., Any]:
    def connection(host: str, **arguments: Any) -> http.client.HTTPConnection:
        made = connection_class(host, **arguments)
        create = made._create_connection  # http.client opens every socket (proxy tunnels too) through it

        def create_and_watch(*args: Any, **kwargs: Any) -> socket.socket:
            sock = create(*args, **kwargs)
            watch.add(sock)
            return sock

        made._create_connection = create_and_watch
        return made

    return connection


class _WatchedHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, watch: _Watch) -> None:
        super().__init__()
        self._watch = watch

    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(_watched(http.client.HTTPConnection, self._watch), req)


class _WatchedHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, watch: _Watch) -> None:
        super().__init__()
        self._watch = watch

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(_watched(http.client.HTTPSConnection, self._watch), req, context=self._context)


class _CheckedRedirectHandler(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only to a URL `url_block_reason` accepts, before any request to it."""

    def __init__(self, allow_private: bool) -> None:
        self._allow_private = allow_private

    def http_error_302(self, req, fp, code, msg, headers):  # noqa: ANN001, ANN201 - urllib's signature
        location = headers.get("location") or headers.get("uri")
        if location is not None:
            # urllib itself turns schemes other than http, https and ftp into an HTTPError, and follows
            # ftp://: check the target as the server wrote it, then (redirect_request) as urllib quoted it.
            try:
                target = urllib.parse.urljoin(req.full_url, location)
            except ValueError as error:
                fp.close()
                raise _RedirectRefused(f"{REDIRECT_PREFIX}{location}: malformed URL: {error}") from None
            self._check(target, fp)
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001, ANN201
        self._check(newurl, fp)
        return super().redirect_request(req, fp, code, msg, headers, newurl)

    def _check(self, target: str, fp: Any) -> None:
        reason = url_block_reason(target, self._allow_private)
        if reason is not None:
            fp.close()
            raise _RedirectRefused(f"{REDIRECT_PREFIX}{target}: {reason}")


# -- URL safety ---------------------------------------------------------------------------------------


def url_block_reason(url: str, allow_private: bool) -> str | None:
    """Why `url` must not be fetched, or None. Reads the URL only: no DNS, no network (see tasks.download)."""
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port urllib could not use either
    except ValueError as error:
        return f"malformed URL: {error}"
    if parts.scheme not in ALLOWED_SCHEMES:
        return f"scheme {parts.scheme!r} is not http or https" if parts.scheme else "URL has no scheme"
    try:
        # The host urllib connects to: it unquotes the whole authority, then http.client strips the port.
        connect_host = http.client.HTTPConnection(urllib.request.Request(url).host).host
    except (ValueError, http.client.InvalidURL) as error:
        return f"malformed URL: {error}"
    if not parts.hostname or not connect_host:
        return "URL has no host"
    if allow_private:
        return None
    for host in dict.fromkeys([parts.hostname, connect_host]):
        reason = _host_block_reason(host)
        if reason is not None:
            return reason
    return None


def _host_block_reason(raw_host: str) -> str | None:
    host = urllib.parse.unquote(raw_host).lower()
    if not host.isascii():
        # getaddrinfo gets the IDNA form: full-width digits and dots become ASCII, zero-width characters
        # vanish (１２７.０.０.１ -> 127.0.0.1). Spaces and control characters never get here: http.client refuses them.
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            return f"host {raw_host!r} is not a valid internationalised domain name"
    host = host.rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return f"host {raw_host!r} is localhost"
    address = _parse_ip(host)
    kind = _non_public_kind(address) if address is not None else None
    if kind is not None:
        return f"host {raw_host!r} is a non-public address ({kind}: {address})"
    return None


def _parse_ip(host: str) -> IPAddress | None:
    """The address a resolver reads `host` as, if it is a literal: standard IPv4/IPv6, or inet_aton forms."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return _parse_inet_aton(host)


def _parse_inet_aton(host: str) -> ipaddress.IPv4Address | None:
    """IPv4 as inet_aton (and so getaddrinfo) reads it: 1-4 parts, each decimal, 0-octal or 0x-hex,
    the last part filling the remaining bytes (127.1, 2130706433, 0x7f.1, 017700000001)."""
    parts = host.split(".")
    if not 1 <= len(parts) <= 4:
        return None
    values = [_inet_aton_number(part) for part in parts]
    if any(value is None for value in values):
        return None
    *head, last = values
    if any(value > 255 for value in head) or last >= 256 ** (4 - len(head)):
        return None
    number = last
    for position, value in enumerate(head):
        number += value << (24 - 8 * position)
    return ipaddress.IPv4Address(number)


def _inet_aton_number(part: str) -> int | None:
    if part.startswith("0x"):
        digits, base = part[2:] or "0", 16
    elif part.startswith("0"):
        digits, base = part, 8
    else:
        digits, base = part, 10
    if not digits.isascii() or not digits.isalnum():
        return None
    try:
        return int(digits, base)
    except ValueError:
        return None


def _non_public_kind(address: IPAddress) -> str | None:
    """What makes `address` non-public ("loopback", "private", ...), or None for a global unicast address."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour
        embedded_kind = _non_public_kind(embedded) if embedded is not None else None
        if embedded_kind is not None:
            return f"{embedded_kind} (embedded IPv4)"
    kinds = (
        ("unspecified", address.is_unspecified),
        ("loopback", address.is_loopback),
        ("link-local", address.is_link_local),
        ("multicast", address.is_multicast),
        ("private", address.is_private),
        ("reserved", address.is_reserved),
        ("non-global", not address.is_global),
    )
    return next((kind for kind, applies in kinds if applies), None)
