"""FastAPI app: REST endpoints and the search page, over one saved index folder.

Reads take a snapshot of the current retriever and run concurrently. Writes are
serialised by a lock and copy-on-write: the writer loads a fresh copy of the index,
changes it, saves it to the index folder (atomically), then swaps the snapshot, so a
reader sees the index before or after a write, never half of it.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import secrets
import threading
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field, ValidationError, create_model
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..catalog import load_image
from ..config import SearchConfig
from ..errors import CatalogError, ConfigError, ImageError, ImageLimitError, ItemNotFoundError, LimitError, QueryError
from ..filters import compile_filter
from ..retriever import MODES, Retriever
from .batching import BatchedImageEncoder, BatchedTextEncoder, MicroBatcher

logger = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
THUMBNAIL_PX = 256
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
Mode = Literal["auto", "image", "text", "fused", "zero-shot"]
ItemId = Annotated[str, PathParam(description="the item's catalog id", examples=["575"])]
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
    )


class ErrorResponse(BaseModel):
    detail: str | list[dict[str, Any]] = Field(description="what is wrong: a sentence, or a list of field errors (422)")


class SearchResponse(BaseModel):
    mode: str = Field(description="the mode that ran (auto resolved)")
    count: int
    results: list[dict[str, Any]] = Field(description="rank, id, score, the catalog columns (fused: image_score, text_score)")


class HealthResponse(BaseModel):
    status: str
    items: int
    batching: dict[str, dict[str, int]]


class AddResponse(BaseModel):
    added: int
    items: int


class RemoveResponse(BaseModel):
    removed: int
    items: int


class Service:
    """The current retriever snapshot, the write lock, and where uploads go."""

    def __init__(self, index_dir: str | Path) -> None:
        self.index_dir = Path(index_dir).resolve()
        # Uploaded images live beside the index folder: a save replaces the folder itself.
        self.uploads = self.index_dir.with_name(self.index_dir.name + ".uploads")
        self._write_lock = threading.Lock()
        first = Retriever.load(self.index_dir)
        self.text_batcher = MicroBatcher(first.text_encoder.forward)
        self.image_batcher = MicroBatcher(first.image_encoder.forward, max_batch=16)
        self.retriever = self._prepare(first)

    def _prepare(self, retriever: Retriever) -> Retriever:
        """Route the retriever's encoders through the shared micro-batchers and load every model now."""
        embedder = retriever.embedder
        embedder.use_encoders(image=BatchedImageEncoder(embedder.image_encoder, self.image_batcher),
                              text=BatchedTextEncoder(embedder.text_encoder, self.text_batcher))
        embedder.fusion, embedder.zero_shot.text_batch(["warm-up"])  # noqa: B018
        embedder.count_tokens("warm-up")  # the token counter's tokenizer copy, and the filter parser's import:
        compile_filter("TRUE", {})  # made at start, not in the first request
        return retriever

    def write(self, change) -> Any:
        with self._write_lock:
            fresh = Retriever.load(self.index_dir)
            result = change(fresh)
            fresh.save(self.index_dir)
            self.retriever = self._prepare(fresh)
            return result

    def drop_unused_upload(self, source: str | Path | None) -> None:
        """Delete an uploaded image that no indexed item uses (its item was removed, or never added)."""
        if source is None or Path(source).parent != self.uploads:
            return
        with self._write_lock:
            if str(source) not in set(self.retriever.image_sources().dropna()):
                Path(source).unlink(missing_ok=True)


