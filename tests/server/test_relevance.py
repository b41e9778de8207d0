"""The service's default min_score="auto": a nonsense query gets nothing and says so; a real query keeps its item."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from multiretrieval.relevance import relevance_floor
from multiretrieval.server import create_app


@pytest.fixture()
def client(indexed, tmp_path):
    indexed.save(tmp_path / "idx")
    with TestClient(create_app(tmp_path / "idx"), base_url="http://127.0.0.1:8000") as c:
        yield c


def test_a_nonsense_query_is_answered_with_no_close_match_by_default(client, indexed):
    body = client.post("/search", json={"text": "zzqx blorf", "k": 5}).json()
    assert body["results"] == [] and body["count"] == 0 and body["total"] == 0
    assert body["no_close_match"] is True
    assert body["min_score"] == relevance_floor(indexed.config, "text")


def test_off_or_null_shows_the_related_items(client):
    for value in ("off", None):
        body = client.post("/search", json={"text": "zzqx blorf", "k": 5, "min_score": value}).json()
        assert body["count"] == 5 and body["no_close_match"] is False and body["min_score"] is None


def test_a_real_query_keeps_its_item(client, indexed):
    title = indexed.items["title"].iloc[0]
    body = client.post("/search", json={"text": title, "k": 5}).json()
    assert title in [row["title"] for row in body["results"]] and body["no_close_match"] is False


def test_a_form_gives_min_score_as_a_number_or_a_word(client):
    for value, count in (("0.0", 5), ("auto", 0), ("off", 5)):
        body = client.post("/search", data={"text": "zzqx blorf", "k": "5", "min_score": value}).json()
        assert body["count"] == count, (value, body)
    assert client.post("/search", json={"text": "chair", "min_score": "high"}).status_code == 422
