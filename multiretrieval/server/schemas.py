"""The service's request and response models, and their OpenAPI descriptions (bounds, statuses).

The search request is built per index (``search_request_model``), so the schema carries that
index's bounds (``search:`` in its config).
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, Literal, Union, get_args

from fastapi import Path as PathParam
from fastapi import Query
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, create_model

from ..catalog import RESERVED_COLUMNS
from ..config import SearchConfig
from ..errors import did_you_mean
from ..query.options import NOT_BLANK, Bound, Declared, Filters, Range, declared, is_union

ItemId = Annotated[str, PathParam(description="the item's catalog id, URL-encoded (slashes allowed)", examples=["575"],
                                  json_schema_extra={"pattern": NOT_BLANK})]
ItemIdQuery = Annotated[str, Query(description="the item's catalog id (any string, URL-encoded)", examples=["575"],
                                   json_schema_extra={"pattern": NOT_BLANK})]
INTEGER_TEXT = "^(0|-?[1-9][0-9]{0,17})$"  # the text of an integer id (18 digits fit 64 bits; "007" is a code, text)
QUERY_INPUTS = ("text", "like", "vector", "image_url")  # a search needs one of these (a form may upload `image` instead)
# Inputs a search takes one of: a vector alone (nothing to subtract from it); like (an item) with words, not with a photo.
EXCLUSIVE_INPUTS = (("vector", "text"), ("vector", "like"), ("vector", "image_url"), ("vector", "not_text"), ("like", "image_url"))
JSON_FORM_FIELDS = tuple(d.name for d in declared() if d.option.served and d.structured)  # JSON text in a form


def integral(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


# An integer as JSON Schema has it: 5.0 is the integer 5 (pydantic's strict int refuses it).
Integer = Annotated[int, BeforeValidator(integral)]


def search_request_model(bounds: SearchConfig, vector_dim: int | None = None) -> type[BaseModel]:
    """The search request: every served option of ``SearchOptions`` (query/options.py, its one declaration), with the
    index's bounds (``search:`` in its config) in the schema, plus ``image_url`` and ``facets``; ``vector_dim``: the
    joint space's dimensions, which a query vector has. Lengths are in the schema but checked by the query stage
    (make_query), whose 422 names the setting and whose 400 says what is wrong with a text that is not valid Unicode.
    A field that is none of these is refused naming the nearest (``unknown_fields``)."""
    context = {**dataclasses.asdict(bounds), "vector_dim": vector_dim}
    fields = {d.name: (_request_type(d.type, bounds), _request_field(d, bounds, context)) for d in declared() if d.option.served}
    return create_model(
        "SearchRequest", **fields,
        image_url=(str | None, Field(None, description="a photo to fetch from a public http(s) address",
                                     json_schema_extra={"pattern": "^[Hh][Tt][Tt][Pp][Ss]?://[^/?#]"})),
        facets=(bool, Field(False, description="also return the filter columns' counts over the items matching where + filters")),
        __config__=ConfigDict(extra="forbid", json_schema_extra={"anyOf": _one_of_present(QUERY_INPUTS), "allOf": _apart(EXCLUSIVE_INPUTS)}),
    )


def _request_field(d: Declared, bounds: SearchConfig, context: dict[str, Any]) -> Any:
    """A declared option as a request field: its default, limits, JSON Schema keywords (bounds at the index's
    values; one whose value is unknown left out), examples and description (with what the service answers)."""
    o = d.option
    extra = {key: (context[v.name] if context.get(v.name) is not None else v.default) if isinstance(v, Bound) else v
             for key, v in o.schema.items()}
    extra = {key: v for key, v in extra.items() if v is not None}
    return Field(d.default if o.service_default is ... else o.service_default, ge=o.minimum, le=o.maximum, json_schema_extra=extra or None, examples=list(o.examples) or None,
                 description=o.text(bounds, status=True))


def _request_type(tp: Any, bounds: SearchConfig) -> Any:
    """A declared type as the request model reads it: an int as JSON Schema's integer (5.0 is 5), the structured
    filters with their bounds in the schema."""
    if tp is int:
        return Integer
    if tp == Filters:
        return _filters_type(bounds)
    if is_union(tp):
        return Union[tuple(_request_type(t, bounds) for t in get_args(tp))]  # noqa: UP007 - built from a tuple
    return tp


def _filters_type(bounds: SearchConfig) -> Any:
    """The structured filters' type, its bounds in the schema only (the query stage's 422 names the setting)."""
    values = Annotated[list[str | float | bool], Field(json_schema_extra={"maxItems": bounds.max_filter_values})]
    return Annotated[dict[str, values | Range | str | float | bool],
                     Field(json_schema_extra={"maxProperties": bounds.max_filter_columns})]


def unknown_fields(errors: list[dict[str, Any]], known: tuple[str, ...]) -> list[dict[str, Any]]:
    """Validation errors with each unknown field's message naming the nearest known one (a did-you-mean)."""
    out = []
    for e in errors:
        if e.get("type") == "extra_forbidden" and e.get("loc"):
            name = str(e["loc"][-1])
            e = {**e, "msg": f"unknown search field {name!r}{did_you_mean(name, known)}"}
        out.append(e)
    return out


