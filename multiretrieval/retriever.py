"""The Retriever: a facade that wires the rooms together and delegates, one direction of data flow.

    catalog -> pipeline.ingest (Embedder) -> ItemStore (rows, features, keys) + IndexSet (FAISS per space)
    query   -> search.make_query -> search.run_query (Embedder, ItemStore, IndexSet) -> result rows
    files   -> persistence.write_folder / read_folder over each component's own save and load

Thread-safe: searches run concurrently; a write encodes first, then holds searches off while it
changes the store and the indexes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .catalog import Catalog, ImageInput
from .config import RetrieverConfig
from .embedder import Embedder
from .errors import MultiretrievalError, QueryError
from .index import SPACES, IndexSet
from .items import ItemStore
from .ingest import Encoded, IndexReport, ingest
from .persistence import MANIFEST, component_folder, component_record, read_folder, write_folder
from .search import MODES, encode_inputs, make_query, run_query
from .utils import ReadWriteLock

__all__ = ["MODES", "IndexReport", "Retriever"]
logger = logging.getLogger(__name__)


class Retriever:
    """Multimodal product retrieval over one catalog.

    Args:
        config: a :class:`RetrieverConfig` (default: the packaged offline models; ``configs/default.yaml``).
        embedder: the models (default: an :class:`Embedder` of ``config``; they load on first use).
    """

    def __init__(self, config: RetrieverConfig | None = None, embedder: Embedder | None = None) -> None:
        self.embedder = embedder or Embedder(config)
        self.store = ItemStore()
        self.indexes = IndexSet(self.config.index)
        self.last_report: IndexReport | None = None  # of the latest index/add; saved as index-report.json
        self._lock = ReadWriteLock()

    @classmethod
    def from_config(cls, path: str | Path) -> Retriever:
        return cls(RetrieverConfig.from_yaml(path))

    @property
    def config(self) -> RetrieverConfig:
        return self.embedder.config

    @config.setter
    def config(self, config: RetrieverConfig) -> None:  # e.g. other training settings; loaded models stay
        self.embedder.config = config

    image_encoder = property(lambda self: self.embedder.image_encoder)
    text_encoder = property(lambda self: self.embedder.text_encoder)
    fusion = property(lambda self: self.embedder.fusion)
    zero_shot = property(lambda self: self.embedder.zero_shot)

    # ---------------------------------------------------------------- the indexed items

    def __len__(self) -> int:
        return len(self.store)

    @property
    def items(self) -> pd.DataFrame:
        """The indexed catalog rows (public columns only)."""
        return self.store.public()

    def features(self) -> dict[str, np.ndarray]:
        """The encoder outputs, row-aligned with ``items``: image/text tokens and masks (token 0: pooled; fusion.py)."""
        return dict(self.store.features)

    def vectors(self, space: str = "joint", ids: list[Any] | None = None) -> np.ndarray:
        """Stored vectors (n, d) of the items (all, in ``items`` order, or these ids) in a space:
        "joint", "clip_image" or "clip_text"; zeros for an item without that modality."""
        if space not in SPACES:
            raise QueryError(f"unknown space {space!r}; choose one of {list(SPACES)}")
        with self._lock.reading():
            keys = self.store.keys if ids is None else self.store.keys_for(list(ids))
            return self.indexes.vectors(space, keys, None if space == "joint" else self.store.has(space, keys))

    def get(self, item_id: Any) -> dict[str, Any]:
        """One indexed item's catalog row as a dict."""
        return self._reading(self.store.get, item_id)

    def image_source(self, item_id: Any) -> str | None:
        """The resolved image path or URL of an indexed item (None if it has no image)."""
        return self._reading(self.store.image_source, item_id)

    def image_sources(self) -> pd.Series:
        """The resolved image path or URL of every indexed item (None where it has none), by id."""
        return self._reading(self.store.image_sources)

    def _reading(self, read, *args):
        with self._lock.reading():
            return read(*args)

    # ---------------------------------------------------------------- writes

    def index(self, catalog: Catalog | pd.DataFrame | str | Path, show_progress: bool | None = None,
              cache: str | Path | None = None, engine: str | None = None) -> IndexReport:
        """Index a catalog from scratch, replacing what this retriever held once every row is encoded.

        ``cache``: a folder of encoded shards, reused by later runs and resumed after a kill
        (default: a temporary one); ``engine``: "local" or "ray" (see ``ingest.ingest``).
        """
        return self._ingest(Catalog.of(catalog, self.config.catalog.text_columns), show_progress, cache, engine, replace=True)

    def add(self, catalog: Catalog | pd.DataFrame | str | Path, show_progress: bool | None = None,
            cache: str | Path | None = None, engine: str | None = None) -> IndexReport:
        """Encode and add more items (``cache``, ``engine``: as for ``index``); rows that fail are reported and skipped.
        Raises CatalogError when an id is already indexed, or an id or a value does not fit the indexed ones."""
        catalog = Catalog.of(catalog, self.config.catalog.text_columns)
        with self._lock.reading():
            self.store.conform(catalog)  # refuse before encoding; checked again when committed
        return self._ingest(catalog, show_progress, cache, engine, replace=False)

    def _ingest(self, catalog: Catalog, show_progress, cache, engine, replace: bool, embedder: Embedder | None = None) -> IndexReport:
        # The retriever changes only after every row is encoded: an error or Ctrl-C midway leaves it as it was.
        embedder = embedder or self.embedder
        encoded, report = ingest(catalog, embedder, show_progress, cache, engine)
        t0 = time.perf_counter()
        with self._lock.writing():
            store, indexes = (ItemStore(), IndexSet(embedder.config.index)) if replace else (self.store, self.indexes)
            if not replace:
                store.conform(catalog)
            self._commit(catalog, encoded, embedder, store, indexes)
            self.embedder, self.store, self.indexes = embedder, store, indexes
        report.indexed = len(encoded.rows)
        report.seconds["index"] = time.perf_counter() - t0
        self.last_report = report
        logger.info("%s", report)
        return report

    @staticmethod
    def _commit(catalog: Catalog, encoded: Encoded, embedder: Embedder, store: ItemStore, indexes: IndexSet) -> None:
        """Add the encoded rows to the store, their zero-shot vectors and fused joint vectors to the indexes."""
        arrays = encoded.arrays
        if not indexes:
            dim = embedder.zero_shot.dim
            indexes.create({"joint": embedder.fusion.out_dim, "clip_image": dim, "clip_text": dim}, len(store) + len(encoded.rows))
        keys = store.append(catalog.df.iloc[encoded.rows], [encoded.sources[r] for r in encoded.rows], arrays)
        for space, present in (("clip_image", arrays["image_mask"][:, 0]), ("clip_text", arrays["text_mask"][:, 0])):
            vectors = arrays.pop(space)  # not kept: freed once in the index (the peak of a large run)
            if present.any():
                indexes.fill(space, keys[present], vectors if present.all() else vectors[present])
            del vectors
        indexes.fill_joint(keys, lambda rows: embedder.fuse(arrays, rows))

    def remove(self, ids: Any) -> int:
        """Remove items by catalog id. Unknown ids raise ItemNotFoundError and nothing is removed."""
        ids = [ids] if isinstance(ids, (str, int, np.integer)) else list(ids)
        with self._lock.writing():
            keys = self.store.keys_for(ids)
            self.indexes.remove(keys)
            self.store.remove(keys)
        return len(keys)

    def train(self, out: str | Path | None = None, show_progress: bool | None = None, resume: bool = True) -> dict[str, Any]:
        """Fit the attention fusion on the indexed items' own image/text pairs, switch to it, re-embed.

        ``out``: folder for the module and its checkpoints (default: a temporary one; ``save``
        stores the module with the index either way); ``resume``: continue a run found there.
        Returns the training report (loss and validation recall per epoch).
        """
        from .training import fit_on_catalog

        if not len(self):
            raise QueryError("nothing is indexed yet: call index(catalog) first")
        with self._lock.reading():
            catalog = self.store.catalog(self.config.catalog.text_columns)
        report, trained, out = fit_on_catalog(catalog, self.config, out, show_progress, resume)
        old = self.embedder.fusion
        if (trained.image_grid, trained.text_chunks) != (old.image_grid, old.text_chunks):  # other token layout: encode again
            config = dataclasses.replace(self.config, fusion=dataclasses.replace(self.config.fusion, kind="attention", weights=str(out)))
            self._ingest(catalog, show_progress, None, None, replace=True, embedder=Embedder(config))
            return report
        with self._lock.writing():
            self.embedder.use_fusion(trained, out)
            self.indexes.renew("joint", trained.out_dim)
            self.indexes.fill_joint(self.store.keys, lambda rows: self.embedder.fuse(self.store.features, rows))
        return report

    # ---------------------------------------------------------------- queries

    def search(self, image: ImageInput | None = None, text: str | None = None, mode: str = "auto", k: int = 10,
               where: str | None = None, unsafe_where: bool = False) -> pd.DataFrame:
        """The k best items for a photo (path, URL, bytes or PIL image), a text, or both.

        ``mode``: "auto" (image+text -> fused, image -> image, text -> text), "image", "text",
        "fused", or "zero-shot" (a text against item images, an image against item texts).
        ``where``: a condition over catalog columns (grammar: filters.py), applied before ranking (k
        results come back whenever k items match) and stopped after ``search.filter_timeout_s``;
        ``unsafe_where=True``: any DuckDB expression, for trusted callers. Returns a DataFrame: rank,
        id, score, the catalog columns; fused queries under late fusion also get image_score + text_score.
        """
        query = make_query(image, text, mode, k, where, self.config, self.embedder.count_tokens, unsafe_where)
        with self._lock.reading():
            return run_query(query, self.embedder, self.store, self.indexes)

    def encode(self, images: list[ImageInput] | None = None, texts: list[str] | None = None, space: str = "joint",
               batch_size: int | None = None) -> np.ndarray:
        """Images, texts, or (image, text) pairs -> float32 (n, d), L2-normalised, in the fused space
        ("joint": pairs when both are given) or the zero-shot space ("clip": images or texts, not pairs)."""
        pils, texts = encode_inputs(images, texts, space, self.config)
        with self._lock.reading():
            return self.embedder.embed(pils, texts, space, batch_size)

    # ---------------------------------------------------------------- files

    def save(self, folder: str | Path) -> Path:
        """Save to a folder, atomically: a crash leaves the previous save intact (see persistence.py)."""
        with self._lock.reading():
            if not self.indexes:
                raise MultiretrievalError("nothing to save: index a catalog first")
            records = {"config": self.config.to_dict(), **self.embedder.describe(), "index": self.indexes.describe(),
                       "items": self.store.describe()}
            report = {"index-report.json": json.dumps(self.last_report.to_dict(), indent=1, default=str)} if self.last_report else {}
            parts = {"items": self.store.save, "index": self.indexes.save, "fusion": self.embedder.save}
            return write_folder(Path(folder), parts, records, report)

    @classmethod
    def load(cls, folder: str | Path, config: RetrieverConfig | str | Path | None = None) -> Retriever:
        """Load a saved retriever; ``config``, if given, must name the same encoders and zero-shot kind."""
        folder = Path(folder)
        config = RetrieverConfig.from_yaml(config) if isinstance(config, (str, Path)) else config
        manifest = read_folder(folder)
        if config is not None:
            Embedder.check_config(config, manifest, str(folder))
        embedder = Embedder(config or RetrieverConfig.from_dict(manifest["config"], source=str(folder / MANIFEST)),
                            expect=Embedder.expectations(manifest))
        embedder.load(component_folder(folder, manifest, "fusion"))
        retriever = cls(embedder=embedder)
        retriever.store = ItemStore.load(component_folder(folder, manifest, "items"), component_record(manifest, "items"))
        retriever.indexes = IndexSet.load(component_folder(folder, manifest, "index"), manifest["index"], embedder.config.index)
        return retriever
