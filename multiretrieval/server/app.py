"""The web service: REST endpoints and the search page, over one saved index folder (see service.py).

Item ids are any strings: ``/items/{id}`` takes the id URL-encoded, slashes included
(``/items/lamps%2Fdesk.jpg`` or ``/items/lamps/desk.jpg``), and ``/item?id=...`` takes it as a
query parameter (also for an id that ends in "/image"). Every status an endpoint can answer, and
every bound, is in the OpenAPI description (schemas.py).
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import secrets
import threading
import time
from collections import OrderedDict
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from fastapi import Depends, FastAPI, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ValidationError, create_model
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import FormParser, MultiPartParser

from ..catalog import is_url, load_image
from ..config import RetrieverConfig
from ..errors import (CatalogError, ConfigError, ImageError, ImageLimitError, ItemNotFoundError, LimitError, QueryError,
                      StorageError)
from ..utils import usable_cpus
from .guards import LOOPBACK_HOSTS, BodyLimit, RequestGuard
from ..query.checks import check_where
from ..query.options import MODES, declared
from .schemas import (WRITE_FAILED, INTEGER_TEXT, JSON_FORM_FIELDS, NOT_BLANK, AddResponse, BatchResponse, HealthResponse, ItemId, ItemIdQuery,
                      PatchResponse, RemoveResponse, SalientResponse, SearchResponse, UpsertResponse, batch_body, item_body,
                      integral, json_query_parameter, new_item_id, patch_body, responses, salient_body, search_body, search_request_model,
                      unknown_fields)
from .service import Service, refuse_skipped

logger = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
THUMBNAIL_PX = 256
THUMBNAIL_CACHE_BYTES = 32 * 2**20  # thumbnails kept in memory (PNG bytes), least recently used out first


def create_app(index_dir: str | Path, api_key: str | None = None, max_upload_bytes: int = 10 * 2**20,
               allowed_hosts: list[str] | None = None, allowed_origins: list[str] | None = None,
               checkpoint_every: int = 1000, image_urls: Literal["public", "any", "off"] = "public",
               config: RetrieverConfig | None = None, max_concurrent: int | None = None,
               image_folders: list[str | Path] | None = None) -> FastAPI:
    """Build the app for a saved index folder.

    Args:
        index_dir: a folder written by ``Retriever.save`` / ``multiretrieval index``.
        api_key: when set, POST/PUT/PATCH/DELETE of items need header ``X-API-Key``.
        max_upload_bytes: larger request bodies get 413.
        allowed_hosts: the Host names requests may carry (default: localhost, 127.0.0.1, ::1;
            "*" for any). Others get 400, which stops DNS-rebinding pages from reaching the app.
        allowed_origins: web origins (e.g. "https://shop.example") besides the app's own that
            may send POST/PUT/DELETE requests; other origins get 403 (cross-site request forgery).
        checkpoint_every: save the index folder (and empty the write log) after this many writes.
        image_urls: which photo addresses (``image_url``) the service fetches: "public" (only
            addresses that resolve to public IPs), "any", or "off".
        config: the config to serve the index with (``Retriever.load``'s: it must name the encoders
            the index was built with); default: the config saved with the index.
        max_concurrent: searches and facet counts that run at once (default: the usable CPUs); the others wait
            their turn, first come first served, while cheap requests (an item, /health) go ahead.
        image_folders: folders whose image files a write (PATCH's ``image``) may name by path (absolute, or relative
            to one of them; symbolic links followed, and the file they lead to must be inside too); default: none,
            and a path is refused (400): an item's photo is then uploaded or given by address.
    """
    import contextlib

    import faiss

    # One query searches one vector: FAISS's OpenMP threads would only spin against each other
    # across concurrent requests. Concurrency comes from the request threads instead.
    faiss.omp_set_num_threads(1)
    folders = _image_folders(image_folders)  # before the models load: a mistyped folder fails at once
    service = Service(index_dir, checkpoint_every, config)
    bounds = service.retriever.config.search
    request_model = search_request_model(bounds, service.retriever.indexes["joint"].dim)
    integer_ids, text_columns = _integer_ids(service.retriever.items["id"]), service.retriever.config.catalog.text_columns
    add_body, upsert_body = item_body(new_item_id(integer_ids), text_columns), item_body(None, text_columns)
    id_text = {"pattern": INTEGER_TEXT if integer_ids else NOT_BLANK}  # the id an upsert may name
    upsert_path = PathParam(description="the item's id, URL-encoded (slashes allowed)", json_schema_extra=id_text)
    upsert_query = Query(description="the item's id (URL-encoded)", json_schema_extra=id_text)
    batch_model = create_model("BatchRequest", queries=(list[request_model], ...))  # its schema: batch_body
    # CPU work admitted a few at a time: with 48 clients in 40 threads on 2 cores every search shared the cores with
    # all the others (and a write waited for all of them to leave the index), so each took as long as the slowest.
    # Waiting in this queue costs no CPU, and /health or an item row need not wait behind searches.
    slots = asyncio.Semaphore(max_concurrent or usable_cpus())

    async def compute(fn, *args, **kwargs):
        async with slots:
            return await run_in_threadpool(fn, *args, **kwargs)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        try:
            await run_in_threadpool(service.checkpoint)  # a clean shutdown leaves no log to replay
        finally:
            service.close()

    app = FastAPI(title="multiretrieval", version=_version(), docs_url=None, lifespan=lifespan,
                  description="Search a product catalog by text, photo, or both.")
    app.state.service = service
    app.add_middleware(BodyLimit, max_bytes=max_upload_bytes)
    app.add_middleware(RequestGuard, allowed_hosts=allowed_hosts or list(LOOPBACK_HOSTS), allowed_origins=allowed_origins or [])
    _add_error_handlers(app)

    def require_key(request: Request) -> None:
        if api_key and not secrets.compare_digest(request.headers.get("x-api-key", ""), api_key):
            raise _HTTPError(401, "this endpoint needs a valid X-API-Key header")

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/info")
    def info() -> dict:
        """What the page needs to know: the display settings, the facet columns, the columns and their types."""
        retriever = service.retriever
        items = retriever.items
        display = retriever.config.display
        return {"items": len(retriever), "modes": list(MODES),
                "display": {"title": display.title, "price": display.price if display.price in items else None,
                            "currency": display.currency, "brand": display.brand if display.brand in items else None,
                            "columns": [c for c in display.columns if c in items]},
                "facets": retriever.facet_columns(),
                "columns": {c: ("number" if items[c].dtype.kind in "iuf" else "text") for c in items.columns}}

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    _mount_docs(app)

    upload = f"request body over {max_upload_bytes:,} bytes (--max-upload-mb)"
    pixels = f"an image over {service.retriever.config.catalog.max_image_pixels:,} pixels (catalog.max_image_pixels)"
    key = {401: "missing or wrong X-API-Key", 403: "a cross-origin request", **WRITE_FAILED}  # what every write may answer
    bad_row = ("metadata that is not a JSON object of catalog columns (UTF-8, nested at most 32 levels); an id of another kind; "
               "a value that is an object or a list, or whose type does not fit its column; a column named like an internal "
               "one; a file that is not an image; an item without image or text")

    @app.get("/health", response_model=None, responses=responses({
        200: (HealthResponse, "status (ok, or degraded while writes cannot be stored), item count, micro-batching")}))
    def health() -> dict:
        batching = {name: {"calls": b.calls, "batches": b.batches}
                    for name, b in (("text", service.text_batcher), ("image", service.image_batcher))}
        error = service.write_error
        return {"status": "ok" if error is None else "degraded", "writable": error is None, "write_error": error,
                "items": len(service.retriever), "batching": batching}

    @app.post("/search", openapi_extra=search_body(request_model), responses=responses({
        200: (SearchResponse, "the results"),
        400: "malformed JSON or form (JSON nested over 32 levels, a form field that is not UTF-8); an empty query; both an "
             "`image` file and an `image_url`; a text that is not valid Unicode; a file that is not an image; "
             "a filter outside the grammar (the answer lists what is allowed and the catalog's columns) or one DuckDB refuses; "
             "weights with another key than image and text, a negative weight, both 0, or on a query that is not fused; "
             "an empty not_text, or one with a vector; a crop without a photo, or one not 4 numbers, empty, inverted or "
             "outside the photo",
        403: "a cross-origin request", 404: "`like` names an item that is not in the index",
        413: f"{upload}; {pixels}", 415: "a body that is neither JSON nor a form",
        422: f"a field over its bound (k over {bounds.max_k:,}, a text over {bounds.max_text_chars:,} characters or "
             f"{bounds.max_text_tokens:,} word pieces, a filter over {bounds.max_where_chars:,} characters), a filter still "
             f"running after {bounds.filter_timeout_s:g} s, an unknown mode, a mode that does not fit the inputs"}))
    async def search(request: Request) -> Response:
        """A search as JSON, or as multipart form with a photo (field `image`) and the same fields (`filters`,
        `vector` and `weights` as JSON text). Each result's thumbnail is at GET /items/{id}/image (the id URL-encoded)."""
        query, image = await _parse_search(request, request_model)
        if image is not None and query.image_url:
            raise _HTTPError(400, "give the photo once: an uploaded `image` or an `image_url`, not both")
        if image is None and query.image_url:
            image = await run_in_threadpool(fetch_image_url, query.image_url, service.retriever.config, image_urls)
        started = time.perf_counter()
        retriever = service.retriever
        results = await compute(retriever.search, image=image, **_search_arguments(query))
        facets = await compute(retriever.facets, None, query.where, query.filters) if query.facets else None
        facets = _facets_for_clients(facets)
        return _search_response(query, image, results, facets, started, retriever)

    @app.post("/search/batch", response_model=None, openapi_extra=batch_body(request_model, bounds.max_batch),
              responses=responses({
        200: (BatchResponse, "one answer per search, in order"), 403: "a cross-origin request",
        400: "malformed JSON (nested over 32 levels included); a search refused as by POST /search",
        404: "a `like` names an item that is not in the index", 413: upload,
        422: f"more than {bounds.max_batch} searches, or a search over a bound (as for POST /search)"}))
    async def search_batch(request: Request) -> Response:
        """Several searches in one request, embedded together (one pass per encoder). Photos by `image_url` only."""
        batch = _validate(batch_model, parse_json("request body", await request.body()), tuple(request_model.model_fields))
        retriever, started, specs = service.retriever, time.perf_counter(), []
        for query in batch.queries:
            image = await run_in_threadpool(fetch_image_url, query.image_url, retriever.config, image_urls) if query.image_url else None
            specs.append({"image": image, **_search_arguments(query)})
        frames = await compute(retriever.search_batch, specs)
        answers = [_search_response(q, s["image"], f, None, started, retriever).body.decode()
                   for q, s, f in zip(batch.queries, specs, frames)]
        return Response('{"results": [' + ", ".join(answers) + "]}", media_type="application/json")

    @app.post("/salient", response_model=None, openapi_extra=salient_body(), responses=responses({
        200: (SalientResponse, "the box"), 400: "no photo and no `like`, both, or a file that is not an image",
        403: "a cross-origin request", 404: "`like` names an item that is not in the index, or one without a photo",
        413: f"{upload}; {pixels}", 415: "a body that is neither JSON nor a form"}))
    async def salient(request: Request) -> dict:
        """The most salient region of a photo (where the image encoder's activations concentrate), the page's default
        box for a search by a part of it (`crop`): an uploaded `image` (form) or an item's photo (JSON {"like": ID})."""
        content_type = request.headers.get("content-type", "")
        if content_type.startswith("application/json"):
            body = parse_json("request body", await request.body())
            like = integral(body.get("like")) if isinstance(body, dict) else None  # 3.0 is JSON Schema's integer 3
            if not isinstance(body, dict) or set(body) != {"like"} or isinstance(like, bool) or not isinstance(like, (str, int)):
                raise _HTTPError(400, 'send {"like": ITEM_ID} as JSON, or a form with the photo in `image`')
            image = service.retriever.image_source(like)
            if image is None:
                raise _HTTPError(404, f"item {like!r} has no photo")
        elif content_type.startswith("multipart/form-data"):
            form = await _form(request)
            upload = form.get("image")
            image = await upload.read() if upload is not None and hasattr(upload, "read") else None
            await form.close()
            if not image:
                raise _HTTPError(400, "image: the form has no photo in its `image` field")
        else:
            raise _HTTPError(415, 'send {"like": ITEM_ID} as JSON, or multipart/form-data with the photo in `image`')
        box = await compute(service.retriever.salient_box, image)
        return {"box": list(box)}

    facet_filters = "column -> values or {min, max}, as `filters` for POST /search"

    filters_schema = request_model.model_json_schema()["properties"]["filters"]

    @app.get("/facets", response_model=None, openapi_extra=json_query_parameter("filters", filters_schema, facet_filters),
             responses=responses({
        200: (dict[str, Any], ("per column: {kind: values, values: [{value, count}]} or {kind: range, min, max, histogram, "
                               "quantiles}: min, max and the 101 quantiles (percentiles 0 to 100, values of the column) over "
                               "all items, the histogram's counts over the matching ones")),
        400: "an unknown column; filters that are not a JSON object (nested at most 32 levels); a filter outside the grammar",
        422: "a filter over its bounds"}))
    async def facets(columns: str | None = Query(None, description="comma-separated columns (default: the display facets)"),
                     where: str | None = Query(None, description="a filter, as for POST /search"),
                     filters: str | None = Query(None, include_in_schema=False)) -> dict:  # described as JSON: openapi_extra
        """The filter columns' value counts or numeric ranges over the items matching `where` and `filters`,
        each column counted without its own filter (so its other values can still be chosen)."""
        if where is not None:
            check_where(where, service.retriever.config)
        names = [c.strip() for c in columns.split(",") if c.strip()] if columns else None
        return _facets_for_clients(await compute(service.retriever.facets, names, where, _json_field("filters", filters)))

    def item_row(item_id: str) -> dict:
        import pandas as pd

        row = _for_clients(pd.DataFrame([service.retriever.get(item_id)]), service.retriever)
        return json.loads(row.to_json(orient="records"))[0]  # NaN -> null

    def item_thumbnail(item_id: str, size: int = THUMBNAIL_PX) -> Response:
        source = service.retriever.image_source(item_id)
        if source is None:
            raise _HTTPError(404, f"item {item_id!r} has no image")
        if is_url(source):
            data = _thumbnail(source, 0.0, size)  # an image URL is fetched here
        else:
            try:
                data = _thumbnail(source, _mtime(source), size)
            except ImageError as exc:
                # Clients get the file's name only: the server's folders are none of their business; the log has the
                # path, once per file (every page showing the item asks again).
                if source not in _logged_unreadable:
                    _logged_unreadable.add(source)
                    logger.warning("item %r: %s", item_id, exc)
                name = Path(source).name
                if _missing(source):  # gone since it was indexed (or between the stat and the read)
                    raise _HTTPError(404, f"the image file of item {item_id!r} is missing: {name}") from None
                raise ImageError(str(exc).replace(str(Path(source).parent), "...")) from None  # there but unreadable: 400
        return Response(data, media_type="image/png", headers={"Cache-Control": "public, max-age=3600"})

    async def write(record: dict, check=None) -> Any:
        return await run_in_threadpool(service.write, record, check)

    async def add_or_upsert(request: Request, op: str, item_id: str | None = None) -> dict:
        metadata, path = await _item_upload(request, service, item_id)
        try:
            previous = service.retriever.image_source(metadata["id"]) if op == "upsert" else None
        except (ItemNotFoundError, KeyError):
            previous = None
        if path is None and previous is not None:
            metadata["image"] = previous  # an upsert without a file keeps the photo (a new price must not drop it)
        try:
            report = await write({"op": op, "rows": [metadata]}, refuse_skipped)
        except BaseException:
            service.drop_unused_upload(path)
            raise
        if previous != (str(path) if path else None):
            service.drop_unused_upload(previous)  # the image an upsert replaced
        if op == "add":
            return {"added": report.indexed, "items": len(service.retriever)}
        changes = report.changes
        counts = {"added": changes.get("added", 0), "reencoded": changes.get("replaced", 0),
                  "updated": changes.get("updated", 0), "unchanged": changes.get("unchanged", 0)}
        return {"upserted": counts["added"] + counts["reencoded"] + counts["updated"], **counts,
                "items": len(service.retriever), "changes": changes}

    async def patch(request: Request, item_id: str) -> dict:
        fields, upload = await _patch_request(request, item_id)
        previous = service.retriever.image_source(item_id)  # 404 before a photo is fetched or kept
        value, path = fields.get("image"), None
        if upload is None and isinstance(value, str) and _is_http(value):
            upload = await run_in_threadpool(fetch_image_url, value, service.retriever.config, image_urls, "image")
        if upload is not None:
            await run_in_threadpool(_check_image, upload, service.retriever.config, "image")  # refused before it is kept
            path = await run_in_threadpool(service.store_upload, upload)  # on disk before the write is logged
            fields["image"] = str(path)
        elif isinstance(value, str):
            fields["image"] = _image_path(value, folders)
            await run_in_threadpool(_check_image, fields["image"], service.retriever.config, "image", value)
        try:
            report = await write({"op": "update", "id": item_id, "fields": fields})
        except BaseException:
            service.drop_unused_upload(path)
            raise
        if "image" in report.changed:
            service.drop_unused_upload(previous)  # the photo the patch replaced
        return {"id": report.id, "changed": report.changed, "added": 0, "reencoded": int(report.reencoded),
                "updated": int(not report.reencoded and not report.unchanged), "unchanged": int(report.unchanged),
                "items": len(service.retriever)}

    async def delete(item_id: str) -> dict:
        source = service.retriever.image_source(item_id)  # 404 before taking the write lock
        removed = await write({"op": "remove", "ids": [item_id]})
        service.drop_unused_upload(source)
        return {"removed": removed, "items": len(service.retriever)}

    row_answers = responses({200: (dict[str, Any], "the item's catalog row"), 404: "unknown id"})
    image_answers = responses({200: ("image/png", "a PNG of at most `size` pixels a side"), 422: "a size outside 32-1024",
                               400: "the item's image file is unreadable",
                               404: "unknown id, an item without an image, or one whose image file is missing"})
    size_query = Query(THUMBNAIL_PX, ge=32, le=1024, description="the photo's longest side in pixels")
    remove_answers = responses({200: (RemoveResponse, "removed"), **key, 404: "unknown id"})
    upsert_answers = responses({200: (UpsertResponse, "added or replaced"), **key, 400: bad_row, 413: f"{upload}; {pixels}",
                                404: "an id with a line break, which no path carries: use PUT /item?id="})
    patch_image = ("an `image` that is neither an http(s) address, a path nor null; an address the server may not fetch "
                   "(see --image-urls) or that serves no photo; a path outside the server's image folders (--image-folder; "
                   "with none, every path), or not an image file; an `image` file and an `image` in `metadata` both")
    patch_answers = responses({
        200: (PatchResponse, "the item's columns that changed, and what was written"), **key,
        400: f"a body that is not a JSON object of catalog columns (values: text, number, boolean or null); {patch_image}; "
             "a column named like an internal one; a value whose type does not fit its column; another `id`; an item "
             "left with neither image nor text",
        404: "unknown id", 413: f"{upload}; {pixels}",
        415: "a body that is neither JSON (application/merge-patch+json, application/json) nor multipart/form-data"})
    patch_doc = ("Change some of an item's values (JSON merge patch, RFC 7396): the columns given take their values, null "
                 "empties one, the others keep theirs. `image`: a new photo by http(s) address (fetched once, under the "
                 "same address rules as a search's `image_url`), by path (a file in the server's image folders), or null "
                 "(no photo); or upload it as multipart `image` with the changes as `metadata`. Metadata alone changes in "
                 "place; a new image or text encodes the item again.")

    @app.get("/item", response_model=None, responses=row_answers)
    def get_item_by_query(id: ItemIdQuery) -> dict:  # noqa: A002 - the query parameter is called id
        """An item's catalog row; the id as a query parameter (any string, URL-encoded)."""
        return item_row(id)

    @app.get("/item/image", response_class=Response, responses=image_answers)
    def item_image_by_query(id: ItemIdQuery, size: int = size_query) -> Response:  # noqa: A002
        """An item's photo as a PNG of at most `size` px (256 by default); the id as a query parameter."""
        return item_thumbnail(id, size)

    @app.delete("/item", dependencies=[Depends(require_key)], response_model=None, responses=remove_answers)
    async def delete_item_by_query(id: ItemIdQuery) -> dict:  # noqa: A002
        """Remove an item; the id as a query parameter."""
        return await delete(id)

    @app.put("/item", dependencies=[Depends(require_key)], openapi_extra=upsert_body, response_model=None,
             responses=upsert_answers)
    async def upsert_item_by_query(request: Request, id: str = upsert_query) -> dict:  # noqa: A002
        """Add or replace an item (see PUT /items/{id}); the id as a query parameter."""
        return await add_or_upsert(request, "upsert", id)

    @app.patch("/item", dependencies=[Depends(require_key)], openapi_extra=patch_body(bool(folders)), response_model=None,
               responses=patch_answers, description=patch_doc + " The id as a query parameter.")
    async def patch_item_by_query(request: Request, id: str = upsert_query) -> dict:  # noqa: A002
        """Change some of an item's values (see PATCH /items/{id}); the id as a query parameter."""
        return await patch(request, id)

    @app.get("/items/{item_id:path}", response_model=None, responses=responses({
        200: (dict[str, Any], "/items/ID: the item's catalog row (JSON; its product page when a browser asks for HTML); "
                              "/items/ID/image: its photo as a PNG of at most `size` px"),
        400: "the item's image file is unreadable",
        404: "unknown id, an item without an image, or one whose image file is missing",
        422: "a size outside 32-1024"}))
    def get_item(item_id: ItemId, request: Request, size: int = size_query) -> Any:
        """``/items/ID``: an item's catalog row, or its product page for a browser; ``/items/ID/image``: its
        photo as a PNG (at most `size` px). The id URL-encoded (``lamps%2Fdesk.jpg``); unencoded slashes work
        too, except in an id that itself ends in "/image": for such ids use ``/item?id=``."""
        item_id, thumbnail = _item_path(request, item_id)
        if thumbnail:
            return item_thumbnail(item_id, size)
        row = item_row(item_id)  # 404 for an unknown id, whatever the format
        vary = {"Vary": "Accept"}  # one address, two representations: caches must keep them apart
        if "text/html" in request.headers.get("accept", ""):
            return FileResponse(STATIC / "index.html", headers=vary)  # the page shows the product view for /items/ID
        return JSONResponse(row, headers=vary)

    @app.post("/items", dependencies=[Depends(require_key)], status_code=201, openapi_extra=add_body,
              response_model=None, responses=responses({
                  201: (AddResponse, "added"), **key, 400: bad_row + "; an id already indexed", 413: f"{upload}; {pixels}"}))
    async def add_item(request: Request) -> dict:
        """Add one item: multipart with `metadata` (a JSON object with id, title, ...) and an optional `image` file."""
        return await add_or_upsert(request, "add")

    @app.put("/items/{item_id:path}", dependencies=[Depends(require_key)], openapi_extra=upsert_body, response_model=None,
             responses=upsert_answers)
    async def upsert_item(request: Request, item_id: str = upsert_path) -> dict:
        """Add or replace one item (multipart `metadata` and optional `image`, as for POST /items). PUT replaces the
        item's whole row: a column `metadata` leaves out becomes empty (PATCH changes some values only); without an
        `image` file an indexed item keeps its photo. A new id is added, a changed image or text is encoded again,
        changed metadata alone is updated in place; the answer counts which."""
        return await add_or_upsert(request, "upsert", item_id)

    @app.patch("/items/{item_id:path}", dependencies=[Depends(require_key)], openapi_extra=patch_body(bool(folders)),
               response_model=None, responses=patch_answers, description=patch_doc + " The id URL-encoded, slashes allowed.")
    async def patch_item(request: Request, item_id: str = upsert_path) -> dict:
        """Change some of an item's values; the others keep theirs (PUT replaces the whole row)."""
        return await patch(request, item_id)

    @app.delete("/items/{item_id:path}", dependencies=[Depends(require_key)], response_model=None, responses=remove_answers)
    async def delete_item(item_id: ItemId) -> dict:
        """Remove an item; the id URL-encoded, slashes allowed."""
        return await delete(item_id)

    return app


