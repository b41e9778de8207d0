"""Image downloads: one GET under an address policy, and many at once for URL catalogs.

    download(url, max_bytes, timeout, policy=None) -> bytes   (one attempt; raises ImageError)
    Downloader(config).fetch(url) -> bytes                     (retried; ``transient`` if it may pass)

``download`` has a whole-download deadline (``catalog.download_timeout_s``), redirects included.
With an ``AddressPolicy`` (the service's ``image_url``: ``PUBLIC``) every hop is checked: each host
name is looked up once, every address it gives must pass, and the connection goes to one of those
addresses (a second lookup could answer otherwise: DNS rebinding); at most ``MAX_REDIRECTS``
redirects are followed, each one checked the same way, and no proxy is used. Without one (an
operator's catalog) any address is fetched, through the environment's proxies as urllib does.

A transient failure (a timeout, a dropped connection, HTTP 408/425/429/5xx) is tried again by
``Downloader`` up to ``catalog.download_retries`` times, after ``download_backoff_s`` x 2^attempt
seconds with jitter (or what the server's Retry-After asked, up to 60 s); any other failure (404,
not an image, too large, an address the policy refuses) is final at once. At most
``catalog.downloads_per_host`` downloads run against one host at a time; the pipeline runs
``catalog.download_workers`` of them in parallel.
"""

from __future__ import annotations

import functools
import http.client
import ipaddress
import logging
import random
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from .config import CatalogConfig
from .errors import ImageError, ImageLimitError

logger = logging.getLogger(__name__)
MAX_WAIT_S = 60.0  # the longest a Retry-After header may make a download wait
MAX_REDIRECTS = 5  # redirects one download follows
TRANSIENT_HTTP = (408, 425, 429, 500, 502, 503, 504)  # answers worth asking again
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class AddressPolicy:
    """The IP addresses a download may connect to, checked on every hop."""

    allows: Callable[[IPAddress], bool]
    name: str  # what an allowed address is, for messages: "a public address"


def is_public(ip: IPAddress) -> bool:
    """Globally reachable; an IPv6 address that carries an IPv4 one (mapped, 6to4, NAT64) only if that one is too."""
    if ip.version == 6:
        inner = ip.ipv4_mapped or ip.sixtofour or (ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF) if ip in _NAT64 else None)
        if inner is not None and not inner.is_global:
            return False
    return ip.is_global


PUBLIC = AddressPolicy(is_public, "a public address")


class AddressRefused(ImageError):
    """A host name resolved to an address the policy refuses (final: asking again will not help)."""

    def __init__(self, host: str, address: str, policy: AddressPolicy) -> None:
        super().__init__(f"{host!r} resolves to {address}, which is not {policy.name}")
        self.host = host


