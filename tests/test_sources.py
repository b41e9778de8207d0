"""Catalogs as users bring them (issue 12, point 1 and the first 'done when'): a folder of photos,
JSON Lines, sidecar metadata, every image format, paths that work from any directory."""

from __future__ import annotations

import io
import json
import logging
from urllib.parse import quote

import pandas as pd
import pytest
from PIL import Image

import multiretrieval as mr
from multiretrieval.cli import main as cli

from .photos import LAMPS, heif_available, make_photo_folder

LOCAL = "http://127.0.0.1:8000"


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("user") / "photos"
    root.mkdir()
    return root, make_photo_folder(root)


@pytest.fixture(scope="module")
def photo_index(photos, tmp_path_factory):
    """`multiretrieval index ~/photos --out idx`, run from another directory than the photos' and the index's."""
    import os

    root, _ = photos
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    out = tmp_path_factory.mktemp("indexes") / "idx"
    before = os.getcwd()
    os.chdir(elsewhere)
    try:
        assert cli(["index", str(root), "--out", str(out), "--no-progress"]) == 0
    finally:
        os.chdir(before)
    return out


def test_a_folder_is_a_catalog_with_ids_from_its_paths(photos):
    root, shown = photos
    catalog = mr.Catalog.from_folder(root)
    assert sorted(catalog.ids) == sorted([*shown, "IMG_broken.jpg"])  # hidden files and folders, notes.txt: left out
    assert "shop/lights and more/IMG_1002.gif" in catalog.ids
    assert all(s == str(root / i) for i, s in zip(catalog.ids, catalog.image_sources()))  # absolute paths
    assert catalog.texts() == [None] * len(catalog)
    flat = mr.Catalog.from_folder(root, recursive=False)
    assert all("/" not in i for i in flat.ids) and len(flat) < len(catalog)
    with pytest.raises(mr.CatalogError, match="no image files"):
        mr.Catalog.from_folder(root.parent, recursive=False)
    with pytest.raises(mr.CatalogError, match="folder not found"):
        mr.Catalog.from_folder(root / "nope")


def test_every_format_decodes_upright_and_gifs_give_their_first_frame(photos):
    root, shown = photos
    for name in shown:
        image = mr.load_image(root / name)
        assert image.size == (160, 128), name  # three of them are stored turned, with an EXIF orientation
    turned = Image.open(root / "IMG_1000.jpg")
    assert turned.size == (128, 160) and turned.getexif()[0x0112] == 6
    gif = mr.load_image(root / "shop" / "lights and more" / "IMG_1002.gif")
    assert gif.getpixel((2, 2)) != (255, 0, 0)  # the first frame (white background), not the red second one
    if heif_available():
        assert Image.open(root / "living room" / "IMG_1001.heic").format == "HEIF"


def test_the_photo_folder_index_from_another_directory(photo_index, photos, tmp_path, monkeypatch, capsys, caplog):
    """Done when: `index ~/photos --out idx` elsewhere; `search idx --text "a lamp"` gives lamps first (assert_lamps_first) with
    scores > 0; `--show` draws every thumbnail; the service serves every thumbnail (ids with slashes)."""
    root, shown = photos
    assert len(shown) == 200  # the folder: 200 images that decode (and one corrupt file)
    monkeypatch.chdir(tmp_path)  # yet another directory
    report = json.loads((photo_index / "index-report.json").read_text())
    assert report["indexed"] == len(shown) and [s["id"] for s in report["skipped"]] == ["IMG_broken.jpg"]
    assert "corrupt or truncated" in report["skipped"][0]["reason"]

    capsys.readouterr()
    assert cli(["search", str(photo_index), "--text", "a lamp", "--k", "6", "--format", "json"]) == 0
    results = json.loads(capsys.readouterr().out)
    lamps = {name for name, source in shown.items() if source in LAMPS}
    assert_lamps_first([r["id"] for r in results], lamps)
    assert all(r["score"] > 0 for r in results) and [r["matched"] for r in results] == ["image"] * 6
    assert results[0]["score"] > results[4]["score"] + 0.1  # the best lamp stands well above the 5th result

    caplog.set_level(logging.WARNING, logger="multiretrieval.visualize")
    sheet = tmp_path / "sheet.png"
    assert cli(["search", str(photo_index), "--text", "a lamp", "--k", "24", "--show", str(sheet)]) == 0
    assert sheet.stat().st_size > 10_000 and not caplog.records  # every thumbnail drawn

    from fastapi.testclient import TestClient

    from multiretrieval.server import create_app

    with TestClient(create_app(photo_index), base_url=LOCAL) as client:
        for item_id in shown:
            for url in (f"/items/{quote(item_id, safe='')}/image", f"/items/{quote(item_id)}/image", f"/item/image?id={quote(item_id)}"):
                thumb = client.get(url)
                assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/png", (url, thumb.text)
                assert Image.open(io.BytesIO(thumb.content)).size == (160, 128)
            assert client.get(f"/items/{quote(item_id, safe='')}").json()["id"] == item_id
        assert_lamps_first([r["id"] for r in client.post("/search", json={"text": "a lamp", "k": 6}).json()["results"]], lamps)


def assert_lamps_first(found: list[str], lamps: set[str]) -> None:
    """"a lamp" over the 200 photos: the two best are lamps, and all four lamps are among the 6 best. These renders
    are the zero-shot projections' own training data; at the cross-validated ConSE weight (training.LIT_CONSE_WEIGHT)
    two stools, which ConSE reads as lamps, come 3rd and 5th (at 0.1 the lamps were the top 4)."""
    assert len(found) == 6 and set(found[:2]) <= lamps and lamps <= set(found), found