def _item_path(request: Request, decoded: str) -> tuple[str, bool]:
    """(item id, whether the thumbnail is asked for) of GET /items/...: read from the path as sent, still
    percent-encoded, so that an encoded id ("a%2Fimage") is never mistaken for a thumbnail request."""
    from urllib.parse import unquote

    raw = request.scope.get("raw_path")
    if raw is None:
        tail = decoded
    else:
        raw = raw.decode("latin-1").split("?", 1)[0]
        tail = raw[raw.index("/items/") + len("/items/"):] if "/items/" in raw else decoded
    if tail.endswith("/image"):
        return unquote(tail[: -len("/image")]), True
    return unquote(tail), False


async def _item_upload(request: Request, service: Service, item_id: str | None) -> tuple[dict, Path | None]:
    """The catalog row of an add/upsert request (its image saved under a name of ours), checked."""
    form = await _form(request)
    text = form.get("metadata") or ""
    if not isinstance(text, str):
        raise _HTTPError(400, "metadata: a form field of JSON text, not a file")
    metadata = parse_json("metadata", text)
    if not isinstance(metadata, dict) or "image" in metadata:
        raise _HTTPError(400, "metadata: a JSON object of catalog columns, without 'image' (upload the file as `image`)")
    _catalog_values("metadata", metadata)
    if item_id is not None:
        if "id" in metadata and str(metadata["id"]) != item_id:
            raise _HTTPError(400, f"metadata: id {metadata['id']!r} differs from the id in the URL, {item_id!r}")
        metadata.setdefault("id", item_id)
    upload = form.get("image")
    path = None
    if upload is not None and hasattr(upload, "read"):
        data = await upload.read()
        await form.close()
        load_image(data)  # refuse a bad image before anything is written
        path = service.store_upload(data)  # the name is ours, never the client's; on disk before the write is logged
        metadata["image"] = str(path)
    return metadata, path


