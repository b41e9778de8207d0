"""The item store: the indexed catalog rows, their encoded features, keys, filters and result rows.

Every item has an internal int64 key (its FAISS id: assigned in order, never reused) beside
its catalog id. The store keeps the catalog rows (with each item's resolved image source),
the encoder features row-aligned with them (so fusion can be applied again after training),
each item's content hash (so an upsert can tell unchanged rows), the ``where`` filter
(DuckDB over the rows) and the layout of result tables.

On disk (``save``/``load``): ``catalog.parquet`` (the rows, with ``_key``),
``features/*.npy`` (one array per feature, row-aligned; with ``index.image_regions``, the region vectors
and mask too: ``regions``) and ``hashes.npy`` (row-aligned; empty where the item must be encoded again,
e.g. its image URL failed).
"""

from __future__ import annotations

import copy
import json
import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .catalog import Catalog, conform_ids, conform_rows, plain
from .config import CatalogConfig
from .embedder import FEATURES, REGIONS
from .errors import CatalogError, ConfigError, IndexLoadError, ItemNotFoundError, LimitError, QueryError
from .filters import compile_filter, compile_filters, describe_columns

logger = logging.getLogger(__name__)
KEY = "_key"  # internal int64 FAISS id of an item; never reused
IMAGE_SOURCE = "_image_source"  # the item's image path or URL, resolved at index time
HASH_DTYPE = "S64"  # a sha256 in hex; b"" where unknown
HASHES_FILE = "hashes.npy"
FACET_CACHE = 256  # distinct (columns, where, filters) combinations kept; cleared when the rows change
QUANTILES = 100  # a numeric facet's quantiles: its values at every 1/QUANTILES of the items, for a slider on that scale


