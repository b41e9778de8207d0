"""A search's options checked: ``make_query(SearchOptions, config) -> Query``, before any model runs.

Every bound of ``config.search`` is checked here (LimitError, a QueryError): text characters and tokens, k + offset,
the filter's length, the structured filters' columns and values, a batch's size (``check_batch``); the filter's
grammar is checked by the item store (filters.py) before DuckDB or a model runs, and its time limit there. The
mode is resolved from the inputs a query has, and its photo decoded and cut to its ``crop`` (regions.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..catalog import load_image, text_problem
from ..config import RetrieverConfig
from ..errors import LimitError, QueryError
from ..regions import crop_image
from .options import HYBRID_METHODS, MODES, SearchOptions


@dataclass(frozen=True)
class Query:
    """A checked search: its photo decoded, its mode resolved, its options in the types the engine reads."""

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
    min_score: float | str | None = None  # results scoring lower are dropped; "auto": the calibrated floor (scores.score_floor)
    sort_by: tuple[str, bool] | None = None  # (column, descending): reorders the most relevant items
    filters: dict[str, Any] | None = None  # column -> values or {"min", "max"}: ANDed with ``where`` (filters.compile_filters)
    like: Any = None  # an item id: its stored features are the query ("more like this"), the item itself left out
    vector: np.ndarray | None = None  # (1, d) a query vector in the joint space
    weights: tuple[float, float] | None = None  # a fused query's (image, text) weights; None: the fusion's own
    not_text: str | None = None  # a concept to subtract: its text-query score, times search.not_text_weight


def make_query(options: SearchOptions, config: RetrieverConfig, count_tokens: Callable[[str], int] | None = None) -> Query:
    """A checked query with its image decoded. Raises QueryError (LimitError for a bound) or ImageError.

    ``count_tokens``: the text encoder's word-piece count, for ``search.max_text_tokens``. The options are
    SearchOptions' (options.py says what each takes).
    """
    o = options
    resolved = resolve_mode(o.image, o.text, o.mode, o.like, o.vector)
    k = check_k(o.k, config, o.offset)
    where = None if isinstance(o.where, str) and not o.where.strip() else o.where  # an empty filter keeps every item
    if where is not None:
        check_where(where, config)
    filters = check_filters(o.filters, config)
    hybrid = o.hybrid or config.search.hybrid
    if hybrid not in HYBRID_METHODS:
        raise QueryError(f"unknown hybrid method {hybrid!r}; choose one of {list(HYBRID_METHODS)}")
    weight = config.search.keyword_weight if o.keyword_weight is None else o.keyword_weight
    if isinstance(weight, bool) or not isinstance(weight, (int, float, np.floating)) or not 0 <= weight <= 1:
        raise QueryError(f"keyword_weight must be a number from 0 to 1, got {weight!r}")
    text = check_text(o.text, config, count_tokens) if o.text is not None else None
    weights = _weights(o.weights, resolved)
    not_text = o.not_text
    if not_text is not None:
        if resolved == "vector":
            raise QueryError("not_text needs a query text, image or like=ITEM_ID to subtract from, not a vector")
        not_text = check_text(not_text, config, count_tokens, "not_text")
    if o.crop is not None and o.image is None:
        raise QueryError("crop cuts the query photo, and this query has none: give image=... with it")
    cat = config.catalog
    pil = load_image(o.image, cat.max_image_pixels, cat.max_image_bytes, cat.download_timeout_s) if o.image is not None else None
    pil = crop_image(pil, o.crop) if o.crop is not None else pil
    return Query(pil, text, resolved, k, where, bool(o.unsafe_where),
                 auto=o.mode == "auto" and resolved == "text" and o.like is None, hybrid=hybrid, keyword_weight=float(weight),
                 offset=int(o.offset), min_score=_min_score(o.min_score), sort_by=_sort_key(o.sort_by),
                 filters=filters or None, like=o.like, vector=None if o.vector is None else _vector(o.vector),
                 weights=weights, not_text=not_text)


def batch_query(spec: dict[str, Any], config: RetrieverConfig, count_tokens: Callable[[str], int] | None = None) -> Query:
    """A query of ``search_batch``: a dict of ``search`` arguments."""
    if not isinstance(spec, dict):
        raise QueryError(f"each query of a batch is a dict of search arguments, got {type(spec).__name__}")
    return make_query(SearchOptions.of(**spec), config, count_tokens)


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
    """The mode a query runs in, from the one asked for and the inputs it has ("vector" for a given vector)."""
    if mode not in MODES:
        raise QueryError(f"unknown mode {mode!r}; choose one of {list(MODES)}")
    has_image, has_text = image is not None, text is not None
    if like is not None or vector is not None:
        return _stored_mode(has_image, has_text, mode, like, vector)
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


def _stored_mode(has_image: bool, has_text: bool, mode: str, like: Any, vector: Any) -> str:
    """The mode of a query by an item's stored features (``like``) or by a given vector."""
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
