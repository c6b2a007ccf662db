"""The web page's map for scene tiles, in a real browser (Debian chromium via Playwright, loopback):
footprints over the scene's own overview, cards and footprints highlighting each other, and a
drawn box sent as the search's bbox."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from rshash.service import ServiceConfig
from rshash.service.geo_routes import leaflet_dir
from tests.scenes_data import CORNER, FIJI, box_around, mosaic_layout
from tests.service_server import running_service
from tests.test_web_page import ARTIFACTS, CHROMIUM, FLAGS


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail(f"chromium not found at {CHROMIUM}; .ci/run installs Debian's chromium")
        pytest.skip("Debian chromium is not installed")
    if leaflet_dir() is None:
        pytest.fail("Leaflet is not installed in node_modules; run `make setup` (npm ci)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        yield b
        b.close()


def search(page, url: str, query: str) -> None:
    page.goto(url + "/")
    page.wait_for_function("document.getElementById('status').textContent.includes('images')")
    page.fill("#query", query)
    page.press("#query", "Enter")
    page.wait_for_selector("#results .card")


def zoom_to(page, box) -> None:
    """Fit the map to a WGS84 box with room around it, and let it settle."""
    page.evaluate(
        "([w, s, e, n]) => window.geoMap.map.fitBounds([[s, w], [n, e]], {padding: [150, 150]})",
        list(box),
    )
    page.wait_for_timeout(500)


def drag_box(page, box) -> None:
    """Press "Draw a box" and drag from the box's north-west to its south-east corner."""
    minlon, minlat, maxlon, maxlat = box
    points = page.evaluate(
        """([w, s, e, n]) => {
            const m = window.geoMap.map, r = m.getContainer().getBoundingClientRect();
            const a = m.latLngToContainerPoint([n, w]), b = m.latLngToContainerPoint([s, e]);
            return [r.left + a.x, r.top + a.y, r.left + b.x, r.top + b.y];
        }""",
        [minlon, minlat, maxlon, maxlat],
    )
    page.click("#draw-box")
    page.mouse.move(points[0], points[1])
    page.mouse.down()
    page.mouse.move((points[0] + points[2]) / 2, (points[1] + points[3]) / 2, steps=5)
    page.mouse.move(points[2], points[3], steps=5)
    page.mouse.up()


@pytest.mark.slow
def test_map_shows_footprints_highlights_and_sends_the_drawn_box(browser, scene_index):
    """Guards against tile hits without a map, footprints missing or misplaced, the scene overview
    not shown, cards and footprints not linked, and a drawn box not reaching the search request."""
    ARTIFACTS.mkdir(exist_ok=True)
    with running_service(scene_index, ServiceConfig(device="cpu")) as url:
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        search(page, url, "a parking lot")
        assert page.is_visible("#map")
        assert page.locator("path.footprint").count() == 20
        page.wait_for_function(
            "[...document.querySelectorAll('img.scene-overview')]"
            ".filter(i => i.complete && i.naturalWidth).length === 2"
        )
        page.wait_for_function(
            "[...document.querySelectorAll('#results img')]"
            ".every(i => i.complete && i.naturalWidth)"
        )
        page.screenshot(path=str(ARTIFACTS / "web-page-map.png"), full_page=True)

        first = page.get_attribute("#results .card >> nth=0", "data-id")
        page.hover("#results .card >> nth=0")
        assert page.get_attribute(f'path.footprint[data-id="{first}"]', "class").count("hl") == 1
        page.mouse.move(5, 5)
        third = page.get_attribute("#results .card >> nth=2", "data-id")
        page.hover(f'path.footprint[data-id="{third}"]', force=True)
        assert "hl" in page.get_attribute("#results .card >> nth=2", "class").split()

        box = box_around(CORNER)
        zoom_to(page, box)
        with page.expect_request("**/search/text") as request:
            drag_box(page, box)
        sent = request.value.post_data_json["bbox"]
        assert sent == pytest.approx(list(box), abs=2e-5)  # within ~2 m of the drawn corners
        assert page.is_visible("#bbox") and page.locator("path.bbox").count() == 1
        page.close()


@pytest.mark.slow
def test_map_draws_a_scene_across_180_in_place_and_sends_a_crossing_box(browser, fiji_scene_index):
    """Guards against footprints across ±180° drawn the long way round the globe, the scene's
    overview missing there, and a box drawn across ±180° sent with longitudes beyond 180 or as
    minlon < maxlon (the globe minus the box) instead of minlon > maxlon."""
    layout = mosaic_layout(4, shift=2)

    def box(cells):
        return box_around(cells, layout, FIJI["crs"], FIJI["origin"])

    cells = [(r, c) for r in range(2) for c in range(3)]
    west, east = box([(0, 0), (1, 0)])[0], box([(0, 2), (1, 2)])[2]
    _, south, _, north = box(cells)
    assert west > 179.99 and east < -179.99
    with running_service(fiji_scene_index, ServiceConfig(device="cpu")) as url:
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        search(page, url, "a parking lot")
        page.wait_for_function(
            "[...document.querySelectorAll('img.scene-overview')]"
            ".filter(i => i.complete && i.naturalWidth).length === 1"
        )
        scene = page.locator("img.scene-overview").bounding_box()
        assert 100 < scene["width"] < 1280
        drawn = page.locator("path.footprint")
        assert drawn.count() == 16
        for i in range(16):
            b = drawn.nth(i).bounding_box()
            assert 20 < b["width"] < scene["width"] / 3  # a tile, not a band round the globe
            assert scene["x"] <= b["x"] and b["x"] + b["width"] <= scene["x"] + scene["width"]
        page.screenshot(path=str(ARTIFACTS / "web-page-map-antimeridian.png"), full_page=True)

        center = page.evaluate("window.geoMap.map.getCenter().lng")
        shift = 360 * round((center - west) / 360)  # the frame the page draws the scene in
        on_map = (west + shift, south, east + 360 + shift, north)
        zoom_to(page, on_map)
        with page.expect_response("**/search/text") as response:
            drag_box(page, on_map)
        assert response.value.request.post_data_json["bbox"] == pytest.approx(
            [west, south, east, north], abs=2e-5
        )
        found = {hit["id"] for hit in response.value.json()["results"]}
        assert found == {layout.tile_id("fiji", r, c) for r, c in cells}
        assert page.locator("path.bbox").bounding_box()["width"] < 1280
        page.close()
