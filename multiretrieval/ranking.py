"""How rankings meet: one index's top-k, a text query's ranking over texts and images, the zero-shot
merge onto the joint space's scale, and the fusion of vector and keyword (BM25) rankings.

Text queries in modes auto and text are hybrid by default: the vector ranking is combined
with BM25 over the item texts (keywords.py) by reciprocal-rank fusion (``hybrid="rrf"``), or
by a weighted sum of the vector score and the BM25 score scaled to the best one
(``hybrid="weighted"``); ``keyword_weight`` is the keywords' share, ``hybrid="off"`` turns it off.
Either way, items whose text carries every model code of the query (keywords.identifiers:
"KX-2210", "500ml", 4+ digits) score 1 more, so they come first: rank fusion alone would let
an item that is second in both rankings beat the one that carries the exact code. That value
orders the results (``hybrid_score``); each result's ``score`` stays the joint space's
(fusion.py: cos(text) for a text query, also for items only the keywords found), so a score
means the same whether a query was hybrid or not and ``min_score`` is one threshold everywhere.

Where scores of different spaces meet, one function (``merge_spaces``) puts them on one scale;
``fusion_calibration`` measures what a trained fusion needs to put its queries on it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .keywords import identifiers

if TYPE_CHECKING:
    from .collection import Collection

TIE_DEPTH = 10  # results read past a page or a ranking's depth, so that a few listings tied with its last one are all seen
RRF_K = 60  # reciprocal-rank fusion constant (Cormack et al. 2009): a rank r counts 1 / (60 + r)
CALIBRATION_SAMPLE = 1000  # items (with both an image and a text) the zero-shot scale is measured on
CALIBRATION_MIN = 20  # fewer such items: zero-shot scores are taken as they are


@dataclass
class Hits:
    """Ranked items: keys, scores (best first) and, per item, which part of it matched ("text" | "image")."""

    keys: np.ndarray
    scores: np.ndarray
    matched: np.ndarray | None = None

    @classmethod
    def empty(cls) -> Hits:
        return cls(np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, object))


def search_index(index, vector: np.ndarray, k: int, allowed: np.ndarray | None, matched: str | None = None) -> Hits:
    """Top-k of one index, only ``allowed`` keys if given (None: all)."""
    if len(index) == 0 or (allowed is not None and len(allowed) == 0):
        return Hits.empty()
    scores, keys = index.search(vector, int(min(k, len(index))), allowed)
    found = keys[0] >= 0
    return Hits(keys[0][found], scores[0][found], np.full(int(found.sum()), matched, dtype=object))


def best_reading(index, vectors: np.ndarray, k: int, allowed: np.ndarray | None, item_vectors,
                 not_first: np.ndarray | None = None) -> Hits:
    """Top-k by the best of several query vectors (a composed fused query's readings): each searched, their
    union scored exactly by ``item_vectors(keys)`` (the items' stored joint vectors). The union holds the
    true top k: an item in it by no reading's top k would trail k items that beat it. Keys in ``not_first``
    score by the other readings only (the first is searched deeper by their number, so they cannot crowd
    others out of it)."""
    not_first = np.zeros(0, np.int64) if not_first is None else not_first
    found = [search_index(index, v[None], k + (len(not_first) if i == 0 else 0), allowed) for i, v in enumerate(vectors)]
    keys = np.unique(np.concatenate([h.keys for h in found]))
    if not len(keys):
        return Hits.empty()
    scores = item_vectors(keys) @ vectors.T
    scores[np.isin(keys, not_first), 0] = -np.inf
    scores = scores.max(1)
    order = np.argsort(-scores, kind="stable")[:k]
    return Hits(keys[order], scores[order].astype(np.float32), np.full(len(order), None, dtype=object))


def with_regions(hits: Hits, image: np.ndarray, vector: np.ndarray, k: int, allowed: np.ndarray | None, store,
                 item_vectors) -> Hits:
    """An image query's top k where the items carry region vectors (``index.image_regions``): an item whose best
    region's cosine with the query photo (``image``: its unit image vector (1, dim)) beats its whole photo's scores
    that much more. Under late fusion an image query's score is cos(image), so an item scores the better of its whole
    photo and its best region; what else a score holds (a trained fusion's learned part, a ``not_text``) stays.
    ``hits``: the joint index's top k by ``vector``; ``item_vectors(keys)`` scores the items only regions found.
    Regions are scored exhaustively; the union of both top-k lists holds the true top k (an item in neither trails
    k items of each)."""
    from .regions import best_region_scores
    from .utils import l2_normalize

    features = store.features
    rows = np.arange(len(store)) if allowed is None else store.rows_of(allowed)
    best = best_region_scores(features["region_vectors"][rows], features["region_mask"][rows], image[0])
    top = np.argsort(-best, kind="stable")[:k]
    keys = np.union1d(hits.keys, store.keys[rows[top[np.isfinite(best[top])]]])
    if not len(keys):
        return hits
    indexed = dict(zip(hits.keys.tolist(), hits.scores.tolist()))
    scores = np.array([indexed.get(key, np.nan) for key in keys.tolist()], np.float32)
    only_regions = np.isnan(scores)
    if only_regions.any():
        scores[only_regions] = item_vectors(keys[only_regions]) @ vector[0]
    at = store.rows_of(keys)
    whole = l2_normalize(features["image_tokens"][at, 0]) @ image[0]
    lift = best_region_scores(features["region_vectors"][at], features["region_mask"][at], image[0]) - whole
    scores = np.where(lift > 0, scores + lift, scores).astype(np.float32)
    order = np.argsort(-scores, kind="stable")[:k]
    return Hits(keys[order], scores[order], np.full(len(order), None, dtype=object))


def tie_values(scores: np.ndarray) -> np.ndarray:
    """Scores as ties are judged: to 1e-6 (listings that share a photo and a title score alike, up to float noise)."""
    return np.round(np.asarray(scores, np.float64), 6)


def through_ties(hits: Hits, n: int) -> Hits:
    """The first ``n`` of a best-first ranking and the items after them tied with the n-th."""
    if len(hits.keys) <= n:
        return hits
    t = -tie_values(hits.scores)
    keep = int(np.searchsorted(t, t[n - 1], side="right"))
    return Hits(hits.keys[:keep], hits.scores[:keep], None if hits.matched is None else hits.matched[:keep])


def tied_ranks(scores: np.ndarray) -> np.ndarray:
    """0-based ranks of a best-first ranking where equal scores share the best of their ranks: items that
    score alike rank alike, whatever order the index returned them in."""
    rounded = -tie_values(scores)
    return np.searchsorted(rounded, rounded, side="left")


def restrict(subset: np.ndarray, everything: int, allowed: np.ndarray | None) -> np.ndarray | None:
    """The allowed keys among ``subset`` (None: no restriction at all)."""
    if len(subset) == everything:
        return allowed
    return subset if allowed is None else np.intersect1d(subset, allowed, assume_unique=True)


def rank_text(query, vector: np.ndarray, embedder, items: Collection, allowed: np.ndarray | None, depth: int
              ) -> tuple[Hits, dict[str, np.ndarray]]:
    """A text query's ranking (``vector``: its joint-space vector): item texts in the joint space, the
    images of items without text in the zero-shot space (auto mode), merged on one scale, then
    combined with the keyword ranking (hybrid). Returns the hits (in hybrid order, each with its
    joint-space score) and, when hybrid, each hit's ``vector_score``, ``keyword_score`` and
    ``hybrid_score`` (the value the order comes from) columns."""
    store, indexes, config = items.store, items.indexes, embedder.config
    hybrid = query.hybrid != "off" and query.keyword_weight > 0 and len(items.keywords) > 0
    depth = max(depth, config.search.hybrid_depth) if hybrid else depth
    with_text = store.with_modality("text")
    fetch = depth + TIE_DEPTH if hybrid else depth
    ranked = search_index(indexes["joint"], vector, fetch, restrict(with_text, len(store), allowed), "text")
    image_only = store.with_modality("image only") if query.auto else np.zeros(0, np.int64)
    if len(image_only):
        clip = embedder.embed(texts=[query.text], space="clip")
        if query.not_text is not None:
            clip = clip - negative_vectors([query.not_text], "clip", embedder, items)
        pictures = search_index(indexes["clip_image"], clip, fetch, restrict(image_only, len(store), allowed), "image")
        scale = zero_shot_scale(embedder, items) if len(ranked.keys) and len(pictures.keys) else (1.0, 0.0)
        ranked = merge_spaces(ranked, pictures, scale)
    if not hybrid:
        return ranked, {}
    # Each ranking is read to its depth-th item and the items tied with it (listings sharing a title), so
    # which of them enter the fusion does not depend on the order they were indexed in.
    ranked = through_ties(ranked, depth)
    words = through_ties(Hits(*items.keywords.search(query.text, depth + TIE_DEPTH, allowed)), depth)
    fused, vector_scores, keyword_scores = fuse_rankings(ranked, words, query.hybrid, query.keyword_weight,
                                                         lambda found: items.keywords.having(identifiers(query.text), found),
                                                         items.keywords.holds)
    scores = vector_scores.copy()
    missing = np.isnan(scores)  # found by the keywords alone: its joint-space score, from its stored features
    if missing.any():
        scores[missing] = embedder.item_vectors(store.features, store.rows_of(fused.keys[missing])) @ vector[0]
    ranked = Hits(fused.keys, scores.astype(np.float32), fused.matched)
    return ranked, {"vector_score": vector_scores, "keyword_score": keyword_scores, "hybrid_score": fused.scores}


def negative_vectors(texts: list[str], space: str, embedder, items: Collection) -> np.ndarray:
    """beta (``search.not_text_weight``) times each text's vector as a text query of the space ("joint" or "clip"):
    what a query's ``not_text`` subtracts."""
    beta = embedder.config.search.not_text_weight
    if space == "clip":
        return beta * embedder.embed(texts=texts, space="clip")
    return beta * embedder.query_vectors(embedder.features(None, texts), calibration=fusion_calibration(embedder, items))


def merge_spaces(text: Hits, image: Hits, scale: tuple[float, float]) -> Hits:
    """One ranking of items matched by their text (joint space) and items matched by their image
    (zero-shot space), on the joint space's scale: a zero-shot score s counts as a * s + b.

    The one place where scores of the two spaces meet (``zero_shot_scale`` measures a and b).
    """
    a, b = scale
    keys = np.concatenate([text.keys, image.keys])
    scores = np.concatenate([text.scores, a * image.scores + b]).astype(np.float32)
    matched = np.concatenate([text.matched, image.matched])
    order = np.argsort(-scores, kind="stable")
    return Hits(keys[order], scores[order], matched[order])


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


def fuse_rankings(vector: Hits, keyword: Hits, method: str, weight: float, exact=None, has_keywords=None
                  ) -> tuple[Hits, np.ndarray, np.ndarray]:
    """Combine the vector ranking with the keyword (BM25) ranking; returns the ranking and, per item,
    its vector score and keyword score (NaN where that ranking did not reach it).

    ``rrf``: (RRF_K + 1) * ((1 - w) / (RRF_K + vector rank) + w / (RRF_K + keyword rank)): 1 for an
    item first in both, a ranking that misses an item adds nothing. ``weighted``: (1 - w) * vector
    score + w * keyword score / best keyword score; an item the vector ranking did not reach counts
    its lowest score. ``has_keywords(keys)``: which items have a keyword text at all; one that has
    none (a photo without words) cannot be judged by keywords, so its vector part counts whole
    (w = 0 for it) instead of losing to every item that shares a word with the query.
    ``exact(keys)``: which items carry every model code of the query; they get 1 more. When no item holds a
    word of the query (an empty keyword ranking), nothing is fused: the vector ranking stands (w = 0 for all),
    or an untitled photo far down it would beat every titled item, which the words cannot judge either.
    """
    if not len(keyword.keys):
        weight = 0.0
    # Every item once: the vector ranking's, then the keyword ranking's others (each ranking names an item once).
    keys = np.concatenate([vector.keys, keyword.keys[~np.isin(keyword.keys, vector.keys)]]).astype(np.int64)
    v_pos = np.r_[np.arange(len(vector.keys)), np.full(len(keys) - len(vector.keys), -1)]
    k_pos = _positions(keyword.keys, keys)
    v_score = np.where(v_pos >= 0, vector.scores[np.maximum(v_pos, 0)] if len(vector.keys) else 0, np.nan).astype(np.float32)
    k_score = np.where(k_pos >= 0, keyword.scores[np.maximum(k_pos, 0)] if len(keyword.keys) else 0, np.nan).astype(np.float32)
    v_rank = np.where(v_pos >= 0, tied_ranks(vector.scores)[np.maximum(v_pos, 0)] if len(vector.keys) else 0, -1)
    k_rank = np.where(k_pos >= 0, tied_ranks(keyword.scores)[np.maximum(k_pos, 0)] if len(keyword.keys) else 0, -1)
    w = np.full(len(keys), weight) if has_keywords is None or not len(keys) else np.where(has_keywords(keys), weight, 0.0)
    if method == "rrf":
        fused = (RRF_K + 1) * (np.where(v_rank >= 0, (1 - w) / (RRF_K + 1 + v_rank), 0.0)
                               + np.where(k_rank >= 0, w / (RRF_K + 1 + k_rank), 0.0))
    else:
        floor = float(vector.scores.min()) if len(vector.keys) else 0.0
        best = float(keyword.scores.max()) if len(keyword.keys) else 1.0
        fused = (1 - w) * np.where(v_rank >= 0, v_score, floor) + w * np.where(k_rank >= 0, k_score / max(best, 1e-12), 0.0)
    if exact is not None and len(keys):
        fused = fused + exact(keys)
    matched = np.concatenate([np.asarray(vector.matched, dtype=object), np.full(len(keys) - len(vector.keys), "text", dtype=object)])
    order = np.argsort(-fused, kind="stable")  # ties keep the vector ranking's order (answers put them in id order)
    return Hits(keys[order], fused[order].astype(np.float32), matched[order]), v_score[order], k_score[order]


def _positions(ranked: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Each key's position in ``ranked`` (distinct keys), -1 where it is not there."""
    if not len(ranked):
        return np.full(len(keys), -1)
    order = np.argsort(ranked, kind="stable")
    at = np.minimum(np.searchsorted(ranked[order], keys), len(ranked) - 1)
    return np.where(ranked[order][at] == keys, order[at], -1)
