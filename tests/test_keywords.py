"""The keyword index (keywords.py): BM25 scores and rankings equal to SQLite FTS5's bm25(), the index the
keyword search was built on before, on generated corpora, the fixture catalog and the demo catalog, through
adds and removals; its other behaviours (filters, holds, having, threads, files); saves of the FTS5 index
still load (issue 29, point 4)."""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
import threading

import numpy as np
import pandas as pd
import pytest

import multiretrieval as mr
from multiretrieval.keywords import FILE, FTS5_FILE, KeywordIndex, keyword_texts, term, tokenize

DEMO = "data/demo/catalog.csv"


class Fts5:
    """The keyword index of earlier versions, as reference: SQLite FTS5 over the tokens, ranked by bm25()."""

    def __init__(self, path: str = ":memory:") -> None:
        self.db = sqlite3.connect(path, isolation_level=None)
        if path == ":memory:":
            self.db.execute("CREATE VIRTUAL TABLE docs USING fts5(body, tokenize='unicode61 remove_diacritics 2', detail=column)")

    def add(self, keys, texts) -> None:
        rows = [(int(k), " ".join(tokens)) for k, t in zip(keys, texts) if t for tokens in [tokenize(t)] if tokens]
        self.db.executemany("INSERT INTO docs(rowid, body) VALUES (?, ?)", rows)

    def remove(self, keys) -> None:
        self.db.executemany("DELETE FROM docs WHERE rowid = ?", [(int(k),) for k in keys])

    def search(self, text: str, n: int, allowed=None) -> tuple[np.ndarray, np.ndarray]:
        tokens = list(dict.fromkeys(tokenize(text)))
        if not tokens:
            return np.zeros(0, np.int64), np.zeros(0)
        found = self.db.execute("SELECT rowid, -bm25(docs) FROM docs WHERE docs MATCH ? ORDER BY rank",
                                (" OR ".join(f'"{t}"' for t in tokens),)).fetchall()
        if allowed is not None:
            allow = set(np.asarray(allowed).tolist())
            found = [f for f in found if f[0] in allow]
        found = found[:n]
        return np.array([k for k, _ in found], np.int64), np.array([s for _, s in found])


def same_ranking(ours: tuple[np.ndarray, np.ndarray], reference: tuple[np.ndarray, np.ndarray], query: str) -> None:
    """The same scores (to 1e-5 relative) and the same keys in the same order; items whose reference scores
    differ by float noise only (1e-9 relative: sums of the same terms in another order) may swap."""
    keys, scores = ours
    ref_keys, ref_scores = reference
    assert len(keys) == len(ref_keys), query
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, err_msg=query)
    if not np.array_equal(keys, ref_keys):
        group = np.r_[0, np.cumsum(~np.isclose(ref_scores[1:], ref_scores[:-1], rtol=1e-9, atol=0))]
        for g in np.unique(group):
            assert set(keys[group == g]) == set(ref_keys[group == g]), query


