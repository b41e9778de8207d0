"""The shop's search page in a real browser: headless Chromium from Debian, driven by Playwright.

Needs the Debian packages chromium and chromium-driver and `pip install playwright`
(never `playwright install`). Skipped where Chromium is missing, except in CI.
The page serves the demo catalog (configs/demo.yaml: category, price and size filters; prices in EUR).
Screenshots go to test-artifacts/.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from .browsing import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS, served, shot

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "data" / "demo" / "catalog.csv"
PAGE = 24  # results per page (app.js)

if not Path(CHROMIUM).exists() and not os.environ.get("CI"):
    pytest.skip("Chromium is not installed (apt-get install chromium chromium-driver)", allow_module_level=True)


@pytest.fixture(scope="module")
def server_url(tmp_path_factory):
    import multiretrieval as mr

    index_dir = tmp_path_factory.mktemp("demo") / "index"
    retriever = mr.Retriever.from_config(ROOT / "configs" / "demo.yaml")
    retriever.index(mr.Catalog.from_csv(DEMO), show_progress=False)
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


@pytest.fixture()
def page(browser, server_url):
    context = browser.new_context(viewport={"width": 1280, "height": 900}, base_url=server_url, locale="en-US")
    page = context.new_page()
    errors = []
    page.expected_statuses = ()  # a test that provokes an error answer names its status here
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    yield page
    context.close()
    unexpected = [e for e in errors if not any(f"status of {s} " in e for s in page.expected_statuses)]
    assert not unexpected, unexpected  # no script error and no failed request (image, script, fetch) on any page


def search(page, text: str) -> None:
    page.goto("/")
    page.fill("#query-text", text)
    page.keyboard.press("Enter")
    wait_for_results(page)


def wait_for_results(page, at_least: int = 1) -> None:
    page.wait_for_function(f"document.getElementById('results').children.length >= {at_least} "
                           "&& !document.getElementById('status').textContent.startsWith('Searching')", timeout=30_000)
    page.wait_for_function("[...document.querySelectorAll('#results img')]"  # lazy images below the fold load later
                           ".every(i => i.complete || i.getBoundingClientRect().top > window.innerHeight)", timeout=30_000)


def titles(page, where: str = "#results") -> list[str]:
    return page.locator(f"{where} .title").all_inner_texts()


def prices(page) -> list[float]:
    return [float(re.sub(r"[^0-9.]", "", p)) for p in page.locator("#results .price").all_inner_texts()]  # "€1,299.99"


def status_count(page) -> int:
    """The number of products the status line gives ("1,234 products"); fails on "24+ products"."""
    match = re.fullmatch(r"([\d,]+) products?", page.inner_text("#status"))
    assert match, page.inner_text("#status")
    return int(match.group(1).replace(",", ""))


def demo_prices():
    import pandas as pd

    return pd.read_csv(DEMO)["price"]


def test_text_query_from_the_keyboard(page):
    page.goto("/")
    page.focus("#query-text")
    page.keyboard.type("a washing machine")
    page.keyboard.press("Enter")
    wait_for_results(page)
    assert len(titles(page)) == PAGE and titles(page)[0] == "Washing machine"
    assert page.evaluate("[...document.querySelectorAll('#results img')].filter(i => i.naturalWidth > 0).length") >= 12
    assert "q=a+washing+machine" in page.url
    shot(page, "text-query")


def test_photo_plus_description(page, tmp_path):
    import multiretrieval as mr
    from multiretrieval.demo import photo_of

    catalog = mr.Catalog.from_csv(DEMO)
    couch = catalog.image_sources()[catalog.df["title"].tolist().index("Futon couch")]
    photo_path = tmp_path / "my-couch.png"
    photo_of(couch).save(photo_path)

    page.goto("/")
    page.fill("#query-text", "bed")
    page.set_input_files("#query-image", str(photo_path))  # choosing a photo searches at once
    page.wait_for_function("document.getElementById('results').dataset.mode === 'fused'", timeout=30_000)
    wait_for_results(page)
    assert page.locator("#preview").is_visible() and page.inner_text("#photo-name") == "my-couch.png"
    assert sum("bed" in t.lower() for t in titles(page)[:5]) >= 4  # "this, but a bed"
    assert page.locator("#results .contrib").count() == len(titles(page))  # photo/words share per result
    named = page.locator("#results .contrib.named")  # the beds the words name: a note, not a "photo only" share bar
    assert named.count() >= 3 and named.first.inner_text() == "✓ matches your words"
    assert "matched by" in page.inner_text("#status") and page.locator("#status .swatch").count() == 2  # and its legend
    assert "photo=1" in page.url
    page.reload()  # the photo is kept for the session: the same fused search comes back
    page.wait_for_function("document.getElementById('results').dataset.mode === 'fused'", timeout=30_000)
    assert page.locator("#preview").is_visible()
    shot(page, "photo-plus-text")


def test_facets_narrow_the_results_and_the_url_follows_back_restores(page):
    search(page, "a chair")
    before = titles(page)
    kitchen = page.locator(".facet[data-column=category] label.option", has_text="Kitchen")
    kitchen.locator("input").check()
    page.wait_for_url(re.compile(r"f=.*Kitchen"), timeout=10_000)
    wait_for_results(page)
    cards = page.locator("#results .card").all_inner_texts()
    assert cards and all("Kitchen" in c for c in cards)
    assert titles(page) != before
    assert page.locator(".facet[data-column=category] label.option", has_text="Kitchen").locator("input").is_checked()
    shot(page, "facet-kitchen")

    page.go_back()
    page.wait_for_url(re.compile(r"^(?!.*f=)"), timeout=10_000)
    wait_for_results(page)
    assert titles(page) == before
    assert not page.locator(".facet[data-column=category] input:checked").count()


def test_a_price_range_filters(page):
    page.goto("/?q=a+table&f=" + '{"price":{"max":100}}'.replace('"', "%22"))
    wait_for_results(page)
    assert prices(page) and max(prices(page)) <= 100


def test_a_single_value_filter_in_the_address_works_as_the_api_takes_it(page):
    page.goto("/?q=a+table&f=" + '{"category":"Kitchen"}'.replace('"', "%22"))
    wait_for_results(page)
    assert page.locator(".facet[data-column=category] label.option", has_text="Kitchen").locator("input").is_checked()


def test_a_filter_that_leaves_nothing_says_what_to_loosen(page):
    page.goto("/?q=a+table&f=" + '{"price":{"min":1000000}}'.replace('"', "%22"))
    page.wait_for_function("document.getElementById('status').textContent.startsWith('No products match')", timeout=20_000)
    assert page.text_content("#status") == "No products match: remove a filter." and not titles(page)
    assert page.locator("#facets input").count() > 0  # the filters to loosen are still there
    legends = page.locator("#facets legend").all_inner_texts()
    assert "Price" in legends and "Category" not in legends  # no bare heading for a column with no value left
    assert page.locator(".facet[data-column=price] input[data-end=min]").input_value() == "1000000"  # the bound in force, though off the slider


def test_a_nonsense_query_says_no_close_matches_and_shows_related_products(page):
    search(page, "quantum entanglement")  # nothing in a furniture shop scores as high as the calibrated floor
    assert page.inner_text("#status") == "No close matches for “quantum entanglement” — showing related products"
    assert len(titles(page)) == PAGE and page.locator("#more").is_hidden()
    shot(page, "no-close-match")
    search(page, "a washing machine")  # a real query: its product, and no such line
    assert titles(page)[0] == "Washing machine" and "No close matches" not in page.inner_text("#status")


def test_show_more_and_reload_keep_the_pages(page):
    search(page, "a lamp")
    first = titles(page)
    assert len(first) == PAGE
    page.click("#more")
    wait_for_results(page, 2 * PAGE)
    assert titles(page)[:PAGE] == first and len(titles(page)) == 2 * PAGE
    assert "pages=2" in page.url
    page.reload()
    wait_for_results(page, 2 * PAGE)
    assert titles(page)[:PAGE] == first


def test_sort_by_price(page):
    search(page, "a sofa")
    page.select_option("#sort", "price")
    page.wait_for_url(re.compile("sort=price"), timeout=10_000)
    wait_for_results(page)
    low_high = prices(page)
    assert low_high == sorted(low_high) and len(low_high) == PAGE
    page.select_option("#sort", "-price")
    page.wait_for_url(re.compile("sort=-price"), timeout=10_000)
    wait_for_results(page)
    assert prices(page) == sorted(prices(page), reverse=True)
    shot(page, "sorted-by-price")


def test_product_view_with_more_like_this_and_this_but(page):
    search(page, "a sofa")
    first = titles(page)[0]
    page.locator("#results .card a").first.click()
    page.wait_for_url(re.compile(r"/items/\d+$"), timeout=10_000)
    page.wait_for_function("document.getElementById('product-title').textContent.length > 0", timeout=30_000)
    assert page.inner_text("#product-title") == first
    page.wait_for_function("document.querySelectorAll('#looks-row .card').length >= 4 && "
                           "document.querySelectorAll('#described-row .card').length >= 4", timeout=30_000)
    assert page.locator("#product-details").inner_text().count("\n") >= 5  # every public column
    page.fill("#but-text", "a bed")
    page.keyboard.press("Enter")
    page.wait_for_function("document.querySelectorAll('#but-row .card').length >= 4", timeout=30_000)
    assert sum("bed" in t.lower() for t in titles(page, "#but-row")[:4]) >= 3  # this sofa, but a bed
    shot(page, "product-view")

    page.reload()  # the product page is a real address
    page.wait_for_function("document.getElementById('product-title').textContent.length > 0", timeout=30_000)
    assert page.inner_text("#product-title") == first
    page.click("#back")
    wait_for_results(page)
    assert titles(page)[0] == first


def test_an_item_without_a_photo_shows_a_placeholder_not_a_broken_picture(page, server_url):
    """An item added without an image: its card and product page say "No photo"; the product page offers neither
    "This, but…" nor "Looks like this", which need a photo, and still shows what is described like it. The page
    knows it from the answer (`image` is null): it asks for no thumbnail, so the console shows no failed request
    (the page fixture fails on one)."""
    import json

    import httpx

    item = 99001  # the demo index has integer ids
    asked = []
    page.on("request", lambda request: asked.append(request.url) if f"/items/{item}/image" in request.url else None)
    added = httpx.post(f"{server_url}/items", data={"metadata": json.dumps({"id": item, "title": "Wicker laundry basket",
                                                                           "category": "Bathroom", "price": 12})})
    assert added.status_code == 201, added.text
    try:
        search(page, "wicker laundry basket")
        first = page.locator("#results .card").first
        assert first.locator(".title").inner_text() == "Wicker laundry basket" and first.locator(".no-photo").is_visible()
        first.locator("a").click()
        page.wait_for_function("document.getElementById('product-title').textContent === 'Wicker laundry basket'", timeout=30_000)
        page.wait_for_function("document.querySelectorAll('#described-row .card').length >= 4", timeout=30_000)
        assert page.locator("#product-no-photo").is_visible() and not page.locator("#product-image").is_visible()
        assert not page.locator("#but-form").is_visible() and not page.locator("#looks-section").is_visible()
        shot(page, "product-without-photo")
        assert not asked  # neither the card nor the product page asked for a photo it does not have
    finally:
        httpx.delete(f"{server_url}/item", params={"id": item})


def price_filter(page) -> dict:
    import json
    from urllib.parse import parse_qs, urlsplit

    return json.loads(parse_qs(urlsplit(page.url).query).get("f", ["{}"])[0]).get("price", {})


def wait_for_count(page, not_text: str) -> None:
    page.wait_for_function(f"(t => /^[\\d,]+ products?$/.test(t) && t !== {not_text!r})"
                           "(document.getElementById('status').textContent)", timeout=30_000)
    wait_for_results(page)


def test_the_price_slider_steps_through_shares_of_the_products_and_bounds_can_be_typed(page, server_url):
    """Prices run from 19.99 to 42,323.99 with a median of 76.99: the slider's steps are the prices' quantiles, so ten
    key presses pass about a tenth of the products (on a linear slider they moved the bound by 10 of 42,324), and the
    boxes take a typed bound. The count after each is exact."""
    import httpx

    quantiles = httpx.get(f"{server_url}/facets", params={"columns": "price"}).json()["price"]["quantiles"]
    stops = sorted(set(quantiles))
    all_prices = demo_prices()
    page.goto("/?q=a+chair&min=off")  # no score floor: every product is ranked
    wait_for_results(page)
    assert status_count(page) == len(all_prices)  # no filter yet
    facet = page.locator(".facet[data-column=price]")
    facet.locator("input[type=range]").nth(1).focus()  # "up to"
    for _ in range(10):
        page.keyboard.press("ArrowLeft")
    page.wait_for_url(re.compile(r"f=.*price"), timeout=10_000)
    wait_for_count(page, f"{len(all_prices):,} products")
    top = stops[-11]
    assert price_filter(page) == {"max": top} and float(facet.locator("input[data-end=max]").input_value()) == top
    left = int((all_prices <= top).sum())
    assert status_count(page) == left and 0.8 * len(all_prices) < left < 0.95 * len(all_prices)  # about a tenth left out
    assert facet.locator("input[type=range]").nth(1).get_attribute("aria-valuetext") == f"€{top:,.2f}"
    shot(page, "price-slider")

    box = facet.locator("input[data-end=min]")
    box.fill("100")
    box.press("Enter")
    page.wait_for_url(re.compile(r"f=.*min"), timeout=10_000)
    wait_for_count(page, f"{left:,} products")
    assert price_filter(page) == {"min": 100, "max": top}
    assert status_count(page) == int(((all_prices >= 100) & (all_prices <= top)).sum())
    assert prices(page) and all(100 <= p <= top for p in prices(page))
    low = page.locator(".facet[data-column=price] input[type=range]").first  # the slider follows the typed bound
    assert stops[int(low.input_value())] == min(v for v in stops if v >= 100)


def test_the_status_gives_the_number_of_matching_products(page, server_url):
    """The exact count of the kitchen items scoring at least the calibrated floor (min_score "auto", the page's
    default), not "24+ products" though the text query's ranking is read only in part for the page."""
    import httpx

    search(page, "a chair")
    unfiltered = status_count(page)
    page.locator(".facet[data-column=category] label.option", has_text="Kitchen").locator("input").check()
    page.wait_for_url(re.compile(r"f=.*Kitchen"), timeout=10_000)
    wait_for_count(page, f"{unfiltered:,} products")
    query = {"text": "a chair", "filters": {"category": ["Kitchen"]}}
    floor = httpx.post(f"{server_url}/search", json=query).json()["min_score"]
    every = httpx.post(f"{server_url}/search", json={**query, "min_score": "off", "k": 1000}).json()["results"]
    assert len(every) == 127 and floor > 0  # the demo's kitchen items
    expected = sum(row["score"] >= floor for row in every)
    assert 0 < expected < 127 and page.inner_text("#status") == f"{expected} products"
    assert page.locator("#more").is_visible() == (expected > PAGE)


