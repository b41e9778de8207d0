"""Scores a person can read (issue 11, points 3 and 4): one scale for image, text and fused queries,
min_score on it, per-query modality weights and a subtracted concept (not_text)."""

from __future__ import annotations

import dataclasses
import json
from contextlib import contextmanager

import numpy as np
import pandas as pd
import pytest

import multiretrieval as mr
from multiretrieval import cli

DEMO = "data/demo/catalog.csv"


def own_text(row) -> str:
    return f"{row['title']}. {row['description']}"  # the item's text as the catalog joins it (title, description)


def by_id(frame: pd.DataFrame, column: str = "score") -> dict:
    return dict(zip(frame["id"], frame[column]))


@contextmanager
def composing(retriever, on: bool, word_filter: bool = False):
    """The shared retriever with fusion.compose on or off, and the word filter off unless asked, for a while
    (on 8 items every item is among a photo's 10 nearest, so any word that names an item would filter)."""
    config = retriever.config
    retriever.config = dataclasses.replace(config, fusion=dataclasses.replace(config.fusion, compose=on, word_filter=word_filter))
    try:
        yield retriever
    finally:
        retriever.config = config


@pytest.mark.slow
def test_own_photo_as_an_image_query_scores_at_least_095_for_every_demo_item():
    catalog = mr.Catalog.from_csv(DEMO)
    r = mr.Retriever()
    r.index(catalog, show_progress=False)
    sources = catalog.image_sources()
    ids = catalog.ids
    scores = {}
    step = r.config.search.max_batch
    for start in range(0, len(ids), step):
        frames = r.search_batch([{"image": s, "k": 3} for s in sources[start:start + step]])
        for item, frame in zip(ids[start:start + step], frames):
            scores[item] = by_id(frame).get(item, -1.0)  # identical renders may share rank 1 with their twin
    assert len(scores) == len(catalog) == 820
    worst = min(scores, key=scores.get)
    assert scores[worst] >= 0.95, f"item {worst}: its own photo scores {scores[worst]:.3f}"


def test_own_photo_own_text_and_both_score_one(indexed, catalog):
    for item, source in zip(catalog.ids, catalog.image_sources()):
        text = own_text(indexed.get(item))
        for query in ({"image": source}, {"text": text, "hybrid": "off"}, {"text": text}, {"image": source, "text": text}):
            res = indexed.search(k=8, **query)
            assert by_id(res)[item] == pytest.approx(1.0, abs=1e-4), (item, query)


def test_fused_scores_are_the_weighted_mean_of_image_and_text_scores(indexed, catalog):
    photo = catalog.image_sources()[catalog.ids.index(575)]
    image = by_id(indexed.search(image=photo, k=8))
    text = by_id(indexed.search(text="a bed", k=8, hybrid="off"))
    with composing(indexed, False):
        fused = indexed.search(image=photo, text="a bed", k=8)
    w = indexed.config.fusion.image_weight
    for _, row in fused.iterrows():
        assert row["score"] == pytest.approx(w * image[row["id"]] + (1 - w) * text[row["id"]], abs=1e-5)
        assert row["image_score"] + row["text_score"] == pytest.approx(row["score"], abs=1e-5)
    # Image and text scores are cosines: an unrelated item scores well under the item itself.
    assert max(v for k, v in image.items() if k != 575) < 0.9 and max(text.values()) < 1


