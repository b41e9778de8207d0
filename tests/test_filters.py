"""Filters that are only filters: the grammar's allow-list, its refusals, the time limit, the query bounds."""

from __future__ import annotations

import itertools
import re
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import multiretrieval as mr
from multiretrieval.config import RetrieverConfig
from multiretrieval.embedder import FEATURES
from multiretrieval.filters import compile_filter
from multiretrieval.items import ItemStore
from multiretrieval.query import SearchOptions
from multiretrieval.query.checks import check_batch, check_k, make_query

CROSS_JOIN = "(SELECT sum(a.range * b.range) FROM range(200000) a, range(200000) b) > 0"  # ran for minutes before


def ids(retriever, where):
    return sorted(retriever.search(text="a thing", k=100, where=where)["id"])


@pytest.mark.parametrize("where,expected", [
    ("price < 300", [47, 163, 570]),
    ("category = 'Kitchen' AND NOT (price > 600)", [575]),
    ("lower(title) LIKE '%bed%' OR title ILIKE 'sofa'", [56, 118]),
    ("category IN ('Bathroom', 'Lights')", [163, 570]),
    ("price BETWEEN 189 AND 259", [47, 570]),
    ("tags IS NULL", [163, 570]),
    ("round(width_cm) = 60 OR abs(width_cm - 13.7) < 0.01", [163, 575]),
    ("length(title) >= 12", [570, 575, 773]),
    ("\"width_cm\" * 2 > 500", [56]),
    ("coalesce(tags, 'none') = 'none' AND price >= 100", [570]),
    ("CAST(price AS INTEGER) = 499", [575]),
    ("id % 2 = 1 AND id NOT IN (47, 163)", [367, 575, 773]),
    ("Price < 40", [163]),  # column names are not case-sensitive, as in DuckDB
])
def test_filters_in_the_grammar_select_what_pandas_selects(indexed, where, expected):
    assert ids(indexed, where) == expected


@pytest.mark.parametrize("where,problem", [
    (CROSS_JOIN, "a subquery"),
    ("id IN (SELECT 1 FROM duckdb_settings())", "a subquery"),
    ("EXISTS (SELECT 1)", "a subquery"),
    ("current_setting('threads') = '2'", "the function current_setting()"),
    ("len(read_text('/etc/passwd')) > 0", "the function read_text()"),
    ("getenv('HOME') = '/root'", "the function getenv()"),
    ("regexp_matches(title, 'a.*')", "the function regexp_matches()"),
    ("price > 0; DROP TABLE catalog", "more than one statement"),
    ("price > 0 UNION SELECT 5", "a subquery"),
    ("price = ?", "a placeholder"),
    ("catalog.price > 0", "without a table"),
    ("_key > 3", "unknown column '_key'"),
    ("colour = 'red'", "unknown column 'colour'"),
    ("price = ANY (SELECT 1)", "the construct ANY"),
    ("CAST(price AS INT[]) = 1", "a cast to INT[]"),
    ("lower(" * 30 + "title" + ")" * 30 + " = 'x'", "nested more than 24 deep"),
    ("NOT " * 400 + "price > 1", "nested too deeply"),
    ("price <", "syntax error"),
], ids=lambda value: value[:40])
def test_filters_outside_the_grammar_are_refused_naming_what_is_allowed_and_the_columns(indexed, where, problem):
    with pytest.raises(mr.QueryError) as refused:
        indexed.search(text="sofa", where=where)
    message = str(refused.value)
    assert problem in message
    assert "Columns: id (integer), title (text), category (text)" in message and "price (number)" in message
    assert message.endswith("What a filter may hold: docs/queries.md#filters (--verbose prints it).")
    assert "A filter is one condition" not in message  # the grammar on demand: the error's details
    details = refused.value.details
    assert "A filter is one condition" in details and "LIKE" in details and "lower, upper, length" in details


