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

import json
import logging
import os
from pathlib import Path
from typing import Any

from ..errors import IndexLoadError

logger = logging.getLogger(__name__)


class Journal:
    """An append-only log of JSON records with sequence numbers. Not locked: the service serialises writes.

    ``after``: the last sequence number already held elsewhere (the checkpoint's); new records
    number on from it even when the log itself is empty.
    """

    def __init__(self, path: str | Path, after: int = 0) -> None:
        self.path = Path(path)
        self._records = self._read()
        self.last_seq = max([after, *(r["seq"] for r in self._records)])
        self._file = None

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
        """Write a record and fsync it; returns its sequence number."""
        if self._file is None:
            new = not self.path.exists()
            self._file = open(self.path, "ab")  # noqa: SIM115 - kept open for the service's life
            if new:
                _fsync_folder(self.path.parent)  # the file's name is durable too
        seq = self.last_seq + 1
        entry = {"seq": seq, **record}
        start = self._file.tell()
        try:
            self._file.write(json.dumps(entry, default=str).encode() + b"\n")
            self._file.flush()
            os.fsync(self._file.fileno())
        except BaseException:
            self._cut(start)  # no half record in the middle of the log for the next ones to follow
            raise
        self.last_seq = seq
        self._records.append(entry)
        return seq

    def _cut(self, size: int) -> None:
        try:
            self.close()
            with open(self.path, "r+b") as f:
                f.truncate(size)
        except OSError:
            logger.exception("%s: cannot cut an unfinished record; it will be dropped when the log is read", self.path)

    def reset(self) -> None:
        """Empty the log (its records are in a checkpoint); sequence numbers go on growing."""
        self.close()
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "wb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        _fsync_folder(self.path.parent)
        self._records = []

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def write_durably(path: Path, data: bytes) -> None:
    """Write a file and fsync it and its folder: it survives a crash once this returns."""
    if not path.parent.is_dir():
        path.parent.mkdir(parents=True)
        _fsync_folder(path.parent.parent)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
