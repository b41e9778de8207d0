"""The real server in a subprocess: concurrent writes and searches give no errors; a write that was
acknowledged survives SIGKILL; a restart finds every one and leaves no temporary copies behind.

These test behaviour, not the write path: they hold for a full save per write and for a write-ahead
log alike. Traffic stays on 127.0.0.1, every loop is bounded.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")

from ..conftest import png_bytes  # noqa: E402

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``multiretrieval serve INDEX`` on a free loopback port."""

    def __init__(self, index: Path, log: Path) -> None:
        self.index, self.log = index, log

    def __enter__(self) -> Server:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "multiretrieval.cli", "serve", str(self.index), "--port", str(port)],
                                     stdout=subprocess.DEVNULL, stderr=self.log.open("ab"),
                                     env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).parents[2])})
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the server exited: {self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.3)
        self.kill()
        raise AssertionError("the server did not answer within 180 s")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def __exit__(self, *exc) -> None:
        self.kill()


def add(client, item_id: int, title: str, image: bytes | None = None):
    files = {"image": ("p.png", image, "image/png")} if image else None
    return client.post("/items", data={"metadata": json.dumps({"id": item_id, "title": title, "price": 10.0 + item_id % 7})},
                       files=files)


@pytest.fixture()
def index_dir(indexed, tmp_path):
    indexed.save(tmp_path / "idx")
    return tmp_path / "idx"


def test_writes_acknowledged_before_a_sigkill_are_all_there_after_a_restart(index_dir, tmp_path):
    log = tmp_path / "server.log"
    added: dict[int, str] = {}
    removed: list[int] = []
    with Server(index_dir, log) as server, httpx.Client(base_url=server.url, timeout=120) as client:
        for i in range(6):
            image = png_bytes(color=(40 * i, 200 - 30 * i, 90)) if i % 3 == 0 else None
            r = add(client, 9000 + i, f"durable item number {i}", image)
            assert r.status_code == 201, r.text
            added[9000 + i] = f"durable item number {i}"
            if i % 2:
                assert client.delete(f"/items/{[575, 47, 118][i // 2]}").status_code == 200
                removed.append([575, 47, 118][i // 2])
        assert client.delete("/items/9004").status_code == 200  # an added item removed again
        del added[9004]
        removed.append(9004)
        # Partial updates: a price in place, a new title and photo encoded again (the photo an upload).
        price = client.patch("/items/56", json={"price": 1.5})
        assert price.status_code == 200 and price.json()["updated"] == 1, price.text
        car = client.patch("/items/367", data={"metadata": json.dumps({"title": "Electric roadster"})},
                           files={"image": ("c.png", png_bytes(color=(250, 120, 0)), "image/png")})
        assert car.status_code == 200 and car.json()["reencoded"] == 1, car.text
        last = add(client, 9100, "the last acknowledged write", png_bytes(color=(1, 2, 3)))
        assert last.status_code == 201
        added[9100] = "the last acknowledged write"
        server.kill()  # SIGKILL right after the last acknowledgement

    with Server(index_dir, log) as server, httpx.Client(base_url=server.url, timeout=120) as client:
        assert client.get("/health").json()["items"] == 8 + len(added) - 3  # 3 of the fixture's 8 removed
        for item_id, title in added.items():
            r = client.get(f"/items/{item_id}")
            assert r.status_code == 200 and r.json()["title"] == title
        for item_id in removed:
            assert client.get(f"/items/{item_id}").status_code == 404
        assert client.get("/items/9000/image").status_code == 200 and client.get("/items/9100/image").status_code == 200
        found = client.post("/search", json={"text": "the last acknowledged write", "k": 1}).json()["results"]
        assert found[0]["id"] == 9100  # in the vector index too, not only in the rows
        sofa = client.get("/items/56").json()
        assert (sofa["price"], sofa["title"], sofa["category"]) == (1.5, "Sofa", "Living room")  # only the price changed
        assert client.get("/items/367").json()["category"] == "Vehicles" and client.get("/items/367/image").status_code == 200
        assert client.post("/search", json={"text": "Electric roadster", "k": 1}).json()["results"][0]["id"] == 367
        # A write after the restart, then no copy of the index folder is left beside it.
        assert add(client, 9200, "after the restart").status_code == 201
        assert client.delete("/items/9000").status_code == 200
    hidden = [p.name for p in index_dir.parent.iterdir() if p.is_dir() and p.name.startswith(f".{index_dir.name}.")]
    assert hidden == []
    uploads = index_dir.with_name(index_dir.name + ".uploads")
    assert len(list(uploads.iterdir())) == 3  # the photos of 9003, 9100 and 367; 9000's went with it


def test_concurrent_writes_and_searches_on_the_real_server_give_no_errors(index_dir, tmp_path):
    errors: list[str] = []
    searches = 0
    stop = threading.Event()
    with Server(index_dir, tmp_path / "server.log") as server:

        def search(worker: int) -> None:
            nonlocal searches
            with httpx.Client(base_url=server.url, timeout=120) as client:
                for n in range(400):  # bounded even if the writer hangs
                    if stop.is_set():
                        return
                    body = {"text": ["a bed", "a car", "a lamp"][n % 3], "k": 5}
                    if n % 2:
                        body["where"] = "price > 0"
                    r = client.post("/search", json=body)
                    searches += 1
                    if r.status_code != 200 or not r.json()["results"]:
                        errors.append(f"search {r.status_code}: {r.text[:200]}")

        def write() -> None:
            try:
                with httpx.Client(base_url=server.url, timeout=120) as client:
                    for i in range(5):
                        r = add(client, 7000 + i, f"concurrent item {i}", png_bytes(color=(10, 20 * i, 30)) if i % 2 else None)
                        if r.status_code != 201:
                            errors.append(f"add {r.status_code}: {r.text[:200]}")
                        if i % 2:
                            r = client.delete(f"/items/{7000 + i - 1}")
                            if r.status_code != 200:
                                errors.append(f"delete {r.status_code}: {r.text[:200]}")
            finally:
                stop.set()

        threads = [threading.Thread(target=search, args=(w,)) for w in range(4)] + [threading.Thread(target=write)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        with httpx.Client(base_url=server.url, timeout=60) as client:
            ids = {i for i in range(7000, 7005) if client.get(f"/items/{i}").status_code == 200}
    assert not errors, errors[:5]
    assert searches > 0 and ids == {7001, 7003, 7004}