def test_prices_are_shown_in_the_shops_currency(page):
    search(page, "a sofa")
    shown = page.locator("#results .price").all_inner_texts()
    assert shown and all(re.fullmatch(r"€[\d,]+\.\d\d", p) for p in shown)  # display.currency: EUR (configs/demo.yaml)
    assert page.locator(".facet[data-column=price] .unit").all_inner_texts() == ["€", "€"]  # beside the typed bounds
    page.locator("#results .card a").first.click()
    page.wait_for_function("document.getElementById('product-price').textContent.length > 0", timeout=30_000)
    assert page.inner_text("#product-price") == shown[0]


def test_scores_and_timings_are_shown_only_with_debug_in_the_address(page):
    search(page, "a sofa")
    assert page.locator("#results .score").count() == 0 and "ms" not in page.inner_text("#status")
    page.goto("/?q=a+sofa&debug=1")
    wait_for_results(page)
    assert page.locator("#results .score").count() == PAGE and re.search(r"\d+ ms", page.inner_text("#status"))
    page.select_option("#sort", "price")  # the page's own addresses keep it
    page.wait_for_url(re.compile("sort=price"), timeout=10_000)
    assert "debug=1" in page.url
    wait_for_results(page)
    assert page.locator("#results .score").count() == PAGE


