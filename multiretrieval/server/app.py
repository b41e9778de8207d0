"""FastAPI app: REST endpoints and the search page, over one saved index folder.

One retriever serves every request: searches run concurrently, writes (add, upsert, remove)
change it in place, one at a time (the retriever's readers-writer lock lets a search see the
index before or after a write, never half of it). A write is acknowledged once it is applied
and appended to the write log (``INDEX_DIR.journal``, fsync'ed); the index folder is saved
(atomically) only at checkpoints: every ``checkpoint_every`` writes and at shutdown, after
which the log is emptied. A restart loads the folder and replays the log, so every
acknowledged write survives a crash, a SIGKILL included.

Item ids are any strings: ``/items/{id}`` takes the id URL-encoded, slashes included
(``/items/lamps%2Fdesk.jpg`` or ``/items/lamps/desk.jpg``), and ``/item?id=...`` takes it as a
query parameter (also for an id that ends in "/image").
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
from typing import Any, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from ..catalog import is_url, load_image
from ..errors import CatalogError, ConfigError, ImageError, ItemNotFoundError, LimitError, QueryError
from ..retriever import MODES, Retriever
from .batching import BatchedImageEncoder, BatchedTextEncoder, MicroBatcher
from .journal import Journal, write_durably

logger = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
THUMBNAIL_PX = 256
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
Mode = Literal["auto", "image", "text", "fused", "zero-shot"]
assert set(Mode.__args__) == set(MODES)  # noqa: S101 - the API and the service take the same modes


class SearchRequest(BaseModel):
    text: str | None = Field(None, description="query text")
    mode: Mode = "auto"
    k: int = Field(10, ge=1, le=1000)
    where: str | None = Field(None, description="SQL condition over catalog columns")
    hybrid: Literal["rrf", "weighted", "off"] | None = Field(None, description="text queries: how keywords and vectors combine")
    keyword_weight: float | None = Field(None, ge=0, le=1, description="text queries: the keywords' share")


class Service:
    """The retriever, the write lock and log, and where uploads go."""

    def __init__(self, index_dir: str | Path, checkpoint_every: int = 1000) -> None:
        self.index_dir = Path(index_dir).resolve()
        # Uploaded images and the write log live beside the index folder: a save replaces the folder itself.
        self.uploads = self.index_dir.with_name(self.index_dir.name + ".uploads")
        self.checkpoint_every = max(1, checkpoint_every)
        self._write_lock = threading.Lock()
        retriever = Retriever.load(self.index_dir)
        self.text_batcher = MicroBatcher(retriever.text_encoder.forward)
        self.image_batcher = MicroBatcher(retriever.image_encoder.forward, max_batch=16)
        self.retriever = self._prepare(retriever)
        saved = int(retriever.saved_note.get("journal_seq", 0))
        self.journal = Journal(self.index_dir.with_name(self.index_dir.name + ".journal"), after=saved)
        self._replay(self.journal.records(after=saved))

    def _prepare(self, retriever: Retriever) -> Retriever:
        """Route the retriever's encoders through the shared micro-batchers and load every model now."""
        embedder = retriever.embedder
        embedder.use_encoders(image=BatchedImageEncoder(embedder.image_encoder, self.image_batcher),
                              text=BatchedTextEncoder(embedder.text_encoder, self.text_batcher))
        embedder.fusion, embedder.zero_shot.text_batch(["warm-up"])  # noqa: B018
        return retriever

    def _replay(self, records: list[dict]) -> None:
        """Apply the logged writes that the saved folder does not hold yet, in order."""
        for record in records:
            try:
                apply(record, self.retriever)
            except Exception as exc:  # noqa: BLE001 - logged writes were valid when made; go on with the rest
                logger.warning("replaying write %d (%s) of %s: %s", record["seq"], record.get("op"), self.journal.path, exc)
        if records:
            logger.info("replayed %d logged writes from %s", len(records), self.journal.path)

    def write(self, record: dict, check=None) -> Any:
        """Apply a write to the retriever, log it (fsync'ed), then answer; ``check(result)`` may refuse it
        first (raising) when the retriever did not take it (a row it skipped changes nothing)."""
        with self._write_lock:
            result = apply(record, self.retriever)
            if check is not None:
                check(result)
            try:
                self.journal.append(record)
            except BaseException:
                logger.exception("cannot log a write; going back to the state on disk")
                self.retriever = self._prepare(Retriever.load(self.index_dir))
                self._replay(self.journal.records(after=int(self.retriever.saved_note.get("journal_seq", 0))))
                raise
            if len(self.journal) >= self.checkpoint_every:
                try:
                    self._checkpoint()
                except Exception:  # noqa: BLE001 - the write is in the log: answer it; the next checkpoint tries again
                    logger.exception("checkpoint of %s failed; the write log keeps every write", self.index_dir)
            return result

    def checkpoint(self) -> None:
        """Save the index folder (atomically) and empty the write log, if anything was written since the last one."""
        with self._write_lock:
            if len(self.journal):
                self._checkpoint()

    def _checkpoint(self) -> None:
        self.retriever.save(self.index_dir, note={"journal_seq": self.journal.last_seq})
        self.journal.reset()
        logger.info("checkpoint: saved %s through write %d", self.index_dir, self.journal.last_seq)

    def drop_unused_upload(self, source: str | Path | None) -> None:
        """Delete an uploaded image that no indexed item uses (its item was removed, or never added)."""
        if source is None or Path(source).parent != self.uploads:
            return
        with self._write_lock:
            if str(source) not in set(self.retriever.image_sources().dropna()):
                Path(source).unlink(missing_ok=True)