def download(url: str, max_bytes: int, timeout: float, policy: AddressPolicy | None = None) -> bytes:
    """GET a URL, whole within about ``timeout`` seconds (one attempt; see Downloader for retries).

    The socket timeout bounds each read; the deadline, checked between reads and at each redirect,
    bounds the whole download, so a server that trickles a byte at a time is cut off too. Timeouts,
    dropped connections and HTTP 408/425/429/5xx raise an ImageError marked ``transient``. With a
    ``policy``, a host (the first or a redirect's) whose addresses it refuses is never connected to.
    """
    deadline = time.monotonic() + timeout
    chunks, size = [], 0
    try:
        with _opener(policy, deadline).open(url, timeout=timeout) as response:
            while True:
                if time.monotonic() > deadline:
                    raise TimeoutError
                chunk = response.read1(1 << 16)  # returns as soon as any bytes arrive
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
                if size > max_bytes:
                    raise ImageLimitError(f"{url}: more than {max_bytes:,} bytes")
    except AddressRefused as exc:
        hop = "" if exc.host.lower() == urlsplit(url).hostname else "redirected to a host that is not allowed: "
        raise ImageError(f"{url}: not fetched: {hop}{exc}") from exc
    except ImageLimitError:
        raise
    except ImageError as exc:  # too many redirects
        raise ImageError(f"{url}: cannot download: {exc}") from exc
    except urllib.error.HTTPError as exc:
        transient = exc.code in TRANSIENT_HTTP
        raise ImageError(f"{url}: cannot download: HTTP {exc.code} {exc.reason}", transient=transient,
                         retry_after=_retry_after(exc.headers.get("Retry-After")) if transient else None) from exc
    except TimeoutError as exc:
        raise ImageError(f"{url}: download timed out after {timeout:g} s", transient=True) from exc
    except OSError as exc:  # URLError, connection errors: the network or the server may come back
        reason = getattr(exc, "reason", None)
        if isinstance(reason, TimeoutError) or "timed out" in str(exc):
            raise ImageError(f"{url}: download timed out after {timeout:g} s", transient=True) from exc
        if isinstance(reason, ValueError) or isinstance(exc, urllib.error.URLError) and "unknown url type" in str(exc):
            raise ImageError(f"{url}: cannot download: {exc}") from exc
        raise ImageError(f"{url}: cannot download: {exc}", transient=True) from exc
    except (ValueError, http.client.HTTPException) as exc:  # a malformed URL or answer
        raise ImageError(f"{url}: cannot download: {exc}", transient=isinstance(exc, http.client.HTTPException)) from exc
    return b"".join(chunks)


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header given in seconds (an HTTP date is ignored)."""
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def _opener(policy: AddressPolicy | None, deadline: float) -> urllib.request.OpenerDirector:
    """urllib's opener for http(s) only, whose connections go through ``_connect``; proxies only without a policy
    (a proxy would look the names up itself)."""
    opener = urllib.request.OpenerDirector()
    handlers = [urllib.request.UnknownHandler(), _HTTPHandler(policy), _HTTPSHandler(policy), _Redirects(deadline),
                urllib.request.HTTPDefaultErrorHandler(), urllib.request.HTTPErrorProcessor()]
    for handler in ([urllib.request.ProxyHandler()] if policy is None else []) + handlers:
        opener.add_handler(handler)
    return opener


def _connection(cls: type[http.client.HTTPConnection], policy: AddressPolicy | None):
    def make(host: str, **kwargs) -> http.client.HTTPConnection:
        connection = cls(host, **kwargs)
        # http.client's one place that opens the socket (the TLS layer wraps it for the name, SNI included).
        connection._create_connection = functools.partial(_connect, policy=policy)
        return connection

    return make


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, policy: AddressPolicy | None) -> None:
        super().__init__()
        self.policy = policy

    def http_open(self, req):
        return self.do_open(_connection(http.client.HTTPConnection, self.policy), req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, policy: AddressPolicy | None) -> None:
        super().__init__()
        self.policy = policy

    def https_open(self, req):
        return self.do_open(_connection(http.client.HTTPSConnection, self.policy), req, context=self._context)


class _Redirects(urllib.request.HTTPRedirectHandler):
    """Follows at most MAX_REDIRECTS redirects within the download's deadline (each hop's connection is checked
    by ``_connect`` like the first)."""

    max_repeats = max_redirections = MAX_REDIRECTS + 1  # urllib's own loop check: never before this one

    def __init__(self, deadline: float) -> None:
        super().__init__()
        self.deadline, self.hops = deadline, 0  # one opener per download: the hops of this download

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        self.hops += 1
        left = self.deadline - time.monotonic()
        if self.hops > MAX_REDIRECTS or left <= 0:
            fp.close()
            if left <= 0:
                raise TimeoutError
            raise ImageError(f"more than {MAX_REDIRECTS} redirects (the last to {newurl})")
        req.timeout = left  # the next hop gets what is left of the whole download's time
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _connect(address: tuple[str, int], timeout: float | None = None, source_address=None, *,
             policy: AddressPolicy | None) -> socket.socket:
    """socket.create_connection, with one lookup whose addresses must all pass the policy and are the ones
    connected to."""
    host, port = address
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    if policy is not None:
        for *_, sockaddr in infos:
            if not policy.allows(ipaddress.ip_address(sockaddr[0].split("%")[0])):
                raise AddressRefused(host, sockaddr[0], policy)
    error: OSError | None = None
    for family, kind, proto, _, sockaddr in infos:
        sock = socket.socket(family, kind, proto)
        try:
            if timeout is not None:
                sock.settimeout(timeout)
            if source_address:
                sock.bind(source_address)
            sock.connect(sockaddr)
            return sock
        except OSError as exc:
            sock.close()
            error = exc
    raise error or OSError(f"getaddrinfo returned no address for {host!r}")


class Downloader:
    """Fetches URLs with retries and a per-host limit; safe to share between threads."""

    def __init__(self, config: CatalogConfig | None = None, seed: int | None = None) -> None:
        self.config = config or CatalogConfig()
        self._hosts: dict[str, threading.BoundedSemaphore] = {}
        self._lock = threading.Lock()
        self._random = random.Random(seed)
        self.attempts = 0  # downloads started, retries included (for reports and tests)

    def _host_slot(self, url: str) -> threading.BoundedSemaphore:
        host = urlsplit(url).netloc.lower()
        with self._lock:
            if host not in self._hosts:
                self._hosts[host] = threading.BoundedSemaphore(max(1, self.config.downloads_per_host))
            return self._hosts[host]

    def fetch(self, url: str) -> bytes:
        """The bytes at ``url``; ImageError after the last attempt (``transient`` says whether it may pass)."""
        cfg = self.config
        slot = self._host_slot(url)
        for attempt in range(cfg.download_retries + 1):
            with slot:
                with self._lock:
                    self.attempts += 1
                try:
                    return download(url, cfg.max_image_bytes, cfg.download_timeout_s)
                except ImageError as exc:
                    if not exc.transient or attempt == cfg.download_retries:
                        if exc.transient and cfg.download_retries:
                            raise ImageError(f"{exc} (gave up after {attempt + 1} attempts)", transient=True) from exc
                        raise
                    wait = self._wait(attempt, exc.retry_after)
                    logger.info("%s; trying again in %.1f s (attempt %d of %d)", exc, wait, attempt + 2, cfg.download_retries + 1)
            time.sleep(wait)  # outside the host slot: others may use it meanwhile
        raise AssertionError("unreachable")  # pragma: no cover

    def _wait(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, MAX_WAIT_S)
        with self._lock:
            jitter = 0.5 + self._random.random()  # spread retries of many downloads over time
        return self.config.download_backoff_s * 2 ** attempt * jitter
