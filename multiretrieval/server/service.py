"""The service's state: one retriever shared by every request, its micro-batched encoders, the write
log, and the uploads folder.

One retriever serves every request: searches run concurrently, writes (add, upsert, update, remove)
change it in place, one at a time (the retriever's readers-writer lock lets a search see the
index before or after a write, never half of it). A write is acknowledged once it is applied
and appended to the write log (``INDEX_DIR.journal``, fsync'ed); the index folder is saved
(atomically) only at checkpoints: every ``checkpoint_every`` writes and at shutdown, after
which the log is emptied. A restart loads the folder and replays the log, so every
acknowledged write survives a crash, a SIGKILL included.

A write that cannot be stored (a full disk) is answered with StorageError and leaves the index, the log and
the uploads as they were; ``write_error`` keeps its reason (GET /health) until a write succeeds again.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from ..config import RetrieverConfig
from ..errors import CatalogError, ImageError, IndexLoadError, StorageError
from ..filters import compile_filter
from ..persistence import FolderLock, journal_path, remove_temporary_files, uploads_path, write_durably
from ..retriever import Retriever
from .batching import BatchedImageEncoder, BatchedTextEncoder, MicroBatcher
from .journal import Journal

logger = logging.getLogger(__name__)


class Service:
    """The retriever, the write lock and log, and where uploads go."""

    def __init__(self, index_dir: str | Path, checkpoint_every: int = 1000, config: RetrieverConfig | None = None) -> None:
        self.index_dir = Path(index_dir).resolve()
        self.config = config  # None: the config saved with the index (Retriever.load)
        # Uploaded images and the write log live beside the index folder: a save replaces the folder itself.
        self.uploads = uploads_path(self.index_dir)
        self.checkpoint_every = max(1, checkpoint_every)
        self._write_lock = threading.Lock()
        self.write_error: str | None = None  # why the last write could not be stored; None once one is
        if not self.index_dir.is_dir():  # before the lock, which would leave a lock file beside a mistyped path
            raise IndexLoadError(f"{self.index_dir}: no such index folder")
        # Held while serving: an `index` or a save into the folder meanwhile would be undone by the next checkpoint.
        self.folder_lock = FolderLock(self.index_dir, "serve").acquire()
        try:
            remove_temporary_files(self.uploads)  # uploads a killed process was writing
            retriever = Retriever.load(self.index_dir, self.config)
            self.text_batcher = MicroBatcher(retriever.text_encoder.forward)
            self.image_batcher = MicroBatcher(retriever.image_encoder.forward, max_batch=16)
            self.retriever = self._prepare(retriever)
            saved = int(retriever.saved_note.get("journal_seq", 0))
            self.journal = Journal(journal_path(self.index_dir), after=saved)
            self._replay(self.journal.records(after=saved))
        except BaseException:
            self.folder_lock.release()
            raise

    def close(self) -> None:
        """Close the write log and let other processes have the folder (after the last checkpoint)."""
        self.journal.close()
        self.folder_lock.release()

    def _prepare(self, retriever: Retriever) -> Retriever:
        """Route the retriever's encoders through the shared micro-batchers and load every model now: one text and
        one image through the zero-shot space start both encoders' sessions and load ConSE's label embeddings."""
        from PIL import Image

        embedder = retriever.embedder
        embedder.use_encoders(image=BatchedImageEncoder(embedder.image_encoder, self.image_batcher),
                              text=BatchedTextEncoder(embedder.text_encoder, self.text_batcher))
        embedder.fusion  # noqa: B018
        embedder.zero_shot.text_batch(["warm-up"])
        embedder.zero_shot.image_batch([Image.new("RGB", (32, 32), (255, 255, 255))])
        embedder.count_tokens("warm-up")  # and the filter parser's import:
        compile_filter("TRUE", {})  # made at start, not in the first request
        return retriever

    def _replay(self, records: list[dict]) -> None:
        """Apply the logged writes that the saved folder does not hold yet, in order."""
        for record in records:
            try:
                try:
                    apply(record, self.retriever)
                except ImageError:
                    if record.get("op") != "update" or "image" not in record["fields"]:
                        raise
                    # Its photo was readable when logged; a later write replaced it (its upload deleted) or its file
                    # was removed since: the other values still stand.
                    logger.warning("replaying write %d of %s: its photo %s is gone; applying its other values",
                                   record["seq"], self.journal.path, record["fields"]["image"])
                    apply({**record, "fields": {k: v for k, v in record["fields"].items() if k != "image"}}, self.retriever)
            except Exception as exc:  # noqa: BLE001 - logged writes were valid when made; go on with the rest
                logger.warning("replaying write %d (%s) of %s: %s", record["seq"], record.get("op"), self.journal.path, exc)
        if records:
            logger.info("replayed %d logged writes from %s", len(records), self.journal.path)

    def write(self, record: dict, check=None) -> Any:
        """Apply a write to the retriever, log it (fsync'ed), then answer; ``check(result)`` may refuse it
        first (raising) when the retriever did not take it (a row it skipped changes nothing)."""
        with self._write_lock:
            result = apply(record, self.retriever)
            if check is not None:
                check(result)
            try:
                self.journal.append(record)
            except BaseException as exc:
                if isinstance(exc, StorageError):
                    self.write_error = str(exc)
                    logger.error("%s; going back to the state on disk", exc)
                else:
                    logger.exception("cannot log a write; going back to the state on disk")
                self.retriever = self._prepare(Retriever.load(self.index_dir, self.config))
                self._replay(self.journal.records(after=int(self.retriever.saved_note.get("journal_seq", 0))))
                raise
            self.write_error = None
            if len(self.journal) >= self.checkpoint_every:
                try:
                    self._checkpoint()
                except Exception:  # noqa: BLE001 - the write is in the log: answer it; the next checkpoint tries again
                    logger.exception("checkpoint of %s failed; the write log keeps every write", self.index_dir)
            return result

    def checkpoint(self) -> None:
        """Save the index folder (atomically) and empty the write log, if anything was written since the last one."""
        with self._write_lock:
            if len(self.journal):
                self._checkpoint()

    def _checkpoint(self) -> None:
        self.retriever.save(self.index_dir, note={"journal_seq": self.journal.last_seq}, lock=self.folder_lock)
        self.journal.reset()
        logger.info("checkpoint: saved %s through write %d", self.index_dir, self.journal.last_seq)

    def store_upload(self, data: bytes) -> Path:
        """Keep an uploaded image under a name of ours (its sha256), on disk (fsync'ed) before the write that names it
        is logged. StorageError when it cannot be written: then no file is left, and ``write_error`` says why."""
        import hashlib

        path = self.uploads / f"{hashlib.sha256(data).hexdigest()}.img"
        try:
            write_durably(path, data, "the uploaded image")
        except StorageError as exc:
            self.write_error = f"{exc}; the write was not made"
            logger.error("%s", self.write_error)
            raise StorageError(self.write_error, exc.errno) from exc
        return path

    def drop_unused_upload(self, source: str | Path | None) -> None:
        """Delete an uploaded image that no indexed item uses (its item was removed, or never added)."""
        if source is None or Path(source).parent != self.uploads:
            return
        with self._write_lock:
            if str(source) not in set(self.retriever.image_sources().dropna()):
                Path(source).unlink(missing_ok=True)


def apply(record: dict, retriever: Retriever) -> Any:
    """Carry out one logged write on a retriever: add, upsert (rows of catalog columns), update (an id and the columns
    it changes) or remove (ids)."""
    import pandas as pd

    op = record["op"]
    if op == "add":
        return retriever.add(pd.DataFrame(record["rows"]))
    if op == "upsert":
        return retriever.upsert(pd.DataFrame(record["rows"]))
    if op == "update":
        return retriever.update(record["id"], **record["fields"])
    if op == "remove":
        return retriever.remove(record["ids"])
    raise ValueError(f"unknown write {op!r}")


def refuse_skipped(report) -> None:
    """A one-item write whose row the retriever skipped is refused (400) rather than acknowledged."""
    if report.skipped:
        raise CatalogError(str(report.skipped[0]))
