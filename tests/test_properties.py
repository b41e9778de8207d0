"""Generated catalogs at the reader, generated filters at the grammar (hypothesis).

Bounded and reproducible: a fixed number of examples, derandomized, no example database.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import multiretrieval as mr
from multiretrieval.errors import LimitError, QueryError
from multiretrieval.filters import compile_filter

from .conftest import FIXTURES

SETTINGS = dict(deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))

# ---------------------------------------------------------------- values a catalog may hold

TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)  # any Unicode but lone surrogates
ODD_TEXT = st.sampled_from(["", " ", "007", "42", " 42", "-0", "1e3", "1.5", "nan", "NULL", "None", "True", "x\ny", 'a "q" b',
                            "a,b", "\t", "ünï©ødé", "😀", "\u200b", "=1+1", "'; DROP TABLE catalog; --"])
HUGE = st.sampled_from(["x" * 100_000, "a red sofa " * 20_000])
CELL = st.one_of(st.none(), TEXT, ODD_TEXT, st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True),
                 st.booleans())
INT_IDS = st.one_of(st.integers(-2**63, 2**63 - 1), st.sampled_from([0, -1, 2**63 - 1, -2**63]))
STR_IDS = st.one_of(TEXT, ODD_TEXT)
ANY_ID = st.one_of(INT_IDS, STR_IDS, st.integers(2**63, 2**70), st.floats(allow_nan=True), st.booleans(), st.none())
IMAGES = st.sampled_from([None, str(FIXTURES / "images" / "bed1.png"), "images/refrigerator.png", "missing.png",
                          str(FIXTURES / "catalog.csv")])  # relative to the catalog, missing, not an image


@st.composite
def catalogs(draw, ids=ANY_ID, max_rows=6):
    n = draw(st.integers(1, max_rows))
    return pd.DataFrame({
        "id": pd.Series(draw(st.lists(ids, min_size=n, max_size=n)), dtype=object),
        "image": draw(st.lists(IMAGES, min_size=n, max_size=n)),
        "title": draw(st.lists(st.one_of(st.none(), TEXT, ODD_TEXT, HUGE), min_size=n, max_size=n)),
        "price": pd.Series(draw(st.lists(CELL, min_size=n, max_size=n)), dtype=object),  # mixed kinds
        "note": draw(st.lists(st.one_of(st.none(), TEXT, HUGE), min_size=n, max_size=n)),
    })


def check_catalog(catalog: mr.Catalog, written_ids: list[str]) -> None:
    """Every row is kept, ids are unique and kept exactly (as the text they were written as)."""
    assert len(catalog) == len(written_ids)
    ids = catalog.ids
    assert len({str(i) for i in ids}) == len(ids)
    for got, written in zip(ids, written_ids):
        assert str(got) == written or (isinstance(got, (int, np.integer)) and int(written) == got), (got, written)
    texts, images = catalog.texts(), catalog.image_sources()
    assert all(t is not None or i is not None for t, i in zip(texts, images))


@pytest.mark.parametrize("kind", ["csv", "parquet"])
@settings(max_examples=100, **SETTINGS)
@given(df=catalogs(), ids_kind=st.sampled_from(["int", "str", "any"]))
def test_the_reader_keeps_every_row_of_a_generated_file_or_names_the_problem(kind, df, ids_kind, tmp_path_factory):
    folder = tmp_path_factory.mktemp("cat")
    if kind == "parquet":  # a parquet column holds one type: ids of one kind, mixed cells as text
        as_int = lambda i: i if isinstance(i, int) and not isinstance(i, bool) and -2**63 <= i < 2**63 else None  # noqa: E731
        ids = [as_int(i) for i in df["id"]] if ids_kind == "int" else [None if i is None else str(i) for i in df["id"]]
        df = df.assign(id=pd.Series(ids, dtype="Int64" if ids_kind == "int" else object),
                       price=[None if v is None else str(v) for v in df["price"]])
        df.to_parquet(folder / "c.parquet", index=False)
        read = lambda: mr.Catalog.from_parquet(folder / "c.parquet")  # noqa: E731
    else:
        df.to_csv(folder / "c.csv", index=False)
        read = lambda: mr.Catalog.from_csv(folder / "c.csv")  # noqa: E731
    try:
        catalog = read()
    except mr.CatalogError as exc:
        assert str(exc)  # a precise reason, never another exception
        return
    written = pd.read_csv(folder / "c.csv", dtype=str, keep_default_na=False)["id"].tolist() if kind == "csv" \
        else [str(i) for i in pd.read_parquet(folder / "c.parquet")["id"]]
    check_catalog(catalog, written)


@pytest.fixture(scope="module")
def embedder():
    return mr.Embedder()


@settings(max_examples=15, **SETTINGS)
@given(df=catalogs(ids=st.one_of(INT_IDS, STR_IDS), max_rows=4))
def test_a_generated_catalog_is_indexed_or_reported_row_by_row_and_saved_as_it_was(df, embedder, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ix")
    try:
        catalog = mr.Catalog(df, image_root=FIXTURES)
    except mr.CatalogError:
        return
    r = mr.Retriever(embedder=embedder)
    try:
        report = r.index(catalog, show_progress=False)
    except mr.CatalogError:  # every row failed: nothing to index, and it says so
        return
    skipped = {str(s.id) for s in report.skipped}
    assert report.indexed + len(skipped) == len(catalog)  # none lost, none twice
    assert sorted(map(str, r.items["id"])) == sorted(str(i) for i in catalog.ids if str(i) not in skipped)
    r.save(folder / "saved")
    again = mr.Retriever.load(folder / "saved")
    plain = lambda df: df.astype(object).where(df.notna(), None)  # noqa: E731 - missing is missing (None, NaN, NA)
    pd.testing.assert_frame_equal(plain(again.items), plain(r.items), check_dtype=False)  # text may come back as pandas strings
    titles = dict(zip(map(str, catalog.df["id"]), catalog.df["title"]))
    for item_id, title in zip(again.items["id"], again.items["title"]):
        given = titles[str(item_id)]
        assert title == given or (pd.isna(title) and (given is None or pd.isna(given)))


# ---------------------------------------------------------------- filters

COLUMNS = {"id": "integer", "title": "text", "price": "number", "when": "timestamp", "in_stock": "boolean"}
TABLE = pd.DataFrame({"_key": np.arange(5), "id": [1, 2, 3, 4, 5], "title": ["a bed", "A Lamp", None, "it's", "ünï"],
                      "price": [10.0, None, 3.5, -2.0, 1e6],
                      "when": pd.to_datetime(["2020-01-01", "2021-06-30", None, "1999-12-31", "2024-02-29"]),
                      "in_stock": [True, False, True, None, False]}).astype({"in_stock": "boolean"})


@pytest.fixture(scope="module")
def table_store():
    from multiretrieval.embedder import FEATURES
    from multiretrieval.items import ItemStore

    store = ItemStore()
    n = len(TABLE)
    features = {name: np.zeros((n, 1, 1), np.float32) if "tokens" in name else np.zeros((n, 1), bool) for name in FEATURES}
    store.append(TABLE.drop(columns=["_key"]), [None] * n, features)
    return store


NUMBER = st.one_of(st.integers(-100, 10**6).map(str), st.floats(0, 1e6, allow_nan=False).map(lambda f: repr(float(f))))
STRING = TEXT.map(lambda t: "'" + t.replace("'", "''") + "'")
NUMERIC_COLUMNS = st.sampled_from(["price", "id", "abs(price)", "round(price, 1)", "year(\"when\")", "length(title)"])
NUMERIC = st.recursive(st.one_of(NUMERIC_COLUMNS, NUMBER),
                       lambda inner: st.tuples(inner, st.sampled_from(["+", "-", "*", "%"]), inner).map(
                           lambda t: f"({t[0]} {t[1]} {t[2]})"),
                       max_leaves=4)
TEXTUAL = st.one_of(st.sampled_from(["title", "lower(title)", "upper(title)", "trim(title)", "coalesce(title, 'none')"]), STRING)
ATOM = st.one_of(
    st.tuples(NUMERIC, st.sampled_from(["=", "<>", "<", "<=", ">", ">="]), NUMERIC).map(" ".join),
    st.tuples(TEXTUAL, st.sampled_from(["=", "!=", "LIKE", "NOT ILIKE"]), TEXTUAL).map(" ".join),
    st.tuples(NUMERIC, st.lists(NUMBER, min_size=1, max_size=4)).map(lambda t: f"{t[0]} IN ({', '.join(t[1])})"),
    st.tuples(NUMERIC, NUMBER, NUMBER).map(lambda t: f"{t[0]} NOT BETWEEN {t[1]} AND {t[2]}"),
    st.sampled_from(["title IS NULL", "price IS NOT NULL", "in_stock", "NOT in_stock", "in_stock IS TRUE",
                     "\"when\" > DATE '2020-06-01'",
                     "CAST(price AS INTEGER) > 3", "TRY_CAST(title AS DOUBLE) IS NULL", "date_part('month', \"when\") = 6"]),
)
CONDITION = st.recursive(ATOM, lambda inner: st.one_of(
    st.tuples(inner, st.sampled_from(["AND", "OR"]), inner).map(lambda t: f"({t[0]} {t[1]} {t[2]})"),
    inner.map(lambda c: f"NOT ({c})")), max_leaves=5)


@settings(max_examples=200, **SETTINGS)
@given(where=CONDITION)
def test_a_filter_in_the_grammar_is_accepted_and_printed_within_it(where, table_store):
    sql = compile_filter(where, COLUMNS)
    assert compile_filter(sql, COLUMNS) == sql  # what runs parses back to itself: nothing outside the grammar
    try:
        keys = table_store.filter(where, 5.0)
    except LimitError:
        raise
    except QueryError as exc:  # a value DuckDB cannot convert or compute (1 % 0 is NULL, but '3x'::INT fails)
        assert "invalid filter" in str(exc) and "Columns:" in str(exc)
        return
    assert set(keys.tolist()) <= set(range(len(TABLE)))


SQL_WORDS = st.sampled_from(["SELECT", "FROM", "(", ")", ",", ";", "--", "/*", "*/", "'", '"', "range(9)",
                             "read_csv('/etc/passwd')",
                             "getenv('HOME')", "current_setting('threads')", "duckdb_settings()", "UNION", "ALL", "ANY", "EXISTS",
                             "price", "title", "1", "=", "AND", "OR", "NOT", "?", "$1", "::", "INT", "[1]", "{'a': 1}", "IN",
                             "x.y", "CASE", "WHEN", "THEN", "END", "LIKE", "||", "->", "@", "PRAGMA", "ATTACH", "COPY", "INSTALL",
                             "LOAD"])


@settings(max_examples=500, **SETTINGS)
@given(where=st.one_of(TEXT, st.lists(SQL_WORDS, min_size=1, max_size=12).map(" ".join)))
def test_any_text_as_a_filter_is_refused_precisely_or_runs(where, table_store):
    try:
        keys = table_store.filter(where, 5.0)
    except LimitError:
        raise
    except QueryError as exc:
        message = str(exc)
        assert message.startswith("where:") and "Columns:" in message
        return
    assert set(keys.tolist()) <= set(range(len(TABLE)))


def test_the_filter_grammar_compares_like_pandas(table_store):
    keys = lambda where: sorted(table_store.filter(where, 5.0).tolist())  # noqa: E731
    assert keys("price > 3 AND title IS NOT NULL") == [0, 4]
    assert keys("lower(title) LIKE '%lamp%' OR price IN (3.5, -2)") == [1, 2, 3]
    assert keys("year(\"when\") BETWEEN 2000 AND 2022") == [0, 1]
    assert keys("title = 'it''s'") == [3]
    assert keys("NOT in_stock") == [1, 4]
    assert keys("coalesce(price, 0) = 0") == [1]
    assert keys("abs(price) >= 2") == [0, 2, 3, 4]