class ErrorResponse(BaseModel):
    detail: str | list[dict[str, Any]] = Field(description="what is wrong: a sentence, or a list of field errors (422)")


class SearchResponse(BaseModel):
    mode: str = Field(description="the mode that ran (auto resolved; 'vector' for a vector query)")
    count: int = Field(description="results in this answer")
    total: int | None = Field(description=(
        "the items the search matches, every page together: those the filters (where, filters) let through that the "
        "mode compares (every item; for text-only and zero-shot image queries those with a text, for zero-shot text "
        "queries those with a photo), the `like` item left out. With min_score (\"auto\" too), those scoring at least that, "
        "where the ranking settles it (it read every item, or its last score is below the floor; a text query's is read "
        "deeper until it is); null otherwise"))
    offset: int
    min_score: float | None = Field(None, description="the score floor applied (min_score, or the calibrated one for "
                                                      "\"auto\"); null: none")
    no_close_match: bool = Field(False, description=(
        "the floor left out every item the query ranked: nothing is a close match (ask again with min_score \"off\" "
        "for related items)"))
    has_more: bool = Field(description="another page follows")
    took_ms: float
    results: list[dict[str, Any]] = Field(description="rank, id, score, the catalog columns (`image`: the photo's file "
                                                      "name or address, null where the item has none to show: none "
                                                      "given, or one unreadable when indexed; text queries: matched; "
                                                      "hybrid: vector_score, keyword_score; fused: image_score, text_score, "
                                                      "word_match: the words name the item's category, tag or colour)")
    facets: dict[str, Any] | None = Field(None, description="when asked for: the filter columns' counts or ranges")


class SalientResponse(BaseModel):
    box: list[float] = Field(description="[x0, y0, x1, y1], fractions of the photo's width and height: its most salient "
                                         "region, a starting box for POST /search's `crop`", examples=[[0.1, 0.2, 0.6, 0.9]])


def salient_body() -> dict:
    """POST /salient's body: a form with the photo, or JSON naming an item whose photo it is."""
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"type": "object", "required": ["like"], "additionalProperties": False, "properties": {
            "like": {"anyOf": [{"type": "string", "pattern": NOT_BLANK}, {"type": "integer"}],
                     "description": "an item id: the box of its photo"}}}},
        "multipart/form-data": {"schema": {"type": "object", "required": ["image"], "properties": {
            "image": {"type": "string", "format": "binary", "description": "a photo (JPEG, PNG, WebP, ...)"}}},
            "encoding": {"image": {"contentType": "image/*"}}}}}}


