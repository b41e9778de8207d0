"""Ingestion: a catalog's rows through the pipeline's stages (pipeline.py), locally or on Ray
(distributed.py), into a shard store, then gathered in catalog order with an :class:`IndexReport`.

    ingest(catalog, embedder, show_progress, cache, engine) -> (Encoded, IndexReport)
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .catalog import Catalog, SkippedRow, plain
from .config import RetrieverConfig
from .errors import ConfigError
from .pipeline import STAGES, Row, ShardEncoder, ShardStore, StageClock, encode_regions, hash_rows, plan_threads

if TYPE_CHECKING:
    from .embedder import Embedder

logger = logging.getLogger(__name__)


REPORT_STAGES = ("hash", *STAGES, "index")  # load models, read/decode, image, text, zero-shot, write shards, build index


@dataclass
class IndexReport:
    """What ``index``/``add``/``upsert`` did: counts, per-stage seconds, every skipped row with its
    reason, every row indexed without its image that had one (``warnings``), and where the images came from.

    Counts are of catalog rows: ``encoded + cached + skipped`` = the rows read (for ``upsert``:
    the rows it had to encode, plus the rows the catalog left out); ``text_only`` of the indexed rows have no
    image in the index, whatever the reason (no image column, an empty cell, an image that failed); ``images``
    of the rows read named an image.

    ``seconds``: per stage (REPORT_STAGES): hashing the rows, loading the models, reading (decoding and resizing
    images), image encoding, text encoding, zero-shot vectors, writing shards, building the index. A stage's
    seconds are summed over its threads, and reading, image and text encoding run at once, so they may add up to
    more than ``elapsed``, the wall-clock seconds of the whole call: hashing, then the pipeline (``encoding``:
    loading the models to the encoded arrays), then building the index.
    """

    indexed: int = 0
    skipped: list[SkippedRow] = field(default_factory=list)
    encoded: int = 0  # rows indexed whose content was encoded in this run
    cached: int = 0  # rows indexed whose content came from the shard cache (unchanged since an earlier run)
    warnings: list[SkippedRow] = field(default_factory=list)  # rows indexed by their text, their image failing
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(REPORT_STAGES, 0.0))
    encoding: float = 0.0  # wall-clock seconds from loading the models to the encoded arrays
    changes: dict[str, int] = field(default_factory=dict)  # upsert: added, replaced, updated, unchanged, removed
    text_only: int = 0  # rows indexed without an image
    images: int = 0  # rows read that named an image (a path or URL)
    image_column: str | None = None  # the catalog column the images came from (None: none, or a folder's files)
    images_note: str | None = None  # that, in words (Catalog.images_note)

    @property
    def no_image_used(self) -> bool:
        """Rows named images, yet every row indexed is indexed without one (each image failed)."""
        return self.images > 0 and self.indexed == self.text_only

    @property
    def elapsed(self) -> float:
        """Wall-clock seconds of the call (hashing, the pipeline and building the index run one after the other)."""
        return self.seconds.get("hash", 0.0) + self.encoding + self.seconds.get("index", 0.0)

    @property
    def total_seconds(self) -> float:
        return self.elapsed

    @property
    def items_per_second(self) -> float:
        return self.indexed / self.elapsed if self.elapsed else 0.0

    def skipped_frame(self) -> pd.DataFrame:
        return pd.DataFrame([vars(s) for s in self.skipped], columns=["row", "id", "reason"])

    def to_dict(self) -> dict[str, Any]:
        rows = lambda found: [{"row": s.row, "id": s.id, "reason": s.reason} for s in found]  # noqa: E731
        return {"indexed": self.indexed, "encoded": self.encoded, "cached": self.cached, "text_only": self.text_only,
                "images": self.images, "image_column": self.image_column,
                **({"changes": dict(self.changes)} if self.changes else {}), "elapsed": round(self.elapsed, 3),
                "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
                "skipped": rows(self.skipped), "warnings": rows(self.warnings)}

    def __str__(self) -> str:
        stages = ", ".join(f"{k.replace('_', '-')} {v:.1f}" for k, v in self.seconds.items())
        lines = [f"indexed {self.indexed} items in {self.elapsed:.1f} s ({self.items_per_second:.1f} items/s); "
                 f"encoded {self.encoded}, from cache {self.cached}, text only {self.text_only}, skipped {len(self.skipped)}",
                 f"  seconds per stage (reading and encoding overlap): {stages}"]
        if self.images_note:
            lines.append(f"  {self.images_note}")
        if self.changes:
            lines.append("  " + ", ".join(f"{k} {v}" for k, v in self.changes.items()))
        lines += [f"  skipped {s}" for s in self.skipped]
        lines += [f"  warning {s}" for s in self.warnings]
        return "\n".join(lines)


@dataclass
class UpdateReport:
    """What ``Retriever.update`` did to one item: the columns whose values changed ("image": its photo, given anew),
    and whether its image or text changed, so that it was encoded again (else its row changed in place, or nothing
    did). ``warnings``: as in IndexReport (a new text with a photo that is no longer readable keeps its indexed vectors)."""

    id: Any
    changed: list[str] = field(default_factory=list)
    reencoded: bool = False
    warnings: list[SkippedRow] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def unchanged(self) -> bool:
        """Nothing was written: every value given was the item's already."""
        return not self.changed and not self.reencoded

    def to_dict(self) -> dict[str, Any]:
        return {"id": plain(self.id), "changed": list(self.changed), "reencoded": self.reencoded,
                "warnings": [{"row": w.row, "id": w.id, "reason": w.reason} for w in self.warnings],
                "seconds": round(self.seconds, 3)}

    def __str__(self) -> str:
        what = ("encoded again" if self.reencoded else "updated in place") if not self.unchanged else "unchanged"
        lines = [f"item {plain(self.id)!r}: {what}" + (f"; changed: {', '.join(self.changed)}" if self.changed else "")]
        return "\n".join(lines + [f"  warning {w}" for w in self.warnings])


