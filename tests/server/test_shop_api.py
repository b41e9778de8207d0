"""The service's shop endpoints (issue 13): search options, batches, facets, info, product pages, docs."""

import http.server
import json
import threading

import pytest
from fastapi.testclient import TestClient

from multiretrieval.server import create_app
from multiretrieval.server.app import fetch_image_url


@pytest.fixture()
def client(indexed, tmp_path):
    indexed.save(tmp_path / "idx")
    with TestClient(create_app(tmp_path / "idx"), base_url="http://127.0.0.1:8000") as c:
        yield c


def test_search_pages_sorts_filters_and_counts_facets(client):
    body = client.post("/search", json={"text": "a seat", "k": 2, "offset": 1, "sort_by": "-price", "facets": True, "min_score": "off",
                                        "filters": {"category": ["Living room", "Bedroom"]}}).json()
    assert body["offset"] == 1 and body["count"] == 2 and body["has_more"] is False
    assert [r["rank"] for r in body["results"]] == [2, 3]
    assert [r["price"] for r in body["results"]] == [650.0, 189.0]  # 899 (the sofa) is on page one
    assert {v["value"] for v in body["facets"]["category"]["values"]} >= {"Kitchen", "Vehicles"}  # own filter left out
    assert body["took_ms"] >= 0
    one = client.post("/search", json={"text": "a seat", "k": 8, "filters": {"category": "Bedroom"}, "min_score": "off"})
    assert one.status_code == 200 and {r["category"] for r in one.json()["results"]} == {"Bedroom"}


def test_multipart_search_takes_the_same_options(client, fixtures):
    photo = (fixtures / "images" / "mid-century-bench-sofa.png").read_bytes()
    r = client.post("/search", files={"image": ("sofa.png", photo, "image/png")},
                    data={"text": "a bed", "k": "2", "filters": json.dumps({"price": {"max": 700}})})
    assert r.status_code == 200 and r.json()["mode"] == "fused"
    assert all(x["price"] <= 700 for x in r.json()["results"])


def test_like_and_vector_queries(client, indexed):
    assert client.post("/search", json={"like": "56", "k": 1}).json()["results"][0]["id"] == 47
    vector = indexed.encode(texts=["a car"])[0].tolist()
    body = client.post("/search", json={"vector": vector, "k": 1}).json()
    assert body["mode"] == "vector" and body["results"][0]["title"] == "Smart car"
    assert client.post("/search", json={"vector": [1.0, 2.0]}).status_code == 400


def test_batch(client):
    body = client.post("/search/batch", json={"queries": [{"text": "a car", "k": 1}, {"like": 56, "text": "a bed", "k": 1}]}).json()
    assert [b["results"][0]["title"] for b in body["results"]] == ["Smart car", "Bed"]
    assert [b["mode"] for b in body["results"]] == ["text", "fused"]
    too_many = client.post("/search/batch", json={"queries": [{"text": "x"}] * 65})
    assert too_many.status_code == 422


def test_facets_and_info(client):
    facets = client.get("/facets", params={"columns": "category,price", "filters": json.dumps({"price": {"max": 300}})}).json()
    assert {v["value"] for v in facets["category"]["values"]} == {"Living room", "Lights", "Bathroom"}
    assert facets["price"]["kind"] == "range"
    assert client.get("/facets", params={"filters": "{not json"}).status_code == 400
    info = client.get("/info").json()
    assert info["items"] == 8 and info["display"]["price"] == "price" and info["columns"]["price"] == "number"
    assert info["facets"] and set(info["facets"]) <= set(info["columns"])


def test_an_item_is_json_for_programs_and_a_page_for_browsers(client):
    item = client.get("/items/575")
    assert item.json()["title"] == "Washing machine" and item.headers["vary"] == "Accept"
    page = client.get("/items/575", headers={"Accept": "text/html,application/xhtml+xml"})
    assert page.headers["content-type"].startswith("text/html") and "product-view" in page.text
    assert client.get("/items/999", headers={"Accept": "text/html"}).status_code == 404
    from io import BytesIO

    from PIL import Image

    big = client.get("/items/575/image", params={"size": 512})
    assert max(Image.open(BytesIO(big.content)).size) <= 512
    assert client.get("/items/575/image", params={"size": 5000}).status_code == 422


