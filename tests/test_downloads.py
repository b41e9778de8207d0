"""URL catalogs (issue 12, point 4 and the second 'done when'), against a local HTTP server on
127.0.0.1 that serves, stalls, fails and then recovers."""

from __future__ import annotations

import http.server
import socket
import threading
import time
from collections import Counter

import pandas as pd
import pytest

import multiretrieval as mr
from multiretrieval import downloads
from multiretrieval.downloads import Downloader
from multiretrieval.pipeline import ShardStore

from .conftest import png_bytes
from .sites import SHOP_ONLY, sites  # noqa: F401 - a fixture

FAST = {"download_timeout_s": 1.0, "download_retries": 2, "download_backoff_s": 0.05}


class Flaky(http.server.ThreadingHTTPServer):
    """Answers each path as ``behaviour[path]`` says: "ok", "dead" (404), "down" (503), "stall" (no answer
    within the client's timeout), "busy" (429 with Retry-After: 0, once), "flaky" (503 twice, then ok),
    "slow" (ok after 0.3 s). Counts requests per path and the most served at once."""

    daemon_threads = True

    def __init__(self, images: dict[str, bytes]) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.images, self.behaviour, self.hits = images, {}, Counter()
        self.lock, self.active, self.most = threading.Lock(), 0, 0
        self.release = threading.Event()  # set: stalled requests give up

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/{path}"


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        server: Flaky = self.server
        path = self.path.lstrip("/")
        with server.lock:
            server.hits[path] += 1
            hits = server.hits[path]
            server.active += 1
            server.most = max(server.most, server.active)
        try:
            mode = server.behaviour.get(path, "ok")
            if mode == "stall":
                server.release.wait(5)
                return
            if mode == "slow":
                time.sleep(0.3)
            if mode == "dead":
                return self._answer(404)
            if mode == "down" or (mode == "flaky" and hits <= 2):
                return self._answer(503)
            if mode == "busy" and hits == 1:
                return self._answer(429, {"Retry-After": "0"})
            self._answer(200, {"Content-Type": "image/png"}, server.images[path])
        finally:
            with server.lock:
                server.active -= 1

    def _answer(self, status: int, headers: dict | None = None, body: bytes = b"") -> None:
        try:
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except OSError:
            pass  # the client gave up

    def log_message(self, *args):
        pass


@pytest.fixture()
def server():
    images = {f"p{i}.png": png_bytes(color=(30 * i, 200 - 20 * i, 90)) for i in range(1, 10)}
    srv = Flaky(images)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.release.set()
    srv.shutdown()


def test_retries_with_backoff_on_transient_failures_only(server):
    server.behaviour.update({"p1.png": "flaky", "p2.png": "busy", "p3.png": "dead", "p4.png": "down"})
    d = Downloader(mr.RetrieverConfig().with_overrides({"catalog": FAST}).catalog)
    assert d.fetch(server.url("p1.png")) == server.images["p1.png"] and server.hits["p1.png"] == 3  # 503, 503, then 200
    assert d.fetch(server.url("p2.png")) == server.images["p2.png"] and server.hits["p2.png"] == 2  # 429 Retry-After: 0, then 200
    with pytest.raises(mr.ImageError, match="HTTP 404") as dead:
        d.fetch(server.url("p3.png"))
    assert not dead.value.transient and server.hits["p3.png"] == 1  # a 404 is final: asked once
    with pytest.raises(mr.ImageError, match=r"HTTP 503.*gave up after 3 attempts") as down:
        d.fetch(server.url("p4.png"))
    assert down.value.transient and server.hits["p4.png"] == 3


def test_downloads_run_in_parallel_within_a_per_host_limit(server):
    for i in range(1, 9):
        server.behaviour[f"p{i}.png"] = "slow"
    frame = pd.DataFrame({"id": range(1, 9), "image": [server.url(f"p{i}.png") for i in range(1, 9)]})
    r = mr.Retriever(mr.RetrieverConfig().with_overrides({"catalog": {**FAST, "downloads_per_host": 3}}))
    assert r.index(frame, show_progress=False).indexed == 8
    assert server.most == 3  # 16 download threads, but at most 3 against this host at once
    assert mr.RetrieverConfig().catalog.download_workers == 16


