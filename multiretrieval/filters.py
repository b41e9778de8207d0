"""The ``where`` filter's grammar: one boolean expression over catalog columns, nothing else.

A filter is parsed by sqlglot (DuckDB dialect) and every node of the tree is checked against
an allow-list: columns of the catalog, literals, comparisons, AND/OR/NOT, arithmetic, IN
lists, BETWEEN, LIKE/ILIKE, IS [NOT] NULL, CAST to plain types and a short list of scalar
functions. The SQL that DuckDB runs is printed here from the checked tree, fully
parenthesised, so it holds exactly the constructs that were checked (sqlglot's own printer
may rewrite a call into others). Subqueries, table functions, settings, system functions,
placeholders and everything else are refused with a QueryError of one short line: the problem
(an unknown column with the nearest names: "did you mean 'category'?"), the catalog's columns and
where the grammar is written; the whole grammar is the error's ``details`` (``--verbose`` prints it).

    compile_filter("price < 200 AND lower(title) LIKE '%ring%'", {"price": "number", "title": "text"})
    -> '(("price" < 200) AND (lower("title") LIKE \\'%ring%\\'))'

``unsafe=True`` (trusted Python callers only) accepts any single DuckDB expression: it must
still parse as one expression (no second statement, no UNION), and it still runs under the
time limit with DuckDB's external access off.

Structured filters (column -> values, one value, or a range) never become SQL text: ``compile_filters``
writes the quoted column names and one ``?`` per list, value or bound, and the values travel as
DuckDB parameters, so a list of thousands costs a list conversion, not a parse, and no value can
change the query.

    compile_filters({"category": ["Rings", "Earrings"], "price": {"max": 200}}, {"category": "text", "price": "number"})
    -> ('"category" IN (SELECT unnest(?)) AND "price" <= ?', [['Rings', 'Earrings'], 200])
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

from .errors import QueryError, did_you_mean

MAX_DEPTH = 24  # parentheses (calls included) nested in a filter; sqlglot's parser recurses ~25 frames per level

FUNCTIONS = ("lower", "upper", "length", "trim", "abs", "round", "floor", "ceil", "coalesce", "year", "quarter", "month",
             "week", "day", "dayofweek", "dayofyear", "hour", "minute", "second", "date_part", "extract")
CAST_TYPES = ("BOOLEAN", "TINYINT", "SMALLINT", "INTEGER", "BIGINT", "FLOAT", "DOUBLE", "DECIMAL", "VARCHAR", "DATE",
              "TIME", "TIMESTAMP")
DATE_PARTS = ("year", "quarter", "month", "week", "day", "dayofweek", "dayofyear", "hour", "minute", "second")

GRAMMAR = ("A filter is one condition over the catalog's columns, made of: column names (in \"double quotes\" if they "
           "hold spaces or signs), numbers, 'text', TRUE, FALSE, NULL, DATE '2024-01-31'; comparisons = != <> < <= > >= "
           "and IS [NOT] DISTINCT FROM; AND, OR, NOT, parentheses; arithmetic + - * / // %; x [NOT] IN (a list of values); "
           "x [NOT] BETWEEN a AND b; x [NOT] LIKE / ILIKE 'pattern' [ESCAPE 'c']; x IS [NOT] NULL / TRUE / FALSE; "
           f"CAST(x AS type) and TRY_CAST with a type among {', '.join(CAST_TYPES)}; the functions {', '.join(FUNCTIONS)} "
           f"(date parts: {', '.join(DATE_PARTS)}). Not allowed: subqueries, table functions, other functions, settings, "
           f"placeholders, a second statement")

GRAMMAR_DOCS = "docs/queries.md#filters"
SUBQUERY = "a subquery (SELECT, UNION, EXISTS)"
_NUMBER = re.compile(r"(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_PLAIN_TYPE = re.compile(r"[A-Z][A-Z0-9_ ]*(\(\d+,\s*\d+\))?")  # a column's DuckDB type a list of texts may be cast to


def compile_filter(where: str, columns: Mapping[str, str], unsafe: bool = False) -> str:
    """The DuckDB SQL of a filter that passed the allow-list. ``columns``: name -> kind (shown in errors).

    Raises QueryError naming the problem, what is allowed and the columns."""
    tree = _parse(where, columns)
    if unsafe:
        return _unsafe_sql(where, tree, columns)
    try:
        return _Printer(where, columns).sql(tree, 0)
    except QueryError:
        raise
    except Exception as exc:  # noqa: BLE001 - a tree of a shape this printer does not expect is refused, not a crash
        raise refusal(where, f"an expression this grammar cannot read ({type(exc).__name__})", columns) from None


def compile_filters(filters: Mapping[Any, Any], columns: Mapping[str, str] | None = None,
                    type_of: Callable[[str], str | None] | None = None, leave_out: str | None = None) -> tuple[str | None, list]:
    """The DuckDB SQL of structured filters (None if they hold no condition) and its parameters, in order.

    Each column's filter is a list of values (any of them), one value, or a range {"min": a, "max": b}
    (either may be missing); an empty list is no condition; the column ``leave_out`` is skipped (a facet's
    own counts ignore its own filter). ``columns`` (name -> kind): a filter on another column is refused,
    and a value of the wrong kind for its column (text for numbers, a number for text) is refused here rather
    than by DuckDB's conversion error over SQL the caller never wrote. ``type_of(column)``: the column's DuckDB
    type, asked once every filter is checked, to compare a list's texts with a column of dates or flags as
    DuckDB compares a quoted literal (cast to the column's type). Raises QueryError naming the column."""
    if not isinstance(filters, Mapping):
        raise QueryError(f"filters must map columns to values or ranges, got {type(filters).__name__}")
    unknown = [c for c in filters if columns is not None and c not in columns]
    if unknown:
        near = did_you_mean(str(unknown[0]), [c for c in columns or {} if not c.startswith("_")])
        raise QueryError(f"filters: no column {_short(unknown[0])} in this index"
                         f"{near + ' Columns: ' if near else '; columns: '}{describe_columns(columns or {})}")
    checked: dict[Any, list[tuple[str, Any]]] = {}  # column -> (operator, parameter): all checked before any SQL
    for column, wanted in filters.items():
        if column == leave_out:
            continue
        kind = (columns or {}).get(column)
        if isinstance(wanted, Mapping):
            extra = set(wanted) - {"min", "max"}
            if extra:
                raise QueryError(f"filters[{_short(column)}]: a range has 'min' and/or 'max', not {sorted(map(str, extra))}")
            tests = [(op, filter_value(wanted[key], column, kind)) for key, op in (("min", ">="), ("max", "<="))
                     if wanted.get(key) is not None]
        elif isinstance(wanted, (list, tuple)):
            values = [filter_value(v, column, kind) for v in wanted]
            tests = [(op, part) for op, part in (("IN", [v for v in values if not isinstance(v, str)]),
                                                 ("IN texts", [v for v in values if isinstance(v, str)])) if part]
        elif isinstance(wanted, (str, bool, int, float)) or _is_numpy_scalar(wanted):  # {"color": "red"}: one value
            tests = [("=", filter_value(wanted, column, kind))]
        else:
            raise QueryError(f"filters[{_short(column)}]: a value, a list of values or a range {{'min': .., 'max': ..}}, "
                             f"got {_short(wanted)}")
        if tests:
            checked[column] = tests
    clauses, params = [], []
    for column, tests in checked.items():
        name, parts = _quote(str(column)), []
        for op, value in tests:
            if op == "IN texts":  # compared as quoted literals are: cast to the column's type (a date, a flag)
                cast = type_of(str(column)) if type_of else None
                source = f"CAST(? AS {cast}[])" if cast and cast != "VARCHAR" and _PLAIN_TYPE.fullmatch(cast) else "?"
                parts.append(f"{name} IN (SELECT unnest({source}))")
            else:
                parts.append(f"{name} IN (SELECT unnest(?))" if op == "IN" else f"{name} {op} ?")
            params.append(value)
        joined = (" OR " if tests[0][0].startswith("IN") else " AND ").join(parts)  # a list's numbers or texts; a range's ends
        clauses.append(joined if len(parts) == 1 else f"({joined})")
    return (" AND ".join(clauses) or None), params


def filter_value(value: Any, column: Any, kind: str | None = None) -> Any:
    """One value of a structured filter as a DuckDB parameter (a Python bool, int, float or str). ``kind``: the
    column's ("10" from a form is 10 for a number column; "cheap" is refused there, as 3 is for a text one)."""
    if _is_numpy_scalar(value):
        value = value.item()
    if isinstance(value, bool):
        return value
    if kind in ("integer", "number") and isinstance(value, str):
        try:
            value = int(value) if value.strip().lstrip("+-").isdigit() else float(value)
        except ValueError:
            raise QueryError(f"filters[{_short(column)}]: {_short(value)} is text, but {_short(column)} holds numbers") from None
    number = isinstance(value, (int, float))
    if kind == "text" and number:
        raise QueryError(f"filters[{_short(column)}]: {value!r} is a number, but {_short(column)} holds text: give it as {str(value)!r}")
    if (number and (isinstance(value, int) or math.isfinite(value))) or isinstance(value, str):
        return value
    raise QueryError(f"filters[{_short(column)}]: {_short(value)} is not a number, text or boolean")


def _is_numpy_scalar(value: Any) -> bool:
    return type(value).__module__ == "numpy" and hasattr(value, "item") and getattr(value, "ndim", None) == 0


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def describe_columns(columns: Mapping[str, str]) -> str:
    return ", ".join(f"{_quote_if_needed(name)} ({kind})" for name, kind in columns.items())


def refusal(where: str, problem: str, columns: Mapping[str, str], hint: str = "") -> QueryError:
    """The one-line error of a refused filter: the problem (``hint``: "; did you mean ...?" after it), the columns,
    where the grammar is written (``details``: the grammar)."""
    shown = where if len(where) <= 200 else where[:200] + "..."
    return QueryError(f"where: {problem} in {shown!r}{hint or '.'} Columns: {describe_columns(columns)}. "
                      f"What a filter may hold: {GRAMMAR_DOCS} (--verbose prints it).", details=GRAMMAR + ".")


class _NoCommandWarnings(logging.Filter):
    """sqlglot logs a warning when it reads a text as a bare command: a client's filter must not write the log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Falling back to parsing as a 'Command'" not in record.getMessage()


def _parse(where: str, columns: Mapping[str, str]):
    import sqlglot

    quiet = logging.getLogger("sqlglot")
    if not any(isinstance(f, _NoCommandWarnings) for f in quiet.filters):
        quiet.addFilter(_NoCommandWarnings())

    if not isinstance(where, str) or not where.strip():
        raise QueryError(f"where: the filter is empty. Columns: {describe_columns(columns)}. What a filter may hold: "
                         f"{GRAMMAR_DOCS} (--verbose prints it).", details=GRAMMAR + ".")
    if _paren_depth(where) > MAX_DEPTH:
        raise refusal(where, f"parentheses or calls nested more than {MAX_DEPTH} deep", columns)
    try:
        trees = [t for t in sqlglot.parse(where, read="duckdb") if t is not None]
    except RecursionError:
        raise refusal(where, "operators nested too deeply", columns) from None
    except Exception as exc:  # noqa: BLE001 - sqlglot raises ParseError, TokenError and others on malformed text
        raise refusal(where, f"syntax error ({str(exc).splitlines()[0][:200]})", columns) from None
    if len(trees) != 1:
        raise refusal(where, "more than one statement" if trees else "no expression", columns)
    return trees[0]


def _paren_depth(text: str) -> int:
    """The deepest nesting of parentheses outside quoted text."""
    depth = deepest = 0
    quote = None
    for c in text:
        if quote:
            quote = None if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif c == ")":
            depth -= 1
    return deepest


def _unsafe_sql(where: str, tree, columns: Mapping[str, str]) -> str:
    from sqlglot import exp

    if not isinstance(tree, exp.Condition) or isinstance(tree, exp.Query):
        raise refusal(where, f"a {type(tree).__name__.upper()} statement where one expression is expected", columns)
    try:
        return f"({tree.sql(dialect='duckdb', comments=False)})"
    except Exception as exc:  # noqa: BLE001 - RecursionError, unsupported nodes
        raise refusal(where, f"an expression that cannot be printed back ({type(exc).__name__})", columns) from None


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _quote_if_needed(name: str) -> str:
    return name if re.fullmatch(r"[a-z_][a-z0-9_]*", name) else _quote(name)


def _string(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


class _Printer:
    """Checks each node against the allow-list and prints it as DuckDB SQL, fully parenthesised."""

    def __init__(self, where: str, columns: Mapping[str, str]) -> None:
        from sqlglot import exp

        self.exp, self.where, self.columns = exp, where, columns
        self.by_lower = {name.lower(): name for name in columns if not name.startswith("_")}
        self.binary = {exp.EQ: "=", exp.NEQ: "<>", exp.GT: ">", exp.GTE: ">=", exp.LT: "<", exp.LTE: "<=",
                       exp.NullSafeEQ: "IS NOT DISTINCT FROM", exp.NullSafeNEQ: "IS DISTINCT FROM",
                       exp.Add: "+", exp.Sub: "-", exp.Mul: "*", exp.Div: "/", exp.IntDiv: "//", exp.Mod: "%"}
        self.unary_functions = {exp.Lower: "lower", exp.Upper: "upper", exp.Abs: "abs", exp.Year: "year",
                                exp.Quarter: "quarter", exp.Month: "month", exp.Week: "week", exp.Day: "day",
                                exp.DayOfMonth: "day", exp.DayOfWeek: "dayofweek", exp.DayOfYear: "dayofyear",
                                exp.Hour: "hour", exp.Minute: "minute", exp.Second: "second", exp.Length: "length",
                                exp.Trim: "trim", exp.Floor: "floor", exp.Ceil: "ceil"}

    def refuse(self, problem: str, hint: str = "") -> QueryError:
        return refusal(self.where, problem, self.columns, hint)

    def sql(self, node, depth: int) -> str:
        if depth > 4 * MAX_DEPTH:  # operators without parentheses (NOT NOT ..., - - ...)
            raise self.refuse("operators nested too deeply")
        if node is None:
            raise self.refuse("an operator or function without its operand")
        exp, kind = self.exp, type(node)
        if kind in (exp.And, exp.Or):  # chains are flattened, so a long OR list is not deep
            word = " AND " if kind is exp.And else " OR "
            return "(" + word.join(self.sql(part, depth + 1) for part in node.flatten()) + ")"
        if kind in self.binary:
            self.only(node, "this", "expression")
            return f"({self.sql(node.this, depth + 1)} {self.binary[kind]} {self.sql(node.expression, depth + 1)})"
        if kind in (exp.Not, exp.Neg, exp.Paren):
            self.only(node, "this")
            inner = self.sql(node.this, depth + 1)
            return inner if kind is exp.Paren else f"({'NOT' if kind is exp.Not else '-'} {inner})"
        if kind is exp.Column:
            return self.column(node)
        if kind in (exp.Literal, exp.Boolean, exp.Null):
            return self.literal(node)
        if kind in (exp.Is, exp.In, exp.Between, exp.Like, exp.ILike, exp.Escape):
            return self.predicate(node, depth)
        if kind in (exp.Cast, exp.TryCast):
            return self.cast(node, depth)
        return self.function(node, depth)

    def only(self, node, *allowed: str) -> None:
        """Refuse a node carrying an argument this grammar does not print (so nothing is silently dropped)."""
        extra = [k for k, v in node.args.items() if k not in allowed and v not in (None, False, [])]
        if extra:
            raise self.refuse(f"{self.construct(node)} (its {', '.join(extra)})")

    def construct(self, node) -> str:
        text = node.sql(dialect="duckdb")
        return f"the construct {text if len(text) <= 60 else type(node).__name__.upper()}"

    def column(self, node) -> str:
        if node.args.get("table") is not None:
            raise self.refuse(f"{node.sql(dialect='duckdb')!r}: name a column alone, without a table")
        self.only(node, "this")
        if not isinstance(node.this, self.exp.Identifier):
            raise self.refuse(f"{node.sql(dialect='duckdb')!r}, which is not a column name")
        name = self.by_lower.get(node.this.name.lower())
        if name is None:
            raise self.refuse(f"unknown column {node.this.name!r}", did_you_mean(node.this.name, self.by_lower.values()))
        return _quote(name)

    def literal(self, node) -> str:
        exp = self.exp
        if isinstance(node, exp.Null):
            return "NULL"
        if isinstance(node, exp.Boolean):
            return "TRUE" if node.this else "FALSE"
        self.only(node, "this", "is_string")
        if node.is_string:
            return _string(node.this)
        if not _NUMBER.fullmatch(str(node.this)):
            raise self.refuse(f"the number {node.this!r}")
        return str(node.this)

    def predicate(self, node, depth: int) -> str:
        exp, d = self.exp, depth + 1
        if isinstance(node, exp.Is):
            self.only(node, "this", "expression", "negate")
            if not isinstance(node.expression, (exp.Null, exp.Boolean)):
                raise self.refuse("IS followed by something other than NULL, TRUE or FALSE")
            return f"({self.sql(node.this, d)} IS {'NOT ' if node.args.get('negate') else ''}{self.literal(node.expression)})"
        if isinstance(node, exp.In):
            if node.args.get("query") is not None:
                raise self.refuse(SUBQUERY)
            self.only(node, "this", "expressions")
            if not node.expressions:
                raise self.refuse("IN without a list of values (IN takes a list: x IN (1, 2, 3))")
            return f"({self.sql(node.this, d)} IN ({', '.join(self.sql(v, d) for v in node.expressions)}))"
        if isinstance(node, exp.Between):
            self.only(node, "this", "low", "high")
            return f"({self.sql(node.this, d)} BETWEEN {self.sql(node.args['low'], d)} AND {self.sql(node.args['high'], d)})"
        escape = None
        if isinstance(node, exp.Escape):
            self.only(node, "this", "expression")
            if not isinstance(node.this, (exp.Like, exp.ILike)):
                raise self.refuse("ESCAPE outside LIKE / ILIKE")
            node, escape = node.this, f" ESCAPE {self.sql(node.expression, d)}"
        self.only(node, "this", "expression", "negate")
        word = ("NOT " if node.args.get("negate") else "") + ("LIKE" if isinstance(node, exp.Like) else "ILIKE")
        return f"({self.sql(node.this, d)} {word} {self.sql(node.expression, d)}{escape or ''})"

    def cast(self, node, depth: int) -> str:
        exp = self.exp
        self.only(node, "this", "to", "safe", "requires_string")  # the last two: how sqlglot marks TRY_CAST
        to = node.to
        type_name = to.this.name if isinstance(to, exp.DataType) else ""
        # sqlglot's names for the allowed types: TIMESTAMP (and DATETIME) parse as TIMESTAMPNTZ, DuckDB's TIMESTAMP
        plain = {"INT": "INTEGER", "TEXT": "VARCHAR", "BIGDECIMAL": "DECIMAL", "TIMESTAMPNTZ": "TIMESTAMP"}.get(type_name, type_name)
        if plain not in CAST_TYPES or any(k not in ("this", "expressions") and v for k, v in to.args.items()):
            raise self.refuse(f"a cast to {to.sql(dialect='duckdb')}")
        params = ""
        if to.expressions:  # DECIMAL(p, s) only
            values = [p.this for p in to.expressions if isinstance(p, exp.DataTypeParam) and isinstance(p.this, exp.Literal)]
            if plain != "DECIMAL" or len(values) != len(to.expressions) or not all(v.this.isdigit() for v in values):
                raise self.refuse(f"a cast to {to.sql(dialect='duckdb')}")
            params = "(" + ", ".join(v.this for v in values) + ")"
        word = "TRY_CAST" if isinstance(node, exp.TryCast) or node.args.get("safe") else "CAST"
        return f"{word}({self.sql(node.this, depth + 1)} AS {plain}{params})"

    def function(self, node, depth: int) -> str:
        exp, d = self.exp, depth + 1
        kind = type(node)
        if kind in self.unary_functions:
            self.only(node, "this")
            return f"{self.unary_functions[kind]}({self.sql(node.this, d)})"
        if kind is exp.Round:
            self.only(node, "this", "decimals")
            digits = node.args.get("decimals")
            return f"round({self.sql(node.this, d)}{'' if digits is None else ', ' + self.sql(digits, d)})"
        if kind is exp.Coalesce:
            self.only(node, "this", "expressions")
            return f"coalesce({', '.join(self.sql(a, d) for a in [node.this, *node.expressions])})"
        if kind is exp.Extract:
            self.only(node, "this", "expression")
            part = node.this.name.lower() if isinstance(node.this, (exp.Var, exp.Identifier, exp.Column)) else ""
            return f"date_part({_string(self.date_part(part))}, {self.sql(node.expression, d)})"
        if kind is exp.Anonymous and node.name.lower() in ("date_part", "datepart"):
            self.only(node, "this", "expressions")
            part = node.expressions[0] if len(node.expressions) == 2 else None
            if not (isinstance(part, exp.Literal) and part.is_string):
                raise self.refuse("date_part without a quoted part and a value (date_part('year', column))")
            return f"date_part({_string(self.date_part(part.this.lower()))}, {self.sql(node.expressions[1], d)})"
        if isinstance(node, (exp.Subquery, exp.Query, exp.Exists)):
            raise self.refuse(SUBQUERY)
        if isinstance(node, exp.Placeholder):
            raise self.refuse("a placeholder")
        if isinstance(node, exp.Func) and not isinstance(node, (exp.Case, exp.If, exp.Any, exp.All)):
            name = node.name if kind is exp.Anonymous else node.sql(dialect="duckdb").split("(")[0]  # as DuckDB calls it
            return self._refuse_function(name.lower() if name.replace("_", "").isalnum() else node.sql_name().lower())
        raise self.refuse(self.construct(node))

    def date_part(self, part: str) -> str:
        if part not in DATE_PARTS:
            raise self.refuse(f"the date part {part!r}")
        return part

    def _refuse_function(self, name: str) -> str:
        raise self.refuse(f"the function {name}() (allowed: {', '.join(FUNCTIONS)})")