class ItemStore:
    """Catalog rows, features and keys of the indexed items. Not locked: the retriever
    holds its readers-writer lock around every use."""

    def __init__(self) -> None:
        self.table = pd.DataFrame({KEY: pd.Series(dtype="int64")})
        self.features: dict[str, np.ndarray] = {}
        self.hashes = np.zeros(0, HASH_DTYPE)  # content hash per row (pipeline.content_hash)
        self.regions = "none"  # the region recipe of features["region_vectors"/"region_mask"] (index.image_regions)
        self.next_key = 0
        self.declared: tuple[str, ...] = ()  # the columns of the catalog the store was first filled from (kept when empty)
        self.version = 0  # changes whenever the rows do (for what is derived from them elsewhere)
        self._lazy = threading.Lock()
        self._changed()

    def _changed(self) -> None:
        """Drop what is derived from the rows: the DuckDB copy and the result-row layout."""
        self._duck = None
        self._duck_types: dict[str, str] | None = None
        self._columns: tuple[np.ndarray, dict[tuple[str, ...], pd.DataFrame]] | None = None  # keys; layouts by added columns
        self._ids: dict[str, int] | None = None
        self._modality: dict[str, np.ndarray] = {}
        self._facets: dict[tuple, Any] = {}  # facets per (columns, where, filters), and the facet columns: asked per query
        self.version += 1

    def __len__(self) -> int:
        return len(self.table)

    @property
    def keys(self) -> np.ndarray:
        return self.table[KEY].to_numpy()

    def public(self) -> pd.DataFrame:
        """The catalog rows without internal columns."""
        return _public(self.table).reset_index(drop=True)

    # ---------------------------------------------------------------- writes

    def conform(self, catalog: Catalog, allow_existing: bool = False, bounds: CatalogConfig | None = None) -> None:
        """Make new rows fit the stored ones (id kind, column types); refuse ids already stored
        unless ``allow_existing`` (an upsert), and (``bounds``) more new columns than ``check_columns`` allows.
        Names the rows and columns."""
        if bounds is not None:
            self.check_columns(list(catalog.df.columns), bounds)
        if not len(self):
            return
        df = catalog.df
        catalog.df = conform_rows(df.assign(id=conform_ids(df["id"], self.table["id"])), self.table)
        if allow_existing:
            return
        existing = self.id_positions()
        clash = [i for i, v in enumerate(catalog.df["id"].astype(str)) if v in existing]
        if clash:
            raise CatalogError(f"row(s) {clash[:10]}: id {plain(catalog.df['id'].iloc[clash[0]])!r} is already indexed; remove it first")

    def check_columns(self, columns: list[str], bounds: CatalogConfig) -> None:
        """Refuse a write whose rows bring more new columns than ``catalog.max_new_columns`` (an empty store: the
        first catalog, unbounded but for the total), or that would make more than ``catalog.max_columns`` in all:
        every column is in each result row and the filter table, so one item with thousands of keys slowed every
        search. Raises CatalogError naming the new columns and the setting."""
        stored = set(_public(self.table).columns)
        new = [c for c in columns if c not in stored]
        shown = ", ".join(repr(c) if len(repr(c)) <= 40 else repr(c)[:40] + "..." for c in new[:10]) + (", ..." if len(new) > 10 else "")
        if self.next_key and len(new) > bounds.max_new_columns:
            raise CatalogError(f"{len(new):,} new columns ({shown}); one write may add at most {bounds.max_new_columns:,} "
                               f"(catalog.max_new_columns)")
        if len(stored) + len(new) > bounds.max_columns:
            held = f"with the {len(stored):,} indexed, {len(new):,} new columns ({shown}) make" if stored else "the catalog has"
            raise CatalogError(f"{held} {len(stored) + len(new):,} columns; an index holds at most {bounds.max_columns:,} "
                               f"(catalog.max_columns)")

    def drop_unused_columns(self, keep: set[str] | frozenset[str] = frozenset()) -> list[str]:
        """Drop the columns no item has a value in, other than the declared ones (the first catalog's) and ``keep``
        (the configured ones): columns a write brought leave with the last item that used them. Returns them."""
        keep = {"id", *self.declared, *keep}
        unused = [c for c in _public(self.table).columns if c not in keep and self.table[c].isna().all()]
        if unused:
            self.table = self.table.drop(columns=unused)
            self._changed()
            logger.info("%d column(s) no item uses any more dropped: %s", len(unused), unused[:10])
        return unused

    def check_regions(self, recipe: str) -> None:
        """Refuse a write whose items would carry other region vectors than the stored ones (ConfigError): one
        index holds one recipe. An empty store takes any."""
        if len(self) and recipe != self.regions:
            raise ConfigError(f"the index holds region vectors {self.regions!r} (index.image_regions), the config names "
                              f"{recipe!r}: index the catalog again with it (with a shard cache, only the region vectors "
                              "are encoded), or write with the index's own setting")

    def append(self, rows: pd.DataFrame, sources: list[str | None], features: dict[str, np.ndarray],
               hashes: list[str | None] | None = None, regions: str = "none") -> np.ndarray:
        """Add catalog rows with their image sources, features (with REGIONS of recipe ``regions`` unless "none") and
        content hashes; returns their new keys."""
        self.check_regions(regions)
        keys = np.arange(self.next_key, self.next_key + len(rows), dtype=np.int64)
        if not len(self):
            self.regions = regions
            self.features = {}
        if not self.next_key:
            self.declared = tuple(c for c in rows.columns if not c.startswith("_"))
        new = _storable(rows)
        new[IMAGE_SOURCE] = sources
        new.insert(0, KEY, keys)
        self.table = new if not len(self) else pd.concat([self.table, new], ignore_index=True)
        for name in FEATURES + (REGIONS if regions != "none" else ()):
            self.features[name] = features[name] if name not in self.features else np.concatenate([self.features[name], features[name]])
        added = np.array([(h or "").encode() for h in hashes] if hashes is not None else [b""] * len(rows), HASH_DTYPE)
        self.hashes = np.concatenate([self.hashes, added])
        self.next_key += len(rows)
        self._changed()
        return keys

    def remove(self, keys: np.ndarray) -> None:
        keep = ~self.table[KEY].isin(keys).to_numpy()
        self.table = self.table[keep].reset_index(drop=True)
        self.features = {k: v[keep] for k, v in self.features.items()}
        self.hashes = self.hashes[keep]
        self._changed()

    def update(self, keys: np.ndarray, rows: pd.DataFrame, sources: list[str | None]) -> None:
        """Replace the catalog values (and image sources) of stored items, keeping their keys, features
        and hashes: items whose content is unchanged but whose metadata is not (a new price)."""
        if not len(keys):
            return
        new = rows.copy()
        new[IMAGE_SOURCE] = sources
        new.insert(0, KEY, np.asarray(keys, np.int64))
        kept = self.table.drop(index=self.table.index[self.rows_of(keys)])
        # Keys grow with the rows, so ordering by key puts every row back at its position.
        self.table = pd.concat([kept, new], ignore_index=True).sort_values(KEY, kind="stable").reset_index(drop=True)
        self._changed()

    # ---------------------------------------------------------------- reads

    def id_positions(self) -> dict[str, int]:
        """Row position of every id, by its text (42 and "42" name one item); cached until the rows change."""
        with self._lazy:
            if self._ids is None:
                self._ids = {i: p for p, i in enumerate(self.table["id"].astype(str))}
            return self._ids

    def keys_for(self, ids: list[Any]) -> np.ndarray:
        """The keys of catalog ids (compared as text, so 42 and "42" name one item)."""
        positions = self.id_positions()
        missing = [i for i in ids if str(i) not in positions]
        if missing:
            raise ItemNotFoundError(f"id(s) not in the index: {missing[:10]}")
        return self.keys[np.array([positions[str(i)] for i in ids], np.int64)] if ids else np.zeros(0, np.int64)

    def with_modality(self, modality: str) -> np.ndarray:
        """Keys of the items that have a text ("text"), an image ("image"), or only an image ("image only");
        cached until the rows change (every text query asks)."""
        cached = self._modality.get(modality)
        if cached is None:
            has_image, has_text = self.features["image_mask"][:, 0], self.features["text_mask"][:, 0]
            mask = {"text": has_text, "image": has_image, "image only": has_image & ~has_text}[modality]
            cached = self._modality[modality] = self.keys[mask]
        return cached

    def has(self, space: str, keys: np.ndarray) -> np.ndarray:
        """Which of these items have the modality a zero-shot space holds ("clip_image": an image; "clip_text": a text)."""
        return self.features["image_mask" if space == "clip_image" else "text_mask"][self.rows_of(keys), 0]

    def rows_of(self, keys: np.ndarray) -> np.ndarray:
        """Row positions of keys: keys grow with the rows (appended in order, never reused)."""
        return np.searchsorted(self.keys, keys)

    def get(self, item_id: Any) -> dict[str, Any]:
        row = self.rows_of(self.keys_for([item_id]))
        return _public(self.table.iloc[row]).iloc[0].to_dict()

    def image_source(self, item_id: Any) -> str | None:
        value = self.table[IMAGE_SOURCE].iloc[self.rows_of(self.keys_for([item_id]))[0]]
        return None if _missing(value) else value  # a saved table gives NaN for "no image"

    def image_sources(self) -> pd.Series:
        return pd.Series(self.table[IMAGE_SOURCE].to_numpy(), index=self.table["id"].to_numpy(), name="image_source")

    def has_image(self, ids: list[Any]) -> np.ndarray:
        """Whether each item was indexed with its photo (False where it has none, where its photo could not be read,
        and for an id not in the index)."""
        positions = self.id_positions()
        rows = np.array([positions.get(str(i), -1) for i in ids], np.int64)
        found = rows >= 0
        return found & self.features["image_mask"][np.where(found, rows, 0), 0] if len(self) else np.zeros(len(ids), bool)

    def catalog(self, text_columns: tuple[str, ...]) -> Catalog:
        """The stored rows as a catalog again, images at their resolved sources (for training)."""
        return Catalog(self.public().assign(image=self.table[IMAGE_SOURCE].to_numpy()), text_columns=text_columns)

    def filter(self, where: str | None, timeout_s: float | None = None, unsafe: bool = False,
               filters: dict[str, Any] | None = None, leave_out: str | None = None) -> np.ndarray | None:
        """Keys of the items matching a filter: ``where``, one condition over the catalog columns (see filters.py),
        and ``filters``, column -> values or a range (filters.compile_filters; ``leave_out``: a column of them to
        skip), run by DuckDB over the rows and interrupted after ``timeout_s`` seconds (LimitError). None where
        neither holds a condition (every item).

        Raises QueryError, before DuckDB runs anything, for a filter outside the grammar
        (``unsafe=True``: any single DuckDB ``where`` expression, for trusted callers)."""
        import duckdb

        columns = self.filter_columns()
        parts = [compile_filter(where, columns, unsafe)] if where is not None else []
        structured, params = compile_filters(filters, columns, self._duck_type, leave_out) if filters else (None, [])
        if structured:
            parts.append(structured)
        if not parts:
            return None
        cursor = self._connection().cursor()  # one connection per query: interrupting it stops this query only
        fired = threading.Event()

        def stop() -> None:
            fired.set()
            cursor.interrupt()

        timer = threading.Timer(timeout_s, stop) if timeout_s else None
        try:
            if timer:
                timer.start()
            # Printed from a checked tree and quoted names; the structured filters' values are parameters.
            condition = " AND ".join(f"({part})" for part in parts)
            result = cursor.execute(f"SELECT {KEY} FROM catalog WHERE {condition}", params or None).fetchnumpy()  # noqa: S608
        except duckdb.Error as exc:
            shown = _shown(where, filters)
            if fired.is_set():
                raise LimitError(f"{shown[0]}: the filter ran longer than {timeout_s:g} s (search.filter_timeout_s) and was "
                                 f"stopped: {shown[1]}; simplify it") from None
            raise QueryError(f"{shown[0]}: invalid filter {shown[1]}: {str(exc).splitlines()[0]}. Columns: "
                             f"{describe_columns(columns)}.") from None
        finally:
            if timer:
                timer.cancel()
            cursor.close()
        return np.asarray(result[KEY], np.int64)

    def _connection(self):
        with self._lazy:
            if self._duck is None:
                self._duck = self._filter_table()
            return self._duck

    def _duck_type(self, column: str) -> str | None:
        """A column's DuckDB type in the filter table (e.g. TIMESTAMP, DATE, BOOLEAN, VARCHAR)."""
        if self._duck_types is None:
            # A cursor of its own: the shared connection refuses a second thread's call while it answers one (the
            # page's first search and facet count, both filtered, ask at once).
            cursor = self._connection().cursor()
            try:
                rows = cursor.execute("SELECT column_name, data_type FROM information_schema.columns "
                                      "WHERE table_name = 'catalog'").fetchall()
            finally:
                cursor.close()
            self._duck_types = dict(rows)
        return self._duck_types.get(column)

    def filter_columns(self) -> dict[str, str]:
        """The columns a filter may name, with the kind of their values (for messages)."""
        return {name: _kind(dtype) for name, dtype in self.table.dtypes.items() if not name.startswith("_")}

    def facets(self, columns: list[str] | None = None, where: str | None = None, filters: dict[str, Any] | None = None,
               timeout_s: float | None = None, top: int = 20, bins: int = 10) -> dict[str, dict[str, Any]]:
        """Per column, over the items matching ``where`` and ``filters`` (all by default), computed by DuckDB,
        each column's counts leaving out its own filter (so other values of it can still be added):

        - text, booleans: ``{"kind": "values", "values": [{"value": v, "count": n}, ...]}``, the ``top`` most frequent;
        - numbers: ``{"kind": "range", "min", "max", "histogram": {"edges": [...], "counts": [...]}, "quantiles": [...]}``,
          the min/max over all items (a slider keeps its scale), the counts over the matching ones, and the
          QUANTILES + 1 quantiles over all items (the 0th is the min, the last the max; each a value of the column):
          a slider on that scale moves by a share of the products, whatever the spread of the values.

        ``columns`` default: ``facet_columns()``; ``timeout_s``: each filter's time limit (see ``filter``).
        """
        columns = list(columns) if columns else self.facet_columns()
        key = (tuple(columns), where, json.dumps(filters, sort_keys=True, default=str), top, bins)
        if key not in self._facets:
            if len(self._facets) >= FACET_CACHE:
                self._facets.clear()
            self._facets[key] = self._count_facets(columns, where, filters, timeout_s, top, bins)
        return copy.deepcopy(self._facets[key])

    def _count_facets(self, columns: list[str], where: str | None, filters: dict[str, Any] | None, timeout_s: float | None,
                      top: int, bins: int) -> dict[str, dict[str, Any]]:
        public = list(_public(self.table).columns)
        unknown = [c for c in columns if c not in public]
        if unknown:
            raise QueryError(f"facets: no column(s) {unknown}; columns: {public}")
        out = {}
        for column in columns:
            selected = self.filter(where, timeout_s, filters=filters, leave_out=column)
            cur = self._connection().cursor()
            scope = "TRUE"
            if selected is not None:
                cur.register("selected", pd.DataFrame({KEY: selected}))
                scope = f"{KEY} IN (SELECT {KEY} FROM selected)"
            out[column] = self._facet(cur, column, scope, top, bins)
        return out

    def _facet(self, cur, column: str, scope: str, top: int, bins: int) -> dict[str, Any]:
        q = '"' + column.replace('"', '""') + '"'
        dtype = self.table[column].dtype
        if pd.api.types.is_numeric_dtype(dtype) and not pd.api.types.is_bool_dtype(dtype):
            lo, hi = cur.execute(f"SELECT min({q}), max({q}) FROM catalog").fetchone()  # noqa: S608
            if lo is None:
                return {"kind": "range", "min": None, "max": None, "histogram": {"edges": [], "counts": []}, "quantiles": []}
            width = (hi - lo) / bins or 1.0
            rows = cur.execute(f"SELECT least(floor(({q} - ?) / ?), ?) AS b, count(*) FROM catalog "  # noqa: S608
                               f"WHERE {q} IS NOT NULL AND {scope} GROUP BY b", [lo, width, bins - 1]).fetchall()
            counts = [0] * bins
            for b, n in rows:
                counts[int(b)] = int(n)
            return {"kind": "range", "min": plain(lo), "max": plain(hi),
                    "histogram": {"edges": [float(lo + i * width) for i in range(bins + 1)], "counts": counts},
                    "quantiles": self._quantiles(cur, column)}
        rows = cur.execute(f"SELECT {q} AS v, count(*) AS n FROM catalog WHERE {q} IS NOT NULL AND {scope} "  # noqa: S608
                           f"GROUP BY v ORDER BY n DESC, v LIMIT ?", [top]).fetchall()
        return {"kind": "values", "values": [{"value": plain(v), "count": int(n)} for v, n in rows]}

    def _quantiles(self, cur, column: str) -> list[Any]:
        """A numeric column's QUANTILES + 1 quantiles over all items, kept until the rows change (they do not depend
        on the filters, and sorting a million values takes a quarter of a second)."""
        key = ("quantiles", column)
        if key not in self._facets:
            q = '"' + column.replace('"', '""') + '"'
            points = [i / QUANTILES for i in range(QUANTILES + 1)]
            values = cur.execute(f"SELECT quantile_disc({q}, ?) FROM catalog", [points]).fetchone()[0]  # noqa: S608
            self._facets[key] = [plain(v) for v in values or []]
        return list(self._facets[key])

    def facet_columns(self, limit: int = 6, max_values: int = 50) -> list[str]:
        """Columns worth offering as filters when the config names none: numbers, and text with
        2..``max_values`` distinct values (not the id, not long texts), fewest values first."""
        key = ("columns", limit, max_values)  # kept with the facets until the rows change
        if key not in self._facets:
            self._facets[key] = self._choose_facet_columns(limit, max_values)
        return list(self._facets[key])

    def _choose_facet_columns(self, limit: int, max_values: int) -> list[str]:
        table = _public(self.table).drop(columns=["id", "image", "title", "description"], errors="ignore")
        chosen = []
        for column in table.columns:
            values = table[column].dropna()
            distinct = values.nunique()
            numeric = pd.api.types.is_numeric_dtype(values.dtype) and not pd.api.types.is_bool_dtype(values.dtype)
            if distinct >= 2 and (numeric or distinct <= max_values):
                chosen.append((numeric, distinct if not numeric else 0, column))
        return [c for _, _, c in sorted(chosen)][:limit]

    def _filter_table(self):
        """A DuckDB connection holding the rows as table ``catalog``, with external access off."""
        import duckdb

        con = duckdb.connect()
        # A table, not a registered view: cursors (one per query, for threads) share tables only.
        con.register("items_view", self.table.drop(columns=[IMAGE_SOURCE], errors="ignore"))
        con.execute("CREATE TABLE catalog AS SELECT * FROM items_view")
        con.unregister("items_view")
        con.execute("SET enable_external_access = false")  # a filter must never read files or URLs
        con.execute("SET lock_configuration = true")
        return con

    def results(self, keys: np.ndarray, scores: np.ndarray, columns: dict[str, np.ndarray] | None = None) -> pd.DataFrame:
        """Result rows in the given order: rank, id, score, ``columns`` (name -> a value per row, in their order:
        matched, the hybrid scores), then the catalog columns."""
        if self._columns is None:
            # Cached once per change of the rows, laid out as results are: rank, id, score,
            # catalog columns, with text as plain objects (taking rows of pandas' arrow-backed
            # strings, or inserting columns, costs several times more per query).
            table = _public(self.table)
            table = table.astype({c: object for c, dtype in table.dtypes.items() if isinstance(dtype, pd.StringDtype)})
            table.insert(0, "rank", 0)
            table.insert(2, "score", np.float32(0))
            self._columns = (self.keys, {(): table})
        item_keys, layouts = self._columns
        columns = columns or {}
        names = tuple(columns)
        if names not in layouts:  # the added columns laid out once too: a column set on rows taken costs less than an insert
            table = layouts[()].copy(deep=False)
            for at, name in enumerate(names, start=3):
                table.insert(at, name, np.float32(0))
            layouts[names] = table
        frame = layouts[names].take(np.searchsorted(item_keys, keys))
        frame.index = pd.RangeIndex(len(frame))
        frame["rank"] = np.arange(1, len(frame) + 1)
        frame["score"] = np.asarray(scores, np.float32)
        for name, values in columns.items():
            frame[name] = values
        return frame

    # ---------------------------------------------------------------- files

    def stored_features(self) -> tuple[str, ...]:
        """The names of the row-aligned feature arrays: FEATURES, and REGIONS where the items have region vectors."""
        return FEATURES + (REGIONS if self.regions != "none" else ())

    def describe(self) -> dict[str, Any]:
        return {"count": len(self), "next_key": int(self.next_key), "key_column": KEY, "declared_columns": list(self.declared),
                **({"image_regions": self.regions} if self.regions != "none" else {})}

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        (folder / "features").mkdir(parents=True, exist_ok=True)
        self.table.to_parquet(folder / "catalog.parquet", index=False)
        for name in self.stored_features():
            np.save(folder / "features" / f"{name}.npy", self.features[name], allow_pickle=False)
        np.save(folder / HASHES_FILE, self.hashes, allow_pickle=False)

    @classmethod
    def load(cls, folder: str | Path, described: dict[str, Any]) -> ItemStore:
        folder = Path(folder)
        store = cls()
        store.table = pd.read_parquet(folder / "catalog.parquet")
        store.regions = described.get("image_regions", "none")  # saves before regions had none
        store.features = {name: np.load(folder / "features" / f"{name}.npy", allow_pickle=False) for name in store.stored_features()}
        hashes = folder / HASHES_FILE  # saves before upserts had none: every item counts as changed
        store.hashes = np.load(hashes, allow_pickle=False) if hashes.is_file() else np.zeros(len(store.table), HASH_DTYPE)
        store.next_key = int(described["next_key"])
        declared = described.get("declared_columns")  # saves made before: every column they hold counts as declared
        store.declared = tuple(declared) if declared is not None else tuple(store.public().columns)
        if (any(len(v) != len(store) for v in store.features.values()) or len(store.hashes) != len(store)
                or store.keys.max(initial=-1) >= store.next_key):
            raise IndexLoadError(f"{folder}: catalog and features disagree on the number of items")
        store._changed()
        return store


