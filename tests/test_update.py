"""Retriever.update (issue 31, point 3): a partial update of one item through the upsert's machinery: only the
values given change, None empties one, a new image or text encodes the item again, metadata alone changes in
place; an unknown id, a bad value or a bad image changes nothing."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import multiretrieval as mr
import multiretrieval.retriever as retriever_module

from .conftest import png_bytes


def snapshot(r: mr.Retriever):
    """Everything an update may change: the rows, the keys, the stored vectors of every space."""
    return (r.items.astype(object).where(r.items.notna(), None).to_dict("records"), r.store.keys.tolist(),
            {space: r.vectors(space).copy() for space in ("joint", "clip_image", "clip_text")})


def assert_same(a, b) -> None:
    assert a[0] == b[0] and a[1] == b[1]
    for space in a[2]:
        np.testing.assert_array_equal(a[2][space], b[2][space])


def test_only_the_given_values_change_and_metadata_changes_in_place(retriever_copy, monkeypatch):
    r = retriever_copy
    before, keys, joint = r.get(575), r.store.keys.tolist(), r.vectors("joint", [575])
    # Metadata alone: nothing is hashed or encoded (no image file is even read), the item keeps its key and vectors.
    monkeypatch.setattr(retriever_module, "hash_catalog", lambda *a: pytest.fail("a metadata change hashed the item"))
    report = r.update(575, price=89, colour="white", category=None)
    assert (report.changed, report.reencoded, report.unchanged) == (["category", "price", "colour"], False, False)
    after = r.get(575)
    assert after["price"] == 89 and after["colour"] == "white" and after["category"] is None
    assert {c: after[c] for c in before if c not in ("price", "category")} == {c: before[c] for c in before if c not in ("price", "category")}
    assert r.store.keys.tolist() == keys and np.array_equal(r.vectors("joint", [575]), joint)
    assert r.search(text="washing machine", k=1, where="colour = 'white'")["id"].tolist() == [575]
    assert r.update(575, price=89.0).unchanged  # the value it has


def test_a_new_text_or_image_encodes_the_item_again(retriever_copy, fixtures):
    r = retriever_copy
    report = r.update(575, title="Front loader KX-9")
    assert report.changed == ["title"] and report.reencoded
    assert r.get(575)["description"] == "front-loading, 7 kg" and r.get(575)["image"] == "images/washing_machine.png"
    assert r.search(text="KX-9", k=1)["id"].tolist() == [575]
    car = str(fixtures / "images" / "smart-car.png")
    assert r.update(575, image=car).changed == ["image"]
    np.testing.assert_allclose(r.vectors("clip_image", [575]), r.vectors("clip_image", [367]), atol=1e-6)


def test_an_image_given_as_bytes_or_pil_is_kept_beside_the_index(retriever_copy, tmp_path):
    r = retriever_copy  # loaded from tmp_path / "copy": its uploads are beside it
    blue = png_bytes((50, 50), (20, 40, 220))
    assert r.update(47, image=blue).reencoded
    kept = r.image_source(47)
    assert kept.startswith(str(tmp_path / "copy.uploads")) and open(kept, "rb").read() == blue
    r.update(118, image=Image.new("RGB", (50, 50), (20, 40, 220)))
    assert r.image_source(118).startswith(str(tmp_path / "copy.uploads"))
    np.testing.assert_allclose(r.vectors("clip_image", [47]), r.vectors("clip_image", [118]), atol=1e-5)  # one blue
    assert r.update(47, image=None).changed == ["image"] and r.image_source(47) is None  # by its text now
    r.save(tmp_path / "copy")
    loaded = mr.Retriever.load(tmp_path / "copy")
    assert loaded.image_source(47) is None and loaded.image_source(118) == r.image_source(118)
    unsaved = mr.Retriever(embedder=r.embedder)
    unsaved.index(r.items.head(2), show_progress=False)
    with pytest.raises(mr.CatalogError, match="save this retriever first"):
        unsaved.update(unsaved.items["id"].iloc[0], image=blue)


@pytest.mark.parametrize(("fields", "error", "message"), [
    ({"price": "cheap"}, mr.CatalogError, r"^update of item 575: column 'price' holds 'cheap', but its indexed values"),
    ({"title": None, "description": None, "image": None}, mr.CatalogError, "would have neither image nor text"),
    ({"image": b"not an image"}, mr.ImageError, "not an image file"),
    ({"image": "/nowhere/photo.png"}, mr.ImageError, r"^update of item 575: image: /nowhere/photo.png: file not found"),
    ({"id": 47}, mr.CatalogError, "is another id"),
    ({"score": 1}, mr.CatalogError, "reserved"),
    ({"tags": ["a", "b"]}, mr.CatalogError, "column 'tags' holds a list"),
    ({f"c{i}": i for i in range(65)}, mr.CatalogError, r"65 new columns .* at most 64 \(catalog.max_new_columns\)"),
])
def test_a_bad_update_changes_nothing(retriever_copy, fields, error, message):
    before = snapshot(retriever_copy)
    with pytest.raises(error, match=message):
        retriever_copy.update(575, **{"title": "changed too", **fields})
    assert_same(snapshot(retriever_copy), before)


def test_an_unknown_id_is_not_found(retriever_copy):
    before = snapshot(retriever_copy)
    with pytest.raises(mr.ItemNotFoundError, match="12345"):
        retriever_copy.update(12345, price=1, image=png_bytes())
    assert_same(snapshot(retriever_copy), before)
    assert not (retriever_copy.uploads and retriever_copy.uploads.exists())  # the photo was not kept either