def _catalog_values(name: str, values: Any) -> dict:
    """A JSON object of catalog columns whose values are scalars (a new column would take an object or a list, and the
    next save would fail on it)."""
    if not isinstance(values, dict):
        raise _HTTPError(400, f"{name}: a JSON object of catalog columns, not {_json_kind(values)}")
    nested = next((c for c, v in values.items() if isinstance(v, (dict, list))), None)
    if nested is not None:
        raise _HTTPError(400, f"{name}: column {nested!r} holds a JSON {_json_kind(values[nested])}; a catalog value is a "
                              "text, a number, a boolean or null")
    return values


def _json_kind(value: Any) -> str:
    return {dict: "object", list: "list", str: "text", bool: "boolean", type(None): "null"}.get(type(value), "number")


async def _patch_request(request: Request, item_id: str) -> tuple[dict, bytes | None]:
    """A PATCH's changes (a JSON merge patch of catalog columns) and its uploaded photo, if any, checked."""
    content_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    upload = None
    if content_type in ("application/json", "application/merge-patch+json"):
        name, fields = "request body", parse_json("request body", await request.body())
    elif content_type in ("multipart/form-data", "application/x-www-form-urlencoded"):
        form = await _form(request)
        text, file = form.get("metadata"), form.get("image")
        if text is not None and not isinstance(text, str):
            raise _HTTPError(400, "metadata: a form field of JSON text, not a file")
        if file is not None and not hasattr(file, "read"):
            raise _HTTPError(400, "image: a file part (the photo); give an address or a path as `image` in `metadata`")
        upload = await file.read() if file is not None else None
        await form.close()
        name, fields = "metadata", parse_json("metadata", text) if text else {}
    else:
        raise _HTTPError(415, "send the changes as JSON (application/merge-patch+json or application/json), or as "
                              "multipart/form-data with `metadata` (the changes as JSON) and an `image` file")
    fields = _catalog_values(name, fields)
    if "id" in fields and str(fields["id"]) != item_id:
        raise _HTTPError(400, f"{name}: id {fields['id']!r} differs from the id in the URL, {item_id!r}")
    if upload is not None and "image" in fields:
        raise _HTTPError(400, "give the photo once: an uploaded `image` file or an `image` in `metadata`, not both")
    if upload is not None and not upload:
        raise _HTTPError(400, "image: the uploaded file is empty")
    image = fields.get("image")
    if image is not None and not (isinstance(image, str) and image.strip()):
        raise _HTTPError(400, f"image: an http(s) address, a path or null, not {_json_kind(image) if image != '' else 'empty text'}")
    if isinstance(image, str) and "://" in image and not _is_http(image):
        raise _HTTPError(400, f"image: must be an http(s) address with a host name, or a path; got {_short(image)!r}")
    return fields, upload


