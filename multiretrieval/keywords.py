"""The keyword index: BM25 over the items' text columns, for exact words (brands, model names, SKUs, sizes).

Built on SQLite's FTS5 full-text index and its ``bm25()`` ranking (k1 = 1.2, b = 0.75), from
Python's standard library: nothing downloads, items are added and removed in place, and the
index is saved as one SQLite file (``keywords/keywords.sqlite``, listed in the manifest).

Texts are tokenised here, the same way for items and queries (:func:`tokenize`): Unicode
NFKC, case folded; words are runs of letters and digits, also split where letters meet digits;
a compound joined by ``-``, ``_``, ``.``, ``/`` or an apostrophe also gives its parts run
together. So "KX-2210" indexes ``kx``, ``2210`` and ``kx2210``, and the queries "KX-2210",
"kx2210", "KX 2210" and "KX2210" all find it; "500ml" and "500 ml" meet in ``500`` and ``ml``.
A few English function words ("a", "the", "of", ...) are left out of both.

:func:`identifiers` picks the model codes out of a query: compounds that mix letters and digits
(as one token: "KX-2210" -> ``kx2210``, "500ml") and numbers of four or more digits. Hybrid
search puts the items that carry all of them first (search.py): a model code is a lookup.
"""

from __future__ import annotations

import re
import sqlite3
import threading
import unicodedata
from pathlib import Path
from typing import Any

import numpy as np

from .errors import IndexLoadError

FILE = "keywords.sqlite"
TOKENIZER_VERSION = 1
STOPWORDS = frozenset("a an and are as at be by for from has have in is it its of on or that the this to was with".split())
_COMPOUND = re.compile(r"[^\W_]+(?:[-_./'\u2019][^\W_]+)*")
_ALNUM = re.compile(r"[^\W_]+")
_PIECE = re.compile(r"\d+|[^\W\d_]+")


def tokenize(text: str) -> list[str]:
    """The keyword tokens of a text, in order (see the module docstring)."""
    out: list[str] = []
    for match in _COMPOUND.finditer(unicodedata.normalize("NFKC", text).casefold()):
        parts = _ALNUM.findall(match.group())
        pieces = [piece for part in parts for piece in _PIECE.findall(part)]
        out.extend(p for p in pieces if p not in STOPWORDS)
        if len(pieces) > 1:
            out.append("".join(parts))
    return out


# A text's phrases: its parts between punctuation ("Armchair ottoman, blue" -> "armchair ottoman" | "blue"; a tag
# list; a category path "animals / cats"). A fused query's words that hold all the tokens of one of an item's
# phrases name that item's category, tag or variant (search.word_filter).
_PHRASE_SPLIT = re.compile(r"(?:[,;:|()\[\]\n\u2013\u2014]|(?<!\d)[./]|[./](?!\d))+|\s-\s")  # not "3.5", "1/2"


def phrases(text: str) -> list[frozenset[str]]:
    """The token sets of a text's phrases (its parts between punctuation), the empty ones left out."""
    return [tokens for part in _PHRASE_SPLIT.split(text) for tokens in [frozenset(tokenize(part))] if tokens]


def identifiers(text: str) -> list[str]:
    """The model codes in a text, as keyword tokens: compounds mixing letters and digits (run together:
    "KX-2210" -> "kx2210", "500ml") and numbers of 4 or more digits ("2210" in "KX 2210")."""
    out: list[str] = []
    for match in _COMPOUND.finditer(unicodedata.normalize("NFKC", text).casefold()):
        joined = "".join(_ALNUM.findall(match.group()))
        has_digit = any(c.isdigit() for c in joined)
        if has_digit and not joined.isdigit() or joined.isdigit() and len(joined) >= 4:
            out.append(joined)
    return list(dict.fromkeys(out))


def keyword_texts(rows, columns: tuple[str, ...]) -> list[str]:
    """Each row's keyword text: its non-empty values in ``columns`` (those it has), joined."""
    present = [c for c in columns if c in rows.columns]
    if not present:
        return [""] * len(rows)
    values = rows[present].astype(object).where(rows[present].notna(), None).to_numpy()
    return [" ".join(str(v) for v in row if v is not None and str(v).strip()) for row in values]


