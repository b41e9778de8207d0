"""Readers for the real data sets the project trains and tunes on (see DESIGN.md).

Each reader turns an unpacked Debian package into a catalog DataFrame with the columns of
:class:`multiretrieval.Catalog` (id, image, title, description, metadata). Nothing here
downloads: fetch the package with ``apt-get download NAME`` and unpack it with
``dpkg -x NAME.deb DIR`` first.
"""

from __future__ import annotations

import hashlib
import re
import zipfile
from pathlib import Path

import pandas as pd

from .utils import stable_hash

SWEETHOME3D_FURNITURE_DIR = "usr/share/sweethome3d/furniture"

# The licence of each pack of sweethome3d-furniture, from the package's copyright file.
SWEETHOME3D_LICENSES = {
    "KatorLegaz": "CC-BY-3.0-US",
    "Reallusion": "CC-BY-3.0-US",
    "Scopia": "CC-BY-3.0",
    "BlendSwap-CC-BY": "CC-BY-3.0",
    "BlendSwap-CC-0": "CC0-1.0",
}

_UNICODE_ESCAPE = re.compile(r"\\u([0-9a-fA-F]{4})")
_KEY_VALUE = re.compile(r"((?:[^=:\\]|\\.)+?)\s*[=:]\s*(.*)$")


def parse_java_properties(text: str) -> dict[str, str]:
    """Parse a Java ``.properties`` file (ISO-8859-1 text, ``\\uXXXX`` escapes, ``\\`` continuations)."""
    props: dict[str, str] = {}
    logical = ""
    for raw in text.splitlines():
        line = raw.lstrip() if not logical else raw.strip()
        if not logical and (not line or line[0] in "#!"):
            continue
        if line.endswith("\\") and not line.endswith("\\\\"):
            logical += line[:-1]
            continue
        logical += line
        match = _KEY_VALUE.match(logical)
        logical = ""
        if not match:
            continue
        key, value = match.group(1), match.group(2)
        value = _UNICODE_ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), value)
        props[key.strip()] = value.replace("\\:", ":").replace("\\=", "=").replace("\\\\", "\\")
    return props


def read_sweethome3d_furniture(root: str | Path, packs: list[str] | None = None) -> tuple[pd.DataFrame, dict[str, bytes]]:
    """Read the furniture packs of the unpacked Debian package ``sweethome3d-furniture``.

    Args:
        root: the folder ``dpkg -x`` unpacked the package into (or the furniture folder itself).
        packs: pack names to read (default: all five, every one CC-BY 3.0 or CC0).

    Returns:
        (catalog, images): one row per piece of furniture, with columns source_id, pack,
        title, category, tags (the pack's own provider tag removed), width_cm, depth_cm,
        height_cm, creator, license and image (``PACK/FILE.png``); and the icon PNG bytes
        keyed by that image path. Items whose icon is byte-identical to an earlier one are
        dropped, so every image in the catalog is distinct.
    """
    root = Path(root)
    folder = root / SWEETHOME3D_FURNITURE_DIR if (root / SWEETHOME3D_FURNITURE_DIR).is_dir() else root
    rows, images, seen = [], {}, set()
    for pack in packs or list(SWEETHOME3D_LICENSES):
        path = folder / f"{pack}.sh3f"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such pack; unpack sweethome3d-furniture with dpkg -x first")
        with zipfile.ZipFile(path) as zf:
            props = parse_java_properties(zf.read("PluginFurnitureCatalog.properties").decode("latin-1"))
            provider_tag = props.get("name", "").replace(" CC-0", "").replace(" CC-BY", "")
            n = 1
            while f"id#{n}" in props:
                icon = props[f"icon#{n}"].lstrip("/")
                data = zf.read(icon)
                digest = hashlib.sha256(data).hexdigest()
                if digest not in seen:
                    seen.add(digest)
                    image = f"{pack}/{Path(icon).name}"
                    images[image] = data
                    tags = [t.strip() for t in props.get(f"tags#{n}", "").split(",")]
                    tags = [t for t in tags if t and t != provider_tag and t != pack]
                    rows.append(
                        {
                            "source_id": props[f"id#{n}"],
                            "pack": pack,
                            "title": props[f"name#{n}"].strip(),
                            "category": props.get(f"category#{n}", "").strip(),
                            "tags": ", ".join(tags),
                            "width_cm": float(props.get(f"width#{n}", "nan")),
                            "depth_cm": float(props.get(f"depth#{n}", "nan")),
                            "height_cm": float(props.get(f"height#{n}", "nan")),
                            "creator": props.get(f"creator#{n}", "").strip(),
                            "license": SWEETHOME3D_LICENSES[pack],
                            "image": image,
                        }
                    )
                n += 1
    return pd.DataFrame(rows), images


