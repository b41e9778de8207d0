import io

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from multiretrieval.server import create_app

KEY = "s3cret"


@pytest.fixture()
def client(indexed, tmp_path):
    indexed.save(tmp_path / "idx")
    app = create_app(tmp_path / "idx", api_key=KEY, max_upload_bytes=2 * 2**20)
    with TestClient(app, base_url="http://127.0.0.1:8000") as c:
        c.index_dir = tmp_path / "idx"
        yield c


def test_health_and_page(client):
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["items"] == 8 and set(health["batching"]) == {"text", "image"}
    page = client.get("/")
    assert page.status_code == 200 and "search-form" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # no CDN: everything comes from the app
    assert client.get("/static/app.js").status_code == 200
    assert client.get("/openapi.json").json()["info"]["title"] == "multiretrieval"
    docs = client.get("/docs")
    assert docs.status_code == 200 and "/docs-assets/swagger-ui-bundle.js" in docs.text
    assert client.get("/docs-assets/swagger-ui-bundle.js").status_code == 200


def test_text_search_as_json(client):
    r = client.post("/search", json={"text": "a washing machine", "k": 3, "where": "price < 1000",
                                                 "min_score": "off"})
    assert r.status_code == 200
    body = r.json()
    assert body["mode"] == "text" and body["count"] == 3
    top = body["results"][0]
    assert top["title"] == "Washing machine" and top["rank"] == 1 and top["price"] < 1000


def test_photo_plus_text_as_multipart(client, fixtures):
    photo = (fixtures / "images" / "mid-century-bench-sofa.png").read_bytes()
    r = client.post("/search", files={"image": ("sofa.png", photo, "image/png")}, data={"text": "a bed", "k": "4"})
    assert r.status_code == 200
    body = r.json()
    assert body["mode"] == "fused"
    assert {"image_score", "text_score"} <= set(body["results"][0])
    assert {"Sofa", "Bed"} <= {x["title"] for x in body["results"][:2]}


def test_items_and_thumbnails(client):
    item = client.get("/items/575").json()
    assert item["title"] == "Washing machine" and item["id"] == 575
    thumb = client.get("/items/575/image")
    assert thumb.headers["content-type"] == "image/png"
    assert max(Image.open(io.BytesIO(thumb.content)).size) <= 256


def test_unknown_id_is_404(client):
    for method, url in (("get", "/items/999999"), ("get", "/items/999999/image"), ("delete", "/items/999999")):
        r = getattr(client, method)(url, headers={"X-API-Key": KEY})
        assert r.status_code == 404 and "not in the index" in r.json()["detail"]


def test_oversized_upload_is_413(client):
    big = b"\0" * (3 * 2**20)
    r = client.post("/search", files={"image": ("big.png", big, "image/png")}, data={"text": "x"})
    assert r.status_code == 413 and "exceeds the limit" in r.json()["detail"]


def test_not_an_image_is_400(client):
    r = client.post("/search", files={"image": ("x.png", b"hello, I am text", "image/png")})
    assert r.status_code == 400 and "not an image" in r.json()["detail"]


def test_decompression_bomb_is_413(client):
    buf = io.BytesIO()
    Image.new("1", (20_000, 20_000)).save(buf, format="PNG")
    r = client.post("/search", files={"image": ("bomb.png", buf.getvalue(), "image/png")})
    assert r.status_code == 413 and "decompression bomb" in r.json()["detail"]


def test_malformed_filter_is_400_naming_the_problem(client):
    r = client.post("/search", json={"text": "sofa", "where": "colour = 'red'"})
    assert r.status_code == 400 and "colour" in r.json()["detail"]


def test_unknown_mode_is_422(client):
    assert client.post("/search", json={"text": "sofa", "mode": "sideways"}).status_code == 422
    assert client.post("/search", data={"text": "sofa", "mode": "sideways"}).status_code == 422
    assert client.post("/search", json={"text": "sofa", "k": 0}).status_code == 422


