"""A folder of product photos as a user brings it: 200 images in mixed formats, subfolders, phone photos rotated
by EXIF, one corrupt file, and files that are not images. Built from the demo catalog's renders."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image

DEMO = Path(__file__).resolve().parents[1] / "data" / "demo"
LAMPS = ("Scopia/desk_lamp1.png", "Scopia/table_lamp.png", "Scopia/little_lamp1.png", "BlendSwap-CC-BY/lamp.png")
OTHERS = ("KatorLegaz/bullet-trash-can.png", "Reallusion/girlSittingTable.png", "Scopia/wooden_office_pear_table.png",
          "Scopia/step-ladder-metal.png", "Scopia/bush.png", "Scopia/clothes-rack.png", "Scopia/rattanSofa.png",
          "BlendSwap-CC-BY/bunkBed.png", "BlendSwap-CC-BY/piano.png", "BlendSwap-CC-BY/cocktailGlass.png",
          "BlendSwap-CC-BY/dresserWithDrawers.png", "BlendSwap-CC-0/toiletBrush.png", "BlendSwap-CC-0/desk.png",
          "BlendSwap-CC-0/dustbin.png", "BlendSwap-CC-0/glassDoorCabinet.png", "BlendSwap-CC-0/sinkCabinet.png",
          "KatorLegaz/towel-rack.png", "KatorLegaz/concept-sedan-02.png", "KatorLegaz/stapler.png", "Scopia/armchair1.png")
ORIENTATION = 0x0112
FOLDER_SIZE = 200  # images that decode (issue 12: "a folder of 200 mixed-format images"), plus one corrupt file


def more_products(n: int) -> list[str]:
    """n more demo renders, none of them a light of any kind (so the four LAMPS are the lamps), in catalog order."""
    import csv

    with open(DEMO / "catalog.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    taken = {f"images/{p}" for p in LAMPS + OTHERS}
    lit = ("lamp", "light", "lantern", "chandelier", "candle")
    return [r["image"].removeprefix("images/") for r in rows if r["category"] != "Lights" and r["image"] not in taken
            and not any(w in r["title"].lower() for w in lit)][:n]


def heif_available() -> bool:
    from multiretrieval.catalog import register_optional_formats

    return register_optional_formats()


def _on_white(image: Image.Image) -> Image.Image:
    image = image.convert("RGBA")
    background = Image.new("RGBA", image.size, (255, 255, 255, 255))
    background.alpha_composite(image)
    return background.convert("RGB")


def _pad(image: Image.Image) -> Image.Image:
    """On a wider white canvas (160 x 128): not square, so a turn changes its shape."""
    canvas = Image.new("RGB", (160, 128), (255, 255, 255))
    canvas.paste(image, (16, 0))
    return canvas


def _encode(image: Image.Image, fmt: str, orientation: int | None = None) -> bytes:
    buf = io.BytesIO()
    if orientation:  # stored turned; the EXIF tag says how to turn it upright
        turn = {6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270, 3: Image.Transpose.ROTATE_180}[orientation]
        exif = Image.Exif()
        exif[ORIENTATION] = orientation
        image.transpose(turn).save(buf, format=fmt, exif=exif, quality=90)
    elif fmt == "GIF":
        frames = [image.convert("P"), Image.new("RGB", image.size, (255, 0, 0)).convert("P")]  # the second frame is red
        frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=100)
    else:
        image.save(buf, format=fmt, **({"quality": 90} if fmt in ("JPEG", "WEBP", "AVIF", "HEIF") else {}))
    return buf.getvalue()


def make_photo_folder(root: Path, size: int = FOLDER_SIZE) -> dict[str, str]:
    """Write the folder (``size`` images that decode, at least the 24 LAMPS and OTHERS); returns {id (path in
    the folder): demo image it shows} for the images that decode."""
    # The four lamps come first: a phone photo turned by EXIF, a HEIC (when pillow-heif is installed), a GIF, an AVIF.
    formats = ["JPEG", "HEIF" if heif_available() else "JPEG", "GIF", "AVIF", "PNG", "WEBP", "TIFF", "BMP"]
    suffix = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "TIFF": "tif", "BMP": "bmp", "AVIF": "avif", "HEIF": "heic"}
    folders = ["", "living room/", "shop/lights and more/"]
    shown = {}
    for n, source in enumerate(LAMPS + OTHERS + tuple(more_products(size - len(LAMPS) - len(OTHERS)))):
        image = _pad(_on_white(Image.open(DEMO / "images" / source)).resize((128, 128)))
        fmt = formats[n % len(formats)]
        orientation = {0: 6, 8: 8, 16: 3}.get(n) if fmt == "JPEG" else None  # three phone photos, stored turned
        name = f"{folders[n % len(folders)]}IMG_{1000 + n}.{suffix[fmt]}"
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(_encode(image, fmt, orientation))
        shown[name] = source
    good = _encode(_on_white(Image.open(DEMO / "images" / OTHERS[0])), "JPEG")
    (root / "IMG_broken.jpg").write_bytes(good[: len(good) // 3])  # cut short
    (root / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")  # hidden: left out
    (root / "notes.txt").write_text("not an image")  # not an image file: left out
    (root / ".thumbnails").mkdir()
    (root / ".thumbnails" / "IMG_1000.jpg").write_bytes(good)  # in a hidden folder: left out
    return shown
