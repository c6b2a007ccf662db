"""Search by place: `bbox` on scene tiles through the API, the CLI and the service.

These need the store branch's filtered search (`search_*(..., bbox=...)`, an R*Tree over each
record's `bounds_wgs84`); the scene tiles, their records and the `--bbox`/`bbox` plumbing are
the geo branch's.
"""

from __future__ import annotations

import json

import httpx
import pytest

from rshash.index import Index
from rshash.service import ServiceConfig
from tests.conftest import UCM, rshash_cli
from tests.scenes_data import CORNER, CORNER_IDS, MUNICH, box_around, mosaic_layout
from tests.service_server import running_service
from tests.test_scenes_web import browser as chromium
from tests.test_scenes_web import drag_box, search, zoom_to

browser = chromium  # the map tests' Chromium fixture, under the name tests ask for

MOSAIC = mosaic_layout()


def test_bbox_around_a_corner_returns_only_that_corners_tiles(scene_index):
    """Guards against the bbox filter being ignored, applied after the top-k (too few hits), or
    comparing [lat, lon] against [lon, lat]."""
    index = Index.open(scene_index, device="cpu")
    hits = index.search_text("a parking lot", k=50, bbox=box_around(CORNER))
    assert {h.id for h in hits} == CORNER_IDS


def test_text_query_in_a_box_finds_the_parking_lot_there(scene_index):
    """Guards against the filter dropping the best match: 'a parking lot' in a box around one
    parking-lot cell and its neighbours ranks that cell first."""
    index = Index.open(scene_index, device="cpu")
    r, c = MOSAIC.cells_of("parkinglot")[2]
    near = [(r + dr, c + dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1)]
    hits = index.search_text("a parking lot", k=5, bbox=box_around(near))
    assert hits[0].id == MOSAIC.tile_id("mosaic", r, c)
    assert {h.id for h in hits} <= {MOSAIC.tile_id("mosaic", *cell) for cell in near}


def test_bbox_in_another_crs_keeps_only_that_scene(scene_index):
    """Guards against footprints of scenes in another CRS left unprojected (UTM 32N metres read as
    degrees): a box around the Munich scene returns its 16 tiles only."""
    small = mosaic_layout(4, shift=1)
    cells = [(r, c) for r in range(4) for c in range(4)]
    box = box_around(cells, small, MUNICH["crs"], MUNICH["origin"])
    hits = Index.open(scene_index, device="cpu").search_text("a parking lot", k=100, bbox=box)
    assert {h.item["scene"] for h in hits} == {"munich"} and len(hits) == 16


def test_cli_and_service_pass_the_bbox(scene_index):
    """Guards against `--bbox` and the request's `bbox` not reaching the search (text and image
    queries), and GeoJSON answers ignoring it."""
    box = box_around(CORNER)
    done = rshash_cli(
        "search", scene_index, "a parking lot", "-k", 50, "--format", "geojson",
        "--bbox", ",".join(map(str, box)), "--device", "cpu",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert {f["id"] for f in json.loads(done.stdout)["features"]} == CORNER_IDS

    with running_service(scene_index, ServiceConfig(device="cpu")) as url:
        body = {"query": "a parking lot", "k": 50, "bbox": list(box)}
        answer = httpx.post(f"{url}/search/text", json=body).json()
        assert {r["id"] for r in answer["results"]} == CORNER_IDS
        with open(UCM / "images" / "1501.jpg", "rb") as f:
            answer = httpx.post(
                f"{url}/search/image",
                files={"file": ("1501.jpg", f, "image/jpeg")},
                data={"k": "50", "bbox": ",".join(map(str, box)), "format": "geojson"},
            ).json()
        assert {f["id"] for f in answer["features"]} == CORNER_IDS


@pytest.mark.slow
def test_box_drawn_on_the_map_filters_the_hits(browser, scene_index):
    """Guards against the page's drawn box not filtering: after drawing a box around one corner
    of the mosaic, every card shown is a tile of that corner."""
    with running_service(scene_index, ServiceConfig(device="cpu")) as url:
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        search(page, url, "a parking lot")
        box = box_around(CORNER)
        zoom_to(page, box)
        with page.expect_response("**/search/text") as response:
            drag_box(page, box)
        assert response.value.ok
        page.wait_for_function(
            "document.getElementById('message').textContent.includes('9 results')"
        )
        ids = page.eval_on_selector_all("#results .card", "cs => cs.map(c => c.dataset.id)")
        assert set(ids) == CORNER_IDS
        assert page.locator("path.footprint").count() == 9
        page.close()
