"""The score readings, each in one place: what puts a query's vector on the one score scale (fusion.py) and
what a score is made of.

- ``fusion_calibration``: what a trained fusion needs to put single-modality queries on the scale;
- ``zero_shot_scale``: the affine map from zero-shot text->image scores onto the joint space's text->text scale
  (``ranking.merge_spaces`` applies it);
- ``joint_query_vectors``: a query's readings: under ``fusion.compose`` a fused query's words composed with the text
  of the item nearest its photo, and its words alone; an item scores its best reading (``ranking.best_reading``);
- ``photo_neighbours`` / ``nearest_with_text`` / ``nearest_texts``: a fused query's photo alone and the items nearest it;
- ``not_text_vectors``: beta (``search.not_text_weight``) times a concept's vector, which a query's ``not_text`` subtracts;
- ``score_parts``: a fused score's image and text parts (the result columns image_score, text_score);
- ``score_floor``: the score under which results are left out (``min_score``, or the calibrated floor for "auto").

Scores share one scale in the joint space: a query's score against an item is the weighted mean of the cosines of
the parts the query has: cos(image) for an image query (an item's own photo scores 1), cos(text) for a text query,
a cos(image) + (1 - a) cos(text) for a fused one, or (a cos(image) + b cos(text)) / (a + b) with
``weights={"image": a, "text": b}``. A fused query's text is composed ("this, but X", ``fusion.compose``, on by
default): cos(text) is the better of the item text's cosine with unit(u_nearest + 2 u_words) ("this, but blue") and
with the words alone ("this, but a bed"), and a = ``fusion.compose_image_share`` (0.25) unless ``weights`` says
otherwise; without composition a = ``fusion.image_weight`` and cos(text) is the words'. ``not_text`` subtracts
beta times the score the negative text alone would get as a text query (in zero-shot mode, the zero-shot cosine
of the negative). Zero-shot scores are cosines of the zero-shot space, a scale of their own.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..fusion import compose_text
from ..relevance import query_kind, relevance_floor
from .ranking import restrict

if TYPE_CHECKING:
    from ..collection import Collection

CALIBRATION_SAMPLE = 1000  # items (with both an image and a text) the zero-shot scale is measured on
CALIBRATION_MIN = 20  # fewer such items: zero-shot scores are taken as they are
PHOTO_NEIGHBOURS = 10  # a photo's nearest items, among which words must name one for the word filter to apply


def fusion_calibration(embedder, items: Collection) -> dict:
    """What the fusion needs to put single-modality queries on the score scale (fusion.py, ``calibrate``):
    nothing for late fusion; for a trained one, measured on up to 1,000 of the catalog's items with
    both an image and a text (picked by a hash of their id, as for ``zero_shot_scale``). Cached
    until the items change."""
    if getattr(embedder.fusion, "kind", "late") == "late":
        return {}
    key = (items.store.version, id(embedder.fusion))

    def measure() -> dict:
        store = items.store
        keys = calibration_sample(items, 1)
        if not len(keys):
            return {}
        rows = store.rows_of(keys)
        return embedder.calibration({name: value[rows] for name, value in store.features.items()})

    return items.memo("fusion_calibration", key, measure)


def calibration_sample(items: Collection, least: int) -> np.ndarray:
    """Keys of up to CALIBRATION_SAMPLE items with both an image and a text, chosen by a hash of their
    id (the same items whatever order they came in); none when fewer than ``least`` have both."""
    store = items.store
    both = np.intersect1d(store.with_modality("text"), store.with_modality("image"))
    if len(both) < least:
        return np.zeros(0, np.int64)
    ids = store.table["id"].to_numpy()[store.rows_of(both)]
    order = np.argsort([hashlib.sha256(str(i).encode()).hexdigest() for i in ids], kind="stable")
    return np.sort(both[order[:CALIBRATION_SAMPLE]])


def zero_shot_scale(embedder, items: Collection) -> tuple[float, float]:
    """The affine map (a, b) that puts zero-shot text->image scores on the joint space's text->text scale.

    Measured on the catalog's own items that have both an image and a text (up to 1,000, picked
    by a hash of their id, so the same items give the same map however they were added): each
    item's text is a query in both spaces, against the *other* items' texts (joint space, as a
    text query is answered) and against their images (zero-shot space). The map makes the mean
    and the standard deviation of the two score distributions equal (z-score matching): an image
    that stands out from the others as much as a text does gets the same score. With fewer than
    20 such items the zero-shot scores stay as they are, (1, 0). Cached until the items change.
    """
    key = (items.store.version, id(embedder.fusion))
    return items.memo("zero_shot_scale", key, lambda: _measure_scale(embedder, items))


def _measure_scale(embedder, items: Collection) -> tuple[float, float]:
    store, indexes = items.store, items.indexes
    keys = calibration_sample(items, CALIBRATION_MIN)
    if not len(keys):
        return 1.0, 0.0
    rows = store.rows_of(keys)
    features = {name: value[rows] for name, value in store.features.items()}
    items_joint = embedder.item_vectors(features)
    features["image_mask"] = np.zeros_like(features["image_mask"])  # the texts alone, as text queries
    joint = embedder.query_vectors(features, calibration=fusion_calibration(embedder, items)) @ items_joint.T
    zero_shot = indexes.vectors("clip_text", keys) @ indexes.vectors("clip_image", keys).T
    others = ~np.eye(len(keys), dtype=bool)
    j, z = joint[others], zero_shot[others]
    a = float(j.std() / max(z.std(), 1e-6))
    return a, float(j.mean() - a * z.mean())


def joint_query_vectors(features: dict[str, np.ndarray], weights: np.ndarray | None, embedder, items: Collection,
                        anchor: dict[str, np.ndarray] | None = None, near: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """Joint-space query vectors on the score scale, (n, readings, d): what search ranks by (an item scores
    its best reading) and what ``evaluate`` measures. ``weights``: (n, 2), NaN rows for the default.

    Under ``fusion.compose`` a fused query has two readings: its words composed with the text of the item
    nearest its photo (``anchor``: given text tokens and mask instead), for "this, but blue", and its words
    alone, for "this, but a bed", both at ``fusion.compose_image_share``; other queries have one (repeated).
    ``near``: ``photo_neighbours`` of these features, when the caller has them."""
    cfg = embedder.config.fusion
    calibration = fusion_calibration(embedder, items)
    fused = features["image_mask"].any(1) & features["text_mask"].any(1)
    if not (cfg.compose and fused.any()):
        return embedder.query_vectors(features, weights, calibration)[:, None]
    anchor = anchor if anchor is not None else nearest_texts(features, embedder, items, near)
    weights = np.full((len(fused), 2), np.nan) if weights is None else np.array(weights, np.float64)
    weights[fused & np.isnan(weights).any(1)] = (cfg.compose_image_share, 1.0 - cfg.compose_image_share)
    words = embedder.query_vectors(features, weights, calibration)
    composed = embedder.query_vectors({**features, "text_tokens": compose_text(features["text_tokens"], features["text_mask"],
                                                                               anchor["text_tokens"], anchor["text_mask"],
                                                                               cfg.compose_words)}, weights, calibration)
    return np.stack([composed, words], 1)


@dataclass(frozen=True)
class Photo:
    """A fused query's photo alone: its image-only joint vector (1, d) and the keys of its PHOTO_NEIGHBOURS
    nearest items with a text (-1 padded), among those the query's filter lets through."""

    vector: np.ndarray
    near: np.ndarray


