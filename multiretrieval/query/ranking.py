"""How rankings meet, each rule in one place: an index's top-k (``search_index``), the best of several readings
(``best_reading``), the merge of two spaces onto one scale (``merge_spaces``), the fusion of vector and keyword
(BM25) rankings (``fuse_rankings``), ties (``tie_values`` and what reads them), the items a fused query's words
name ranked first (``named_items``, ``named_first``), an image query's item regions (``with_regions``), the items
above a floor (``count_above``), and the page's order (``ties_in_id_order``, ``sort_results``).

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
Pure functions over arrays; the score readings they rank by are scores.py's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from ..errors import QueryError
from ..regions import best_region_scores
from ..utils import l2_normalize

if TYPE_CHECKING:
    from ..collection import Collection

TIE_DEPTH = 10  # results read past a page or a ranking's depth, so that a few listings tied with its last one are all seen
RRF_K = 60  # reciprocal-rank fusion constant (Cormack et al. 2009): a rank r counts 1 / (60 + r)
WORD_MATCH_LEAD = 10.0  # added to the photo's score of the items a fused query's words name: above every other score


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


def named_items(text: str, near: np.ndarray, items: Collection) -> np.ndarray | None:
    """Among the photo's nearest items (``near``), the keys of those the words name: items with a phrase (a
    category, a tag, a variant's colour: ``Collection.phrase_keys``) whose tokens all appear in the words or that
    holds all the words. None when none of them, or every item of the catalog, has one. Only the photo's nearest:
    a word that is also some far item's phrase ("blue" in "Blue pine under snow", "cool" in a clip-art title)
    names nothing the photo resembles."""
    named = items.phrase_keys(text)
    if len(named) == len(items.store):
        return None
    chosen = np.intersect1d(near[near >= 0], named)
    return chosen if len(chosen) else None


def named_first(scores: np.ndarray, photo_scores: np.ndarray, named: np.ndarray) -> np.ndarray:
    """A fused query's ranking values under the word filter: the items its words name (``named``, a mask) first,
    in the order of its photo alone (``photo_scores``), then the others by ``scores``."""
    return np.where(named, WORD_MATCH_LEAD + photo_scores, scores)


def named_hits_first(hits: Hits, first: Hits) -> Hits:
    """``hits`` with the items of ``first`` (the named items, as the photo alone ranks them) ahead of the rest,
    each keeping its own score: the photo's for the named, the query's for the others."""
    rest = ~np.isin(hits.keys, first.keys)
    keys = np.r_[first.keys, hits.keys[rest]]
    scores = np.r_[first.scores, hits.scores[rest]].astype(np.float32)
    matched = np.r_[first.matched, hits.matched[rest]]
    order = np.argsort(-named_first(scores, scores, np.arange(len(keys)) < len(first.keys)), kind="stable")
    return Hits(keys[order], scores[order], matched[order])


def same_text_as(keys: np.ndarray, store) -> np.ndarray:
    """Keys of the items whose text is that of one of ``keys`` (their text vectors equal): for "this, but X"
    on an item (``like`` + words), duplicates of the item itself, which differ from it by nothing the
    words could name; they score by the words alone, not by the item's text plus the words."""
    if not len(keys):
        return np.zeros(0, np.int64)
    text = store.features["text_tokens"][:, 0]
    own = l2_normalize(text[store.rows_of(keys)])
    same = (text @ own.T).max(1) >= 0.999 * np.linalg.norm(text, axis=1)  # cosine >= 0.999, without a normalised copy
    return store.keys[same & store.features["text_mask"][:, 0]]


def ties_in_id_order(frame: pd.DataFrame, column: str) -> pd.DataFrame:
    """Results that score alike (``tie_values``; ``column`` orders the frame, best first) put in id order: the
    same catalog answers the same page whatever order its rows were indexed in (an index returns equal scores
    in its own insertion order)."""
    if len(frame) < 2:
        return frame
    values = tie_values(frame[column].to_numpy())
    run = np.r_[0, np.cumsum(values[1:] != values[:-1])]  # runs of equal neighbours; the order between runs stays
    if run[-1] == len(values) - 1:  # no two alike
        return frame
    return frame.iloc[np.lexsort((frame["id"].astype(str).to_numpy(), run))]


def sort_results(frame: pd.DataFrame, column: str, descending: bool) -> pd.DataFrame:
    """Results reordered by a catalog column (stable: equal values keep their relevance order; empty ones last)."""
    if column not in frame.columns or column == "rank":
        raise QueryError(f"sort_by: no column {column!r}; sortable columns: {[c for c in frame.columns if c != 'rank']}")
    return frame.sort_values(column, ascending=not descending, kind="stable", na_position="last")


def count_above(index, vector: np.ndarray, floor: float, keys: np.ndarray | None, start: int) -> int:
    """How many of ``keys`` (None: every item of the index) score at least ``floor``: the index read best-first, four
    times deeper each round, until a score falls below it (exact for exact indexes; as exact as the index otherwise)."""
    n = len(index) if keys is None else len(keys)
    k = max(start, 1)
    while True:
        hits = search_index(index, vector, min(k, n), keys)
        if len(hits.scores) >= min(n, len(index)) or not len(hits.scores) or hits.scores[-1] < floor:
            return int((hits.scores >= floor).sum())
        k *= 4