@dataclass
class PipelineResult:
    hashes: list[str]
    errors: dict[int, str]  # catalog row -> reason it was skipped
    warnings: dict[int, str]  # catalog row -> why it was indexed without its image
    fresh: set[str]  # hashes encoded in this run (the rest came from the store)
    seconds: dict[str, float]


def run(embedder: Embedder, rows: list[Row], store: ShardStore, shard_size: int = 1024, workers: int = 0,
        engine: str = "local", show_progress: bool | None = None, clock: StageClock | None = None) -> PipelineResult:
    """Encode every row not yet in ``store`` and write it as shards; see the module docstring. ``workers``: reader
    threads (0: pipeline.plan_threads); ``clock`` gathers each stage's seconds (PipelineResult.seconds)."""
    from .utils import progress_bar

    if engine not in ("local", "ray"):
        raise ConfigError(f"unknown ingest engine {engine!r}; choose 'local' or 'ray'")
    if shard_size % embedder.config.encoders.batch_size:
        raise ConfigError("ingest.shard_size must be a multiple of encoders.batch_size (so a resumed run batches alike)")
    clock = clock or StageClock()
    todo, seen = [], set()
    for r in rows:  # duplicates of one content are encoded once
        if r.hash not in store and r.hash not in seen:
            todo.append(r)
            seen.add(r.hash)
    if todo and engine == "ray":
        from .distributed import encode_with_ray

        with clock("image"):  # the actors read and encode: their stages are not seen from here
            encode_with_ray(embedder.config, todo, store, shard_size, show_progress)
            store.refresh()
    elif todo:
        from .encoders.runtime import on_gpu

        with clock("load"):
            embedder.image_encoder.open_bulk()
            embedder.text_encoder.open_bulk()
        runtime = embedder.image_encoder.runtime
        threads = plan_threads(workers, runtime, runtime == "onnx" and on_gpu())
        encoder = ShardEncoder(embedder, show_progress=show_progress, threads=threads, clock=clock)
        with ThreadPoolExecutor(max_workers=encoder.threads.read, thread_name_prefix="read") as pool, \
                progress_bar(len(todo), "encoding", show_progress, unit="item") as bar:
            for start in range(0, len(todo), shard_size):
                chunk = todo[start:start + shard_size]
                outcomes, arrays = encoder.encode(chunk, pool, bar.update)
                with clock("write"):
                    store.write([r.hash for r in chunk], outcomes, arrays)
                bar.update(len(chunk) - int(arrays["image_mask"][:, 0].sum()))  # rows with an image were counted per batch
        embedder.image_encoder.release_memory()  # before the index is built: the peak of a large run
        embedder.text_encoder.release_memory()
    errors = {r.row: store.error(r.hash) for r in rows if store.error(r.hash) is not None}
    warnings = {r.row: store.warning(r.hash) for r in rows if store.warning(r.hash) is not None}
    fresh = {r.hash for r in todo}
    return PipelineResult([r.hash for r in rows], errors, warnings, fresh, dict(clock.seconds))


