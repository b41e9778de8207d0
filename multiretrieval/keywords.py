"""The keyword index: BM25 over the items' text columns, for exact words (brands, model names, SKUs, sizes).

BM25 as SQLite FTS5's ``bm25()`` ranks (the keyword index of earlier versions), with the same
scores: for the distinct terms t of a query and an item d,

    score(d) = sum over t of  idf(t) * tf(t, d) * (k1 + 1) / (tf(t, d) + k1 * (1 - b + b * |d| / avgdl))
    idf(t) = log((N - n(t) + 0.5) / (n(t) + 0.5)), or 1e-6 where that is not positive

with k1 = 1.2, b = 0.75, N items, n(t) of them holding t, tf(t, d) its count in d, |d| the item's
tokens and avgdl their mean over the items. Held in numpy arrays: an inverted index (each term's
postings: item slot and count, term by term) that a query reads only for its own terms, so a
query over common words costs the postings it reads, not a sort of every matching item.
Items are appended (their postings inserted at the end of their terms' runs) and removed in place
(marked; the arrays are compacted once a quarter of the slots are dead). Saved as
``keywords/keywords.npz`` (format 2, listed in the manifest with its checksum); a save of the
SQLite FTS5 index (``keywords.sqlite``) is converted when it loads.

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

import math
import re
import threading
import unicodedata
from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from .errors import IndexLoadError

FILE = "keywords.npz"
FTS5_FILE = "keywords.sqlite"  # the SQLite FTS5 index saved before format 2: converted on load
FORMAT = 2
TOKENIZER_VERSION = 1
K1, B = 1.2, 0.75  # FTS5's bm25() constants
IDF_FLOOR = 1e-6  # FTS5's idf where log((N - n + 0.5) / (n + 0.5)) <= 0 (a term on half the items or more)
COMPACT_SHARE = 0.25  # the arrays are rebuilt without removed items once they are this share of the slots
CACHED_FROM = 1024  # a term with this many postings keeps its BM25 weights between queries (until the items change)
CACHED_POSTINGS = 1 << 22  # at most this many weights kept in all (12 bytes each)
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


@lru_cache(maxsize=1 << 16)
def _fold_char(c: str) -> str:
    """A character as FTS5's unicode61 tokenizer (remove_diacritics 2) indexed it: a Latin letter with
    diacritics as its ASCII base letter ("é" -> "e"); every other character as it is (tokens are case folded
    already). U+01E1 (a with dot above and macron) is one unicode61 leaves as it is."""
    if c == "\u01e1":
        return c
    base = "".join(x for x in unicodedata.normalize("NFD", c) if not unicodedata.combining(x))
    return base if len(base) == 1 and base.isascii() and base.isalpha() else c


def term(token: str) -> str:
    """The index term of a token: its diacritics removed, so "café" and "cafe" are one term (as FTS5 matched them)."""
    return token if token.isascii() else "".join(map(_fold_char, token))


def _member(sorted_values: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Which of ``values`` are in ``sorted_values`` (ascending), a boolean each."""
    if not len(sorted_values):
        return np.zeros(len(values), bool)
    at = np.minimum(np.searchsorted(sorted_values, values), len(sorted_values) - 1)
    return sorted_values[at] == values


def _empty() -> tuple[np.ndarray, np.ndarray]:
    return np.zeros(0, np.int64), np.zeros(0, np.float32)