def apply(record: dict, retriever: Retriever) -> Any:
    """Carry out one logged write on a retriever: add, upsert (rows of catalog columns) or remove (ids)."""
    import pandas as pd

    op = record["op"]
    if op == "add":
        return retriever.add(pd.DataFrame(record["rows"]))
    if op == "upsert":
        return retriever.upsert(pd.DataFrame(record["rows"]))
    if op == "remove":
        return retriever.remove(record["ids"])
    raise ValueError(f"unknown write {op!r}")


def _refuse_skipped(report) -> None:
    if report.skipped:
        raise _HTTPError(400, str(report.skipped[0]))


def create_app(index_dir: str | Path, api_key: str | None = None, max_upload_bytes: int = 10 * 2**20,
               allowed_hosts: list[str] | None = None, allowed_origins: list[str] | None = None,
               checkpoint_every: int = 1000) -> FastAPI:
    """Build the app for a saved index folder.

    Args:
        index_dir: a folder written by ``Retriever.save`` / ``multiretrieval index``.
        api_key: when set, POST/PUT/DELETE of items need header ``X-API-Key``.
        max_upload_bytes: larger request bodies get 413.
        allowed_hosts: the Host names requests may carry (default: localhost, 127.0.0.1, ::1;
            "*" for any). Others get 400, which stops DNS-rebinding pages from reaching the app.
        allowed_origins: web origins (e.g. "https://shop.example") besides the app's own that
            may send POST/DELETE requests; other origins get 403 (cross-site request forgery).
        checkpoint_every: save the index folder (and empty the write log) after this many writes.
    """
    import contextlib

    import faiss

    # One query searches one vector: FAISS's OpenMP threads would only spin against each other
    # across concurrent requests. Concurrency comes from the request threads instead.
    faiss.omp_set_num_threads(1)
    service = Service(index_dir, checkpoint_every)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await run_in_threadpool(service.checkpoint)  # a clean shutdown leaves no log to replay
        service.journal.close()

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

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    _mount_docs(app)

    @app.get("/health")
    def health() -> dict:
        batching = {name: {"calls": b.calls, "batches": b.batches}
                    for name, b in (("text", service.text_batcher), ("image", service.image_batcher))}
        return {"status": "ok", "items": len(service.retriever), "batching": batching}

    @app.post("/search", openapi_extra=_SEARCH_BODY)
    async def search(request: Request) -> Response:
        """Text queries as JSON; an image (field `image`) plus text, mode, k, where as multipart form.

        Each result's thumbnail is at GET /item/image?id=ID (or /items/ID/image, the id URL-encoded)."""
        query, image = await _parse_search(request)
        retriever = service.retriever
        results = await run_in_threadpool(retriever.search, image=image, text=query.text, mode=query.mode, k=query.k,
                                          where=query.where, hybrid=query.hybrid, keyword_weight=query.keyword_weight)
        mode = query.mode if query.mode != "auto" else ("fused" if image and query.text else "image" if image else "text")
        # Serialised once by pandas (NaN -> null), not converted to dicts and back.
        body = f'{{"mode": {json.dumps(mode)}, "count": {len(results)}, "results": {results.to_json(orient="records")}}}'
        return Response(body, media_type="application/json")

    def item_row(item_id: str) -> dict:
        import pandas as pd

        return json.loads(pd.DataFrame([service.retriever.get(item_id)]).to_json(orient="records"))[0]  # NaN -> null

    def item_thumbnail(item_id: str) -> Response:
        source = service.retriever.image_source(item_id)
        if source is None:
            raise _HTTPError(404, f"item {item_id!r} has no image")
        data = _thumbnail(source, 0.0 if is_url(source) else _mtime(source))  # an image URL is fetched here, not by the browser
        return Response(data, media_type="image/png", headers={"Cache-Control": "public, max-age=3600"})

    async def write(record: dict, check=None) -> Any:
        return await run_in_threadpool(service.write, record, check)

    async def add_or_upsert(request: Request, op: str, item_id: str | None = None) -> dict:
        metadata, path = await _item_upload(request, service, item_id)
        try:
            previous = service.retriever.image_source(metadata["id"]) if op == "upsert" else None
        except (ItemNotFoundError, KeyError):
            previous = None
        try:
            report = await write({"op": op, "rows": [metadata]}, _refuse_skipped)
        except BaseException:
            service.drop_unused_upload(path)
            raise
        if previous != (str(path) if path else None):
            service.drop_unused_upload(previous)  # the image an upsert replaced
        return {"added" if op == "add" else "upserted": report.indexed, "items": len(service.retriever),
                **({"changes": report.changes} if op == "upsert" else {})}

    async def delete(item_id: str) -> dict:
        source = service.retriever.image_source(item_id)  # 404 before taking the write lock
        removed = await write({"op": "remove", "ids": [item_id]})
        service.drop_unused_upload(source)
        return {"removed": removed, "items": len(service.retriever)}

    @app.get("/item")
    def get_item_by_query(id: str) -> dict:  # noqa: A002 - the query parameter is called id
        """An item's catalog row; the id as a query parameter (any string, URL-encoded)."""
        return item_row(id)

    @app.get("/item/image")
    def item_image_by_query(id: str) -> Response:  # noqa: A002
        """An item's thumbnail (PNG, at most 256 px); the id as a query parameter."""
        return item_thumbnail(id)

    @app.delete("/item", dependencies=[Depends(require_key)])
    async def delete_item_by_query(id: str) -> dict:  # noqa: A002
        """Remove an item; the id as a query parameter."""
        return await delete(id)

    @app.put("/item", dependencies=[Depends(require_key)], openapi_extra=_ADD_BODY)
    async def upsert_item_by_query(request: Request, id: str) -> dict:  # noqa: A002
        """Add or replace an item (see PUT /items/{id}); the id as a query parameter."""
        return await add_or_upsert(request, "upsert", id)

    @app.get("/items/{item_path:path}", responses={200: {"content": {"image/png": {}}}})
    def get_item(item_path: str, request: Request) -> Any:
        """``/items/ID``: an item's catalog row; ``/items/ID/image``: its thumbnail (PNG, at most 256 px).
        The id URL-encoded (``lamps%2Fdesk.jpg``); unencoded slashes work too, except in an id that
        itself ends in "/image": for such ids use ``/item?id=``."""
        item_id, thumbnail = _item_path(request, item_path)
        return item_thumbnail(item_id) if thumbnail else item_row(item_id)

    @app.post("/items", dependencies=[Depends(require_key)], status_code=201, openapi_extra=_ADD_BODY)
    async def add_item(request: Request) -> dict:
        """Add one item: multipart with `metadata` (a JSON object with id, title, ...) and an optional `image` file."""
        return await add_or_upsert(request, "add")

    @app.put("/items/{item_id:path}", dependencies=[Depends(require_key)], openapi_extra=_ADD_BODY)
    async def upsert_item(request: Request, item_id: str) -> dict:
        """Add or replace one item (multipart `metadata` and optional `image`, as for POST /items): a new id is
        added, a changed image or text is encoded again, changed metadata alone is updated in place."""
        return await add_or_upsert(request, "upsert", item_id)

    @app.delete("/items/{item_id:path}", dependencies=[Depends(require_key)])
    async def delete_item(item_id: str) -> dict:
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
    try:
        metadata = json.loads(form.get("metadata") or "")
    except ValueError as exc:
        raise _HTTPError(400, f"metadata: not a JSON object: {exc}") from exc
    if not isinstance(metadata, dict) or "image" in metadata:
        raise _HTTPError(400, "metadata: a JSON object of catalog columns, without 'image' (upload the file as `image`)")
    if item_id is not None:
        if "id" in metadata and str(metadata["id"]) != item_id:
            raise _HTTPError(400, f"metadata: id {metadata['id']!r} differs from the id in the URL, {item_id!r}")
        metadata.setdefault("id", item_id)
    upload = form.get("image")
    path = None
    if upload is not None and hasattr(upload, "read"):
        data = await upload.read()
        load_image(data)  # refuse a bad image before anything is written
        service.uploads.mkdir(parents=True, exist_ok=True)
        path = service.uploads / f"{hashlib.sha256(data).hexdigest()}.img"  # the name is ours, never the client's
        write_durably(path, data)  # on disk before the write that names it is logged
        metadata["image"] = str(path)
    return metadata, path


