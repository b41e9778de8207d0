"""The vector index: FAISS by index_factory string, inner product, int64 ids.

Vectors are L2-normalised, so inner product is cosine similarity. The index is wrapped
in IDMap2, so ids are the caller's int64 keys, items can be removed, and vectors can be
read back for exact scoring of small filtered sets.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from .errors import IndexLoadError, QueryError

logger = logging.getLogger(__name__)


def choose_factory(n_vectors: int) -> str:
    """The index_factory string "auto" stands for: exact Flat for small catalogs, HNSW above."""
    return "Flat" if n_vectors <= 100_000 else "HNSW32"


class VectorIndex:
    """A FAISS index over ``dim``-d vectors with int64 ids.

    Args:
        dim: vector width.
        factory: an index_factory string ("Flat", "HNSW32", "IVF1024,Flat", ...), without
            the IDMap part, which is added.
    """

    def __init__(self, dim: int, factory: str = "Flat", exact_filter_below: int = 20_000) -> None:
        import faiss

        self.dim, self.factory, self.exact_filter_below = int(dim), factory, exact_filter_below
        try:
            self.faiss_index = faiss.index_factory(self.dim, f"IDMap2,{factory}", faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as exc:
            raise QueryError(f"invalid FAISS index_factory string {factory!r}: {str(exc).splitlines()[-1]}") from exc

    def __len__(self) -> int:
        return int(self.faiss_index.ntotal)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        vectors = self._check(vectors)
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if len(ids) != len(vectors):
            raise ValueError(f"{len(ids)} ids for {len(vectors)} vectors")
        if not self.faiss_index.is_trained:
            logger.info("training %s index on %d vectors", self.factory, len(vectors))
            self.faiss_index.train(vectors)
        self.faiss_index.add_with_ids(vectors, ids)

    def set_params(self, **params: float) -> None:
        """Set search-time parameters by FAISS name (efSearch for HNSW, nprobe for IVF)."""
        import faiss

        space = faiss.ParameterSpace()
        for name, value in params.items():
            try:
                space.set_index_parameter(self.faiss_index, name, value)
            except RuntimeError as exc:
                raise QueryError(f"index {self.factory!r} has no search parameter {name!r}") from exc

    def remove(self, ids: np.ndarray) -> int:
        import faiss

        ids = np.ascontiguousarray(ids, dtype=np.int64)
        return int(self.faiss_index.remove_ids(faiss.IDSelectorBatch(ids)))

    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, ids) per query, best first; ids are -1 where fewer than k exist.

        ``allowed``: only these ids may be returned (a filter). Small sets are scored
        exactly from the stored vectors; larger ones go through a FAISS IDSelector.
        """
        import faiss

        queries = self._check(queries)
        if allowed is None:
            return self.faiss_index.search(queries, k)
        allowed = np.ascontiguousarray(allowed, dtype=np.int64)
        if len(allowed) <= self.exact_filter_below:
            return self._exact(queries, k, allowed)
        params = faiss.SearchParameters(sel=faiss.IDSelectorBatch(allowed))
        return self.faiss_index.search(queries, k, params=params)

    def _exact(self, queries: np.ndarray, k: int, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        scores = np.full((len(queries), k), -np.inf, np.float32)
        found = np.full((len(queries), k), -1, np.int64)
        if len(ids):
            vectors = self.faiss_index.reconstruct_batch(ids)
            sims = queries @ vectors.T
            top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
            scores[:, :top.shape[1]] = np.take_along_axis(sims, top, 1)
            found[:, :top.shape[1]] = ids[top]
        return scores, found

    def reconstruct(self, ids: np.ndarray) -> np.ndarray:
        return self.faiss_index.reconstruct_batch(np.ascontiguousarray(ids, dtype=np.int64))

    def _check(self, vectors: np.ndarray) -> np.ndarray:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise QueryError(f"expected vectors of shape (n, {self.dim}), got {vectors.shape}")
        if not np.isfinite(vectors).all():
            raise QueryError("vectors contain NaN or infinity")
        return vectors

    def save(self, path: str | Path) -> None:
        import faiss

        faiss.write_index(self.faiss_index, str(path))

    @classmethod
    def load(cls, path: str | Path, factory: str, exact_filter_below: int = 20_000) -> VectorIndex:
        import faiss

        try:
            loaded = faiss.read_index(str(path))
        except RuntimeError as exc:
            raise IndexLoadError(f"{path}: not a readable FAISS index: {str(exc).splitlines()[-1]}") from exc
        index = cls.__new__(cls)
        index.dim, index.factory, index.exact_filter_below = int(loaded.d), factory, exact_filter_below
        index.faiss_index = loaded
        return index