def test_a_url_catalog_against_a_flaky_server_then_after_it_recovers(server, tmp_path):
    """Done when: every item whose URL eventually answers is indexed; a dead image with a title is
    indexed by its text; a re-run after the server recovers encodes exactly the items that failed."""
    server.behaviour.update({"p2.png": "flaky", "p3.png": "busy", "p4.png": "down", "p5.png": "stall", "p6.png": "dead",
                             "p7.png": "down"})
    titles = [None, None, None, None, None, "a red lamp", "a blue vase"]
    frame = pd.DataFrame({"id": [f"u{i}" for i in range(1, 8)], "image": [server.url(f"p{i}.png") for i in range(1, 8)],
                          "title": titles})
    config = mr.RetrieverConfig().with_overrides({"catalog": FAST})
    first = mr.Retriever(config)
    report = first.index(frame, show_progress=False, cache=tmp_path / "cache")
    assert sorted(first.items["id"]) == ["u1", "u2", "u3", "u6", "u7"]  # u2, u3 answered after retries
    assert (report.indexed, report.encoded, report.cached, report.text_only) == (5, 5, 0, 2)
    assert {s.id: s.reason for s in report.skipped}.keys() == {"u4", "u5"}
    assert "HTTP 503" in str(report.skipped[0]) and "timed out" in str(report.skipped[1])
    assert {w.id for w in report.warnings} == {"u6", "u7"} and "HTTP 404" in report.warnings[0].reason
    assert first.search(text="red lamp", k=1)["id"].iloc[0] == "u6"  # the dead image's item, by its text
    store = ShardStore.open(tmp_path / "cache", first.embedder.fingerprint())
    assert len(store) == 3  # a later run sees only the rows whose images came: no failure is remembered

    server.release.set()  # the server recovers, except for the dead image
    server.behaviour = {"p6.png": "dead"}
    before = Counter(server.hits)
    again = mr.Retriever(config)
    report = again.index(frame, show_progress=False, cache=tmp_path / "cache")
    asked = {p for p in server.hits if server.hits[p] > before[p]}
    assert asked == {"p4.png", "p5.png", "p6.png", "p7.png"}  # exactly the images that failed before
    assert (report.indexed, report.encoded, report.cached, report.text_only, len(report.skipped)) == (7, 4, 3, 1, 0)

    before = Counter(server.hits)
    report = first.upsert(frame, show_progress=False, cache=tmp_path / "cache2")  # the same through an upsert
    assert {p for p in server.hits if server.hits[p] > before[p]} == {"p4.png", "p5.png", "p6.png", "p7.png"}
    assert report.changes["added"] == 2 and report.changes["replaced"] == 2 and report.changes["unchanged"] == 3
    assert sorted(first.items["id"]) == [f"u{i}" for i in range(1, 8)]
    with_image = dict(zip(first.items["id"], first.features()["image_mask"][:, 0]))
    assert with_image["u7"] and not with_image["u6"]  # u7's image came this time; u6's is still dead


# ---------------------------------------------------------------- the address policy, on every hop (issue 28, point 2)

