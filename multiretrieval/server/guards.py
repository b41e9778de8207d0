"""ASGI middleware in front of the app: which requests it refuses before any route runs."""

from __future__ import annotations

import json

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


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
        if not self.any_host and hostname(host) not in self.hosts:
            return await send_json(send, 400, f"Host header {host!r} is not allowed; start the server with "
                                               f"--allowed-host {hostname(host) or 'NAME'} if clients use that name")
        if scope["method"] not in self.SAFE_METHODS:
            origin = headers.get("origin")
            if origin is not None:
                same = origin.lower().rstrip("/") in (f"http://{host}".lower(), f"https://{host}".lower())
                if not same and origin.lower().rstrip("/") not in self.origins:
                    return await send_json(send, 403, f"requests from origin {origin!r} are refused: writes and searches "
                                                       "come from this app's own page or from clients that are not browsers "
                                                       "(--allowed-origin adds a web origin)")
            elif headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
                return await send_json(send, 403, "cross-site requests are refused")
        return await self.app(scope, receive, send)


def hostname(host: str) -> str:
    """The name in a Host header, without the port ("[::1]:8000" -> "::1")."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


async def send_json(send, status: int, detail: str) -> None:
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
        await send_json(send, 413, f"request body exceeds the limit of {self.max_bytes:,} bytes")