async def _parse_search(request: Request) -> tuple[SearchRequest, bytes | None]:
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("application/json"):
        try:
            body = await request.json()
        except ValueError as exc:
            raise _HTTPError(400, f"request body is not valid JSON: {exc}") from exc
        return _validate(body), None
    if content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        form = await _form(request)
        fields = {k: v for k, v in form.items() if k != "image" and v != ""}
        upload = form.get("image")
        image = await upload.read() if upload is not None and hasattr(upload, "read") else None
        return _validate(fields), (image or None)
    raise _HTTPError(415, "send JSON (text queries) or multipart/form-data (with an image)")


async def _form(request: Request):
    try:
        return await request.form()
    except Exception as exc:  # starlette raises several parser errors
        raise _HTTPError(400, f"malformed form data: {exc}") from exc


def _validate(data: Any) -> SearchRequest:
    try:
        return SearchRequest.model_validate(data)
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


class _HTTPError(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail


def _add_error_handlers(app: FastAPI) -> None:
    statuses = {_HTTPError: None, ItemNotFoundError: 404, LimitError: 422, QueryError: 400, ImageError: 400, CatalogError: 400,
                ConfigError: 400}
    for exc_type, status in statuses.items():
        def handler(request: Request, exc: Exception, status=status) -> JSONResponse:
            return JSONResponse({"detail": str(exc)}, status_code=status or exc.status)

        app.add_exception_handler(exc_type, handler)


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


_SEARCH_BODY = {"requestBody": {"content": {
    "application/json": {"schema": SearchRequest.model_json_schema()},
    "multipart/form-data": {"schema": {"type": "object", "properties": {
        "image": {"type": "string", "format": "binary"}, "text": {"type": "string"},
        "mode": {"type": "string", "enum": list(MODES)}, "k": {"type": "integer"}, "where": {"type": "string"}}}},
}}}
_ADD_BODY = {"requestBody": {"content": {"multipart/form-data": {"schema": {"type": "object", "required": ["metadata"], "properties": {
    "metadata": {"type": "string", "description": "JSON object: id, title, description, metadata columns"},
    "image": {"type": "string", "format": "binary"}}}}}}}