@dataclass
class Encoded:
    """The encoded rows of a catalog: their positions, image sources, content hashes and arrays (ARRAYS)."""

    rows: np.ndarray  # catalog positions of the rows that encoded, in order
    sources: list[str | None]  # every catalog row's resolved image source
    arrays: dict[str, np.ndarray]  # row-aligned with ``rows``
    hashes: list[str | None] = field(default_factory=list)  # row-aligned with ``rows``; None: encode again next time

    def text_only(self) -> int:
        """How many of the encoded rows have no image."""
        return int((~self.arrays["image_mask"][:, 0].astype(bool)).sum()) if len(self.rows) else 0


def hash_catalog(catalog: Catalog, config: RetrieverConfig) -> list[str]:
    """Every row's content hash (pipeline.content_hash): its image file's bytes (a URL: the URL) and its text."""
    return hash_rows(catalog.image_sources(), catalog.texts(), config.catalog.max_image_bytes, plan_threads(config.ingest.workers).read)


def ingest(catalog: Catalog, embedder: Embedder, show_progress: bool | None = None, cache: str | Path | None = None,
           engine: str | None = None, hashes: list[str] | None = None) -> tuple[Encoded, IndexReport]:
    """Hash, read, encode and write a catalog's rows (see the module docstring), then gather them.

    Args:
        cache: a folder for the encoded shards: items whose image bytes and text are
            unchanged since a run with the same folder are not encoded again, and a killed
            run resumes from its last complete shard. Default: a temporary folder, removed.
        engine: "local" or "ray" (default: the config's ``ingest.engine``).
        hashes: the rows' content hashes, if already computed (``hash_catalog``).
    """
    import tempfile
    from contextlib import nullcontext

    cfg: RetrieverConfig = embedder.config
    report = described(IndexReport(), catalog)
    sources, texts = catalog.image_sources(), catalog.texts()
    report.images = sum(s is not None for s in sources)
    t0 = time.perf_counter()
    if hashes is None:
        hashes = hash_rows(sources, texts, cfg.catalog.max_image_bytes, plan_threads(cfg.ingest.workers).read)
        report.seconds["hash"] = time.perf_counter() - t0
    rows = [Row(i, h, s, t) for i, (h, s, t) in enumerate(zip(hashes, sources, texts))]
    t1, clock = time.perf_counter(), StageClock()
    with clock("load"):
        fingerprint = embedder.fingerprint()  # loads the models on first use
    with nullcontext(cache) if cache is not None else tempfile.TemporaryDirectory(prefix="multiretrieval-shards-") as root:
        store = ShardStore.open(root, fingerprint)
        result = run(embedder, rows, store, cfg.ingest.shard_size, cfg.ingest.workers, engine or cfg.ingest.engine, show_progress,
                     clock)
        ok = np.array([i for i in range(len(rows)) if i not in result.errors], dtype=np.int64)
        with clock("write"):  # reading the shards back is the writer's side of the store
            arrays = store.gather([hashes[i] for i in ok]) if len(ok) else embedder.empty_arrays(0)
        kept = [None if store.retried(hashes[i]) else hashes[i] for i in ok]
        if embedder.regions != "none":
            regions = _encode_regions(embedder, [rows[i] for i in ok if i not in result.warnings], root, show_progress, clock)
            with clock("write"):
                arrays.update(_gather_regions(regions, embedder, [hashes[i] for i in ok]))
            kept = [None if h is not None and regions.retried(h) else h for h in kept]
    report.seconds.update(clock.seconds)
    report.encoding = time.perf_counter() - t1
    report.encoded = sum(hashes[i] in result.fresh for i in ok)
    report.cached = len(ok) - report.encoded
    ids, numbers = catalog.df["id"], catalog.row_numbers  # reports name rows of the table read
    failed = [SkippedRow(int(numbers[row]), plain(ids.iloc[row]), reason) for row, reason in sorted(result.errors.items())]
    report.skipped = sorted(catalog.dropped + failed, key=lambda s: s.row)  # with the rows the catalog left out
    report.warnings = [SkippedRow(int(numbers[row]), plain(ids.iloc[row]), reason) for row, reason in sorted(result.warnings.items())]
    encoded = Encoded(ok, sources, arrays, kept)
    report.text_only = encoded.text_only()
    return encoded, report


