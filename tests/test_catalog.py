import io
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

import multiretrieval as mr
from multiretrieval.catalog import load_image

from .conftest import png_bytes
from .sites import sites  # noqa: F401 - a fixture


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


# ---------------------------------------------------------------- the image column (issue 31, point 1)

FIXTURE_IMAGES = Path(__file__).parent / "fixtures" / "images"


def write_csv(folder, text: str, name: str = "export.csv"):
    path = folder / name
    path.write_text(text)
    for png in ("bed1.png", "desk_lamp1.png"):
        if not (folder / png).exists():
            (folder / png).symlink_to(FIXTURE_IMAGES / png)
    return path


@pytest.mark.parametrize("column", ["image_url", "Image URL", "image_path", "IMG", "photo", "Picture", "thumbnail",
                                    "Image Src", "image link", "image-link"])
def test_an_image_column_is_found_by_its_name(tmp_path, column):
    path = write_csv(tmp_path, f'id,title,description,price,category,"{column}"\n'
                               "1,Bed,oak,650,bedroom,bed1.png\n2,Lamp,brass,39,office,desk_lamp1.png\n")
    catalog = mr.Catalog.read(path)
    assert (catalog.image_column, catalog.image_found) == (column, "name")
    assert catalog.image_sources() == [str(tmp_path / "bed1.png"), str(tmp_path / "desk_lamp1.png")]
    assert "image" in catalog.df.columns and column not in catalog.df.columns  # stored and shown as `image`
    assert catalog.images_note() == f"images from column {column!r} (found by its name)"


def test_a_column_of_image_paths_or_urls_is_found_by_its_values_and_text_never(tmp_path):
    path = write_csv(tmp_path, "id,title,notes,page,media\n"
                               "1,Bed,see bed1.png for the colour,https://shop.example/p/1,bed1.png\n"
                               "2,Lamp,a brass lamp,https://shop.example/p/2,https://cdn.example/i/lamp.JPG?v=3\n")
    catalog = mr.Catalog.read(path)
    assert (catalog.image_column, catalog.image_found) == ("media", "content")
    assert catalog.image_sources() == [str(tmp_path / "bed1.png"), "https://cdn.example/i/lamp.JPG?v=3"]
    assert "found by its values" in catalog.images_note()
    # product pages (URLs without an image's extension) and prose are never taken; the note names the URL column
    plain = mr.Catalog(pd.DataFrame({"id": [1, 2], "title": ["bed1.png", "desk_lamp1.png"],
                                     "page": ["https://shop.example/p/1", "https://shop.example/p/2"]}))
    assert plain.image_column is None and plain.image_sources() == [None, None]
    assert plain.images_note() == ("no image column: every item is indexed by its text; name it with --image-column / "
                                   "catalog.image_column (column 'page' holds web addresses: if they are images, name it)")


def test_image_wins_over_other_image_names_and_two_others_must_be_named(tmp_path):
    both = mr.Catalog(pd.DataFrame({"id": [1], "image": ["a.png"], "thumbnail": ["b.png"], "title": ["x"]}))
    assert both.image_column == "image" and both.df["thumbnail"].tolist() == ["b.png"]  # as before: `image` is the image
    two = pd.DataFrame({"id": [1], "photo": ["a.png"], "image_url": ["b.png"], "title": ["x"]})
    with pytest.raises(mr.CatalogError, match=r"columns \['photo', 'image_url'\] all look like the image column: name the "
                                              r"one that holds the images with image_column="):
        mr.Catalog(two)
    chosen = mr.Catalog(two, image_column="image_url")
    assert chosen.image_found == "given" and chosen.df["image"].tolist() == ["b.png"] and chosen.df["photo"].tolist() == ["a.png"]
    assert chosen.images_note() == "images from column 'image_url' (as named)"
    values = pd.DataFrame({"id": [1], "a": ["x.png"], "b": ["y.jpg"], "title": ["x"]})
    with pytest.raises(mr.CatalogError, match=r"columns \['a', 'b'\] all hold paths or URLs of image files"):
        mr.Catalog(values)