def test_composed_fused_scores_read_the_words_with_the_text_of_the_item_nearest_the_photo(indexed, catalog):
    """score = a cos(image) + (1 - a) max(cos(unit(u_nearest + beta u_words), item text), cos(u_words, item text)),
    a = compose_image_share: the better of the words read with the nearest item's text and the words alone."""
    cfg = indexed.config.fusion
    photo = catalog.image_sources()[catalog.ids.index(575)]  # the washing machine's own render: it is its nearest item
    image = by_id(indexed.search(image=photo, k=8))
    d = indexed.vectors("joint").shape[1] - indexed.text_encoder.dim

    def text_part(texts):  # unit text vectors (late fusion's joint vector of a text is [0 ; u_text])
        return indexed.encode(texts=texts)[:, d:]

    words, nearest = text_part(["a bed"])[0], text_part([own_text(indexed.get(575))])[0]
    composed = nearest + cfg.compose_words * words
    composed /= np.linalg.norm(composed)
    item_text = dict(zip(indexed.items["id"], indexed.vectors("joint")[:, d:] / np.sqrt(1 - cfg.image_weight)))
    a = cfg.compose_image_share

    def text_score(item):
        return max(float(item_text[item] @ composed), float(item_text[item] @ words))

    with composing(indexed, True):
        fused = indexed.search(image=photo, text="a bed", k=8)
        shared = indexed.search(image=photo, text="a bed", k=8, weights={"image": 0.6, "text": 0.4})
    readings = {item: float(item_text[item] @ composed) > float(item_text[item] @ words) for item in fused["id"]}
    assert any(readings.values()) and not all(readings.values())  # the washing machine by its composed text, the bed by the words
    for _, row in fused.iterrows():
        assert row["score"] == pytest.approx(a * image[row["id"]] + (1 - a) * text_score(row["id"]), abs=1e-4)
        assert row["image_score"] + row["text_score"] == pytest.approx(row["score"], abs=1e-5)
    for _, row in shared.iterrows():  # weights set the shares of the same two parts
        assert row["score"] == pytest.approx(0.6 * image[row["id"]] + 0.4 * text_score(row["id"]), abs=1e-4)


def test_this_but_on_an_item_gives_its_duplicates_no_credit_for_its_own_text(catalog):
    """like=ID + words: a second listing of the same sofa (same text, same photo) differs from it by nothing
    the words name, so it scores by the words alone (else the item's text plus the words would put it first)."""
    sofa = catalog.df[catalog.df["id"] == 56]
    twin = sofa.assign(id=9056)
    r = mr.Retriever()
    r.index(mr.Catalog(pd.concat([catalog.df, twin], ignore_index=True), image_root=catalog.image_root), show_progress=False)
    found = r.search(like=56, text="a bed", k=8)
    assert found["id"].iloc[0] == 118  # the bed
    vectors = dict(zip(r.items["id"], r.vectors("joint")))
    words = r.query_vectors(images=[catalog.image_sources()[catalog.ids.index(56)]], texts=["a bed"])[0, 1]
    assert by_id(found)[9056] == pytest.approx(float(vectors[9056] @ words), abs=1e-4)  # the words' reading only


@pytest.mark.parametrize("query", [{"image": "washing_machine.png"}, {"text": "a seat"}, {"text": "a seat", "hybrid": "off"},
                                   {"image": "bed1.png", "text": "a sofa"}])
def test_min_score_is_one_threshold_in_every_mode(indexed, fixtures, query):
    query = {**query, **({"image": fixtures / "images" / query["image"]} if "image" in query else {})}
    everything = indexed.search(k=8, **query)
    assert len(everything) == 8
    kept = indexed.search(k=8, min_score=0.5, **query)
    assert kept["id"].tolist() == everything[everything["score"] >= 0.5]["id"].tolist()
    assert (kept["score"] >= 0.5).all() and 0 < len(kept) < 8  # 0.5 keeps close matches, drops unrelated items


def test_weights_move_a_fused_query_between_its_image_and_its_text(indexed, fixtures):
    with composing(indexed, False):  # the words alone (composition: the test above)
        weights_move_a_fused_query(indexed, fixtures)


