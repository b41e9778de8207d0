"""Nightly upserts without rebuilds (issue 12, point 5): new, changed, re-described, unchanged and
gone rows; removal on graph indexes; the shard cache pruned. Small catalogs; the 100k-item figures
come from benchmarks/upsert.py."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

import multiretrieval as mr
from multiretrieval.cli import main as cli

QUERIES = [dict(text="a washing machine"), dict(text="a sofa to sit on"), dict(text="KX-2210"), dict(text="a car", mode="zero-shot"),
           dict(text="Bed", where="price > 100")]


def base_frame(catalog) -> pd.DataFrame:
    return catalog.df.assign(image=catalog.image_sources())


def next_night(frame: pd.DataFrame, tmp_path, fixtures) -> pd.DataFrame:
    """Tomorrow's catalog: a title changed, an image changed, a price changed, one item new, one gone."""
    new = frame.copy()
    new.loc[new["id"] == 575, "title"] = "Washing machine KX-2210"
    car = tmp_path / "car-v2.png"
    from PIL import Image

    Image.open(fixtures / "images" / "smart-car.png").convert("RGB").rotate(90).save(car)
    new.loc[new["id"] == 367, "image"] = str(car)
    new.loc[new["id"] == 118, "price"] = 600.0
    new = new[new["id"] != 47]
    extra = pd.DataFrame({"id": [900], "image": [str(fixtures / "images" / "desk_lamp1.png")], "title": ["Reading lamp"],
                          "category": ["Lights"], "price": [25.0]})
    return pd.concat([new, extra], ignore_index=True)


def by_id(r: mr.Retriever, space: str) -> dict:
    return dict(zip(r.items["id"].tolist(), r.vectors(space)))


def assert_same_index(a: mr.Retriever, b: mr.Retriever) -> None:
    """Same items, same stored vectors per id in every space, same answers to the queries."""
    assert sorted(a.items["id"]) == sorted(b.items["id"])
    cols = sorted(set(a.items.columns) & set(b.items.columns))

    def rows(r):  # empty is empty, whether None or NaN; numbers compare as numbers
        frame = r.items[cols].sort_values("id").reset_index(drop=True).astype(object)
        return frame.where(frame.notna(), None)

    pd.testing.assert_frame_equal(rows(a), rows(b), check_dtype=False)
    for space in ("joint", "clip_image", "clip_text"):
        va, vb = by_id(a, space), by_id(b, space)
        for item in va:
            np.testing.assert_allclose(va[item], vb[item], atol=1e-6)
    for query in QUERIES:
        ra, rb = a.search(k=5, **query), b.search(k=5, **query)
        assert ra["id"].tolist() == rb["id"].tolist(), query
        np.testing.assert_allclose(ra["score"], rb["score"], atol=1e-5)


def test_upsert_encodes_only_new_and_changed_rows_and_equals_a_fresh_index(catalog, fixtures, tmp_path):
    frame = base_frame(catalog)
    r = mr.Retriever()
    r.index(frame, show_progress=False)
    before = {k: v.copy() for k, v in r.features().items()}
    ids_before = r.items["id"].tolist()
    tomorrow = next_night(frame, tmp_path, fixtures)

    report = r.upsert(tomorrow, prune=True, show_progress=False)
    assert report.changes == {"added": 1, "replaced": 2, "updated": 1, "unchanged": 4, "removed": 1, "indexes rebuilt": 0}
    assert (report.encoded, report.cached, report.indexed) == (3, 0, 3)  # the new item, the new title, the new image
    unchanged = [i for i in ids_before if i not in (575, 367, 47)]
    now = r.items["id"].tolist()
    for name, value in r.features().items():  # untouched rows keep their arrays
        for item in unchanged:
            np.testing.assert_array_equal(value[now.index(item)], before[name][ids_before.index(item)])
    assert r.get(118)["price"] == 600.0 and r.search(text="KX-2210", k=1)["id"].iloc[0] == 575

    fresh = mr.Retriever()
    fresh.index(tomorrow, show_progress=False)
    assert_same_index(r, fresh)
    r.save(tmp_path / "upserted")
    assert_same_index(mr.Retriever.load(tmp_path / "upserted"), fresh)

    again = r.upsert(tomorrow, prune=True, show_progress=False)  # nothing changed: nothing to do
    assert again.encoded == 0 and again.changes["unchanged"] == len(tomorrow)


def test_without_prune_missing_ids_stay_and_a_failed_new_version_keeps_the_old(catalog, tmp_path):
    frame = base_frame(catalog)
    r = mr.Retriever()
    r.index(frame, show_progress=False)
    broken = frame[frame["id"] != 47].copy()
    broken.loc[broken["id"] == 56, ["image", "title", "description"]] = [str(tmp_path / "gone.png"), None, None]
    report = r.upsert(broken, show_progress=False)
    assert 47 in r.items["id"].tolist()  # not pruned
    assert [s.id for s in report.skipped] == [56] and report.changes["replaced"] == 0
    assert r.get(56)["title"] == "Sofa"  # the indexed version stays until a new one encodes