def test_a_misspelt_column_gets_a_did_you_mean_in_one_short_line(indexed):
    """The issue's `categroy`: about 1,100 characters of grammar and no hint; now the hint, the columns and where the
    grammar is (the whole grammar on demand: ``details``, printed by --verbose)."""
    with pytest.raises(mr.QueryError) as refused:
        indexed.search(text="sofa", where="categroy = 'Kitchen'")
    message = str(refused.value)
    assert message.startswith("where: unknown column 'categroy' in \"categroy = 'Kitchen'\"; did you mean 'category'? Columns: ")
    assert len(message) < 400 and "\n" not in message and "docs/queries.md#filters" in message
    with pytest.raises(mr.QueryError, match=r"filters: no column 'categroy' in this index; did you mean 'category'\? Columns: "):
        indexed.search(text="sofa", filters={"categroy": "Kitchen"})
    with pytest.raises(mr.QueryError, match=r"unknown column 'PRCE' in .*; did you mean 'price'\?"):
        indexed.search(text="sofa", where="PRCE < 3")


def test_a_refused_filter_never_reaches_duckdb(retriever_copy, monkeypatch):
    import duckdb

    def no_duckdb(*args, **kwargs):
        raise AssertionError("a refused filter reached DuckDB")

    monkeypatch.setattr(duckdb, "connect", no_duckdb)  # the copy has run no filter yet: a filter would connect
    for where in (CROSS_JOIN, "id IN (SELECT 1 FROM duckdb_settings())", "getenv('HOME') = ''"):
        with pytest.raises(mr.QueryError, match="where: "):
            retriever_copy.search(text="sofa", where=where)
    with pytest.raises(AssertionError, match="reached DuckDB"):  # and a legal one does reach it
        retriever_copy.search(text="sofa", where="price > 1")


def test_unsafe_where_lets_a_trusted_caller_use_any_duckdb_expression_but_one(indexed):
    assert ids(indexed, None) == sorted(indexed.items["id"])
    found = indexed.search(text="x", k=100, where="regexp_matches(title, '^(Bed|Sofa)$')", unsafe_where=True)
    assert sorted(found["id"]) == [56, 118]
    with pytest.raises(mr.QueryError, match="UNION statement"):
        indexed.search(text="x", where="price > 0 UNION SELECT 5", unsafe_where=True)
    with pytest.raises(mr.QueryError, match="more than one statement"):
        indexed.search(text="x", where="price > 0; SELECT 1", unsafe_where=True)
    with pytest.raises(mr.QueryError, match="invalid filter"):  # external access stays off
        indexed.search(text="x", where="length(read_text('/etc/hostname')) > 0", unsafe_where=True)


def big_store(rows: int, cell: str) -> ItemStore:
    """An item store of many rows without any model: a text column ``notes`` and an integer id."""
    store = ItemStore()
    features = {name: np.zeros((rows, 1, 1) if "tokens" in name else (rows, 1), np.float32 if "tokens" in name else bool)
                for name in FEATURES}
    store.append(pd.DataFrame({"id": np.arange(rows), "notes": [f"{i} {cell}" for i in range(rows)]}), [None] * rows, features)
    return store


def slow_filter(column: str = "notes") -> str:
    """A legal filter that costs: 39 different case conversions of a text column, measured on every row."""
    terms = []
    for n in (1, 2, 3):
        for calls in itertools.product(("upper", "lower", "trim"), repeat=n):
            terms.append("length(" + "".join(f"{c}(" for c in calls) + column + ")" * n + ")")
    return " + ".join(terms) + " > 0"


def test_a_slow_filter_is_interrupted_at_the_time_limit_and_the_store_stays_usable():
    store = big_store(300_000, "ab" * 50)  # uncut, the slow filter runs ~10 s (DuckDB checks for the interrupt every 2,048 rows)
    answers: list = []

    def other_filter():
        answers.append(len(store.filter("id < 1000", 30.0)))

    with pytest.raises(mr.LimitError, match=r"ran longer than 0.3 s \(search.filter_timeout_s\) and was stopped"):
        worker = threading.Timer(0.1, other_filter)  # another filter, while the slow one runs
        worker.start()
        store.filter(slow_filter(), 0.3)
    worker.join(30)
    assert answers == [1000]
    assert len(store.filter("id % 1000 = 0", 30.0)) == 300  # the interrupted connection's table answers the next one
    with pytest.raises(mr.LimitError):
        store.filter(slow_filter(), 0.3)  # and is interrupted again


