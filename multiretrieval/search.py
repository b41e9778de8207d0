"""The query stage: validate a query, embed it, filter, search the index of its space, lay out results.

    make_query(image, text, mode, k, where, config, count_tokens, unsafe_where, hybrid, keyword_weight) -> Query
                                                           (checks and decoding; no model runs)
    run_query(query, embedder, items)                   -> DataFrame (filter, embed, top-k, result rows)

Every bound of ``config.search`` is checked here (LimitError, a QueryError): text characters and
tokens, k (+ offset), the filter's length, a batch's size (``check_batch``); the filter's grammar
is checked by the item store (filters.py) before DuckDB or a model runs, and its time limit there.

Modes: "auto" (image+text -> fused, image -> image, text -> text against item texts *and*,
through the zero-shot space, against the images of items that have no text), "image",
"text", "fused" (all in the joint space) and "zero-shot" (a text against item images, or an
image against item texts, in the zero-shot space).

Text queries in modes auto and text are hybrid by default: the vector ranking is combined
with BM25 over the item texts (keywords.py) by reciprocal-rank fusion (``hybrid="rrf"``), or
by a weighted sum of the vector score and the BM25 score scaled to the best one
(``hybrid="weighted"``); ``keyword_weight`` is the keywords' share, ``hybrid="off"`` turns it off.
Either way, items whose text carries every model code of the query (keywords.identifiers:
"KX-2210", "500ml", 4+ digits) score 1 more, so they come first: rank fusion alone would let
an item that is second in both rankings beat the one that carries the exact code.

Where scores of different spaces meet, one function (``merge_spaces``) puts them on one scale.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .catalog import ImageInput, load_image, text_problem
from .config import RetrieverConfig
from .errors import LimitError, QueryError
from .keywords import identifiers

if TYPE_CHECKING:
    from .collection import Collection

MODES = ("auto", "image", "text", "fused", "zero-shot")
HYBRID = ("rrf", "weighted", "off")
RRF_K = 60  # reciprocal-rank fusion constant (Cormack et al. 2009): a rank r counts 1 / (60 + r)
CALIBRATION_SAMPLE = 1000  # items (with both an image and a text) the zero-shot scale is measured on
CALIBRATION_MIN = 20  # fewer such items: zero-shot scores are taken as they are


@dataclass(frozen=True)
class Query:
    image: Any  # a decoded RGB PIL image, or None
    text: str | None
    mode: str  # resolved: never "auto"
    k: int
    where: str | None = None
    unsafe_where: bool = False  # any DuckDB expression (trusted callers), not only the filter grammar
    auto: bool = False  # a text query in auto mode: items without text are searched by their image too
    hybrid: str = "rrf"  # how keyword (BM25) and vector rankings combine for text queries: rrf | weighted | off
    keyword_weight: float = 0.5  # the keywords' share (0: vectors only; 1: keywords only)


def make_query(image: ImageInput | None, text: str | None, mode: str, k: int, where: str | None,
               config: RetrieverConfig, count_tokens: Callable[[str], int] | None = None, unsafe_where: bool = False,
               hybrid: str | None = None, keyword_weight: float | None = None) -> Query:
    """A checked query with its image decoded. Raises QueryError (LimitError for a bound) or ImageError.

    ``count_tokens``: the text encoder's word-piece count, for ``search.max_text_tokens``."""
    resolved = resolve_mode(image, text, mode)
    k = check_k(k, config)
    where = None if isinstance(where, str) and not where.strip() else where  # an empty filter keeps every item
    if where is not None:
        check_where(where, config)
    hybrid = config.search.hybrid if hybrid is None else hybrid
    if hybrid not in HYBRID:
        raise QueryError(f"unknown hybrid method {hybrid!r}; choose one of {list(HYBRID)}")
    weight = config.search.keyword_weight if keyword_weight is None else keyword_weight
    if isinstance(weight, bool) or not isinstance(weight, (int, float, np.floating)) or not 0 <= weight <= 1:
        raise QueryError(f"keyword_weight must be a number from 0 to 1, got {weight!r}")
    text = check_text(text, config, count_tokens) if text is not None else None
    cat = config.catalog
    pil = load_image(image, cat.max_image_pixels, cat.max_image_bytes, cat.download_timeout_s) if image is not None else None
    return Query(pil, text, resolved, k, where, bool(unsafe_where), auto=mode == "auto" and resolved == "text",
                 hybrid=hybrid, keyword_weight=float(weight))


