"""A folder of photos served to a real browser (issue 12, first 'done when': `serve` shows every thumbnail).

Headless Chromium from Debian, driven by Playwright; skipped where Chromium is missing, except in CI.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ..photos import LAMPS, make_photo_folder
from .browsing import CHROMIUM, CHROMIUM_ARGS, served, shot

if not Path(CHROMIUM).exists() and not os.environ.get("CI"):
    pytest.skip("Chromium is not installed (apt-get install chromium chromium-driver)", allow_module_level=True)


def test_every_thumbnail_of_a_photo_folder_shows_in_the_page(tmp_path):
    from playwright.sync_api import sync_playwright

    import multiretrieval as mr

    (tmp_path / "photos").mkdir()
    shown = make_photo_folder(tmp_path / "photos", size=24)  # one page of results (the 200-image folder: test_sources.py)
    retriever = mr.Retriever()
    retriever.index(mr.Catalog.from_folder(tmp_path / "photos"), show_progress=False)
    retriever.save(tmp_path / "idx")

    with served(tmp_path / "idx") as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.goto(url + "/?debug=1&min=off")  # the scores shown; every photo, not only those above the floor
        assert len(shown) <= 24  # one page of results holds them all
        page.fill("#query-text", "a lamp")
        page.focus("#query-text")
        page.keyboard.press("Enter")
        page.wait_for_function("document.getElementById('results').dataset.mode === 'text'", timeout=30_000)
        page.evaluate("window.scrollTo(0, document.body.scrollHeight)")  # lazy images load once in view
        page.wait_for_function("[...document.querySelectorAll('#results img')].every(i => i.complete)", timeout=30_000)
        drawn = page.evaluate("[...document.querySelectorAll('#results img')].filter(i => i.naturalWidth > 0).length")
        scores = [float(s) for s in page.locator("#results .score").all_inner_texts()]
        links = page.evaluate("[...document.querySelectorAll('#results .card a')]"
                              ".map(a => decodeURIComponent(new URL(a.href).pathname.slice('/items/'.length)))")
        titles = page.locator("#results .card .title").all_inner_texts()
        shot(page, "photo-folder")
        browser.close()
    assert drawn == len(shown) == len(links)  # every photo, ids with slashes and spaces included
    assert titles == [Path(i).stem for i in links]  # untitled photos are shown by their file's name, not their path
    assert {shown[i] for i in links[:4]} == set(LAMPS) and all(s > 0 for s in scores[:4])  # the lamps first, above 0


def test_an_untitled_item_is_named_by_the_start_of_its_description(tmp_path, fixtures):
    from playwright.sync_api import sync_playwright

    import pandas as pd

    import multiretrieval as mr

    long = "A tall bamboo laundry hamper with a lid and two rope handles woven by hand"  # a word ends at character 60
    catalog = pd.DataFrame({"id": ["bed", "hamper", "short"], "title": ["Bed", None, None],
                            "description": ["a bed", long, "a small stool"],
                            "image": [str(fixtures / "images" / "bed1.png"), None, None]})
    retriever = mr.Retriever()
    retriever.index(catalog, show_progress=False)
    retriever.save(tmp_path / "idx")
    with served(tmp_path / "idx") as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.goto(url + "/?q=laundry+hamper&min=off")  # the naming, not the floor, is tested here
        page.wait_for_function("document.querySelectorAll('#results .card').length === 3", timeout=30_000)
        titles = page.locator("#results .card .title").all_inner_texts()
        browser.close()
    assert titles[0] == "A tall bamboo laundry hamper with a lid and two rope handles…"  # the words that fit in 60 characters
    assert set(titles[1:]) == {"Bed", "a small stool"}