def test_an_unknown_field_is_422_naming_the_nearest(client, fixtures):
    """A misspelt option was ignored (the search ran without it); now it is refused naming the nearest field, in a JSON
    body, a form and a batch, and the schema says no other field is taken."""
    r = client.post("/search", json={"text": "a bed", "ofset": 2})
    assert r.status_code == 422
    assert r.json()["detail"][0]["msg"] == "unknown search field 'ofset'; did you mean 'offset'?"
    photo = (fixtures / "images" / "bed1.png").read_bytes()
    r = client.post("/search", files={"image": ("bed.png", photo, "image/png")}, data={"text": "a bed", "sortby": "price"})
    assert r.status_code == 422 and "did you mean 'sort_by'?" in r.json()["detail"][0]["msg"]
    r = client.post("/search/batch", json={"queries": [{"text": "a bed"}, {"text": "a bed", "not_txt": "legs"}]})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][-3:] == ["queries", 1, "not_txt"]
    assert "did you mean 'not_text'?" in r.json()["detail"][0]["msg"]
    body = client.get("/openapi.json").json()["paths"]["/search"]["post"]["requestBody"]["content"]
    assert body["application/json"]["schema"]["additionalProperties"] is False
    assert body["multipart/form-data"]["schema"]["additionalProperties"] is False


def test_empty_query_and_wrong_content_type(client):
    assert client.post("/search", json={"text": "  "}).status_code == 400
    assert client.post("/search", json={}).status_code == 400
    assert client.post("/search", content=b"text=sofa", headers={"content-type": "text/plain"}).status_code == 415


def test_no_request_parameter_reaches_the_filesystem(client):
    r = client.post("/search", json={"text": "sofa", "where": "len(read_text('/etc/passwd')) > 0"})
    assert r.status_code == 400
    r = client.post("/search", data={"text": "sofa", "image": "/etc/passwd"})  # a path as a plain form field
    assert r.status_code == 200 and r.json()["mode"] == "text"  # ignored: only uploaded files count as images
    r = client.post("/items", headers={"X-API-Key": KEY}, data={"metadata": '{"id": 77, "title": "x", "image": "/etc/hosts"}'})
    assert r.status_code == 400 and "without 'image'" in r.json()["detail"]


def test_writes_need_the_key_and_persist(client, fixtures):
    metadata = '{"id": 900, "title": "Toy car", "price": 12.5}'
    photo = (fixtures / "images" / "smart-car.png").read_bytes()
    assert client.post("/items", data={"metadata": metadata}).status_code == 401
    assert client.delete("/items/575").status_code == 401
    r = client.post("/items", headers={"X-API-Key": KEY}, data={"metadata": metadata},
                    files={"image": ("car.png", photo, "image/png")})
    assert r.status_code == 201 and r.json() == {"added": 1, "items": 9}
    assert client.post("/search", json={"text": "toy car", "k": 1}).json()["results"][0]["id"] == 900
    assert client.get("/items/900/image").status_code == 200
    assert client.delete("/items/575", headers={"X-API-Key": KEY}).json() == {"removed": 1, "items": 8}

    from multiretrieval.server.service import Service

    client.app.state.service.folder_lock.release()  # as if its process had died: a restart may take the folder
    restarted = Service(client.index_dir)  # as after a crash: the saved folder plus the write log
    assert 900 in restarted.retriever.items["id"].tolist() and 575 not in restarted.retriever.items["id"].tolist()
    restarted.close()
    client.app.state.service.folder_lock.acquire()  # back to the first: it shuts down as the folder's holder


def test_bad_writes_change_nothing(client):
    h = {"X-API-Key": KEY}
    assert client.post("/items", headers=h, data={"metadata": "{oops"}).status_code == 400
    r = client.post("/items", headers=h, data={"metadata": '{"id": 575, "title": "dup"}'})
    assert r.status_code == 400 and "already indexed" in r.json()["detail"]
    r = client.post("/items", headers=h, data={"metadata": '{"id": 901, "title": "x"}'},
                    files={"image": ("x.png", b"not an image", "image/png")})
    assert r.status_code == 400 and "not an image" in r.json()["detail"]
    assert client.get("/health").json()["items"] == 8