def test_a_photo_that_turned_unreadable_keeps_the_indexed_image_and_the_new_price_lands(fixtures, tmp_path):
    """The item was indexed with its photo; tonight the file is truncated and the price changed. Its text alone would
    encode, but replacing the item with a text-only one loses what the photo found: the image and vectors stay, the
    price is taken (a PUT of a new price, which sends the stored image, must not be refused either)."""
    photo = tmp_path / "lamp.png"
    photo.write_bytes((fixtures / "images" / "desk_lamp1.png").read_bytes())
    frame = pd.DataFrame({"id": ["lamp", "bed"], "image": [str(photo), str(fixtures / "images" / "bed1.png")],
                          "title": ["Desk lamp", "Bed"], "price": [30.0, 500.0]})
    r = mr.Retriever()
    r.index(frame, show_progress=False)
    before = r.vectors("joint", ["lamp"])
    photo.write_bytes(photo.read_bytes()[:200])
    report = r.upsert(frame.assign(price=[25.0, 500.0]), show_progress=False)
    assert (report.changes["replaced"], report.changes["updated"], report.skipped) == (0, 1, [])
    assert [w.id for w in report.warnings] == ["lamp"] and "indexed image and vectors stay" in report.warnings[0].reason
    assert report.encoded + report.cached + len(report.skipped) == 1  # the one row it had to encode
    np.testing.assert_array_equal(r.vectors("joint", ["lamp"]), before)
    assert r.features()["image_mask"][r.items["id"].tolist().index("lamp")].any()
    assert r.get("lamp")["price"] == 25.0 and r.image_source("lamp") == str(photo)
    assert r.search(image=fixtures / "images" / "desk_lamp1.png", k=1)["id"].tolist() == ["lamp"]


def test_an_upsert_keeps_text_ids_that_look_like_numbers_text(tmp_path):
    """Ids "x" and "8" are text; the rows an upsert encodes again (a sub-catalog) must not make "8" the integer 8."""
    r = mr.Retriever()
    r.index(pd.DataFrame({"id": ["x", "8"], "title": ["a chair", "a lamp"]}), show_progress=False)
    report = r.upsert(pd.DataFrame({"id": ["x", "8", "9"], "title": ["a chair", "a brass lamp", "a sofa"]}), show_progress=False)
    assert (report.changes["replaced"], report.changes["added"]) == (1, 1)
    assert r.items["id"].tolist() == ["x", "8", "9"]  # not ["x", 8, 9]
    r.save(tmp_path / "idx")
    assert mr.Retriever.load(tmp_path / "idx").get("8")["title"] == "a brass lamp"


@pytest.mark.parametrize("factory", ["HNSW32", "PCA4,HNSW32,Refine(Flat)"])  # the second: the automatic kind above 100k items, smaller
def test_removal_and_upsert_on_graph_indexes(catalog, fixtures, tmp_path, factory):
    frame = base_frame(catalog)
    config = mr.RetrieverConfig().with_overrides({"index": {"factory": factory, "compact_deleted_share": 0.9}})
    r = mr.Retriever(config)
    r.index(frame, show_progress=False)
    assert r.remove([570]) == 1 and 570 not in r.search(text="a toilet", k=10)["id"].tolist()
    assert len(r.indexes["joint"].deleted) == 1 and len(r.indexes["joint"]) == 7
    tomorrow = next_night(frame[frame["id"] != 570], tmp_path, fixtures)
    r.upsert(tomorrow, prune=True, show_progress=False)
    assert len(r.indexes["joint"].deleted) == 1 + 3  # removed, 2 replaced, 1 pruned: marked, not yet compacted
    fresh = mr.Retriever(config)
    fresh.index(tomorrow, show_progress=False)
    assert_same_index(r, fresh)
    r.save(tmp_path / "graph")
    assert_same_index(mr.Retriever.load(tmp_path / "graph"), fresh)

    compacting = mr.Retriever.load(tmp_path / "graph", config.with_overrides({"index": {"compact_deleted_share": 0.3}}))
    compacting.remove([56])  # 5 of 11 entries marked deleted: past 0.3, the index is rebuilt from the live vectors
    assert len(compacting.indexes["joint"].deleted) == 0 and len(compacting.indexes["joint"]) == len(compacting) == 6
    assert_same_index(compacting, _fresh(config, tomorrow[tomorrow["id"] != 56]))


def _fresh(config, frame):
    r = mr.Retriever(config)
    r.index(frame, show_progress=False)
    return r