def weights_move_a_fused_query(indexed, fixtures):
    photo, words = fixtures / "images" / "washing_machine.png", "a bed"
    image_only = indexed.search(image=photo, k=8)
    text_only = indexed.search(text=words, k=8, hybrid="off")
    all_image = indexed.search(image=photo, text=words, k=8, weights={"image": 1.0, "text": 0.0})
    all_text = indexed.search(image=photo, text=words, k=8, weights={"text": 2})
    assert all_image["id"].tolist() == image_only["id"].tolist()
    np.testing.assert_allclose(all_image["score"], image_only["score"], atol=1e-5)
    assert all_text["id"].tolist() == text_only["id"].tolist()
    np.testing.assert_allclose(all_text["score"], text_only["score"], atol=1e-5)
    ranks = {}
    for a in (0.1, 0.5, 0.9):
        res = indexed.search(image=photo, text=words, k=8, weights={"image": a, "text": 1 - a})
        ranks[a] = (res["id"].tolist().index(575), res["id"].tolist().index(118))
        image, text = by_id(image_only), by_id(text_only)
        for _, row in res.iterrows():
            assert row["score"] == pytest.approx(a * image[row["id"]] + (1 - a) * text[row["id"]], abs=1e-5)
    assert ranks[0.1][1] == 0 and ranks[0.1][0] > 0  # mostly the words: the bed first
    assert ranks[0.9][0] == 0 and ranks[0.9][1] > 0  # mostly the photo: the washing machine first
    like = indexed.search(like=575, text="a bed", k=3, weights={"image": 1, "text": 0})
    assert like["id"].tolist() == image_only["id"].tolist()[1:4]  # its photo alone (the item itself left out)


def test_not_text_subtracts_a_concept(indexed, fixtures):
    beta = indexed.config.search.not_text_weight
    plain = by_id(indexed.search(text="a seat", k=8, hybrid="off"))
    sofa = by_id(indexed.search(text="sofa", k=8, hybrid="off"))
    minus = indexed.search(text="a seat", k=8, hybrid="off", not_text="sofa")
    for _, row in minus.iterrows():  # score - beta * the negative's own score as a text query
        assert row["score"] == pytest.approx(plain[row["id"]] - beta * sofa[row["id"]], abs=1e-5)
    drop = {k: plain[k] - v for k, v in by_id(minus).items()}
    assert max(drop, key=drop.get) == 56  # the sofa loses most
    assert minus["id"].tolist().index(56) > sorted(plain, key=plain.get, reverse=True).index(56)
    assert by_id(indexed.search(text="a seat", k=8, not_text="sofa"))[56] < plain[56]  # hybrid: its score drops too

    photo = fixtures / "images" / "mid-century-bench-sofa.png"
    image = by_id(indexed.search(image=photo, k=8))
    with_negative = by_id(indexed.search(image=photo, k=8, not_text="sofa"))
    assert all(with_negative[k] == pytest.approx(image[k] - beta * sofa[k], abs=1e-5) for k in image)
    fused = by_id(indexed.search(image=photo, text="a seat", k=8))
    assert by_id(indexed.search(image=photo, text="a seat", k=8, not_text="sofa"))[56] < fused[56]
    cars = by_id(indexed.search(text="a vehicle", mode="zero-shot", k=8))
    assert by_id(indexed.search(text="a vehicle", mode="zero-shot", k=8, not_text="a car"))[367] < cars[367]


@pytest.mark.parametrize("options,match", [
    ({"text": "sofa", "weights": {"image": -1, "text": 1}}, "image must be a non-negative number"),
    ({"text": "sofa", "weights": {"image": 0, "text": 0}}, "both 0"),
    ({"text": "sofa", "weights": {"colour": 1}}, "unknown key"),
    ({"text": "sofa", "weights": {"image": True}}, "non-negative number"),
    ({"text": "sofa", "weights": {"image": float("nan")}}, "non-negative number"),
    ({"text": "sofa", "weights": "image=1"}, "weights must map"),
    ({"weights": {"image": 1, "text": 1}}, "not to a image query"),
    ({"image": None, "text": "sofa", "weights": {"image": 1}}, "not to a text query"),
    ({"text": "sofa", "not_text": "  "}, "not_text is empty"),
    ({"text": "sofa", "not_text": 3}, "not_text must be a string"),
    ({"vector": np.ones(1664, np.float32), "not_text": "legs"}, "not a vector"),
])
def test_bad_weights_and_not_text_are_query_errors(indexed, fixtures, options, match):
    options = {"image": fixtures / "images" / "bed1.png", **options}
    if "vector" in options or options.get("image") is None:
        options.pop("image")
    with pytest.raises(mr.QueryError, match=match):
        indexed.search(**options)
    with pytest.raises(mr.LimitError, match="not_text has"):
        indexed.search(text="sofa", not_text="x" * (indexed.config.search.max_text_chars + 1))