def create_app(index_dir: str | Path, api_key: str | None = None, max_upload_bytes: int = 10 * 2**20,
               allowed_hosts: list[str] | None = None, allowed_origins: list[str] | None = None) -> FastAPI:
    """Build the app for a saved index folder.

    Args:
        index_dir: a folder written by ``Retriever.save`` / ``multiretrieval index``.
        api_key: when set, POST /items and DELETE /items/{id} need header ``X-API-Key``.
        max_upload_bytes: larger request bodies get 413.
        allowed_hosts: the Host names requests may carry (default: localhost, 127.0.0.1, ::1;
            "*" for any). Others get 400, which stops DNS-rebinding pages from reaching the app.
        allowed_origins: web origins (e.g. "https://shop.example") besides the app's own that
            may send POST/DELETE requests; other origins get 403 (cross-site request forgery).
    """
    import faiss

    # One query searches one vector: FAISS's OpenMP threads would only spin against each other
    # across concurrent requests. Concurrency comes from the request threads instead.
    faiss.omp_set_num_threads(1)
    service = Service(index_dir)
    bounds = service.retriever.config.search
    request_model = search_request_model(bounds)
    app = FastAPI(title="multiretrieval", version=_version(), docs_url=None,
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

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    _mount_docs(app)

    upload = f"request body over {max_upload_bytes:,} bytes (--max-upload-mb)"
    pixels = f"an image over {service.retriever.config.catalog.max_image_pixels:,} pixels (catalog.max_image_pixels)"

    @app.get("/health", response_model=None, responses=_responses({200: (HealthResponse, "status, item count, micro-batching")}))
    def health() -> dict:
        batching = {name: {"calls": b.calls, "batches": b.batches}
                    for name, b in (("text", service.text_batcher), ("image", service.image_batcher))}
        return {"status": "ok", "items": len(service.retriever), "batching": batching}

    @app.post("/search", openapi_extra=_search_body(request_model), responses=_responses({
        200: (SearchResponse, "the results"),
        400: "malformed JSON or form; an empty query; a text that is not valid Unicode; a file that is not an image; "
             "a filter outside the grammar (the answer lists what is allowed and the catalog's columns) or one DuckDB refuses",
        403: "a cross-origin request", 413: f"{upload}; {pixels}", 415: "a body that is neither JSON nor a form",
        422: f"a field over its bound (k over {bounds.max_k:,}, a text over {bounds.max_text_chars:,} characters or "
             f"{bounds.max_text_tokens:,} word pieces, a filter over {bounds.max_where_chars:,} characters), a filter still "
             f"running after {bounds.filter_timeout_s:g} s, an unknown mode, a mode that does not fit the inputs"}))
    async def search(request: Request) -> Response:
        """Text queries as JSON; an image (field `image`) plus text, mode, k, where as multipart form.

        Each result's thumbnail is at GET /items/{id}/image."""
        query, image = await _parse_search(request, request_model)
        retriever = service.retriever
        results = await run_in_threadpool(retriever.search, image=image, text=query.text, mode=query.mode, k=query.k,
                                          where=query.where)
        mode = query.mode if query.mode != "auto" else ("fused" if image and query.text else "image" if image else "text")
        # Serialised once by pandas (NaN -> null), not converted to dicts and back.
        body = f'{{"mode": {json.dumps(mode)}, "count": {len(results)}, "results": {results.to_json(orient="records")}}}'
        return Response(body, media_type="application/json")

    @app.get("/items/{item_id}", response_model=None, responses=_responses({
        200: (dict[str, Any], "the item's catalog row"), 404: "unknown id"}))
    def get_item(item_id: ItemId) -> dict:
        import pandas as pd

        return json.loads(pd.DataFrame([service.retriever.get(item_id)]).to_json(orient="records"))[0]  # NaN -> null

    @app.get("/items/{item_id}/image", response_class=Response, responses=_responses({
        200: ("image/png", "a PNG thumbnail, at most 256 px"), 307: "the item's image URL",
        400: "the item's image file is missing or unreadable", 404: "unknown id, or an item without an image"}))
    def item_image(item_id: ItemId) -> Response:
        source = service.retriever.image_source(item_id)
        if source is None:
            raise _HTTPError(404, f"item {item_id!r} has no image")
        if source.startswith(("http://", "https://")):
            return RedirectResponse(source)
        return Response(_thumbnail(source, _mtime(source)), media_type="image/png",
                        headers={"Cache-Control": "public, max-age=3600"})

    @app.post("/items", dependencies=[Depends(require_key)], status_code=201, openapi_extra=_ADD_BODY,
              response_model=None, responses=_responses({
                  201: (AddResponse, "added"), 401: "missing or wrong X-API-Key", 403: "a cross-origin request",
                  400: "metadata that is not a JSON object of catalog columns; an id already indexed or of another kind; "
                       "a value whose type does not fit its column; a file that is not an image; an item without image or text",
                  413: f"{upload}; {pixels}"}))
    async def add_item(request: Request) -> dict:
        """Add one item: multipart with `metadata` (a JSON object with id, title, ...) and an optional `image` file."""
        form = await _form(request)
        try:
            metadata = json.loads(form.get("metadata") or "")
        except ValueError as exc:
            raise _HTTPError(400, f"metadata: not a JSON object: {exc}") from exc
        if not isinstance(metadata, dict) or "image" in metadata:
            raise _HTTPError(400, "metadata: a JSON object of catalog columns, without 'image' (upload the file as `image`)")
        upload = form.get("image")
        path = None
        if upload is not None and hasattr(upload, "read"):
            data = await upload.read()
            load_image(data)  # refuse a bad image before anything is written
            service.uploads.mkdir(parents=True, exist_ok=True)
            path = service.uploads / f"{hashlib.sha256(data).hexdigest()}.img"  # the name is ours, never the client's
            path.write_bytes(data)
            metadata["image"] = str(path)
        import pandas as pd

        try:
            report = await run_in_threadpool(service.write, lambda r: r.add(pd.DataFrame([metadata])))
            if report.skipped:
                raise _HTTPError(400, str(report.skipped[0]))
        except BaseException:
            service.drop_unused_upload(path)
            raise
        return {"added": report.indexed, "items": len(service.retriever)}

    @app.delete("/items/{item_id}", dependencies=[Depends(require_key)], response_model=None, responses=_responses({
        200: (RemoveResponse, "removed"), 401: "missing or wrong X-API-Key", 403: "a cross-origin request", 404: "unknown id"}))
    async def delete_item(item_id: ItemId) -> dict:
        source = service.retriever.image_source(item_id)  # 404 before taking the write lock
        removed = await run_in_threadpool(service.write, lambda r: r.remove([item_id]))
        service.drop_unused_upload(source)
        return {"removed": removed, "items": len(service.retriever)}

    return app


async def _parse_search(request: Request, model: type[BaseModel]) -> tuple[Any, bytes | None]:
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("application/json"):
        try:
            body = await request.json()
        except ValueError as exc:
            raise _HTTPError(400, f"request body is not valid JSON: {exc}") from exc
        return _validate(model, body), None
    if content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        form = await _form(request)
        fields = {k: v for k, v in form.items() if k != "image" and v != ""}
        upload = form.get("image")
        image = await upload.read() if upload is not None and hasattr(upload, "read") else None
        return _validate(model, fields), (image or None)
    raise _HTTPError(415, "send JSON (text queries) or multipart/form-data (with an image)")


async def _form(request: Request):
    try:
        return await request.form()
    except Exception as exc:  # starlette raises several parser errors
        raise _HTTPError(400, f"malformed form data: {exc}") from exc


def _validate(model: type[BaseModel], data: Any) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from exc


@lru_cache(maxsize=2048)
def _thumbnail(source: str, mtime: float) -> bytes:  # mtime is part of the cache key
    image = load_image(source)
    image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _mtime(path: str) -> float:
    try:
        return Path(path).stat().st_mtime
    except OSError as exc:
        raise ImageError(f"image file of this item is missing: {exc}") from exc


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

    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        headers = dict(exc.headers or {})
        if exc.status_code == 405:  # Starlette's Allow names the first route's methods only; a path may have several
            from starlette.routing import Match

            methods = {m for route in app.routes if getattr(route, "methods", None)
                       and route.matches(request.scope)[0] != Match.NONE for m in route.methods}
            headers["Allow"] = ", ".join(sorted(methods))
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=headers)

    app.add_exception_handler(StarletteHTTPException, http_error)