def check_k(k: Any, config: RetrieverConfig, offset: Any = 0) -> int:
    """k, a positive integer, with k + offset within ``search.max_k``."""
    for name, value, least in (("k", k, 1), ("offset", offset, 0)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < least:
            raise QueryError(f"{name} must be a {'positive' if least else 'non-negative'} integer, got {value!r}")
    limit = config.search.max_k
    if k + offset > limit:
        asked = f"k + offset = {k + offset:,}" if offset else f"k = {k:,}"
        raise LimitError(f"{asked}; a query may ask for at most {limit:,} results (search.max_k)")
    return int(k)


def check_batch(n: int, config: RetrieverConfig) -> None:
    """A batch of n queries within ``search.max_batch``."""
    limit = config.search.max_batch
    if n > limit:
        raise LimitError(f"{n:,} queries in one batch; a batch may hold at most {limit:,} (search.max_batch)")


def check_where(where: Any, config: RetrieverConfig) -> None:
    """A filter's type and length (its grammar is checked against the catalog's columns by the item store)."""
    if not isinstance(where, str):
        raise QueryError(f"where must be a string, got {type(where).__name__}")
    limit = config.search.max_where_chars
    if len(where) > limit:
        raise LimitError(f"where has {len(where):,} characters; a filter may have at most {limit:,} (search.max_where_chars)")


def encode_inputs(images: list | None, texts: list[str] | None, space: str, config: RetrieverConfig) -> tuple[list | None, list | None]:
    """Checked and decoded inputs of ``Retriever.encode``: images and/or texts for a space ("joint" or "clip")."""
    if space not in ("joint", "clip"):
        raise QueryError(f"unknown space {space!r}; choose one of ['joint', 'clip']")
    if images is None and texts is None:
        raise QueryError("give images, texts, or both")
    if images is not None and texts is not None and (space == "clip" or len(images) != len(texts)):
        raise QueryError("space='clip' embeds images or texts, not pairs" if space == "clip" else
                         f"{len(images)} images but {len(texts)} texts: joint pairs need equal numbers")
    cat = config.catalog
    pils = None if images is None else [load_image(i, cat.max_image_pixels, cat.max_image_bytes, cat.download_timeout_s) for i in images]
    return pils, None if texts is None else [check_text(t, config) for t in texts]


def check_text(text: Any, config: RetrieverConfig, count_tokens: Callable[[str], int] | None = None) -> str:
    """A query text as it may reach the encoders: a non-empty string, within bounds, valid Unicode."""
    if not isinstance(text, str):
        raise QueryError(f"text must be a string, got {type(text).__name__}")
    if not text.strip():
        raise QueryError("text is empty")
    limit = config.search.max_text_chars
    if len(text) > limit:
        raise LimitError(f"text has {len(text):,} characters; a query text may have at most {limit:,} (search.max_text_chars)")
    problem = text_problem(text)
    if problem:
        raise QueryError(problem)
    tokens, limit = (count_tokens(text) if count_tokens else 0), config.search.max_text_tokens
    if tokens > limit:
        raise LimitError(f"text has {tokens:,} word pieces; a query text may have at most {limit:,} (search.max_text_tokens)")
    return text


def resolve_mode(image: Any, text: Any, mode: str) -> str:
    if mode not in MODES:
        raise QueryError(f"unknown mode {mode!r}; choose one of {list(MODES)}")
    has_image, has_text = image is not None, text is not None
    if not has_image and not has_text:
        raise QueryError("give a query image, a query text, or both")
    if mode == "auto":
        return "fused" if has_image and has_text else "image" if has_image else "text"
    needs = {"image": (True, False), "text": (False, True), "fused": (True, True)}
    if mode in needs and needs[mode] != (has_image, has_text):
        want = {(True, False): "an image only", (False, True): "a text only", (True, True): "both an image and a text"}
        raise QueryError(f"mode {mode!r} takes {want[needs[mode]]}")
    if mode == "zero-shot" and has_image and has_text:
        raise QueryError("mode 'zero-shot' takes a text (matched against item images) or an image (against item texts), not both")
    return mode


def run_query(query: Query, embedder, items: Collection) -> pd.DataFrame:
    """Answer a query over a collection (the caller holds it steady)."""
    store, indexes = items.store, items.indexes
    if not indexes:
        raise QueryError("nothing is indexed yet: call index(catalog) first")
    # The filter first: a refused or interrupted one costs no encoding.
    limit = embedder.config.search.filter_timeout_s
    allowed = store.filter(query.where, limit, query.unsafe_where) if query.where is not None else None
    if query.mode == "text":
        return _text_query(query, embedder, items, allowed)
    images = [query.image] if query.image is not None else None
    texts = [query.text] if query.text is not None else None
    if query.mode == "zero-shot":
        space = "clip_image" if query.text is not None else "clip_text"
        vector = embedder.embed(images, texts, space="clip")
    else:
        space, vector = "joint", embedder.embed(images, texts)
    hits = _search(indexes[space], vector, query.k, allowed)
    frame = store.results(hits.keys, hits.scores)
    if query.mode == "zero-shot":
        frame.insert(3, "matched", "image" if query.text is not None else "text")
    fusion = embedder.fusion
    if query.mode == "fused" and hasattr(fusion, "contributions") and len(frame):
        # Joint vectors re-fused from the stored features: compressed indexes cannot give them back.
        image_part, text_part = fusion.contributions(vector[0], embedder.fuse(store.features, store.rows_of(hits.keys)))
        frame.insert(3, "image_score", image_part)
        frame.insert(4, "text_score", text_part)
    return frame


@dataclass
class Hits:
    """Ranked items: keys, scores (best first) and, per item, which part of it matched ("text" | "image")."""

    keys: np.ndarray
    scores: np.ndarray
    matched: np.ndarray | None = None

    @classmethod
    def empty(cls) -> Hits:
        return cls(np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, object))