def test_the_index_is_rebuilt_only_when_the_automatic_choice_changes(catalog, fixtures, tmp_path, monkeypatch):
    import multiretrieval.index as index_module

    monkeypatch.setattr(index_module, "choose_factory", lambda n, dim, budget: "Flat" if n <= 8 else "HNSW32")
    frame = base_frame(catalog)
    r = mr.Retriever()
    r.index(frame, show_progress=False)
    assert {ix.factory for ix in r.indexes.by_space.values()} == {"Flat"}
    more = pd.concat([frame, pd.DataFrame({"id": [901, 902], "title": ["Reading lamp", "Floor lamp"]})], ignore_index=True)
    report = r.upsert(more, show_progress=False)
    assert report.changes["indexes rebuilt"] == 3 and {ix.factory for ix in r.indexes.by_space.values()} == {"HNSW32"}
    assert report.encoded == 2  # the rebuild re-used the stored vectors: nothing else was encoded
    assert_same_index(r, _fresh(mr.RetrieverConfig(), more))
    r.remove([901, 902])  # a single removal never changes the index kind (no flapping around the threshold)
    assert {ix.factory for ix in r.indexes.by_space.values()} == {"HNSW32"}


def test_cli_update_prune_and_cache_prune(catalog, fixtures, tmp_path, capsys):
    cfg = tmp_path / "small.yaml"
    cfg.write_text(json.dumps({"encoders": {"batch_size": 2}, "ingest": {"shard_size": 2}}))
    today, tomorrow_file = tmp_path / "today.csv", tmp_path / "tomorrow.csv"
    base_frame(catalog).to_csv(today, index=False)
    next_night(base_frame(catalog), tmp_path, fixtures).to_csv(tomorrow_file, index=False)
    out = tmp_path / "idx"
    assert cli(["index", str(today), "--out", str(out), "--config", str(cfg), "--no-progress"]) == 0
    capsys.readouterr()
    assert cli(["index", str(tomorrow_file), "--out", str(out), "--update", "--prune", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "encoded 3, from cache 0" in printed and "added 1, replaced 2, updated 1, unchanged 4, removed 1" in printed
    assert sorted(mr.Retriever.load(out).items["id"]) == sorted(pd.read_csv(tomorrow_file)["id"])

    shards = lambda: len(list((tmp_path / "idx.cache").glob("*/shard-*")))  # noqa: E731
    held = shards()
    assert cli(["cache", "prune", str(out), "--dry-run"]) == 0 and shards() == held
    assert cli(["cache", "prune", str(out)]) == 0
    assert "dropped" in capsys.readouterr().out and 0 < shards() < held
    # What is left is what the index uses: indexing tomorrow's catalog again encodes nothing.
    assert cli(["index", str(tomorrow_file), "--out", str(tmp_path / "again"), "--cache", str(tmp_path / "idx.cache"),
                "--config", str(cfg), "--no-progress"]) == 0
    assert "encoded 0, from cache 8" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli(["index", str(today), "--out", str(out), "--prune"])  # --prune needs --update
    capsys.readouterr()
    # Without --update, indexing a smaller file replaces the index: the items it drops are named by count.
    pd.read_csv(tomorrow_file).head(3).to_csv(tmp_path / "three.csv", index=False)
    assert cli(["index", str(tmp_path / "three.csv"), "--out", str(out), "--cache", str(tmp_path / "idx.cache"),
                "--config", str(cfg), "--no-progress"]) == 0
    assert f"note: {out} held 5 items not in {tmp_path / 'three.csv'}" in capsys.readouterr().err
    assert len(mr.Retriever.load(out)) == 3
    # A damaged index is rebuilt by indexing again (the count is skipped: nothing readable is dropped).
    (out / "index" / "joint.faiss").write_bytes(b"truncated")
    with pytest.raises(mr.IndexLoadError, match="checksum"):
        mr.Retriever.load(out)
    assert cli(["index", str(tmp_path / "three.csv"), "--out", str(out), "--cache", str(tmp_path / "idx.cache"),
                "--config", str(cfg), "--no-progress"]) == 0
    assert len(mr.Retriever.load(out)) == 3


def test_a_boolean_column_that_some_items_lack_takes_only_booleans(retriever_copy, tmp_path):
    """True in a new column (NaN for the other items: an object column), then 'True', was taken as the column's
    text, and every save failed on the mixed column from then on; an empty string stayed '' among the booleans."""
    r = retriever_copy
    r.add(pd.DataFrame([{"id": 9001, "title": "a gift box", "gift": True}]), show_progress=False)
    with pytest.raises(mr.CatalogError, match="column 'gift' holds 'True', but its indexed values are of type bool"):
        r.add(pd.DataFrame([{"id": 9002, "title": "a ribbon", "gift": "True"}]), show_progress=False)
    r.upsert(pd.DataFrame([{"id": 9003, "title": "a card", "gift": ""}, {"id": 9004, "title": "a bow", "gift": False}]),
             show_progress=False)
    r.save(tmp_path / "saved")
    gifts = mr.Retriever.load(tmp_path / "saved").items.set_index("id")["gift"]
    assert gifts[9001] == True and gifts[9004] == False and pd.isna(gifts[9003])  # noqa: E712 - numpy booleans