def generated(n: int, seed: int) -> tuple[np.ndarray, list[str], list[str]]:
    """Keys, texts and queries: Zipf-distributed words (a few on more than half the texts, where the idf is
    floored), repeated words, accented and unaccented spellings, model codes, texts without a token."""
    rng = np.random.default_rng(seed)
    words = [f"w{i}" for i in range(400)] + ["café", "cafe", "Crème", "creme", "naïve", "façade", "KX-2210", "kx2210", "500ml",
                                             "Ǡǡ", "ǟ", "Ødegaard", "straße", "İstanbul"]
    p = 1.0 / np.arange(1, len(words) + 1) ** 0.9
    p /= p.sum()
    texts = []
    for _ in range(n):
        chosen = list(rng.choice(words, int(rng.integers(1, 14)), p=p))
        if rng.random() < 0.6:
            chosen.append("oak")  # on more than half the texts: idf <= 0, floored
        if rng.random() < 0.2:
            chosen += [chosen[0]] * int(rng.integers(1, 4))  # a word several times: tf > 1
        texts.append(" ".join(chosen))
    for i in rng.choice(n, n // 50, replace=False):
        texts[i] = rng.choice(["", "the of a", "  "])  # no token: not indexed
    keys = rng.choice(10 * n, n, replace=False).astype(np.int64)  # in no order
    queries = [" ".join(rng.choice(words, int(rng.integers(1, 6)), p=p)) for _ in range(60)]
    queries += [texts[i] for i in rng.choice(n, 20)] + ["oak", "oak w0", "cafe", "CAFÉ crème", "café cafe", "kx-2210",
                                                         "KX 2210", "Istanbul", "strasse", "zzz unknown", "the"]
    return keys, texts, queries


@pytest.mark.parametrize("seed", [0, 1])
def test_scores_and_rankings_equal_fts5_bm25_on_a_generated_corpus(seed):
    keys, texts, queries = generated(3000, seed)
    ours, reference = KeywordIndex(("title",)), Fts5()
    ours.add(keys, texts)
    reference.add(keys, texts)
    assert len(ours) == reference.db.execute("SELECT count(*) FROM docs").fetchone()[0]
    allowed = np.sort(np.random.default_rng(seed).choice(keys, 700, replace=False))
    for q in queries:
        every = reference.search(q, len(keys))  # LIMIT n reads the first n of this order
        for n in (1, 10, 110, len(keys)):
            same_ranking(ours.search(q, n), (every[0][:n], every[1][:n]), q)
        same_ranking(ours.search(q, 20, allowed), reference.search(q, 20, allowed), q)


def test_scores_and_rankings_equal_fts5_bm25_on_the_catalogs(catalog):
    for df in (catalog.df, mr.Catalog.from_csv(DEMO).df):
        texts = keyword_texts(df, ("title", "description"))
        keys = np.arange(len(df), dtype=np.int64)
        ours, reference = KeywordIndex(("title", "description")), Fts5()
        ours.add(keys, texts)
        reference.add(keys, texts)
        queries = texts + ["lamp", "desk lamp", "seat sofa", "kitchen appliance freezer", "front-loading 7 kg", "table chair",
                           "Armchair ottoman, blue", "bed double bed", "round table oak"]
        for q in queries:
            same_ranking(ours.search(q, 110), reference.search(q, 110), q)


def test_adds_and_removals_in_place_keep_fts5s_rankings():
    """Batches added, items removed (compacting the arrays past a quarter dead), items re-added with a new text
    (an upsert's metadata update): after each step the rankings are FTS5's over the same items."""
    keys, texts, queries = generated(2400, 7)
    ours, reference = KeywordIndex(), Fts5()
    rng = np.random.default_rng(7)
    held = {}

    def check(step: str) -> None:
        assert len(ours) == reference.db.execute("SELECT count(*) FROM docs").fetchone()[0], step
        for q in queries[::3]:
            same_ranking(ours.search(q, 50), reference.search(q, 50), f"{step}: {q}")

    for lo, hi in ((0, 1), (1, 11), (11, 600), (600, 1800)):
        ours.add(keys[lo:hi], texts[lo:hi])
        reference.add(keys[lo:hi], texts[lo:hi])
        held.update(zip(keys[lo:hi].tolist(), texts[lo:hi]))
        check(f"added {lo}:{hi}")
    for size in (1, 300, 500):  # 800 of 1,800 gone: compacted on the way
        gone = rng.choice(sorted(held), size, replace=False)
        ours.remove(np.r_[gone, 10**9])  # a key it does not hold is ignored
        reference.remove(gone)
        for k in gone:
            del held[k]
        check(f"removed {size}")
    again = rng.choice(sorted(held), 200, replace=False)  # new texts for held items: removed, then added
    new_texts = [texts[i] for i in rng.choice(len(texts), 200)]
    ours.remove(again)
    reference.remove(again)
    ours.add(again, new_texts)
    reference.add(again, new_texts)
    check("re-added")
    ours.add(keys[1800:], texts[1800:])
    reference.add(keys[1800:], texts[1800:])
    check("added after removals")


def test_holds_having_and_filters():
    k = KeywordIndex(("title",))
    k.add(np.array([30, 10, 20, 40]), ["Café table KX-2210", "cafe chair", "", "Desk lamp 500ml"])
    assert k.holds(np.array([10, 20, 30, 40, 99])).tolist() == [True, False, True, True, False]
    assert k.having(["kx2210"], np.array([10, 30, 99])).tolist() == [False, True, False]
    assert k.having(["café"], np.array([10, 30, 40])).tolist() == [True, True, False]  # accents fold, as FTS5's did
    assert k.having(["cafe", "chair"], np.array([10, 30])).tolist() == [True, False]
    assert k.having(["zz"], np.array([10, 30])).tolist() == [False, False] and k.having([], np.array([10])).tolist() == [False]
    assert k.search("cafe", 5)[0].tolist() == [10, 30]  # the shorter text first
    assert k.search("cafe", 5, allowed=np.array([30, 20, 77]))[0].tolist() == [30]
    assert k.search("cafe", 5, allowed=np.zeros(0, np.int64))[0].size == 0
    k.remove(np.array([30]))
    assert k.holds(np.array([30]))[0] == np.False_ and k.having(["kx2210"], np.array([30])).tolist() == [False]
    with pytest.raises(ValueError, match=r"keys \[10\] are held already"):
        k.add(np.array([10]), ["again"])
    with pytest.raises(ValueError, match=r"keys \[50\]"):
        k.add(np.array([50, 50]), ["twice", "twice"])
    assert len(k) == 2  # a refused add changes nothing
    assert k.search("twice", 5)[0].size == 0


def test_a_token_fts5_split_into_pieces_is_one_term():
    """Letters that Unicode 6.1 (SQLite's unicode61 tables) did not call letters (New Tai Lue vowel signs, two Vedic
    signs) split a token for FTS5, and a query holding one failed ("phrase queries are not supported")."""
    k = KeywordIndex()
    k.add(np.array([1, 2]), ["desk lamp", "x\u19b0y lamp"])
    assert k.search("x\u19b0y lamp", 5)[0].tolist() == [2, 1]


def test_terms_fold_every_character_as_fts5_did():
    """``term`` of every token a single code point makes (all of Unicode) against the term FTS5's unicode61
    (remove_diacritics 2) indexed it as; only tokens FTS5 indexed as no term at all (see the test above) differ."""
    text = " ".join(chr(c) for c in range(0x110000) if not 0xD800 <= c < 0xE000)
    tokens = sorted(set(tokenize(text)))
    db = sqlite3.connect(":memory:")
    db.execute("CREATE VIRTUAL TABLE t USING fts5(body, tokenize='unicode61 remove_diacritics 2', detail=full)")
    db.execute("CREATE VIRTUAL TABLE v USING fts5vocab(t, instance)")
    db.executemany("INSERT INTO t(rowid, body) VALUES (?, ?)", enumerate(tokens))
    indexed: dict[int, list[str]] = {}
    for got, doc, offset in db.execute("SELECT term, doc, offset FROM v ORDER BY doc, offset"):
        indexed.setdefault(doc, []).append(got)
    differ = [(t, indexed.get(i, [])) for i, t in enumerate(tokens) if indexed.get(i, []) != [term(t)]]
    assert len(tokens) > 100_000 and sum(term(t) != t for t in tokens) > 200  # Latin letters with diacritics
    assert all(not got for _, got in differ) and len(differ) < 50, differ[:10]


def test_saves_and_loads_after_removals(tmp_path):
    keys, texts, queries = generated(1500, 3)
    k = KeywordIndex(("title", "description"))
    k.add(keys, texts)
    k.remove(keys[::7])
    k.save(tmp_path / "kw")
    record = json.loads(json.dumps(k.describe()))
    assert record["format"] == 2 and record["count"] == len(k) and (tmp_path / "kw" / FILE).is_file()
    again = KeywordIndex.load(tmp_path / "kw", record)
    assert again.columns == ("title", "description") and len(again) == len(k)
    for q in queries:
        np.testing.assert_array_equal(again.search(q, 30)[0], k.search(q, 30)[0])
        np.testing.assert_array_equal(again.search(q, 30)[1], k.search(q, 30)[1])
    again.add(keys[::7], texts[::7])
    fresh = KeywordIndex()
    fresh.add(keys, texts)
    for q in queries:
        same_ranking(again.search(q, 30), fresh.search(q, 30), q)


def test_a_damaged_file_is_refused_with_its_reason(tmp_path):
    k = KeywordIndex()
    k.add(np.array([1, 2]), ["desk lamp", "oak table"])
    k.save(tmp_path / "kw")
    with np.load(tmp_path / "kw" / FILE) as z:
        arrays = dict(z)
    arrays["slots"] = arrays["slots"] + 5
    with open(tmp_path / "kw" / FILE, "wb") as f:
        np.savez(f, **arrays)
    with pytest.raises(mr.IndexLoadError, match="keywords.npz: not a consistent keyword index: a posting names no item"):
        KeywordIndex.load(tmp_path / "kw", k.describe())
    with pytest.raises(mr.IndexLoadError, match="holds 2 texts, the manifest says 3"):
        k.save(tmp_path / "ok")
        KeywordIndex.load(tmp_path / "ok", {**k.describe(), "count": 3})


def test_searches_while_items_change():
    keys, texts, queries = generated(1200, 5)
    k = KeywordIndex()
    k.add(keys[:800], texts[:800])
    failures: list[BaseException] = []

    def read() -> None:
        try:
            for q in queries * 3:
                found, scores = k.search(q, 20)
                assert len(set(found.tolist())) == len(found) and (np.diff(scores) <= 0).all()
                k.holds(found)
                k.having(["w1"], found)
        except BaseException as exc:  # noqa: BLE001 - reported below
            failures.append(exc)

    def write() -> None:
        try:
            for lo in range(800, 1200, 20):
                k.add(keys[lo:lo + 20], texts[lo:lo + 20])
                k.remove(keys[lo - 800:lo - 780])
        except BaseException as exc:  # noqa: BLE001
            failures.append(exc)

    threads = [threading.Thread(target=read) for _ in range(3)] + [threading.Thread(target=write)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures[0]
    fresh = KeywordIndex()
    fresh.add(keys[400:], texts[400:])
    for q in queries:
        same_ranking(k.search(q, 30), fresh.search(q, 30), q)


# ---------------------------------------------------------------- saves of the FTS5 index (before format 2)

LEGACY = "keywords-fts5"  # tests/fixtures: keywords.sqlite and its manifest record, saved by the FTS5 index of the fixture catalog


def test_an_fts5_keyword_file_converts_on_load(fixtures, tmp_path):
    record = json.loads((fixtures / LEGACY / "record.json").read_text())
    assert record["ranking"] == "fts5 bm25" and "format" not in record
    k = KeywordIndex.load(fixtures / LEGACY, record)
    reference = Fts5(f"file:{fixtures / LEGACY / FTS5_FILE}?mode=ro")
    bodies = [body for (body,) in reference.db.execute("SELECT body FROM docs")]
    for q in bodies + ["lamp", "seat sofa", "kitchen appliance freezer", "front-loading 7 kg"]:
        same_ranking(k.search(q, 10), reference.search(q, 10), q)
    k.save(tmp_path / "kw")
    assert sorted(p.name for p in (tmp_path / "kw").iterdir()) == [FILE]
    shutil.copy(fixtures / LEGACY / FTS5_FILE, tmp_path / FTS5_FILE)
    (tmp_path / FTS5_FILE).write_bytes(b"not a database")
    with pytest.raises(mr.IndexLoadError, match="keywords.sqlite: not a readable keyword index"):
        KeywordIndex.load(tmp_path, record)


def test_a_saved_index_with_the_fts5_keywords_loads_and_saves_the_new_file(indexed, fixtures, tmp_path):
    """A retriever saved by an earlier version (keywords/keywords.sqlite in its manifest) loads, answers as the
    same catalog indexed now does, and its next save writes keywords/keywords.npz."""
    folder = indexed.save(tmp_path / "old")
    shutil.rmtree(folder / "keywords")
    (folder / "keywords").mkdir()
    shutil.copy(fixtures / LEGACY / FTS5_FILE, folder / "keywords" / FTS5_FILE)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["keywords"] = json.loads((fixtures / LEGACY / "record.json").read_text())
    manifest["files"] = {**{p: h for p, h in manifest["files"].items() if not p.startswith("keywords/")},
                         f"keywords/{FTS5_FILE}": hashlib.sha256((folder / "keywords" / FTS5_FILE).read_bytes()).hexdigest()}
    (folder / "manifest.json").write_text(json.dumps(manifest))

    old = mr.Retriever.load(folder)
    for q in ["desk lamp", "seat sofa", "tall fridge with freezer", "front-loading 7 kg", "toilet"]:
        pd.testing.assert_frame_equal(old.search(text=q, k=8), indexed.search(text=q, k=8))
    saved = json.loads((old.save(tmp_path / "new") / "manifest.json").read_text())
    assert f"keywords/{FILE}" in saved["files"] and not any(p.endswith(".sqlite") for p in saved["files"])
    assert saved["keywords"]["format"] == 2 and saved["keywords"]["count"] == len(indexed)