def _is_http(value: str) -> bool:
    return value[:8].lower().startswith(("http://", "https://"))


def _image_folders(folders: list[str | Path] | None) -> list[Path]:
    """The image folders a write may name files in, resolved; ConfigError for one that is not a folder."""
    resolved = []
    for folder in folders or []:
        path = Path(folder).expanduser().resolve()
        if not path.is_dir():
            raise ConfigError(f"image folder {str(folder)!r}: not a folder")
        resolved.append(path)
    return resolved


def _image_path(value: str, folders: list[Path]) -> str:
    """The file a PATCH's `image` path names, if it lies in one of the image folders once every link is followed; 400
    otherwise, saying the same of a path outside whether or not it exists (the answer tells nothing of other files)."""
    if not folders:
        raise _HTTPError(400, "image: a path, but this server reads no image paths (start it with --image-folder DIR to let "
                              "writes name the image files in DIR); upload the photo, or give its http(s) address")
    given = Path(value)
    candidates = [given] if given.is_absolute() else [folder / given for folder in folders]
    inside = []
    for candidate in candidates:
        try:
            path = candidate.resolve()
        except (OSError, RuntimeError, ValueError):  # a loop of links; a NUL byte
            continue
        if any(path.is_relative_to(folder) for folder in folders):
            inside.append(path)
    if not inside:
        raise _HTTPError(400, f"image: {_short(value)!r} is not in an image folder of this server (--image-folder)")
    found = next((p for p in inside if p.is_file()), None)
    if found is None:
        raise _HTTPError(400, f"image: {_short(value)!r}: no such image file in this server's image folders")
    return str(found)


