"""The search options, declared once: :class:`SearchOptions`.

Each field carries its type, its default, its bound (a ``config.search`` setting) or choices, and a
one-line help. From this declaration come ``Retriever.search``'s keywords (an unknown one is refused
with a did-you-mean: ``SearchOptions.of``), the command line's ``search`` flags (cli.py), the service's
request model (server/schemas.py) and the Markdown table of options (``options_table``), so that none
of them can drift from the others. Light: the command line builds its parser from it without numpy.
"""

from __future__ import annotations

import dataclasses
import string
import types
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from ..config import SearchConfig
from ..errors import QueryError, did_you_mean

MODES = ("auto", "image", "text", "fused", "zero-shot")
HYBRID_METHODS = ("rrf", "weighted", "off")  # how a text query's keyword (BM25) and vector rankings combine
Mode = Literal[MODES]
Hybrid = Literal[HYBRID_METHODS]
Floor = Literal["auto", "off"]  # a score floor by name: the calibrated one (relevance.py), or none
Range = dict[Literal["min", "max"], float | None]  # a filter's range of numbers
Filters = dict[str, list[str | float | bool] | Range | str | float | bool]  # column -> values, one value or a range
# A query text, once stripped, is not empty: a character Python's str.strip keeps (JSON Schema's \s is another set).
NOT_BLANK = "[^\\t\\n\\r\\u000b\\u000c\\u001c-\\u001f \\u0085\\u00a0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000]"
BLANK = "[" + NOT_BLANK[2:]  # the characters str.split splits at
# A sort key as checks._sort_key reads it: nothing, one word ("price", "-price"), or a word then asc or desc.
SORT_KEY = f"^({BLANK}*{NOT_BLANK}+({BLANK}+([Aa][Ss][Cc]|[Dd][Ee][Ss][Cc]))?{BLANK}*)?$"
FLOAT32_MAX = 3.4028234663852886e38
FLOAT32 = {"type": "number", "minimum": -FLOAT32_MAX, "maximum": FLOAT32_MAX}  # a query vector's values are float32


@dataclass(frozen=True)
class Bound:
    """A bound a schema states: a ``config.search`` setting (``SearchConfig``) or ``vector_dim`` (the joint
    space's width), read from the index served; ``default`` where it is not known (None: no such keyword)."""

    name: str
    default: Any = None


