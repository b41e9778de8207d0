"""The query stage: validate a query, embed it, filter, search the index of its space, lay out results.

    make_query(image, text, mode, k, where, config) -> Query      (checks and decoding; no model runs)
    run_query(query, embedder, store, indexes)      -> DataFrame  (filter, embed, top-k, result rows)

Every bound of ``config.search`` is checked here (LimitError, a QueryError): text characters and
tokens, k (+ offset), the filter's length, a batch's size (``check_batch``); the filter's grammar
is checked by the item store (filters.py) before DuckDB or a model runs, and its time limit there.

Modes: "auto" (image+text -> fused, image -> image, text -> text), "image", "text", "fused"
(all in the joint space) and "zero-shot" (a text against item images, or an image against
item texts, in the zero-shot space).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from .catalog import ImageInput, load_image, text_problem
from .config import RetrieverConfig
from .errors import LimitError, QueryError

MODES = ("auto", "image", "text", "fused", "zero-shot")


@dataclass(frozen=True)
class Query:
    image: Any  # a decoded RGB PIL image, or None
    text: str | None
    mode: str  # resolved: never "auto"
    k: int
    where: str | None = None
    unsafe_where: bool = False  # any DuckDB expression (trusted callers), not only the filter grammar


def make_query(image: ImageInput | None, text: str | None, mode: str, k: int, where: str | None,
               config: RetrieverConfig, count_tokens: Callable[[str], int] | None = None, unsafe_where: bool = False) -> Query:
    """A checked query with its image decoded. Raises QueryError (LimitError for a bound) or ImageError.

    ``count_tokens``: the text encoder's word-piece count, for ``search.max_text_tokens``."""
    mode = resolve_mode(image, text, mode)
    k = check_k(k, config)
    where = None if isinstance(where, str) and not where.strip() else where  # an empty filter keeps every item
    if where is not None:
        check_where(where, config)
    text = check_text(text, config, count_tokens) if text is not None else None
    cat = config.catalog
    pil = load_image(image, cat.max_image_pixels, cat.max_image_bytes, cat.download_timeout_s) if image is not None else None
    return Query(pil, text, mode, k, where, bool(unsafe_where))


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


def run_query(query: Query, embedder, store, indexes) -> pd.DataFrame:
    """Answer a query over an item store and its indexes (the caller holds them steady)."""
    if not indexes:
        raise QueryError("nothing is indexed yet: call index(catalog) first")
    # The filter first: a refused or interrupted one costs no encoding.
    limit = embedder.config.search.filter_timeout_s
    allowed = store.filter(query.where, limit, query.unsafe_where) if query.where is not None else None
    images = [query.image] if query.image is not None else None
    texts = [query.text] if query.text is not None else None
    if query.mode == "zero-shot":
        space = "clip_image" if query.text is not None else "clip_text"
        vector = embedder.embed(images, texts, space="clip")
    else:
        space, vector = "joint", embedder.embed(images, texts)
    index = indexes[space]
    if len(index) == 0 or (allowed is not None and len(allowed) == 0):
        return store.results(np.zeros(0, np.int64), np.zeros(0, np.float32))
    scores, keys = index.search(vector, int(min(query.k, len(index))), allowed)
    found = keys[0] >= 0
    frame = store.results(keys[0][found], scores[0][found])
    fusion = embedder.fusion
    if query.mode == "fused" and hasattr(fusion, "contributions") and len(frame):
        # Joint vectors re-fused from the stored features: compressed indexes cannot give them back.
        image_part, text_part = fusion.contributions(vector[0], embedder.fuse(store.features, store.rows_of(keys[0][found])))
        frame.insert(3, "image_score", image_part)
        frame.insert(4, "text_score", text_part)
    return frame
