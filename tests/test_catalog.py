import io

import pandas as pd
import pytest
from PIL import Image

import multiretrieval as mr
from multiretrieval.catalog import load_image

from .conftest import png_bytes


def test_from_csv_resolves_images_against_the_csv_folder(catalog, fixtures):
    assert len(catalog) == 8
    assert catalog.df["id"].dtype == "int64"
    sources = catalog.image_sources()
    assert all(s.startswith(str(fixtures / "images")) for s in sources)
    assert catalog.texts()[0] == "Washing machine. front-loading, 7 kg"


def test_parquet_round_trip(catalog, tmp_path):
    catalog.df.to_parquet(tmp_path / "c.parquet")
    (tmp_path / "images").symlink_to(catalog.image_root / "images")
    again = mr.Catalog.from_parquet(tmp_path / "c.parquet")
    assert again.ids == catalog.ids
    assert all(Path_exists(s) for s in again.image_sources())


def Path_exists(p):
    from pathlib import Path

    return Path(p).is_file()


def test_missing_id_column():
    with pytest.raises(mr.CatalogError, match="missing required column 'id'"):
        mr.Catalog(pd.DataFrame({"title": ["a"]}))


def test_no_image_or_text_column():
    with pytest.raises(mr.CatalogError, match="an item needs an image or a text"):
        mr.Catalog(pd.DataFrame({"id": [1], "price": [3.0]}))


def test_duplicate_ids_name_the_rows():
    df = pd.DataFrame({"id": ["a", "b", "a"], "title": ["x", "y", "z"]})
    with pytest.raises(mr.CatalogError, match=r"duplicate id 'a' in rows 0, 2"):
        mr.Catalog(df)


def test_duplicate_ids_across_int_and_string_forms():
    with pytest.raises(mr.CatalogError, match="duplicate id"):
        mr.Catalog(pd.DataFrame({"id": [7, "7"], "title": ["x", "y"]}))


def test_empty_id():
    with pytest.raises(mr.CatalogError, match=r"row\(s\) 1: empty id"):
        mr.Catalog(pd.DataFrame({"id": ["a", " "], "title": ["x", "y"]}))


def test_row_with_neither_image_nor_text():
    df = pd.DataFrame({"id": [1, 2], "image": ["a.png", None], "title": ["x", "  "]})
    with pytest.raises(mr.CatalogError, match=r"row\(s\) 1 \(id 2.*neither image nor text"):
        mr.Catalog(df)


def test_reserved_column_names():
    with pytest.raises(mr.CatalogError, match="reserved"):
        mr.Catalog(pd.DataFrame({"id": [1], "title": ["x"], "score": [1.0]}))


def test_missing_catalog_file(tmp_path):
    with pytest.raises(mr.CatalogError, match="catalog file not found"):
        mr.Catalog.from_csv(tmp_path / "nope.csv")


def test_load_image_missing_file(tmp_path):
    with pytest.raises(mr.ImageError, match="file not found"):
        load_image(tmp_path / "nope.png")


def test_load_image_not_an_image(tmp_path):
    path = tmp_path / "x.png"
    path.write_text("this is not a png")
    with pytest.raises(mr.ImageError, match="not an image"):
        load_image(path)


def test_load_image_truncated(tmp_path):
    buf = io.BytesIO()
    Image.effect_noise((256, 256), 60).convert("RGB").save(buf, format="PNG")
    path = tmp_path / "cut.png"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(mr.ImageError, match="corrupt or truncated"):
        load_image(path)


def test_load_image_decompression_bomb_is_refused_before_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    Image.new("1", (20_000, 20_000)).save(path)  # 400M pixels in a few kB
    assert path.stat().st_size < 200_000
    with pytest.raises(mr.ImageError, match="decompression bomb"):
        load_image(path)


def test_load_image_too_many_bytes():
    with pytest.raises(mr.ImageError, match="exceeds the limit"):
        load_image(png_bytes(), max_bytes=10)


def test_load_image_empty_file(tmp_path):
    (tmp_path / "e.png").write_bytes(b"")
    with pytest.raises(mr.ImageError, match="empty file"):
        load_image(tmp_path / "e.png")


def test_transparent_images_are_composited_on_white():
    image = load_image(png_bytes(color=(255, 0, 0, 0), mode="RGBA"))
    assert image.mode == "RGB" and image.getpixel((0, 0)) == (255, 255, 255)
