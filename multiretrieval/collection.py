"""The indexed items and what is searched over them, kept in step.

A :class:`Collection` holds an :class:`~multiretrieval.items.ItemStore` (rows, features,
content hashes), an :class:`~multiretrieval.index.IndexSet` (a FAISS index per space) and a
:class:`~multiretrieval.keywords.KeywordIndex` (BM25), and changes them together:

    commit(catalog, encoded, embedder)          encoded rows in: rows, vectors, keywords
    remove(keys, embedder)                      out of all three (graph indexes compacted when due)

After each write, a column no item has a value in goes, unless the first catalog had it or the config
names it (``ItemStore.drop_unused_columns``).
    plan_upsert(catalog, hashes, prune)         which rows are new, changed, only re-described, unchanged, gone
    apply_upsert(plan, ...)                     the plan, in place; indexes rebuilt only if their kind must change

It is not locked: the retriever holds its readers-writer lock around every use.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import pandas as pd

from .catalog import Catalog, SkippedRow
from .config import RetrieverConfig
from .embedder import SCORE_SCALE
from .index import IndexSet
from .ingest import Encoded, IndexReport
from .items import IMAGE_SOURCE, ItemStore
from .keywords import KeywordIndex, keyword_texts, phrases, tokenize

if TYPE_CHECKING:
    from .embedder import Embedder

logger = logging.getLogger(__name__)


@dataclass
class UpsertPlan:
    """What an upsert does with each catalog row (positions in the catalog) and each stored id."""

    encode: np.ndarray  # rows to encode: ids not indexed yet, and ids whose content (image bytes, text) changed
    replaced: set[str] = field(default_factory=set)  # ids among ``encode`` that are indexed now (their old version goes)
    update: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # rows with the same content but other metadata
    unchanged: int = 0
    remove: list[Any] = field(default_factory=list)  # indexed ids missing from the catalog (with prune)


class Collection:
    """Rows, vectors and keywords of the indexed items (see the module docstring)."""

    def __init__(self, config: RetrieverConfig) -> None:
        self.store = ItemStore()
        self.indexes = IndexSet(config.index, config.search.hybrid_depth)
        self.keywords = KeywordIndex(tuple(dict.fromkeys(config.catalog.text_columns + config.catalog.keyword_columns)))
        self._memo: dict[str, tuple[Any, Any]] = {}
        self._memo_lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.store)

    def memo(self, name: str, key: Any, compute: Callable[[], Any]) -> Any:
        """A value derived from the items, computed once per ``key`` (e.g. the store's version)."""
        with self._memo_lock:
            held = self._memo.get(name)
            if held is not None and held[0] == key:
                return held[1]
        value = compute()
        with self._memo_lock:
            self._memo[name] = (key, value)
        return value

    def phrase_keys(self, text: str, max_tokens: int = 8) -> np.ndarray:
        """Keys of the items with a phrase (keywords.phrases of one of the keyword columns' values: a category, a
        tag, the "blue" of "Armchair ottoman, blue") that the words of ``text`` hold ("this, but blue" holds
        "blue") or that holds them ("bed" is in "Day bed"); sorted."""
        by_phrase, by_token = self.memo("phrases", self.store.version, self._phrase_index)
        tokens = sorted(set(tokenize(text)))
        found = [by_phrase[phrase] for phrase in set.intersection(*(by_token.get(t, set()) for t in tokens))] if tokens else []
        short = tokens[:max_tokens]  # the phrases the words hold: their subsets are looked up (2^8 at most)
        found += [by_phrase[frozenset(c)] for n in range(1, len(short) + 1) for c in combinations(short, n) if frozenset(c) in by_phrase]
        return np.unique(np.concatenate(found)) if found else np.zeros(0, np.int64)

    def _phrase_index(self) -> tuple[dict[frozenset[str], np.ndarray], dict[str, set[frozenset[str]]]]:
        """Each phrase's token set -> the keys of the items that have it, over the keyword columns; and each
        token -> the phrases that hold it."""
        table, keys = self.store.table, self.store.keys
        holders: dict[frozenset[str], list[int]] = {}
        for column in (c for c in self.keywords.columns if c in table.columns):
            for key, value in zip(keys, table[column].to_numpy()):
                if isinstance(value, str) and value.strip():
                    for phrase in phrases(value):
                        holders.setdefault(phrase, []).append(int(key))
        by_token: dict[str, set[frozenset[str]]] = {}
        for phrase in holders:
            for token in phrase:
                by_token.setdefault(token, set()).add(phrase)
        return {phrase: np.unique(np.array(k, np.int64)) for phrase, k in holders.items()}, by_token

    def vectors(self, space: str, ids: list[Any] | None = None) -> np.ndarray:
        """Stored vectors of the items (all, in row order, or these ids) in a space; zeros for an item
        without that space's modality."""
        from .errors import QueryError
        from .index import SPACES

        if space not in SPACES:
            raise QueryError(f"unknown space {space!r}; choose one of {list(SPACES)}")
        keys = self.store.keys if ids is None else self.store.keys_for(list(ids))
        return self.indexes.vectors(space, keys, None if space == "joint" else self.store.has(space, keys))

    # ---------------------------------------------------------------- writes

    def commit(self, catalog: Catalog, encoded: Encoded, embedder: Embedder) -> np.ndarray:
        """Add encoded rows: catalog rows and features to the store, zero-shot and fused joint
        vectors to the indexes, texts to the keyword index. Returns their keys."""
        arrays = encoded.arrays
        if not self.indexes:
            dim = embedder.zero_shot.dim
            self.indexes.create({"joint": embedder.fusion.out_dim, "clip_image": dim, "clip_text": dim}, len(self.store) + len(encoded.rows))
        rows = catalog.df.iloc[encoded.rows]
        keys = self.store.append(rows, [encoded.sources[r] for r in encoded.rows], arrays, encoded.hashes, embedder.regions)
        for space, present in (("clip_image", arrays["image_mask"][:, 0]), ("clip_text", arrays["text_mask"][:, 0])):
            vectors = arrays.pop(space)  # not kept: freed once in the index (the peak of a large run)
            if present.any():
                self.indexes.fill(space, keys[present], vectors if present.all() else vectors[present])
            del vectors
        self.indexes.fill_joint(keys, lambda r: embedder.item_vectors(arrays, r), embedder.fusion.query_parts())
        self.keywords.add(keys, keyword_texts(rows, self.keywords.columns))
        self.store.drop_unused_columns(configured_columns(embedder.config))
        return keys

    def remove(self, keys: np.ndarray, embedder: Embedder, rechoose: bool = False) -> None:
        """Remove items everywhere; then rebuild the indexes that are due (see ``refresh``)."""
        self.indexes.remove(keys)
        self.keywords.remove(keys)
        self.store.remove(keys)
        self.store.drop_unused_columns(configured_columns(embedder.config))
        self.refresh(embedder, rechoose)

    def refit_joint(self, embedder: Embedder) -> None:
        """The joint index made again from the stored features (the embedder's fusion changed)."""
        self.indexes.renew("joint", embedder.fusion.out_dim)
        self.indexes.fill_joint(self.store.keys, lambda rows: embedder.item_vectors(self.store.features, rows),
                                embedder.fusion.query_parts())

    def follow_score_scale(self, saved_scale: int | None, embedder: Embedder) -> None:
        """A save made before the score scale (SCORE_SCALE) renormalised the joint vectors of items
        lacking a modality: fuse them again from the stored features (until the next save records the scale)."""
        store = self.store
        if saved_scale != SCORE_SCALE and len(store) and (
                len(store.with_modality("image")) < len(store) or len(store.with_modality("text")) < len(store)):
            logger.info("joint vectors fused again from the stored features (score scale %s)", SCORE_SCALE)
            self.refit_joint(embedder)

    def refresh(self, embedder: Embedder, rechoose: bool) -> list[str]:
        """Rebuild the indexes with too many entries marked deleted and, with ``rechoose``, those whose
        automatic kind differs for the current number of items (no new encoding: joint vectors are
        fused from the stored features, zero-shot ones read back from their index). Returns the spaces."""
        n = len(self.store)
        stale = [s for s in self.indexes.stale(n) if rechoose or self.indexes[s].deleted_share > self.indexes.config.compact_deleted_share]
        for space in stale:
            if space == "joint":
                keys, vectors = self.store.keys, embedder.item_vectors(self.store.features)
            else:
                keys = self.store.with_modality("image" if space == "clip_image" else "text")
                vectors = self.indexes[space].reconstruct(keys) if len(keys) else np.zeros((0, self.indexes[space].dim), np.float32)
            self.indexes.rebuild(space, keys, vectors, n, embedder.fusion.query_parts() if space == "joint" else None)
        return stale

    # ---------------------------------------------------------------- upserts

    def plan_upsert(self, catalog: Catalog, hashes: list[str], prune: bool) -> UpsertPlan:
        """Sort a catalog's rows by what an upsert must do (the catalog conformed to the store first)."""
        positions, stored = self.store.id_positions(), self.store.hashes
        ids = catalog.df["id"].astype(str).tolist()
        at = np.array([positions.get(i, -1) for i in ids], np.int64)
        same = np.array([p >= 0 and bool(h) and stored[p] == h.encode() for p, h in zip(at, hashes)], bool)
        rows = np.flatnonzero(same)
        differs = self._metadata_differs(catalog, rows, at[rows])
        plan = UpsertPlan(encode=np.flatnonzero(~same), update=rows[differs], unchanged=int((~differs).sum()))
        plan.replaced = {ids[r] for r in plan.encode if at[r] >= 0}
        if prune:  # a row the catalog left out (catalog.dropped) still names an item to keep
            wanted = set(ids) | {str(d.id) for d in catalog.dropped if d.id is not None}
            plan.remove = [i for i in self.store.table["id"].tolist() if str(i) not in wanted]
        return plan

    def _metadata_differs(self, catalog: Catalog, rows: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """For catalog rows whose content is unchanged: does any other value (or the image's place) differ?"""
        new = catalog.df.iloc[rows].reset_index(drop=True)
        old = self.store.table.iloc[positions].reset_index(drop=True)
        differs = np.zeros(len(rows), bool)
        empty = pd.Series([None] * len(rows), dtype=object)
        for column in sorted(set(new.columns) | {c for c in old.columns if not c.startswith("_")}):
            differs |= ~_same(old[column] if column in old.columns else empty, new[column] if column in new.columns else empty)
        sources = pd.Series(catalog.image_sources(), dtype=object).iloc[rows].reset_index(drop=True)
        return differs | ~_same(old[IMAGE_SOURCE], sources)

    def keep_indexed_images(self, part: Catalog, encoded: Encoded, report: IndexReport) -> tuple[Encoded, np.ndarray]:
        """``encoded`` without the rows that lost their image (it failed; the text stood in) of items indexed with one,
        and those rows (positions in ``part``): such an item keeps its indexed image and vectors, and only its other
        values change (``apply_upsert(keep_image=...)``), so a price sent while its photo is unreadable still lands. A
        photo that turned unreadable overnight must not make its item text-only."""
        if not len(encoded.rows):
            return encoded, np.zeros(0, np.int64)
        ids = part.df["id"].iloc[encoded.rows].astype(str).tolist()
        positions, with_image = self.store.id_positions(), self.store.features["image_mask"][:, 0]
        lost = np.array([encoded.sources[r] is not None and not encoded.arrays["image_mask"][j, 0]
                         and i in positions and bool(with_image[positions[i]])
                         for j, (r, i) in enumerate(zip(encoded.rows, ids))], bool)
        if not lost.any():
            return encoded, np.zeros(0, np.int64)
        kept_rows = {int(part.row_numbers[r]) for r in encoded.rows[lost]}
        report.warnings = [SkippedRow(w.row, w.id, w.reason.replace("indexed by its text only: ", "") + "; its indexed image "
                                      "and vectors stay, its other values are updated") if w.row in kept_rows else w
                           for w in report.warnings]
        keep = ~lost
        rest = Encoded(encoded.rows[keep], encoded.sources, {k: v[keep] for k, v in encoded.arrays.items()},
                       [h for h, k in zip(encoded.hashes, keep) if k] if encoded.hashes else encoded.hashes)
        return rest, encoded.rows[lost]

    def apply_upsert(self, plan: UpsertPlan, catalog: Catalog, encoded_part: Catalog, encoded: Encoded,
                     embedder: Embedder, keep_image: np.ndarray | None = None) -> dict[str, int]:
        """Carry out a plan whose ``encode`` rows (``encoded_part``, a sub-catalog) were encoded
        (``encoded``). A changed row that failed to encode keeps its indexed version; ``keep_image`` (catalog rows:
        ``keep_indexed_images``) keep their indexed image and vectors and take the row's other values."""
        ok_ids = {str(i) for i in encoded_part.df["id"].iloc[encoded.rows]}
        positions = self.store.id_positions()
        gone = [i for i in plan.remove if str(i) in positions]
        replaced = [i for i in plan.replaced if i in ok_ids and i in positions]
        if gone or replaced:
            drop = self.store.keys_for(gone + replaced)
            self.indexes.remove(drop)
            self.keywords.remove(drop)
            self.store.remove(drop)
        if len(encoded.rows):
            self.commit(encoded_part, encoded, embedder)
        keep_image = np.zeros(0, np.int64) if keep_image is None else keep_image
        self._update_rows(catalog, plan.update)
        self._update_rows(catalog, keep_image, stored_sources=True)
        self.store.drop_unused_columns(configured_columns(embedder.config))  # a value the update emptied was the last
        rebuilt = self.refresh(embedder, rechoose=True)
        return {"added": len(encoded.rows) - len(replaced), "replaced": len(replaced), "updated": len(plan.update) + len(keep_image),
                "unchanged": plan.unchanged, "removed": len(gone), "indexes rebuilt": len(rebuilt)}

    def _update_rows(self, catalog: Catalog, rows: np.ndarray, stored_sources: bool = False) -> None:
        """New metadata for items whose content is unchanged: rows in place, keywords again (``stored_sources``: the
        items keep the image source they have, whose vectors they keep)."""
        if not len(rows):
            return
        ids = catalog.df["id"].iloc[rows].tolist()
        keys = self.store.keys_for(ids)
        sources = [self.store.image_source(i) for i in ids] if stored_sources else [catalog.image_sources()[r] for r in rows]
        self.store.update(keys, catalog.df.iloc[rows], sources)
        self.keywords.remove(keys)
        self.keywords.add(keys, keyword_texts(catalog.df.iloc[rows], self.keywords.columns))

    # ---------------------------------------------------------------- files

    def parts(self) -> dict[str, Callable[[Path], None]]:
        """The components a save writes, each into its own subfolder."""
        return {"items": self.store.save, "index": self.indexes.save, "keywords": self.keywords.save}

    def describe(self) -> dict[str, Any]:
        return {"index": self.indexes.describe(), "items": self.store.describe(), "keywords": self.keywords.describe()}

    @classmethod
    def load(cls, folders: dict[str, Path | None], manifest: dict[str, Any], items_record: dict[str, Any],
             config: RetrieverConfig) -> Collection:
        """The components saved in ``folders`` (items, index, keywords; keywords None in saves made before
        the keyword index: it is built from the stored rows)."""
        collection = cls(config)
        collection.store = ItemStore.load(folders["items"], items_record)
        collection.indexes = IndexSet.load(folders["index"], manifest["index"], config.index, config.search.hybrid_depth)
        if folders.get("keywords") is not None:
            collection.keywords = KeywordIndex.load(folders["keywords"], manifest["keywords"])
        else:
            store = collection.store
            collection.keywords.add(store.keys, keyword_texts(store.table, collection.keywords.columns))
        return collection


def configured_columns(config: RetrieverConfig) -> set[str]:
    """The columns a config names (text, keywords, what the shop displays): kept while no item has a value in them."""
    display = config.display
    named = (*config.catalog.text_columns, *config.catalog.keyword_columns, display.title, display.price, display.brand,
             *display.columns, *display.facets, "image")
    return {c for c in named if c}


def _same(a: pd.Series, b: pd.Series) -> np.ndarray:
    """Element-wise equality of two columns, empty equal to empty, values of any type."""
    a_na, b_na = a.isna().to_numpy(bool), b.isna().to_numpy(bool)
    av, bv = a.to_numpy(object), b.to_numpy(object)
    out = a_na & b_na
    for i in np.flatnonzero(~a_na & ~b_na):
        try:
            out[i] = bool(av[i] == bv[i])
        except (TypeError, ValueError):  # values that do not compare (arrays): different
            out[i] = False
    return out


def _saved_items_file(folder: Path, name: str, verify: bool) -> Path | None:
    """A file of a saved index's items (None where the save holds none), read without loading models or
    vectors; ``verify`` checks every file's sha256 first."""
    from .persistence import component_folder, read_folder, read_manifest

    manifest = read_folder(folder) if verify else read_manifest(folder)
    items = component_folder(folder, manifest, "items")
    path = items / name if items is not None else None
    return path if path is not None and path.is_file() else None


def saved_ids(folder: str | Path) -> set[str]:
    """The ids (as text) of the items in a saved index folder. Never fails: a folder that holds no readable
    index (none yet, another tool's, a damaged one about to be rebuilt) has none."""
    from .errors import IndexLoadError

    try:
        path = _saved_items_file(Path(folder), "catalog.parquet", verify=False)
        return set() if path is None else set(pd.read_parquet(path, columns=["id"])["id"].astype(str))
    except (IndexLoadError, OSError, ValueError):  # pyarrow's ArrowInvalid is a ValueError
        return set()


def saved_hashes(folder: str | Path) -> set[str]:
    """The content hashes of the items in a saved index folder (what its shard cache must keep)."""
    from .items import HASHES_FILE

    path = _saved_items_file(Path(folder), HASHES_FILE, verify=True)
    return set() if path is None else {h.decode() for h in np.load(path, allow_pickle=False).tolist() if h}