def test_a_structured_filter_compiles_while_another_thread_queries_the_filter_table(retriever_copy):
    """The column types a structured filter reads, asked while another call runs on the filter table's connection:
    the search page's first search and facet count, both filtered, come at once, and both looked the types up on
    the shared connection, which refuses a second thread's call (ResourceInUseException, a 500) while it answers one."""
    connection = retriever_copy.store._connection()
    running, release = threading.Event(), threading.Event()

    def hold(x: int) -> int:  # the other query, held while this thread filters
        running.set()
        release.wait(60)
        return x

    connection.create_function("hold", hold, ["BIGINT"], "BIGINT")
    other = threading.Thread(target=lambda: connection.execute("SELECT hold(1)").fetchall())  # as the other lookup did
    other.start()
    try:
        assert running.wait(60)
        kitchen = retriever_copy.facets(["price"], filters={"category": ["Kitchen"]})["price"]  # a list of texts: typed
        assert sum(kitchen["histogram"]["counts"]) == int((retriever_copy.items["category"] == "Kitchen").sum())
    finally:
        release.set()
        other.join(60)


def test_query_bounds_come_from_the_config_and_name_their_setting(indexed, tmp_path):
    bounds = {"max_k": 5, "max_text_tokens": 4, "max_where_chars": 20, "max_batch": 3}
    config = RetrieverConfig().with_overrides({"search": bounds})
    indexed.save(tmp_path / "ix")
    r = mr.Retriever.load(tmp_path / "ix", config=config)
    assert len(r.search(text="a bed", k=5)) == 5
    with pytest.raises(mr.LimitError, match=r"k = 10; a query may ask for at most 5 results \(search.max_k\)"):
        r.search(text="a bed")  # k=10, the default
    with pytest.raises(mr.LimitError, match=r"k \+ offset = 6.*search.max_k"):
        check_k(4, config, offset=2)
    with pytest.raises(mr.QueryError, match="offset must be a non-negative integer"):
        check_k(3, config, offset=-1)
    with pytest.raises(mr.LimitError, match=r"6 word pieces; a query text may have at most 4 \(search.max_text_tokens\)"):
        r.search(text="a bed with a headboard", k=5)
    with pytest.raises(mr.LimitError, match=r"where has 24 characters; a filter may have at most 20 \(search.max_where_chars\)"):
        r.search(text="a bed", k=5, where="price > 1 AND price < 99")
    with pytest.raises(mr.LimitError, match=r"4 queries in one batch; a batch may hold at most 3 \(search.max_batch\)"):
        check_batch(4, config)
    check_batch(3, config)
    assert indexed.config.search == RetrieverConfig().search  # the session's retriever keeps its own


QUERIES_PAGE = Path(__file__).resolve().parents[1] / "docs" / "queries.md"
FILTER_TABLE_COLUMNS = {"x": "text", "title": "text", "price": "number", "width cm": "number", "ts": "timestamp", "a": "text",
                  "b": "text"}


