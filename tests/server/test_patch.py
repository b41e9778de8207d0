"""PATCH /items/{id} (issue 31, point 3): a partial update (JSON merge patch) through the write log; a photo by
address under the image_url rules, by path only inside the server's image folders, or uploaded; PUT replaces the
row and every write counts what it did. 127.0.0.2 stands for a public address here (tests/sites.py)."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from multiretrieval import downloads
from multiretrieval.server import create_app
from multiretrieval.server.service import Service

from ..conftest import png_bytes
from ..sites import sites  # noqa: F401 - a fixture

LOCAL = "http://127.0.0.1:8000"
COUNTS = ("added", "reencoded", "updated", "unchanged")


@pytest.fixture()
def folder(indexed, tmp_path):
    indexed.save(tmp_path / "idx")
    return tmp_path / "idx"


@pytest.fixture()
def client(folder):
    with TestClient(create_app(folder), base_url=LOCAL) as c:
        yield c


def test_patch_changes_only_the_values_it_names(client):
    before = client.get("/items/575").json()
    service = client.app.state.service
    joint = service.retriever.vectors("joint", [575])
    price = client.patch("/items/575", json={"price": 89})
    assert price.status_code == 200, price.text
    assert price.json() == {"id": 575, "changed": ["price"], "added": 0, "reencoded": 0, "updated": 1, "unchanged": 0, "items": 8}
    assert client.get("/items/575").json() == {**before, "price": 89.0}  # the title, description, category stay
    assert np.array_equal(service.retriever.vectors("joint", [575]), joint)  # in place: nothing encoded
    # The merge-patch media type and the query-parameter route; null empties a value; a new column comes in.
    merge = client.patch("/item?id=575", content=json.dumps({"category": None, "colour": "white"}),
                         headers={"content-type": "application/merge-patch+json"})
    assert merge.status_code == 200 and merge.json()["changed"] == ["category", "colour"]
    assert client.get("/items/575").json() == {**before, "price": 89.0, "category": None, "colour": "white"}
    # A new text is encoded again, and found.
    title = client.patch("/items/575", json={"title": "Front loader KX-9"})
    assert {k: title.json()[k] for k in COUNTS} == {"added": 0, "reencoded": 1, "updated": 0, "unchanged": 0}
    assert client.post("/search", json={"text": "KX-9", "k": 1}).json()["results"][0]["id"] == 575
    assert client.get("/items/575").json()["description"] == before["description"]
    again = client.patch("/items/575", json={"title": "Front loader KX-9", "id": 575})
    assert again.json()["unchanged"] == 1 and again.json()["changed"] == []


@pytest.mark.parametrize(("request_args", "status", "detail"), [
    ({"url": "/items/999", "json": {"price": 1}}, 404, "999"),
    ({"url": "/items/575", "json": [{"price": 1}]}, 400, "request body: a JSON object of catalog columns, not list"),
    ({"url": "/items/575", "json": {"price": {"eur": 1}}}, 400, "column 'price' holds a JSON object"),
    ({"url": "/items/575", "json": {"id": 47}}, 400, "differs from the id in the URL"),
    ({"url": "/items/575", "json": {"_key": 1}}, 400, "reserved"),
    ({"url": "/items/575", "json": {"price": "cheap"}}, 400, "update of item '575': column 'price' holds 'cheap'"),
    ({"url": "/items/575", "json": {"title": None, "description": None, "image": None}}, 400, "neither image nor text"),
    ({"url": "/items/575", "json": {"image": 5}}, 400, "image: an http(s) address, a path or null"),
    ({"url": "/items/575", "json": {"image": "ftp://shop.example/a.png"}}, 400, "must be an http(s) address"),
    ({"url": "/items/575", "content": b"price=1", "headers": {"content-type": "text/plain"}}, 415, "send the changes as JSON"),
])
def test_a_patch_refused_changes_nothing(client, request_args, status, detail):
    before = client.get("/items/575").json()
    answer = client.request("PATCH", **request_args)
    assert answer.status_code == status and detail in json.dumps(answer.json()), answer.text
    assert client.get("/items/575").json() == before


def test_put_replaces_the_row_and_every_write_counts_what_it_did(client):
    row = {k: v for k, v in client.get("/items/47").json().items() if k not in ("id", "image")}
    cheaper = client.put("/items/47", data={"metadata": json.dumps({**row, "price": 99.0})})
    assert cheaper.json()["upserted"] == 1  # was 0: an item updated in place is an item written
    assert {k: cheaper.json()[k] for k in COUNTS} == {"added": 0, "reencoded": 0, "updated": 1, "unchanged": 0}
    same = client.put("/items/47", data={"metadata": json.dumps({**row, "price": 99.0})})
    assert same.json()["upserted"] == 0 and same.json()["unchanged"] == 1
    retitled = client.put("/items/47", data={"metadata": json.dumps({**row, "title": "Wing chair"})})
    assert retitled.json()["upserted"] == 1 and retitled.json()["reencoded"] == 1
    new = client.put("/items/9001", data={"metadata": json.dumps({"title": "Stool"})})
    assert new.json()["upserted"] == 1 and new.json()["added"] == 1 and new.json()["items"] == 9
    # PUT replaces the whole row: what it leaves out is emptied (the photo stays unless a new one is uploaded).
    assert client.put("/items/47", data={"metadata": json.dumps({"price": 89})}).status_code == 200
    assert client.get("/items/47").json()["title"] is None and client.get("/items/47/image").status_code == 200
    spec = client.get("/openapi.json").json()["paths"]["/items/{item_id}"]
    put, patch = (" ".join(spec[method]["description"].split()) for method in ("put", "patch"))
    assert "PUT replaces the item's whole row" in put and "JSON merge patch, RFC 7396" in patch


def test_an_image_by_address_is_fetched_once_under_the_address_rules_and_survives_a_restart(folder, sites, monkeypatch):  # noqa: F811
    monkeypatch.setattr(downloads, "PUBLIC", downloads.AddressPolicy(lambda ip: str(ip) == "127.0.0.2", "a public address"))
    inside = sites("127.0.0.1", {"admin.png": png_bytes(color=(0, 0, 255))})
    shop = sites("127.0.0.2", {"blue.png": png_bytes((64, 64), (10, 20, 230)), "moved.png": ("redirect", inside.url("admin.png"))})
    with TestClient(create_app(folder, checkpoint_every=100), base_url=LOCAL) as client:
        patched = client.patch("/items/575", json={"image": shop.url("blue.png"), "price": 5})
        assert patched.status_code == 200, patched.text
        assert patched.json()["changed"] == ["image", "price"] and patched.json()["reencoded"] == 1
        thumb = Image.open(io.BytesIO(client.get("/items/575/image").content)).convert("RGB")
        assert thumb.getpixel((5, 5)) == (10, 20, 230) and client.get("/items/575").json()["title"] == "Washing machine"
        assert len(shop.requests) == 1
        for address in (inside.url("admin.png"), shop.url("moved.png")):
            refused = client.patch("/items/47", json={"image": address})
            assert refused.status_code == 400 and refused.json()["detail"].startswith("image: ")
            assert "not a public address" in refused.json()["detail"]
        assert inside.requests == [] and client.get("/items/47").json()["image"] == "mid-century-chair.png"
        service = client.app.state.service
        vector = service.retriever.vectors("clip_image", [575])
        service.folder_lock.release()  # as if its process had died: the write is in the log only
        restarted = Service(folder)
        try:
            item = restarted.retriever.get(575)
            assert (item["price"], item["title"]) == (5, "Washing machine")
            np.testing.assert_allclose(restarted.retriever.vectors("clip_image", [575]), vector, atol=1e-5)
            assert [path for path, _ in shop.requests].count("blue.png") == 1  # replayed from the photo kept then
        finally:
            restarted.close()
            service.folder_lock.acquire()


def test_an_image_path_must_lie_in_an_image_folder(folder, tmp_path, fixtures):
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(fixtures / "images" / "bed1.png", photos / "bed.png")
    (photos / "notes.png").write_text("not an image")
    secret = tmp_path / "secret.png"
    secret.write_bytes(png_bytes())
    (photos / "link.png").symlink_to(secret)
    with TestClient(create_app(folder, image_folders=[photos]), base_url=LOCAL) as client:
        relative = client.patch("/items/575", json={"image": "bed.png"})
        assert relative.status_code == 200 and relative.json()["changed"] == ["image"]
        assert client.get("/items/575").json()["image"] == "bed.png"
        assert client.patch("/items/47", json={"image": str(photos / "bed.png")}).status_code == 200
        for path in (str(secret), "../secret.png", "link.png", "/etc/passwd", str(tmp_path / "nothing.png")):
            refused = client.patch("/items/118", json={"image": path})
            assert refused.status_code == 400, path
            assert refused.json()["detail"] == f"image: {path!r} is not in an image folder of this server (--image-folder)"
        assert "no such image file" in client.patch("/items/118", json={"image": "gone.png"}).json()["detail"]
        unreadable = client.patch("/items/118", json={"image": "notes.png"}).json()["detail"]
        assert unreadable == "image: 'notes.png': not an image file PIL can read"  # the server's folder is not named
        assert client.get("/items/118").json()["image"] == "bed1.png"
    with TestClient(create_app(folder), base_url=LOCAL) as client:  # no image folders: no path at all
        refused = client.patch("/items/118", json={"image": str(photos / "bed.png")})
        assert refused.status_code == 400 and "this server reads no image paths" in refused.json()["detail"]


def test_patch_takes_an_upload_and_keeps_the_bounds_of_every_write(folder):
    uploads = folder.with_name("idx.uploads")
    with TestClient(create_app(folder, api_key="k", max_upload_bytes=2**20), base_url=LOCAL) as client:
        key = {"X-API-Key": "k"}
        assert client.patch("/items/575", json={"price": 1}).status_code == 401
        assert client.patch("/items/575", json={"price": 1}, headers={**key, "Origin": "https://evil.example"}).status_code == 403
        big = client.patch("/items/575", content=b'{"title": "' + b"x" * 2**20 + b'"}',
                           headers={**key, "content-type": "application/json"})
        assert big.status_code == 413
        wide = client.patch("/items/575", json={f"c{i}": i for i in range(65)}, headers=key)
        assert wide.status_code == 400 and "(catalog.max_new_columns)" in wide.json()["detail"]
        yellow = png_bytes((40, 40), (200, 200, 0))
        up = client.patch("/items/575", data={"metadata": json.dumps({"price": 2})}, files={"image": ("p.png", yellow, "image/png")},
                          headers=key)
        assert up.status_code == 200 and up.json()["changed"] == ["image", "price"]
        assert [p.read_bytes() for p in uploads.iterdir()] == [yellow]
        cyan = png_bytes((40, 40), (0, 200, 200))
        alone = client.patch("/items/575", files={"image": ("p.png", cyan, "image/png")}, headers=key)
        assert alone.json()["changed"] == ["image"] and [p.read_bytes() for p in uploads.iterdir()] == [cyan]  # the old one went
        twice = client.patch("/items/575", data={"metadata": json.dumps({"image": None})}, files={"image": ("p.png", cyan, "image/png")},
                             headers=key)
        assert twice.status_code == 400 and "give the photo once" in twice.json()["detail"]
        junk = client.patch("/items/575", files={"image": ("p.png", b"not an image", "image/png")}, headers=key)
        assert junk.status_code == 400 and junk.json()["detail"].startswith("image: ")
        dropped = client.patch("/items/575", data={"metadata": json.dumps({"image": None})}, headers=key)
        assert dropped.status_code == 200, dropped.text
        assert dropped.json()["changed"] == ["image"] and list(uploads.iterdir()) == []
        assert client.get("/items/575/image").status_code == 404 and client.get("/items/575").json()["price"] == 2


def test_serve_takes_the_image_folders(folder, fixtures, tmp_path, monkeypatch, capsys):
    import uvicorn

    from multiretrieval import cli

    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: served.update(app=app))  # no real server
    assert cli.main(["serve", str(folder), "--image-folder", str(tmp_path / "nowhere")]) == 2
    assert f"error: image folder {str(tmp_path / 'nowhere')!r}: not a folder" in capsys.readouterr().err
    assert cli.main(["serve", str(folder), "--image-folder", str(fixtures / "images")]) == 0
    with TestClient(served["app"], base_url=LOCAL) as client:
        assert client.patch("/items/575", json={"image": "bed1.png"}).json()["changed"] == ["image"]


def test_a_patch_whose_photo_a_later_write_replaced_is_replayed_with_its_other_values(folder):
    """The write log names an upload that a later write's photo replaced (and the server deleted): a restart still
    applies the rest of the first write."""
    with TestClient(create_app(folder, checkpoint_every=100), base_url=LOCAL) as client:
        first = client.patch("/items/575", data={"metadata": json.dumps({"price": 3, "title": "Front loader KX-9"})},
                             files={"image": ("p.png", png_bytes((40, 40), (200, 200, 0)), "image/png")})
        assert first.status_code == 200, first.text
        second = client.patch("/items/575", files={"image": ("p.png", png_bytes((40, 40), (0, 200, 200)), "image/png")})
        assert second.status_code == 200 and len(list(folder.with_name("idx.uploads").iterdir())) == 1  # the first photo went
        service = client.app.state.service
        vector = service.retriever.vectors("joint", [575])
        service.folder_lock.release()  # as if its process had died: the writes are in the log only
        restarted = Service(folder)
        try:
            item = restarted.retriever.get(575)
            assert (item["price"], item["title"]) == (3, "Front loader KX-9")
            np.testing.assert_allclose(restarted.retriever.vectors("joint", [575]), vector, atol=1e-5)
        finally:
            restarted.close()
            service.folder_lock.acquire()