def test_attention_fusion_scores_on_the_same_scale(retriever_copy, catalog):
    """The real attention module (untrained, seeded): its late block scaled as late fusion's, its learned
    block calibrated on the catalog, so an own photo scores 1 on average and an own photo + text exactly 1."""
    import torch

    from multiretrieval.fusion import AttentionFusion
    from multiretrieval.query.scores import fusion_calibration

    r = retriever_copy
    # The fused score itself: the word filter would order an item its own words name by its photo alone.
    r.config = dataclasses.replace(r.config, fusion=dataclasses.replace(r.config.fusion, word_filter=False))
    torch.manual_seed(0)
    fusion = AttentionFusion(r.image_encoder.dim, r.text_encoder.dim, dim=64, heads=2, out_dim=32)
    with torch.no_grad():
        fusion.module.mix_logit.fill_(0.0)  # half the score from the learned part, to make the calibration matter
    r.embedder.use_fusion(fusion, None)
    r.collection.refit_joint(r.embedder)
    calibration = fusion_calibration(r.embedder, r.collection)
    assert set(calibration) == {"image", "text"} and all(0.1 <= c <= 1 for c in calibration.values())
    own = []
    for item, source in zip(catalog.ids, catalog.image_sources()):
        own.append(by_id(r.search(image=source, k=8))[item])
        text = own_text(r.get(item))
        assert by_id(r.search(image=source, text=text, k=8))[item] == pytest.approx(1.0, abs=1e-4)
    assert np.mean(own) == pytest.approx(1.0, abs=1e-3) and min(own) > 0.8
    uncalibrated = 0.5 + 0.5 * calibration["image"]  # what an own photo would score without the calibration
    assert uncalibrated < 0.99 or calibration["image"] > 0.98


def test_an_index_saved_before_the_scale_is_fused_again_when_it_loads(retriever_copy, fixtures, tmp_path):
    r = retriever_copy
    photo = fixtures / "images" / "refrigerator.png"
    r.add(pd.DataFrame({"id": [9001], "image": [str(photo)]}), show_progress=False)  # an item with a photo only
    assert r.search(image=photo, k=8).pipe(by_id)[9001] == pytest.approx(1.0, abs=1e-4)
    store = r.store  # the old layout: every item's joint vector renormalised
    r.collection.indexes.rebuild("joint", store.keys, r.embedder.fuse(store.features), len(store))
    assert r.search(image=photo, k=8).pipe(by_id)[9001] > 1.2
    r.save(tmp_path / "old")
    manifest = json.loads((tmp_path / "old" / "manifest.json").read_text())
    del manifest["score_scale"]
    (tmp_path / "old" / "manifest.json").write_text(json.dumps(manifest))
    again = mr.Retriever.load(tmp_path / "old")
    assert again.search(image=photo, k=8).pipe(by_id)[9001] == pytest.approx(1.0, abs=1e-4)
    assert again.search(image=photo, k=8).pipe(by_id)[773] == pytest.approx(1.0, abs=1e-4)