def docs_filter_examples() -> list[str]:
    """Every example of the "Filters" table of the docs (docs/queries.md) as a whole filter over FILTER_TABLE_COLUMNS
    ("x" where the table writes x): operators between two comparisons, literals and types tested with IS NULL,
    [NOT] both ways."""
    section = QUERIES_PAGE.read_text().split("\n## Filters\n", 1)[1].split("\n#", 1)[0]
    rows = [line.split("|")[1:3] for line in section.splitlines() if line.startswith("| ") and "`" in line]
    assert len(rows) >= 10, "the Filters table of docs/queries.md was not found"
    filters = []
    for label, cell in rows:
        snippets = re.findall(r"`([^`]+)`", cell)
        label = label.strip()
        if label.startswith(("column names", "literals")):
            made = [f"{s} IS NULL" for s in snippets]
        elif label == "comparisons":
            made = [f"x {s} 'a'" for s in snippets]
        elif label.startswith("logic"):
            made = [{"NOT": "NOT x = 'a'", "( )": "(x = 'a')"}.get(s, f"x = 'a' {s} x = 'b'") for s in snippets]
        elif label == "arithmetic":
            made = [f"price {op} 2 > 1" for s in snippets if s != "unary -" for op in s.split()] + ["-price < 0"]
        elif label.startswith(("lists", "patterns", "null")):
            made = [{"ILIKE": "x ILIKE '%ring%'", "ESCAPE '!'": "x LIKE '%!%%' ESCAPE '!'"}.get(s, s) for s in snippets]
            made = [m.replace("x IS [NOT] TRUE / FALSE", f"x::BOOLEAN IS [NOT] {v}") for m in made for v in ("TRUE", "FALSE")]
        elif label == "casts":
            types = cell.split("with type", 1)[1].replace("DECIMAL(p, s)", "DECIMAL(10, 2)").strip(" |")
            types = re.split(r",\s*(?![^()]*\))", types)  # not the comma of DECIMAL(10, 2)
            made = [form.format(t=t.strip()) for t in types
                    for form in ("CAST(x AS {t}) IS NULL", "TRY_CAST(x AS {t}) IS NULL", "x::{t} IS NULL")]
            assert {"CAST(x AS type)", "TRY_CAST", "x::type"} <= set(snippets)
        elif label == "functions":
            dates = cell.split("date parts", 1)[1]
            made = [(re.sub(r"\bx\b", "ts", s) if "(" in s else f"{s}(ts)" if s in dates else f"{s}(title)"
                     if s in ("lower", "upper", "length", "trim") else "coalesce(price, 0)" if s == "coalesce" else f"{s}(price)")
                    + " IS NULL" for s in snippets]
        else:
            raise AssertionError(f"the Filters table of docs/queries.md has a row {label!r} this test has no template for")
        filters += [m.replace("[NOT] ", n) for m in made for n in ("", "NOT ")]
    return list(dict.fromkeys(filters))


def test_every_example_of_the_docs_filters_table_compiles_and_runs():
    import duckdb

    examples = docs_filter_examples()
    assert "ts > TIMESTAMP '2024-01-31 10:00'" not in examples  # (the table's literal is tested with IS NULL)
    assert "TIMESTAMP '2024-01-31 10:00' IS NULL" in examples and "CAST(x AS TIMESTAMP) IS NULL" in examples
    con = duckdb.connect()  # no rows: DuckDB binds every name, type and function of the printed SQL, converts no value
    con.execute('CREATE TABLE catalog (x VARCHAR, title VARCHAR, price DOUBLE, "width cm" DOUBLE, ts TIMESTAMP, a VARCHAR, '
                'b VARCHAR)')
    refused = []
    for where in examples:
        try:
            con.execute(f"SELECT count(*) FROM catalog WHERE {compile_filter(where, FILTER_TABLE_COLUMNS)}").fetchall()
        except (mr.QueryError, duckdb.Error) as exc:
            refused.append(f"{where}: {str(exc)[:100]}")
    assert not refused, '\n'.join(refused)
    con.execute("INSERT INTO catalog VALUES ('a', 'Ring', 12.5, 3, TIMESTAMP '2024-01-31 10:00', 'a', 'b')")
    for where, count in (("ts > TIMESTAMP '2024-01-31 09:00'", 1), ("ts = CAST('2024-01-31 10:00' AS TIMESTAMP)", 1),
                         ("ts < TRY_CAST(x AS TIMESTAMP)", 0), ("ts > DATETIME '2024-02-01'", 0)):
        sql = compile_filter(where, FILTER_TABLE_COLUMNS)
        assert con.execute(f"SELECT count(*) FROM catalog WHERE {sql}").fetchone() == (count,)


def store_of(frame: pd.DataFrame) -> ItemStore:
    """An item store of these rows, without any model."""
    rows = len(frame)
    features = {name: np.zeros((rows, 1, 1) if "tokens" in name else (rows, 1), np.float32 if "tokens" in name else bool)
                for name in FEATURES}
    store = ItemStore()
    store.append(frame, [None] * rows, features)
    return store


