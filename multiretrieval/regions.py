"""Parts of a photo: the box a query is cropped to, the photo's most salient region, and item region boxes.

    crop_box(crop, width, height)  -> (x0, y0, x1, y1) pixels   (checks; fractions or pixels in)
    crop_image(image, crop)        -> the PIL image cut to the box
    salient_box(image, encoder)    -> (x0, y0, x1, y1) fractions: the most salient region, from the CNN's activations
    region_boxes(image, encoder, n) -> up to n boxes (fractions): salient components, then 2 x 2 grid cells
    recipe_boxes(recipe, image, encoder) -> the boxes an item photo is also indexed by (index.image_regions, REGION_RECIPES)
    region_arrays(images, encoder, recipe) -> their unit vectors (n, R, dim) float16 and which are real (n, R)
    best_region_scores(vectors, mask, query) -> each item's best region cosine with a unit query vector

The saliency is SCDA's (Wei et al. 2017, "Selective Convolutional Descriptor Aggregation"): the last feature map
summed over its channels, the cells above the map's mean, and of those the largest 4-connected component: the
network's own view of where the object is, with no detector to train or ship.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from .errors import QueryError

Box = tuple[float, float, float, float]


def crop_box(crop: Any, width: int, height: int, field: str = "crop") -> tuple[int, int, int, int]:
    """A crop (x0, y0, x1, y1) -> its pixel box within a width x height image.

    Fractions of the width and height when every value lies in [0, 1] (so (0, 0, 1, 1) is the whole photo), else
    pixels. x0 < x1 and y0 < y1, within the image; the box is widened outwards to whole pixels (at least one).
    Raises QueryError naming ``field`` and the value at fault."""
    if isinstance(crop, str) or not isinstance(crop, Sequence) and not isinstance(crop, np.ndarray):
        raise QueryError(f"{field} must be 4 numbers (x0, y0, x1, y1), got {crop!r}")
    values = list(crop)
    if len(values) != 4:
        raise QueryError(f"{field} must be 4 numbers (x0, y0, x1, y1), got {len(values)}: {crop!r}")
    names = ("x0", "y0", "x1", "y1")
    for name, v in zip(names, values):
        if isinstance(v, bool) or not isinstance(v, (int, float, np.number)) or not math.isfinite(v):
            raise QueryError(f"{field}: {name} must be a finite number, got {v!r}")
        if v < 0:
            raise QueryError(f"{field}: {name} = {v!r} is negative; a box lies within the photo")
    x0, y0, x1, y1 = (float(v) for v in values)
    for lo, hi, a, b in ((x0, x1, "x0", "x1"), (y0, y1, "y0", "y1")):
        if hi == lo:
            raise QueryError(f"{field} is empty: {a} = {b} = {lo:g}; the box needs a width and a height")
        if hi < lo:
            raise QueryError(f"{field} is inverted: {b} = {hi:g} is less than {a} = {lo:g}; give (x0, y0, x1, y1) "
                             "with x0 < x1 and y0 < y1")
    if max(values) <= 1:
        x0, x1, y0, y1 = x0 * width, x1 * width, y0 * height, y1 * height
    else:
        for name, v, side, size in (("x1", x1, "width", width), ("y1", y1, "height", height)):
            if v > size:
                raise QueryError(f"{field}: {name} = {v:g} px is outside the photo, whose {side} is {size} px "
                                 "(give pixels within it, or fractions from 0 to 1)")
    left, top = min(math.floor(x0), width - 1), min(math.floor(y0), height - 1)
    return left, top, max(math.ceil(x1), left + 1), max(math.ceil(y1), top + 1)


def crop_image(image, crop: Any, field: str = "crop"):
    """A decoded PIL image cut to ``crop`` (``crop_box``); the image itself for None."""
    if crop is None:
        return image
    return image.crop(crop_box(crop, *image.size, field=field))


SALIENT_TILES = 3  # the map of the photo at 3 x 3 the input size: 21 x 21 cells for a 224 px CNN (9 forward passes)


def salient_box(image, encoder) -> Box:
    """The most salient region of a decoded RGB image as fractions (x0, y0, x1, y1): SCDA on ``encoder``'s last
    feature map (at ``SALIENT_TILES`` times its resolution), mapped back through the padding to a square. The whole
    photo when nothing stands out."""
    return _salient_boxes(image, encoder.feature_maps([image], SALIENT_TILES)[0], 1)[0]


def region_boxes(image, encoder, n: int, fmap: np.ndarray | None = None) -> list[Box]:
    """Up to ``n`` boxes (fractions) of a photo worth a vector of their own: the salient components of the
    activation map, largest first, then the cells of a 2 x 2 grid. ``fmap``: the photo's feature map, if at hand."""
    if n <= 0:
        return []
    fmap = encoder.feature_maps([image])[0] if fmap is None else fmap
    boxes = [b for b in _salient_boxes(image, fmap, n) if b != (0.0, 0.0, 1.0, 1.0)]
    grid = [(c / 2, r / 2, (c + 1) / 2, (r + 1) / 2) for r in range(2) for c in range(2)]
    for box in grid:
        if len(boxes) >= n:
            break
        if all(_iou(box, b) < 0.7 for b in boxes):
            boxes.append(box)
    return boxes[:n]