def _search(index, vector: np.ndarray, k: int, allowed: np.ndarray | None, matched: str | None = None) -> Hits:
    """Top-k of one index, only ``allowed`` keys if given (None: all)."""
    if len(index) == 0 or (allowed is not None and len(allowed) == 0):
        return Hits.empty()
    scores, keys = index.search(vector, int(min(k, len(index))), allowed)
    found = keys[0] >= 0
    return Hits(keys[0][found], scores[0][found], np.full(int(found.sum()), matched, dtype=object))


def _restrict(subset: np.ndarray, everything: int, allowed: np.ndarray | None) -> np.ndarray | None:
    """The allowed keys among ``subset`` (None: no restriction at all)."""
    if len(subset) == everything:
        return allowed
    return subset if allowed is None else np.intersect1d(subset, allowed, assume_unique=True)


def _text_query(query: Query, embedder, items: Collection, allowed: np.ndarray | None) -> pd.DataFrame:
    """A text query: item texts in the joint space, images of items without text in the zero-shot
    space (auto mode), merged on one scale; then combined with the keyword ranking (hybrid)."""
    store, indexes, config = items.store, items.indexes, embedder.config
    hybrid = query.hybrid != "off" and query.keyword_weight > 0 and len(items.keywords) > 0
    depth = max(query.k, config.search.hybrid_depth) if hybrid else query.k
    with_text = store.with_modality("text")
    vector = _search(indexes["joint"], embedder.embed(texts=[query.text]), depth, _restrict(with_text, len(store), allowed), "text")
    image_only = store.with_modality("image only") if query.auto else np.zeros(0, np.int64)
    if len(image_only):
        pictures = _search(indexes["clip_image"], embedder.embed(texts=[query.text], space="clip"), depth,
                           _restrict(image_only, len(store), allowed), "image")
        scale = zero_shot_scale(embedder, items) if len(vector.keys) and len(pictures.keys) else (1.0, 0.0)
        vector = merge_spaces(vector, pictures, scale)
    if not hybrid:
        ranked = Hits(vector.keys[:query.k], vector.scores[:query.k], vector.matched[:query.k])
        frame = store.results(ranked.keys, ranked.scores)
        frame.insert(3, "matched", ranked.matched)
        return frame
    keys, scores = items.keywords.search(query.text, depth, allowed)
    ranked, vector_scores, keyword_scores = fuse_rankings(vector, Hits(keys, scores), query.hybrid, query.keyword_weight,
                                                          lambda found: items.keywords.having(identifiers(query.text), found),
                                                          items.keywords.holds)
    top = slice(0, query.k)
    frame = store.results(ranked.keys[top], ranked.scores[top])
    frame.insert(3, "matched", ranked.matched[top])
    frame.insert(4, "vector_score", vector_scores[top])
    frame.insert(5, "keyword_score", keyword_scores[top])
    return frame


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
    both = np.intersect1d(store.with_modality("text"), store.with_modality("image"))
    if len(both) < CALIBRATION_MIN:
        return 1.0, 0.0
    ids = store.table["id"].to_numpy()[store.rows_of(both)]
    order = np.argsort([hashlib.sha256(str(i).encode()).hexdigest() for i in ids], kind="stable")
    keys = np.sort(both[order[:CALIBRATION_SAMPLE]])
    rows = store.rows_of(keys)
    features = {name: value[rows] for name, value in store.features.items()}
    items_joint = embedder.fuse(features)
    features["image_mask"] = np.zeros_like(features["image_mask"])  # the texts alone, as text queries
    joint = embedder.fuse(features) @ items_joint.T
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
    ``exact(keys)``: which items carry every model code of the query; they get 1 more.
    """
    keys = np.array(list(dict.fromkeys([*vector.keys.tolist(), *keyword.keys.tolist()])), np.int64)
    v_at = {k: i for i, k in enumerate(vector.keys.tolist())}
    k_at = {k: i for i, k in enumerate(keyword.keys.tolist())}
    v_rank = np.array([v_at.get(k, -1) for k in keys.tolist()])
    k_rank = np.array([k_at.get(k, -1) for k in keys.tolist()])
    v_score = np.where(v_rank >= 0, vector.scores[np.maximum(v_rank, 0)] if len(vector.keys) else 0, np.nan).astype(np.float32)
    k_score = np.where(k_rank >= 0, keyword.scores[np.maximum(k_rank, 0)] if len(keyword.keys) else 0, np.nan).astype(np.float32)
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
    matched = np.array([vector.matched[v] if v >= 0 else "text" for v in v_rank.tolist()], dtype=object)
    order = np.argsort(-fused, kind="stable")  # ties keep the vector ranking's order
    return Hits(keys[order], fused[order].astype(np.float32), matched[order]), v_score[order], k_score[order]