def test_an_item_added_without_a_photo_has_no_image_and_can_be_deleted(client):
    """Its image source comes back from the saved table as NaN, not None: it answered 500 on both."""
    h = {"X-API-Key": KEY}
    assert client.post("/items", headers=h, data={"metadata": '{"id": 950, "title": "a plain shelf"}'}).status_code == 201
    assert client.post("/items", headers=h, data={"metadata": '{"id": 951, "title": "another shelf"}'}).status_code == 201
    r = client.get("/items/950/image")
    assert r.status_code == 404 and "has no image" in r.json()["detail"]
    assert client.delete("/items/950", headers=h).json() == {"removed": 1, "items": 9}


def test_a_missing_image_file_is_404_naming_the_item_and_the_path(retriever_copy, fixtures, tmp_path):
    """An item whose image file was deleted after indexing: 404 (it answered 400), the detail naming the
    item and the path; a file that is there but unreadable stays 400, an unknown id stays 404."""
    import shutil

    import pandas as pd

    photo = tmp_path / "photos" / "spare-bed.png"
    photo.parent.mkdir()
    shutil.copyfile(fixtures / "images" / "bed1.png", photo)  # never the committed fixture itself
    report = retriever_copy.add(pd.DataFrame([{"id": 9001, "title": "Spare bed", "image": str(photo), "price": 300.0}]),
                                show_progress=False)
    assert report.indexed == 1
    retriever_copy.save(tmp_path / "idx")
    with TestClient(create_app(tmp_path / "idx"), base_url="http://127.0.0.1:8000") as client:
        source = client.app.state.service.retriever.image_source(9001)
        assert source is not None and source.endswith("spare-bed.png")
        assert client.get("/items/9001/image").status_code == 200  # thumbnail made (and cached) while the file is there
        photo.write_bytes(b"not an image any more")
        r = client.get("/items/9001/image")
        assert r.status_code == 400 and "not an image" in r.json()["detail"]
        assert str(photo.parent) not in r.json()["detail"]  # the server's folders are not shown to clients
        photo.unlink()
        for url in ("/items/9001/image", "/item/image?id=9001"):
            r = client.get(url)
            assert r.status_code == 404, (url, r.text)
            detail = r.json()["detail"]
            assert "9001" in detail and "spare-bed.png" in detail and "missing" in detail and str(photo.parent) not in detail
        assert client.get("/items/9001").json()["title"] == "Spare bed"  # the row is still served
        r = client.get("/items/999999/image")
        assert r.status_code == 404 and "not in the index" in r.json()["detail"]


def test_filter_lists_over_their_bound_are_422_naming_it_and_the_schema_states_the_bounds(client):
    import json

    over = {"category": ["Kitchen"] + [f"c{i}" for i in range(5000)]}
    r = client.post("/search", json={"text": "a fridge", "filters": over})
    assert r.status_code == 422
    assert r.json()["detail"] == ("filters['category'] lists 5,001 values; a filter may list at most 5,000 values per column "
                                  "(search.max_filter_values)")
    r = client.get("/facets", params={"filters": json.dumps({"price": [1] * 5001})})  # (a URL holds no more)
    assert r.status_code == 422 and "(search.max_filter_values)" in r.json()["detail"]
    r = client.post("/search", json={"text": "a fridge", "filters": {f"c{i}": "x" for i in range(65)}})
    assert r.status_code == 422 and "filters name 65 columns; a query may filter at most 64" in r.json()["detail"]
    at_bound = {"category": over["category"][:5000]}
    r = client.post("/search", json={"text": "a fridge", "k": 3, "filters": at_bound})
    assert r.status_code == 200 and {x["category"] for x in r.json()["results"]} == {"Kitchen"}
    schema = client.get("/openapi.json").json()["paths"]["/search"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    filters = next(s for s in schema["properties"]["filters"]["anyOf"] if s.get("type") == "object")
    assert filters["maxProperties"] == 64
    assert next(s for s in filters["additionalProperties"]["anyOf"] if s.get("type") == "array")["maxItems"] == 5000