def test_cli_min_score_weights_and_not_text(indexed, fixtures, tmp_path, capsys):
    indexed.save(tmp_path / "idx")
    photo = str(fixtures / "images" / "washing_machine.png")
    assert cli.main(["search", str(tmp_path / "idx"), "--image", photo, "--text", "a bed", "--weights", "image=1,text=0",
                     "--min-score", "0.5", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["id"] == 575 and rows[0]["score"] == pytest.approx(1.0, abs=1e-4) and all(x["score"] >= 0.5 for x in rows)
    assert cli.main(["search", str(tmp_path / "idx"), "--text", "a seat", "--not-text", "sofa", "--hybrid", "off",
                     "--format", "json"]) == 0
    minus = {x["id"]: x["score"] for x in json.loads(capsys.readouterr().out)}
    assert minus[56] < by_id(indexed.search(text="a seat", hybrid="off"))[56]
    assert cli.main(["search", str(tmp_path / "idx"), "--image", photo, "--text", "x", "--weights", "image=-1"]) == 2
    assert "non-negative" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["search", str(tmp_path / "idx"), "--text", "x", "--weights", "image:1"])
    assert "image=A,text=B" in capsys.readouterr().err


def test_service_takes_weights_not_text_and_min_score_and_refuses_bad_ones(indexed, fixtures, tmp_path):
    from fastapi.testclient import TestClient

    from multiretrieval.server import create_app

    indexed.save(tmp_path / "idx")
    photo = (fixtures / "images" / "washing_machine.png").read_bytes()
    with TestClient(create_app(tmp_path / "idx"), base_url="http://127.0.0.1:8000") as client:
        form = client.post("/search", files={"image": ("w.png", photo, "image/png")},
                           data={"text": "a bed", "k": "8", "weights": json.dumps({"image": 1, "text": 0}), "min_score": "0.5"})
        assert form.status_code == 200, form.text
        rows = form.json()["results"]
        assert rows[0]["id"] == 575 and rows[0]["score"] == pytest.approx(1.0, abs=1e-4) and all(r["score"] >= 0.5 for r in rows)
        assert len(rows) < 8
        plain = client.post("/search", json={"text": "a seat", "k": 8, "hybrid": "off", "min_score": "off"}).json()["results"]
        minus = client.post("/search", json={"text": "a seat", "k": 8, "hybrid": "off", "not_text": "sofa", "min_score": "off"}).json()["results"]
        assert {r["id"]: r["score"] for r in minus}[56] < {r["id"]: r["score"] for r in plain}[56]
        batch = client.post("/search/batch", json={"queries": [{"like": 575, "text": "a bed", "weights": {"image": 1}, "k": 2},
                                                               {"text": "a seat", "not_text": "sofa", "min_score": 0.3}]})
        assert batch.status_code == 200 and all(r["score"] >= 0.3 for r in batch.json()["results"][1]["results"])
        for body in ({"text": "a bed", "weights": {"image": 1, "text": 1}},  # not a fused query
                     {"like": 575, "text": "a bed", "weights": {"image": -0.5, "text": 1}},
                     {"like": 575, "text": "a bed", "weights": {"image": 0, "text": 0}},
                     {"like": 575, "text": "a bed", "weights": {"colour": 1}},
                     {"text": "a bed", "not_text": ""}, {"vector": [0.0] * 1664, "not_text": "legs"}):
            answer = client.post("/search", json=body)
            assert answer.status_code == 400, (body, answer.text)
        assert client.post("/search", json={"like": 575, "text": "a bed", "weights": {"image": "lots"}}).status_code == 422
        assert client.post("/search", json={"text": "a bed", "not_text": "x" * 1001}).status_code == 422
        schema = client.get("/openapi.json").json()["paths"]["/search"]["post"]["requestBody"]["content"]
        fields = schema["application/json"]["schema"]["properties"]
        assert {"weights", "not_text", "min_score"} <= set(fields) and "weights" in schema["multipart/form-data"]["schema"]["properties"]


@pytest.fixture(scope="module")
def rooms(catalog):
    """The fixture items described by their room (as a shop's category), and eleven more listings of the
    refrigerator's photo: a photo of it has twelve nearest items that are all refrigerators."""
    df = catalog.df.assign(description=catalog.df["category"])
    fridge = df[df["id"] == 773]
    copies = pd.concat([fridge.assign(id=9000 + n, title=f"Fridge model {n}") for n in range(11)], ignore_index=True)
    r = mr.Retriever()
    r.index(mr.Catalog(pd.concat([df, copies], ignore_index=True), image_root=catalog.image_root), show_progress=False)
    return r


def test_words_that_name_a_phrase_put_its_items_first_in_the_photos_order(rooms, catalog):
    """Photo + "living room": the items whose text has that phrase (armchair, sofa) come first, ordered and
    scored as the photo alone would (text_score 0); the rest follow as the composed query ranks them."""
    bed = catalog.image_sources()[catalog.ids.index(118)]
    found = rooms.search(image=bed, text="living room", k=6)
    photo = by_id(rooms.search(image=bed, k=len(rooms.items)))
    assert set(found["id"][:2]) == {47, 56}
    assert found["score"][:2].tolist() == pytest.approx(sorted((photo[47], photo[56]), reverse=True), abs=1e-5)
    assert found["score"][:2].tolist() == pytest.approx(found["image_score"][:2].tolist()) and (found["text_score"][:2] == 0).all()
    assert found["word_match"].tolist() == [True, True, False, False, False, False]
    with composing(rooms, True):
        composed = rooms.search(image=bed, text="living room", k=8)
    assert found["id"][2:].tolist() == [i for i in composed["id"] if i not in (47, 56)][:4]
    # The shop page's "this, but" box (like=the bed + words) filters the same way, the bed itself left out.
    this_but = rooms.search(like=118, text="living room", k=6)
    assert set(this_but["id"][:2]) == {47, 56} and this_but["word_match"].tolist()[:3] == [True, True, False]
    assert 118 not in this_but["id"].tolist()


@pytest.mark.parametrize("options", [{"text": "bedroom"}, {"text": "living room", "weights": {"image": 0.5, "text": 0.5}}],
                         ids=["named item not near the photo", "weights given"])
def test_words_do_not_filter_when_the_photo_resembles_none_of_their_items_or_weights_are_given(rooms, catalog, options):
    """The refrigerator photo's ten nearest items are refrigerators: "bedroom" names the bed, which the photo
    does not resemble, so the words compose as before; with weights the caller has said how to mix the two."""
    fridge = catalog.image_sources()[catalog.ids.index(773)]
    found = rooms.search(image=fridge, k=8, **options)
    with composing(rooms, True):
        composed = rooms.search(image=fridge, k=8, **options)
    assert found["id"].tolist() == composed["id"].tolist() and found["score"].tolist() == composed["score"].tolist()
    if "weights" not in options:
        assert rooms.search(image=fridge, text="kitchen", k=3)["text_score"].eq(0).all()  # "kitchen" names the fridges: it filters


def test_under_a_filter_words_pick_among_the_photos_nearest_items_that_the_filter_lets_through(rooms, catalog):
    """The refrigerator photo's ten nearest items are all among its eleven copies and itself, so "bedroom" names
    nothing near it. Filtered to the eight original items, the bed is among the photo's ten nearest that remain and
    comes first; filtered to 18 items, ten of them copies, it is not, and the words filter nothing."""
    fridge = catalog.image_sources()[catalog.ids.index(773)]
    assert not rooms.search(image=fridge, text="bedroom", k=8)["word_match"].any()
    found = rooms.search(image=fridge, text="bedroom", k=8, where="id < 9000")
    assert found["id"][0] == 118 and found["word_match"].tolist()[:2] == [True, False]
    assert found["score"][0] == pytest.approx(by_id(rooms.search(image=fridge, k=len(rooms.items)))[118], abs=1e-5)
    assert (found["id"] < 9000).all()
    wider = rooms.search(image=fridge, text="bedroom", k=8, where="id != 9000")
    assert not wider["word_match"].any() and 9000 not in wider["id"].tolist()
