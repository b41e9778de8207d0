"""The service's image_url (issue 28, point 2): a public address that redirects inside the network is refused at
the redirect, and nothing inside is asked. 127.0.0.2 stands for the public address here (tests/sites.py)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from multiretrieval import downloads
from multiretrieval.server import create_app

from ..conftest import png_bytes
from ..sites import sites  # noqa: F401 - a fixture


@pytest.fixture()
def client(indexed, tmp_path, monkeypatch):
    monkeypatch.setattr(downloads, "PUBLIC", downloads.AddressPolicy(lambda ip: str(ip) == "127.0.0.2", "a public address"))
    indexed.save(tmp_path / "idx")
    with TestClient(create_app(tmp_path / "idx"), base_url="http://127.0.0.1:8000") as c:  # image_urls="public"
        yield c


def test_an_image_url_that_redirects_inside_the_network_is_refused(client, sites):
    inside = sites("127.0.0.1", {"admin.png": png_bytes(color=(0, 0, 255))})
    shop = sites("127.0.0.2", {"photo.png": png_bytes(), "moved.png": ("redirect", inside.url("admin.png"))})
    assert client.post("/search", json={"image_url": shop.url("photo.png"), "k": 2}).status_code == 200  # the shop passes
    for answer in (client.post("/search", json={"image_url": shop.url("moved.png")}),
                   client.post("/search/batch", json={"queries": [{"image_url": shop.url("moved.png")}]})):
        assert answer.status_code == 400
        assert "redirected to a host that is not allowed: '127.0.0.1' resolves to 127.0.0.1, which is not a public address" \
            in answer.json()["detail"]
    assert inside.requests == []  # never connected to
    refused = client.post("/search", json={"image_url": inside.url("admin.png")})  # named directly: refused as before
    assert refused.status_code == 400 and "not a public address" in refused.json()["detail"] and inside.requests == []
