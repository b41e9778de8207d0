"""The vector index: FAISS by index_factory string, inner product, int64 ids.

Vectors are L2-normalised, so inner product is cosine similarity (the joint space's items
that lack a photo or a text keep their modality weights instead: fusion.py). The index is wrapped
in IDMap2, so ids are the caller's int64 keys and vectors can be read back for exact
scoring of small filtered sets. Items are removed from every kind of index: from flat
storage (Flat, PQ, SQ) at once; from the others (HNSW graphs, Refine, IVF, whose removal
IDMap2 cannot follow) they are marked deleted, left out of every search by an IDSelector,
and the index is rebuilt from the live vectors once the deleted share passes
``index.compact_deleted_share`` (``IndexSet``).

``choose_factory`` picks the family from the catalog size and a memory budget, and
``build`` sets the search parameters (efSearch, nprobe, k_factor) to the cheapest values
that reach a target recall@10 against exact search; both are recorded in the manifest.
Searches that read much deeper than a page (hybrid text queries read each ranking to
``search.hybrid_depth``) get their own breadth (efSearch, nprobe), tuned to the same target
at that depth: at 100k items, the efSearch that finds 99% of the top 10 found 95% of the
top 110 (one query in ten lost a third of it).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from .errors import ConfigError, IndexLoadError, QueryError

logger = logging.getLogger(__name__)
EXACT_UP_TO = 100_000  # items: a Flat scan of this many is still a few ms
TRAIN_SAMPLE = 200_000  # vectors used to train PCA/IVF/PQ; more adds time, not quality
HNSW_LINK_BYTES = 32 * 2 * 4 * 1.2  # HNSW32: 2M int32 links on level 0, plus upper levels
# Tuning's recall treats items whose exact score is within this of the k-th best exact score as one: among
# near-identical items (variants, repeated rows) which of several equally good ones comes back is arbitrary,
# and set recall would call an exact answer wrong. Items above that tie must be found (ann-benchmarks' plain
# count of results reaching the k-th score let a search that lost the 6th best to an 11th tied item score 1.0).
RECALL_EPSILON = 1e-3
# HNSW graph building: candidates kept per insertion (FAISS's default is 40, hnswlib's 200). At 40 a catalog
# with many near-identical listings grows islands a search rarely reaches: in benchmarks/upsert.py's 100k
# catalog, searched with each item's own vector, 0.2-0.3% were not found at efSearch 64, and 0.17% of the
# upserted index's even at 1024. At 200 every one was found at 64, for a graph built in 24-26 s instead of
# 10-18 s (the encoding takes 20 minutes).
HNSW_EF_CONSTRUCTION = 200
TUNED_K = 10  # build tunes recall@10; those parameters serve reads up to twice as deep (a page read through its ties)
BREADTH = ("efSearch", "nprobe")  # the parameters a deeper read raises (k_factor already scales with k)


def recall_at_k(found: np.ndarray, best: np.ndarray, k: int) -> float:
    """The share of the exact top k that a search found, from exact scores: ``found``, its results';
    ``best``, the exact top scores, best first. The items tied with the k-th best (to RECALL_EPSILON)
    are interchangeable; those above it must each be found."""
    kth = best[k - 1]
    above = int((best[:k] > kth + RECALL_EPSILON).sum())
    return (min(int((found > kth + RECALL_EPSILON).sum()), above)
            + min(int((np.abs(found - kth) <= RECALL_EPSILON).sum()), k - above)) / k


def choose_factory(n_vectors: int, dim: int = 256, memory_budget_bytes: float = 8e9) -> str:
    """The index_factory string "auto" stands for.

    - up to 100k vectors: ``Flat`` (exact);
    - larger, when full vectors plus a graph fit the budget: HNSW, on a 256-d PCA
      projection for wide vectors with the candidates re-scored exactly (``Refine(Flat)``),
      since graph building and walking cost grow with the width;
    - otherwise IVF-PQ with ``m``-byte codes (the largest of 64..8 that fits), after a
      PCA to 4m dimensions with a random rotation that spreads the variance over the
      sub-quantizers (OPQ learns a better rotation but trains for hours on 1664-d vectors).
    """
    if n_vectors <= EXACT_UP_TO:
        return "Flat"
    if dim > 256:
        graph, per_vector = "PCA256,HNSW32,Refine(Flat)", 4 * dim + 4 * 256 + HNSW_LINK_BYTES + 8
    else:
        graph, per_vector = "HNSW32", 4 * dim + HNSW_LINK_BYTES + 8
    if n_vectors * per_vector <= memory_budget_bytes:
        return graph
    nlist = int(2 ** round(np.log2(4 * np.sqrt(n_vectors))))
    for m in (64, 48, 32, 16, 8):
        if n_vectors * (m + 16) <= memory_budget_bytes:
            return f"PCAR{4 * m},IVF{nlist},PQ{m}"
    raise QueryError(f"{n_vectors:,} vectors do not fit a memory budget of {memory_budget_bytes / 1e9:.1f} GB even as 8-byte codes")


def _query_kinds(queries: np.ndarray, parts: list[tuple[int, int]] | None) -> list[np.ndarray]:
    """The tuning queries, then each part alone (other columns zero, renormalised; rows empty there dropped)."""
    kinds = [queries]
    for a, b in parts or []:
        part = np.zeros_like(queries)
        part[:, a:b] = queries[:, a:b]
        norms = np.linalg.norm(part, axis=1)
        kinds.append(np.ascontiguousarray(part[norms > 0] / norms[norms > 0, None]))
    return [q for q in kinds if len(q)]


class VectorIndex:
    """A FAISS index over ``dim``-d vectors with int64 ids.

    Args:
        dim: vector width.
        factory: an index_factory string ("Flat", "HNSW32", "IVF1024,PQ32", ...), without
            the IDMap part, which is added.
        exact_filter_below: filtered queries allowing fewer ids than this are scored
            exactly from the stored vectors; larger ones search through an IDSelector.
    """

    def __init__(self, dim: int, factory: str = "Flat", exact_filter_below: int = 20_000) -> None:
        import faiss

        self.dim, self.factory, self.exact_filter_below = int(dim), factory, exact_filter_below
        self.params: dict[str, float] = {}  # search parameters set by tune()/set_params()
        self.recall: float | None = None  # recall@10 against exact search measured by tune()
        self.deep: dict | None = None  # {"k", "params", "recall"}: the breadth tuned for reads to depth k (build)
        try:
            self.faiss_index = faiss.index_factory(self.dim, f"IDMap2,{factory}", faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as exc:
            raise QueryError(f"invalid FAISS index_factory string {factory!r}: {str(exc).splitlines()[-1]}") from exc
        self.deleted = np.zeros(0, np.int64)  # ids marked deleted (kinds FAISS cannot remove from), sorted
        self._positions: tuple | None = None
        self._live = None  # cached IDSelector of the positions not deleted
        self._build_settings()

    def _build_settings(self) -> None:
        """How the graph takes new entries (an index loaded from an older save takes its additions this way too),
        and its HNSW and Refine levels, found once for every search's breadth (``_breadth``)."""
        import faiss

        self._hnsw, self._refine = self._find(faiss.IndexHNSW), self._find(faiss.IndexRefine)
        if self._hnsw is not None:
            self._hnsw.hnsw.efConstruction = max(self._hnsw.hnsw.efConstruction, HNSW_EF_CONSTRUCTION)

    def __len__(self) -> int:
        return int(self.faiss_index.ntotal) - len(self.deleted)

    @property
    def deleted_share(self) -> float:
        """The share of the index's entries that are marked deleted (0 where removal is real)."""
        return len(self.deleted) / self.faiss_index.ntotal if self.faiss_index.ntotal else 0.0

    @property
    def removes_in_place(self) -> bool:
        """Whether entries can really be removed: flat storage (Flat, PQ, SQ), which FAISS compacts
        as IDMap2 expects. HNSW and Refine cannot remove at all, and IVF keeps its own numbering,
        which IDMap2's removal would scramble (it assumes the entries after a removed one shift)."""
        import faiss

        return self._find(faiss.IndexFlatCodes) is not None

    def ids(self) -> np.ndarray:
        """The ids of the live entries, in FAISS order."""
        ids = self._id_positions()[0]
        return ids[~np.isin(ids, self.deleted)] if len(self.deleted) else ids

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        vectors = self._check(vectors)
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if len(ids) != len(vectors):
            raise ValueError(f"{len(ids)} ids for {len(vectors)} vectors")
        self._train(vectors)
        self.faiss_index.add_with_ids(vectors, ids)
        self._positions = self._live = None

    def _train(self, vectors: np.ndarray) -> None:
        if self.faiss_index.is_trained:
            return
        sample = vectors if len(vectors) <= TRAIN_SAMPLE else vectors[np.sort(np.random.default_rng(0).choice(len(vectors), TRAIN_SAMPLE, replace=False))]
        logger.info("training %s index on %d vectors", self.factory, len(sample))
        t0 = time.perf_counter()
        try:
            self.faiss_index.train(sample)
        except RuntimeError as exc:  # e.g. a PCA or IVF asked for more dimensions or lists than the vectors allow
            reason = str(exc).splitlines()[-1].rpartition("failed: ")[2].strip()  # FAISS's words, without its source location
            raise ConfigError(f"index factory {self.factory!r} cannot be trained on {len(sample):,} vectors of width "
                              f"{self.dim}: {reason}; use a smaller PCA/IVF/PQ size or index.factory auto") from exc
        logger.info("trained in %.1f s", time.perf_counter() - t0)

    # ---------------------------------------------------------------- search parameters

    def set_params(self, **params: float) -> None:
        """Set search-time parameters by FAISS name: efSearch (HNSW), nprobe (IVF), k_factor (Refine)."""
        import faiss

        space = faiss.ParameterSpace()
        for name, value in params.items():
            if name == "k_factor" and self._refine is not None:
                self._refine.k_factor = float(value)
            else:
                try:
                    space.set_index_parameter(self.faiss_index, name, value)
                except RuntimeError as exc:
                    raise QueryError(f"index {self.factory!r} has no search parameter {name!r}") from exc
            self.params[name] = value

    def tunable(self) -> dict[str, list[float]]:
        """The search parameters of this index and the values ``tune`` tries, cheapest first."""
        import faiss

        grid: dict[str, list[float]] = {}
        if self._hnsw is not None:
            grid["efSearch"] = [16, 32, 64, 128, 256, 512, 1024, 2048]
        ivf = self._find(faiss.IndexIVF)
        if ivf is not None:
            grid["nprobe"] = [p for p in (1, 2, 4, 8, 16, 32, 64, 128, 256) if p <= ivf.nlist]
        if self._refine is not None:
            grid["k_factor"] = [1, 2, 4, 8, 16, 32, 64, 128]
        return grid

    def build(self, ids: np.ndarray, vectors: np.ndarray, target_recall: float = 0.999, k: int = TUNED_K,
              queries: int = 200, seed: int = 0, query_parts: list[tuple[int, int]] | None = None,
              deep_k: int | None = None) -> dict:
        """Fill an empty index and tune it: the fastest search parameters whose recall@k
        against exact search reaches ``target_recall``.

        The queries are ``queries`` rows held out of the index while it is tuned (added
        afterwards): queries it holds would find themselves and their graph neighbours too
        easily. Indexes under 20 x ``queries`` vectors are tuned on a sample of their own
        vectors, each query's own vector left out of the results instead. ``query_parts``:
        column ranges that queries may have alone (the joint space's image and text blocks: a
        photo or words meet items through one block); each is tuned for too, and the worst
        kind of query must reach the target. ``deep_k``: also tune the breadth (efSearch, nprobe)
        for searches that read this deep (``deep``), the other parameters kept.

        Returns the chosen trial (params, recall, ms_per_query), also kept in ``params``
        and ``recall``; ``{}`` for an exact index. If nothing reaches the target, the best
        recall wins and a warning is logged.
        """
        import faiss

        if len(self):
            raise ValueError("build fills an empty index; use add")
        vectors, ids = self._check(vectors), np.ascontiguousarray(ids, dtype=np.int64)
        n, rng = len(vectors), np.random.default_rng(seed)
        if not self.tunable() or n < 20 * queries:
            self.add(ids, vectors)
            return self._tune_on_own_vectors(vectors, target_recall, k, queries, rng, query_parts, deep_k)
        self._train(vectors)
        held = np.sort(rng.choice(n, queries, replace=False))
        for a, b in zip(np.r_[0, held + 1], np.r_[held, n]):  # the runs between held-out rows, as views
            if b > a:
                self.add(ids[a:b], vectors[a:b])
        kept = np.ones(n, bool)
        kept[held] = False
        deepest = max(k, deep_k or 0)
        trials = []
        for q in _query_kinds(vectors[held], query_parts):
            scores, positions = faiss.knn(q, vectors, deepest + len(held), faiss.METRIC_INNER_PRODUCT)
            exact = np.array([s[kept[p]][:deepest] for s, p in zip(scores, positions)])  # over what the index holds
            trials.append((q, lambda found, depth: [f[:depth] for f in found], exact))
        best = self._grid_search(trials, ids, vectors, target_recall, k, 0)
        self._tune_deep(trials, ids, vectors, target_recall, deep_k, 0)
        self.add(ids[held], vectors[held])
        return best

    def _tune_on_own_vectors(self, vectors, target_recall, k, queries, rng, query_parts=None, deep_k=None) -> dict:
        import faiss

        k = min(k, len(vectors) - 1)  # a tiny index has fewer other items than k
        if not self.tunable() or k < 1:
            return {}
        deep_k = min(deep_k, len(vectors) - 1) if deep_k else None
        deepest = max(k, deep_k or 0)
        rows = rng.choice(len(vectors), min(queries, len(vectors)), replace=False)
        ids = self._id_positions()[0]
        selves = ids[rows][:, None]

        def others(found: np.ndarray, depth: int) -> list[np.ndarray]:  # the query's own vector does not count
            return [f[f != s][:depth] for f, s in zip(found, selves)]

        trials = []
        for q in _query_kinds(vectors[rows], query_parts):
            scores, positions = faiss.knn(q, vectors, deepest + 1, faiss.METRIC_INNER_PRODUCT)
            trials.append((q, others, np.array([s[p != r][:deepest] for s, p, r in zip(scores, positions, rows)])))
        best = self._grid_search(trials, ids, vectors, target_recall, k, 1)
        self._tune_deep(trials, ids, vectors, target_recall, deep_k, 1)
        return best

    def _tune_deep(self, kinds, ids, vectors, target_recall, deep_k, extra) -> None:
        """The breadth (efSearch, nprobe; at least the tuned values) that reaches the target at depth ``deep_k``,
        the other parameters as tuned: ``deep``. Nothing when the index has no breadth or deep_k is not deeper."""
        breadth = {name: [v for v in values if v >= self.params[name]]
                   for name, values in self.tunable().items() if name in BREADTH}
        if not breadth or not deep_k or deep_k <= 2 * TUNED_K:
            return
        tuned, recall = dict(self.params), self.recall
        fixed = {name: value for name, value in tuned.items() if name not in breadth}
        best = self._grid_search(kinds, ids, vectors, target_recall, deep_k, extra, {**{n: [v] for n, v in fixed.items()}, **breadth})
        self.deep = {"k": int(deep_k), "params": {name: best["params"][name] for name in breadth}, "recall": best["recall"]}
        self.set_params(**tuned)
        self.recall = recall

    def _grid_search(self, kinds: list[tuple], ids: np.ndarray, vectors: np.ndarray, target_recall: float, k: int,
                     extra: int, grid: dict[str, list[float]] | None = None) -> dict:
        """Try every parameter combination (``grid``, default ``tunable()``) on each kind of query (queries,
        results(found ids, depth), their exact top scores, best first): recall@k = the share of the exact top k
        found, where the items tied with the k-th best (to RECALL_EPSILON) are interchangeable: a search that
        misses the 6th best and returns an 11th item tied with the 10th scores 0.9; a combination's recall is
        its worst kind's. Each search fetches k + ``extra``. ``ids``/``vectors``: the items, aligned."""
        import itertools

        order = np.argsort(ids)
        grid = grid or self.tunable()
        trials = []
        for values in itertools.product(*grid.values()):
            self.set_params(**dict(zip(grid, values)))
            recalls, seconds, count = [], 0.0, 0
            for q, results, exact_top in kinds:
                t0 = time.perf_counter()
                found = results(self.search(q, k + extra)[1], k)  # as reads search: efSearch >= what is asked
                seconds, count = seconds + time.perf_counter() - t0, count + len(q)
                hits = []
                for i, f in enumerate(found):
                    f = f[f >= 0]
                    exact = vectors[order[np.searchsorted(ids, f, sorter=order)]] @ q[i]
                    hits.append(recall_at_k(exact, exact_top[i], k))
                recalls.append(float(np.mean(hits)))
            trials.append({"params": dict(zip(grid, values)), "recall": min(recalls), "ms_per_query": seconds / count * 1e3})
        good = [t for t in trials if t["recall"] >= target_recall]
        best = min(good, key=lambda t: t["ms_per_query"]) if good else max(trials, key=lambda t: t["recall"])
        self.set_params(**best["params"])
        self.recall = best["recall"]
        logger.log(logging.INFO if good else logging.WARNING, "tuned %s: %s -> recall@%d %.4g (target %g), %.3f ms/query",
                   self.factory, best["params"], k, best["recall"], target_recall, best["ms_per_query"])
        return best

    def _find(self, kind):
        """The first FAISS index of type ``kind`` inside the IDMap/PreTransform/Refine wrappers."""
        import faiss

        index = faiss.downcast_index(self.faiss_index.index)
        while index is not None:
            if isinstance(index, kind):
                return index
            if isinstance(index, faiss.IndexRefine):
                index = faiss.downcast_index(index.base_index)
            elif isinstance(index, faiss.IndexPreTransform):
                index = faiss.downcast_index(index.index)
            else:
                return None
        return None

    # ---------------------------------------------------------------- search

    def remove(self, ids: np.ndarray) -> int:
        """Remove entries by id (ids it does not hold are ignored); returns how many went.

        Graph indexes (HNSW, Refine) cannot drop entries: theirs are marked deleted instead and
        left out of every search; ``IndexSet`` rebuilds such an index when too many are.
        """
        import faiss

        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if self.removes_in_place:
            removed = int(self.faiss_index.remove_ids(faiss.IDSelectorBatch(ids)))
        else:
            held = self._id_positions()[0]
            fresh = np.setdiff1d(ids[np.isin(ids, held)], self.deleted)
            self.deleted = np.union1d(self.deleted, fresh)
            removed = len(fresh)
        self._positions = self._live = None
        return removed

    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, ids) per query, best first; ids are -1 where fewer than k exist.

        ``allowed``: only these ids may be returned (a filter). Small sets are scored
        exactly from the stored vectors; larger ones go through a FAISS IDSelector, and if
        the approximate search finds fewer than k allowed items, exactly again: a filtered
        query returns k results whenever k items match. Entries marked deleted never come back.
        A read deeper than the tuned page uses the breadth tuned for depth (``deep``).
        """
        queries = self._check(queries)
        breadth = self._breadth(k)
        if len(self.deleted):
            if allowed is None:
                return self._search_live(queries, k, breadth)
            allowed = np.setdiff1d(np.asarray(allowed, np.int64), self.deleted)
        if allowed is None:
            return self._search_positions(queries, k, None, breadth=breadth) if breadth else self.faiss_index.search(queries, k)
        import faiss

        allowed = np.ascontiguousarray(allowed, dtype=np.int64)
        ivf = self._find(faiss.IndexIVF)  # IVF cannot read vectors back by id; it scans all its lists instead
        if len(allowed) <= self.exact_filter_below and ivf is None:
            return self._exact(queries, k, allowed)
        scores, found = self._selected(queries, k, allowed, len(allowed) <= self.exact_filter_below, breadth)
        short = (found < 0).any(axis=1) & (len(allowed) >= k)
        if short.any():
            scores[short], found[short] = self._selected(queries[short], k, allowed, True) if ivf else self._exact(queries[short], k, allowed)
        return scores, found

    def _breadth(self, k: int) -> dict | None:
        """The breadth for a read of depth k: None (as set) up to twice the tuned depth, else the breadth tuned
        for ``deep["k"]``, raised in proportion for reads deeper still, and never below what ``set_params`` set.
        An HNSW graph's efSearch is at least the number of results asked of it (k, times a Refine's k_factor):
        below that FAISS stops short (efSearch 128 asked for 1,010 of 1,020 items returned 784), and an item
        inserted late by an upsert was missed where a fresh build found it."""
        breadth = {}
        if self.deep is not None and k > 2 * TUNED_K:
            scale = max(1.0, k / self.deep["k"])
            breadth = {name: max(int(np.ceil(value * scale)), int(self.params.get(name, 0))) for name, value in self.deep["params"].items()}
        if self._hnsw is not None:
            asked = int(np.ceil(k * (self._refine.k_factor if self._refine is not None else 1)))
            if asked > breadth.get("efSearch", self._hnsw.hnsw.efSearch):
                breadth["efSearch"] = asked
        return breadth or None

    def _selected(self, queries: np.ndarray, k: int, allowed: np.ndarray, exhaustive: bool = False,
                  breadth: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Search the inner index with an IDSelector over the allowed positions.

        IDMap2 would pass the selector on as plain SearchParameters, which IVF, HNSW and
        Refine reject; so the selector goes to the inner index, typed for each level,
        and positions are mapped back to ids here. ``exhaustive``: IVF probes every list.
        """
        ids = self._id_positions()[0]
        return self._search_positions(queries, k, self._selector(self._positions_of(allowed), len(ids)), exhaustive, breadth)

    def _positions_of(self, wanted: np.ndarray) -> np.ndarray:
        ids, sorted_ids, order = self._id_positions()
        if order is None:  # ids are the positions 0..n-1
            return wanted[(wanted >= 0) & (wanted < len(ids))]
        at = np.clip(np.searchsorted(sorted_ids, wanted), 0, max(len(ids) - 1, 0))
        return order[at[sorted_ids[at] == wanted]]

    @staticmethod
    def _selector(positions: np.ndarray, n: int):
        import faiss

        if len(positions) > n // 64:  # dense: a bitmap (n/8 bytes) is cheaper to build and probe than a hash set
            mask = np.zeros(n, bool)
            mask[positions] = True
            bits = np.packbits(mask, bitorder="little")
            selector = faiss.IDSelectorBitmap(n, faiss.swig_ptr(bits))
            selector.bits_array = bits  # the selector only points at the bits: keep them alive with it
            return selector
        return faiss.IDSelectorBatch(np.ascontiguousarray(positions, dtype=np.int64))

    def _search_positions(self, queries: np.ndarray, k: int, selector, exhaustive: bool = False,
                          breadth: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
        import faiss

        ids = self._id_positions()[0]
        inner = faiss.downcast_index(self.faiss_index.index)
        params = _typed_params(inner, selector, exhaustive, breadth)
        scores, pos = inner.search(queries, k, params=params)
        found = np.where(pos >= 0, ids[np.clip(pos, 0, None)], -1)
        return scores, found

    def _search_live(self, queries: np.ndarray, k: int, breadth: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
        """An unfiltered search of an index with entries marked deleted: every live entry allowed."""
        if self._live is None:
            n = len(self._id_positions()[0])
            dead = np.zeros(n, bool)
            dead[self._positions_of(self.deleted)] = True
            self._live = self._selector(np.flatnonzero(~dead), n)
        import faiss

        scores, found = self._search_positions(queries, k, self._live, breadth=breadth)
        short = (found < 0).any(axis=1) & (len(self) >= k)
        if short.any():  # the search ran out among deleted entries: every IVF list, or the live vectors exactly
            ivf = self._find(faiss.IndexIVF) is not None
            scores[short], found[short] = (self._search_positions(queries[short], k, self._live, True) if ivf
                                           else self._exact(queries[short], k, self.ids()))
        return scores, found

    def _id_positions(self) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """(id per FAISS position, the ids sorted, the positions in that order), or (ids, None,
        None) when the ids are the positions themselves; cached until add/remove."""
        import faiss

        if self._positions is None:
            ids = faiss.vector_to_array(self.faiss_index.id_map)
            if np.array_equal(ids, np.arange(len(ids))):
                self._positions = (ids, None, None)
            else:
                order = np.argsort(ids, kind="stable")
                self._positions = (ids, ids[order], order)
        return self._positions

    def _exact(self, queries: np.ndarray, k: int, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ids = self._id_positions()[0][np.sort(self._positions_of(np.asarray(ids, np.int64)))]  # only ids it holds
        scores = np.full((len(queries), k), -np.inf, np.float32)
        found = np.full((len(queries), k), -1, np.int64)
        if len(ids):
            vectors = self.reconstruct(ids)
            sims = queries @ vectors.T
            top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
            scores[:, :top.shape[1]] = np.take_along_axis(sims, top, 1)
            found[:, :top.shape[1]] = ids[top]
        return scores, found

    def reconstruct(self, ids: np.ndarray) -> np.ndarray:
        """The stored vectors of these ids (as the index keeps them: exact for Flat and Refine(Flat))."""
        import faiss

        ids = np.ascontiguousarray(ids, dtype=np.int64)
        try:
            return self.faiss_index.reconstruct_batch(ids)
        except RuntimeError:
            ivf = self._find(faiss.IndexIVF)
            if ivf is None:
                raise
            ivf.set_direct_map_type(faiss.DirectMap.Hashtable)  # IVF reads back by id only with a direct map
            return self.faiss_index.reconstruct_batch(ids)

    def _check(self, vectors: np.ndarray) -> np.ndarray:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise QueryError(f"expected vectors of shape (n, {self.dim}), got {vectors.shape}")
        if not np.isfinite(vectors).all():
            raise QueryError("vectors contain NaN or infinity")
        return vectors

    # ---------------------------------------------------------------- files

    def describe(self) -> dict:
        """What the manifest records: factory, width, count, deleted entries, tuned parameters and their recall."""
        return {"factory": self.factory, "dim": self.dim, "count": len(self), "deleted": len(self.deleted),
                "params": dict(self.params), "recall_at_10": self.recall, "deep": self.deep}

    def save(self, path: str | Path) -> None:
        """Write the FAISS index to ``path`` and, if entries are marked deleted, their ids beside it."""
        import faiss

        faiss.write_index(self.faiss_index, str(path))
        if len(self.deleted):
            np.save(_deleted_path(path), self.deleted, allow_pickle=False)

    @classmethod
    def load(cls, path: str | Path, factory: str, exact_filter_below: int = 20_000, params: dict | None = None,
             deep: dict | None = None) -> VectorIndex:
        import faiss

        try:
            loaded = faiss.read_index(str(path))
        except RuntimeError as exc:
            raise IndexLoadError(f"{path}: not a readable FAISS index: {str(exc).splitlines()[-1]}") from exc
        index = cls.__new__(cls)
        index.dim, index.factory, index.exact_filter_below = int(loaded.d), factory, exact_filter_below
        index.faiss_index, index.params, index.recall, index._positions, index._live = loaded, {}, None, None, None
        index.deep = deep  # None in saves from before depth tuning: every read uses the tuned parameters
        deleted = _deleted_path(path)
        index.deleted = np.load(deleted, allow_pickle=False) if deleted.is_file() else np.zeros(0, np.int64)
        index._build_settings()
        if params:
            index.set_params(**params)  # not stored by write_index (efSearch is, nprobe and k_factor are not)
        return index


def _deleted_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.stem + ".deleted.npy")


def _typed_params(index, selector, exhaustive: bool = False, breadth: dict | None = None):
    """SearchParameters of the type each FAISS level expects, carrying the selector (or None) and the
    breadth of this search (``VectorIndex._breadth``; the index's own settings where absent) down."""
    import faiss

    breadth = breadth or {}
    if isinstance(index, faiss.IndexRefine):
        base = faiss.downcast_index(index.base_index)
        return faiss.IndexRefineSearchParameters(k_factor=index.k_factor, base_index_params=_typed_params(base, selector, exhaustive, breadth))
    if isinstance(index, faiss.IndexPreTransform):
        return faiss.SearchParametersPreTransform(index_params=_typed_params(faiss.downcast_index(index.index), selector, exhaustive, breadth))
    if isinstance(index, faiss.IndexHNSW):
        return faiss.SearchParametersHNSW(sel=selector, efSearch=int(breadth.get("efSearch", index.hnsw.efSearch)))
    if isinstance(index, faiss.IndexIVF):
        nprobe = index.nlist if exhaustive else min(int(breadth.get("nprobe", index.nprobe)), index.nlist)
        return faiss.SearchParametersIVF(sel=selector, nprobe=nprobe)
    return faiss.SearchParameters(sel=selector)


SPACES = ("joint", "clip_image", "clip_text")  # fused vectors; zero-shot vectors of item images and of item texts


class IndexSet:
    """A retriever's vector indexes, one per space, all keyed by the items' int64 keys.

    ``joint`` holds every item's fused vector; ``clip_image`` and ``clip_text`` hold the
    zero-shot vectors of the items that have an image, respectively a text.
    """

    def __init__(self, config, deep_k: int | None = None) -> None:
        self.config = config  # an IndexConfig
        self.deep_k = deep_k  # how deep the deepest common read goes (search.hybrid_depth): tuned for too
        self.by_space: dict[str, VectorIndex] = {}

    def __bool__(self) -> bool:
        return bool(self.by_space)

    def __getitem__(self, space: str) -> VectorIndex:
        return self.by_space[space]

    def create(self, dims: dict[str, int], n_items: int) -> None:
        """New empty indexes of the configured kind (``auto``: chosen by size and memory budget)."""
        for space, dim in dims.items():
            self.by_space[space] = VectorIndex(dim, self.factory_for(n_items, dim), self.config.exact_filter_below)

    def factory_for(self, n_items: int, dim: int) -> str:
        """The configured index kind for this many items (``auto``: chosen by size and memory budget)."""
        ic = self.config
        return choose_factory(n_items, dim, ic.memory_budget_gb * 1e9) if ic.factory == "auto" else ic.factory

    def stale(self, n_items: int) -> list[str]:
        """The spaces whose index should be rebuilt: the share of its entries marked deleted passed
        ``index.compact_deleted_share``, or the automatic choice differs from its kind for
        ``n_items``, and for 10% fewer and 10% more (so a catalog hovering around a threshold is
        not rebuilt back and forth)."""
        def moved(index: VectorIndex) -> bool:
            want = self.factory_for(n_items, index.dim)
            return index.factory != want and all(self.factory_for(int(n_items * f), index.dim) == want for f in (0.9, 1.1))

        return [space for space, index in self.by_space.items() if moved(index) or index.deleted_share > self.config.compact_deleted_share]

    def rebuild(self, space: str, keys: np.ndarray, vectors: np.ndarray, n_items: int, query_parts=None) -> None:
        """A new index for ``space`` of the kind chosen for ``n_items``, built (and tuned) from these vectors."""
        old = self.by_space[space]
        factory = self.factory_for(n_items, old.dim)
        logger.info("rebuilding the %s index (%s -> %s, %d vectors, %d marked deleted)", space, old.factory, factory,
                    len(keys), len(old.deleted))
        index = VectorIndex(old.dim, factory, self.config.exact_filter_below)
        if len(keys):
            index.build(keys, vectors, self.config.target_recall, query_parts=query_parts, deep_k=self.deep_k)
        self.by_space[space] = index

    def fill(self, space: str, keys: np.ndarray, vectors: np.ndarray, query_parts=None) -> None:
        """Add to an index; a new approximate index is then tuned to the target recall on its own vectors
        (and on their ``query_parts`` alone: see ``VectorIndex.build``)."""
        index = self.by_space[space]
        if len(index) == 0:
            index.build(keys, vectors, self.config.target_recall, query_parts=query_parts, deep_k=self.deep_k)
        else:
            index.add(keys, vectors)

    def fill_joint(self, keys: np.ndarray, fuse, query_parts=None, chunk: int = 16_384) -> None:
        """Fuse and add to the joint index; ``fuse(rows)`` gives the joint vectors of those rows of ``keys``;
        ``query_parts``: the fusion's image and text blocks, which photo and word queries meet alone.

        Chunk by chunk, so a large catalog never holds all its joint vectors twice, except
        where a new approximate index must be tuned on all of them."""
        index = self.by_space["joint"]
        if len(index) == 0 and index.tunable():
            self.fill("joint", keys, fuse(slice(None)), query_parts)
            return
        for start in range(0, len(keys), chunk):
            rows = slice(start, start + chunk)
            index.add(keys[rows], fuse(rows))

    def renew(self, space: str, dim: int) -> None:
        """An empty index of the same kind in place of ``space``'s (the fusion changed its vectors)."""
        old = self.by_space[space]
        self.by_space[space] = VectorIndex(dim, old.factory, self.config.exact_filter_below)

    def remove(self, keys: np.ndarray) -> None:
        """Remove items from every index (marked deleted where FAISS cannot remove; see ``stale``)."""
        for index in self.by_space.values():
            index.remove(keys)

    def vectors(self, space: str, keys: np.ndarray, present: np.ndarray | None = None) -> np.ndarray:
        """The stored vectors of these keys; zeros where ``present`` is False (not in that index)."""
        if present is None:
            return self.by_space[space].reconstruct(keys)
        out = np.zeros((len(keys), self.by_space[space].dim), np.float32)
        if present.any():
            out[present] = self.by_space[space].reconstruct(keys[present])
        return out

    def describe(self) -> dict:
        return {space: index.describe() for space, index in self.by_space.items()}

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for space, index in self.by_space.items():
            index.save(folder / f"{space}.faiss")

    @classmethod
    def load(cls, folder: str | Path, described: dict, config, deep_k: int | None = None) -> IndexSet:
        """The indexes saved in ``folder``, checked against their manifest record (``describe()``)."""
        folder = Path(folder)
        indexes = cls(config, deep_k)
        for space in SPACES:
            saved = described[space]
            index = VectorIndex.load(folder / f"{space}.faiss", saved["factory"], config.exact_filter_below, saved.get("params"),
                                     saved.get("deep"))
            index.recall = saved.get("recall_at_10")
            if index.dim != saved["dim"] or len(index) != saved["count"] or len(index.deleted) != saved.get("deleted", 0):
                raise IndexLoadError(f"{folder / space}.faiss does not match the manifest (dim or count)")
            indexes.by_space[space] = index
        return indexes
