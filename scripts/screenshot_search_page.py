"""Take the README's picture of the search page (docs/images/search-page.png).

    multiretrieval index data/demo/catalog.csv --out /tmp/demo-index --config configs/demo.yaml
    python scripts/screenshot_search_page.py /tmp/demo-index [--query "a lamp"] [--filters JSON] [--out docs/images/search-page.png]

Starts `multiretrieval serve INDEX` on a free loopback port, searches in headless Chromium (Debian's
package, driven by Playwright, as tests/server/test_browser.py does) and saves the visible part of the page.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlencode

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_up(url: str, server: subprocess.Popen, seconds: float = 180) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with status {server.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"{url} did not answer within {seconds:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("index_dir")
    parser.add_argument("--query", default="a lamp")
    parser.add_argument("--filters", default='{"category": ["Lights"], "price": {"max": 100}}',
                        help="the page's filters, as JSON (column -> values or {min, max}); '{}' for none")
    parser.add_argument("--out", default=str(ROOT / "docs" / "images" / "search-page.png"))
    parser.add_argument("--width", type=int, default=1200)
    parser.add_argument("--height", type=int, default=800)
    args = parser.parse_args()

    from playwright.sync_api import sync_playwright

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cli = shutil.which("multiretrieval") or str(Path(sys.executable).with_name("multiretrieval"))
    server = subprocess.Popen([cli, "serve", args.index_dir, "--port", str(port), "--no-access-log"])
    try:
        wait_until_up(url, server)
        with sync_playwright() as p:
            chromium = shutil.which("chromium") or "/usr/bin/chromium"
            browser = p.chromium.launch(executable_path=chromium, headless=True,
                                        args=["--no-sandbox", "--disable-gpu", "--no-first-run",
                                              "--disable-background-networking"])
            page = browser.new_page(viewport={"width": args.width, "height": args.height})
            filters = json.loads(args.filters)
            page.goto(url + "/" + (("?" + urlencode({"f": json.dumps(filters)})) if filters else ""))
            page.fill("#query-text", args.query)
            page.keyboard.press("Enter")
            page.wait_for_function("document.getElementById('results').children.length > 0 "
                                   "&& !document.getElementById('status').textContent.startsWith('Searching')", timeout=60_000)
            page.wait_for_function("[...document.querySelectorAll('#results img')]"  # lazy images below the fold load later
                                   ".every(i => i.complete || i.getBoundingClientRect().top > window.innerHeight)",
                                   timeout=60_000)
            page.screenshot(path=args.out)
            browser.close()
    finally:
        server.terminate()
        server.wait(30)
    print(args.out)


if __name__ == "__main__":
    main()