class BatchResponse(BaseModel):
    results: list[SearchResponse]


class HealthResponse(BaseModel):
    """Always 200 while the service answers: searches work even when writes cannot be stored, so a balancer must not
    take the service out for that. Monitor `writable` (or `status`)."""

    status: Literal["ok", "degraded"] = Field(description="degraded: the last write could not be stored (see write_error)")
    writable: bool = Field(description="false from a write that could not be stored (a full disk: it got 507) until one "
                                       "is stored again; searches are served all the same")
    write_error: str | None = Field(description="why the last write could not be stored (what, where, the reason); "
                                                "null while writable")
    items: int
    batching: dict[str, dict[str, int]]


class AddResponse(BaseModel):
    added: int
    items: int


class _WriteCounts(BaseModel):
    """What a write did, item by item: each item it names is counted once, under one of these."""

    added: int = Field(description="items new to the index")
    reencoded: int = Field(description="items whose image or text changed: encoded again")
    updated: int = Field(description="items whose other values changed: their rows updated in place, nothing encoded")
    unchanged: int = Field(description="items sent as they were: nothing written")
    items: int = Field(description="items in the index after the write")


class UpsertResponse(_WriteCounts):
    upserted: int = Field(description="items written: added + reencoded + updated")
    changes: dict[str, Any] = Field(description="the library's upsert report (IndexReport.changes): added, replaced (encoded "
                                                "again), updated (in place), unchanged, removed, indexes rebuilt")


class PatchResponse(_WriteCounts):
    id: str | int = Field(description="the item's id")
    changed: list[str] = Field(description="the columns whose values changed; `image` when the photo did")


class RemoveResponse(BaseModel):
    removed: int
    items: int


def search_body(model: type[BaseModel]) -> dict:
    """POST /search's body: the request as JSON, or as a form whose fields hold the same values (a form's empty field
    counts as absent; `filters`, `vector` and `weights` as JSON, like every field that is not text) plus a photo."""
    schema = model.model_json_schema()
    form: dict[str, Any] = {}
    for name, field in schema["properties"].items():
        field = _not_null({k: v for k, v in field.items() if k != "default"})
        form[name] = field if name in JSON_FORM_FIELDS else {"anyOf": [field, {"const": ""}], **_doc(field)}
    form["image"] = {"type": "string", "format": "binary", "description": "a photo (JPEG, PNG, WebP, ...)"}
    inputs = "; a search needs `text`, `like`, `vector` or a photo (`image_url`"  # closed by each
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {**schema, "description": f"a search{inputs})"}},
        "multipart/form-data": {"schema": {
            "type": "object", "properties": form, "additionalProperties": False, "anyOf": _one_of_present((*QUERY_INPUTS, "image")),
            "allOf": _apart((*EXCLUSIVE_INPUTS, ("image", "vector"), ("image", "like"), ("image", "image_url"))),
            "description": f"a search with an uploaded photo{inputs}, or `image`; not both)"},
                                "encoding": {**{name: {"contentType": "application/json"} for name in JSON_FORM_FIELDS},
                                             "image": {"contentType": "image/*"}}}}}}


def batch_body(model: type[BaseModel], max_batch: int) -> dict:
    """POST /search/batch's body: searches as for POST /search, inline (a `$ref` into the model's own `$defs`
    would point nowhere in the OpenAPI document)."""
    query = model.model_json_schema()
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": {
        "type": "object", "required": ["queries"], "title": "BatchRequest", "properties": {"queries": {
            "type": "array", "items": query, "maxItems": max_batch,
            "description": f"at most {max_batch} searches (search.max_batch); photos by image_url only"}}}}}}}


def json_query_parameter(name: str, schema: dict, description: str) -> dict:
    """An optional query parameter whose value is JSON (OpenAPI: a parameter with `content`, not `schema`)."""
    return {"parameters": [{"name": name, "in": "query", "required": False, "description": description,
                            "content": {"application/json": {"schema": _not_null(schema)}}}]}