def test_a_named_image_column_must_exist_and_not_clash(tmp_path):
    path = write_csv(tmp_path, "id;title;image_url\n1;Bed;bed1.png\n")
    assert mr.Catalog.read(path, image_column="image_url").image_sources() == [str(tmp_path / "bed1.png")]
    assert mr.Catalog.from_csv(path, image_column="IMAGE_URL").image_column == "image_url"  # any case
    with pytest.raises(mr.CatalogError, match=r"image_column 'imageurl' is not a column; did you mean 'image_url'\?"):
        mr.Catalog.read(path, image_column="imageurl")
    with pytest.raises(mr.CatalogError, match="has a column 'image' too"):
        mr.Catalog(pd.DataFrame({"id": [1], "image": ["a"], "pic": ["b.png"]}), image_column="pic")
    with pytest.raises(mr.CatalogError, match="images are its files"):
        mr.Catalog.from_folder(FIXTURE_IMAGES, image_column="photo")
    assert len(mr.Catalog.read(FIXTURE_IMAGES, image_column="photo")) == 8  # a folder: the config's column does not apply


def test_a_catalog_without_an_image_column_says_so_and_counts_every_item_text_only(tmp_path):
    report = mr.Retriever().index(pd.DataFrame({"id": [1, 2], "title": ["oak bed", "desk lamp"],
                                                "link": ["https://shop.example/p/1", "https://shop.example/p/2"]}))
    assert (report.indexed, report.text_only, report.images, report.image_column) == (2, 2, 0, None)
    assert "text only 2" in str(report) and "no image column: every item is indexed by its text" in str(report)


def test_an_image_url_catalog_indexes_its_images_and_upserts_match(tmp_path):
    """The shop export of the issue: `id,title,description,price,category,image_url` indexed its texts only, and every
    image query scored 0.0."""
    path = write_csv(tmp_path, "id,title,description,price,category,image_url\n"
                               "1,Bed,double bed with headboard,650,Bedroom,bed1.png\n"
                               "2,Desk lamp,for reading,39,Office,desk_lamp1.png\n")
    r = mr.Retriever()
    report = r.index(path)
    assert (report.indexed, report.text_only, report.images, report.image_column) == (2, 0, 2, "image_url")
    assert "images from column 'image_url' (found by its name)" in str(report)
    hits = r.search(image=FIXTURE_IMAGES / "bed1.png", k=2)
    assert hits["id"].tolist() == [1, 2] and hits["score"].iloc[0] > 0.99
    assert hits["image"].iloc[0] == "bed1.png" and r.image_source(1) == str(tmp_path / "bed1.png")  # thumbnails
    again = r.upsert(path)  # tonight's export, the same column name: nothing changed
    assert again.changes["unchanged"] == 2 and again.changes["added"] == again.changes["updated"] == 0


def test_an_image_column_of_urls_is_downloaded(tmp_path, sites):
    site = sites("127.0.0.1", {"i/bed.png": (FIXTURE_IMAGES / "bed1.png").read_bytes(),
                               "i/lamp.png": (FIXTURE_IMAGES / "desk_lamp1.png").read_bytes()})
    frame = pd.DataFrame({"id": ["a", "b"], "title": ["Bed", "Lamp"], "Image URL": [site.url("i/bed.png"), site.url("i/lamp.png")]})
    r = mr.Retriever()
    report = r.index(frame)
    assert sorted(p for p, _ in site.requests) == ["i/bed.png", "i/lamp.png"] and report.text_only == 0
    assert r.search(image=FIXTURE_IMAGES / "desk_lamp1.png", k=1)["id"].iloc[0] == "b"


def test_the_config_names_the_image_column(tmp_path):
    path = write_csv(tmp_path, "id,title,main,alt\n1,Bed,bed1.png,desk_lamp1.png\n")
    config = mr.RetrieverConfig().with_overrides({"catalog": {"image_column": "alt"}})
    r = mr.Retriever(config)
    report = r.index(path)
    assert report.image_column == "alt" and r.image_source(1) == str(tmp_path / "desk_lamp1.png")
    assert r.items["main"].tolist() == ["bed1.png"]
    # rows already in the index's form (the service's items: an upload is their `image`), or without an image
    r.add(pd.DataFrame({"id": [2, 3], "title": ["Lamp", "Vase"], "image": [str(tmp_path / "bed1.png"), None]}))
    assert r.image_source(2) == str(tmp_path / "bed1.png") and r.image_source(3) is None


