"""Searching by a part of a photo in a real browser (issue 33): the box over an uploaded photo and over a product's
photo, dragged with a mouse and with a finger on a 390 px touch screen (pointer events). Screenshots in test-artifacts/.

Headless Chromium from Debian, driven by Playwright; skipped where Chromium is missing, except in CI.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ..test_regions import scene
from .browsing import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS, served, shot

if not Path(CHROMIUM).exists() and not os.environ.get("CI"):
    pytest.skip("Chromium is not installed (apt-get install chromium chromium-driver)", allow_module_level=True)


@pytest.fixture(scope="module")
def server_url(tmp_path_factory):
    import multiretrieval as mr

    from ..conftest import FIXTURES

    index_dir = tmp_path_factory.mktemp("regions") / "index"
    retriever = mr.Retriever()
    retriever.index(mr.Catalog.from_csv(FIXTURES / "catalog.csv"), show_progress=False)
    retriever.save(index_dir)
    with served(index_dir) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def scene_file(tmp_path_factory, fixtures) -> Path:
    path = tmp_path_factory.mktemp("scene") / "bed-and-car.png"
    scene(fixtures).save(path)  # a bed on the left half, a car on the right
    return path


def screen(page, name: str) -> None:
    """What the screen shows (the editor is a dialog over the page: a full-page shot would not show it whole)."""
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"browser-{name}.png"))


def watched(page):
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    return errors


def first_title(page) -> str:
    """The first result's title once results are shown that were not there at the last call (a search's results)."""
    page.wait_for_function("document.getElementById('results').children.length > 0 "
                           "&& !document.getElementById('results').firstElementChild.dataset.seen "
                           "&& !document.getElementById('status').textContent.startsWith('Searching')", timeout=30_000)
    page.evaluate("document.getElementById('results').firstElementChild.dataset.seen = '1'")  # the next call waits for new ones
    return page.locator("#results .title").first.inner_text()


def box(page) -> list[float]:
    return [float(v) for v in page.get_attribute("#crop-box", "data-box").split(",")]


def stage_point(page, fx: float, fy: float) -> tuple[float, float]:
    """The page coordinates of a point of the photo in the box editor, as fractions of its width and height."""
    r = page.locator("#crop-stage").bounding_box()
    return r["x"] + fx * r["width"], r["y"] + fy * r["height"]


def open_editor(page) -> None:
    page.click("#crop-open")
    page.wait_for_function("document.getElementById('crop-stage').dataset.ready === '1'", timeout=30_000)
    page.wait_for_function("document.getElementById('crop-image').complete", timeout=10_000)


def test_a_box_drawn_and_moved_with_the_mouse_searches_that_part(browser, server_url, scene_file):
    context = browser.new_context(viewport={"width": 1200, "height": 900}, base_url=server_url)
    page = context.new_page()
    errors = watched(page)
    page.goto("/")
    page.set_input_files("#query-image", str(scene_file))
    first_title(page)
    open_editor(page)
    start = box(page)
    assert start != [0, 0, 1, 1] and 0 <= start[0] < start[2] <= 1  # the salient box, not the whole photo
    screen(page, "crop-salient")
    # draw a new box over the car (the right half), outside the current one or across it
    page.mouse.move(*stage_point(page, 0.52, 0.02))
    page.mouse.down()
    page.mouse.move(*stage_point(page, 0.75, 0.5), steps=4)
    page.mouse.move(*stage_point(page, 0.99, 0.98), steps=4)
    page.mouse.up()
    drawn = box(page)
    assert drawn == pytest.approx([0.52, 0.02, 0.99, 0.98], abs=0.02)
    page.click("#crop-search")
    assert first_title(page) == "Smart car"
    assert "crop=0.5" in page.url and page.locator("#crop-dialog").is_hidden()
    assert page.get_attribute("#crop-open", "aria-pressed") == "true"
    # move it by its middle to the bed (the left half): the editor opens on the box searched
    open_editor(page)
    assert box(page) == pytest.approx(drawn, abs=0.002)
    page.mouse.move(*stage_point(page, 0.75, 0.5))
    page.mouse.down()
    page.mouse.move(*stage_point(page, 0.5, 0.5), steps=5)
    page.mouse.move(*stage_point(page, 0.27, 0.5), steps=5)
    page.mouse.up()
    moved = box(page)
    assert moved[0] == pytest.approx(0.04, abs=0.02) and moved[2] - moved[0] == pytest.approx(0.47, abs=0.01)
    page.click("#crop-search")
    assert first_title(page) == "Bed"
    shot(page, "crop-mouse-results")
    page.reload()  # the part is kept with the photo
    assert first_title(page) == "Bed" and "crop=" in page.url
    open_editor(page)
    page.click("#crop-whole")  # back to the whole photo
    page.wait_for_function("!location.search.includes('crop=')", timeout=10_000)
    first_title(page)
    assert page.get_attribute("#crop-open", "aria-pressed") == "false"
    context.close()
    assert not errors, errors


def touch(cdp, kind: str, x: float, y: float) -> None:
    points = [] if kind == "touchEnd" else [{"x": x, "y": y, "id": 1, "radiusX": 8, "radiusY": 8}]
    cdp.send("Input.dispatchTouchEvent", {"type": kind, "touchPoints": points})


def finger_drag(cdp, start: tuple[float, float], end: tuple[float, float], steps: int = 8) -> None:
    touch(cdp, "touchStart", *start)
    for i in range(1, steps + 1):
        touch(cdp, "touchMove", start[0] + (end[0] - start[0]) * i / steps, start[1] + (end[1] - start[1]) * i / steps)
    touch(cdp, "touchEnd", *end)


def test_a_finger_resizes_and_moves_the_box_on_a_390_px_touch_screen(browser, server_url, scene_file):
    context = browser.new_context(viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True,
                                  has_touch=True, base_url=server_url)
    page = context.new_page()
    errors = watched(page)
    cdp = context.new_cdp_session(page)
    page.goto("/")
    page.set_input_files("#query-image", str(scene_file))
    first_title(page)
    page.evaluate("document.getElementById('crop-box').dataset.pointers = ''; document.getElementById('crop-stage')"
                  ".addEventListener('pointerdown', e => document.getElementById('crop-box').dataset.pointers += e.pointerType)")
    page.tap("#crop-open")
    page.wait_for_function("document.getElementById('crop-stage').dataset.ready === '1'", timeout=30_000)
    page.wait_for_function("document.getElementById('crop-image').complete", timeout=10_000)
    sheet = page.locator(".crop-sheet").bounding_box()
    assert sheet["x"] >= 0 and sheet["x"] + sheet["width"] <= 390  # the editor fits the screen
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    stage = page.locator("#crop-stage").bounding_box()
    assert stage["width"] >= 300  # the photo nearly as wide as the phone
    # the finger moves the box by its middle as far right as it goes, then drags its corners to frame the car
    x0, y0, x1, y1 = box(page)
    middle = ((x0 + x1) / 2, (y0 + y1) / 2)
    finger_drag(cdp, stage_point(page, *middle), stage_point(page, middle[0] + 0.9, middle[1]))
    assert page.get_attribute("#crop-box", "data-pointers") == "touch"  # touch pointers, not a mouse
    moved = box(page)
    assert moved[2] == pytest.approx(1.0, abs=0.002) and moved[2] - moved[0] == pytest.approx(x1 - x0, abs=0.002)
    assert moved[1] == pytest.approx(y0, abs=0.002)
    finger_drag(cdp, stage_point(page, moved[0] + 0.01, moved[1] + 0.01), stage_point(page, 0.53, 0.02))
    finger_drag(cdp, stage_point(page, 0.99, moved[3] - 0.01), stage_point(page, 0.99, 0.98))
    assert box(page) == pytest.approx([0.52, 0.01, 1.0, 0.99], abs=0.02)
    screen(page, "crop-touch-390")
    page.tap("#crop-search")
    assert first_title(page) == "Smart car"
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    shot(page, "crop-touch-390-results")
    context.close()
    assert not errors, errors


def test_search_this_part_of_a_products_photo(browser, server_url):
    context = browser.new_context(viewport={"width": 1200, "height": 900}, base_url=server_url)
    page = context.new_page()
    errors = watched(page)
    page.goto("/items/56")  # the sofa
    page.wait_for_function("document.getElementById('product-title').textContent === 'Sofa'", timeout=30_000)
    page.wait_for_function("document.getElementById('product-image').complete", timeout=10_000)
    page.click("#product-crop")
    page.wait_for_function("document.getElementById('crop-stage').dataset.ready === '1'", timeout=30_000)
    salient = box(page)
    assert salient != [0, 0, 1, 1]  # the product's own salient box (POST /salient with like=ID)
    page.mouse.move(*stage_point(page, 0.05, 0.05))
    page.mouse.down()
    page.mouse.move(*stage_point(page, 0.6, 0.95), steps=5)
    page.mouse.up()
    screen(page, "crop-product")
    page.click("#crop-search")
    first_title(page)
    assert "photo=1" in page.url and "crop=0.05" in page.url
    assert page.inner_text("#photo-name") == "Sofa.png" and page.get_attribute("#crop-open", "aria-pressed") == "true"
    assert 1 <= page.locator("#results .title").count() <= 8  # those above the page's score floor
    shot(page, "crop-product-results")
    context.close()
    assert not errors, errors