def _check_image(source: bytes | str, config, field: str, shown: str | None = None) -> None:
    """Refuse a photo that is not a readable image within the catalog's bounds before anything is written (its path,
    a server's, shown as the client gave it)."""
    bounds = config.catalog
    try:
        load_image(source, bounds.max_image_pixels, bounds.max_image_bytes)
    except ImageError as exc:
        text = str(exc) if shown is None else str(exc).replace(str(source), repr(shown))
        raise type(exc)(f"{field}: {text}") from None


def _search_arguments(query: Any) -> dict[str, Any]:
    """The Retriever.search arguments of a request (the photo aside): every option the request model serves."""
    values = {d.name: getattr(query, d.name) for d in declared() if d.option.served}
    return {name: value for name, value in values.items() if value is not None}  # like=0 is an item


def _search_response(query: Any, image, results, facets, started: float, retriever) -> Response:
    from ..query.checks import resolve_mode

    mode = resolve_mode(image, query.text, query.mode, query.like, query.vector)
    took = round((time.perf_counter() - started) * 1e3, 1)
    # The rows serialised once by pandas (NaN -> null), not converted to dicts and back.
    head = {"mode": mode, "count": len(results), "total": results.attrs.get("total"), "offset": query.offset,
            "min_score": results.attrs.get("min_score"), "no_close_match": bool(results.attrs.get("no_close_match")),
            "has_more": bool(results.attrs.get("has_more")), "took_ms": took, "facets": facets}
    rows = _for_clients(results, retriever).to_json(orient="records")
    body = json.dumps(head, default=str)[:-1] + f', "results": {rows}}}'
    return Response(body, media_type="application/json")


