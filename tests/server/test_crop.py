"""The service searches by a part of a photo (`crop`) and gives a photo's salient box (POST /salient), issue 33."""

from __future__ import annotations

import io

import pytest
from fastapi.testclient import TestClient

from multiretrieval.server import create_app

from ..test_regions import scene


@pytest.fixture()
def client(indexed, tmp_path):
    indexed.save(tmp_path / "idx")
    with TestClient(create_app(tmp_path / "idx"), base_url="http://127.0.0.1:8000") as c:
        yield c


@pytest.fixture()
def scene_png(fixtures) -> bytes:
    buf = io.BytesIO()
    scene(fixtures).save(buf, format="PNG")
    return buf.getvalue()


def test_a_form_search_by_a_crop(client, scene_png):
    def top(crop: str) -> str:
        r = client.post("/search", files={"image": ("scene.png", scene_png, "image/png")}, data={"crop": crop, "k": "1"})
        assert r.status_code == 200, r.text
        return r.json()["results"][0]["title"]

    assert (top("[0, 0, 0.5, 1]"), top("[256, 0, 512, 256]")) == ("Bed", "Smart car")


@pytest.mark.parametrize(("body", "status", "message"), [
    ({"crop": "[0.6, 0, 0.2, 1]"}, 400, "crop is inverted: x1 = 0.2 is less than x0 = 0.6"),
    ({"crop": "[0, 0, 600, 10]"}, 400, "crop: x1 = 600 px is outside the photo, whose width is 512 px"),
    ({"crop": "[0.2, 0.2, 0.2, 0.4]"}, 400, "crop is empty: x0 = x1 = 0.2"),
    ({"crop": "[0, 0, 1]"}, 400, "crop must be 4 numbers (x0, y0, x1, y1), got 3"),
])
def test_a_bad_crop_is_refused_naming_it(client, scene_png, body, status, message):
    r = client.post("/search", files={"image": ("scene.png", scene_png, "image/png")}, data=body)
    assert r.status_code == status and message in r.text


def test_a_crop_without_a_photo_is_400_in_a_search_and_in_a_batch(client):
    r = client.post("/search", json={"text": "a bed", "crop": [0, 0, 0.5, 1]})
    assert r.status_code == 400 and "crop cuts the query photo, and this query has none" in r.json()["detail"]
    r = client.post("/search/batch", json={"queries": [{"text": "a bed", "crop": [0, 0, 0.5, 1]}]})
    assert r.status_code == 400 and "crop cuts the query photo" in r.json()["detail"]
    assert "crop" in client.get("/openapi.json").json()["paths"]["/search"]["post"]["requestBody"]["content"][
        "multipart/form-data"]["schema"]["properties"]


def test_the_salient_box_of_an_upload_and_of_an_item(client, scene_png):
    r = client.post("/salient", files={"image": ("scene.png", scene_png, "image/png")})
    assert r.status_code == 200, r.text
    x0, y0, x1, y1 = r.json()["box"]
    assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
    r = client.post("/salient", json={"like": 163})
    assert r.status_code == 200 and len(r.json()["box"]) == 4
    assert client.post("/salient", json={"like": 163.0}).json() == r.json()  # JSON Schema's integer, as the schema says
    assert client.post("/salient", json={"like": 999}).status_code == 404
    assert client.post("/salient", json={"like": True}).status_code == 400
    assert client.post("/salient", json={}).status_code == 400
    assert client.post("/salient", files={"image": ("x.png", b"not an image", "image/png")}).status_code == 400
    assert client.post("/salient", content=b"x", headers={"content-type": "text/plain"}).status_code == 415