@dataclass(frozen=True)
class Option:
    """What the declaration says of one search option besides its type and default.

    ``help``: one line; ``{max_k:,}`` and the like are ``config.search`` values (``SearchConfig``), so each bound
    is stated as such. ``schema``: JSON Schema keywords the service states (``Bound`` values: the index's own).
    ``unserved``: why the service takes it otherwise (empty: it is a request field). ``status``: what the service
    answers when it is refused, appended to its description. ``reader``: how the command line reads it ("" from its type,
    "pairs": ``image=0.7,text=0.3``, "numbers": ``0.1,0.2,0.6,0.9``)."""

    help: str
    choices: tuple[str, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None
    schema: dict[str, Any] = field(default_factory=dict)
    examples: tuple[Any, ...] = ()
    unserved: str = ""
    status: str = ""
    reader: str = ""
    metavar: str | None = None
    service_default: Any = ...  # the request field's default where it differs from Python's (... : the same)

    @property
    def served(self) -> bool:
        return not self.unserved

    def text(self, bounds: SearchConfig | None = None, status: bool = False) -> str:
        """The help with the bounds' values (the defaults' when ``bounds`` is None); ``status``: the service's too."""
        values = dataclasses.asdict(bounds or SearchConfig())
        return (self.help + (self.status if status else "")).format(**values)

    @property
    def bounds(self) -> tuple[str, ...]:
        """The ``config.search`` settings that bound it, as its help and schema name them."""
        named = [f for _, f, _, _ in string.Formatter().parse(self.help + self.status) if f]
        named += [v.name for v in self.schema.values() if isinstance(v, Bound)]
        return tuple(n for n in dict.fromkeys(named) if n in {f.name for f in dataclasses.fields(SearchConfig)})


def option(default: Any, help: str, **meta: Any) -> Any:  # help: as argparse calls it
    """A field of SearchOptions: its default and what the declaration says of it (``Option``)."""
    return field(default=default, metadata={"option": Option(help, **meta)})


@dataclass(frozen=True)
class SearchOptions:
    """A search as ``Retriever.search`` takes it: the query's inputs and every option, each with its help."""

    image: Any = option(None, "query photo: a path or URL (Python: also bytes or a PIL image)",
                        unserved="the service takes a photo as an uploaded `image` part or an `image_url` to fetch", metavar="PATH")
    text: str | None = option(None, "query text: at most {max_text_chars:,} characters (search.max_text_chars) and "
                                    "{max_text_tokens:,} word pieces (search.max_text_tokens)",
                              schema={"maxLength": Bound("max_text_chars"), "pattern": NOT_BLANK},
                              examples=("a washing machine",), status="; over either: 422")
    mode: Mode = option("auto", "auto (image+text -> fused, image -> image, text -> item texts, and the images of items "
                                "without text through the zero-shot space), image, text, fused, or zero-shot (a text against "
                                "item images, an image against item texts)", choices=MODES)
    k: int = option(10, "number of results, 1 to {max_k:,} (search.max_k)", minimum=1, schema={"maximum": Bound("max_k")})
    where: str | None = option(None, "filter: one condition over catalog columns (columns, literals, comparisons, "
                                     "AND/OR/NOT, arithmetic, IN lists, BETWEEN, LIKE/ILIKE, IS NULL, CAST and a few scalar "
                                     "functions; docs/queries.md, \"Filters\"). At most {max_where_chars:,} characters "
                                     "(search.max_where_chars)",
                               schema={"maxLength": Bound("max_where_chars"), "pattern": NOT_BLANK},
                               examples=("price < 500 AND category = 'Kitchen'",),
                               status="; outside the grammar: 400; still running after {filter_timeout_s:g} s "
                                      "(search.filter_timeout_s): 422")
    hybrid: Hybrid | None = option(None, "text queries: how BM25 keywords and vectors combine: reciprocal-rank fusion "
                                         "(default), a weighted sum, or not", choices=HYBRID_METHODS)
    keyword_weight: float | None = option(None, "text queries: the keywords' share, 0 to 1 (default {keyword_weight:g}: search.keyword_weight)", minimum=0, maximum=1)
    offset: int = option(0, "results to skip (paging: k=24, offset=24 is page 2); k + offset at most {max_k:,} (search.max_k)",
                         minimum=0)
    filters: Filters | None = option(None, "column -> values (any of them), one value, or a range {{min, max}}; ANDed with "
                                           "`where` (no SQL needed). At most {max_filter_columns:,} columns "
                                           "(search.max_filter_columns) and {max_filter_values:,} values per list "
                                           "(search.max_filter_values)",
                                     examples=({"category": ["Kitchen"], "price": {"min": 10, "max": 500}},),
                                     status="; over either: 422", metavar="JSON")
    sort_by: str | None = option(None, "a column: 'price', '-price' or 'price desc' (descending) reorders the "
                                       "{sort_candidates} most relevant items (search.sort_candidates), or offset + k if more",
                                 schema={"pattern": SORT_KEY})
    min_score: float | Floor | None = option(
        None, "leave out results scoring lower. One scale for image, text and fused queries: the weighted mean of the cosines of "
              "the parts the query has (an item's own photo as a photo query scores 1); zero-shot scores are the zero-shot "
              "space's cosines (docs/queries.md, \"Scores\"). \"auto\": the calibrated \"no close match\" floor of the "
              "query's kind (docs/queries.md, \"No close match\"); \"off\" or none: every result",
        service_default="auto", metavar="SCORE|auto|off")
    weights: dict[str, float] | None = option(
        None, "fused queries (a photo and words, or `like` an item): the image and text weights, non-negative and not both "
              "0; the score becomes (image * cos_image + text * cos_text) / (image + text)",
        schema={"propertyNames": {"enum": ["image", "text"]}, "additionalProperties": {"type": "number", "minimum": 0},
                "allOf": [{"anyOf": [{"required": [name], "properties": {name: {"exclusiveMinimum": 0}}}  # not both 0
                                     for name in ("image", "text")]}]},
        examples=({"image": 0.7, "text": 0.3},), status=". Another key, a negative weight, both 0, or a query that is not "
                                                         "fused: 400", reader="pairs", metavar="image=A,text=B")
    not_text: str | None = option(None, "a concept to subtract: the score loses {not_text_weight:g} (search.not_text_weight) "
                                        "times this text's own score as a text query",
                                  schema={"maxLength": Bound("max_text_chars"), "pattern": NOT_BLANK}, examples=("metal legs",),
                                  status=". Bounded as `text`; empty: 400; with `vector`: 400", metavar="TEXT")
    like: str | int | None = option(None, "an item id: items like it, from its stored vectors (mode image or text: by that "
                                          "part alone; with `text`: its photo plus these words)", metavar="ITEM_ID")
    vector: list[float] | None = option(None, "a query vector in the joint space (as Retriever.encode gives)",
                                        schema={"items": FLOAT32, "minItems": Bound("vector_dim", 1),
                                                "maxItems": Bound("vector_dim")}, metavar="JSON")
    crop: list[float] | None = option(None, "search by a part of the query photo: [x0, y0, x1, y1], fractions of its width "
                                            "and height when all are from 0 to 1, else pixels (its most salient box: "
                                            "Retriever.salient_box, POST /salient)",
                                      schema={"minItems": 4, "maxItems": 4, "items": {"minimum": 0}},
                                      examples=([0.1, 0.2, 0.6, 0.9],), status=". An empty, inverted or outside box, or a crop "
                                                                              "without a photo: 400",
                                      reader="numbers", metavar="x0,y0,x1,y1")
    unsafe_where: bool = option(False, "accept any single DuckDB expression as `where` (trusted callers only)",
                                unserved="any SQL is for trusted callers: the service takes the filter grammar only")

    @classmethod
    def of(cls, **arguments: Any) -> SearchOptions:
        """The options of a search call; a name that is none of them is refused naming the nearest."""
        names = option_names()
        unknown = [name for name in arguments if name not in names]
        if unknown:
            hint = did_you_mean(unknown[0], names)
            shown = repr(unknown[0]) if len(unknown) == 1 else str(sorted(map(str, unknown)))
            raise QueryError(f"unknown search option{'s' * (len(unknown) > 1)} {shown}{hint}; known: {list(names)}")
        return cls(**arguments)


@dataclass(frozen=True)
class Declared:
    """One field of SearchOptions: its name, resolved type, default and what the declaration says of it."""

    name: str
    type: Any
    default: Any
    option: Option

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def structured(self) -> bool:
        """A dict or list: JSON on the command line and in a form's field."""
        return any(get_origin(t) in (dict, list) for t in (self.type, *get_args(self.type)))

    @property
    def reader(self) -> str:
        """How the command line reads it: "flag", "int", "float", "number_or_word", "json", "pairs",
        "numbers" or "text"."""
        if self.option.reader:
            return self.option.reader
        if self.type is bool:
            return "flag"
        if self.structured:
            return "json"
        kinds = set(get_args(self.type)) - {type(None)} if is_union(self.type) else {self.type}
        if float in kinds and any(get_origin(k) is Literal for k in kinds):
            return "number_or_word"
        return "int" if kinds == {int} else "float" if kinds == {float} else "text"


@lru_cache(maxsize=1)
def declared() -> tuple[Declared, ...]:
    """Every field of SearchOptions, in declaration order."""
    hints = get_type_hints(SearchOptions)
    return tuple(Declared(f.name, hints[f.name], f.default, f.metadata["option"]) for f in dataclasses.fields(SearchOptions))


def option_names() -> tuple[str, ...]:
    return tuple(d.name for d in declared())


def is_union(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType)


def type_name(tp: Any) -> str:
    """A type as the table shows it."""
    if tp is Any:
        return "any"
    if get_origin(tp) is Literal:
        return "str"
    if is_union(tp):
        return " or ".join(type_name(t) for t in get_args(tp))
    if tp is type(None):
        return "None"
    return getattr(get_origin(tp), "__name__", None) or getattr(tp, "__name__", str(tp))


def options_table(bounds: SearchConfig | None = None) -> str:
    """The options as a Markdown table (option, type, default, bound or choices, what), bounds at their values."""
    rows = ["| option | type | default | bound / choices | what |", "|---|---|---|---|---|"]
    for d in declared():
        limits = ", ".join(f"`search.{b}`" for b in d.option.bounds)
        if d.option.choices:
            limits = ", ".join(f"`{c}`" for c in d.option.choices)
        what = d.option.text(bounds).replace("|", "\\|") + ("" if d.option.served else f" (not in the service: {d.option.unserved})")
        default = f"`{d.default!r}`" + ("" if d.option.service_default is ... else f" (service: `{d.option.service_default!r}`)")
        rows.append(f"| `{d.name}` | {type_name(d.type)} | {default} | {limits} | {what} |")
    return "\n".join(rows) + "\n"