def _integer_ids(ids) -> bool:
    import pandas as pd

    return pd.api.types.is_integer_dtype(ids.dtype)


def _for_clients(rows, retriever):
    """Catalog rows as clients see them: an image file by its name only (GET /items/ID/image serves the photo;
    the server's folders, the uploads folder among them, are none of their business), an image URL as it is, and
    null where the item has no photo to show (none, or one that could not be read when it was indexed), so that a
    page asks for no thumbnail that is not there."""
    if "image" not in rows.columns:
        return rows
    photo = retriever.has_image(rows["id"].tolist()) if len(rows) else []
    return rows.assign(image=[_shown_image(v) if shown else None for v, shown in zip(rows["image"], photo)])


def _facets_for_clients(counts: dict | None) -> dict | None:
    if counts and "values" in counts.get("image", {}):  # file names, as in the rows
        counts["image"]["values"] = [{**v, "value": _shown_image(v["value"])} for v in counts["image"]["values"]]
    return counts


def _shown_image(value: Any) -> Any:
    if not isinstance(value, str) or is_url(value):
        return value
    return value.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]  # a Windows path too


def _json_field(name: str, value: str | None) -> Any:
    return None if value in (None, "") else parse_json(name, value)


MAX_JSON_DEPTH = 32  # the deepest request the API defines (a batch's price range) nests 5 levels


