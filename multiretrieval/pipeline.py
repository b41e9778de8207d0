"""The ingestion pipeline: reader -> encoder -> writer, into shards cached by content hash.

1. **Hash.** Every row gets a content hash: its image file's bytes (a URL: the URL) and its
   text. Rows whose hash is already in the shard store cost nothing more.
2. **Read.** Worker threads decode and resize images (PIL and the tensor conversion release
   the GIL) a few batches ahead of the encoder, in row order.
3. **Encode.** Images in batches of ``encoders.batch_size``; texts sorted by length within
   a shard (less padding), then put back in row order; zero-shot vectors from the same outputs.
4. **Write.** Every ``shard_size`` new items become one shard: a folder of ``.npy`` arrays
   plus ``items.parquet`` (hash, error), renamed into place when complete. A run killed
   midway restarts from its last complete shard, with the same batches, so it ends with
   the same vectors as an uninterrupted run.

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
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .catalog import is_url, load_image, open_regular_file, text_problem
from .embedder import FEATURES, ZERO_SHOT
from .errors import ImageError, IndexLoadError

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
    ``items.parquet`` (hash, error). A shard becomes visible by an atomic rename, so a
    killed writer leaves only a hidden temporary folder, removed on the next open.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self._where: dict[str, tuple[str, int]] = {}  # hash -> (shard, position)
        self._errors: dict[str, str] = {}  # hash -> why the item could not be encoded
        self._loaded: set[str] = set()  # shard names already in the two maps

    @classmethod
    def open(cls, root: str | Path, fingerprint: dict[str, Any]) -> ShardStore:
        """The store for these encoders under ``root`` (created if new), with its shards loaded."""
        text = json.dumps(fingerprint, sort_keys=True, default=str)
        store = cls(Path(root) / hashlib.sha256(text.encode()).hexdigest()[:16])
        store.folder.mkdir(parents=True, exist_ok=True)
        (store.folder / "fingerprint.json").write_text(text)
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
            self._remember(folder.name, items["hash"].tolist(), items["error"].tolist())

    def __contains__(self, h: str) -> bool:
        return h in self._where or h in self._errors

    def __len__(self) -> int:
        return len(self._where) + len(self._errors)

    def error(self, h: str) -> str | None:
        return self._errors.get(h)

    def write(self, hashes: list[str], errors: list[str | None], arrays: dict[str, np.ndarray]) -> str:
        """Store one shard; returns its name (derived from its content, so rewriting is harmless)."""
        name = "shard-" + hashlib.sha256("".join(hashes).encode()).hexdigest()[:16]
        tmp = Path(tempfile.mkdtemp(prefix=".shard-", dir=self.folder))
        try:
            for key in ARRAYS:
                np.save(tmp / f"{key}.npy", arrays[key], allow_pickle=False)
            pd.DataFrame({"hash": hashes, "error": pd.Series(errors, dtype=object)}).to_parquet(tmp / "items.parquet", index=False)
            for path in tmp.iterdir():
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
            if (self.folder / name).exists():
                shutil.rmtree(tmp)
            else:
                os.rename(tmp, self.folder / name)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._loaded.add(name)
        self._remember(name, hashes, errors)
        return name

    def _remember(self, shard: str, hashes: list[str], errors: list) -> None:
        for position, (h, error) in enumerate(zip(hashes, errors)):
            # A failed row has a non-empty reason; a good row's reason reads back as None or
            # NaN (pandas 3 turns a missing string into NaN), never as an error.
            if isinstance(error, str) and error:
                self._errors[h] = error
            else:
                self._where[h] = (shard, position)

    def gather(self, hashes: list[str]) -> dict[str, np.ndarray]:
        """The stored arrays of these (encoded, not failed) hashes, stacked in the given order."""
        positions: dict[str, list[tuple[int, int]]] = {}
        for i, h in enumerate(hashes):
            shard, position = self._where[h]
            positions.setdefault(shard, []).append((i, position))
        out: dict[str, np.ndarray] = {}
        for shard, pairs in positions.items():
            targets, rows = (np.array(p) for p in zip(*pairs))
            for key in ARRAYS:
                stored = np.load(self.folder / shard / f"{key}.npy", mmap_mode="r", allow_pickle=False)
                if key not in out:
                    out[key] = np.zeros((len(hashes), *stored.shape[1:]), stored.dtype)
                out[key][targets] = stored[rows]
        return out


# ---------------------------------------------------------------- 2 + 3. read and encode


class ShardEncoder:
    """Reads and encodes rows with an embedder's models; one instance per process (or Ray actor)."""

    def __init__(self, embedder: Embedder, prefetch_batches: int = 3) -> None:
        self.embedder = embedder
        cfg = embedder.config
        self.batch_size = cfg.encoders.batch_size
        self.max_pixels, self.max_bytes = cfg.catalog.max_image_pixels, cfg.catalog.max_image_bytes
        self.prefetch = prefetch_batches * self.batch_size

    def _read(self, source: str):
        try:
            image = load_image(source, self.max_pixels, self.max_bytes)
            return image, self.embedder.image_encoder.preprocess(image)
        except ImageError as exc:
            return exc

    def _decoded(self, pool: ThreadPoolExecutor, rows: list[Row]) -> Iterator[tuple[int, Any]]:
        """(index in rows, decoded or ImageError) for rows with an image, in order, read ahead."""
        window: deque[tuple[int, Future]] = deque()
        todo = iter([i for i, r in enumerate(rows) if r.source is not None])
        for i in todo:
            window.append((i, pool.submit(self._read, rows[i].source)))
            if len(window) >= self.prefetch:
                break
        while window:
            i, future = window.popleft()
            nxt = next(todo, None)
            if nxt is not None:
                window.append((nxt, pool.submit(self._read, rows[nxt].source)))
            yield i, future.result()

    def encode(self, rows: list[Row], pool: ThreadPoolExecutor, on_items: Callable[[int], None] | None = None
               ) -> tuple[list[str | None], dict[str, np.ndarray]]:
        """Encode rows into the store's arrays; returns (error per row or None, arrays)."""
        import torch

        e = self.embedder
        image_enc, text_enc, fusion, zero_shot = e.image_encoder, e.text_encoder, e.fusion, e.zero_shot
        n = len(rows)
        out = e.empty_arrays(n)
        errors: list[str | None] = [None] * n

        def flush(batch: list[tuple[int, Any]]) -> None:
            idx = [i for i, _ in batch]
            tokens, probs = image_enc.forward(torch.stack([t for _, (_, t) in batch]), fusion.image_grid)
            out["image_tokens"][idx], out["image_mask"][idx] = tokens, True
            out["clip_image"][idx] = zero_shot.image_batch([p for _, (p, _) in batch], tokens[:, 0], probs)
            if on_items:
                on_items(len(batch))

        batch: list[tuple[int, Any]] = []
        for i, value in self._decoded(pool, rows):
            if isinstance(value, ImageError):
                errors[i] = str(value)
                continue
            batch.append((i, value))
            if len(batch) == self.batch_size:
                flush(batch)
                batch = []
        if batch:
            flush(batch)

        for i, row in enumerate(rows):
            if errors[i] is None and row.text is not None:
                errors[i] = text_problem(row.text)
        with_text = sorted((i for i in range(n) if errors[i] is None and rows[i].text is not None), key=lambda i: -len(rows[i].text))
        for start in range(0, len(with_text), self.batch_size):
            idx = with_text[start:start + self.batch_size]
            texts = [rows[i].text for i in idx]
            tokens, mask = text_enc.forward(texts, fusion.text_chunks)
            out["text_tokens"][idx], out["text_mask"][idx] = tokens, mask
            out["clip_text"][idx] = zero_shot.text_batch(texts, tokens[:, 0])
        return errors, out