class KeywordIndex:
    """BM25 over one text per item, keyed by the items' int64 keys. Safe to share between threads.

    Args:
        columns: the catalog columns whose values make an item's keyword text (recorded in the manifest).
    """

    def __init__(self, columns: tuple[str, ...] | list[str] = ()) -> None:
        self.columns = tuple(columns)
        self._lock = threading.Lock()
        self._db = self._connect()
        self._count = 0

    @staticmethod
    def _connect() -> sqlite3.Connection:
        db = sqlite3.connect(":memory:", check_same_thread=False, isolation_level=None)
        db.execute("CREATE VIRTUAL TABLE IF NOT EXISTS docs USING fts5(body, tokenize='unicode61 remove_diacritics 2', detail=column)")
        return db

    def __len__(self) -> int:
        return self._count

    def add(self, keys: np.ndarray, texts: list[str]) -> None:
        """Index the texts of these items (an empty text adds nothing)."""
        rows = [(int(k), " ".join(tokens)) for k, t in zip(keys, texts) if t for tokens in [tokenize(t)] if tokens]
        with self._lock:
            self._db.execute("BEGIN")
            self._db.executemany("INSERT INTO docs(rowid, body) VALUES (?, ?)", rows)
            self._db.execute("COMMIT")
            self._count += len(rows)

    def remove(self, keys: np.ndarray) -> None:
        """Forget these items (keys it does not hold are ignored)."""
        keys = [int(k) for k in keys]
        with self._lock:
            self._db.execute("BEGIN")
            for start in range(0, len(keys), 500):
                chunk = keys[start:start + 500]
                self._db.execute(f"DELETE FROM docs WHERE rowid IN ({','.join('?' * len(chunk))})", chunk)  # noqa: S608
            self._db.execute("COMMIT")
            self._count = self._db.execute("SELECT count(*) FROM docs").fetchone()[0]

    def search(self, text: str, n: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The ``n`` best (keys, BM25 scores) for a query text, best first; only ``allowed`` keys if given.

        Items sharing no token with the query are not returned: fewer than ``n`` may come back.
        """
        tokens = list(dict.fromkeys(tokenize(text)))
        if not tokens or not self._count or n < 1:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        match = " OR ".join(f'"{t}"' for t in tokens)  # tokens are letters and digits only: safe inside quotes
        sql = "SELECT rowid, -bm25(docs) FROM docs WHERE docs MATCH ? ORDER BY rank"
        with self._lock:
            if allowed is None:
                found = self._db.execute(sql + " LIMIT ?", (match, int(n))).fetchall()
            else:
                allow = set(np.asarray(allowed, np.int64).tolist())
                found = []
                for key, score in self._db.execute(sql, (match,)):
                    if key in allow:
                        found.append((key, score))
                        if len(found) == n:
                            break
        if not found:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        keys, scores = zip(*found)
        return np.array(keys, np.int64), np.array(scores, np.float32)

    def holds(self, keys: np.ndarray) -> np.ndarray:
        """Which of these items have a keyword text at all (a boolean per key)."""
        keys = [int(k) for k in keys]
        found: set[int] = set()
        with self._lock:
            for start in range(0, len(keys), 500):
                chunk = keys[start:start + 500]
                found.update(r[0] for r in self._db.execute(f"SELECT rowid FROM docs WHERE rowid IN ({','.join('?' * len(chunk))})", chunk))  # noqa: S608
        return np.array([k in found for k in keys], bool)

    def having(self, tokens: list[str], keys: np.ndarray) -> np.ndarray:
        """Which of these items' texts hold every one of these tokens (a boolean per key)."""
        if not tokens or not self._count or not len(keys):
            return np.zeros(len(keys), bool)
        match = " AND ".join(f'"{t}"' for t in tokens)  # tokens are letters and digits only: safe inside quotes
        with self._lock:
            found = {row[0] for row in self._db.execute("SELECT rowid FROM docs WHERE docs MATCH ?", (match,))}
        return np.array([int(k) in found for k in keys], bool)

    def describe(self) -> dict[str, Any]:
        return {"count": self._count, "columns": list(self.columns), "tokenizer": TOKENIZER_VERSION, "ranking": "fts5 bm25"}

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        target = sqlite3.connect(folder / FILE)
        try:
            with self._lock:
                self._db.backup(target)
        finally:
            target.close()

    @classmethod
    def load(cls, folder: str | Path, described: dict[str, Any]) -> KeywordIndex:
        path = Path(folder) / FILE
        if described.get("tokenizer") != TOKENIZER_VERSION:
            raise IndexLoadError(f"{path}: keyword index of tokenizer {described.get('tokenizer')}, this version reads "
                                 f"{TOKENIZER_VERSION}; re-index")
        index = cls(described.get("columns", ()))
        try:
            source = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
            try:
                source.backup(index._db)
            finally:
                source.close()
            index._count = index._db.execute("SELECT count(*) FROM docs").fetchone()[0]
        except sqlite3.Error as exc:
            raise IndexLoadError(f"{path}: not a readable keyword index: {exc}") from exc
        if index._count != described.get("count"):
            raise IndexLoadError(f"{path} holds {index._count} texts, the manifest says {described.get('count')}")
        return index