def parse_json(name: str, text: str | bytes) -> Any:
    """JSON a client sent (``name``: the body or field, for the errors), nested at most MAX_JSON_DEPTH levels:
    every JSON the app reads comes through here. Python's parser recurses, so deeper nesting would be a
    RecursionError (a 500 from 2 KB of brackets) here or in whatever walks the value next."""
    too_deep = _HTTPError(400, f"{name}: JSON nested more than {MAX_JSON_DEPTH} levels deep")
    try:
        value = json.loads(text, parse_constant=_not_json)  # NaN, Infinity: Python's extension, not JSON
    except RecursionError:
        raise too_deep from None
    except ValueError as exc:
        raise _HTTPError(400, f"{name}: not valid JSON: {exc}") from exc
    level, containers = 1, [value]
    while containers:
        containers = [v for c in containers for v in (c.values() if isinstance(c, dict) else c if isinstance(c, list) else ())
                      if isinstance(v, (dict, list))]
        level += bool(containers)
        if level > MAX_JSON_DEPTH:
            raise too_deep
    return value


def fetch_image_url(url: str, config, policy: str, field: str = "image_url") -> bytes:
    """A photo given by address (in the request's ``field``, which errors name). ``policy`` "public": only from public
    IPs, checked on every hop (redirects too) and connected to as checked (the service must not become a way into the
    network it sits in); "any"; "off": refused."""
    from urllib.parse import urlsplit

    from .. import downloads

    if policy == "off":
        raise _HTTPError(400, f"{field}: photo addresses are turned off on this server; upload the photo instead")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - read for its check: a port out of range is a ValueError
    except ValueError as exc:  # "http://[" (an IPv6 address not closed)
        raise _HTTPError(400, f"{field}: not a valid address: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _HTTPError(400, f"{field}: must be an http(s) address with a host name, got {url!r}")
    cat = config.catalog
    try:
        return downloads.download(url, cat.max_image_bytes, cat.download_timeout_s, downloads.PUBLIC if policy == "public" else None)
    except ImageError as exc:  # named as the field the client sent
        raise type(exc)(f"{field}: {exc}") from exc


async def _parse_search(request: Request, model: type[BaseModel]) -> tuple[Any, bytes | None]:
    content_type = request.headers.get("content-type", "")
    text_fields = _text_fields(model)
    if content_type.startswith("application/json"):
        return _validate(model, parse_json("request body", await request.body()), tuple(model.model_fields)), None
    if content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        form = await _form(request)
        # A form's field holds the field's JSON value (5, true, {"price": ...}) or, for a text field, the text itself;
        # validated as strictly as a JSON body then (a form's "yes" is no boolean, as JSON's "yes" is not).
        fields = {k: v for k, v in form.items() if k != "image" and v != ""}
        for name, value in fields.items():
            if isinstance(value, str) and name not in text_fields:
                fields[name] = _form_value(name, value)
        upload = form.get("image")
        image = await upload.read() if upload is not None and hasattr(upload, "read") else None
        await form.close()
        return _validate(model, fields, (*model.model_fields, "image")), (image or None)
    raise _HTTPError(415, "send JSON (text queries) or multipart/form-data (with an image)")


@lru_cache(maxsize=8)
def _text_fields(model: type[BaseModel]) -> frozenset[str]:
    """The fields of a request model that take a string (a form gives them as they are)."""
    def takes(schema: dict, kinds: tuple[str, ...]) -> bool:
        return schema.get("type") in kinds or any(takes(option, kinds) for option in schema.get("anyOf", ()))

    # A field that takes a number too (min_score: 0.3 or "auto") is read as JSON where it parses as JSON.
    return frozenset(name for name, schema in model.model_json_schema()["properties"].items()
                     if takes(schema, ("string",)) and not takes(schema, ("number", "integer")))


def _form_value(name: str, text: str) -> Any:
    """A form field that is not text: its JSON value. A null, or a number's or boolean's text that is not one,
    stays text, which validation then refuses naming the field."""
    if name in JSON_FORM_FIELDS:
        value = parse_json(name, text)
    else:
        try:
            value = json.loads(text, parse_constant=_not_json)
        except (ValueError, RecursionError):
            return text
        if isinstance(value, (dict, list)):
            return text
    return text if value is None else value


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


async def _form(request: Request):
    """The request's form (multipart or URL-encoded; empty for another body), its text fields UTF-8: Starlette
    reads a field that is not as Latin-1, and a search text or stored metadata would silently become mojibake."""
    from starlette.datastructures import FormData
    from starlette.formparsers import MultiPartException

    content_type = request.headers.get("content-type", "")
    parser = (_Utf8MultiPartParser if content_type.startswith("multipart/form-data") else
              _Utf8FormParser if content_type.startswith("application/x-www-form-urlencoded") else None)
    if parser is None:
        return FormData()
    try:
        return await parser(request.headers, request.stream()).parse()
    except MultiPartException as exc:
        raise _HTTPError(400, f"malformed form data: {exc.message}") from exc
    except Exception as exc:  # python-multipart raises several parser errors
        raise _HTTPError(400, f"malformed form data: {exc}") from exc


def _utf8_field(name: str, data: bytes) -> str:
    from starlette.formparsers import MultiPartException

    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MultiPartException(f"form field {name!r} is not UTF-8 text (byte {data[exc.start]:#04x} at {exc.start}); "
                                 "send form fields as UTF-8") from None


class _Utf8MultiPartParser(MultiPartParser):
    """Starlette's multipart parser, its text fields decoded as UTF-8 or refused."""

    def on_part_end(self) -> None:
        part = self._current_part
        if part.file is not None:
            return super().on_part_end()
        self.items.append((part.field_name, _utf8_field(part.field_name, bytes(part.data))))


class _Utf8FormParser(FormParser):
    """Starlette's URL-encoded form parser, its fields (%-escapes included) decoded as UTF-8 or refused."""

    def on_field_end(self) -> None:
        from urllib.parse import unquote_to_bytes

        super().on_field_end()  # counts the field; decodes it as Latin-1 and its %-escapes leniently
        name = self._items[-1][0]
        self._items[-1] = (name, _utf8_field(name, unquote_to_bytes(bytes(self._field_value).replace(b"+", b" "))))


def _validate(model: type[BaseModel], data: Any, known: tuple[str, ...] = ()) -> Any:
    """Strictly: JSON values carry their types (true is not 1, "5" is not 5), and a form's fields come as JSON values.
    ``known``: the search's fields, which an unknown one's error names the nearest of."""
    try:
        return model.model_validate(data, strict=True)
    except ValidationError as exc:
        raise RequestValidationError(unknown_fields(exc.errors(), known)) from exc


def _thumbnail(source: str, mtime: float, size: int = THUMBNAIL_PX) -> bytes:  # mtime is part of the cache key
    key = (source, mtime, size)
    data = _thumbnails.get(key)
    return data if data is not None else _thumbnails.put(key, render_thumbnail(source, size))


def render_thumbnail(source: str, size: int = THUMBNAIL_PX) -> bytes:
    """A PNG of the image at most `size` pixels on its longer side (uncached)."""
    image = load_image(source)
    image.thumbnail((size, size))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


class _BytesCache:
    """Least recently used values up to a total size in bytes (a count bound let 2,048 thumbnails of up to
    ~200 KB each grow the service by hundreds of MB over a long run). Thread-safe."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes, self.bytes = max_bytes, 0
        self._items: OrderedDict[Any, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Any) -> bytes | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: Any, value: bytes) -> bytes:
        with self._lock:
            if key not in self._items and len(value) <= self.max_bytes:
                self._items[key] = value
                self.bytes += len(value)
                while self.bytes > self.max_bytes:
                    self.bytes -= len(self._items.popitem(last=False)[1])
        return value


_thumbnails = _BytesCache(THUMBNAIL_CACHE_BYTES)


_logged_unreadable: set[str] = set()  # image files the log has named as missing or unreadable


def _mtime(path: str) -> float:
    try:
        return Path(path).stat().st_mtime
    except OSError as exc:
        raise ImageError(f"image file of this item is missing: {exc}") from exc


def _missing(path: str) -> bool:
    """Whether a local image file is not there (as opposed to there but unreadable)."""
    try:
        Path(path).stat()
    except (FileNotFoundError, NotADirectoryError):
        return True
    except OSError:
        return False
    return False


def _short(value: Any) -> Any:
    text = value if isinstance(value, str) else None
    return value if text is None or len(text) <= 200 else text[:200] + "..."


class _HTTPError(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail


def _add_error_handlers(app: FastAPI) -> None:
    statuses = {_HTTPError: None, ItemNotFoundError: 404, LimitError: 422, QueryError: 400, ImageLimitError: 413, ImageError: 400,
                CatalogError: 400, ConfigError: 400}
    for exc_type, status in statuses.items():
        def handler(request: Request, exc: Exception, status=status) -> JSONResponse:
            return JSONResponse({"detail": str(exc)}, status_code=status or exc.status)

        app.add_exception_handler(exc_type, handler)

    async def invalid_request(request: Request, exc: RequestValidationError) -> Response:
        # FastAPI's own handler echoes each input whole and fails on text that is not valid Unicode.
        errors = [{**e, "input": _short(e.get("input"))} for e in exc.errors()]
        return Response(json.dumps({"detail": errors}, default=str), status_code=422, media_type="application/json")

    app.add_exception_handler(RequestValidationError, invalid_request)

    def storage_error(request: Request, exc: StorageError) -> JSONResponse:  # a write that could not be stored
        return JSONResponse({"detail": str(exc)}, status_code=507 if exc.disk_full else 500)

    app.add_exception_handler(StorageError, storage_error)

    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        headers = dict(exc.headers or {})
        if exc.status_code == 405:  # Starlette's Allow names the first route's methods only; a path may have several
            from starlette.routing import Match

            methods = {m for route in app.routes if getattr(route, "methods", None)
                       and route.matches(request.scope)[0] != Match.NONE for m in route.methods}
            headers["Allow"] = ", ".join(sorted(methods))
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=headers)

    app.add_exception_handler(StarletteHTTPException, http_error)


def _mount_docs(app: FastAPI) -> None:
    """Swagger UI 5 (it reads the OpenAPI 3.1 FastAPI writes) at /docs, from the fastapi-offline package: no CDN."""
    import fastapi_offline

    assets = Path(fastapi_offline.__file__).parent / "static"
    app.mount("/docs-assets", StaticFiles(directory=assets), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    def docs():
        return get_swagger_ui_html(openapi_url="/openapi.json", title="multiretrieval API", swagger_favicon_url="data:,",
                                   swagger_js_url="/docs-assets/swagger-ui-bundle.js", swagger_css_url="/docs-assets/swagger-ui.css",
                                   swagger_ui_parameters={"validatorUrl": None})  # no badge fetched from swagger.io


def _version() -> str:
    from .. import __version__

    return __version__
