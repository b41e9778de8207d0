"""The query engine: ``Searcher(embedder, collection)(queries) -> [result frames]``.

Each batch: every query's filter first (a refused or interrupted one costs no encoding), then every query
embedded at once (embedding.py: one pass per encoder), then each query ranked (ranking.py, by the readings of
scores.py) and laid out as a page of result rows.

Modes: "auto" (image+text -> fused, image -> image, text -> text against item texts *and*, through the zero-shot
space, against the images of items that have no text), "image", "text", "fused" (all in the joint space) and
"zero-shot" (a text against item images, or an image against item texts, in the zero-shot space). Words that name a
phrase of item texts (a category, a tag, the "blue" of "Armchair ottoman, blue"; or that a phrase holds, "bed" in
"Day bed") pick items among the photo's 10 nearest (of those a filter lets through): those come first, ordered and
scored as the photo alone would order them, then the others. Hybrid text queries are ordered by the fusion of the
keyword and vector rankings, but their ``score`` is the joint space's (the order's own value is ``hybrid_score``),
so ``min_score`` means the same in every joint-space mode. A result frame's ``attrs["has_more"]`` says whether
another page follows, and ``attrs["total"]`` how many items match in all (``count_matches``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from ..errors import QueryError
from ..keywords import identifiers
from .checks import Query
from .embedding import Embedded, embed_queries
from .ranking import (TIE_DEPTH, Hits, best_reading, count_above, fuse_rankings, merge_spaces, named_hits_first, named_items,
                      restrict, same_text_as, search_index, sort_results, through_ties, ties_in_id_order, with_regions)
from .scores import joint_query_vectors, score_floor, score_parts, zero_shot_scale

if TYPE_CHECKING:
    from ..collection import Collection


class Searcher:
    """Answers queries over one collection with one embedder (the caller holds the collection steady)."""

    def __init__(self, embedder, collection: Collection) -> None:
        self.embedder, self.items = embedder, collection

    def __call__(self, queries: list[Query]) -> list[pd.DataFrame]:
        """A result frame per query: rank, id, score, the catalog columns (and the score's parts where they apply)."""
        if not self.items.indexes:
            raise QueryError("nothing is indexed yet: call index(catalog) first")
        limit = self.embedder.config.search.filter_timeout_s
        allowed = [self.items.store.filter(q.where, limit, q.unsafe_where, q.filters) for q in queries]
        embedded = embed_queries(queries, self.embedder, self.items, allowed)
        return [self.answer(q, e, keys) for q, e, keys in zip(queries, embedded, allowed)]

    def joint_vectors(self, images: list | None, texts: list[str] | None, weights: np.ndarray | None = None) -> np.ndarray:
        """Joint-space query vectors of decoded photos and/or texts (pairs when both), (n, readings, d), as ``answer``
        ranks by them (scores.joint_query_vectors); ``weights``: (n, 2), NaN rows for the default."""
        return joint_query_vectors(self.embedder.features(images, texts), weights, self.embedder, self.items)

    def answer(self, query: Query, embedded: Embedded, allowed: np.ndarray | None) -> pd.DataFrame:
        """Rank among the allowed keys (None: all), leave out the ``like`` item and what scores under ``min_score``,
        sort, cut the page; the result rows."""
        store, index, embedder = self.items.store, self.items.indexes[embedded.space], self.embedder
        if embedded.vector.shape[1] != index.dim:
            raise QueryError(f"the query vector has {embedded.vector.shape[1]} dimensions; the {embedded.space} space has {index.dim}")
        skip = store.keys_for([query.like]) if query.like is not None else np.zeros(0, np.int64)
        # Past the page: is there more, and which of the items tied with its last one come first (ties_in_id_order).
        depth = query.offset + query.k + TIE_DEPTH + len(skip)
        if query.sort_by:
            depth = max(depth, self.embedder.config.search.sort_candidates)
        first, ordered, columns = None, None, {}
        if query.mode == "text" and query.like is None:
            hits, columns = self.rank_text(query, embedded, allowed, depth)
        else:
            hits, first, ordered = self.rank_vectors(query, embedded, allowed, depth, skip)
        floor = score_floor(query, embedder)
        frame = self._ordered(query, hits, columns, skip, floor)
        page = frame.iloc[query.offset:query.offset + query.k]
        page_keys = page.index.to_numpy()
        page = page.reset_index(drop=True)
        page["rank"] = np.arange(query.offset + 1, query.offset + 1 + len(page))
        fusion = self.embedder.fusion
        if query.mode == "fused" and hasattr(fusion, "contributions") and len(page) and (query.like is None or query.text is not None):
            self._score_parts(page, page_keys, embedded.vector, first)
        page.attrs["has_more"] = len(frame) > query.offset + query.k
        total = count_matches(query, embedded.space, allowed, store, skip, hits, ordered, len(frame), floor)
        if total is None and floor is not None and query.mode == "text" and query.like is None and query.not_text is None:
            total = self.count_text_above(query, embedded, floor, allowed, depth)
        page.attrs["total"] = total
        page.attrs["min_score"] = floor
        # Nothing scores as high as the floor although items were ranked: no close match (a shop shows related products).
        page.attrs["no_close_match"] = bool(floor is not None and not len(frame) and (~np.isin(hits.keys, skip)).any())
        return page

    def rank_text(self, query: Query, embedded: Embedded, allowed: np.ndarray | None, depth: int
                  ) -> tuple[Hits, dict[str, np.ndarray]]:
        """A text query's ranking: item texts in the joint space, the images of items without text in the zero-shot
        space (auto mode), merged on one scale, then combined with the keyword ranking (hybrid). Returns the hits (in
        hybrid order, each with its joint-space score) and, when hybrid, each hit's ``vector_score``,
        ``keyword_score`` and ``hybrid_score`` (the value the order comes from) columns."""
        store, indexes, items = self.items.store, self.items.indexes, self.items
        hybrid = query.hybrid != "off" and query.keyword_weight > 0 and len(items.keywords) > 0
        depth = max(depth, self.embedder.config.search.hybrid_depth) if hybrid else depth
        fetch = depth + TIE_DEPTH if hybrid else depth
        ranked = search_index(indexes["joint"], embedded.vector, fetch, restrict(store.with_modality("text"), len(store), allowed), "text")
        if embedded.pictures is not None:  # auto mode, and some items have no text
            image_only = restrict(store.with_modality("image only"), len(store), allowed)
            pictures = search_index(indexes["clip_image"], embedded.pictures, fetch, image_only, "image")
            scale = zero_shot_scale(self.embedder, items) if len(ranked.keys) and len(pictures.keys) else (1.0, 0.0)
            ranked = merge_spaces(ranked, pictures, scale)
        if not hybrid:
            return ranked, {}
        return self._hybrid(query, ranked, embedded.vector, allowed, depth)

    def _hybrid(self, query: Query, ranked: Hits, vector: np.ndarray, allowed: np.ndarray | None, depth: int
                ) -> tuple[Hits, dict[str, np.ndarray]]:
        """The vector ranking fused with the keyword ranking; each hit scored in the joint space."""
        store, keywords = self.items.store, self.items.keywords
        # Each ranking is read to its depth-th item and the items tied with it (listings sharing a title), so
        # which of them enter the fusion does not depend on the order they were indexed in.
        ranked = through_ties(ranked, depth)
        words = through_ties(Hits(*keywords.search(query.text, depth + TIE_DEPTH, allowed)), depth)
        fused, vector_scores, keyword_scores = fuse_rankings(ranked, words, query.hybrid, query.keyword_weight,
                                                             lambda found: keywords.having(identifiers(query.text), found),
                                                             keywords.holds)
        scores = vector_scores.copy()
        missing = np.isnan(scores)  # found by the keywords alone: its joint-space score, from its stored features
        if missing.any():
            scores[missing] = self.embedder.item_vectors(store.features, store.rows_of(fused.keys[missing])) @ vector[0]
        ranked = Hits(fused.keys, scores.astype(np.float32), fused.matched)
        return ranked, {"vector_score": vector_scores, "keyword_score": keyword_scores, "hybrid_score": fused.scores}

    def rank_vectors(self, query: Query, embedded: Embedded, allowed: np.ndarray | None, depth: int, skip: np.ndarray
                     ) -> tuple[Hits, Hits | None, Hits]:
        """An image, fused, zero-shot, like or vector query's ranking: one index's top-k, or for several readings the
        best of them; a fused query's items its words name first (word filter), as its photo alone ranks them. Returns
        the ranking, the named items as the photo ranks them (or None), and the ranking before the named items moved
        up (best-first by score: an item it did not read scores lower)."""
        store, index, photo = self.items.store, self.items.indexes[embedded.space], embedded.photo
        matched = ("image" if query.text is not None else "text") if query.mode == "zero-shot" else None
        named = None
        if photo is not None and query.weights is None and self.embedder.config.fusion.word_filter:
            named = named_items(query.text, photo.near, self.items)
        item_vectors = lambda keys: self.embedder.item_vectors(store.features, store.rows_of(keys))  # noqa: E731
        if len(embedded.vector) == 1:
            hits = search_index(index, embedded.vector, depth, allowed, matched)
            if embedded.image is not None:
                hits = with_regions(hits, embedded.image, embedded.vector, depth, allowed, store, item_vectors)
        else:
            hits = best_reading(index, embedded.vector, depth, allowed, item_vectors, same_text_as(skip, store))
        if named is None:
            return hits, None, hits
        first = search_index(index, photo.vector, depth, named)  # photo.near, so named, lies within the filter already
        return named_hits_first(hits, first), first, hits

    def _ordered(self, query: Query, hits: Hits, columns: dict[str, np.ndarray], skip: np.ndarray, floor: float | None
                 ) -> pd.DataFrame:
        """The ranked result rows, each indexed by its key: the ``like`` item and those under the score ``floor`` left
        out, ties in id order, sorted by a column if asked."""
        keep = ~np.isin(hits.keys, skip)
        if floor is not None:
            keep &= hits.scores >= floor
        shown = query.mode in ("text", "zero-shot") and query.like is None
        extra = {name: values[keep] for name, values in [("matched", hits.matched), *columns.items()]} if shown else None
        frame = self.items.store.results(hits.keys[keep], hits.scores[keep], extra)
        frame.index = hits.keys[keep]  # each row's key, until the page is cut
        frame = ties_in_id_order(frame, "hybrid_score" if "hybrid_score" in frame.columns else "score")
        return sort_results(frame, *query.sort_by) if query.sort_by else frame

    def count_text_above(self, query: Query, embedded: Embedded, floor: float, allowed: np.ndarray | None, start: int) -> int:
        """How many items a text query scores at least ``floor`` on (its ``score``, not the hybrid order): item texts in
        the joint space and, in auto mode, the images of items without text on the merged scale (ranking.merge_spaces)."""
        store, indexes = self.items.store, self.items.indexes
        texts = restrict(store.with_modality("text"), len(store), allowed)
        count = count_above(indexes["joint"], embedded.vector, floor, texts, start) if texts is None or len(texts) else 0
        image_only = restrict(store.with_modality("image only"), len(store), allowed) if query.auto else np.zeros(0, np.int64)
        if image_only is None or len(image_only):
            a, b = zero_shot_scale(self.embedder, self.items) if texts is None or len(texts) else (1.0, 0.0)  # as rank_text merges
            count += count_above(indexes["clip_image"], embedded.pictures, (floor - b) / a, image_only, start)
        return count

    def _score_parts(self, page: pd.DataFrame, keys: np.ndarray, vector: np.ndarray, first: Hits | None) -> None:
        """A fused query's page gains image_score and text_score (the parts of its score) and word_match."""
        image_part, text_part = score_parts(vector, keys, self.embedder, self.items)
        by_photo = np.isin(keys, first.keys) if first is not None else np.zeros(len(page), bool)
        # The items the words name are ordered by the photo alone, the words having chosen them.
        image_part, text_part = np.where(by_photo, page["score"], image_part), np.where(by_photo, 0.0, text_part)
        page.insert(3, "image_score", image_part)
        page.insert(4, "text_score", text_part)
        page.insert(5, "word_match", by_photo)


def count_matches(query: Query, space: str, allowed: np.ndarray | None, store, skip: np.ndarray, hits: Hits,
                  ordered: Hits | None, kept: int, floor: float | None = None) -> int | None:
    """How many items a query matches in all, every page together: the items it ranks (those the filters let through
    that have what its mode compares: a text for a text-only or zero-shot image query, an image for a zero-shot text
    query; every item otherwise), the ``like`` item left out. With ``min_score``, those of them scoring at least that,
    counted where the ranking settles it (``kept``: the ranked items that passed): it read every item, or it is one
    best-first ranking (``ordered``; not a text query's, whose keyword and zero-shot parts rank apart) whose last score
    falls below the floor. Otherwise None: counting them would score every item."""
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