def test_title_from_the_file_name_and_sidecar_metadata(tmp_path, fixtures, caplog):
    (tmp_path / "sub").mkdir()
    for name in ("desk_lamp-02.png", "sub/bed1.png", "sub/car.png"):
        (tmp_path / name).write_bytes((fixtures / "images" / "bed1.png").read_bytes())
    (tmp_path / "metadata.csv").write_text("file_name,title,price\ndesk_lamp-02.png,Desk lamp KX-2210,39\nsub/bed1.png,,650\n"
                                           "gone.png,Nobody,1\n")
    (tmp_path / "sub" / "metadata.jsonl").write_text('{"file_name": "car.png", "title": "Smart car", "colour": "red"}\n')
    with caplog.at_level(logging.WARNING):
        catalog = mr.Catalog.from_folder(tmp_path, title_from_filename=True)
    rows = catalog.df.set_index("id")
    assert rows.loc["desk_lamp-02.png", "title"] == "Desk lamp KX-2210" and rows.loc["desk_lamp-02.png", "price"] == 39
    assert rows.loc["sub/bed1.png", "title"] == "bed1" and rows.loc["sub/bed1.png", "price"] == 650  # the file name where the sidecar has none
    assert rows.loc["sub/car.png", "title"] == "Smart car" and rows.loc["sub/car.png", "colour"] == "red"
    assert "gone.png" in caplog.text  # a sidecar row naming no image is reported
    assert mr.catalog.title_from_file_name("IMG_20240101-kitchen.chair.JPG") == "IMG 20240101 kitchen chair"
    (tmp_path / "metadata.csv").write_text("file_name,id\ndesk_lamp-02.png,x\n")
    with pytest.raises(mr.CatalogError, match=r"metadata.csv: column\(s\) \['id'\]"):
        mr.Catalog.from_folder(tmp_path)


def test_json_lines_catalogs_resolve_images_against_their_folder(tmp_path, fixtures):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "bed.png").write_bytes((fixtures / "images" / "bed1.png").read_bytes())
    lines = [{"id": "007", "image": "img/bed.png", "title": "Bed", "price": 650}, {"id": "8", "title": "A text-only item"}]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    catalog = mr.Catalog.read(tmp_path / "c.jsonl")
    assert catalog.ids == ["007", "8"] and catalog.image_sources() == [str(tmp_path / "img" / "bed.png"), None]
    (tmp_path / "c.json").write_text(json.dumps(lines))
    assert mr.Catalog.read(tmp_path / "c.json").ids == ["007", "8"]
    (tmp_path / "bad.jsonl").write_text('{"id": 1}\n{oops\n')
    with pytest.raises(mr.CatalogError, match="bad.jsonl line 2: not valid JSON"):
        mr.Catalog.read(tmp_path / "bad.jsonl")


def test_relative_paths_work_from_any_directory_once_indexed(tmp_path, fixtures, monkeypatch):
    """Image paths are resolved against the catalog file's folder and stored absolute: thumbnails
    and train() work from anywhere."""
    (tmp_path / "shop" / "img").mkdir(parents=True)
    (tmp_path / "shop" / "img" / "bed.png").write_bytes((fixtures / "images" / "bed1.png").read_bytes())
    (tmp_path / "shop" / "c.csv").write_text("id,image,title\n1,img/bed.png,Bed\n")
    monkeypatch.chdir(tmp_path)
    r = mr.Retriever()
    r.index("shop/c.csv", show_progress=False)
    r.save(tmp_path / "idx")
    monkeypatch.chdir(tmp_path / "shop" / "img")
    again = mr.Retriever.load(tmp_path / "idx")
    assert again.image_source(1) == str(tmp_path / "shop" / "img" / "bed.png")
    assert again.store.catalog(("title",)).image_sources() == [str(tmp_path / "shop" / "img" / "bed.png")]


def test_a_path_up_and_out_of_the_catalog_folder_is_stored_without_its_dots(tmp_path, fixtures):
    """`shop/cat/../img/bed.png` was stored as written: once `shop/cat` moved, the image (still in `shop/img`) was
    reported missing."""
    (tmp_path / "shop" / "cat").mkdir(parents=True)
    (tmp_path / "shop" / "img").mkdir()
    (tmp_path / "shop" / "img" / "bed.png").write_bytes((fixtures / "images" / "bed1.png").read_bytes())
    (tmp_path / "shop" / "cat" / "c.csv").write_text("id,image,title\n1,../img/bed.png,Bed\n")
    assert mr.Catalog.read(tmp_path / "shop" / "cat" / "c.csv").image_sources() == [str(tmp_path / "shop" / "img" / "bed.png")]


def test_an_image_given_as_the_catalog_says_so(tmp_path, fixtures):
    with pytest.raises(mr.CatalogError, match=r"bed1.png: an image, not a catalog: give the folder it is in"):
        mr.Catalog.read(fixtures / "images" / "bed1.png")


@pytest.mark.parametrize("column", ["_key", "_image_source", "_mine", "score", "matched", "keyword_score"])
def test_columns_named_like_internal_ones_are_refused(column):
    with pytest.raises(mr.CatalogError, match=f"'{column}'.*reserved"):
        mr.Catalog(pd.DataFrame({"id": [1], "title": ["a"], column: ["x"]}))