def _encode_regions(embedder: Embedder, rows: list[Row], root: str | Path, show_progress: bool | None,
                    clock: StageClock) -> ShardStore:
    """The region stage (pipeline.encode_regions) over the rows indexed with their photo, into its own store under
    ``root`` (keyed by Embedder.region_fingerprint), which it returns."""
    from .embedder import REGIONS

    cfg = embedder.config
    store = ShardStore.open(root, embedder.region_fingerprint(), REGIONS)
    encode_regions(embedder, rows, store, cfg.ingest.shard_size, plan_threads(cfg.ingest.workers).read, show_progress, clock)
    return store


def _gather_regions(store: ShardStore, embedder: Embedder, hashes: list[str]) -> dict[str, np.ndarray]:
    """The region arrays of these hashes, row-aligned; none (a mask of False) for those not in the store."""
    from .embedder import REGIONS
    from .regions import REGION_DTYPE, recipe_size

    size, dim = recipe_size(embedder.regions), embedder.dims()[0]
    out = {"region_vectors": np.zeros((len(hashes), size, dim), REGION_DTYPE), "region_mask": np.zeros((len(hashes), size), bool)}
    found = [j for j, h in enumerate(hashes) if h in store]
    if found:
        stored = store.gather([hashes[j] for j in found])
        for key in REGIONS:
            out[key][found] = stored[key]
    return out


def described(report: IndexReport, catalog: Catalog) -> IndexReport:
    """The report with where the catalog's images come from."""
    report.image_column = catalog.image_column if catalog.image_found != "folder" else None
    report.images_note = catalog.images_note()
    return report


def ingest_rows(catalog: Catalog, rows: np.ndarray, hashes: list[str], embedder: Embedder, show_progress: bool | None = None,
                cache: str | Path | None = None, engine: str | None = None) -> tuple[Catalog, Encoded, IndexReport]:
    """Encode only these rows of a catalog (an upsert's new and changed ones), given every row's hash.
    Returns the sub-catalog they make (its ``row_numbers`` the catalog's: so are the report's rows), its encoded
    rows, and the report."""
    part = catalog.subset(rows)
    if not len(part):  # nothing new or changed: no model is loaded, no shard store opened
        encoded, report = Encoded(np.zeros(0, np.int64), part.image_sources(), {}, []), described(IndexReport(), catalog)
    else:
        encoded, report = ingest(part, embedder, show_progress, cache, engine, hashes=[hashes[i] for i in rows])
    report.skipped = sorted(catalog.dropped + report.skipped, key=lambda s: s.row)
    return part, encoded, report
