"""Keyword + vector search and text queries over items with or without text (issue 12, points 2 and 3)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

import multiretrieval as mr
from multiretrieval.keywords import KeywordIndex, tokenize
from multiretrieval.ranking import RRF_K, zero_shot_scale

DEMO = "data/demo/catalog.csv"


def test_model_codes_in_a_query():
    from multiretrieval.keywords import identifiers

    assert identifiers("KX-2210 desk lamp") == ["kx2210"] and identifiers("KX 2210") == ["2210"]
    assert identifiers("500ml bottle, A4 paper") == ["500ml", "a4"] and identifiers("a red sofa, 2 seats, 500 ml") == []


@pytest.mark.parametrize("text", ["KX-2210", "kx2210", "KX 2210", "Kx_2210", "kx-2210!"])
def test_sku_spellings_share_tokens(text):
    assert {"kx", "2210"} <= set(tokenize(text)) or "kx2210" in tokenize(text)
    assert set(tokenize("Desk lamp KX-2210")) >= {"desk", "lamp", "kx", "2210", "kx2210"}
    assert tokenize("500ml bottle, the 3.5mm jack") == ["500", "ml", "500ml", "bottle", "3", "5", "mm", "35mm", "jack"]


def test_keyword_index_adds_removes_filters_saves(tmp_path):
    k = KeywordIndex(("title",))
    k.add(np.array([10, 11, 12, 13]), ["Velmora armchair KX-2210", "Dorvik sofa KX-2211", "", "Velmora sofa LP-0042"])
    assert len(k) == 3  # an empty text adds nothing
    assert k.search("kx2210 armchair", 5)[0].tolist()[0] == 10
    assert k.search("velmora sofa", 5)[0].tolist()[0] == 13
    assert k.search("sofa", 5, allowed=np.array([11]))[0].tolist() == [11]
    assert k.search("the of a", 5)[0].size == 0 and k.search("nothing matches", 5)[0].size == 0
    k.save(tmp_path / "kw")
    again = KeywordIndex.load(tmp_path / "kw", k.describe())
    assert again.search("velmora", 5)[0].tolist() == k.search("velmora", 5)[0].tolist()
    again.remove(np.array([13, 99]))
    assert len(again) == 2 and 13 not in again.search("sofa", 5)[0].tolist()
    (tmp_path / "kw" / "keywords.npz").write_bytes(b"not an index")
    with pytest.raises(mr.IndexLoadError, match="keywords.npz"):
        KeywordIndex.load(tmp_path / "kw", k.describe())


@pytest.fixture(scope="module")
def lamps(catalog):
    """The fixture catalog plus three desk lamps alike in image and words but for their model codes."""
    lamp = catalog.image_sources()[catalog.ids.index(163)]
    extra = pd.DataFrame({"id": [1001, 1002, 1003], "image": [lamp] * 3, "title": ["Desk lamp KX-2210", "Desk lamp KX-2211", "Desk lamp QX-3310"],
                          "description": ["adjustable reading lamp"] * 3, "price": [39.0, 45.0, 52.0]})
    r = mr.Retriever()
    r.index(pd.concat([catalog.df.assign(image=catalog.image_sources()), extra], ignore_index=True), show_progress=False)
    return r


@pytest.mark.parametrize("query", ["KX-2210", "kx2210", "KX 2210", "desk lamp kx-2210", "QX-3310 lamp"])
@pytest.mark.parametrize("hybrid", ["rrf", "weighted"])
def test_an_exact_model_code_finds_its_item_first(lamps, query, hybrid):
    target = 1003 if "3310" in query else 1001
    res = lamps.search(text=query, k=5, hybrid=hybrid)
    assert res["id"].iloc[0] == target
    assert list(res.columns[:7]) == ["rank", "id", "score", "matched", "vector_score", "keyword_score", "hybrid_score"]
    assert res["hybrid_score"].is_monotonic_decreasing and res["keyword_score"].iloc[0] > 0
    # The order is the hybrid one; each score is the joint space's cosine, whichever ranking found the item.
    reached = res["vector_score"].notna()
    np.testing.assert_allclose(res["score"][reached], res["vector_score"][reached])
    assert res["score"].between(-1, 1).all()


def test_rrf_scores_and_the_keyword_weight(lamps):
    res = lamps.search(text="desk lamp kx-2210", k=8)
    first = res.iloc[0]  # first in both rankings: (60 + 1) * (0.5 / 61 + 0.5 / 61) = 1, plus 1 for the exact model code
    assert first["id"] == 1001 and first["hybrid_score"] == pytest.approx(2.0)
    assert (res["hybrid_score"].iloc[1:] <= 1).all()  # no other item carries KX-2210
    plain = lamps.search(text="adjustable desk lamp", k=3)
    assert plain["hybrid_score"].iloc[0] <= 1  # no model code in the query: no bonus
    vector_only = lamps.search(text="desk lamp kx-2210", k=8, hybrid="off")
    assert "keyword_score" not in vector_only and set(vector_only["matched"]) == {"text"}
    no_keywords = lamps.search(text="desk lamp kx-2210", k=8, keyword_weight=0)
    assert no_keywords["id"].tolist() == vector_only["id"].tolist()
    only = lamps.search(text="desk lamp kx-2210", k=3, keyword_weight=1)
    keyword_order = only.dropna(subset=["keyword_score"])
    assert keyword_order["keyword_score"].is_monotonic_decreasing
    assert only["hybrid_score"].iloc[0] == pytest.approx(2.0)
    assert only["hybrid_score"].iloc[1] == pytest.approx((RRF_K + 1) / (RRF_K + 2))
    weighted = lamps.search(text="desk lamp kx-2210", k=3, hybrid="weighted", keyword_weight=0.5)
    top = weighted.iloc[0]
    best = weighted["keyword_score"].max()
    assert top["hybrid_score"] == pytest.approx(0.5 * top["vector_score"] + 0.5 * top["keyword_score"] / best + 1, abs=1e-5)
    filtered = lamps.search(text="kx-2210", k=3, where="price > 40")
    assert 1001 not in filtered["id"].tolist() and filtered["id"].iloc[0] == 1002  # the filter holds for keywords too
    with pytest.raises(mr.QueryError, match="unknown hybrid method"):
        lamps.search(text="lamp", hybrid="both")
    with pytest.raises(mr.QueryError, match="keyword_weight"):
        lamps.search(text="lamp", keyword_weight=1.5)


def test_the_keyword_index_follows_adds_removals_upserts_and_saves(catalog, tmp_path):
    r = mr.Retriever(mr.RetrieverConfig().with_overrides({"catalog": {"keyword_columns": ["sku"]}}))
    frame = catalog.df.assign(image=catalog.image_sources(), sku=[f"AB-{i:04d}" for i in range(8)])
    r.index(frame, show_progress=False)
    assert r.search(text="AB-0003", k=1)["id"].iloc[0] == catalog.ids[3]  # a column read by keywords only
    r.add(pd.DataFrame({"id": [77], "title": ["Garden gnome ZZ-9"]}))
    assert r.search(text="zz-9", k=1)["id"].iloc[0] == 77
    r.remove([77])
    assert 77 not in r.search(text="zz-9", k=10)["id"].tolist()
    changed = frame.copy()
    changed.loc[3, "sku"] = "CD-7777"  # metadata only: updated in place, the keyword index too
    report = r.upsert(changed, show_progress=False)
    assert report.changes["updated"] == 1 and report.encoded == 0
    assert r.search(text="CD-7777", k=1)["id"].iloc[0] == catalog.ids[3]
    assert r.collection.keywords.search("0003", 8)[0].size == 0  # the old code is gone from the keyword index
    r.save(tmp_path / "idx")
    manifest = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    assert manifest["components"]["keywords"] == "keywords" and manifest["keywords"]["count"] == 8
    again = mr.Retriever.load(tmp_path / "idx")
    assert again.search(text="CD-7777", k=1)["id"].iloc[0] == catalog.ids[3]

    # A save made before the keyword index existed: it is built from the stored rows on load.
    shutil.rmtree(tmp_path / "idx" / "keywords")
    del manifest["components"]["keywords"], manifest["keywords"]
    manifest["files"] = {k: v for k, v in manifest["files"].items() if not k.startswith("keywords/")}
    (tmp_path / "idx" / "manifest.json").write_text(json.dumps(manifest))
    old = mr.Retriever.load(tmp_path / "idx")
    assert old.search(text="CD-7777", k=1)["id"].iloc[0] == catalog.ids[3]


@pytest.fixture(scope="module")
def mixed():
    """30 demo items with image and title, and 6 more with only their image (a car and a piano among them)."""
    demo = mr.Catalog.from_csv(DEMO).df
    demo = demo.assign(image=mr.Catalog.from_csv(DEMO).image_sources())
    pictures = demo[demo["title"].isin(["Smart car", "Upright piano", "Bath", "Toilet", "Refrigerator", "Bunk bed"])]
    pictures = pictures.drop_duplicates("title")
    texted = demo[~demo["category"].isin(["Vehicles"]) & ~demo["title"].str.contains("piano|car|Car", regex=True)]
    texted = texted[~texted["id"].isin(pictures["id"])].iloc[::25].head(30)
    frame = pd.concat([texted, pictures.drop(columns=["title"])], ignore_index=True)
    r = mr.Retriever()
    r.index(frame, show_progress=False)
    return r, set(pictures["id"]), dict(zip(pictures["id"], pictures["title"]))


def test_auto_text_queries_merge_item_texts_and_item_images_on_one_scale(mixed):
    r, image_only, titles = mixed
    res = r.search(text="a car", k=5)
    top = res.iloc[0]
    assert titles.get(top["id"]) == "Smart car" and top["matched"] == "image"  # the only car has no text
    assert set(res.loc[res["matched"] == "image", "id"]) <= image_only
    assert set(res.loc[res["matched"] == "text", "id"]).isdisjoint(image_only)
    piano = r.search(text="an upright piano", k=3)
    assert titles.get(piano["id"].iloc[0]) == "Upright piano"
    texts_only = r.search(text="a car", mode="text", k=36)
    assert set(texts_only["matched"]) == {"text"} and not set(texts_only["id"]) & image_only
    a, b = zero_shot_scale(r.embedder, r.collection)
    assert a > 0 and (a, b) != (1.0, 0.0)  # measured on the 30 items that have both


def test_the_zero_shot_scale_does_not_depend_on_the_order_items_came_in(mixed):
    r, _, _ = mixed
    items = r.items.assign(image=r.image_sources().to_numpy())
    half = len(items) // 2
    other = mr.Retriever()
    other.index(items.iloc[half:], show_progress=False)
    other.add(items.iloc[:half])
    np.testing.assert_allclose(zero_shot_scale(other.embedder, other.collection), zero_shot_scale(r.embedder, r.collection), rtol=1e-5)
    few = mr.Retriever()
    few.index(items.iloc[:10], show_progress=False)
    assert zero_shot_scale(few.embedder, few.collection) == (1.0, 0.0)  # too few items with both to measure on


def test_an_item_without_words_is_judged_by_its_vector_rank_alone():
    """A photo with no text cannot match keywords: its vector rank counts whole, so it is not pushed
    below every item that shares a word with the query."""
    from multiretrieval.ranking import Hits, fuse_rankings

    vector = Hits(np.array([1, 2, 3]), np.array([0.6, 0.5, 0.4], np.float32), np.array(["image", "text", "text"], dtype=object))
    keyword = Hits(np.array([2, 3]), np.array([3.0, 2.0], np.float32))
    ranked, v, k = fuse_rankings(vector, keyword, "rrf", 0.5, has_keywords=lambda keys: keys != 1)
    assert ranked.keys.tolist() == [1, 2, 3] and ranked.scores[0] == pytest.approx(1.0) and np.isnan(k[0])
    assert ranked.scores[1] == pytest.approx(61 * (0.5 / 62 + 0.5 / 61))
    unfair, _, _ = fuse_rankings(vector, keyword, "rrf", 0.5)  # were keywords counted against it
    assert unfair.keys.tolist() == [2, 3, 1]
    weighted, _, _ = fuse_rankings(vector, keyword, "weighted", 0.5, has_keywords=lambda keys: keys != 1)
    assert weighted.scores[weighted.keys.tolist().index(1)] == pytest.approx(0.6)


def test_when_no_item_holds_a_query_word_the_vector_ranking_stands():
    """"a bed" over a catalog without the word: an untitled photo third by vectors stays third, not first."""
    from multiretrieval.ranking import Hits, fuse_rankings

    vector = Hits(np.array([2, 3, 1]), np.array([0.54, 0.32, 0.21], np.float32), np.array(["text", "text", "image"], dtype=object))
    none = Hits(np.zeros(0, np.int64), np.zeros(0, np.float32))
    for method in ("rrf", "weighted"):
        ranked, v, k = fuse_rankings(vector, none, method, 0.5, has_keywords=lambda keys: keys != 1)
        assert ranked.keys.tolist() == [2, 3, 1] and np.isnan(k).all()
    assert ranked.scores.tolist() == pytest.approx([0.54, 0.32, 0.21])  # weighted: the vector scores themselves
    rrf, _, _ = fuse_rankings(vector, none, "rrf", 0.5, has_keywords=lambda keys: keys != 1)
    assert rrf.scores.tolist() == pytest.approx([1.0, 61 / 62, 61 / 63])


def test_listings_that_score_alike_come_back_in_one_order_whatever_order_they_were_indexed_in(catalog):
    """Three listings of the same sofa (same photo, same words) score alike under every ranking. Two indexes of
    the same catalog, its rows in other orders, answer the same pages (ties in id order; the reciprocal-rank
    fusion gives equally scored items one rank, so a tie in one ranking cannot tip the fused order)."""
    frame = catalog.df.assign(image=catalog.image_sources())
    sofa = frame[frame["id"] == 56]
    twins = pd.concat([sofa.assign(id=i) for i in (9003, 9001, 9002)], ignore_index=True)
    rows = pd.concat([frame, twins], ignore_index=True)
    answers = []
    for seed in (0, 1, 2):
        r = mr.Retriever()
        r.index(rows.sample(frac=1.0, random_state=seed), show_progress=False)
        answers.append([r.search(text="sofa", k=6)[["id", "hybrid_score"]],
                        r.search(text="sofa", k=6, hybrid="off")[["id", "score"]],
                        r.search(image=sofa["image"].iloc[0], k=6)[["id", "score"]],
                        r.search(image=sofa["image"].iloc[0], k=2)[["id", "score"]]])  # the page ends inside the tie
    for hybrid, vector, image, cut in answers:
        assert cut["id"].tolist() == [56, 9001]
        assert hybrid["id"].tolist()[:4] == [56, 9001, 9002, 9003]  # the sofa's listings first, in id order
        assert hybrid["hybrid_score"].iloc[:4].nunique() == 1  # one rank in each ranking: one fused score
        assert vector["id"].tolist()[:4] == image["id"].tolist()[:4] == [56, 9001, 9002, 9003]
    for other in answers[1:]:
        for a, b in zip(answers[0], other):
            assert a["id"].tolist() == b["id"].tolist()


def test_a_ranking_is_read_through_the_ties_at_its_depth():
    """The items tied with a ranking's last one (to 1e-6) come too: which of several equally scored listings
    enter the fusion must not depend on the order the index holds them in."""
    from multiretrieval.ranking import Hits, through_ties

    hits = Hits(np.array([5, 3, 9, 4, 7]), np.array([0.9, 0.8, 0.8 + 1e-8, 0.8, 0.7], np.float32))
    assert through_ties(hits, 2).keys.tolist() == [5, 3, 9, 4]
    assert through_ties(hits, 1).keys.tolist() == [5] and through_ties(hits, 5).keys.tolist() == [5, 3, 9, 4, 7]
    assert through_ties(hits, 4).keys.tolist() == [5, 3, 9, 4]


def test_a_texts_phrases_are_its_parts_between_punctuation():
    from multiretrieval.keywords import phrases

    assert phrases("Armchair ottoman, blue") == [frozenset({"armchair", "ottoman"}), frozenset({"blue"})]
    assert phrases("Doors and windows. door; screen") == [frozenset({"doors", "windows"}), frozenset({"door"}), frozenset({"screen"})]
    assert phrases("animals / cats (LED) - white") == [frozenset({"animals"}), frozenset({"cats"}), frozenset({"led"}), frozenset({"white"})]
    assert phrases("Screw 3.5 mm, 1/2 inch") == [frozenset({"screw", "3", "5", "35", "mm"}), frozenset({"1", "2", "12", "inch"})]
