"""URL catalogs (issue 12, point 4 and the second 'done when'), against a local HTTP server on
127.0.0.1 that serves, stalls, fails and then recovers."""

from __future__ import annotations

import http.server
import threading
import time
from collections import Counter

import pandas as pd
import pytest

import multiretrieval as mr
from multiretrieval.downloads import Downloader
from multiretrieval.pipeline import ShardStore

from .conftest import png_bytes

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
