"""The demo: index the bundled catalog, ask one query of each kind, print the results, draw a contact sheet."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from PIL import Image, ImageOps

from .benchmarks import open_rgba, recolour
from .catalog import Catalog, load_image
from .retriever import Retriever
from .visualize import SheetRow, contact_sheet

DEMO_CATALOG = Path(__file__).resolve().parent.parent / "data" / "demo" / "catalog.csv"
# word_match: the items a fused query's words named, ranked first by the photo (why its scores need not fall)
SHOWN_COLUMNS = ["rank", "id", "score", "image_score", "text_score", "word_match", "title", "category"]
VARIANT_OF = ("Armchair ottoman", "Armchair")  # the demo's "this, but X" family: the first of these products, recoloured
VARIANT_COLOURS = ("red", "blue", "green", "yellow")


def photo_of(source: str) -> Image.Image:
    """A stand-in for a customer's photo of a product: the render cropped, mirrored and warmer."""
    image = load_image(source)
    w, h = image.size
    image = ImageOps.mirror(image.crop((w // 12, h // 12, w - w // 12, h - h // 12)))
    r, g, b = image.split()
    return Image.merge("RGB", (r.point(lambda v: min(255, v + 12)), g, b.point(lambda v: max(0, v - 12))))


def run_demo(catalog_path: str | Path = DEMO_CATALOG, out: str | Path = "demo-output", k: int = 5,
             show_progress: bool | None = True, echo=print) -> Path:
    """Run the four kinds of query on the demo catalog; returns the contact sheet's path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    catalog = Catalog.from_csv(catalog_path)
    variant_of = next(t for t in VARIANT_OF if t in set(catalog.df["title"]))
    catalog = Catalog(pd.concat([catalog.df, colour_variants(catalog, variant_of, out / "variants")], ignore_index=True),
                      image_root=catalog.image_root, text_columns=catalog.text_columns)
    echo(f"indexing {len(catalog)} items: {catalog_path} and {len(VARIANT_COLOURS)} colour variants of one armchair")
    retriever = Retriever()
    echo(str(retriever.index(catalog, show_progress=show_progress)))

    def by_title(title: str) -> str:
        return retriever.image_source(catalog.df.loc[catalog.df["title"] == title, "id"].iloc[0])

    couch_photo = photo_of(by_title("Futon couch" if "Futon couch" in set(catalog.df["title"]) else "Sofa"))
    couch_photo.save(out / "query-photo.png")
    red_photo = photo_of(by_title(f"{variant_of}, red"))
    queries = [
        ('text: "a washing machine"', dict(text="a washing machine"), None),
        ("image: a photo of a futon couch (cropped, mirrored, recoloured)", dict(image=couch_photo), couch_photo),
        ('fused: that photo + "bed" (this, but a bed)', dict(image=couch_photo, text="bed"), couch_photo),
        (f'fused: a photo of the red {variant_of.lower()} + "blue" (this, but in blue)', dict(image=red_photo, text="blue"), red_photo),
    ]
    rows = []
    for label, query, picture in queries:
        results = retriever.search(k=k, **query)
        _echo_table(echo, label, results)
        rows.append(SheetRow(label, results, picture))

    # Zero-shot: the same images indexed with no titles at all, queried by text.
    echo("indexing the same images without their titles, for zero-shot text -> image")
    untitled = Catalog(catalog.df.drop(columns=["title"]), image_root=catalog.image_root, text_columns=())
    blind = Retriever()
    echo(str(blind.index(untitled, show_progress=show_progress)))
    label = 'zero-shot: "a car" against untitled item images'
    results = blind.search(text="a car", mode="zero-shot", k=k)
    results.insert(3, "title", catalog.df.set_index("id").loc[results["id"], "title"].to_numpy())
    _echo_table(echo, label + " (titles joined afterwards, for reading)", results)
    rows.append(SheetRow(label, results))

    sheet = contact_sheet(rows, retriever.image_source, out / "contact-sheet.png")
    echo(f"contact sheet: {sheet}")
    return sheet


def colour_variants(catalog: Catalog, title: str, folder: Path) -> pd.DataFrame:
    """Rows of a variant family for the "this, but X" query: the product titled ``title`` recoloured
    (benchmarks.recolour), titled "<title>, <colour>"; the images are written under ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    base = catalog.df.loc[catalog.df["title"] == title].iloc[0]
    source = open_rgba(catalog.image_root / base["image"])
    rows, next_id = [], int(pd.to_numeric(catalog.df["id"]).max()) + 1
    for n, colour in enumerate(VARIANT_COLOURS):
        path = folder / f"{colour}.png"
        recolour(source, colour).save(path)
        rows.append({**base.to_dict(), "id": next_id + n, "title": f"{title}, {colour}", "image": str(path.resolve())})
    return pd.DataFrame(rows)


def _echo_table(echo, label: str, results: pd.DataFrame) -> None:
    echo(f"\n{label}")
    columns = [c for c in SHOWN_COLUMNS if c in results.columns]
    echo(results[columns].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
