"""Local web sites for the download tests: pages, images and redirects on a chosen loopback address.

In these tests 127.0.0.2 stands for a public address and 127.0.0.1 for one inside the network
(``SHOP_ONLY`` is the address policy that says so): on Linux all of 127/8 is loopback.
"""

from __future__ import annotations

import http.server
import threading
import time

import pytest

from multiretrieval import downloads

class Site(http.server.ThreadingHTTPServer):
    """A local web site on ``host`` (port 0: any free one): ``routes`` maps a path to an image (bytes) or to
    ("redirect", location[, delay s]). Records each request's path and Host header."""

    daemon_threads = True

    def __init__(self, host: str, routes: dict, port: int = 0) -> None:
        super().__init__((host, port), _SiteHandler)
        self.routes, self.requests = routes, []

    @property
    def port(self) -> int:
        return self.server_address[1]

    def url(self, path: str, host: str | None = None) -> str:
        return f"http://{host or self.server_address[0]}:{self.port}/{path}"


class _SiteHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        site: Site = self.server
        site.requests.append((self.path.lstrip("/"), self.headers.get("Host")))
        route = site.routes.get(self.path.lstrip("/"))
        if isinstance(route, tuple):
            if len(route) > 2:
                time.sleep(route[2])
            self.send_response(302)
            self.send_header("Location", route[1])
            body = b""
        else:
            self.send_response(200 if route is not None else 404)
            body = route or b""
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture()
def sites():
    """Started Site(host, routes, port) servers, shut down after the test."""
    started = []

    def start(host: str, routes: dict, port: int = 0) -> Site:
        try:
            site = Site(host, routes, port)
        except OSError as exc:  # 127.0.0.2 is loopback on Linux, not everywhere
            pytest.skip(f"cannot serve on {host}: {exc}")
        threading.Thread(target=site.serve_forever, daemon=True).start()
        started.append(site)
        return site

    yield start
    for site in started:
        site.shutdown()
        site.server_close()


SHOP_ONLY = downloads.AddressPolicy(lambda ip: str(ip) == "127.0.0.2", "the shop's address")