def item_body(id_schema: dict | None, text_columns: tuple[str, ...]) -> dict:
    """POST/PUT /items' body: `metadata` (the item's catalog columns as JSON) and an optional `image` file.
    ``id_schema``: the id in `metadata` (POST); None where the id is in the path (PUT), which `metadata` may repeat."""
    columns: dict[str, Any] = {"type": "object", "propertyNames": {
        "not": {"anyOf": [{"pattern": "^_"}, {"enum": ["image", *RESERVED_COLUMNS]}]},
        "description": "a catalog column: not `image` (upload the file), not starting with '_', not a result column"},
        "additionalProperties": {"type": ["string", "number", "boolean", "null"]}}
    if id_schema is not None:
        columns = {**columns, "required": ["id"], "properties": {"id": id_schema}}
    # a text column's value counts unless empty (null, or a string of white space; a number is its text)
    empty = {"anyOf": [{"type": "null"}, {"type": "string", "not": {"pattern": NOT_BLANK}}]}
    texts = [{"required": [c], "properties": {c: {"not": empty}}} for c in text_columns]
    # A new item needs a photo or a text; PUT without a photo keeps the indexed item's (whether it has one: the index's).
    needs = {"anyOf": [{"required": ["image"]}, *([{"properties": {"metadata": {"anyOf": texts}}}] if texts else [])]}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {
        "schema": {"type": "object", "required": ["metadata"], "properties": {
            "metadata": {**columns, "description": "the item's catalog columns: id, title, description, metadata columns; "
                                                   "each value fits its column's type among the indexed items (400 otherwise)"
                                                   + ("" if id_schema is not None else "; the whole row: a column left out "
                                                      "becomes empty (PATCH changes some values only)"),
                         "examples": [{**({"id": 9001} if id_schema is not None else {}), "title": "a desk lamp",
                                       "category": "Lights", "price": 25.0}]},
            "image": {"type": "string", "format": "binary", "description": "the item's photo (JPEG, PNG, WebP, ...)"}},
            **(needs if id_schema is not None else {})},
        "encoding": {"metadata": {"contentType": "application/json"}, "image": {"contentType": "image/*"}}}}}}


URL_PATTERN = "^[Hh][Tt][Tt][Pp][Ss]?://[^/?#]"  # an http(s) address with a host


def patch_body(image_paths: bool) -> dict:
    """PATCH /items' body: a JSON merge patch of the item's catalog columns (RFC 7396: the columns given take their
    values, null empties one, the others keep theirs), its `image` a photo's address (or, with ``image_paths``, the
    path of a file in the server's image folders) or null; or the same as a form: `metadata` (the patch as JSON) and
    an optional `image` file."""
    photo = [{"type": "string", "pattern": URL_PATTERN, "description": "an http(s) address the server fetches the photo from"}]
    if image_paths:
        photo.append({"type": "string", "pattern": NOT_BLANK,
                      "description": "the path of an image file in one of the server's image folders (--image-folder); "
                                     "a relative path is looked up in each of them"})
    image = {"anyOf": [*photo, {"type": "null", "description": "the item has no photo any more"}],
             "description": "the item's new photo" + (": an address or a path on the server" if image_paths else
                                                      ": an address (this server reads no image paths)")}
    columns = {"type": "object", "propertyNames": {
        "not": {"anyOf": [{"pattern": "^_"}, {"enum": list(RESERVED_COLUMNS)}]},
        "description": "a catalog column: not starting with '_', not a result column"},
        "properties": {"image": image}, "additionalProperties": {"type": ["string", "number", "boolean", "null"]},
        "description": "the columns to change (JSON merge patch, RFC 7396): each takes its value, null empties it, the "
                       "columns not named keep theirs; `id`, if given, is the item's own",
        "examples": [{"price": 89}, {"title": "Desk lamp, brass", "sale": None}]}
    form = {"type": "object", "properties": {
        "metadata": {**{k: v for k, v in columns.items() if k != "properties"}, "properties": {"image": image}},
        "image": {"type": "string", "format": "binary", "description": "the item's new photo (JPEG, PNG, WebP, ...); "
                                                                       "not with an `image` in `metadata`"}}}
    return {"requestBody": {"required": True, "content": {
        "application/merge-patch+json": {"schema": columns},
        "application/json": {"schema": columns},
        "multipart/form-data": {"schema": form, "encoding": {"metadata": {"contentType": "application/json"},
                                                             "image": {"contentType": "image/*"}}}}}}