def test_docs_use_a_swagger_ui_that_reads_openapi_3_1(client):
    docs = client.get("/docs").text
    assert "/docs-assets/swagger-ui-bundle.js" in docs and "http://" not in docs.replace("http://127.0.0.1", "")
    bundle = client.get("/docs-assets/swagger-ui-bundle.js").text
    assert '"5.' in bundle[:2_000_000]  # Swagger UI 5: the first major version that reads OpenAPI 3.1
    assert client.get("/openapi.json").json()["openapi"].startswith("3.1")


class _Photo(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        from tests.conftest import png_bytes

        data = png_bytes(color=(250, 250, 250))
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_image_urls_only_from_public_addresses_unless_allowed(client, indexed):
    refused = client.post("/search", json={"image_url": "http://127.0.0.1:9/x.png"})
    assert refused.status_code == 400 and "public" in refused.json()["detail"]
    assert client.post("/search", json={"image_url": "file:///etc/passwd"}).status_code == 400
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Photo)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/p.png"
        assert fetch_image_url(url, indexed.config, "any")[:4] == b"\x89PNG"
        with pytest.raises(Exception, match="turned off"):
            fetch_image_url(url, indexed.config, "off")
    finally:
        server.shutdown()


def test_a_search_answer_gives_the_total_of_matching_items(client):
    """`total`: the items matching the search on every page together (here the filter's), not only this page's."""
    body = client.post("/search", json={"text": "a seat", "k": 2, "filters": {"price": {"max": 700}}, "min_score": "off"}).json()
    assert body["count"] == 2 and body["total"] == 5 and body["has_more"] is True  # 8 items, 3 over 700
    assert client.post("/search", json={"like": 56, "k": 1, "min_score": "off"}).json()["total"] == 7  # the item itself left out
    batch = client.post("/search/batch", json={"queries": [{"text": "a car", "k": 1, "where": "price > 500", "min_score": "off"}]}).json()
    assert batch["results"][0]["total"] == 4
    described = client.get("/openapi.json").json()["components"]["schemas"]["SearchResponse"]["properties"]["total"]
    assert "filters" in described["description"] and {"type": "null"} in described["anyOf"]


def test_facets_give_quantiles_and_info_the_currency(client, indexed, tmp_path):
    price = client.get("/facets", params={"columns": "price"}).json()["price"]
    assert len(price["quantiles"]) == 101 and (price["quantiles"][0], price["quantiles"][-1]) == (price["min"], price["max"])
    assert set(price) >= {"kind", "min", "max", "histogram"}  # the fields clients had keep their meaning
    assert client.get("/info").json()["display"]["currency"] is None  # none configured: the page shows plain numbers
    import multiretrieval as mr

    config = mr.RetrieverConfig.from_dict({**indexed.config.to_dict(), "display": {"currency": "eur"}})
    indexed.save(tmp_path / "shop")
    with TestClient(create_app(tmp_path / "shop", config=config), base_url="http://127.0.0.1:8000") as shop:
        assert shop.get("/info").json()["display"]["currency"] == "EUR"


def test_rows_say_which_items_have_no_photo_to_show(retriever_copy, fixtures, tmp_path):
    """`image` is null where an item has no photo to show: none given, or one that could not be read when it was
    indexed (it is searched by its text; its thumbnail would be a 404), so a page asks for no thumbnail in vain."""
    import pandas as pd

    report = retriever_copy.add(pd.DataFrame([
        {"id": 9001, "title": "Plain shelf", "price": 30.0},
        {"id": 9002, "title": "Broken-photo shelf", "price": 31.0, "image": str(tmp_path / "gone.png")}]), show_progress=False)
    assert report.indexed == 2
    retriever_copy.save(tmp_path / "idx")
    with TestClient(create_app(tmp_path / "idx"), base_url="http://127.0.0.1:8000") as client:
        rows = client.post("/search", json={"text": "a shelf", "k": 10, "min_score": "off"}).json()["results"]
        shown = {r["id"]: r["image"] for r in rows}
        assert shown[9001] is None and shown[9002] is None and shown[575] == "washing_machine.png"
        assert client.get("/items/9002").json()["image"] is None and client.get("/items/575").json()["image"] == "washing_machine.png"
        assert client.get("/items/9002/image").status_code == 404  # what the page no longer asks for