def test_opening_another_product_starts_it_afresh(page):
    """From a product with words in "This, but…" and its rows shown, a card in "Looks like this" opens another product:
    none of the first one's words, rows or details stay on the page, while the second one loads or after."""
    search(page, "a sofa")
    page.locator("#results .card a").first.click()
    page.wait_for_function("document.querySelectorAll('#looks-row .card').length >= 4", timeout=30_000)
    page.fill("#but-text", "a bed")
    page.keyboard.press("Enter")
    page.wait_for_function("document.querySelectorAll('#but-row .card').length >= 4", timeout=30_000)
    first_title = page.inner_text("#product-title")

    other = page.locator("#looks-row .card a").first
    other_id = other.get_attribute("href").split("?")[0].rsplit("/", 1)[-1]
    other_title = other.locator(".title").inner_text()
    held = []  # the second product's row, held back: what the page shows meanwhile

    def its_row(url: str) -> bool:
        return url.endswith(f"/items/{other_id}")

    page.route(its_row, lambda route: held.append(route))
    other.click()
    while not held:
        page.wait_for_timeout(50)
    assert page.input_value("#but-text") == "" and page.locator("#but-section").is_hidden()
    assert page.locator("#looks-row .card, #described-row .card, #but-row .card").count() == 0
    assert page.inner_text("#product-title") == "" and page.locator("#product-details tr").count() == 0
    held[0].continue_()
    page.unroute(its_row)
    page.wait_for_function("document.querySelectorAll('#looks-row .card').length >= 4", timeout=30_000)
    assert page.inner_text("#product-title") == other_title and first_title
    assert page.input_value("#but-text") == "" and page.locator("#but-section").is_hidden()