def _shown(where: str | None, filters: dict[str, Any] | None) -> tuple[str, str]:
    """What a filter's error calls it ("where", "filters" or both) and shows of it (cut at 200 characters)."""
    shown = [(name, text if len(text) <= 200 else text[:200] + "...") for name, text in
             (("where", repr(where)), ("filters", json.dumps(filters, default=str))) if text not in ("None", "null", "{}")]
    return " and ".join(n for n, _ in shown) or "where", " and ".join(t for _, t in shown)


def _public(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.drop(columns=[c for c in frame.columns if c.startswith("_")])


def _storable(rows: pd.DataFrame) -> pd.DataFrame:
    """The rows with each metadata column of mixed kinds (1 and "cheap"; a date and a word; a list and
    a number: a DataFrame or JSON catalog can hold them) kept as the text of its values, as a CSV
    would give them: parquet stores one type per column, and a filter compares one type."""
    import pyarrow as pa

    out = rows.copy()
    for column in out.columns:
        if column == "id" or out[column].dtype != object:
            continue
        try:
            pa.array(out[column], from_pandas=True)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OverflowError):
            logger.warning("column %r mixes kinds of values; it is kept as text", column)
            out[column] = pd.Series([None if _missing(v) else str(v) for v in out[column]], dtype=object, index=out.index)
    return out


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NaT or value is pd.NA


def _kind(dtype) -> str:
    if pd.api.types.is_bool_dtype(dtype):
        return "boolean"
    if pd.api.types.is_integer_dtype(dtype):
        return "integer"
    if pd.api.types.is_numeric_dtype(dtype):
        return "number"
    if pd.api.types.is_datetime64_any_dtype(dtype):
        return "timestamp"
    return "text" if pd.api.types.is_string_dtype(dtype) else "other"
