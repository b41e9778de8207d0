"""The ingestion pipeline: reader -> encoder -> writer, into shards cached by content hash.

1. **Hash.** Every row gets a content hash: its image file's bytes (a URL: the URL) and its
   text. Rows whose hash is already in the shard store cost nothing more.
2. **Read.** Reader threads decode and resize images (PIL and numpy release the GIL) a few
   batches ahead of the encoder, in row order.
3. **Encode.** Images in batches of ``encoders.batch_size``, several batches at once (one per
   core on ONNX Runtime's bulk session, runtime.OnnxModule), while one more thread encodes the
   shard's texts, sorted by length (less padding) and put back in row order; zero-shot vectors
   from the same outputs. How many threads of each: :func:`plan_threads`.
4. **Write.** Every ``shard_size`` new items become one shard: a folder of ``.npy`` arrays
   plus ``items.parquet`` (hash, error, warning, retry), renamed into place when complete. A
   run killed midway restarts from its last complete shard, with the same batches, so it ends
   with the same vectors as an uninterrupted run.

Each stage's seconds are counted (:class:`StageClock`, summed over its threads: reading, image
and text encoding overlap) for the index report.

An item whose image fails but which has a text is encoded by its text alone (a *warning*,
not an error) unless ``catalog.text_when_image_fails`` is off. A row whose image is a URL
that failed (for any reason: the server may come back, the image may appear) is marked
*retry*: the shard keeps it for this run, and later runs encode it again.

The stages, each usable alone: ``hash_rows``/``content_hash`` (1), ``ShardEncoder`` (2-3,
with an :class:`~multiretrieval.embedder.Embedder`'s models) and ``ShardStore`` (4).
:mod:`multiretrieval.ingest` runs them over a catalog, here or on Ray
(:mod:`multiretrieval.distributed`, which writes the same shards).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .catalog import is_url, load_image, open_regular_file, text_problem
from .embedder import FEATURES, REGIONS, ZERO_SHOT
from .errors import ImageError, IndexLoadError
from .persistence import write_failure

if TYPE_CHECKING:
    from .embedder import Embedder

logger = logging.getLogger(__name__)
ARRAYS = FEATURES + ZERO_SHOT


@dataclass(frozen=True)
class Row:
    """One catalog row as the encoder stage sees it."""

    row: int  # position in the catalog, for reports
    hash: str
    source: str | None  # image path or URL
    text: str | None


STAGES = ("load", "read", "image", "text", "zero_shot", "write")  # the pipeline's stages, as the index report names them


class StageClock:
    """Seconds spent in each stage, summed over the threads that run it (thread-safe)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = dict.fromkeys(STAGES, 0.0)
        self._lock = threading.Lock()

    @contextmanager
    def __call__(self, stage: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(stage, time.perf_counter() - t0)

    def add(self, stage: str, seconds: float) -> None:
        with self._lock:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds


@dataclass(frozen=True)
class Threads:
    """How the pipeline spreads over the CPU: reader threads, and image batches encoded at once."""

    read: int
    image: int


def cpu_budget() -> int:
    """The cores the pipeline may use: the process's CPUs, or fewer where OMP_NUM_THREADS says so (a Ray actor's)."""
    from .encoders.runtime import usable_cores

    cores = usable_cores()
    try:
        return max(1, min(cores, int(os.environ["OMP_NUM_THREADS"])))
    except (KeyError, ValueError):
        return cores


def plan_threads(workers: int = 0, runtime: str = "onnx", gpu: bool = False, cores: int | None = None) -> Threads:
    """Threads for ``cores`` (default: ``cpu_budget``). ``workers`` (config ``ingest.workers``) > 0 fixes the readers.

    On a CPU with ONNX Runtime, as many image batches at once as the cores hold bulk runs (runtime.bulk_threads:
    one core each up to 4 cores, two above): the image network is ~70 % of the work, and runs of one thread never
    wait for each other; the readers (a third of the cores, at least 2: ~25 % of the work, mostly outside the GIL)
    and the text thread share the cores with them (their threads sleep when idle, none spins). On a GPU the images
    are encoded two batches at once (one copies while the other runs) and decoding is the work: a reader per core
    but one. Eager PyTorch parallelises inside one batch, so it runs one."""
    from .encoders.runtime import bulk_threads

    cores = cores or cpu_budget()
    if gpu:
        return Threads(read=workers or max(2, cores - 1), image=2)
    read = workers or max(2, cores // 3)
    if runtime != "onnx":
        return Threads(read=read, image=1)
    return Threads(read=read, image=max(1, cores // bulk_threads(cores)))


# ---------------------------------------------------------------- 1. hash


def content_hash(source: str | None, text: str | None, max_bytes: int) -> str:
    """sha256 of the image's bytes and the text. Unreadable files hash their path and reason,
    so the error is cached too and a fixed file gets a new hash."""
    h = hashlib.sha256()
    if source is None:
        h.update(b"no image")
    elif is_url(source):
        h.update(b"url:" + source.encode())
    else:
        try:
            digest = hashlib.sha256()
            with os.fdopen(open_regular_file(source, max_bytes), "rb") as f:  # never blocks on a FIFO or reads a device
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            h.update(b"file:" + digest.digest())
        except ImageError as exc:
            h.update(f"unreadable:{source}:{exc}".encode())
    h.update(b"\0text:" + (text.encode("utf-8", "surrogatepass") if text is not None else b"\0none"))
    return h.hexdigest()


def hash_rows(sources: list[str | None], texts: list[str | None], max_bytes: int, workers: int) -> list[str]:
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:  # file reads and sha256 release the GIL
        return list(pool.map(lambda st: content_hash(st[0], st[1], max_bytes), zip(sources, texts), chunksize=64))


# ---------------------------------------------------------------- 4. write (the store)


class ShardStore:
    """Encoded items on disk, looked up by content hash.

    ``root/<encoders fingerprint>/<shard>/`` holds one ``.npy`` per array in ARRAYS and
    ``items.parquet`` (hash, error, warning, retry). A shard becomes visible by an atomic
    rename, so a killed writer leaves only a hidden temporary folder, removed on the next open.
    Rows marked ``retry`` count only in the run that wrote them: a store opened later ignores them.
    """

    def __init__(self, folder: str | Path, arrays: tuple[str, ...] = ARRAYS) -> None:
        self.folder = Path(folder)
        self.arrays = arrays  # what each shard holds: ARRAYS, or REGIONS in a region store (encode_regions)
        self._where: dict[str, tuple[str, int]] = {}  # hash -> (shard, position)
        self._errors: dict[str, str] = {}  # hash -> why the item could not be encoded
        self._warnings: dict[str, str] = {}  # hash -> why the item was encoded without its image
        self._retry: set[str] = set()  # hashes written in this run whose failure may pass
        self._loaded: set[str] = set()  # shard names already in the maps

    @classmethod
    def open(cls, root: str | Path, fingerprint: dict[str, Any], arrays: tuple[str, ...] = ARRAYS) -> ShardStore:
        """The store for these encoders under ``root`` (created if new), with its shards loaded."""
        text = json.dumps(fingerprint, sort_keys=True, default=str)
        store = cls(Path(root) / hashlib.sha256(text.encode()).hexdigest()[:16], arrays)
        fingerprint_file = store.folder / "fingerprint.json"
        try:
            store.folder.mkdir(parents=True, exist_ok=True)
            if not fingerprint_file.is_file() or fingerprint_file.read_text() != text:  # a full disk must not cut it short
                tmp = store.folder / ".fingerprint.json.tmp"
                tmp.write_text(text)
                os.replace(tmp, fingerprint_file)
        except OSError as exc:
            (store.folder / ".fingerprint.json.tmp").unlink(missing_ok=True)
            raise write_failure(exc, "the encoded-shard cache", store.folder) from exc
        for stale in store.folder.glob(".shard-*"):  # left by a killed writer
            shutil.rmtree(stale, ignore_errors=True)
        store.refresh()
        return store

    def refresh(self) -> None:
        """Pick up shards written since (by other processes, e.g. Ray actors)."""
        for folder in sorted(self.folder.glob("shard-*")):
            if folder.name in self._loaded:
                continue
            try:
                items = pd.read_parquet(folder / "items.parquet")
            except (OSError, ValueError) as exc:
                raise IndexLoadError(f"{folder}: unreadable shard ({exc}); delete it to re-encode its items") from exc
            self._loaded.add(folder.name)
            n = len(items)
            retry = items["retry"].tolist() if "retry" in items.columns else [False] * n
            outcomes = Outcomes(items["error"].tolist(), items["warning"].tolist() if "warning" in items.columns else [None] * n,
                                [bool(r) for r in retry])
            keep = [i for i in range(n) if not outcomes.retry[i]]  # written by an earlier run: encode those again
            self._remember(folder.name, [items["hash"].iloc[i] for i in keep], outcomes.only(keep), keep)

    def __contains__(self, h: str) -> bool:
        return h in self._where or h in self._errors

    def __len__(self) -> int:
        return len(self._where) + len(self._errors)

    def error(self, h: str) -> str | None:
        return self._errors.get(h)

    def warning(self, h: str) -> str | None:
        return self._warnings.get(h)

    def retried(self, h: str) -> bool:
        """Whether this item's failure may pass (a later run encodes it again)."""
        return h in self._retry

    def shards(self) -> dict[str, list[str]]:
        """Every complete shard's name and the hashes it holds (retry rows included)."""
        out = {}
        for folder in sorted(self.folder.glob("shard-*")):
            out[folder.name] = pd.read_parquet(folder / "items.parquet", columns=["hash"])["hash"].tolist()
        return out

    def write(self, hashes: list[str], outcomes: Outcomes, arrays: dict[str, np.ndarray]) -> str:
        """Store one shard; returns its name (derived from its content, so rewriting is harmless)."""
        name = "shard-" + hashlib.sha256("".join(hashes).encode()).hexdigest()[:16]
        try:
            tmp = Path(tempfile.mkdtemp(prefix=".shard-", dir=self.folder))
        except OSError as exc:
            raise write_failure(exc, "an encoded shard to the cache", self.folder) from exc
        try:
            for key in self.arrays:
                np.save(tmp / f"{key}.npy", arrays[key], allow_pickle=False)
            pd.DataFrame({"hash": hashes, "error": pd.Series(outcomes.errors, dtype=object),
                          "warning": pd.Series(outcomes.warnings, dtype=object),
                          "retry": np.array(outcomes.retry, dtype=bool)}).to_parquet(tmp / "items.parquet", index=False)
            for path in tmp.iterdir():
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
            if (self.folder / name).exists():
                shutil.rmtree(tmp)
            else:
                os.rename(tmp, self.folder / name)
        except BaseException as exc:
            # Judged before the temporary shard goes: removing it frees the space whose lack may be the cause.
            failure = write_failure(exc, "an encoded shard to the cache", self.folder, partial=tmp)
            shutil.rmtree(tmp, ignore_errors=True)
            if failure is not None:
                raise failure from exc
            raise
        self._loaded.add(name)
        self._remember(name, hashes, outcomes, list(range(len(hashes))))
        self._retry.update(h for h, r in zip(hashes, outcomes.retry) if r)
        return name

    def _remember(self, shard: str, hashes: list[str], outcomes: Outcomes, positions: list[int]) -> None:
        for h, error, warning, position in zip(hashes, outcomes.errors, outcomes.warnings, positions):
            # A failed row has a non-empty reason; a good row's reason reads back as None or
            # NaN (pandas 3 turns a missing string into NaN), never as an error.
            if _reason(error):
                self._errors[h] = error
                self._where.pop(h, None)
            else:
                self._where[h] = (shard, position)
                self._errors.pop(h, None)
                if _reason(warning):
                    self._warnings[h] = warning
                else:
                    self._warnings.pop(h, None)

    def gather(self, hashes: list[str]) -> dict[str, np.ndarray]:
        """The stored arrays of these (encoded, not failed) hashes, stacked in the given order."""
        positions: dict[str, list[tuple[int, int]]] = {}
        for i, h in enumerate(hashes):
            shard, position = self._where[h]
            positions.setdefault(shard, []).append((i, position))
        out: dict[str, np.ndarray] = {}
        for shard, pairs in positions.items():
            targets, rows = (np.array(p) for p in zip(*pairs))
            for key in self.arrays:
                stored = np.load(self.folder / shard / f"{key}.npy", mmap_mode="r", allow_pickle=False)
                if key not in out:
                    out[key] = np.zeros((len(hashes), *stored.shape[1:]), stored.dtype)
                out[key][targets] = stored[rows]
        return out


def _reason(value: Any) -> bool:
    return isinstance(value, str) and bool(value)


@dataclass
class Outcomes:
    """What happened to each row of a shard: an error (not indexed), a warning (indexed by its
    text only, the image failed), and whether the failure may pass (encode it again next run)."""

    errors: list[str | None]
    warnings: list[str | None]
    retry: list[bool]

    @classmethod
    def empty(cls, n: int) -> Outcomes:
        return cls([None] * n, [None] * n, [False] * n)

    def only(self, rows: list[int]) -> Outcomes:
        return Outcomes([self.errors[i] for i in rows], [self.warnings[i] for i in rows], [self.retry[i] for i in rows])


def prune_store(root: str | Path, referenced: set[str], dry_run: bool = False) -> dict[str, int]:
    """Delete the shards under a cache folder (all encoder fingerprints) that hold no referenced
    hash; returns counts of shards kept and dropped and bytes freed. Folders left empty go too."""
    root = Path(root)
    counts = {"kept": 0, "dropped": 0, "bytes": 0}
    for store_folder in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        store = ShardStore(store_folder)
        for name, hashes in store.shards().items():
            if referenced.intersection(hashes):
                counts["kept"] += 1
                continue
            counts["dropped"] += 1
            counts["bytes"] += sum(f.stat().st_size for f in (store_folder / name).iterdir())
            if not dry_run:
                shutil.rmtree(store_folder / name)
        if not dry_run and not any(store_folder.glob("shard-*")):
            shutil.rmtree(store_folder, ignore_errors=True)
    return counts


# ---------------------------------------------------------------- 2 + 3. read and encode


def encode_regions(embedder: Embedder, rows: list[Row], store: ShardStore, shard_size: int, workers: int,
                   show_progress: bool | None = False, clock: StageClock | None = None) -> None:
    """The region stage (``index.image_regions``): the photos of ``rows`` not yet in ``store`` (a ShardStore of
    REGIONS) read again and their crops encoded (Embedder.region_arrays: a batch's crops in one forward pass), in
    shards of ``shard_size``. Apart from the whole-photo stage, so that turning regions on with a shard cache encodes
    only them. A photo that fails here gets no regions (the whole-photo stage decided whether its item is indexed);
    a URL's is tried again by a later run. ``clock`` counts the seconds as stage "regions"."""
    from .downloads import Downloader
    from .regions import recipe_size
    from .utils import progress_bar

    todo, seen = [], set()
    for r in rows:
        if r.source is not None and r.hash not in store and r.hash not in seen:
            todo.append(r)
            seen.add(r.hash)
    if not todo:
        return
    cfg, clock = embedder.config, clock or StageClock()
    downloader = Downloader(cfg.catalog)
    per_batch = max(1, cfg.encoders.batch_size // max(1, recipe_size(embedder.regions)))  # crops per pass ~ batch_size

    def read(source: str):
        try:
            return load_image(downloader.fetch(source) if is_url(source) else source, cfg.catalog.max_image_pixels,
                              cfg.catalog.max_image_bytes)
        except ImageError as exc:
            return exc

    with ThreadPoolExecutor(max(1, workers), thread_name_prefix="read-regions") as pool, \
            progress_bar(len(todo), "encoding regions", show_progress, unit="photo") as bar:
        for start in range(0, len(todo), shard_size):
            chunk = todo[start:start + shard_size]
            outcomes = Outcomes.empty(len(chunk))
            arrays: dict[str, np.ndarray] = {}
            for at in range(0, len(chunk), per_batch):
                photos = list(pool.map(read, [r.source for r in chunk[at:at + per_batch]]))
                good = [j for j, p in enumerate(photos) if not isinstance(p, ImageError)]
                for j, p in enumerate(photos):
                    if isinstance(p, ImageError):
                        outcomes.retry[at + j] = is_url(chunk[at + j].source)
                with clock("regions"):
                    part = embedder.region_arrays([photos[j] for j in good])
                for key, value in part.items():
                    if key not in arrays:
                        arrays[key] = np.zeros((len(chunk), *value.shape[1:]), value.dtype)
                    arrays[key][[at + j for j in good]] = value
                bar.update(len(photos))
            with clock("write"):
                store.write([r.hash for r in chunk], outcomes, arrays)


class ShardEncoder:
    """Reads and encodes rows with an embedder's models; one instance per process (or Ray actor).

    Local files are decoded by the caller's thread pool (``threads.read`` threads) ahead of the encoder; image
    URLs are fetched (and decoded) by a pool of ``catalog.download_workers`` threads through a
    :class:`~multiretrieval.downloads.Downloader` (retries, backoff, a per-host limit), up to
    four times that many ahead. ``threads.image`` image batches are encoded at once while one thread encodes the
    texts; ``clock`` counts each stage's seconds.
    """

    def __init__(self, embedder: Embedder, prefetch_batches: int = 3, show_progress: bool | None = False,
                 threads: Threads | None = None, clock: StageClock | None = None) -> None:
        from .downloads import Downloader

        self.embedder = embedder
        cfg = embedder.config
        self.batch_size = cfg.encoders.batch_size
        self.max_pixels, self.max_bytes = cfg.catalog.max_image_pixels, cfg.catalog.max_image_bytes
        self.text_fallback = cfg.catalog.text_when_image_fails
        if threads is None:
            from .encoders.runtime import on_gpu

            runtime = embedder.image_encoder.runtime
            threads = plan_threads(cfg.ingest.workers, runtime, runtime == "onnx" and on_gpu())
        self.threads, self.clock = threads, clock or StageClock()
        self.prefetch = max(prefetch_batches, threads.image + 1) * self.batch_size  # a batch ready for every runner
        self.downloader = Downloader(cfg.catalog)
        self.download_workers = max(1, cfg.catalog.download_workers)
        self.show_progress = show_progress

    def _read(self, source: str):
        with self.clock("read"):
            try:
                data = self.downloader.fetch(source) if is_url(source) else source
                image = load_image(data, self.max_pixels, self.max_bytes)
                return image, self.embedder.image_encoder.preprocess(image)
            except ImageError as exc:
                message = str(exc)
                if is_url(source) and not message.startswith(source):  # decoding downloaded bytes: name the URL
                    exc = ImageError(f"{source}: {message.removeprefix('image bytes: ')}", transient=exc.transient)
                return exc

    def _decoded(self, pool: ThreadPoolExecutor, rows: list[Row], on_download: Callable[[], None]) -> Iterator[tuple[int, Any]]:
        """(index in rows, decoded or ImageError) for rows with an image, in order, read ahead."""
        with_image = [i for i, r in enumerate(rows) if r.source is not None]
        urls = sum(is_url(rows[i].source) for i in with_image)
        downloads = ThreadPoolExecutor(max_workers=self.download_workers, thread_name_prefix="download") if urls else None
        ahead = max(self.prefetch, 4 * self.download_workers) if urls else self.prefetch

        def submit(i: int) -> Future:
            if downloads is not None and is_url(rows[i].source):
                future = downloads.submit(self._read, rows[i].source)
                future.add_done_callback(lambda _: on_download())
                return future
            return pool.submit(self._read, rows[i].source)

        window: deque[tuple[int, Future]] = deque()
        todo = iter(with_image)
        try:
            for i in todo:
                window.append((i, submit(i)))
                if len(window) >= ahead:
                    break
            while window:
                i, future = window.popleft()
                nxt = next(todo, None)
                if nxt is not None:
                    window.append((nxt, submit(nxt)))
                yield i, future.result()
        finally:
            if downloads is not None:
                for _, future in window:
                    future.cancel()
                downloads.shutdown(wait=True)

    def encode(self, rows: list[Row], pool: ThreadPoolExecutor, on_items: Callable[[int], None] | None = None
               ) -> tuple[Outcomes, dict[str, np.ndarray]]:
        """Encode rows into the store's arrays; returns (what happened to each row, arrays)."""
        from .utils import progress_bar

        n_urls = sum(r.source is not None and is_url(r.source) for r in rows)
        with progress_bar(n_urls, "downloading", self.show_progress if n_urls else False, unit="image") as bar:
            return self._encode(rows, pool, on_items, lambda: bar.update(1))

    def _encode(self, rows: list[Row], pool: ThreadPoolExecutor, on_items, on_download) -> tuple[Outcomes, dict[str, np.ndarray]]:
        e, clock = self.embedder, self.clock
        image_enc, text_enc, fusion, zero_shot = e.image_encoder, e.text_encoder, e.fusion, e.zero_shot
        n = len(rows)
        out = e.empty_arrays(n)
        outcomes = Outcomes.empty(n)
        text_errors = [None if r.text is None else text_problem(r.text) for r in rows]
        with_text = sorted((i for i in range(n) if rows[i].text is not None and text_errors[i] is None),
                           key=lambda i: -len(rows[i].text))
        stop, counted = threading.Event(), threading.Lock()

        def encode_texts() -> None:
            for start in range(0, len(with_text), self.batch_size):
                if stop.is_set():
                    return
                idx = with_text[start:start + self.batch_size]
                texts = [rows[i].text for i in idx]
                with clock("text"):
                    tokens, mask = text_enc.forward_bulk(texts, fusion.text_chunks)
                out["text_tokens"][idx], out["text_mask"][idx] = tokens, mask
                with clock("zero_shot"):
                    out["clip_text"][idx] = zero_shot.text_batch(texts, tokens[:, 0])

        def encode_images(batch: list[tuple[int, Any]]) -> None:
            idx = [i for i, _ in batch]
            with clock("image"):
                tokens, probs = image_enc.forward_bulk(np.stack([t for _, (_, t) in batch]), fusion.image_grid)
            out["image_tokens"][idx], out["image_mask"][idx] = tokens, True
            with clock("zero_shot"):
                out["clip_image"][idx] = zero_shot.image_batch([p for _, (p, _) in batch], tokens[:, 0], probs)
            if on_items:
                with counted:
                    on_items(len(batch))

        text_pool = ThreadPoolExecutor(1, thread_name_prefix="encode-text")
        image_pool = ThreadPoolExecutor(self.threads.image, thread_name_prefix="encode-image")
        try:
            texts_done = text_pool.submit(encode_texts)
            running: deque[Future] = deque()
            batch: list[tuple[int, Any]] = []
            for i, value in self._decoded(pool, rows, on_download):
                if isinstance(value, ImageError):
                    self._image_failed(i, rows[i], value, outcomes)
                    continue
                batch.append((i, value))
                if len(batch) == self.batch_size:
                    running.append(image_pool.submit(encode_images, batch))
                    batch = []
                    while len(running) > self.threads.image:  # at most one batch waits for a runner
                        running.popleft().result()
            if batch:
                running.append(image_pool.submit(encode_images, batch))
            for future in running:
                future.result()
            texts_done.result()
        finally:
            stop.set()  # an error or Ctrl-C: the text thread stops after its batch
            image_pool.shutdown(wait=True, cancel_futures=True)
            text_pool.shutdown(wait=True)

        for i, row in enumerate(rows):
            if outcomes.errors[i] is None and row.text is not None:
                outcomes.errors[i] = text_errors[i]
            elif outcomes.errors[i] is not None and row.text is not None:  # its image failed, no text fallback
                out["text_tokens"][i], out["text_mask"][i], out["clip_text"][i] = 0, False, 0
        return outcomes, out

    def _image_failed(self, i: int, row: Row, error: ImageError, outcomes: Outcomes) -> None:
        """A row whose image failed: indexed by its text (a warning) or not at all (an error)."""
        if row.text is not None and self.text_fallback:
            outcomes.warnings[i] = f"indexed by its text only: {error}"
        else:
            outcomes.errors[i] = str(error)
        outcomes.retry[i] = is_url(row.source)  # the server may answer next time