TUXPAINT_STAMPS_DIR = "usr/share/tuxpaint/stamps"
OPENCLIPART_DIR = "usr/share/openclipart/png"


def split_of(key: str, eval_share: float = 0.4) -> str:
    """A stable train/eval split by the hash of an item's key (its path): 'eval' or 'train'."""
    bucket = stable_hash(key) / 0xFFFFFFFF
    return "eval" if bucket < eval_share else "train"


def read_tuxpaint_stamps(root: str | Path) -> pd.DataFrame:
    """Stamps of the unpacked Debian package ``tuxpaint-stamps-default`` (GPL-2: use as data, do not ship).

    Returns one row per PNG stamp that has an English description: columns id (the path
    under stamps/), image (absolute path), title (the one-line description), category (the
    top folder: animals, food, ...), subcategory, split ('train' or 'eval', by path hash;
    the eval split is reserved for evaluation and never trained on).
    """
    root = Path(root)
    folder = root / TUXPAINT_STAMPS_DIR if (root / TUXPAINT_STAMPS_DIR).is_dir() else root
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not found; unpack tuxpaint-stamps-default with dpkg -x first")
    rows = []
    for png in sorted(folder.rglob("*.png")):
        txt = png.with_suffix(".txt")
        if not txt.is_file():
            continue
        lines = txt.read_text(encoding="utf-8", errors="replace").splitlines()
        description = lines[0].strip() if lines else ""
        if not description:
            continue
        rel = png.relative_to(folder).as_posix()
        parts = rel.split("/")
        rows.append({"id": rel, "image": str(png), "title": description, "category": parts[0],
                     "subcategory": "/".join(parts[1:-1]), "split": split_of(rel)})
    return pd.DataFrame(rows)


_FILENAME_NOISE = re.compile(r"(_?\d+|_[a-z]{1,2})$")


def read_openclipart(root: str | Path, max_items: int | None = None) -> pd.DataFrame:
    """Clip art of the unpacked Debian package ``openclipart-png`` (public domain).

    Titles are the file names made readable ("light_bulb_karl_bartel_01" -> "light bulb
    karl bartel"; author names stay: the titles are noisy), the folder path is the category.
    """
    root = Path(root)
    folder = root / OPENCLIPART_DIR if (root / OPENCLIPART_DIR).is_dir() else root
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not found; unpack openclipart-png with dpkg -x first")
    rows = []
    for png in sorted(folder.rglob("*.png")):
        rel = png.relative_to(folder).as_posix()
        stem = png.stem.lower()
        while _FILENAME_NOISE.search(stem):
            stem = _FILENAME_NOISE.sub("", stem)
        title = re.sub(r"[_\-.]+", " ", stem).strip()
        category = " / ".join(p.replace("_", " ") for p in rel.split("/")[:-1])
        if title:
            rows.append({"id": rel, "image": str(png), "title": title, "category": category})
    df = pd.DataFrame(rows)
    return df.sample(n=max_items, random_state=0).sort_index() if max_items and len(df) > max_items else df
