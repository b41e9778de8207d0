"""The service's writes (issue 12, points 5 and 6): in place, logged before they are answered, replayed
after a crash; any string id in every endpoint; thumbnails of absolute paths and URLs."""

from __future__ import annotations

import http.server
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import quote

import pandas as pd
import pytest
from fastapi.testclient import TestClient
from PIL import Image

import multiretrieval as mr
from multiretrieval.server import create_app

from ..conftest import png_bytes

LOCAL = "http://127.0.0.1:8000"
ROOT = Path(__file__).resolve().parents[2]
ODD_IDS = ["lamps/desk lamp.jpg", "a/b/c/image", "100% cotton?", "ünï/çødé#1", "trailing/"]


@pytest.fixture(scope="module")
def odd_index(tmp_path_factory, fixtures):
    """Items whose ids are paths and other awkward strings; one image is a URL on a local server."""
    images = fixtures / "images"
    served = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Image)
    threading.Thread(target=served.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{served.server_address[1]}/car.png"
    frame = pd.DataFrame({"id": ODD_IDS + ["remote"], "title": ["Desk lamp", "Bed", "Sofa", "Fridge", "Toilet", "Smart car"],
                          "image": [str(images / n) for n in ("desk_lamp1.png", "bed1.png", "mid-century-bench-sofa.png",
                                                             "refrigerator.png", "toilets_unit_jay_hardy.png")] + [url]})
    r = mr.Retriever()
    r.index(frame, show_progress=False)
    folder = tmp_path_factory.mktemp("odd") / "idx"
    r.save(folder)
    yield folder
    served.shutdown()


class _Image(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        body = png_bytes((300, 200), (20, 160, 40))
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture()
def odd(odd_index, tmp_path):
    import shutil

    folder = tmp_path / "idx"
    shutil.copytree(odd_index, folder)
    with TestClient(create_app(folder), base_url=LOCAL) as client:
        yield client


@pytest.mark.parametrize("item_id", ODD_IDS)
def test_any_string_id_works_in_every_endpoint(odd, item_id):
    for url in (f"/items/{quote(item_id, safe='')}", f"/item?id={quote(item_id, safe='')}"):
        assert odd.get(url).json()["id"] == item_id, url
    if not item_id.endswith("/image") and not item_id.endswith("/"):  # such ids are ambiguous in a path: use ?id=
        assert odd.get(f"/items/{quote(item_id)}/image").status_code == 200
    for url in (f"/items/{quote(item_id, safe='')}/image", f"/item/image?id={quote(item_id, safe='')}"):
        thumb = odd.get(url)
        assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/png", (url, thumb.text)
    put = odd.put(f"/item?id={quote(item_id, safe='')}", data={"metadata": json.dumps({"title": "renamed", "price": 1})})
    assert put.status_code == 200 and odd.get(f"/item?id={quote(item_id, safe='')}").json()["title"] == "renamed"
    assert odd.get(f"/item/image?id={quote(item_id, safe='')}").status_code == 200  # renamed, still with its photo
    assert odd.delete(f"/items/{quote(item_id, safe='')}").json()["removed"] == 1
    assert odd.get(f"/item?id={quote(item_id, safe='')}").status_code == 404


def test_an_image_url_is_thumbnailed_by_the_server(odd):
    thumb = odd.get("/items/remote/image", follow_redirects=False)
    assert thumb.status_code == 200 and Image.open(io.BytesIO(thumb.content)).size == (256, 171)


def test_put_adds_replaces_and_updates_one_item(odd, fixtures):
    photo = (fixtures / "images" / "washing_machine.png").read_bytes()
    new = odd.put("/items/new%2Fitem", data={"metadata": json.dumps({"title": "Washing machine", "price": 5})},
                  files={"image": ("w.png", photo, "image/png")})
    assert new.status_code == 200 and new.json()["changes"]["added"] == 1
    again = odd.put("/items/new%2Fitem", data={"metadata": json.dumps({"title": "Washing machine", "price": 7})},
                    files={"image": ("w.png", photo, "image/png")})
    assert again.json()["changes"] == {"added": 0, "replaced": 0, "updated": 1, "unchanged": 0, "removed": 0, "indexes rebuilt": 0}
    assert odd.get("/item?id=new/item").json()["price"] == 7
    # Without a file the item keeps its photo: a new price is a metadata change, nothing is encoded again.
    price = odd.put("/items/new%2Fitem", data={"metadata": json.dumps({"title": "Washing machine", "price": 9})})
    assert price.json()["changes"]["updated"] == 1 and odd.get("/items/new%2Fitem/image").status_code == 200
    assert odd.get("/item?id=new/item").json()["price"] == 9
    clash = odd.put("/items/x", data={"metadata": json.dumps({"id": "y", "title": "z"})})
    assert clash.status_code == 400 and "differs" in clash.json()["detail"]


@pytest.mark.parametrize("column", ["_key", "score", "matched", "hybrid_score"])
def test_a_column_named_like_an_internal_one_is_refused(odd, column):
    r = odd.post("/items", data={"metadata": json.dumps({"id": "n1", "title": "x", column: 1})})
    assert r.status_code == 400 and column in r.json()["detail"] and "reserved" in r.json()["detail"]


def test_an_item_adds_columns_within_their_bound_and_they_leave_with_it(odd):
    columns = set(odd.get("/items/remote").json())
    wide = {"id": "wide", "title": "a lamp", **{f"c{i}": i for i in range(5000)}}
    r = odd.post("/items", data={"metadata": json.dumps(wide)})
    assert r.status_code == 400
    assert r.json()["detail"].startswith("5,000 new columns ('c0', 'c1', 'c2', ") and r.json()["detail"].endswith(
        "; one write may add at most 64 (catalog.max_new_columns)")
    assert odd.get("/items/wide").status_code == 404 and set(odd.get("/items/remote").json()) == columns
    assert odd.post("/items", data={"metadata": json.dumps({"id": "lamp", "title": "a lamp", "colour": "red"})}).status_code == 201
    assert odd.post("/search", json={"text": "a lamp", "k": 1, "where": "colour = 'red'"}).json()["results"][0]["id"] == "lamp"
    assert odd.delete("/items/lamp").status_code == 200
    assert set(odd.get("/items/remote").json()) == columns  # the column left with the item that used it
    assert "colour" not in odd.post("/search", json={"text": "a lamp", "k": 1}).json()["results"][0]


def test_checkpoints_save_the_folder_and_empty_the_log(indexed, tmp_path):
    folder = tmp_path / "idx"
    indexed.save(folder)
    journal = folder.with_name("idx.journal")
    with TestClient(create_app(folder, checkpoint_every=2), base_url=LOCAL) as client:
        for i in (1, 2, 3):
            assert client.post("/items", data={"metadata": json.dumps({"id": 9000 + i, "title": f"stool {i}"})}).status_code == 201
        assert len(journal.read_text().splitlines()) == 1  # two writes went into a checkpoint, the third is logged
        manifest = json.loads((folder / "manifest.json").read_text())
        assert manifest["note"] == {"journal_seq": 2} and manifest["items"]["count"] == 10
        with open(journal, "ab") as f:
            f.write(b'{"seq": 4, "op": "remove", "ids": [90')  # a write cut short by a crash: never acknowledged
        client.app.state.service.folder_lock.release()  # as if its process had died: a restart may take the folder
        restarted = mr.server.app.Service(folder)
        assert sorted(restarted.retriever.items["id"])[-3:] == [9001, 9002, 9003]
        assert journal.read_text().count("\n") == 1  # the cut line is dropped
        restarted.close()
        client.app.state.service.folder_lock.acquire()  # back to the first: it shuts down as the folder's holder
    # A clean shutdown checkpoints: nothing left to replay.
    assert journal.read_text() == "" and mr.Retriever.load(folder).items["id"].tolist()[-1] == 9003


def test_indexing_into_a_served_folder_is_refused(indexed, fixtures, tmp_path, capsys):
    """A nightly `index --update` while a service serves the folder: the service's next save would undo the update,
    even when it holds no write yet. The CLI refuses before encoding anything (the folder's lock); after the service
    stops (and saves its writes), the same command runs. (A killed service's unsaved writes: the sigkill test.)"""
    from multiretrieval.cli import main as cli

    folder = tmp_path / "idx"
    indexed.save(folder)
    catalog = tmp_path / "tonight.csv"
    pd.DataFrame({"id": [7001], "title": ["Floor lamp"]}).to_csv(catalog, index=False)
    with TestClient(create_app(folder, checkpoint_every=100), base_url=LOCAL) as client:
        assert cli(["index", str(catalog), "--out", str(folder), "--update", "--no-progress"]) == 2
        assert "in use by this process" in capsys.readouterr().err  # the service here; another process: the sigkill test
        assert client.post("/items", data={"metadata": json.dumps({"id": 9001, "title": "stool"})}).status_code == 201
        assert 7001 not in mr.Retriever.load(folder).items["id"].tolist()
    assert cli(["index", str(catalog), "--out", str(folder), "--update", "--no-progress"]) == 0
    assert {7001, 9001} <= set(mr.Retriever.load(folder).items["id"].tolist())  # the service's write and the update


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(folder: Path, port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "multiretrieval.cli", "serve", str(folder), "--port", str(port)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return proc
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise AssertionError("the server did not start")


def _call(port: int, method: str, path: str, fields: dict | None = None, files: dict | None = None) -> tuple[int, dict]:
    import httpx

    response = httpx.request(method, f"http://127.0.0.1:{port}{path}", data=fields, files=files, timeout=60)
    return response.status_code, response.json()


def test_acknowledged_writes_survive_a_sigkill(indexed, tmp_path, fixtures, capsys):
    """The server is killed (SIGKILL: no handler runs) right after answering four writes; a restart has them all."""
    folder = tmp_path / "idx"
    indexed.save(folder)
    saved = (folder / "manifest.json").read_text()
    port = _free_port()
    proc = _serve(folder, port)
    try:
        photo = (fixtures / "images" / "smart-car.png").read_bytes()
        assert _call(port, "POST", "/items", {"metadata": json.dumps({"id": 900, "title": "Toy car", "price": 12.5})},
                     {"image": ("car.png", photo, "image/png")})[0] == 201
        assert _call(port, "POST", "/items", {"metadata": json.dumps({"id": 901, "title": "Garden gnome KX-2210"})})[0] == 201
        assert _call(port, "DELETE", "/items/575")[1]["removed"] == 1
        assert _call(port, "PUT", "/items/47", {"metadata": json.dumps({"title": "Armchair", "price": 1.0})})[0] == 200
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert (folder / "manifest.json").read_text() == saved  # the folder was not rewritten per write
    assert len(folder.with_name("idx.journal").read_text().splitlines()) == 4
    from multiretrieval.cli import main as cli

    nightly = tmp_path / "tonight.csv"
    pd.DataFrame({"id": [7001], "title": ["Floor lamp"]}).to_csv(nightly, index=False)
    assert cli(["index", str(nightly), "--out", str(folder), "--update", "--no-progress"]) == 2  # the log is not saved yet
    assert "Stop the service" in capsys.readouterr().err

    proc = _serve(folder, port)
    try:
        assert cli(["index", str(nightly), "--out", str(folder), "--update", "--no-progress"]) == 2  # another process serves
        assert f"in use by another process (pid {proc.pid})" in capsys.readouterr().err
        assert _call(port, "GET", "/items/900")[1]["title"] == "Toy car"
        assert _call(port, "GET", "/item?id=47")[1]["price"] == 1.0
        assert _call(port, "GET", "/items/575")[0] == 404
        found = _call(port, "POST", "/search", {"text": "kx2210", "k": "1"})[1]["results"]
        assert found[0]["id"] == 901
        assert urllib.request.urlopen(f"http://127.0.0.1:{port}/items/900/image").status == 200  # the uploaded photo
    finally:
        proc.send_signal(signal.SIGINT)  # a clean stop: the log goes into a checkpoint
        proc.wait(60)
    on_disk = mr.Retriever.load(folder)
    assert {900, 901} <= set(on_disk.items["id"]) and 575 not in set(on_disk.items["id"])
    assert folder.with_name("idx.journal").read_text() == ""


def test_a_service_that_cannot_start_leaves_the_folder_free(tmp_path):
    from multiretrieval.server.service import Service

    with pytest.raises(mr.IndexLoadError, match="no such index folder"):
        Service(tmp_path / "shpo")  # a mistyped path
    assert not (tmp_path / "shpo.lock").exists() and not (tmp_path / "shpo").exists()
    (tmp_path / "empty").mkdir()
    for _ in range(2):  # the failed start let go of the lock: the second fails the same way, not as "in use"
        with pytest.raises(mr.IndexLoadError):
            Service(tmp_path / "empty")