def photo_neighbours(features: dict[str, np.ndarray], embedder, items: Collection) -> tuple[np.ndarray, np.ndarray]:
    """Each query's photo alone: its image-only joint vector (n, d; zeros without a photo) and the keys of its
    PHOTO_NEIGHBOURS nearest items with a text (n, PHOTO_NEIGHBOURS; -1 where fewer or no photo). One batch."""
    n = len(features["image_mask"])
    vectors = np.zeros((n, items.indexes["joint"].dim), np.float32)
    near = np.full((n, PHOTO_NEIGHBOURS), -1, np.int64)
    photos = np.flatnonzero(features["image_mask"].any(1))
    if len(photos):
        image_only = {**{name: a[photos] for name, a in features.items()}, "text_mask": np.zeros_like(features["text_mask"][photos])}
        vectors[photos] = embedder.query_vectors(image_only, calibration=fusion_calibration(embedder, items))
        near[photos] = nearest_with_text(vectors[photos], items)
    return vectors, near


def nearest_with_text(vectors: np.ndarray, items: Collection, allowed: np.ndarray | None = None) -> np.ndarray:
    """Keys of the PHOTO_NEIGHBOURS items with a text (and among ``allowed``) nearest each image-only joint vector
    (n, PHOTO_NEIGHBOURS; -1 where fewer)."""
    keys = restrict(items.store.with_modality("text"), len(items.store), allowed)
    if keys is not None and not len(keys):
        return np.full((len(vectors), PHOTO_NEIGHBOURS), -1, np.int64)
    return items.indexes["joint"].search(vectors, PHOTO_NEIGHBOURS, keys)[1]