class RequestGuard:
    """ASGI middleware: refuse requests whose Host is not allowed (DNS rebinding: a web page
    whose name resolves to this machine), and POST/DELETE from other web origins (cross-site
    request forgery: a form on any site can post to a local server).

    Clients that are not browsers send no Origin and pass; browsers always send one on POST.
    """

    SAFE_METHODS = ("GET", "HEAD", "OPTIONS")

    def __init__(self, app, allowed_hosts: list[str], allowed_origins: list[str]) -> None:
        self.app = app
        self.any_host = "*" in allowed_hosts
        self.hosts = {h.lower().strip("[]") for h in allowed_hosts}
        self.origins = {o.lower().rstrip("/") for o in allowed_origins}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        host = headers.get("host", "")
        if not self.any_host and _hostname(host) not in self.hosts:
            return await _send_json(send, 400, f"Host header {host!r} is not allowed; start the server with "
                                               f"--allowed-host {_hostname(host) or 'NAME'} if clients use that name")
        if scope["method"] not in self.SAFE_METHODS:
            origin = headers.get("origin")
            if origin is not None:
                same = origin.lower().rstrip("/") in (f"http://{host}".lower(), f"https://{host}".lower())
                if not same and origin.lower().rstrip("/") not in self.origins:
                    return await _send_json(send, 403, f"requests from origin {origin!r} are refused: writes and searches "
                                                       "come from this app's own page or from clients that are not browsers "
                                                       "(--allowed-origin adds a web origin)")
            elif headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
                return await _send_json(send, 403, "cross-site requests are refused")
        return await self.app(scope, receive, send)