@pytest.mark.parametrize("width", [390, 360])
def test_narrow_screens_do_not_scroll_sideways(browser, server_url, width):
    context = browser.new_context(viewport={"width": width, "height": 844}, base_url=server_url)
    page = context.new_page()
    try:
        page.goto("/?q=a+lamp")
        wait_for_results(page)
        assert page.evaluate("document.documentElement.scrollWidth") <= width
        assert page.locator("#results .card").nth(1).bounding_box()["y"] < 844  # more than one result above the fold
        shot(page, f"mobile-{width}")
        page.click("#filters summary")  # closed on a phone; open, the typed bounds and sliders fit the width
        assert page.locator(".facet[data-column=price] input[data-end=max]").is_visible()
        assert page.evaluate("document.documentElement.scrollWidth") <= width
        page.screenshot(path=str(ARTIFACTS / f"browser-mobile-{width}-filters.png"))
        page.click("#filters summary")
        page.locator("#results .card a").first.click()
        page.wait_for_function("document.querySelectorAll('#looks-row .card').length > 0", timeout=30_000)
        assert page.evaluate("document.documentElement.scrollWidth") <= width
        shot(page, f"mobile-{width}-product")
    finally:
        context.close()


def test_a_file_that_is_not_a_picture_gets_a_human_message(page, tmp_path):
    page.expected_statuses = (400,)
    page.goto("/")
    notes = tmp_path / "notes.txt"
    notes.write_text("not a picture")
    page.set_input_files("#query-image", str(notes))
    page.wait_for_function("document.getElementById('status').classList.contains('error')", timeout=10_000)
    assert "not a picture we can read" in page.inner_text("#status")
    assert page.locator("#photo-chip").is_hidden()
    fake = tmp_path / "fake.png"
    fake.write_bytes(b"\x89PNG but not really")
    page.set_input_files("#query-image", str(fake))  # looks like a PNG to the browser; the server refuses it
    page.wait_for_function("document.getElementById('status').textContent.includes('not a picture')", timeout=30_000)
    page.wait_for_function("document.getElementById('preview').hidden", timeout=10_000)  # no broken-image icon in the chip
    assert page.inner_text("#photo-name") == "fake.png"


def test_a_bad_filter_names_the_columns(page):
    page.expected_statuses = (400,)
    page.goto("/?q=sofa&where=colour+%3D+%27red%27")
    page.wait_for_function("document.getElementById('status').classList.contains('error')", timeout=30_000)
    message = page.inner_text("#status")
    assert "filter could not be used" in message and "colour" in message
    assert page.locator("#advanced").get_attribute("open") is not None  # the developer's box is shown with the filter


def test_api_docs_list_the_operations(page):
    page.goto("/docs")
    page.wait_for_selector(".opblock", timeout=30_000)
    listed = " ".join(page.locator(".opblock-summary-path").all_inner_texts())
    for path in ("/search", "/search/batch", "/facets", "/items/{item_id}", "/item/image", "/info"):
        assert path in listed.split() or path in listed
    assert "Unable to render" not in page.content()
    shot(page, "api-docs")
