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
from .pipeline import Row, ShardEncoder, ShardStore, hash_rows

if TYPE_CHECKING:
    from .embedder import Embedder

logger = logging.getLogger(__name__)


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


@dataclass
class PipelineResult:
    hashes: list[str]
    errors: dict[int, str]  # catalog row -> reason it was skipped
    encoded: int  # rows encoded in this run (the rest came from the store)
    seconds: dict[str, float]


def run(embedder: Embedder, rows: list[Row], store: ShardStore, shard_size: int = 1024, workers: int = 2,
        engine: str = "local", show_progress: bool | None = None) -> PipelineResult:
    """Encode every row not yet in ``store`` and write it as shards; see the module docstring."""
    from .utils import progress_bar

    if engine not in ("local", "ray"):
        raise ConfigError(f"unknown ingest engine {engine!r}; choose 'local' or 'ray'")
    if shard_size % embedder.config.encoders.batch_size:
        raise ConfigError("ingest.shard_size must be a multiple of encoders.batch_size (so a resumed run batches alike)")
    t0 = time.perf_counter()
    todo, seen = [], set()
    for r in rows:  # duplicates of one content are encoded once
        if r.hash not in store and r.hash not in seen:
            todo.append(r)
            seen.add(r.hash)
    if todo and engine == "ray":
        from .distributed import encode_with_ray

        encode_with_ray(embedder.config, todo, store, shard_size, show_progress)
        store.refresh()
    elif todo:
        encoder = ShardEncoder(embedder)
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool, \
                progress_bar(len(todo), "encoding", show_progress, unit="item") as bar:
            for start in range(0, len(todo), shard_size):
                chunk = todo[start:start + shard_size]
                errors, arrays = encoder.encode(chunk, pool, bar.update)
                store.write([r.hash for r in chunk], errors, arrays)
                bar.update(sum(e is not None or r.source is None for e, r in zip(errors, chunk)))  # the rest counted per batch
        embedder.image_encoder.release_memory()  # before the index is built: the peak of a large run
        embedder.text_encoder.release_memory()
    errors = {r.row: store.error(r.hash) for r in rows if store.error(r.hash) is not None}
    return PipelineResult([r.hash for r in rows], errors, len(todo), {"encode": time.perf_counter() - t0})


@dataclass
class Encoded:
    """The encoded rows of a catalog: their positions, their image sources, and their arrays (ARRAYS)."""

    rows: np.ndarray  # catalog positions of the rows that encoded, in order
    sources: list[str | None]  # every catalog row's resolved image source
    arrays: dict[str, np.ndarray]  # row-aligned with ``rows``


def ingest(catalog: Catalog, embedder: Embedder, show_progress: bool | None = None, cache: str | Path | None = None,
           engine: str | None = None) -> tuple[Encoded, IndexReport]:
    """Hash, read, encode and write a catalog's rows (see the module docstring), then gather them.

    Args:
        cache: a folder for the encoded shards: items whose image bytes and text are
            unchanged since a run with the same folder are not encoded again, and a killed
            run resumes from its last complete shard. Default: a temporary folder, removed.
        engine: "local" or "ray" (default: the config's ``ingest.engine``).
    """
    import tempfile
    from contextlib import nullcontext

    cfg: RetrieverConfig = embedder.config
    report = IndexReport()
    sources, texts = catalog.image_sources(), catalog.texts()
    t0 = time.perf_counter()
    hashes = hash_rows(sources, texts, cfg.catalog.max_image_bytes, cfg.ingest.workers)
    report.seconds["hash"] = time.perf_counter() - t0
    rows = [Row(i, h, s, t) for i, (h, s, t) in enumerate(zip(hashes, sources, texts))]
    with nullcontext(cache) if cache is not None else tempfile.TemporaryDirectory(prefix="multiretrieval-shards-") as root:
        store = ShardStore.open(root, embedder.fingerprint())
        result = run(embedder, rows, store, cfg.ingest.shard_size, cfg.ingest.workers, engine or cfg.ingest.engine, show_progress)
        ok = np.array([i for i in range(len(rows)) if i not in result.errors], dtype=np.int64)
        t1 = time.perf_counter()
        arrays = store.gather([hashes[i] for i in ok]) if len(ok) else embedder.empty_arrays(0)
    report.seconds["encode"] = result.seconds["encode"] + time.perf_counter() - t1
    report.encoded, report.cached = result.encoded, len(set(hashes)) - result.encoded
    report.skipped = [SkippedRow(row, plain(catalog.df["id"].iloc[row]), reason) for row, reason in sorted(result.errors.items())]
    return Encoded(ok, sources, arrays), report