def test_structured_filters_bounds_come_from_the_config_and_name_the_column_the_count_and_the_setting(indexed):
    config = RetrieverConfig().with_overrides({"search": {"max_filter_values": 3, "max_filter_columns": 2}})
    kitchen = {"category": ["Kitchen", "Bathroom", "Lights"]}
    assert make_query(SearchOptions(text="a sink", filters=kitchen), config).filters == kitchen
    with pytest.raises(mr.LimitError, match=r"filters\['category'\] lists 4 values; a filter may list at most 3 values per "
                                            r"column \(search.max_filter_values\)"):
        make_query(SearchOptions(text="a sink", filters={"category": [*kitchen["category"], "Bedroom"]}), config)
    with pytest.raises(mr.LimitError, match=r"filters name 3 columns; a query may filter at most 2 \(search.max_filter_columns\)"):
        make_query(SearchOptions(text="a sink", filters={"category": "Kitchen", "price": {"min": 1}, "id": 575}), config)
    over = {"category": [f"c{i}" for i in range(5001)]}  # the defaults, through the API: searches, batches and facets
    for ask in (lambda: indexed.search(text="a sink", filters=over), lambda: indexed.search_batch([{"text": "a sink", "filters": over}]),
                lambda: indexed.facets(["price"], filters=over)):
        with pytest.raises(mr.LimitError, match=r"lists 5,001 values; a filter may list at most 5,000 values per column"):
            ask()
    with pytest.raises(mr.LimitError, match=r"search.max_where_chars"):  # facets bound their where as searches do
        indexed.facets(["price"], where="price > 1 OR " * 170 + "TRUE")


def test_a_long_list_of_filter_values_is_passed_to_duckdb_never_parsed(indexed, monkeypatch):
    import sqlglot

    def no_parse(*args, **kwargs):
        raise AssertionError("a structured filter went through the where grammar's parser")

    values = ["Kitchen", "x' OR TRUE --", *(f"category {i}" for i in range(4998))]  # at the bound, and one value that is SQL
    monkeypatch.setattr(sqlglot, "parse", no_parse)
    found = indexed.search(text="a fridge", k=20, filters={"category": values, "price": {"max": 10_000}})
    assert sorted(found["id"]) == [575, 773]
    counts = indexed.facets(["price"], filters={"category": values})["price"]["histogram"]["counts"]
    assert sum(counts) == 2
    with pytest.raises(mr.QueryError, match="the where grammar's parser"):  # a where is still parsed (and checked)
        indexed.search(text="a fridge", where="price > 1")


def test_structured_filters_compare_as_the_literals_they_replaced():
    days = pd.date_range("2024-01-01", periods=10, freq="D")
    store = store_of(pd.DataFrame({"id": np.arange(10), "category": [f"c{i % 3}" for i in range(10)], "n": np.arange(10),
                                   "price": np.arange(10) * 1.5, "day": days, "flag": [i % 2 == 0 for i in range(10)],
                                   "note": ["it's", *[None] * 9]}))

    def ids(**filters):
        keys = store.filter(None, 5.0, filters=filters)
        return sorted(store.table["id"].iloc[store.rows_of(keys)].tolist())

    assert ids(day=["2024-01-03", "2024-01-05 00:00"]) == [2, 4]  # texts against dates: cast as literals are
    assert ids(day={"min": "2024-01-09"}) == [8, 9] and ids(day="2024-01-02") == [1]
    assert ids(flag=[True], n={"max": 4}) == [0, 2, 4] and ids(flag=["false"], n={"max": 4}) == [1, 3]
    assert ids(n=["3", 4.0, 4.5]) == [3, 4] and ids(n=2.5) == [] and ids(price=[1.5, "3"]) == [1, 2]
    assert ids(category=["c1", "c2"], n={"min": 5, "max": 8}) == [5, 7, 8] and ids(note="it's") == [0]
    assert store.filter(None, 5.0, filters={"category": []}) is None  # an empty list is no condition: every item
    with pytest.raises(mr.QueryError, match=r"filters\['n'\]: 'many' is text, but 'n' holds numbers"):
        ids(n=["many"])
    with pytest.raises(mr.QueryError, match=r"filters: invalid filter .*\"day\": \[\"soon\"\]"):  # DuckDB's own refusal, named
        ids(day=["soon"])
