"""min_score="auto": the calibrated "no close match" floor (relevance.py, weights/relevance-floors.json)."""

from __future__ import annotations

import dataclasses
import json
import logging

import pytest

from multiretrieval.config import RetrieverConfig
from multiretrieval.errors import QueryError
from multiretrieval.relevance import FLOORS_FILE, KINDS, floor_config, query_kind, relevance_floor

NONSENSE = "zzqx blorf"


def test_the_package_ships_a_floor_for_every_kind_of_query_under_the_default_models():
    config = RetrieverConfig()
    for kind in KINDS:
        floor = relevance_floor(config, kind)
        assert floor is not None and 0 < floor < 1, kind
    recorded = json.loads(FLOORS_FILE.read_text())
    assert {f["kind"] for f in recorded["floors"]} == set(KINDS)


def test_other_models_have_no_floor_and_say_so_once(caplog):
    config = RetrieverConfig()
    other = dataclasses.replace(config, fusion=dataclasses.replace(config.fusion, kind="attention", weights="my-fusion"))
    with caplog.at_level(logging.WARNING, logger="multiretrieval.relevance"):
        assert relevance_floor(other, "fused") is None
    assert "no calibrated floor for fused" in caplog.text
    # The text floor depends on the text encoder only, not on the zero-shot space.
    zs = dataclasses.replace(config, zero_shot=dataclasses.replace(config.zero_shot, conse_weight=0.9))
    assert relevance_floor(zs, "text") == relevance_floor(config, "text")
    assert relevance_floor(zs, "zero-shot:text") is None
    assert floor_config(config, "image") != floor_config(config, "text")


def test_query_kinds():
    assert query_kind("zero-shot", has_text=True) == "zero-shot:text"
    assert query_kind("zero-shot", has_text=False) == "zero-shot:image"
    assert query_kind("fused", True) == "fused" and query_kind("vector", False) is None


def test_auto_floor_answers_a_nonsense_query_with_nothing(indexed):
    results = indexed.search(text=NONSENSE, k=5, min_score="auto")
    assert results.empty
    assert results.attrs["no_close_match"] is True
    assert results.attrs["min_score"] == relevance_floor(indexed.config, "text")
    assert results.attrs["total"] == 0  # an exact count: no item scores as high as the floor


def test_auto_floor_keeps_a_real_querys_item(indexed):
    title = indexed.items["title"].iloc[0]
    results = indexed.search(text=title, k=5, min_score="auto")
    assert title in results["title"].tolist()
    assert results.attrs["no_close_match"] is False
    assert (results["score"] >= results.attrs["min_score"]).all()


def test_the_python_api_keeps_every_result_unless_asked(indexed):
    results = indexed.search(text=NONSENSE, k=5)
    assert len(results) == 5
    assert results.attrs["min_score"] is None and results.attrs["no_close_match"] is False
    assert len(indexed.search(text=NONSENSE, k=5, min_score="off")) == 5


def test_an_unknown_min_score_word_is_refused(indexed):
    with pytest.raises(QueryError, match='min_score must be a number, "auto" or "off"'):
        indexed.search(text="chair", min_score="high")
