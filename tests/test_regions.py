"""Search by a part of a photo (issue 33): crop boxes, the salient default box, crop queries through API and CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from multiretrieval.errors import QueryError
from multiretrieval.regions import crop_box, crop_image, salient_box


def scene(fixtures, names=("bed1.png", "smart-car.png"), size=(512, 256)) -> Image.Image:
    """The fixture photos side by side on a white canvas, each filling its half."""
    canvas = Image.new("RGB", size, (255, 255, 255))
    cell = size[0] // len(names)
    for i, name in enumerate(names):
        photo = Image.open(fixtures / "images" / name).convert("RGB")
        photo.thumbnail((cell, size[1]))
        canvas.paste(photo, (i * cell + (cell - photo.width) // 2, (size[1] - photo.height) // 2))
    return canvas


def test_a_crop_is_fractions_when_all_values_are_within_0_and_1_else_pixels():
    assert crop_box((0, 0, 1, 1), 640, 480) == (0, 0, 640, 480)
    assert crop_box((0.25, 0.5, 0.75, 1.0), 640, 480) == (160, 240, 480, 480)
    assert crop_box((160, 240, 480, 480), 640, 480) == (160, 240, 480, 480)
    assert crop_box([0.5, 0, 2, 3], 640, 480) == (0, 0, 2, 3)  # 2 > 1: pixels, all of them
    assert crop_box((0.5, 0.5, 0.5001, 0.5001), 10, 10) == (5, 5, 6, 6)  # at least one pixel


@pytest.mark.parametrize(("crop", "message"), [
    ((0.5, 0.2, 0.5, 0.9), "crop is empty: x0 = x1 = 0.5"),
    ((0.1, 0.9, 0.6, 0.2), "crop is inverted: y1 = 0.2 is less than y0 = 0.9"),
    ((10, 10, 700, 200), "crop: x1 = 700 px is outside the photo, whose width is 640 px"),
    ((10, 10, 300, 481), "crop: y1 = 481 px is outside the photo, whose height is 480 px"),
    ((-0.1, 0, 0.5, 0.5), "crop: x0 = -0.1 is negative"),
    ((0, 0, 1), "crop must be 4 numbers (x0, y0, x1, y1), got 3"),
    ("0,0,1,1", "crop must be 4 numbers"),
    ((0, 0, float("nan"), 1), "crop: x1 must be a finite number"),
    ((0, True, 1, 1), "crop: y0 must be a finite number"),
])
def test_a_bad_crop_is_refused_naming_the_field_and_the_value(crop, message):
    with pytest.raises(QueryError) as error:
        crop_box(crop, 640, 480)
    assert message in str(error.value)


def test_a_crop_query_finds_the_item_in_its_part_of_the_scene(indexed, fixtures):
    photo = scene(fixtures)
    left = indexed.search(image=photo, crop=(0, 0, 0.5, 1), k=3)
    right = indexed.search(image=photo, crop=(256, 0, 512, 256), k=3)
    assert left["title"].iloc[0] == "Bed" and right["title"].iloc[0] == "Smart car"
    # the crop is the query: the same scores as the cut-out photo searched whole
    alone = indexed.search(image=photo.crop((256, 0, 512, 256)), k=3)
    assert right["id"].tolist() == alone["id"].tolist() and right["score"].tolist() == pytest.approx(alone["score"].tolist())


def test_a_crop_in_a_batch_and_its_errors(indexed, fixtures):
    photo = scene(fixtures)
    left, right = indexed.search_batch([{"image": photo, "crop": (0, 0, 0.5, 1), "k": 1},
                                        {"image": photo, "crop": (0.5, 0, 1, 1), "k": 1}])
    assert (left["title"].iloc[0], right["title"].iloc[0]) == ("Bed", "Smart car")
    with pytest.raises(QueryError, match="crop cuts the query photo, and this query has none"):
        indexed.search(text="a bed", crop=(0, 0, 0.5, 1))
    with pytest.raises(QueryError, match="crop: x1 = 900 px is outside the photo, whose width is 512 px"):
        indexed.search_batch([{"image": photo, "crop": (0, 0, 900, 10)}])


def test_the_salient_box_surrounds_the_product_on_a_large_canvas(indexed, fixtures):
    canvas = Image.new("RGB", (600, 400), (255, 255, 255))
    lamp = Image.open(fixtures / "images" / "desk_lamp1.png").convert("RGB")
    lamp.thumbnail((160, 160))
    canvas.paste(lamp, (380, 200))  # the lower right
    x0, y0, x1, y1 = indexed.salient_box(canvas)
    truth = (380 / 600, 200 / 400, (380 + lamp.width) / 600, (200 + lamp.height) / 400)
    inter = max(0, min(x1, truth[2]) - max(x0, truth[0])) * max(0, min(y1, truth[3]) - max(y0, truth[1]))
    assert inter >= 0.8 * (truth[2] - truth[0]) * (truth[3] - truth[1])  # the lamp lies within the box
    assert (x1 - x0) * (y1 - y0) < 0.35  # and the box is far from the whole photo
    assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
    # the box is one a crop query takes as it is
    assert crop_image(canvas, (x0, y0, x1, y1)).size[0] < 600
    assert salient_box(canvas, indexed.embedder.image_encoder) == (x0, y0, x1, y1)


def test_the_cli_searches_by_a_crop(indexed, fixtures, tmp_path, capsys):
    from multiretrieval import cli

    indexed.save(tmp_path / "idx")
    scene(fixtures).save(tmp_path / "scene.png")
    capsys.readouterr()
    assert cli.main(["search", str(tmp_path / "idx"), "--image", str(tmp_path / "scene.png"), "--crop", "0.5,0,1,1",
                     "--k", "1", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["title"] == "Smart car"
    assert cli.main(["search", str(tmp_path / "idx"), "--image", str(tmp_path / "scene.png"), "--crop", "0.6,0,0.2,1"]) != 0
    assert "crop is inverted: x1 = 0.2 is less than x0 = 0.6" in capsys.readouterr().err


def test_the_regions_benchmark_builds_scenes_and_measures_crops_and_region_vectors(fixtures, tmp_path):
    import pandas as pd

    from multiretrieval.benchmarks import build_regions
    from multiretrieval.evaluation import REGION_VARIANTS, evaluate

    catalog = pd.read_csv(fixtures / "catalog.csv")
    counts = build_regions(catalog, fixtures, tmp_path / "bench" / "regions", scenes=4)
    assert counts == {"regions_items": 8, "regions_scenes": 4}
    scenes = pd.read_csv(tmp_path / "bench" / "regions" / "scenes.csv")
    for items, boxes in zip(scenes["items"], scenes["boxes"]):
        items, boxes = json.loads(items), json.loads(boxes)
        assert 2 <= len(items) == len(boxes) <= 6 and len(set(items)) == len(items)
        assert all(0 <= x0 < x1 <= 512 and 0 <= y0 < y1 <= 384 for x0, y0, x1, y1 in boxes)
    again = build_regions(catalog, fixtures, tmp_path / "again", scenes=4)  # seeded: the same scenes
    assert counts == again and (tmp_path / "again" / "scenes" / "3.png").read_bytes() == (
        tmp_path / "bench" / "regions" / "scenes" / "3.png").read_bytes()

    results = evaluate(tmp_path / "bench", tmp_path / "report", only=["regions"], show_progress=False)["regions"]
    assert results["crop"]["queries"] == 4 and set(results["scenes"]) == {"queries", *REGION_VARIANTS}
    crop = results["crop"]
    assert crop["crop around the item"]["R@1"] >= crop["whole scene"]["R@1"]
    grid13 = next(name for name, recipe in REGION_VARIANTS.items() if recipe == "grid13")
    assert results["scenes"]["whole image"]["vectors"] == 1 and results["scenes"][grid13]["vectors"] == 14
    assert results["scenes"]["whole image"]["region_bytes"] == 0
    assert results["scenes"][grid13]["region_bytes"] == 13 * (1280 * 2 + 1)  # float16 vectors and their mask, per scene
    assert results["scenes"][grid13]["R@10"] >= results["scenes"]["whole image"]["R@10"]
    assert "## A part of a photo" in (tmp_path / "report" / "report.md").read_text()


# ---------------------------------------------------------------- region vectors on the item side (index.image_regions)

IN_ROOM = ("bed1.png", "desk_lamp1.png", "smart-car.png")


def room_catalog(fixtures, folder, inside=IN_ROOM):
    """Three fixture photos small in a room-like scene ("room"), and the fixture photos not in it as items of their own."""
    import pandas as pd

    canvas = Image.new("RGB", (600, 400), (205, 190, 170))
    for j, name in enumerate(inside):
        photo = Image.open(fixtures / "images" / name).convert("RGB")
        photo.thumbnail((150, 150))
        canvas.paste(photo, (30 + j * 190, 200 - 60 * (j % 2)))
    canvas.save(folder / "room.png")
    singles = sorted(p.name for p in (fixtures / "images").glob("*.png") if p.name not in inside)
    return pd.DataFrame([{"id": n, "image": str(fixtures / "images" / n)} for n in singles] + [{"id": "room", "image": str(folder / "room.png")}])


def regions_config(recipe="grid13"):
    from multiretrieval.config import RetrieverConfig

    return RetrieverConfig.from_dict({"index": {"image_regions": recipe}})


@pytest.fixture(scope="module")
def room(fixtures, tmp_path_factory):
    import multiretrieval as mr

    folder = tmp_path_factory.mktemp("room")
    rows = room_catalog(fixtures, folder)
    out = {}
    for recipe in ("none", "grid13"):
        r = mr.Retriever(regions_config(recipe))
        r.index(mr.Catalog(rows, text_columns=()), show_progress=False)
        out[recipe] = r
    return out, rows


def test_an_item_photo_finds_the_scene_that_contains_it_only_with_region_vectors(room, fixtures):
    retrievers, _ = room
    for name in IN_ROOM:
        photo = fixtures / "images" / name
        assert retrievers["none"].search(image=photo, k=3)["id"].iloc[0] != "room"  # the whole scene is a room, not a bed
        found = retrievers["grid13"].search(image=photo, k=3)
        assert found["id"].iloc[0] == "room", name
        # the scene scores its best region's cosine with the photo, on the image query scale
        store = retrievers["grid13"].collection.store
        row = store.rows_of(store.keys_for(["room"]))[0]
        query = retrievers["grid13"].embedder.image_encoder.encode([photo])[0]
        best = (store.features["region_vectors"][row].astype(np.float32) @ query).max()
        assert found["score"].iloc[0] == pytest.approx(best, abs=1e-5)


def test_an_item_scores_the_better_of_its_whole_photo_and_its_best_region(room, fixtures):
    retrievers, rows = room
    photo = fixtures / "images" / rows["id"].iloc[0]  # an item's own photo: its whole photo scores 1, no region beats it
    whole, regions = (retrievers[r].search(image=photo, k=len(rows)).set_index("id")["score"] for r in ("none", "grid13"))
    assert regions.iloc[0] == pytest.approx(1.0, abs=1e-5) and regions.index[0] == rows["id"].iloc[0]
    assert (regions.loc[whole.index] >= whole - 1e-6).all()  # a region only ever lifts a score
    # filtered, paged and batched alike
    where = "id IN ('room', 'refrigerator.png')"
    bed = fixtures / "images" / "bed1.png"
    filtered = retrievers["grid13"].search(image=bed, k=5, where=where)
    assert sorted(filtered["id"]) == ["refrigerator.png", "room"] and filtered["id"].iloc[0] == "room"
    batch = retrievers["grid13"].search_batch([{"image": bed, "k": 3}, {"image": bed, "k": 1, "offset": 1}])
    assert batch[0]["id"].iloc[0] == "room" and batch[1]["id"].iloc[0] == batch[0]["id"].iloc[1]


def test_region_vectors_survive_save_load_upsert_and_remove(room, fixtures, tmp_path):
    import multiretrieval as mr

    retrievers, rows = room
    bed = fixtures / "images" / "bed1.png"
    before = retrievers["grid13"].search(image=bed, k=3)
    retrievers["grid13"].save(tmp_path / "idx")
    assert (tmp_path / "idx").is_dir()
    loaded = mr.Retriever.load(tmp_path / "idx")
    assert loaded.collection.store.regions == "grid13" and loaded.config.index.image_regions == "grid13"
    after = loaded.search(image=bed, k=3)
    assert after["id"].tolist() == before["id"].tolist() and after["score"].tolist() == pytest.approx(before["score"].tolist())

    loaded.remove([rows["id"].iloc[0]])  # a row before the scene's goes: the region arrays stay aligned with the rows
    store = loaded.collection.store
    assert len(store.features["region_vectors"]) == len(store.features["region_mask"]) == len(store) == len(rows) - 1
    assert loaded.search(image=bed, k=1)["id"].iloc[0] == "room"

    folder = tmp_path / "second"
    folder.mkdir()
    other = room_catalog(fixtures, folder, IN_ROOM[::-1])  # the same three elsewhere in another scene
    report = loaded.upsert(mr.Catalog(other[other["id"] == "room"].assign(id="room2"), text_columns=()), show_progress=False)
    assert report.changes["added"] == 1
    loaded.remove(["room"])
    store = loaded.collection.store
    assert len(store.features["region_vectors"]) == len(store) == len(rows) - 1
    assert loaded.search(image=bed, k=1)["id"].iloc[0] == "room2"
    loaded.save(tmp_path / "idx2")
    again = mr.Retriever.load(tmp_path / "idx2")
    assert again.search(image=bed, k=1)["id"].iloc[0] == "room2"


def test_regions_are_off_by_default_and_then_change_nothing(indexed, catalog, fixtures, tmp_path):
    import multiretrieval as mr
    from multiretrieval.embedder import REGIONS

    assert mr.Retriever().config.index.image_regions == "none"
    assert not set(REGIONS) & set(indexed.collection.store.features)
    assert "image_regions" not in indexed.embedder.fingerprint()  # the whole-photo shard cache stays valid
    none = mr.Retriever(regions_config("none"))
    none.index(catalog, show_progress=False)
    photo = fixtures / "images" / "bed1.png"
    a, b = indexed.search(image=photo, k=8), none.search(image=photo, k=8)
    assert a["id"].tolist() == b["id"].tolist() and a["score"].tolist() == b["score"].tolist()
    indexed.save(tmp_path / "idx")
    assert not list((tmp_path / "idx").rglob("region_*.npy"))


def test_turning_regions_on_with_a_cache_encodes_only_the_region_vectors(catalog, tmp_path):
    import multiretrieval as mr

    mr.Retriever().index(catalog, show_progress=False, cache=tmp_path / "cache")
    report = mr.Retriever(regions_config("grid4")).index(catalog, show_progress=False, cache=tmp_path / "cache")
    assert report.encoded == 0 and report.cached == len(catalog) and report.seconds["regions"] > 0
    again = mr.Retriever(regions_config("grid4")).index(catalog, show_progress=False, cache=tmp_path / "cache")
    assert again.seconds.get("regions", 0) == 0  # the region vectors came from their own shards
    assert len(list((tmp_path / "cache").iterdir())) == 2  # the whole-photo store and the grid4 region store


def test_region_settings_are_checked(room, fixtures):
    import multiretrieval as mr
    from multiretrieval.errors import ConfigError

    with pytest.raises(ConfigError, match="image_regions: 'grid9' is not one of 'none', 'grid4', 'grid13', 'salient6'"):
        regions_config("grid9")
    retrievers, rows = room
    other = mr.Retriever(regions_config("none"))
    other.collection = retrievers["grid13"].collection  # an index with grid13 regions, written with another setting
    with pytest.raises(ConfigError, match="the index holds region vectors 'grid13'.*the config names 'none'"):
        other.add(mr.Catalog(rows.iloc[:1].assign(id="new"), text_columns=()), show_progress=False)
