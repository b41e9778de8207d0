"""The service's write log: every write it acknowledges, on disk before the answer.

    journal = Journal(INDEX_DIR.journal)
    seq = journal.append({"op": "add", "rows": [...]})   # written and fsync'ed when it returns
    journal.records(after=seq)                          # what a restart replays
    journal.reset()                                     # after a checkpoint: a save that holds every record

One JSON object per line, each with a sequence number that only grows. A checkpoint saves the
index folder (atomically) noting the last sequence number it holds, then empties the log; a
process killed in between finds records the save already holds, and skips them by their number.
A line cut short by a crash was never acknowledged: it is dropped when the log is opened.
"""

from __future__ import annotations

import errno
import json
import logging
import os
from pathlib import Path
from typing import Any

from ..errors import IndexLoadError, StorageError
from ..persistence import error_reason, fsync_folder

logger = logging.getLogger(__name__)


class Journal:
    """An append-only log of JSON records with sequence numbers. Not locked: the service serialises writes.

    ``after``: the last sequence number already held elsewhere (the checkpoint's); new records
    number on from it even when the log itself is empty.

    Written unbuffered on a raw descriptor at the end of what it holds: a record that cannot be
    written whole (a full disk) is cut off again, and the log stays usable for the next one, which
    starts where the failed one did (StorageError says why; nothing was appended).
    """

    def __init__(self, path: str | Path, after: int = 0) -> None:
        self.path = Path(path)
        self._records = self._read()
        self.last_seq = max([after, *(r["seq"] for r in self._records)])
        self._fd: int | None = None
        self._end: int | None = None  # bytes of whole records; the file may hold more after a failed cut

    def __len__(self) -> int:
        return len(self._records)

    @property
    def size(self) -> int:
        return self.path.stat().st_size if self.path.exists() else 0

    def _read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        records, good = [], 0
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                good += len(line) + 1
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict) or not isinstance(record.get("seq"), int):
                    raise ValueError("not a record")
            except ValueError as exc:
                if number >= len(lines) - 1:  # the last line, cut short by a crash before it was acknowledged
                    logger.warning("%s: dropping an unfinished last record (%d bytes)", self.path, len(line))
                    with open(self.path, "r+b") as f:
                        f.truncate(good)
                        os.fsync(f.fileno())
                    break
                raise IndexLoadError(f"{self.path} line {number}: unreadable record ({exc}); the write log is damaged") from exc
            records.append(record)
            good += len(line) + 1
        return records

    def records(self, after: int = 0) -> list[dict[str, Any]]:
        """The records with a sequence number above ``after``, in order."""
        return [r for r in self._records if r["seq"] > after]

    def append(self, record: dict[str, Any]) -> int:
        """Write a record and fsync it; returns its sequence number. StorageError when it cannot: the log is as before."""
        seq = self.last_seq + 1
        entry = {"seq": seq, **record}
        line = json.dumps(entry, default=str).encode() + b"\n"
        try:
            fd = self._open()
            try:
                written = 0
                while written < len(line):  # a write may take part of the bytes (a disk filling up), then fail
                    n = os.pwrite(fd, line[written:], self._end + written)
                    if n <= 0:
                        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                    written += n
                os.fsync(fd)
            except BaseException:
                self._cut()  # no half record in the middle of the log for the next ones to follow
                raise
        except OSError as exc:
            raise StorageError(f"cannot write the write log {self.path}: {error_reason(exc)}; the write was not made",
                               exc.errno) from exc
        self._end += len(line)
        self.last_seq = seq
        self._records.append(entry)
        return seq

    def _open(self) -> int:
        if self._fd is None:
            new = not self.path.exists()
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o644)  # kept open for the service's life
            if new:
                fsync_folder(self.path.parent)  # the file's name is durable too
        if self._end is None:
            self._end = os.fstat(self._fd).st_size
        elif os.fstat(self._fd).st_size != self._end:  # a record a failed cut left: cut it now, or write nothing
            os.ftruncate(self._fd, self._end)
        return self._fd

    def _cut(self) -> None:
        """Drop what a failed append wrote past the last whole record; if even that fails, the next append tries again."""
        try:
            os.ftruncate(self._fd, self._end)
        except OSError:
            logger.exception("%s: cannot cut an unfinished record yet; the next write cuts it first", self.path)
            self.close()

    def reset(self) -> None:
        """Empty the log (its records are in a checkpoint); sequence numbers go on growing."""
        self.close()
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            with open(tmp, "wb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_folder(self.path.parent)
        self._records, self._end = [], 0

    def close(self) -> None:
        fd, self._fd = self._fd, None  # reset first: a descriptor that failed to close is gone all the same
        if fd is not None:
            os.close(fd)
