"""The Retriever: a facade that wires the rooms together and delegates, one direction of data flow.

    catalog -> ingest.ingest (Embedder) -> Collection: ItemStore + IndexSet (FAISS per space) + KeywordIndex (BM25)
    query   -> query.SearchOptions -> query.make_query -> query.Searcher (Embedder, Collection) -> result rows
    files   -> persistence.write_folder / read_folder over each component's own save and load

Thread-safe: searches run concurrently; a write encodes first, then holds searches off while it changes them.
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

from .catalog import Catalog, ImageInput, load_image, plain
from .collection import Collection
from .config import RetrieverConfig
from .embedder import Embedder
from .errors import CatalogError, ImageError, ItemNotFoundError, MultiretrievalError, QueryError
from .ingest import IndexReport, UpdateReport, hash_catalog, ingest, ingest_rows
from .items import ItemStore
from .persistence import MANIFEST, FolderLock, component_folder, component_record, read_folder, uploads_path, write_folder
from .query.checks import batch_query, check_batch, check_filters, check_where, encode_inputs, make_query
from .query.options import MODES, SearchOptions
from .query.searcher import Searcher
from .utils import ReadWriteLock

__all__ = ["MODES", "IndexReport", "Retriever", "UpdateReport"]
logger = logging.getLogger(__name__)
UPDATE_ATTEMPTS = 5  # an update made again on the item's new values when another write came in between


class Retriever:
    """Multimodal product retrieval over one catalog.

    Args:
        config: a :class:`RetrieverConfig` (default: the packaged offline models; ``configs/default.yaml``).
        embedder: the models (default: an :class:`Embedder` of ``config``; they load on first use).
    """

    def __init__(self, config: RetrieverConfig | None = None, embedder: Embedder | None = None) -> None:
        self.embedder = embedder or Embedder(config)
        self.collection = Collection(self.config)
        self.last_report: IndexReport | None = None  # of the latest index/add/upsert; saved as index-report.json
        self.saved_note: dict[str, Any] = {}  # the note of the save this retriever was loaded from
        # Where images given as bytes are kept (update): beside the folder this retriever was loaded from or first saved to.
        self.uploads: Path | None = None
        self._lock = ReadWriteLock()
        self._engine: Searcher | None = None

    @classmethod
    def from_config(cls, path: str | Path) -> Retriever:  # a YAML config file
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
    store = property(lambda self: self.collection.store)  # rows, features, hashes (items.ItemStore)
    indexes = property(lambda self: self.collection.indexes)  # FAISS per space (index.IndexSet)

    # ---------------------------------------------------------------- the indexed items

    def __len__(self) -> int:
        return len(self.store)

    @property
    def items(self) -> pd.DataFrame:
        """The indexed catalog rows (public columns only)."""
        return self.store.public()

    def features(self) -> dict[str, np.ndarray]:  # encoder outputs, row-aligned with items: tokens and masks (fusion.py)
        return dict(self.store.features)

    def vectors(self, space: str = "joint", ids: list[Any] | None = None) -> np.ndarray:
        """Stored (n, d) vectors of all items (``items`` order) or these ids in "joint", "clip_image" or "clip_text" (0: none)."""
        return self._reading(self.collection.vectors, space, ids)

    def get(self, item_id: Any) -> dict[str, Any]:
        """One indexed item's catalog row as a dict."""
        return self._reading(self.store.get, item_id)

    def image_source(self, item_id: Any) -> str | None:
        """The resolved image path or URL of an indexed item (None if it has no image)."""
        return self._reading(self.store.image_source, item_id)

    def image_sources(self) -> pd.Series:
        """The resolved image path or URL of every indexed item (None where it has none), by id."""
        return self._reading(self.store.image_sources)

    def has_image(self, ids: list[Any]) -> np.ndarray:
        """Whether each item was indexed with its photo: False where it has none, where its photo could not be read
        (it is searched by its text), and for an id not in the index."""
        return self._reading(self.store.has_image, list(ids))

    def _reading(self, read, *args):
        with self._lock.reading():
            return read(*args)

    # ---------------------------------------------------------------- writes

    def index(self, catalog: Catalog | pd.DataFrame | str | Path, show_progress: bool | None = None,
              cache: str | Path | None = None, engine: str | None = None) -> IndexReport:
        """Index a catalog (Catalog, DataFrame, or a CSV, parquet, JSON (Lines) file or image folder) from scratch, replacing
        what was held once every row is encoded. ``cache``: shards kept for re-runs and resumes; ``engine``: "local" | "ray".
        Rows that cannot be indexed (an empty or repeated id, neither image nor text, an image that fails with no text)
        are left out and listed in ``report.skipped`` with the reason."""
        catalog = self._catalog(catalog)
        ItemStore().check_columns(list(catalog.df.columns), self.config.catalog)  # a new index: catalog.max_columns
        return self._ingest(catalog, show_progress, cache, engine, replace=True)

    def add(self, catalog: Catalog | pd.DataFrame | str | Path, show_progress: bool | None = None,
            cache: str | Path | None = None, engine: str | None = None) -> IndexReport:
        """Encode and add more items (``cache``, ``engine``: as for ``index``); rows that fail are reported and skipped.
        Raises CatalogError when an id is already indexed (see ``upsert``), or an id or a value does not fit the indexed ones."""
        catalog = self._catalog(catalog)
        with self._lock.reading():
            self.store.conform(catalog, bounds=self.config.catalog)  # refuse before encoding; checked again when committed
            self.store.check_regions(self.embedder.regions)
        return self._ingest(catalog, show_progress, cache, engine, replace=False)

    def _catalog(self, source: Catalog | pd.DataFrame | str | Path) -> Catalog:
        """A write's catalog: as given, or read with the config's text and image columns, bad rows skipped (reported).
        A DataFrame without the configured image column is read as any other (the service's items: their upload is
        their ``image``; an item may have none)."""
        named = self.config.catalog.image_column
        if isinstance(source, pd.DataFrame) and named not in source.columns:
            named = None
        return Catalog.of(source, self.config.catalog.text_columns, "skip", named)

    def _ingest(self, catalog: Catalog, show_progress, cache, engine, replace: bool, embedder: Embedder | None = None) -> IndexReport:
        # The retriever changes only after every row is encoded: an error or Ctrl-C midway leaves it as it was.
        embedder = embedder or self.embedder
        encoded, report = ingest(catalog, embedder, show_progress, cache, engine)
        t0 = time.perf_counter()
        with self._lock.writing():
            collection = Collection(embedder.config) if replace else self.collection
            if not replace:
                collection.store.conform(catalog, bounds=embedder.config.catalog)
            if len(encoded.rows) or replace:
                collection.commit(catalog, encoded, embedder)
            self.embedder, self.collection = embedder, collection
        return self._reported(report, encoded, t0)

    def _reported(self, report: IndexReport, encoded, t0: float) -> IndexReport:
        report.indexed, report.seconds["index"] = len(encoded.rows), time.perf_counter() - t0
        report.text_only = encoded.text_only()  # of the rows committed (an upsert keeps some rows' indexed images)
        self.last_report = report
        logger.info("%s", report)
        return report

    def upsert(self, catalog: Catalog | pd.DataFrame | str | Path, prune: bool = False, show_progress: bool | None = None,
               cache: str | Path | None = None, engine: str | None = None) -> IndexReport:
        """Change only what changed: new ids added, changed content (image bytes or URL, text) encoded again, metadata
        changed in place, the rest untouched; ``prune``: ids missing from the catalog removed. Indexes change in place
        (rebuilt only when the automatic kind changes with the size); ``report.changes`` counts each kind. A row
        replaces its item's whole row: a column it leaves empty is emptied (``update`` changes some values only)."""
        return self._upsert(self._catalog(catalog), prune, show_progress, cache, engine)

    def _upsert(self, catalog: Catalog, prune: bool, show_progress, cache, engine, hashes: list[str] | None = None,
                check=None, since: tuple[ItemStore, int] | None = None, done=None) -> IndexReport | None:
        """An upsert of a catalog read already (``hashes``: its rows' content hashes, if known). ``check(part,
        encoded, report)`` may refuse the encoded rows (raising) before anything changes; ``since``: the store and
        its version the rows were made from: None is returned, and nothing changed, if another write came in
        between; ``done()`` runs under the write lock once the upsert is applied."""
        t0 = time.perf_counter()
        hashes = hashes if hashes is not None else hash_catalog(catalog, self.config)  # reads every image file: outside the lock
        with self._lock.reading():
            self.store.conform(catalog, allow_existing=True, bounds=self.config.catalog)
            self.store.check_regions(self.embedder.regions)
            plan = self.collection.plan_upsert(catalog, hashes, prune)
        part, encoded, report = ingest_rows(catalog, plan.encode, hashes, self.embedder, show_progress, cache, engine)
        if check is not None:
            check(part, encoded, report)
        with self._lock.reading():
            encoded, kept = self.collection.keep_indexed_images(part, encoded, report)
        report.seconds["hash"], t1 = time.perf_counter() - t0 - report.total_seconds, time.perf_counter()
        with self._lock.writing():
            if since is not None and (self.store is not since[0] or self.store.version != since[1]):
                return None
            self.store.check_columns(list(catalog.df.columns), self.config.catalog)  # again: another write may have added some
            if len(encoded.rows) or self.indexes:
                report.changes = self.collection.apply_upsert(plan, catalog, part, encoded, self.embedder, plan.encode[kept])
            if done is not None:
                done()
        return self._reported(report, encoded, t1)

    def update(self, item_id: Any, /, **fields: Any) -> UpdateReport:
        """Change some values of one indexed item (a partial update; the service's PATCH /items/{id}): each given
        column takes its value, ``None`` empties it, the others keep theirs. ``image=`` a new photo: a path, URL,
        bytes or PIL image (bytes and images are kept as files in ``uploads``); ``image=None``: no photo any more.
        Metadata alone changes in place; a new image or text encodes the item again (the upsert's machinery).

        Returns an UpdateReport (the columns that changed, whether it was encoded again). Raises, and changes nothing:
        ItemNotFoundError for an unknown id; CatalogError for a value that does not fit its column, a column over
        ``catalog.max_new_columns``, another id, or an item that would be left with neither image nor text;
        ImageError for a new image that cannot be read."""
        t0 = time.perf_counter()
        self._reading(self.store.keys_for, [item_id])  # ItemNotFoundError before anything else
        fields = dict(fields)
        nested = next((c for c, v in fields.items() if isinstance(v, (list, dict, set, tuple))), None)
        if nested is not None:
            raise CatalogError(f"update of item {item_id!r}: column {nested!r} holds a {type(fields[nested]).__name__}; "
                               "a catalog value is a text, a number, a boolean, a date or None")
        image_given = "image" in fields
        image = fields.pop("image", None)
        image = str(image) if isinstance(image, Path) else image
        image = None if isinstance(image, str) and not image.strip() else image  # an empty cell: no photo, as in a catalog
        if image is not None and not isinstance(image, str):
            image = str(self._keep_image(image))
        text_columns = self.config.catalog.text_columns
        # Content unchanged: its stored hash stands (no file read, nothing encoded); new content is hashed as upsert does.
        content = image_given or any(c in fields for c in text_columns)
        for _ in range(UPDATE_ATTEMPTS):  # another write to the index between reading the item and writing it: again
            with self._lock.reading():
                store, position = self.store, self.store.id_positions().get(str(item_id))
                if position is None:
                    raise ItemNotFoundError(f"id(s) not in the index: {[item_id]}")
                old, source = store.get(item_id), store.image_source(item_id)
                version, stored_hash = store.version, store.hashes[position].decode()
            after: dict[str, Any] = {}

            def check(part: Catalog, encoded, report: IndexReport) -> None:
                if report.skipped:
                    raise CatalogError(f"update of item {item_id!r}: {report.skipped[0].reason}")
                if image_given and image is not None and len(encoded.rows) and not encoded.arrays["image_mask"][0, 0]:
                    reason = report.warnings[0].reason.replace("indexed by its text only: ", "") if report.warnings else "unreadable"
                    raise ImageError(f"update of item {item_id!r}: image: {reason}")

            def done() -> None:
                after.update(row=self.store.get(item_id), source=self.store.image_source(item_id))

            try:
                catalog = self._updated_row(item_id, old, source, fields, image, image_given)
                hashes = hash_catalog(catalog, self.config) if content else [stored_hash]
                report = self._upsert(catalog, False, False, None, None, hashes=hashes, check=check, since=(store, version),
                                      done=done)
            except CatalogError as exc:  # a value the stored rows refuse: named for the item, not for "row 0"
                text = str(exc)
                if text.startswith("update of item"):
                    raise
                raise CatalogError(f"update of item {item_id!r}: {text.removeprefix('row 0: ')}") from None
            if report is not None:
                changed = [c for c in dict.fromkeys([*old, *after["row"]]) if not _same_value(old.get(c), after["row"].get(c))]
                if source != after["source"] and "image" not in changed:
                    changed.append("image")
                return UpdateReport(plain(old["id"]), changed, bool(report.changes.get("replaced")), report.warnings,
                                    time.perf_counter() - t0)
        raise MultiretrievalError(f"update of item {item_id!r}: other writes kept changing the index; try again")

    def _updated_row(self, item_id: Any, old: dict[str, Any], source: str | None, fields: dict[str, Any], image: str | None,
                     image_given: bool) -> Catalog:
        """The one-row catalog of an item's stored row with ``fields`` (and ``image``) in place of its values."""
        if "id" in fields and str(fields["id"]) != str(old["id"]):
            raise CatalogError(f"update of item {item_id!r}: id {fields['id']!r} is another id; an item's id does not change")
        row = {**old, **{c: v for c, v in fields.items() if c != "id"}, "image": image if image_given else old.get("image")}
        catalog = Catalog(pd.DataFrame([row]), text_columns=self.config.catalog.text_columns, bad_rows="skip",
                          image_column="image")
        if catalog.dropped:
            raise CatalogError(f"update of item {item_id!r}: it would have {catalog.dropped[0].reason}; an item needs an "
                               "image or a text")
        if not image_given:
            catalog.sources = [source]  # its photo as resolved when it was indexed (the column may hold a relative path)
            if "image" not in old:
                catalog.df = catalog.df.drop(columns="image")  # an index without images gains no empty column
        return catalog

    def _keep_image(self, image: Any) -> Path:
        """A photo given as bytes or a PIL image, checked and kept as a file in ``uploads`` (named by its sha256)."""
        import hashlib
        import io

        from PIL import Image

        from .catalog import load_image
        from .persistence import write_durably

        bounds = self.config.catalog
        if isinstance(image, Image.Image):
            buffer = io.BytesIO()
            load_image(image, bounds.max_image_pixels).save(buffer, format="PNG")
            data = buffer.getvalue()
        elif isinstance(image, (bytes, bytearray, memoryview)):
            data = bytes(image)
            load_image(data, bounds.max_image_pixels, bounds.max_image_bytes)  # refused before anything is kept
        else:
            raise ImageError(f"image: a path, URL, bytes or a PIL image, not {type(image).__name__}")
        if self.uploads is None:
            raise CatalogError("an image given as bytes or a PIL image is kept as a file beside the index folder (INDEX.uploads): "
                               "save this retriever first (or load it), or give the image as a path or URL")
        path = self.uploads / f"{hashlib.sha256(data).hexdigest()}.img"
        if not path.is_file():
            write_durably(path, data, "the image")
        return path

    def remove(self, ids: Any) -> int:
        """Remove items by catalog id. Unknown ids raise ItemNotFoundError and nothing is removed."""
        ids = [ids] if isinstance(ids, (str, int, np.integer)) else list(ids)
        with self._lock.writing():
            keys = np.unique(self.store.keys_for(ids))  # an id named twice is one item
            self.collection.remove(keys, self.embedder)
        return len(keys)

    def train(self, out: str | Path | None = None, show_progress: bool | None = None, resume: bool = True) -> dict[str, Any]:
        """Fit the attention fusion on the indexed items' image/text pairs, switch to it, re-embed; the training report.
        ``out``: a folder for the module and checkpoints (default: temporary); ``resume``: continue a run found there."""
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
            self.collection.refit_joint(self.embedder)
        return report

    # ---------------------------------------------------------------- queries

    def search(self, image: ImageInput | None = None, text: str | None = None, mode: str = "auto", k: int = 10,
               where: str | None = None, **options: Any) -> pd.DataFrame:
        """The k best items for a photo (path, URL, bytes or PIL image), a text, or both; scores on one scale (README "Scores").

        ``mode``: "auto" (image+text -> fused, image -> image, text -> item texts, and the images of items
        without text through the zero-shot space), "image", "text", "fused", or "zero-shot" (text against
        item images, image against item texts). ``where``: a condition over catalog columns (filters.py), applied
        before ranking. Options (``query.SearchOptions`` says what each takes): offset, min_score, weights={"image": a,
        "text": b}, not_text, sort_by ("-price"), filters, like=ITEM_ID, vector, hybrid, keyword_weight, unsafe_where,
        crop=(x0, y0, x1, y1) (the part of the photo to search by: fractions of its width and height when all are in
        [0, 1], else pixels); an unknown one is refused naming the nearest. Returns a DataFrame: rank, id, score, the
        catalog columns (and matched, hybrid/vector/keyword/image/text scores where they apply); attrs["has_more"] and
        attrs["total"] (how many items match, every page together)."""
        options = SearchOptions.of(image=image, text=text, mode=mode, k=k, where=where, **options)
        query = make_query(options, self.config, self.embedder.count_tokens)
        return self._reading(lambda: self._searcher()([query])[0])

    def search_batch(self, queries: list[dict[str, Any]]) -> list[pd.DataFrame]:
        """Several searches, each a dict of ``search`` arguments, embedded together (one pass per encoder)."""
        check_batch(len(queries), self.config)
        checked = [batch_query(q, self.config, self.embedder.count_tokens) for q in queries]
        return self._reading(lambda: self._searcher()(checked))

    def _searcher(self) -> Searcher:
        """The query engine over the current embedder and collection (a write may replace either); call it reading."""
        searcher = self._engine
        if searcher is None or searcher.embedder is not self.embedder or searcher.items is not self.collection:
            searcher = self._engine = Searcher(self.embedder, self.collection)
        return searcher

    def salient_box(self, image: ImageInput) -> tuple[float, float, float, float]:
        """The photo's most salient region, (x0, y0, x1, y1) as fractions of its width and height: where the image
        encoder's activations concentrate (regions.py), a default box for ``search(image=..., crop=...)``."""
        from .regions import salient_box

        cat = self.config.catalog
        pil = load_image(image, cat.max_image_pixels, cat.max_image_bytes, cat.download_timeout_s)
        return salient_box(pil, self.embedder.image_encoder)

    def facets(self, columns: list[str] | None = None, where: str | None = None, filters: dict | None = None) -> dict[str, dict]:
        """Value counts (text) or min/max/histogram (numbers) over the items matching ``where`` and ``filters``
        (each column ignoring its own filter), for ``columns`` (default: ``facet_columns()``); bounded as ``search``'s."""
        where = None if isinstance(where, str) and not where.strip() else where
        if where is not None:
            check_where(where, self.config)
        filters = check_filters(filters, self.config)
        return self._reading(self.store.facets, columns or self.facet_columns(), where, filters, self.config.search.filter_timeout_s)

    def facet_columns(self) -> list[str]:
        """The columns offered as filters: ``display.facets``, else chosen from the columns' types and values."""
        return list(self.config.display.facets) or self._reading(self.store.facet_columns)

    def encode(self, images: list[ImageInput] | None = None, texts: list[str] | None = None, space: str = "joint",
               batch_size: int | None = None) -> np.ndarray:
        """Images, texts, or (image, text) pairs -> float32 (n, d), L2-normalised, in the fused space
        ("joint": pairs when both are given) or the zero-shot space ("clip": images or texts, not pairs)."""
        pils, texts = encode_inputs(images, texts, space, self.config)
        return self._reading(self.embedder.embed, pils, texts, space, batch_size)

    def query_vectors(self, images: list[ImageInput] | None = None, texts: list[str] | None = None,
                      weights: np.ndarray | None = None) -> np.ndarray:
        """Joint-space query vectors as ``search`` ranks by them, (n, readings, d): on the score scale against
        ``vectors("joint")`` (an item's own photo scores 1), an item scoring its best reading; (image, text)
        pairs have two under ``fusion.compose`` (composed on the item nearest the photo, and the words alone),
        other queries one. ``weights``: (n, 2) image/text weights of fused queries, NaN rows for the default."""
        pils, texts = encode_inputs(images, texts, "joint", self.config)
        return self._reading(lambda: self._searcher().joint_vectors(pils, texts, weights))

    # ---------------------------------------------------------------- files

    def save(self, folder: str | Path, note: dict[str, Any] | None = None, lock: FolderLock | None = None) -> Path:
        """Save to a folder atomically (a crash, or a full disk: StorageError, leaves the previous save intact);
        ``note``: JSON kept in the manifest. Under the folder's lock: a save waits for another save into the folder
        to end and is refused (IndexBusyError) while a service serves it or ``multiretrieval index`` writes it;
        ``lock``: the folder's FolderLock, when the caller holds it (the service's checkpoints, ``index``)."""
        with self._lock.reading():
            if not self.indexes:
                raise MultiretrievalError("nothing to save: index a catalog first")
            records = {"config": self.config.to_dict(), **self.embedder.describe(), **self.collection.describe(), "note": note or {}}
            report = {"index-report.json": json.dumps(self.last_report.to_dict(), indent=1, default=str)} if self.last_report else {}
            saved = write_folder(Path(folder), {**self.collection.parts(), "fusion": self.embedder.save}, records, report, lock)
        if self.uploads is None:
            self.uploads = uploads_path(saved.resolve())
        return saved

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
        folders = {name: component_folder(folder, manifest, name) for name in ("items", "index", "keywords")}
        retriever.collection = Collection.load(folders, manifest, component_record(manifest, "items"), embedder.config)
        retriever.collection.follow_score_scale(manifest.get("score_scale"), embedder)
        retriever.saved_note = manifest.get("note", {})
        retriever.uploads = uploads_path(folder.resolve())
        return retriever


def _same_value(a: Any, b: Any) -> bool:
    """Two catalog values are the same: both empty, or equal."""
    empty = [v is None or v is pd.NA or v is pd.NaT or (isinstance(v, float) and np.isnan(v)) for v in (a, b)]
    if any(empty):
        return all(empty)
    try:
        return bool(a == b)
    except (TypeError, ValueError):
        return False
