"""The service's request and response models, and their OpenAPI descriptions (bounds, statuses).

The search request is built per index (``search_request_model``), so the schema carries that
index's bounds (``search:`` in its config).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import Path as PathParam
from pydantic import BaseModel, Field, create_model

from ..config import SearchConfig
from ..search import MODES

Mode = Literal["auto", "image", "text", "fused", "zero-shot"]
ItemId = Annotated[str, PathParam(description="the item's catalog id, URL-encoded (slashes allowed)", examples=["575"])]
assert set(Mode.__args__) == set(MODES)  # noqa: S101 - the API and the service take the same modes


def search_request_model(bounds: SearchConfig) -> type[BaseModel]:
    """The search request's fields, with the index's bounds (``search:`` in its config) in the schema."""
    return create_model(
        "SearchRequest",
        # Lengths are in the schema but checked by the query stage (make_query), whose 422 names the setting
        # and whose 400 says what is wrong with a text that is not valid Unicode.
        text=(str | None, Field(None, json_schema_extra={"maxLength": bounds.max_text_chars}, examples=["a washing machine"],
                                description=(f"query text: at most {bounds.max_text_chars:,} characters (search.max_text_chars) "
                                             f"and {bounds.max_text_tokens:,} word pieces (search.max_text_tokens); "
                                             "over either: 422"))),
        mode=(Mode, "auto"),
        k=(int, Field(10, ge=1, json_schema_extra={"maximum": bounds.max_k},
                      description=f"number of results, 1 to {bounds.max_k:,} (search.max_k)")),
        where=(str | None, Field(None, json_schema_extra={"maxLength": bounds.max_where_chars},
                                 examples=["price < 500 AND category = 'Kitchen'"], description=(
            "filter: one condition over catalog columns (columns, literals, comparisons, AND/OR/NOT, arithmetic, "
            "IN lists, BETWEEN, LIKE/ILIKE, IS NULL, CAST and a few scalar functions; README, \"Filters\"). "
            f"At most {bounds.max_where_chars:,} characters (search.max_where_chars); outside the grammar: 400; "
            f"still running after {bounds.filter_timeout_s:g} s (search.filter_timeout_s): 422"))),
        hybrid=(Literal["rrf", "weighted", "off"] | None, Field(None, description=(
            "text queries: how BM25 keywords and vectors combine: reciprocal-rank fusion (default), a weighted sum, or not"))),
        keyword_weight=(float | None, Field(None, ge=0, le=1, description="text queries: the keywords' share, 0 to 1 (default 0.5)")),
        offset=(int, Field(0, ge=0, description=f"results to skip (paging); k + offset at most {bounds.max_k:,}")),
        filters=(_filters_type(bounds) | None, Field(
            None, description=("column -> values (any of them), one value, or a range {min, max}; ANDed with `where` "
                               f"(no SQL needed). At most {bounds.max_filter_columns:,} columns (search.max_filter_columns) "
                               f"and {bounds.max_filter_values:,} values per list (search.max_filter_values); over either: 422"),
            examples=[{"category": ["Kitchen"], "price": {"min": 10, "max": 500}}])),
        sort_by=(str | None, Field(None, description=f"a column, 'price' or '-price' (descending): reorders the "
                                                     f"{bounds.sort_candidates} most relevant items (search.sort_candidates)")),
        min_score=(float | None, Field(None, description=(
            "leave out results scoring lower. One scale for image, text and fused queries: the weighted mean of the "
            "cosines of the parts the query has (an item's own photo as a photo query scores 1); zero-shot scores are "
            "the zero-shot space's cosines (README, \"Scores\")"))),
        weights=(dict[str, float] | None, Field(None, examples=[{"image": 0.7, "text": 0.3}], json_schema_extra={
            "propertyNames": {"enum": ["image", "text"]}, "additionalProperties": {"type": "number", "minimum": 0}},
            description=("fused queries (a photo and words, or `like` an item): the image and text weights, non-negative and "
                         "not both 0; the score becomes (image * cos_image + text * cos_text) / (image + text). "
                         "Another key, a negative weight, both 0, or a query that is not fused: 400"))),
        not_text=(str | None, Field(None, json_schema_extra={"maxLength": bounds.max_text_chars}, examples=["metal legs"],
                                    description=(f"a concept to subtract: the score loses {bounds.not_text_weight:g} "
                                                 "(search.not_text_weight) times this text's own score as a text query. "
                                                 "Bounded as `text`; empty: 400; with `vector`: 400"))),
        like=(str | int | None, Field(None, description="an item id: items like it, from its stored vectors "
                                                         "(with `text`: its photo plus these words)")),
        vector=(list[float] | None, Field(None, description="a query vector in the joint space (as Retriever.encode gives)")),
        image_url=(str | None, Field(None, description="a photo to fetch from a public http(s) address")),
        facets=(bool, Field(False, description="also return the filter columns' counts over the items matching where + filters")),
    )


def _filters_type(bounds: SearchConfig) -> Any:
    """The structured filters' type, its bounds in the schema only (the query stage's 422 names the setting)."""
    values = Annotated[list[str | float | bool], Field(json_schema_extra={"maxItems": bounds.max_filter_values})]
    return Annotated[dict[str, values | dict[str, float | None] | str | float | bool],
                     Field(json_schema_extra={"maxProperties": bounds.max_filter_columns})]


class ErrorResponse(BaseModel):
    detail: str | list[dict[str, Any]] = Field(description="what is wrong: a sentence, or a list of field errors (422)")


class SearchResponse(BaseModel):
    mode: str = Field(description="the mode that ran (auto resolved; 'vector' for a vector query)")
    count: int
    offset: int
    has_more: bool = Field(description="another page follows")
    took_ms: float
    results: list[dict[str, Any]] = Field(description="rank, id, score, the catalog columns (text queries: matched; "
                                                      "hybrid: vector_score, keyword_score; fused: image_score, text_score, "
                                                      "word_match: the words name the item's category, tag or colour)")
    facets: dict[str, Any] | None = Field(None, description="when asked for: the filter columns' counts or ranges")


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


class UpsertResponse(BaseModel):
    upserted: int
    items: int
    changes: dict[str, Any] = Field(description="how many rows were new, changed (encoded again), updated in place, unchanged")


class RemoveResponse(BaseModel):
    removed: int
    items: int


def search_body(model: type[BaseModel]) -> dict:
    schema = model.model_json_schema()
    form = {name: {k: v for k, v in field.items() if k != "default"} for name, field in schema["properties"].items()}
    for name in ("filters", "vector", "weights"):  # structured values travel as JSON text in a form
        form[name] = {"type": "string", "description": f"JSON, as `{name}` in the JSON body"}
    for name in ("text", "where", "not_text"):  # a form field is a string, never null
        form[name] = {"type": "string", **{k: v for k, v in form[name].items() if k in ("maxLength", "description", "examples")}}
    form["image"] = {"type": "string", "format": "binary", "description": "a photo (JPEG, PNG, WebP, ...)"}
    return {"requestBody": {"content": {"application/json": {"schema": schema},
                                        "multipart/form-data": {"schema": {"type": "object", "properties": form}}}}}


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


ADD_BODY = {"requestBody": {"content": {"multipart/form-data": {"schema": {"type": "object", "required": ["metadata"], "properties": {
    "metadata": {"type": "string", "description": "JSON object: id, title, description, metadata columns",
                 "examples": ['{"id": 9001, "title": "a desk lamp", "category": "Lights", "price": 25.0}']},
    "image": {"type": "string", "format": "binary"}}}}}}}