def nearest_texts(features: dict[str, np.ndarray], embedder, items: Collection,
                  near: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Text tokens and mask of the item with a text nearest each query's photo (a mask of False where a
    query has no photo or no item has a text): what a photo shows, in the catalog's words."""
    store = items.store
    tokens = np.zeros_like(features["text_tokens"])
    mask = np.zeros_like(features["text_mask"])
    nearest = (near if near is not None else photo_neighbours(features, embedder, items))[1][:, 0]
    found = np.flatnonzero(nearest >= 0)
    rows = store.rows_of(nearest[found])
    tokens[found], mask[found] = store.features["text_tokens"][rows], store.features["text_mask"][rows]
    return {"text_tokens": tokens, "text_mask": mask}


def not_text_vectors(embedder, items: Collection, joint_features: dict[str, np.ndarray] | None = None,
                     zero_shot: np.ndarray | None = None) -> np.ndarray:
    """beta (``search.not_text_weight``) times each concept's vector as a text query: in the joint space from its
    token features (``joint_features``), in the zero-shot space from its zero-shot text vectors (``zero_shot``).
    What a query's ``not_text`` subtracts."""
    beta = embedder.config.search.not_text_weight
    if zero_shot is not None:
        return beta * zero_shot
    return beta * embedder.query_vectors(joint_features, calibration=fusion_calibration(embedder, items))


def score_parts(vector: np.ndarray, keys: np.ndarray, embedder, items: Collection) -> tuple[np.ndarray, np.ndarray]:
    """A fused query's score against each of these items split into its image and its text part (their sum), by the
    reading each item scored by. Joint vectors re-fused from the stored features: compressed indexes cannot give
    them back."""
    store = items.store
    stored = embedder.item_vectors(store.features, store.rows_of(keys))
    best = (stored @ vector.T).argmax(1)  # the reading each item scored by
    parts = np.array([embedder.fusion.contributions(v, stored) for v in vector])  # (readings, 2, items)
    return parts[best, 0, np.arange(len(best))], parts[best, 1, np.arange(len(best))]


def score_floor(query, embedder) -> float | None:
    """The score under which a query's results are left out: its ``min_score``, or with "auto" the calibrated
    "no close match" floor of its kind of query under the embedder's models (None where none was measured)."""
    if query.min_score != "auto":
        return query.min_score
    kind = query_kind(query.mode, query.text is not None)
    return None if kind is None else relevance_floor(embedder.config, kind)
