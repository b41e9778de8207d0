"""The Retriever: index a catalog, search it four ways, save and load it.

Data flows one way: catalog rows -> the ingestion pipeline (pipeline.py: content hash,
image decoding in threads, encoders -> image tokens + ImageNet probabilities, text
tokens, zero-shot vectors, written as cached shards) -> fusion (joint vectors) -> three
FAISS indexes. Queries take the same encoders and end in a FAISS top-k over the ids a
DuckDB ``where`` filter allows.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .catalog import Catalog, ImageInput, SkippedRow, conform_ids, conform_rows, load_image, plain
from .config import RetrieverConfig
from .errors import CatalogError, ConfigError, ImageError, ItemNotFoundError, LimitError, QueryError
from .utils import ReadWriteLock, progress

logger = logging.getLogger(__name__)

MODES = ("auto", "image", "text", "fused", "zero-shot")
SPACES = ("joint", "clip")
KEY = "_key"  # internal int64 FAISS id of an item; never reused
IMAGE_SOURCE = "_image_source"  # the item's image path or URL, resolved at index time


@dataclass
class IndexReport:
    """What ``index``/``add`` did: counts, per-stage seconds, and every skipped row with its reason."""

    indexed: int = 0
    skipped: list[SkippedRow] = field(default_factory=list)
    encoded: int = 0  # distinct contents encoded in this run
    cached: int = 0  # distinct contents taken from the shard cache (unchanged since an earlier run)
    seconds: dict[str, float] = field(default_factory=lambda: {"hash": 0.0, "encode": 0.0, "index": 0.0})

    @property
    def total_seconds(self) -> float:
        return sum(self.seconds.values())

    @property
    def items_per_second(self) -> float:
        return self.indexed / self.total_seconds if self.total_seconds else 0.0

    def skipped_frame(self) -> pd.DataFrame:
        return pd.DataFrame([vars(s) for s in self.skipped], columns=["row", "id", "reason"])

    def to_dict(self) -> dict[str, Any]:
        return {"indexed": self.indexed, "encoded": self.encoded, "cached": self.cached,
                "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
                "skipped": [{"row": s.row, "id": s.id, "reason": s.reason} for s in self.skipped]}

    def __str__(self) -> str:
        stages = ", ".join(f"{k} {v:.1f} s" for k, v in self.seconds.items())
        lines = [f"indexed {self.indexed} items in {self.total_seconds:.1f} s ({self.items_per_second:.1f} items/s; {stages}); "
                 f"encoded {self.encoded}, from cache {self.cached}, skipped {len(self.skipped)}"]
        lines += [f"  {s}" for s in self.skipped]
        return "\n".join(lines)


class Retriever:
    """Multimodal product retrieval over one catalog.

    Args:
        config: a :class:`RetrieverConfig` (default: the packaged offline models, late
            fusion, ConSE zero-shot, automatic FAISS index).

    Models load on first use and are shared between retrievers in a process. One retriever
    may be used from many threads: searches run concurrently, and a write (index, add,
    remove, train) waits for them, then holds them off while it changes the item table and
    the indexes (encoding runs before that, without blocking searches).
    """

    def __init__(self, config: RetrieverConfig | None = None) -> None:
        import threading

        self.config = config or RetrieverConfig()
        self._lock = ReadWriteLock()  # the item table, features and indexes
        self._lazy = threading.RLock()  # models and the DuckDB table, built on first use
        self._image_encoder = self._text_encoder = self._fusion = self._zero_shot = None
        self._expected_dims: dict[str, Any] = {}  # set by load(): encoder dims and zero-shot fingerprint of the index
        self.last_report: IndexReport | None = None  # of the latest index/add; saved as index-report.json
        self._reset()

    @classmethod
    def from_config(cls, path: str | Path) -> Retriever:
        return cls(RetrieverConfig.from_yaml(path))

    def _reset(self) -> None:
        self._items = pd.DataFrame({KEY: pd.Series(dtype="int64")})
        self._features: dict[str, np.ndarray] = {}
        self._indexes: dict[str, Any] = {}
        self._next_key = 0
        self._changed()

    def _changed(self) -> None:
        """Drop what is derived from the item table: the DuckDB copy and the column arrays."""
        self._duck = None
        self._columns: tuple[np.ndarray, pd.DataFrame] | None = None

    # ---------------------------------------------------------------- models

    @property
    def image_encoder(self):
        with self._lazy:
            return self._load_image_encoder()

    def _load_image_encoder(self):
        if self._image_encoder is None:
            from .encoders import get_image_encoder

            enc = self.config.encoders
            self._image_encoder = self._check_dim("image", get_image_encoder(enc.image, enc.image_weights, enc.runtime))
        return self._image_encoder

    @property
    def text_encoder(self):
        with self._lazy:
            return self._load_text_encoder()

    def _load_text_encoder(self):
        if self._text_encoder is None:
            from .encoders import get_text_encoder

            enc = self.config.encoders
            self._text_encoder = self._check_dim("text", get_text_encoder(enc.text, enc.text_weights, enc.max_text_tokens, enc.runtime))
        return self._text_encoder

    def _check_dim(self, part: str, encoder):
        expected = self._expected_dims.get(part)
        if expected is not None and encoder.dim != expected:
            raise ConfigError(f"the {part} encoder {encoder.name!r} gives {encoder.dim}-d vectors, but the index was built with {expected}-d")
        return encoder

    @property
    def fusion(self):
        with self._lazy:
            return self._load_fusion()

    def _load_fusion(self):
        if self._fusion is None:
            from .fusion import build_fusion

            self._fusion = build_fusion(self.config.fusion, self.image_encoder.dim, self.text_encoder.dim)
        return self._fusion

    @property
    def zero_shot(self):
        with self._lazy:
            return self._load_zero_shot()

    def _load_zero_shot(self):
        if self._zero_shot is None:
            from .encoders.clip import build_zero_shot

            space = build_zero_shot(self.config.zero_shot, self.image_encoder, self.text_encoder)
            expected = self._expected_dims.get("zero_shot")
            if expected is not None and space.fingerprint != expected:
                raise ConfigError(f"the zero-shot space is now {space.fingerprint}, but the index was built with {expected}: "
                                  "re-index, or configure the space it was built with")
            self._zero_shot = space
        return self._zero_shot

    # ---------------------------------------------------------------- indexing

    def __len__(self) -> int:
        return len(self._items)

    @property
    def items(self) -> pd.DataFrame:
        """The indexed catalog rows (public columns only)."""
        return self._public(self._items).reset_index(drop=True)

    def features(self) -> dict[str, np.ndarray]:
        """The encoder outputs of the indexed items, row-aligned with ``items``: image_tokens,
        image_mask, text_tokens, text_mask (token 0 = the pooled vector; see fusion.py)."""
        return dict(self._features)

    def index(self, catalog: Catalog | pd.DataFrame | str | Path, show_progress: bool | None = None,
              cache: str | Path | None = None, engine: str | None = None) -> IndexReport:
        """Index a catalog from scratch, replacing what this retriever held once every row is encoded.

        Args:
            cache: a folder for the encoded shards (see pipeline.py). Items whose image bytes
                and text are unchanged since a run with the same folder are not encoded
                again, and a killed run resumes from its last complete shard. Default: a
                temporary folder, removed afterwards.
            engine: "local" (default: ``ingest.engine``) or "ray" (Ray Data actors; see README).
        """
        return self._ingest(self._as_catalog(catalog), show_progress, True, cache, engine)

    def add(self, catalog: Catalog | pd.DataFrame | str | Path, show_progress: bool | None = None,
            cache: str | Path | None = None, engine: str | None = None) -> IndexReport:
        """Encode and add more items (``cache``, ``engine``: as for ``index``). Rows that fail (bad image) are reported and skipped.

        Raises:
            CatalogError: an id of ``catalog`` is already indexed.
        """
        catalog = self._as_catalog(catalog)
        with self._lock.reading():
            self._conform(catalog)  # refuse before encoding; checked again when committed
        return self._ingest(catalog, show_progress, False, cache, engine)

    def _conform(self, catalog: Catalog) -> None:
        """Make new rows fit the indexed ones (id kind, column types) and refuse known ids, naming the rows."""
        if not len(self._items):
            return
        catalog.df = conform_rows(catalog.df.assign(id=conform_ids(catalog.df["id"], self._items["id"])), self._items)
        existing = set(self._items["id"].astype(str))
        clash = [i for i, v in enumerate(catalog.df["id"].astype(str)) if v in existing]
        if clash:
            raise CatalogError(f"row(s) {clash[:10]}: id {plain(catalog.df['id'].iloc[clash[0]])!r} is already indexed; remove it first")

    def _ingest(self, catalog: Catalog, show_progress: bool | None, replace: bool, cache, engine) -> IndexReport:
        # The retriever changes only after every row has been read and encoded:
        # an exception or Ctrl-C midway leaves it as it was.
        report = IndexReport()
        encoded = self._encode_catalog(catalog, report, show_progress, cache, engine)
        with self._lock.writing():
            if replace:
                self._reset()
            else:
                self._conform(catalog)
            self._commit(catalog, encoded, report)
        self.last_report = report
        logger.info("%s", report)
        return report

    def _feature_buffers(self, n: int) -> dict[str, np.ndarray]:
        """Zeroed token arrays and all-False masks for n items, shaped for the fusion module."""
        fusion, di, dt = self.fusion, self.image_encoder.dim, self.text_encoder.dim
        ti, tt = 1 + fusion.image_grid ** 2, 1 + fusion.text_chunks
        return {"image_tokens": np.zeros((n, ti, di), np.float32), "image_mask": np.zeros((n, ti), bool),
                "text_tokens": np.zeros((n, tt, dt), np.float32), "text_mask": np.zeros((n, tt), bool)}

    def _encode_catalog(self, catalog: Catalog, report: IndexReport, show_progress: bool | None,
                        cache: str | Path | None, engine: str | None) -> dict[str, Any]:
        """Reader, encoder and writer stages (pipeline.py), then the encoded rows in catalog order."""
        import tempfile
        from contextlib import nullcontext

        from .pipeline import Row, ShardStore, empty_arrays, encoder_fingerprint, hash_rows, run

        cfg = self.config
        sources, texts = catalog.image_sources(), catalog.texts()
        t0 = time.perf_counter()
        hashes = hash_rows(sources, texts, cfg.catalog.max_image_bytes, cfg.ingest.workers)
        report.seconds["hash"] = time.perf_counter() - t0
        rows = [Row(i, h, s, t) for i, (h, s, t) in enumerate(zip(hashes, sources, texts))]
        with nullcontext(cache) if cache is not None else tempfile.TemporaryDirectory(prefix="multiretrieval-shards-") as root:
            store = ShardStore.open(root, encoder_fingerprint(self))
            result = run(self, rows, store, cfg.ingest.shard_size, cfg.ingest.workers, engine or cfg.ingest.engine, show_progress)
            ok = np.array([i for i in range(len(rows)) if i not in result.errors], dtype=np.int64)
            t1 = time.perf_counter()
            arrays = store.gather([hashes[i] for i in ok]) if len(ok) else empty_arrays(self, 0)
        report.seconds["encode"] = result.seconds["encode"] + time.perf_counter() - t1
        report.encoded, report.cached = result.encoded, len(set(hashes)) - result.encoded
        report.skipped = [SkippedRow(row, plain(catalog.df["id"].iloc[row]), reason) for row, reason in sorted(result.errors.items())]
        return {"rows": ok, "sources": sources, **arrays}

    def _commit(self, catalog: Catalog, encoded: dict[str, Any], report: IndexReport) -> None:
        """Fuse, and add to the indexes and the item table (``encoded`` holds the good rows only)."""
        t0 = time.perf_counter()
        rows = encoded["rows"]
        keys = np.arange(self._next_key, self._next_key + len(rows), dtype=np.int64)
        feats = {name: encoded.pop(name) for name in ("image_tokens", "image_mask", "text_tokens", "text_mask")}
        has_image, has_text = feats["image_mask"][:, 0], feats["text_mask"][:, 0]

        self._ensure_indexes(len(self._items) + len(rows))
        for space, present in (("clip_image", has_image), ("clip_text", has_text)):
            vectors = encoded.pop(space)  # not kept: freed once in the index
            if present.any():
                self._fill(space, keys[present], vectors if present.all() else vectors[present])
            del vectors
        self._fill_joint(keys, feats)

        new_items = catalog.df.iloc[rows].copy()
        new_items[IMAGE_SOURCE] = [encoded["sources"][r] for r in rows]
        new_items.insert(0, KEY, keys)
        self._items = new_items if len(self._items) == 0 else pd.concat([self._items, new_items], ignore_index=True)
        for name, value in feats.items():
            self._features[name] = value if name not in self._features else np.concatenate([self._features[name], value])
        self._next_key += len(rows)
        self._changed()
        report.indexed = len(rows)
        report.seconds["index"] = time.perf_counter() - t0

    def _ensure_indexes(self, n_items: int) -> None:
        if not self._indexes:
            dims = {"joint": self.fusion.out_dim, "clip_image": self.zero_shot.dim, "clip_text": self.zero_shot.dim}
            self._indexes = {name: self._new_index(dim, n_items) for name, dim in dims.items()}

    def _new_index(self, dim: int, n_items: int):
        from .index import VectorIndex, choose_factory

        ic = self.config.index
        factory = choose_factory(n_items, dim, ic.memory_budget_gb * 1e9) if ic.factory == "auto" else ic.factory
        return VectorIndex(dim, factory, ic.exact_filter_below)

    def _fill(self, name: str, keys: np.ndarray, vectors: np.ndarray) -> None:
        """Add to an index; a new approximate index is then tuned to the target recall on its own vectors."""
        index = self._indexes[name]
        if len(index) == 0:
            index.build(keys, vectors, self.config.index.target_recall)
        else:
            index.add(keys, vectors)

    def _fill_joint(self, keys: np.ndarray, feats: dict[str, np.ndarray], chunk: int = 16_384) -> None:
        """Fuse features into the joint index. Chunk by chunk, so a large catalog never holds
        all its joint vectors twice, except where a new index must be tuned on all of them."""
        index = self._indexes["joint"]
        parts = ("image_tokens", "image_mask", "text_tokens", "text_mask")
        if len(index) == 0 and index.tunable():
            self._fill("joint", keys, self.fusion.fuse(*(feats[p] for p in parts)))
            return
        for start in range(0, len(keys), chunk):
            sl = slice(start, start + chunk)
            index.add(keys[sl], self.fusion.fuse(*(feats[p][sl] for p in parts)))

    def train(self, out: str | Path | None = None, show_progress: bool | None = None, resume: bool = True) -> dict[str, Any]:
        """Fit the attention fusion on the indexed items' own image/text pairs, switch to it, re-embed.

        Args:
            out: folder for the trained module and its checkpoints (default: a new temporary
                folder); ``save`` stores the trained module with the index either way.
            resume: continue an interrupted run found in ``out``.

        Returns:
            The training report (loss and validation recall per epoch).
        """
        import dataclasses
        import tempfile

        from .fusion import load_fusion
        from .index import VectorIndex
        from .training import fit

        if not len(self):
            raise QueryError("nothing is indexed yet: call index(catalog) first")
        catalog = Catalog(self.items.assign(image=self._items[IMAGE_SOURCE].to_numpy()), text_columns=self.config.catalog.text_columns)
        attention = dataclasses.replace(self.config.fusion, kind="attention", weights=None)
        out = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="multiretrieval-train-"))
        report = fit(catalog, out, dataclasses.replace(self.config, fusion=attention), show_progress, resume)
        trained = load_fusion(out)
        old = self.fusion
        if (trained.image_grid, trained.text_chunks) != (old.image_grid, old.text_chunks):
            with self._lock.writing():
                self.config = dataclasses.replace(self.config, fusion=dataclasses.replace(attention, weights=str(out)))
                self._fusion = trained
            self.index(catalog, show_progress=show_progress)  # other token layout: encode again
            return report
        with self._lock.writing():
            self.config = dataclasses.replace(self.config, fusion=dataclasses.replace(attention, weights=str(out)))
            self._fusion = trained
            self._indexes["joint"] = VectorIndex(trained.out_dim, self._indexes["joint"].factory, self.config.index.exact_filter_below)
            self._fill_joint(self._items[KEY].to_numpy(), self._features)
        return report

    def remove(self, ids: Any) -> int:
        """Remove items by catalog id. Unknown ids raise ItemNotFoundError and nothing is removed."""
        ids = [ids] if isinstance(ids, (str, int, np.integer)) else list(ids)
        with self._lock.writing():
            return self._remove(self._keys_for(ids))

    def _remove(self, keys: np.ndarray) -> int:
        for index in self._indexes.values():
            try:
                index.remove(keys)
            except RuntimeError as exc:
                raise ConfigError(f"the {index.factory} index does not support removal; rebuild with index()") from exc
        keep = ~self._items[KEY].isin(keys).to_numpy()
        self._items = self._items[keep].reset_index(drop=True)
        self._features = {k: v[keep] for k, v in self._features.items()}
        self._changed()
        return len(keys)

    def _keys_for(self, ids: list[Any]) -> np.ndarray:
        lookup = dict(zip(self._items["id"].astype(str), self._items[KEY]))
        missing = [i for i in ids if str(i) not in lookup]
        if missing:
            raise ItemNotFoundError(f"id(s) not in the index: {missing[:10]}")
        return np.array([lookup[str(i)] for i in ids], np.int64)

    def image_sources(self) -> pd.Series:
        """The resolved image path or URL of every indexed item (None where it has none), by id."""
        with self._lock.reading():
            return pd.Series(self._items[IMAGE_SOURCE].to_numpy(), index=self._items["id"].to_numpy(), name="image_source")

    def get(self, item_id: Any) -> dict[str, Any]:
        """One indexed item's catalog row as a dict."""
        with self._lock.reading():
            key = self._keys_for([item_id])[0]
            row = self._items.loc[self._items[KEY] == key]
            return self._public(row).iloc[0].to_dict()

    def image_source(self, item_id: Any) -> str | None:
        """The resolved image path or URL of an indexed item (None if it has no image)."""
        with self._lock.reading():
            key = self._keys_for([item_id])[0]
            return self._items.loc[self._items[KEY] == key, IMAGE_SOURCE].iloc[0]

    # ---------------------------------------------------------------- queries

    def search(self, image: ImageInput | None = None, text: str | None = None, mode: str = "auto", k: int = 10,
               where: str | None = None) -> pd.DataFrame:
        """Find the k best items.

        Args:
            image: a query photo (path, URL, bytes or PIL image).
            text: a query text.
            mode: "auto" (image+text -> fused, image -> image, text -> text), "image",
                "text", "fused", or "zero-shot" (text against item images, or an image
                against item texts).
            k: how many results.
            where: an SQL condition over catalog columns (DuckDB), applied before ranking,
                so k results come back whenever k items match.

        Returns:
            DataFrame with columns rank, id, score, then the catalog columns; fused
            queries under late fusion also get image_score and text_score (they sum to score).
        """
        mode = self._resolve_mode(image, text, mode)
        if not self._indexes:
            raise QueryError("nothing is indexed yet: call index(catalog) first")
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
            raise QueryError(f"k must be a positive integer, got {k!r}")
        if text is not None:
            text = self._check_text(text)
        cat = self.config.catalog
        pil = load_image(image, cat.max_image_pixels, cat.max_image_bytes, cat.download_timeout_s) if image is not None else None
        with self._lock.reading():
            return self._search(pil, text, mode, k, where)

    def _search(self, pil, text: str | None, mode: str, k: int, where: str | None) -> pd.DataFrame:
        allowed = self._filter(where) if where else None
        if mode == "zero-shot":
            space = "clip_image" if text is not None else "clip_text"
            query = self._embed_clip([pil] if pil is not None else None, [text] if text is not None else None)
        else:
            space = "joint"
            query = self._embed_joint([pil] if pil is not None else None, [text] if text is not None else None, 1)
        index = self._indexes.get(space)
        if index is None or len(index) == 0 or (allowed is not None and len(allowed) == 0):
            return self._results(np.zeros(0, np.int64), np.zeros(0, np.float32))
        scores, keys = index.search(query, int(min(k, len(index))), allowed)
        found = keys[0] >= 0
        frame = self._results(keys[0][found], scores[0][found])
        if mode == "fused" and hasattr(self.fusion, "contributions") and len(frame):
            image_part, text_part = self.fusion.contributions(query[0], self._stored_joint(keys[0][found]))
            frame.insert(3, "image_score", image_part)
            frame.insert(4, "text_score", text_part)
        return frame

    def encode(self, images: list[ImageInput] | None = None, texts: list[str] | None = None, space: str = "joint",
               batch_size: int | None = None) -> np.ndarray:
        """Embed images, texts, or (image, text) pairs; float32 (n, d), L2-normalised.

        space="joint": the fused space (pairs when both are given, of equal length).
        space="clip": the zero-shot space (images or texts, not pairs).
        """
        if space not in SPACES:
            raise QueryError(f"unknown space {space!r}; choose one of {list(SPACES)}")
        if images is None and texts is None:
            raise QueryError("give images, texts, or both")
        if images is not None and texts is not None and len(images) != len(texts):
            raise QueryError(f"{len(images)} images but {len(texts)} texts: joint pairs need equal numbers")
        texts = None if texts is None else [self._check_text(t) for t in texts]
        cat = self.config.catalog
        pils = None if images is None else [load_image(im, cat.max_image_pixels, cat.max_image_bytes, cat.download_timeout_s)
                                            for im in images]
        if space == "clip":
            if pils is not None and texts is not None:
                raise QueryError("space='clip' embeds images or texts, not pairs")
            return self._embed_clip(pils, texts)
        return self._embed_joint(pils, texts, len(pils if pils is not None else texts), batch_size)

    def _embed_joint(self, pils, texts, n: int, batch_size: int | None = None) -> np.ndarray:
        fusion, bs = self.fusion, batch_size or self.config.encoders.batch_size
        f = self._feature_buffers(n)
        for s in range(0, n, bs):
            if pils is not None:
                f["image_tokens"][s:s + bs], f["image_mask"][s:s + bs] = self.image_encoder.forward_images(pils[s:s + bs], fusion.image_grid)[0], True
            if texts is not None:
                f["text_tokens"][s:s + bs], f["text_mask"][s:s + bs] = self.text_encoder.forward(texts[s:s + bs], fusion.text_chunks)
        return fusion.fuse(f["image_tokens"], f["image_mask"], f["text_tokens"], f["text_mask"])

    def _embed_clip(self, pils, texts) -> np.ndarray:
        if texts is not None:
            return self.zero_shot.text_batch(texts)
        bs = self.config.encoders.batch_size
        return np.concatenate([self.zero_shot.image_batch(pils[s:s + bs]) for s in range(0, len(pils), bs)])

    def _check_text(self, text: Any) -> str:
        from .pipeline import text_problem

        if not isinstance(text, str):
            raise QueryError(f"text must be a string, got {type(text).__name__}")
        if not text.strip():
            raise QueryError("text is empty")
        limit = self.config.search.max_text_chars
        if len(text) > limit:
            raise LimitError(f"text has {len(text):,} characters; a query text may have at most {limit:,} (search.max_text_chars)")
        problem = text_problem(text)
        if problem:
            raise QueryError(problem)
        return text

    @staticmethod
    def _resolve_mode(image: Any, text: Any, mode: str) -> str:
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

    def _filter(self, where: str) -> np.ndarray:
        """Keys of the items matching an SQL condition, evaluated by DuckDB over the item table."""
        import duckdb

        if not isinstance(where, str) or not where.strip():
            raise QueryError("where: the filter is empty")
        problem = _outside_one_condition(where)
        if problem:
            raise QueryError(f"where: a single SQL condition is expected, but {where!r} has {problem}")
        with self._lazy:
            if self._duck is None:
                self._duck = self._filter_table()
        try:
            # In parentheses, so the filter is one condition: UNION or ORDER BY cannot attach to the statement.
            result = self._duck.cursor().execute(f"SELECT {KEY} FROM catalog WHERE ({where})").fetchnumpy()  # noqa: S608
        except duckdb.Error as exc:
            raise QueryError(f"where: invalid filter {where!r}: {str(exc).splitlines()[0]}") from exc
        return np.asarray(result[KEY], np.int64)

    def _filter_table(self):
        """A DuckDB connection holding the item table as ``catalog``, with external access off."""
        import duckdb

        con = duckdb.connect()
        # A table, not a registered view: cursors (one per query, for threads) share tables only.
        con.register("items_view", self._items.drop(columns=[IMAGE_SOURCE], errors="ignore"))
        con.execute("CREATE TABLE catalog AS SELECT * FROM items_view")
        con.unregister("items_view")
        con.execute("SET enable_external_access = false")  # a filter must never read files or URLs
        con.execute("SET lock_configuration = true")
        return con

    def _stored_joint(self, keys: np.ndarray) -> np.ndarray:
        """Joint vectors of items re-fused from their stored features (compressed indexes cannot give them back)."""
        rows = np.searchsorted(self._items[KEY].to_numpy(), keys)
        f = self._features
        return self.fusion.fuse(f["image_tokens"][rows], f["image_mask"][rows], f["text_tokens"][rows], f["text_mask"][rows])

    def _results(self, keys: np.ndarray, scores: np.ndarray) -> pd.DataFrame:
        if self._columns is None:
            # Cached once per change of the item table, laid out as results are: rank, id, score,
            # catalog columns, with text as plain objects (taking rows of pandas' arrow-backed
            # strings, or inserting columns, costs several times more per query).
            table = self._public(self._items)
            table = table.astype({c: object for c, dtype in table.dtypes.items() if isinstance(dtype, pd.StringDtype)})
            table.insert(0, "rank", 0)
            table.insert(2, "score", np.float32(0))
            self._columns = (self._items[KEY].to_numpy(), table)
        item_keys, table = self._columns
        # Keys grow with the rows of the item table (appended in order, never reused): binary search finds the rows.
        frame = table.take(np.searchsorted(item_keys, keys))
        frame.index = pd.RangeIndex(len(frame))
        frame["rank"] = np.arange(1, len(frame) + 1)
        frame["score"] = np.asarray(scores, np.float32)
        return frame

    @staticmethod
    def _public(frame: pd.DataFrame) -> pd.DataFrame:
        return frame.drop(columns=[c for c in frame.columns if c.startswith("_")])

    def _as_catalog(self, catalog: Catalog | pd.DataFrame | str | Path) -> Catalog:
        text_columns = self.config.catalog.text_columns
        if isinstance(catalog, Catalog):
            return catalog
        if isinstance(catalog, pd.DataFrame):
            return Catalog(catalog, text_columns=text_columns)
        return Catalog.read(catalog, text_columns=text_columns)

    # ---------------------------------------------------------------- persistence

    def save(self, folder: str | Path) -> Path:
        """Save to a folder (atomically: a crash leaves the previous save intact)."""
        from .persistence import save_retriever

        with self._lock.reading():
            return save_retriever(self, Path(folder))

    @classmethod
    def load(cls, folder: str | Path, config: RetrieverConfig | str | Path | None = None) -> Retriever:
        """Load a saved retriever; ``config``, if given, must name the same encoders and dimensions."""
        from .persistence import load_retriever

        if isinstance(config, (str, Path)):
            config = RetrieverConfig.from_yaml(config)
        return load_retriever(cls, Path(folder), config)


def _outside_one_condition(where: str) -> str | None:
    """What would let a filter reach past ``WHERE (...)``: a ';', a comment, or a ')' closing
    more than it opened, outside quoted literals and identifiers; None if there is none."""
    depth, quote, i = 0, None, 0
    while i < len(where):
        c = where[i]
        if quote:
            if c == quote:
                quote = None
        elif c in "'\"":
            quote = c
        elif c == ";":
            return "a ';'"
        elif where.startswith(("--", "/*"), i):
            return "a comment"
        elif c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
            if depth < 0:
                return "a ')' that closes more than it opens"
        i += 1
    return "an unclosed quote" if quote else "unclosed parentheses" if depth else None