class KeywordIndex:
    """BM25 over one text per item, keyed by the items' int64 keys. Safe to share between threads.

    Args:
        columns: the catalog columns whose values make an item's keyword text (recorded in the manifest).
    """

    def __init__(self, columns: tuple[str, ...] | list[str] = ()) -> None:
        self.columns = tuple(columns)
        self._lock = threading.Lock()
        self._vocab: dict[str, int] = {}  # term -> term id
        self._starts = np.zeros(1, np.int64)  # term id -> its postings: _slots/_tfs[_starts[id]:_starts[id + 1]]
        self._slots = np.zeros(0, np.int32)  # postings, term by term, ascending slots within a term
        self._tfs = np.zeros(0, np.int32)  # the term's count in the item
        self._keys = np.zeros(0, np.int64)  # slot -> key; slots are appended, never reused until compacted
        self._lengths = np.zeros(0, np.int32)  # slot -> the item's tokens
        self._alive = np.zeros(0, bool)  # slot -> not removed
        self._sorted_keys = np.zeros(0, np.int64)  # the held keys, ascending
        self._sorted_slots = np.zeros(0, np.int64)  # their slots
        self._count = 0
        self._total = 0  # tokens of the held items
        self._norm: np.ndarray | None = None  # slot -> k1 * (1 - b + b * |d| / avgdl), until the items change
        self._cache: dict[int, tuple[np.ndarray, np.ndarray, float]] = {}  # term id -> _weights, until the items change
        self._cached = 0  # postings in _cache
        self._scratch: np.ndarray | None = None  # slot -> score, zero between queries (searches hold the lock)
        self._marks = np.zeros(0, bool)  # slot -> listed as a candidate, False between queries

    def __len__(self) -> int:
        return self._count

    # ---------------------------------------------------------------- writes

    def add(self, keys: np.ndarray, texts: list[str]) -> None:
        """Index the texts of these items (an empty text adds nothing). Keys must not be held already."""
        rows = [(int(k), tokens) for k, t in zip(keys, texts) if t for tokens in [tokenize(t)] if tokens]
        self._add_tokens(np.array([k for k, _ in rows], np.int64), [tokens for _, tokens in rows])

    def _add_tokens(self, keys: np.ndarray, docs: list[list[str]]) -> None:
        if not len(keys):
            return
        with self._lock:
            distinct, times = np.unique(keys, return_counts=True)
            clash = np.union1d(distinct[times > 1], keys[_member(self._sorted_keys, keys)])
            if len(clash):
                raise ValueError(f"keyword index: keys {clash[:10].tolist()} are held already or given twice; remove them first")
            vocab, fresh = self._vocab, {}
            base = len(self._keys)
            terms: list[int] = []
            counts: list[int] = []
            slots: list[int] = []
            for j, tokens in enumerate(docs):
                tf = Counter(map(term, tokens))
                for t, c in tf.items():
                    tid = vocab.get(t)
                    if tid is None:
                        tid = fresh.setdefault(t, len(vocab) + len(fresh))
                    terms.append(tid)
                    counts.append(c)
                slots.extend([base + j] * len(tf))
            n_terms = len(vocab) + len(fresh)
            term_ids = np.array(terms, np.int64)
            order = np.argsort(term_ids, kind="stable")  # term by term; slots stay ascending within a term
            term_ids = term_ids[order]
            held = len(self._slots)
            starts = np.concatenate([self._starts, np.full(len(fresh), held, np.int64)])
            at = starts[1:][term_ids]  # each new posting goes at the end of its term's run
            added = np.bincount(term_ids, minlength=n_terms)
            lengths = np.array([len(tokens) for tokens in docs], np.int32)
            new_slots = np.arange(base, base + len(keys), dtype=np.int64)
            by_key = np.argsort(keys, kind="stable")
            position = np.searchsorted(self._sorted_keys, keys[by_key])

            self._slots = np.insert(self._slots, at, np.array(slots, np.int32)[order])
            self._tfs = np.insert(self._tfs, at, np.array(counts, np.int32)[order])
            self._starts = starts + np.concatenate([[0], np.cumsum(added)])
            vocab.update(fresh)
            self._keys = np.concatenate([self._keys, keys])
            self._lengths = np.concatenate([self._lengths, lengths])
            self._alive = np.concatenate([self._alive, np.ones(len(keys), bool)])
            self._sorted_keys = np.insert(self._sorted_keys, position, keys[by_key])
            self._sorted_slots = np.insert(self._sorted_slots, position, new_slots[by_key])
            self._count += len(keys)
            self._total += int(lengths.sum())
            self._changed()

    def remove(self, keys: np.ndarray) -> None:
        """Forget these items (keys it does not hold are ignored)."""
        keys = np.asarray(keys, np.int64).ravel()
        with self._lock:
            at = np.unique(np.searchsorted(self._sorted_keys, keys)[_member(self._sorted_keys, keys)])
            if not len(at):
                return
            slots = self._sorted_slots[at]
            self._alive[slots] = False
            self._sorted_keys = np.delete(self._sorted_keys, at)
            self._sorted_slots = np.delete(self._sorted_slots, at)
            self._count -= len(at)
            self._total -= int(self._lengths[slots].sum())
            self._changed()
            if len(self._keys) - self._count > COMPACT_SHARE * len(self._keys):
                self._compact()

    def _compact(self) -> None:
        """The arrays without the removed items' slots, postings and terms (slots and terms renumbered, in order)."""
        alive = self._alive
        remap = np.cumsum(alive) - 1
        keep = alive[self._slots]
        n_terms = len(self._starts) - 1
        per_term = np.bincount(np.repeat(np.arange(n_terms), np.diff(self._starts))[keep], minlength=n_terms)
        used = per_term > 0
        if not used.all():
            names = [""] * n_terms
            for t, i in self._vocab.items():
                names[i] = t
            self._vocab = {names[i]: j for j, i in enumerate(np.flatnonzero(used).tolist())}
        self._starts = np.concatenate([[0], np.cumsum(per_term[used])]).astype(np.int64)
        self._slots = remap[self._slots[keep]].astype(np.int32)
        self._tfs = self._tfs[keep]
        self._keys, self._lengths = self._keys[alive], self._lengths[alive]
        self._alive = np.ones(len(self._keys), bool)
        self._sorted_slots = remap[self._sorted_slots]
        self._scratch = None
        self._changed()

    # ---------------------------------------------------------------- reads

    def _postings(self, tid: int) -> tuple[np.ndarray, np.ndarray]:
        """A term's postings (slots, counts) among the held items."""
        lo, hi = self._starts[tid], self._starts[tid + 1]
        slots, tfs = self._slots[lo:hi], self._tfs[lo:hi]
        if self._count < len(self._keys):
            live = self._alive[slots]
            slots, tfs = slots[live], tfs[live]
        return slots, tfs

    def _slots_of(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The slots of these keys (-1 where not held) and whether each is held."""
        found = _member(self._sorted_keys, keys)
        slots = np.full(len(keys), -1, np.int64)
        slots[found] = self._sorted_slots[np.searchsorted(self._sorted_keys, keys[found])]
        return slots, found

    def _norms(self) -> np.ndarray:
        """Per slot, k1 * (1 - b + b * |d| / avgdl): BM25's length normalisation, until the items change."""
        if self._norm is None:
            self._norm = K1 * (1 - B + B * self._lengths / (self._total / self._count))
        return self._norm

    def _weights(self, tid: int) -> tuple[np.ndarray, np.ndarray, float]:
        """A term's postings among the held items: their slots, their BM25 weights idf * tf * (k1 + 1) / (tf + k1 *
        (1 - b + b * |d| / avgdl)), and the largest. Kept until the items change (a common word's postings are read
        by many queries), up to CACHED_POSTINGS in all."""
        cached = self._cache.get(tid)
        if cached is not None:
            return cached
        slots, tfs = self._postings(tid)
        idf = math.log((self._count - len(slots) + 0.5) / (len(slots) + 0.5))
        weights = (idf if idf > 0 else IDF_FLOOR) * (tfs * (K1 + 1)) / (tfs + self._norms()[slots])
        found = (slots, weights, float(weights.max()) if len(slots) else 0.0)
        if len(slots) >= CACHED_FROM:
            if self._cached + len(slots) > CACHED_POSTINGS:
                self._cache, self._cached = {}, 0
            self._cache[tid] = found
            self._cached += len(slots)
        return found

    def _changed(self) -> None:
        self._norm, self._cache, self._cached = None, {}, 0

    def search(self, text: str, n: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The ``n`` best (keys, BM25 scores) for a query text, best first, equal scores in key order; only
        ``allowed`` keys if given.

        Items sharing no token with the query are not returned: fewer than ``n`` may come back.
        """
        terms: dict[str, int] = {}
        for token in dict.fromkeys(tokenize(text)):  # each distinct token counts once, as an FTS5 phrase did
            t = term(token)
            terms[t] = terms.get(t, 0) + 1  # "café cafe": two phrases of one term, counted twice
        if not terms or n < 1:
            return _empty()
        with self._lock:
            if not self._count:
                return _empty()
            parts = []  # (slots, weights with the idf, the most any item gets from the term)
            for t, times in terms.items():
                tid = self._vocab.get(t)
                if tid is None:
                    continue
                slots, weights, most = self._weights(tid)
                if len(slots):
                    parts.append((slots, weights, most) if times == 1 else (slots, times * weights, times * most))
            if not parts:
                return _empty()
            allow = None
            if allowed is not None:
                held, found = self._slots_of(np.asarray(allowed, np.int64).ravel())
                allow = np.zeros(len(self._keys), bool)
                allow[held[found]] = True
            found, scores = self._best(parts, n, allow)
            keys = self._keys[found]
        return _top(keys, scores, n)

    def _best(self, parts: list[tuple[np.ndarray, np.ndarray, float]], n: int, allow: np.ndarray | None
              ) -> tuple[np.ndarray, np.ndarray]:
        """Slots and scores of a set of items that holds the ``n`` best (and every item tied with the n-th).

        Every term's weights are summed into a scratch array; the candidates are then the items of the terms
        with the highest bounds (the rare ones) first: once the n-th best score among them beats what items
        holding only the other terms could reach at most (the sum of those terms' bounds), no other item can
        enter the n best, and the common words' long postings are neither listed nor sorted.
        """
        if len(parts) == 1:
            slots, scores, _ = parts[0]
            keep = slice(None) if allow is None else allow[slots]
            return slots[keep], scores[keep]
        if self._scratch is None or len(self._scratch) < len(self._keys):
            self._scratch, self._marks = np.zeros(len(self._keys)), np.zeros(len(self._keys), bool)
        acc, listed = self._scratch, self._marks
        union: list[np.ndarray] = []
        try:
            for slots, scores, _ in parts:
                acc[slots] += scores
            parts = sorted(parts, key=lambda part: -part[2])
            for j, (slots, _, _) in enumerate(parts[:-1]):
                union.append(slots if j == 0 else slots[~listed[slots]])  # the term's items not listed yet
                listed[union[-1]] = True
                found = union[0] if j == 0 else np.concatenate(union)
                if allow is not None:
                    found = found[allow[found]]
                if len(found) >= n:
                    scores = acc[found]
                    nth = np.partition(scores, len(scores) - n)[len(scores) - n]
                    if sum(part[2] for part in parts[j + 1:]) * (1 + 1e-9) < nth:
                        return found, scores
            found = np.flatnonzero(acc[:len(self._keys)])
            if allow is not None:
                found = found[allow[found]]
            return found, acc[found]
        finally:
            for slots, _, _ in parts:
                acc[slots] = 0.0
            for slots in union:
                listed[slots] = False

    def holds(self, keys: np.ndarray) -> np.ndarray:
        """Which of these items have a keyword text at all (a boolean per key)."""
        keys = np.asarray(keys, np.int64).ravel()
        with self._lock:
            return _member(self._sorted_keys, keys)

    def having(self, tokens: list[str], keys: np.ndarray) -> np.ndarray:
        """Which of these items' texts hold every one of these tokens (a boolean per key)."""
        keys = np.asarray(keys, np.int64).ravel()
        if not tokens or not len(keys):
            return np.zeros(len(keys), bool)
        with self._lock:
            slots, ok = self._slots_of(keys)
            for t in dict.fromkeys(map(term, tokens)):
                tid = self._vocab.get(t)
                if tid is None:
                    return np.zeros(len(keys), bool)
                ok &= _member(self._slots[self._starts[tid]:self._starts[tid + 1]], slots)
        return ok

    def describe(self) -> dict[str, Any]:
        return {"count": self._count, "columns": list(self.columns), "tokenizer": TOKENIZER_VERSION, "format": FORMAT,
                "ranking": "bm25", "k1": K1, "b": B, "terms": len(self._vocab)}

    # ---------------------------------------------------------------- files

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        with self._lock:
            if self._count < len(self._keys):
                self._compact()
            names = [""] * len(self._vocab)
            for t, i in self._vocab.items():
                names[i] = t
            arrays = {"format": np.array(FORMAT), "keys": self._keys, "lengths": self._lengths, "starts": self._starts,
                      "slots": self._slots, "tfs": self._tfs, "terms": np.frombuffer("\n".join(names).encode(), np.uint8)}
            with open(folder / FILE, "wb") as f:
                np.savez(f, **arrays)

    @classmethod
    def load(cls, folder: str | Path, described: dict[str, Any]) -> KeywordIndex:
        """A saved keyword index; one saved as SQLite FTS5 (``keywords.sqlite``, before format 2) is converted."""
        folder = Path(folder)
        if described.get("tokenizer") != TOKENIZER_VERSION:
            raise IndexLoadError(f"{folder / FILE}: keyword index of tokenizer {described.get('tokenizer')}, this version reads "
                                 f"{TOKENIZER_VERSION}; re-index")
        index = cls(described.get("columns", ()))
        if (folder / FILE).is_file() or not (folder / FTS5_FILE).is_file():
            path = folder / FILE
            index._read(path)
        else:
            path = folder / FTS5_FILE
            index._convert(path)
        if index._count != described.get("count"):
            raise IndexLoadError(f"{path} holds {index._count} texts, the manifest says {described.get('count')}")
        return index

    def _read(self, path: Path) -> None:
        import zipfile

        try:
            with np.load(path, allow_pickle=False) as z:
                if int(z["format"]) != FORMAT:
                    raise ValueError(f"format {int(z['format'])}, this version reads {FORMAT}")
                keys, lengths, starts = z["keys"].astype(np.int64), z["lengths"].astype(np.int32), z["starts"].astype(np.int64)
                slots, tfs, blob = z["slots"].astype(np.int32), z["tfs"].astype(np.int32), z["terms"].tobytes()
        except FileNotFoundError:
            raise IndexLoadError(f"{path}: missing from the saved index") from None
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            raise IndexLoadError(f"{path}: not a readable keyword index: {exc}") from exc
        names = blob.decode().split("\n") if len(starts) > 1 else []
        problem = (len(lengths) != len(keys) and "keys and lengths differ in number"
                   or len(starts) != len(names) + 1 and "terms and their postings differ in number"
                   or (starts[0] != 0 or starts[-1] != len(slots) or len(tfs) != len(slots) or (np.diff(starts) < 0).any())
                   and "the postings' offsets are inconsistent"
                   or len(slots) and (slots.min() < 0 or slots.max() >= len(keys)) and "a posting names no item"
                   or len(np.unique(keys)) != len(keys) and "a key is held twice"
                   or len(set(names)) != len(names) and "a term is listed twice")
        if problem:
            raise IndexLoadError(f"{path}: not a consistent keyword index: {problem}")
        by_key = np.argsort(keys, kind="stable")
        self._vocab = {t: i for i, t in enumerate(names)}
        self._starts, self._slots, self._tfs, self._keys, self._lengths = starts, slots, tfs, keys, lengths
        self._alive = np.ones(len(keys), bool)
        self._sorted_keys, self._sorted_slots = keys[by_key], by_key.astype(np.int64)
        self._count, self._total = len(keys), int(lengths.sum())

    def _convert(self, path: Path) -> None:
        """Read a keyword index saved as SQLite FTS5: each item's stored tokens, indexed again."""
        import sqlite3

        try:
            source = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
            try:
                rows = source.execute("SELECT rowid, body FROM docs ORDER BY rowid").fetchall()
            finally:
                source.close()
        except sqlite3.Error as exc:
            raise IndexLoadError(f"{path}: not a readable keyword index: {exc}") from exc
        rows = [(key, body.split()) for key, body in rows if body and body.split()]
        self._add_tokens(np.array([key for key, _ in rows], np.int64), [tokens for _, tokens in rows])


def _top(keys: np.ndarray, scores: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``n`` best (keys, scores), best first, equal scores in key order (FTS5's order: it read items by key)."""
    if len(scores) > n:
        kth = np.partition(scores, len(scores) - n)[len(scores) - n]
        keep = np.flatnonzero(scores >= kth)
        keys, scores = keys[keep], scores[keep]
    order = np.lexsort((keys, -scores))[:n]
    return keys[order], scores[order].astype(np.float32)