def new_item_id(integer_ids: bool) -> dict:
    """The JSON Schema of a new item's id: of the kind the index's ids are."""
    if integer_ids:
        # 2**63 - 1024: the largest float below 2**63 (validators may compare bounds as floats)
        return {"anyOf": [{"type": "integer", "minimum": -(2**63) + 1024, "maximum": 2**63 - 1024},
                          {"type": "string", "pattern": INTEGER_TEXT}],
                "description": "an integer, as the index's ids are (or its text)"}
    return {"anyOf": [{"type": "string", "pattern": NOT_BLANK}, {"type": "integer"}],
            "description": "a string (an integer is taken as its text)"}


def _one_of_present(names: tuple[str, ...]) -> list[dict]:
    return [{"required": [name], **_given(name)} for name in names]


def _apart(pairs: tuple[tuple[str, str], ...]) -> list[dict]:
    """Each pair of fields not both given."""
    return [{"not": {"required": [a, b], "properties": {**_given(a)["properties"], **_given(b)["properties"]}}} for a, b in pairs]


def _given(name: str) -> dict:
    """A field that is there: not null, nor a form's empty field (as if absent); a file part is there."""
    return {"properties": {} if name == "image" else {name: {"not": {"enum": [None, ""]}}}}


def _not_null(field: dict) -> dict:
    """A field's schema without its null option (a form field, or a query parameter, is there or not)."""
    options = [o for o in field.get("anyOf", []) if o != {"type": "null"}]
    if len(options) == len(field.get("anyOf", [])):
        return field
    rest = {k: v for k, v in field.items() if k != "anyOf"}
    if len(options) > 1:
        return {**rest, "anyOf": options}
    if set(rest) & set(options[0]):  # both constrain one keyword: keep both
        return {**_doc(rest), "allOf": [options[0], {k: v for k, v in rest.items() if k not in _doc(rest)}]}
    return {**rest, **options[0]}


def _doc(field: dict) -> dict:
    return {k: v for k, v in field.items() if k in ("title", "description", "examples")}


def responses(described: dict[int, Any]) -> dict[int | str, dict]:
    """OpenAPI responses: (model or media type, description) or a description of an error; 400 always
    (a Host that is not allowed), every error with the body {"detail": ...}."""
    out: dict[int | str, dict] = {400: {"model": ErrorResponse, "description": "a Host header that is not allowed"}}
    for status, what in described.items():
        if isinstance(what, str):
            out[status] = {"model": ErrorResponse, "description": what} if status >= 400 else {"description": what}
        elif isinstance(what[0], str):
            out[status] = {"description": what[1], "content": {what[0]: {"schema": {"type": "string", "format": "binary"}}}}
        else:
            out[status] = {"model": what[0], "description": what[1]}
    if 400 in described:
        out[400]["description"] += "; a Host header that is not allowed"
    return out


WRITE_FAILED = {  # a write that could not be stored changed nothing: the index, the write log and the uploads are as before
    507: "the disk (or quota) is full: the write was not stored; GET /health reports it until a write is stored again",
    500: "the write could not be stored for another reason of the disk (an I/O error, a read-only filesystem), named in detail"}

