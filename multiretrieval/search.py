"""The query stage: validate a query, embed it, filter, rank it, lay out a page of results.

    make_query(image, text, mode, k, where, config, count_tokens, **options) -> Query   (checks, decoding; no model runs)
    run_query(query, embedder, items)    -> DataFrame    (rank, id, score, catalog columns)
    run_batch(queries, embedder, items)  -> [DataFrame]  (queries of one kind share an encoder pass)

Modes: "auto" (image+text -> fused, image -> image, text -> text against item texts *and*,
through the zero-shot space, against the images of items that have no text), "image",
"text", "fused" (all in the joint space) and "zero-shot" (a text against item images, or an
image against item texts, in the zero-shot space). How rankings combine (hybrid keywords,
the zero-shot merge) is in ranking.py.

Options: paging (offset), a score floor (min_score), sorting the most relevant items by a
column (sort_by), structured filters (column -> values or range), "more like this" from an
item's stored features (like; with a text: its photo plus the words), a given vector, the
hybrid settings, a fused query's own modality weights (weights), a concept to subtract
(not_text), the part of the photo to search by (crop), and unsafe_where for trusted callers. A result frame's ``attrs["has_more"]``
says whether another page follows, and ``attrs["total"]`` how many items match in all (``count_matches``).

Scores share one scale in the joint space (fusion.py): a query's score against an item is the
weighted mean of the cosines of the parts the query has: cos(image) for an image query (an
item's own photo scores 1), cos(text) for a text query, a cos(image) + (1 - a) cos(text) for a
fused one, or (a cos(image) + b cos(text)) / (a + b) with ``weights={"image": a, "text": b}``.
A fused query's text is composed ("this, but X", ``fusion.compose``, on by default): its words are
read together with the text of the item nearest its photo (``like``: that item): cos(text) is the
better of the item text's cosine with unit(u_nearest + 2 u_words) ("this, but blue") and with the
words alone ("this, but a bed"), and a = ``fusion.compose_image_share`` (0.25) unless ``weights``
says otherwise; without composition a = ``fusion.image_weight`` and cos(text) is the words'.
Words that name a phrase of item texts (``word_filter``: a category, a tag, the "blue" of "Armchair ottoman,
blue"; or that a phrase holds, "bed" in "Day bed") pick items among the photo's 10 nearest (of those a filter
lets through): those come first, ordered and scored as the photo alone would order them, then the others as above.
``not_text`` subtracts beta (``search.not_text_weight``, 0.5) times the score the negative text
alone would get as a text query: score - beta * cos(not_text, item text) (in zero-shot mode, the
zero-shot cosine of the negative). Hybrid text queries are ordered by the fusion of the keyword
and vector rankings, but their ``score`` is this scale's (the order's own value is
``hybrid_score``), so ``min_score`` means the same in every joint-space mode. Zero-shot scores
are cosines of the zero-shot space, a scale of their own. A given ``vector`` is searched as it is.

Every bound of ``config.search`` is checked here (LimitError, a QueryError): text characters and
tokens, k + offset, the filter's length, the structured filters' columns and values, a batch's size (``check_batch``); the filter's grammar
is checked by the item store (filters.py) before DuckDB or a model runs, and its time limit there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .catalog import ImageInput, load_image, text_problem
from .config import RetrieverConfig
from .errors import LimitError, QueryError
from .fusion import compose_text
from .ranking import (TIE_DEPTH, Hits, best_reading, fusion_calibration, negative_vectors, rank_text, restrict, search_index, tie_values,
                      with_regions, zero_shot_scale)
from .regions import crop_image
from .relevance import query_kind, relevance_floor
from .utils import l2_normalize

if TYPE_CHECKING:
    from .collection import Collection

MODES = ("auto", "image", "text", "fused", "zero-shot")
HYBRID = ("rrf", "weighted", "off")
OPTIONS = ("offset", "min_score", "sort_by", "filters", "like", "vector", "hybrid", "keyword_weight", "weights", "not_text",
           "unsafe_where", "crop")


@dataclass(frozen=True)
class Query:
    image: Any  # a decoded RGB PIL image, or None
    text: str | None
    mode: str  # resolved: "image", "text", "fused", "zero-shot", or "vector" (a given joint-space vector)
    k: int
    where: str | None = None
    unsafe_where: bool = False  # any DuckDB expression (trusted callers), not only the filter grammar
    auto: bool = False  # a text query in auto mode: items without text are searched by their image too
    hybrid: str = "rrf"  # how keyword (BM25) and vector rankings combine for text queries: rrf | weighted | off
    keyword_weight: float = 0.5  # the keywords' share (0: vectors only; 1: keywords only)
    offset: int = 0  # results start after this many (paging)
    min_score: float | str | None = None  # results scoring lower are dropped; "auto": the calibrated floor (relevance.py)
    sort_by: tuple[str, bool] | None = None  # (column, descending): reorders the most relevant items
    filters: dict[str, Any] | None = None  # column -> values or {"min", "max"}: ANDed with ``where`` (filters.compile_filters)
    like: Any = None  # an item id: its stored features are the query ("more like this"), the item itself left out
    vector: np.ndarray | None = None  # (1, d) a query vector in the joint space
    weights: tuple[float, float] | None = None  # a fused query's (image, text) weights; None: the fusion's own
    not_text: str | None = None  # a concept to subtract: its text-query score, times search.not_text_weight


def make_query(image: ImageInput | None, text: str | None, mode: str, k: int, where: str | None,
               config: RetrieverConfig, count_tokens: Callable[[str], int] | None = None, **options: Any) -> Query:
    """A checked query with its image decoded. Raises QueryError (LimitError for a bound) or ImageError.

    ``count_tokens``: the text encoder's word-piece count, for ``search.max_text_tokens``. Options:
    ``offset`` (int >= 0), ``min_score`` (float), ``sort_by`` ("price", "-price", "price desc"),
    ``filters`` (column -> list of values, or {"min": a, "max": b}), ``like`` (an item id: its stored
    photo and text, or with mode "image"/"text" one of them; with ``text``: the item's photo plus
    these words), ``vector`` (a joint-space vector, as ``encode`` gives), ``hybrid`` ("rrf",
    "weighted", "off") and ``keyword_weight`` (0..1) for text queries, ``weights`` ({"image": a,
    "text": b}, non-negative, not both 0: a fused query's score is (a cos_image + b cos_text) / (a + b)),
    ``not_text`` (a text whose concept is subtracted), ``crop`` ((x0, y0, x1, y1): the part of the photo to search by,
    fractions of its width and height when all are in [0, 1], else pixels; regions.crop_box), ``unsafe_where`` (any DuckDB expression:
    trusted callers only).
    """
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise QueryError(f"unknown search option(s) {unknown}; known: {list(OPTIONS)}")
    like, vector = options.get("like"), options.get("vector")
    resolved = resolve_mode(image, text, mode, like, vector)
    offset = options.get("offset", 0)
    k = check_k(k, config, offset)
    where = None if isinstance(where, str) and not where.strip() else where  # an empty filter keeps every item
    if where is not None:
        check_where(where, config)
    filters = check_filters(options.get("filters"), config)
    hybrid = options.get("hybrid") or config.search.hybrid
    if hybrid not in HYBRID:
        raise QueryError(f"unknown hybrid method {hybrid!r}; choose one of {list(HYBRID)}")
    weight = options.get("keyword_weight")
    weight = config.search.keyword_weight if weight is None else weight
    if isinstance(weight, bool) or not isinstance(weight, (int, float, np.floating)) or not 0 <= weight <= 1:
        raise QueryError(f"keyword_weight must be a number from 0 to 1, got {weight!r}")
    text = check_text(text, config, count_tokens) if text is not None else None
    weights = _weights(options.get("weights"), resolved)
    not_text = options.get("not_text")
    if not_text is not None:
        if resolved == "vector":
            raise QueryError("not_text needs a query text, image or like=ITEM_ID to subtract from, not a vector")
        not_text = check_text(not_text, config, count_tokens, "not_text")
    crop = options.get("crop")
    if crop is not None and image is None:
        raise QueryError("crop cuts the query photo, and this query has none: give image=... with it")
    cat = config.catalog
    pil = load_image(image, cat.max_image_pixels, cat.max_image_bytes, cat.download_timeout_s) if image is not None else None
    pil = crop_image(pil, crop) if crop is not None else pil
    return Query(pil, text, resolved, k, where, bool(options.get("unsafe_where", False)),
                 auto=mode == "auto" and resolved == "text" and like is None, hybrid=hybrid, keyword_weight=float(weight),
                 offset=int(offset), min_score=_min_score(options.get("min_score")), sort_by=_sort_key(options.get("sort_by")),
                 filters=filters or None, like=like, vector=None if vector is None else _vector(vector),
                 weights=weights, not_text=not_text)


def batch_query(spec: dict[str, Any], config: RetrieverConfig, count_tokens: Callable[[str], int] | None = None) -> Query:
    """A query of ``search_batch``: a dict of ``search`` arguments."""
    if not isinstance(spec, dict):
        raise QueryError(f"each query of a batch is a dict of search arguments, got {type(spec).__name__}")
    spec = dict(spec)
    basic = [spec.pop(name, default) for name, default in (("image", None), ("text", None), ("mode", "auto"), ("k", 10), ("where", None))]
    return make_query(*basic, config, count_tokens, **spec)


def _weights(value: Any, mode: str) -> tuple[float, float] | None:
    """{"image": a, "text": b} -> (a, b): non-negative numbers, not both 0, for a fused query."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise QueryError(f'weights must map "image" and/or "text" to numbers, got {value!r}')
    unknown = sorted(map(str, set(value) - {"image", "text"}))
    if unknown:
        raise QueryError(f'weights: unknown key(s) {unknown}; weights take "image" and "text"')
    pair = []
    for name in ("image", "text"):
        w = value.get(name, 0.0)
        if isinstance(w, bool) or not isinstance(w, (int, float, np.number)) or not np.isfinite(w) or w < 0:
            raise QueryError(f"weights: {name} must be a non-negative number, got {w!r}")
        pair.append(float(w))
    if sum(pair) <= 0:
        raise QueryError("weights: image and text are both 0; give at least one a positive weight")
    if mode != "fused":
        raise QueryError(f"weights apply to fused queries (an image and a text, or like=ITEM_ID), not to a {mode} query")
    return pair[0], pair[1]


def _min_score(value: Any) -> float | str | None:
    if value is None or value == "off":
        return None
    if value == "auto":
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not np.isfinite(value):
        raise QueryError(f'min_score must be a number, "auto" or "off", got {value!r}')
    return float(value)


def score_floor(query: Query, embedder) -> float | None:
    """The score under which a query's results are left out: its ``min_score``, or with "auto" the calibrated
    "no close match" floor of its kind of query under the embedder's models (None where none was measured)."""
    if query.min_score != "auto":
        return query.min_score
    kind = query_kind(query.mode, query.text is not None)
    return None if kind is None else relevance_floor(embedder.config, kind)


def _sort_key(value: Any) -> tuple[str, bool] | None:
    """"price" or "price asc" -> ("price", False); "-price" or "price desc" -> ("price", True)."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise QueryError(f"sort_by must be a column name, got {value!r}")
    words = value.strip().split()
    if len(words) == 2 and words[1].lower() in ("asc", "desc"):
        return words[0], words[1].lower() == "desc"
    if len(words) == 1:
        return (words[0][1:], True) if words[0].startswith("-") else (words[0], False)
    raise QueryError(f"sort_by: expected 'COLUMN', '-COLUMN' or 'COLUMN asc|desc', got {value!r}")


def _vector(value: Any) -> np.ndarray:
    v = np.asarray(value, dtype=np.float32)
    if v.ndim == 2 and v.shape[0] == 1:
        v = v[0]
    if v.ndim != 1 or not len(v) or not np.isfinite(v).all():
        raise QueryError(f"vector must be one finite 1-d vector, got shape {v.shape}")
    return v[None]


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


def check_filters(filters: Any, config: RetrieverConfig) -> dict[str, Any] | None:
    """Structured filters' type and size: at most ``search.max_filter_columns`` columns, each list of values at most
    ``search.max_filter_values`` long (their values and columns are checked against the catalog by the item store)."""
    if filters is None:
        return None
    if not isinstance(filters, dict):
        raise QueryError(f"filters must map columns to values or ranges, got {type(filters).__name__}")
    bounds = config.search
    if len(filters) > bounds.max_filter_columns:
        raise LimitError(f"filters name {len(filters):,} columns; a query may filter at most {bounds.max_filter_columns:,} "
                         f"(search.max_filter_columns)")
    for column, wanted in filters.items():
        if isinstance(wanted, (list, tuple)) and len(wanted) > bounds.max_filter_values:
            name = repr(column) if len(repr(column)) <= 60 else repr(column)[:60] + "..."
            raise LimitError(f"filters[{name}] lists {len(wanted):,} values; a filter may list at most "
                             f"{bounds.max_filter_values:,} values per column (search.max_filter_values)")
    return filters or None


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


def check_text(text: Any, config: RetrieverConfig, count_tokens: Callable[[str], int] | None = None, name: str = "text") -> str:
    """A query text as it may reach the encoders: a non-empty string, within bounds, valid Unicode.
    ``name``: what the errors call it ("text", "not_text")."""
    if not isinstance(text, str):
        raise QueryError(f"{name} must be a string, got {type(text).__name__}")
    if not text.strip():
        raise QueryError(f"{name} is empty")
    limit = config.search.max_text_chars
    if len(text) > limit:
        raise LimitError(f"{name} has {len(text):,} characters; a query text may have at most {limit:,} (search.max_text_chars)")
    problem = text_problem(text)
    if problem:
        raise QueryError(problem if name == "text" else f"{name}: {problem}")
    tokens, limit = (count_tokens(text) if count_tokens else 0), config.search.max_text_tokens
    if tokens > limit:
        raise LimitError(f"{name} has {tokens:,} word pieces; a query text may have at most {limit:,} (search.max_text_tokens)")
    return text


def resolve_mode(image: Any, text: Any, mode: str, like: Any = None, vector: Any = None) -> str:
    if mode not in MODES:
        raise QueryError(f"unknown mode {mode!r}; choose one of {list(MODES)}")
    has_image, has_text = image is not None, text is not None
    if like is not None or vector is not None:
        if has_image or (vector is not None and (has_text or like is not None)):
            raise QueryError("give one of: an image and/or a text, like=ITEM_ID (and a text), or vector=V")
        if vector is not None:
            if mode != "auto":
                raise QueryError("a vector query searches the joint space: leave mode at 'auto'")
            return "vector"
        if has_text:  # the item's photo plus these words: "this, but ..."
            if mode not in ("auto", "fused"):
                raise QueryError("like=ITEM_ID with a text is a fused query (the item's photo + the words): mode 'auto' or 'fused'")
            return "fused"
        if mode == "zero-shot":
            raise QueryError("like=ITEM_ID takes mode 'auto' (the item's photo and text), 'image' or 'text'")
        return "fused" if mode == "auto" else mode
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
    return run_batch([query], embedder, items)[0]


def run_batch(queries: list[Query], embedder, items: Collection) -> list[pd.DataFrame]:
    """Answer several queries; queries of one kind are embedded together (one encoder pass per kind)."""
    store = items.store
    if not items.indexes:
        raise QueryError("nothing is indexed yet: call index(catalog) first")
    limit = embedder.config.search.filter_timeout_s
    allowed = []  # the filters first: a refused or interrupted one costs no encoding
    for q in queries:
        allowed.append(store.filter(q.where, limit, q.unsafe_where, q.filters))
    return [answer(q, space, vector, keys, embedder, items, photo, image)
            for q, (space, vector, photo, image), keys in zip(queries, _query_vectors(queries, embedder, items, allowed), allowed)]


def query_vectors(queries: list[Query], embedder, items: Collection) -> list[tuple[str, np.ndarray]]:
    """(index space, (readings, d) vectors) per query, on the score scale (joint space: ``joint_query_vectors``;
    one reading but for composed fused queries), a ``not_text`` already subtracted."""
    return [(space, vector) for space, vector, _, _ in _query_vectors(queries, embedder, items)]


def _query_vectors(queries: list[Query], embedder, items: Collection, allowed: list[np.ndarray | None] | None = None
                   ) -> list[tuple[str, np.ndarray, Photo | None, np.ndarray | None]]:
    """``query_vectors`` with, for a fused query with a photo and words, its ``Photo`` (word_filter's input): the
    photo's nearest items among those its query's filter lets through (``allowed``, per query; None: no filter); and
    for an image query where the items carry region vectors, its photo's unit image vector (1, dim) (ranking.with_regions)."""
    allowed = allowed or [None] * len(queries)
    fusion = embedder.config.fusion

    def photo(i: int, vector: np.ndarray, near: np.ndarray) -> Photo:
        filtered = allowed[i] is not None and fusion.word_filter and queries[i].weights is None  # what answer reads
        return Photo(vector, nearest_with_text(vector, items, allowed[i])[0] if filtered else near)

    out: list = [None] * len(queries)
    photos: dict[int, Photo] = {}
    unit_images: dict[int, np.ndarray] = {}
    read_photo = fusion.compose or fusion.word_filter  # what a fused query's photo alone is needed for
    groups: dict[tuple, list[int]] = {}
    for i, q in enumerate(queries):
        if q.vector is not None:
            out[i] = ("joint", q.vector)
        elif q.like is not None:
            out[i] = ("joint", like_vector(q, embedder, items))
            if q.text is not None and fusion.word_filter:  # the item's photo + words: its photo alone, for the word filter
                row = items.store.rows_of(items.store.keys_for([q.like]))
                vectors, near = photo_neighbours({name: a[row] for name, a in items.store.features.items()}, embedder, items)
                photos[i] = photo(i, vectors, near[0])
        else:
            groups.setdefault(("clip" if q.mode == "zero-shot" else "joint", q.image is not None, q.text is not None), []).append(i)
    for (space, has_image, has_text), idx in groups.items():
        images = [queries[i].image for i in idx] if has_image else None
        texts = [queries[i].text for i in idx] if has_text else None
        if space == "clip":
            vectors, name = embedder.embed(images, texts, space="clip"), "clip_image" if has_text else "clip_text"
        else:
            weights = np.array([queries[i].weights or (np.nan, np.nan) for i in idx], np.float64)
            features = embedder.features(images, texts)
            near = photo_neighbours(features, embedder, items) if has_image and has_text and read_photo else None
            vectors, name = joint_query_vectors(features, weights, embedder, items, near=near), "joint"
            if has_image and not has_text and items.store.regions != "none":
                unit_images.update((i, l2_normalize(features["image_tokens"][j:j + 1, 0])) for j, i in enumerate(idx))
            if near is not None:
                photos.update((i, photo(i, near[0][j:j + 1], near[1][j])) for j, i in enumerate(idx))
        for j, i in enumerate(idx):
            out[i] = (name, vectors[j] if vectors.ndim == 3 else vectors[j:j + 1])
    negative = [i for i, q in enumerate(queries) if q.not_text is not None]
    for space in ("joint", "clip"):
        idx = [i for i in negative if (out[i][0] == "joint") == (space == "joint")]
        if idx:
            subtract = negative_vectors([queries[i].not_text for i in idx], space, embedder, items)
            for j, i in enumerate(idx):
                out[i] = (out[i][0], (out[i][1] - subtract[j:j + 1]).astype(np.float32))
                if i in photos:  # the photo alone ranks the items its words name: the concept goes from it too
                    photos[i] = Photo((photos[i].vector - subtract[j:j + 1]).astype(np.float32), photos[i].near)
    return [(space, vector, photos.get(i), unit_images.get(i)) for i, (space, vector) in enumerate(out)]


def like_vector(query: Query, embedder, items: Collection) -> np.ndarray:
    """The joint query vector of an item's stored features: both parts, only its image or its text,
    or its image with the query's words in place of its text."""
    store = items.store
    row = store.rows_of(store.keys_for([query.like]))
    features = {name: array[row].copy() for name, array in store.features.items()}
    weights = None if query.weights is None else np.array([query.weights], np.float64)
    if query.text is not None:
        if not features["image_mask"].any():
            raise QueryError(f"item {query.like!r} has no image to combine with the words")
        anchor = {name: features[name].copy() for name in ("text_tokens", "text_mask")}
        features["text_tokens"][:], features["text_mask"][:] = embedder.text_encoder.forward([query.text], embedder.fusion.text_chunks)
        return joint_query_vectors(features, weights, embedder, items, anchor)[0]
    elif query.mode in ("image", "text"):
        features["text_mask" if query.mode == "image" else "image_mask"][:] = False
        if not features[f"{query.mode}_mask"].any():
            other = "text" if query.mode == "image" else "image"
            raise QueryError(f"item {query.like!r} has no {query.mode}: ask for items like it by its {other}")
    return embedder.query_vectors(features, weights, fusion_calibration(embedder, items))


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


PHOTO_NEIGHBOURS = 10  # a photo's nearest items, among which words must name one for word_filter to apply


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


def word_filter(text: str, near: np.ndarray, items: Collection) -> np.ndarray | None:
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


def answer(query: Query, space: str, vector: np.ndarray, allowed: np.ndarray | None, embedder, items: Collection,
           photo: Photo | None = None, image: np.ndarray | None = None) -> pd.DataFrame:
    """Rank among the allowed keys (None: all), leave out the ``like`` item and what scores under
    ``min_score``, sort, cut the page; the result rows. ``photo``: a fused query's photo alone (word_filter);
    ``image``: an image query's unit image vector, where the items carry region vectors (ranking.with_regions)."""
    store, index = items.store, items.indexes[space]
    if vector.shape[1] != index.dim:
        raise QueryError(f"the query vector has {vector.shape[1]} dimensions; the {space} space has {index.dim}")
    skip = store.keys_for([query.like]) if query.like is not None else np.zeros(0, np.int64)
    # Past the page: is there more, and which of the items tied with its last one come first (ties_in_id_order).
    depth = query.offset + query.k + TIE_DEPTH + len(skip)
    if query.sort_by:
        depth = max(depth, embedder.config.search.sort_candidates)
    named = None  # the items a fused query's words name (word_filter), ranked first by its photo
    ordered = None  # the ranking read best-first by score, where there is one (an item it did not read scores lower)
    if query.mode == "text" and query.like is None:
        hits, columns = rank_text(query, vector, embedder, items, allowed, depth)
    else:
        matched = ("image" if query.text is not None else "text") if query.mode == "zero-shot" else None
        if photo is not None and query.weights is None and embedder.config.fusion.word_filter:
            named = word_filter(query.text, photo.near, items)
        if named is not None:  # photo.near, so named, lies within the filter already
            first = search_index(index, photo.vector, depth, named)
        if len(vector) == 1:
            hits = search_index(index, vector, depth, allowed, matched)
            if image is not None:
                hits = with_regions(hits, image, vector, depth, allowed, store,
                                    lambda keys: embedder.item_vectors(store.features, store.rows_of(keys)))
        else:
            hits = best_reading(index, vector, depth, allowed, lambda keys: embedder.item_vectors(store.features, store.rows_of(keys)),
                                same_text_as(skip, store))
        ordered = hits
        if named is not None:  # the named items first, as the photo orders them; then the rest as before
            rest = ~np.isin(hits.keys, first.keys)
            hits = Hits(np.r_[first.keys, hits.keys[rest]], np.r_[first.scores, hits.scores[rest]].astype(np.float32),
                        np.r_[first.matched, hits.matched[rest]])
        columns = {}
    keep = ~np.isin(hits.keys, skip)
    floor = score_floor(query, embedder)
    if floor is not None:
        keep &= hits.scores >= floor
    shown = query.mode in ("text", "zero-shot") and query.like is None
    frame = store.results(hits.keys[keep], hits.scores[keep],
                          {name: values[keep] for name, values in [("matched", hits.matched), *columns.items()]} if shown else None)
    frame.index = hits.keys[keep]  # each row's key, until the page is cut
    frame = ties_in_id_order(frame, "hybrid_score" if "hybrid_score" in frame.columns else "score")
    if query.sort_by:
        frame = sort_results(frame, *query.sort_by)
    page = frame.iloc[query.offset:query.offset + query.k]
    page_keys = page.index.to_numpy()
    page = page.reset_index(drop=True)
    page["rank"] = np.arange(query.offset + 1, query.offset + 1 + len(page))
    fusion = embedder.fusion
    if query.mode == "fused" and hasattr(fusion, "contributions") and len(page) and (query.like is None or query.text is not None):
        # Joint vectors re-fused from the stored features: compressed indexes cannot give them back.
        stored = embedder.item_vectors(store.features, store.rows_of(page_keys))
        best = (stored @ vector.T).argmax(1)  # the reading each item scored by
        parts = np.array([fusion.contributions(v, stored) for v in vector])  # (readings, 2, items)
        image_part, text_part = parts[best, 0, np.arange(len(best))], parts[best, 1, np.arange(len(best))]
        by_photo = np.isin(page_keys, first.keys) if named is not None else np.zeros(len(page), bool)
        # The items the words name are ordered by the photo alone, the words having chosen them.
        image_part, text_part = np.where(by_photo, page["score"], image_part), np.where(by_photo, 0.0, text_part)
        page.insert(3, "image_score", image_part)
        page.insert(4, "text_score", text_part)
        page.insert(5, "word_match", by_photo)
    page.attrs["has_more"] = len(frame) > query.offset + query.k
    total = count_matches(query, space, allowed, store, skip, hits, ordered, len(frame), floor)
    if total is None and floor is not None and query.mode == "text" and query.like is None and query.not_text is None:
        total = count_text_above(query, vector, floor, allowed, embedder, items, depth)
    page.attrs["total"] = total
    page.attrs["min_score"] = floor
    # Nothing scores as high as the floor although items were ranked: no close match (a shop shows related products).
    page.attrs["no_close_match"] = bool(floor is not None and not len(frame) and (~np.isin(hits.keys, skip)).any())
    return page


def count_matches(query: Query, space: str, allowed: np.ndarray | None, store, skip: np.ndarray, hits: Hits,
                  ordered: Hits | None, kept: int, floor: float | None = None) -> int | None:
    """How many items a query matches in all, every page together: the items it ranks (those the filters let through
    that have what its mode compares: a text for a text-only or zero-shot image query, an image for a zero-shot text
    query; every item otherwise), the ``like`` item left out. With ``min_score``, those of them scoring at least that,
    counted where the ranking settles it (``kept``: the ranked items that passed): it read every item, or it is one
    best-first ranking (not a text query's, whose keyword and zero-shot parts rank apart) whose last score falls
    below the floor. Otherwise None: counting them would score every item."""
    if query.mode == "text" and query.like is None:
        subset = store.keys if query.auto else store.with_modality("text")  # rank_text: texts, and images where no text
    elif space in ("clip_image", "clip_text"):
        subset = store.with_modality("image" if space == "clip_image" else "text")
    else:
        subset = store.keys  # the joint space holds every item
    pool = restrict(subset, len(store), allowed)
    ranked = len(store) if pool is None else len(pool)
    if floor is None:
        return ranked - int(np.isin(skip, pool).sum() if pool is not None else len(skip))
    if len(np.unique(hits.keys)) >= ranked or (ordered is not None and len(ordered.scores) and ordered.scores[-1] < floor):
        return kept
    return None


def count_text_above(query: Query, vector: np.ndarray, floor: float, allowed: np.ndarray | None, embedder, items: Collection,
                     start: int) -> int:
    """How many items a text query scores at least ``floor`` on (its ``score``, not the hybrid order): item texts in
    the joint space and, in auto mode, the images of items without text on the merged scale (ranking.merge_spaces)."""
    store = items.store
    texts = restrict(store.with_modality("text"), len(store), allowed)
    count = count_above(items.indexes["joint"], vector, floor, texts, start) if texts is None or len(texts) else 0
    image_only = restrict(store.with_modality("image only"), len(store), allowed) if query.auto else np.zeros(0, np.int64)
    if image_only is None or len(image_only):
        a, b = zero_shot_scale(embedder, items) if texts is None or len(texts) else (1.0, 0.0)  # as rank_text merges
        clip = embedder.embed(texts=[query.text], space="clip")
        count += count_above(items.indexes["clip_image"], clip, (floor - b) / a, image_only, start)
    return count


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


def sort_results(frame: pd.DataFrame, column: str, descending: bool) -> pd.DataFrame:
    """Results reordered by a catalog column (stable: equal values keep their relevance order; empty ones last)."""
    if column not in frame.columns or column == "rank":
        raise QueryError(f"sort_by: no column {column!r}; sortable columns: {[c for c in frame.columns if c != 'rank']}")
    return frame.sort_values(column, ascending=not descending, kind="stable", na_position="last")
