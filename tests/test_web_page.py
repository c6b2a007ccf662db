"""The web page in a real browser: Debian chromium driven by Playwright, on loopback only."""

import os
import shutil
from pathlib import Path

import pytest

from tests.conftest import REPO, RSSCN7
from tests.service_server import running_service

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = REPO / "artifacts"
# A closed network: no background traffic, no sandbox (root in CI), software rendering.
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
]


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail(f"chromium not found at {CHROMIUM}; .ci/run installs Debian's chromium")
        pytest.skip("Debian chromium is not installed")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        yield b
        b.close()


def _loaded_images(page):
    return page.eval_on_selector_all(
        "#results img", "imgs => imgs.filter(i => i.complete && i.naturalWidth > 0).length"
    )


@pytest.mark.slow
def test_search_page_shows_results_and_searches_by_image(browser, ucm_index):
    ARTIFACTS.mkdir(exist_ok=True)
    with running_service(ucm_index) as url:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(url + "/")
        page.wait_for_function("document.getElementById('status').textContent.includes('images')")
        page.fill("#query", "a river crossing farmland")
        page.press("#query", "Enter")
        page.wait_for_selector("#results .card")
        page.wait_for_function(
            "[...document.querySelectorAll('#results img')]"
            ".every(i => i.complete && i.naturalWidth)"
        )
        assert page.locator("#results .card").count() == 20
        assert _loaded_images(page) == 20
        assert "20 results for" in page.inner_text("#message")
        assert "d = " in page.inner_text("#results .card >> nth=0")
        page.screenshot(path=str(ARTIFACTS / "web-page-text-search.png"), full_page=True)

        first_id = page.get_attribute("#results .card >> nth=0", "data-id")
        page.click("#results .card >> nth=0")
        page.wait_for_function(
            f"document.getElementById('message').textContent.includes('image {first_id}')"
        )
        top = page.get_attribute("#results .card >> nth=0", "data-id")
        assert top == first_id  # an archive image finds itself first (distance 0)

        page.set_input_files("#file", str(RSSCN7 / "gParking" / "g001.jpg"))
        page.wait_for_function(
            "document.getElementById('message').textContent.includes('image g001.jpg')"
        )
        assert page.locator("#results .card").count() == 20
        page.screenshot(path=str(ARTIFACTS / "web-page-image-search.png"), full_page=True)
        page.close()