def test_a_redirect_is_checked_like_the_first_address(sites):
    """A public URL that redirected to 127.0.0.1 was fetched: now every hop's addresses pass the policy."""
    inside = sites("127.0.0.1", {"secret.png": b"inner secret"})
    photo = png_bytes()
    shop = sites("127.0.0.2", {"photo.png": photo, "hop.png": ("redirect", "/photo.png"),
                               "moved.png": ("redirect", inside.url("secret.png"))})
    assert downloads.download(shop.url("photo.png"), 10**6, 5.0, SHOP_ONLY) == photo  # the first host passes
    assert downloads.download(shop.url("hop.png"), 10**6, 5.0, SHOP_ONLY) == photo  # a redirect to an allowed host
    with pytest.raises(mr.ImageError, match=r"moved.png: not fetched: redirected to a host that is not allowed: "
                                            r"'127.0.0.1' resolves to 127.0.0.1, which is not the shop's address") as refused:
        downloads.download(shop.url("moved.png"), 10**6, 5.0, SHOP_ONLY)
    assert not refused.value.transient and inside.requests == []  # final, and never connected to
    with pytest.raises(mr.ImageError, match="not a public address"):
        downloads.download(shop.url("photo.png"), 10**6, 5.0, downloads.PUBLIC)  # the real policy: loopback is not public
    # An operator's catalog (no policy) follows redirects anywhere, as before.
    assert downloads.download(shop.url("moved.png"), 10**6, 5.0) == b"inner secret"


def test_the_connection_goes_to_the_address_that_was_checked(sites, monkeypatch):
    """DNS rebinding: a name that resolves to an allowed address when checked and to 127.0.0.1 when connected
    to. The host is looked up once and the connection goes to the checked address; Host carries the name."""
    inside = sites("127.0.0.1", {"p.png": b"inner secret"})
    photo = png_bytes()
    shop = sites("127.0.0.2", {"p.png": photo}, port=inside.port)
    real, lookups = socket.getaddrinfo, []

    def rebinding(host, port, *args, **kwargs):
        if host != "shop.test":
            return real(host, port, *args, **kwargs)
        lookups.append(host)
        return real("127.0.0.2" if len(lookups) == 1 else "127.0.0.1", port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    assert downloads.download(shop.url("p.png", host="shop.test"), 10**6, 5.0, SHOP_ONLY) == photo
    assert lookups == ["shop.test"] and inside.requests == []
    assert shop.requests == [("p.png", f"shop.test:{shop.port}")]


def test_redirects_are_followed_up_to_a_bound_within_the_deadline(sites):
    photo = png_bytes()
    chain = {f"r{i}": ("redirect", f"/r{i + 1}") for i in range(downloads.MAX_REDIRECTS + 1)}
    slow = {f"s{i}": ("redirect", f"/s{i + 1}", 0.4) for i in range(3)}
    site = sites("127.0.0.2", {**chain, f"r{downloads.MAX_REDIRECTS + 1}": photo, "s3": photo, **slow})
    assert downloads.download(site.url("r1"), 10**6, 5.0, SHOP_ONLY) == photo  # MAX_REDIRECTS hops
    with pytest.raises(mr.ImageError, match=f"r0: cannot download: more than {downloads.MAX_REDIRECTS} redirects") as many:
        downloads.download(site.url("r0"), 10**6, 5.0, SHOP_ONLY)
    assert not many.value.transient
    # Three hops of 0.4 s each: the third starts past the whole download's 1 s (each hop alone is within it).
    with pytest.raises(mr.ImageError, match="timed out after 1 s") as slow_hops:
        downloads.download(site.url("s0"), 10**6, 1.0, SHOP_ONLY)
    assert slow_hops.value.transient and ("s3", f"127.0.0.2:{site.port}") not in site.requests


def test_public_means_globally_reachable_also_for_an_ipv4_inside_an_ipv6_address():
    import ipaddress

    public = ["8.8.8.8", "2606:4700:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808"]
    inner = ["127.0.0.1", "10.1.2.3", "169.254.169.254", "100.64.0.1", "0.0.0.0", "::1", "fd00::1", "fe80::1",
             "::ffff:127.0.0.1", "64:ff9b::7f00:1", "64:ff9b::a9fe:a9fe", "2002:7f00:1::1"]  # mapped, NAT64, 6to4 of inner ones
    assert [downloads.is_public(ipaddress.ip_address(a)) for a in public] == [True] * len(public)
    assert [a for a in inner if downloads.is_public(ipaddress.ip_address(a))] == []