def _hostname(host: str) -> str:
    """The name in a Host header, without the port ("[::1]:8000" -> "::1")."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


async def _send_json(send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` gets 413 before the app reads it."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._reject(send)
        chunks, size, more = [], 0, True
        while more:  # bodies are bounded by max_bytes, so buffering them is safe
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._reject(send)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        sent = False

        async def replay():
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)

    async def _reject(self, send) -> None:
        await _send_json(send, 413, f"request body exceeds the limit of {self.max_bytes:,} bytes")


def _mount_docs(app: FastAPI) -> None:
    """Swagger UI at /docs from the swagger-ui-bundle package: no CDN."""
    try:
        from swagger_ui_bundle import swagger_ui_path
    except ImportError:  # the OpenAPI schema at /openapi.json still works
        return
    app.mount("/docs-assets", StaticFiles(directory=swagger_ui_path), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    def docs():
        return get_swagger_ui_html(openapi_url="/openapi.json", title="multiretrieval API",
                                   swagger_js_url="/docs-assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs-assets/swagger-ui.css", swagger_favicon_url="/docs-assets/favicon-32x32.png")


def _version() -> str:
    from .. import __version__

    return __version__


def _search_body(model: type[BaseModel]) -> dict:
    schema = model.model_json_schema()
    form = {name: {k: v for k, v in field.items() if k != "default"} for name, field in schema["properties"].items()}
    for name in ("text", "where"):  # a form field is a string, never null
        form[name] = {"type": "string", **{k: v for k, v in form[name].items() if k in ("maxLength", "description", "examples")}}
    form["image"] = {"type": "string", "format": "binary", "description": "a photo (JPEG, PNG, WebP, ...)"}
    return {"requestBody": {"content": {"application/json": {"schema": schema},
                                        "multipart/form-data": {"schema": {"type": "object", "properties": form}}}}}


def _responses(described: dict[int, Any]) -> dict[int | str, dict]:
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


_ADD_BODY = {"requestBody": {"content": {"multipart/form-data": {"schema": {"type": "object", "required": ["metadata"], "properties": {
    "metadata": {"type": "string", "description": "JSON object: id, title, description, metadata columns",
                 "examples": ['{"id": 9001, "title": "a desk lamp", "category": "Lights", "price": 25.0}']},
    "image": {"type": "string", "format": "binary"}}}}}}}