# index.image_regions: what else each item photo is indexed by, as data. "grid13" won the regions benchmark
# (docs/queries.md): an item photo finds the scenes that contain it at R@10 0.909 against 0.463 by whole images.
REGION_RECIPES: dict[str, dict[str, Any]] = {
    "none": {},
    "grid4": {"grids": (2,)},  # the 2 x 2 grid's cells
    "grid13": {"grids": (2, 3)},  # the cells of the 2 x 2 and the 3 x 3 grids
    "salient6": {"salient": 6},  # region_boxes: the salient components, then 2 x 2 grid cells (one more CNN pass to find them)
}
REGION_DTYPE = np.float16  # unit vectors: float16 keeps a cosine to ~1e-3 at half the memory


def recipe_size(recipe: str) -> int:
    """The most regions a recipe gives a photo (R of the stored (n, R, dim) arrays)."""
    spec = REGION_RECIPES[recipe]
    return sum(g * g for g in spec.get("grids", ())) + spec.get("salient", 0)


def recipe_boxes(recipe: str, image, encoder) -> list[Box]:
    """The boxes (fractions) a recipe indexes a photo by, besides the whole photo."""
    spec = REGION_RECIPES[recipe]
    boxes = [(c / g, r / g, (c + 1) / g, (r + 1) / g) for g in spec.get("grids", ()) for r in range(g) for c in range(g)]
    if spec.get("salient"):
        boxes += region_boxes(image, encoder, spec["salient"])
    return boxes


def region_arrays(images: Sequence, encoder, recipe: str) -> dict[str, np.ndarray]:
    """Decoded RGB photos -> ``region_vectors`` (n, R, dim) REGION_DTYPE, the unit pooled vectors of their crops
    (``recipe_boxes``; the crops of all the photos encoded as one batch), and ``region_mask`` (n, R): which are real."""
    from .utils import l2_normalize

    size = recipe_size(recipe)
    vectors = np.zeros((len(images), size, encoder.dim), REGION_DTYPE)
    mask = np.zeros((len(images), size), bool)
    crops, where = [], []
    for i, image in enumerate(images):
        for j, box in enumerate(recipe_boxes(recipe, image, encoder)[:size]):
            crops.append(encoder.preprocess(crop_image(image, box)))
            where.append((i, j))
    if crops:
        pooled = l2_normalize(encoder.forward(np.stack(crops))[0][:, 0])
        rows, cols = (np.array(a) for a in zip(*where))
        vectors[rows, cols], mask[rows, cols] = pooled.astype(REGION_DTYPE), True
    return {"region_vectors": vectors, "region_mask": mask}


def best_region_scores(vectors: np.ndarray, mask: np.ndarray, query: np.ndarray, chunk: int = 2048) -> np.ndarray:
    """Each item's best region cosine with a unit query vector (dim,), float32; -inf for an item without regions.
    Exhaustive, in chunks (the float16 vectors widened a chunk at a time)."""
    out = np.full(len(vectors), -np.inf, np.float32)
    q = np.asarray(query, np.float32)
    for s in range(0, len(vectors), chunk):
        scores = vectors[s:s + chunk].astype(np.float32) @ q  # (chunk, R)
        out[s:s + chunk] = np.where(mask[s:s + chunk], scores, -np.inf).max(1, initial=-np.inf)
    return out


def _salient_boxes(image, fmap: np.ndarray, n: int) -> list[Box]:
    """The bounding boxes (fractions of the image) of the ``n`` largest components of the map's above-mean cells."""
    heat = np.asarray(fmap, np.float64).sum(0)  # (h, w) over the padded square
    components = _components(heat > heat.mean())
    if not components:
        return [(0.0, 0.0, 1.0, 1.0)]
    width, height = image.size
    side = max(width, height)
    gh, gw = heat.shape
    out = []
    for cells in components[:n]:
        rows, cols = zip(*cells)
        x0, x1 = min(cols) / gw * side, (max(cols) + 1) / gw * side  # the cells' edges in the square
        y0, y1 = min(rows) / gh * side, (max(rows) + 1) / gh * side
        dx, dy = (side - width) / 2, (side - height) / 2  # the image's offset in its white square
        box = (max(0.0, (x0 - dx) / width), max(0.0, (y0 - dy) / height),
               min(1.0, (x1 - dx) / width), min(1.0, (y1 - dy) / height))
        if box[2] > box[0] and box[3] > box[1]:
            out.append(tuple(round(v, 4) for v in box))
    return out or [(0.0, 0.0, 1.0, 1.0)]


def _components(mask: np.ndarray) -> list[list[tuple[int, int]]]:
    """4-connected components of a boolean grid, largest first (ties: reading order)."""
    seen = np.zeros_like(mask, bool)
    found = []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start] = True
        stack, cells = [start], []
        while stack:
            r, c = stack.pop()
            cells.append((int(r), int(c)))
            for nr, nc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
                if 0 <= nr < mask.shape[0] and 0 <= nc < mask.shape[1] and mask[nr, nc] and not seen[nr, nc]:
                    seen[nr, nc] = True
                    stack.append((nr, nc))
        found.append(cells)
    return sorted(found, key=len, reverse=True)


def _iou(a: Box, b: Box) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0