def test_an_image_url_index_serves_its_thumbnails_and_takes_the_services_writes(tmp_path):
    from fastapi.testclient import TestClient

    from multiretrieval.server import create_app

    path = write_csv(tmp_path, "id,title,price,image_url\n1,Bed,650,bed1.png\n2,Desk lamp,39,desk_lamp1.png\n")
    r = mr.Retriever()
    r.index(path)
    r.save(tmp_path / "idx")
    with TestClient(create_app(tmp_path / "idx"), base_url="http://127.0.0.1:8000") as client:
        assert client.get("/items/1/image").headers["content-type"] == "image/png"
        assert client.put("/items/1", data={"metadata": '{"title": "Oak bed", "price": 700}'}).status_code == 200
        assert client.get("/items/1/image").status_code == 200  # a new price keeps the photo
        photo = (FIXTURE_IMAGES / "refrigerator.png").read_bytes()
        assert client.put("/items/3", data={"metadata": '{"title": "Fridge"}'},
                          files={"image": ("f.png", photo, "image/png")}).status_code == 200
        hits = client.post("/search", json={"text": "a bed", "k": 3, "min_score": "off"}).json()["results"]
        assert {h["id"] for h in hits} == {1, 2, 3} and "image_url" not in hits[0]
        assert client.get("/items/3/image").status_code == 200


# ---------------------------------------------------------------- files as shops export them (issue 31, point 5)

@pytest.mark.parametrize("sep", [",", ";", "\t", "|"], ids=["comma", "semicolon", "tab", "bar"])
def test_a_csv_is_read_with_its_own_separator(tmp_path, sep):
    rows = [["id", "title", "price", "image"], ["1", "Bed, oak", "650", "bed1.png"], ["2", "Lamp; brass", "39", "desk_lamp1.png"]]
    import csv

    with open(tmp_path / "export.csv", "w", newline="") as f:
        csv.writer(f, delimiter=sep).writerows(rows)
    write_csv(tmp_path, (tmp_path / "export.csv").read_text())
    catalog = mr.Catalog.read(tmp_path / "export.csv")
    assert list(catalog.df.columns) == ["id", "title", "price", "image"]
    assert catalog.df["title"].tolist() == ["Bed, oak", "Lamp; brass"] and catalog.df["price"].tolist() == [650, 39]


def test_an_id_column_in_capitals_is_the_id(tmp_path):
    (tmp_path / "c.csv").write_text("ID;Title;Price\n007;Bed;650\n8;Lamp;39\n")
    catalog = mr.Catalog.read(tmp_path / "c.csv", text_columns=["Title"])
    assert catalog.ids == ["007", "8"] and catalog.texts() == ["Bed", "Lamp"]
    with pytest.raises(mr.CatalogError, match=r"missing required column 'id' .*; did you mean 'Id' or 'ID'\?"):
        mr.Catalog(pd.DataFrame({"Id": [1], "ID": [2], "title": ["x"]}))


def test_a_semicolon_export_with_decimal_commas_gives_numbers(tmp_path):
    (tmp_path / "c.csv").write_text("id;title;price;size\n1;Bed;650,00;160,5\n2;Sofa;1.299,90;007\n3;Lamp;39;\n")
    catalog = mr.Catalog.read(tmp_path / "c.csv")
    assert catalog.df["price"].tolist() == [650.0, 1299.9, 39.0]
    assert catalog.df["size"].tolist()[:2] == ["160,5", "007"]  # a code with a leading zero keeps the column text


def test_the_separator_that_gives_an_id_column_wins(tmp_path):
    (tmp_path / "c.csv").write_text("id;title;size, cm;image\n1;Bed;160, 200;a.png\n2;Lamp;20, 20;b.png\n")
    catalog = mr.Catalog.read(tmp_path / "c.csv")  # commas split every line in two, too: but only ';' gives an id
    assert list(catalog.df.columns) == ["id", "title", "size, cm", "image"]
    from multiretrieval.catalog import sniff_delimiter

    (tmp_path / "one.csv").write_text("id\n1\n2\n")
    assert sniff_delimiter(tmp_path / "one.csv") == ","


