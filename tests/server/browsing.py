"""What the browser tests share: Debian's Chromium, the app served on a free loopback port, screenshots."""

from __future__ import annotations

import contextlib
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


@contextlib.contextmanager
def served(index_dir: Path) -> Iterator[str]:
    """The app over ``index_dir`` in a uvicorn thread on 127.0.0.1 (a free port); yields its URL."""
    import uvicorn

    from multiretrieval.server import create_app

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(index_dir), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(600):
        if server.started:
            break
        time.sleep(0.1)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)


def shot(page, name: str) -> None:
    """A full-page screenshot, test-artifacts/browser-NAME.png."""
    ARTIFACTS.mkdir(exist_ok=True)
    page.evaluate("window.scrollTo(0, 0)")  # else the sticky header is drawn where the page was scrolled to
    page.screenshot(path=str(ARTIFACTS / f"browser-{name}.png"), full_page=True)
