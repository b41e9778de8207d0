"""The search page in a real browser: headless Chromium from Debian, driven by Playwright.

Needs the Debian packages chromium and chromium-driver and `pip install playwright`
(never `playwright install`). Skipped where Chromium is missing, except in CI.
Screenshots go to test-artifacts/.
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
DEMO = Path(__file__).resolve().parents[2] / "data" / "demo" / "catalog.csv"

if not Path(CHROMIUM).exists() and not os.environ.get("CI"):
    pytest.skip("Chromium is not installed (apt-get install chromium chromium-driver)", allow_module_level=True)


@pytest.fixture(scope="module")
def server_url(tmp_path_factory):
    import uvicorn

    import multiretrieval as mr
    from multiretrieval.server import create_app

    index_dir = tmp_path_factory.mktemp("demo") / "index"
    retriever = mr.Retriever()
    retriever.index(mr.Catalog.from_csv(DEMO), show_progress=False)
    retriever.save(index_dir)

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(index_dir), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(600):
        if server.started:
            break
        time.sleep(0.1)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def page(server_url):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.goto(server_url)
        yield page
        browser.close()


def rendered_thumbnails(page) -> int:
    return page.evaluate("[...document.querySelectorAll('#results img')].filter(i => i.complete && i.naturalWidth > 0).length")


def wait_for_results(page, mode: str) -> None:
    page.wait_for_function(f"document.getElementById('results').dataset.mode === '{mode}'", timeout=30_000)
    page.wait_for_function("[...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)",
                           timeout=30_000)


def test_text_query_from_the_keyboard(page):
    page.focus("#query-text")
    page.keyboard.type("a washing machine")
    page.keyboard.press("Enter")
    wait_for_results(page, "text")
    titles = page.locator("#results .title").all_inner_texts()
    assert len(titles) == 12 and titles[0] == "Washing machine"
    assert rendered_thumbnails(page) == 12
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "browser-text-query.png"), full_page=True)


def test_photo_plus_description(page, tmp_path):
    import multiretrieval as mr
    from multiretrieval.demo import photo_of

    catalog = mr.Catalog.from_csv(DEMO)
    couch = catalog.image_sources()[catalog.df["title"].tolist().index("Futon couch")]
    photo_path = tmp_path / "my-couch.png"
    photo_of(couch).save(photo_path)

    page.fill("#query-text", "bed")
    page.set_input_files("#query-image", str(photo_path))
    page.locator("#preview").wait_for(state="visible", timeout=10_000)  # the change handler runs after set_input_files returns
    page.focus("#query-text")
    page.keyboard.press("Enter")
    wait_for_results(page, "fused")
    titles = page.locator("#results .title").all_inner_texts()
    assert sum("bed" in t.lower() for t in titles[:5]) >= 4  # "this, but a bed"
    assert page.locator("#results .bars").count() == len(titles)  # photo/text contribution per result
    assert rendered_thumbnails(page) == len(titles)
    page.screenshot(path=str(ARTIFACTS / "browser-photo-plus-text.png"), full_page=True)


def test_errors_are_shown(page):
    page.fill("#query-text", "sofa")
    page.fill("#where", "colour = 'red'")
    page.keyboard.press("Enter")
    page.wait_for_function("document.getElementById('status').classList.contains('error')", timeout=10_000)
    assert "colour" in page.inner_text("#status")
    page.fill("#where", "")