def minimal_xlsx(path, rows):
    """An Excel workbook of one sheet, written without openpyxl (inline strings and numbers)."""
    import zipfile

    def cell(ref, value):
        if isinstance(value, (int, float)):
            return f'<c r="{ref}"><v>{value}</v></c>'
        return f'<c r="{ref}" t="inlineStr"><is><t>{value}</t></is></c>'

    sheet = "".join(f'<row r="{i + 1}">' + "".join(cell(f"{chr(65 + j)}{i + 1}", v) for j, v in enumerate(row)) + "</row>"
                    for i, row in enumerate(rows))
    ns = 'xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main"'
    rel = "http://schemas.openxmlformats.org/officeDocument/2006/relationships"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("[Content_Types].xml", '<?xml version="1.0" encoding="UTF-8"?><Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types">'
                   '<Default Extension="rels" ContentType="application/vnd.openxmlformats-package.relationships+xml"/>'
                   '<Default Extension="xml" ContentType="application/xml"/>'
                   '<Override PartName="/xl/workbook.xml" ContentType="application/vnd.openxmlformats-officedocument.spreadsheetml.sheet.main+xml"/>'
                   '<Override PartName="/xl/worksheets/sheet1.xml" ContentType="application/vnd.openxmlformats-officedocument.spreadsheetml.worksheet+xml"/>'
                   "</Types>")
        z.writestr("_rels/.rels", f'<?xml version="1.0" encoding="UTF-8"?><Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships">'
                   f'<Relationship Id="rId1" Type="{rel}/officeDocument" Target="xl/workbook.xml"/></Relationships>')
        z.writestr("xl/workbook.xml", f'<?xml version="1.0" encoding="UTF-8"?><workbook {ns} xmlns:r="{rel}">'
                   '<sheets><sheet name="Products" sheetId="1" r:id="rId1"/></sheets></workbook>')
        z.writestr("xl/_rels/workbook.xml.rels", f'<?xml version="1.0" encoding="UTF-8"?><Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships">'
                   f'<Relationship Id="rId1" Type="{rel}/worksheet" Target="worksheets/sheet1.xml"/></Relationships>')
        z.writestr("xl/worksheets/sheet1.xml", f'<?xml version="1.0" encoding="UTF-8"?><worksheet {ns}><sheetData>{sheet}</sheetData></worksheet>')
    return path


XLSX_ROWS = [["id", "title", "price", "image_url"], [1, "Bed", 650, "bed1.png"], [2, "Desk lamp", 39.5, "desk_lamp1.png"]]


@pytest.mark.parametrize("name", ["export.xlsx", "export.csv"])  # an Excel file saved under a .csv name, too
def test_an_excel_workbook_without_openpyxl_says_what_to_install(tmp_path, monkeypatch, name):
    import sys

    monkeypatch.setitem(sys.modules, "openpyxl", None)  # import openpyxl: ImportError
    path = minimal_xlsx(tmp_path / name, XLSX_ROWS)
    with pytest.raises(mr.CatalogError, match=r"an Excel workbook \(.xlsx\); reading it needs the package openpyxl: "
                                              r"pip install openpyxl"):
        mr.Catalog.read(path)
    (tmp_path / "old.xls").write_bytes(b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\0" * 504)
    monkeypatch.setitem(sys.modules, "xlrd", None)
    with pytest.raises(mr.CatalogError, match="needs the package xlrd: pip install xlrd"):
        mr.Catalog.read(tmp_path / "old.xls")
    with pytest.raises(mr.CatalogError, match="not a CSV: read it with Catalog.read"):
        mr.Catalog.from_csv(path)


@pytest.mark.parametrize("name", ["export.xlsx", "export.csv"])
def test_an_excel_workbook_is_read_as_a_table(tmp_path, name):
    pytest.importorskip("openpyxl")
    path = minimal_xlsx(tmp_path / name, XLSX_ROWS)
    write_csv(tmp_path, "", name="unused.csv")
    catalog = mr.Catalog.read(path)
    assert catalog.ids == [1, 2] and catalog.df["id"].dtype == "int64" and catalog.df["price"].tolist() == [650, 39.5]
    assert catalog.image_column == "image_url" and catalog.image_sources()[0] == str(tmp_path / "bed1.png")


def test_a_path_that_is_not_there_says_folder_or_file_and_what_is_near(tmp_path):
    (tmp_path / "photos_2024").mkdir()
    (tmp_path / "products.csv").write_text("id,title\n1,x\n")
    cases = {"photos/": "folder not found; did you mean {p}/photos_2024?",
             "photos_2042": "folder not found; did you mean {p}/photos_2024?",
             "prodcts.csv": "catalog file not found; did you mean {p}/products.csv?",
             "products.xlsx": "catalog file not found; did you mean {p}/products.csv?",
             "zzz.csv": "catalog file not found"}
    for given, expected in cases.items():
        with pytest.raises(mr.CatalogError) as missing:
            mr.Catalog.read(f"{tmp_path}/{given}")
        assert str(missing.value) == f"{tmp_path}/{given}: " + expected.format(p=tmp_path)
    with pytest.raises(mr.CatalogError, match=r"folder not found \(there is no folder .*/nowhere\)"):
        mr.Catalog.read(tmp_path / "nowhere" / "photos")


def test_a_catalog_that_is_not_utf8_says_so(tmp_path):
    (tmp_path / "c.csv").write_bytes("id,title\n1,Caf\u00e9\n".encode("cp1252"))
    with pytest.raises(mr.CatalogError, match=r"c.csv: not UTF-8 text \(byte 0xe9 on line 2\): save it as \"CSV UTF-8\""):
        mr.Catalog.read(tmp_path / "c.csv")
