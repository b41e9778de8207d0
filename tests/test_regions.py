"""Search by a part of a photo (issue 33): crop boxes, the salient default box, crop queries through API and CLI."""

from __future__ import annotations

import json

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
    assert results["scenes"]["whole image"]["vectors"] == 1 and results["scenes"][REGION_VARIANTS[1]]["vectors"] == 14
    assert "## A part of a photo" in (tmp_path / "report" / "report.md").read_text()
