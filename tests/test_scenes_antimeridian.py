"""A scene across the antimeridian: RFC 7946 bounds (west > east), exact bbox search on either
side and across ±180°, and GeoJSON footprints cut there into MultiPolygons.

The scene is a real GeoTIFF of real UCM images (tests/scenes_data.py) in PDC Mercator, placed
over Fiji so that 180° runs through the middle of its cell column 1.
"""

from __future__ import annotations

import pytest

from rshash.data.bbox import check_bbox
from rshash.data.scene_geo import signed_area
from rshash.data.scenes import SceneTiles
from rshash.errors import DataError
from rshash.index import Index
from rshash.service.geojson import feature_collection
from tests.scenes_data import FIJI, box_around, mosaic_layout

LAYOUT = mosaic_layout(4, shift=2)
CELLS = [(r, c) for r in range(4) for c in range(4)]


def ids(cells: list[tuple[int, int]]) -> set[str]:
    return {LAYOUT.tile_id("fiji", r, c) for r, c in cells}


def box(cells: list[tuple[int, int]]) -> tuple[float, float, float, float]:
    return box_around(cells, LAYOUT, FIJI["crs"], FIJI["origin"])


@pytest.fixture(scope="module")
def fiji_index(fiji_scene_index):
    return Index.open(fiji_scene_index, device="cpu")


def test_tiles_across_180_get_rfc7946_bounds_and_counter_clockwise_rings(fiji_scene):
    """Guards against min/max of longitudes giving a tile across ±180° bounds that span the
    globe, and its ring oriented on raw longitudes (clockwise once unwrapped)."""
    tiles = SceneTiles(fiji_scene)
    assert set(tiles.image_ids) == ids(CELLS)
    for i in range(len(tiles)):
        rec = tiles.image_record(i)
        west, south, east, north = rec["bounds_wgs84"]
        col = (rec["window"]["col"] - LAYOUT.margin) // 256
        lons = [x for x, _ in rec["footprint_wgs84"]]
        assert all(-180 <= x <= 180 for x in lons) and -16.85 < south < north < -16.75
        if col == 1:
            assert 179.999 < west < 180 and -180 < east < -179.999  # 0.0007° wide, not 359.9°
            unwrapped = [x + 360 if x < 0 else x for x, _ in rec["footprint_wgs84"]]
            ring = [[x, y] for x, (_, y) in zip(unwrapped, rec["footprint_wgs84"], strict=True)]
            assert signed_area(ring) > 0
        else:
            assert west < east and (west > 179.99 if col == 0 else east < -179.99)
            assert signed_area(rec["footprint_wgs84"]) > 0


def test_bbox_search_is_exact_on_either_side_and_across_180(fiji_index):
    """Guards against tiles across ±180° matching every box at their latitudes (bounds from -180
    to 180), boxes just east of 180° missing them, and boxes across ±180° (minlon > maxlon)
    being refused or read as the globe minus the box."""

    def found(bbox: tuple[float, float, float, float]) -> set[str]:
        return {h.id for h in fiji_index.search_text("a parking lot", k=100, bbox=bbox)}

    east = [(r, c) for r, c in CELLS if c >= 2]
    assert max(box(east)[0], box(east)[2]) < -179.99
    assert found(box(east)) == ids(east)
    west = [(r, 0) for r in range(4)]
    assert min(box(west)[0], box(west)[2]) > 179.99
    assert found(box(west)) == ids(west)

    _, south, _, north = box(CELLS)
    just_east = (-180.0, south, -179.99999, north)  # a metre east of 180°: column 1 only
    assert found(just_east) == ids([(r, 1) for r in range(4)])
    row0_w, row0_s, _, row0_n = box([(0, 0)])
    row0_e = box([(0, 3)])[2]
    assert found((row0_w, row0_s, row0_e, row0_n)) == ids([(0, c) for c in range(4)])
    assert found((0.0, -18.0, 1.0, -16.0)) == set()
    assert found((179.0, -18.0, -179.0, -16.0)) == ids(CELLS)
    assert found((-180.0, -18.0, 180.0, -16.0)) == ids(CELLS)


def test_geojson_cuts_footprints_across_180_into_a_multipolygon(fiji_index):
    """Guards against a footprint across ±180° written as one Polygon, which GIS tools draw
    around the globe the other way: it must be a MultiPolygon of its two sides, each ring closed,
    counter-clockwise, within [-180, 180] and meeting the meridian."""
    hits = fiji_index.search_text("a parking lot", k=16)
    features = {f["id"]: f for f in feature_collection(h.to_dict() for h in hits)["features"]}
    for r in range(4):
        f = features[LAYOUT.tile_id("fiji", r, 1)]
        assert f["geometry"]["type"] == "MultiPolygon"
        assert f["bbox"][0] > f["bbox"][2]
        parts = [polygon[0] for polygon in f["geometry"]["coordinates"]]
        assert len(parts) == 2
        for ring in parts:
            lons = [x for x, _ in ring]
            assert ring[0] == ring[-1] and signed_area(ring) > 0
            assert all(-180 <= x <= 180 for x in lons)
            assert all(x > 179.999 for x in lons) or all(x < -179.999 for x in lons)
            assert 180.0 in lons or -180.0 in lons
    other = features[LAYOUT.tile_id("fiji", 0, 2)]
    assert other["geometry"]["type"] == "Polygon"


def test_bbox_rule_accepts_minlon_above_maxlon_as_crossing():
    """Guards against a box across ±180° refused, and out-of-range boxes let through."""
    assert check_bbox([179.5, -17, -179.5, -16]) == (179.5, -17.0, -179.5, -16.0)
    with pytest.raises(DataError, match="crosses the antimeridian"):
        check_bbox([181, 0, 1, 1], "--bbox")
    with pytest.raises(DataError, match="minlat ≤ maxlat"):
        check_bbox([0, 2, 1, 1])


def test_overview_of_a_scene_across_180_is_placed_across_it(fiji_scene_index):
    """Guards against the scene overview failing across ±180° (a Web Mercator warp spanning the
    globe with zero height), and its bounds not enclosing the scene's footprints once unwrapped."""
    import io

    import httpx
    import numpy as np
    from PIL import Image

    from rshash.data.bbox import lon_span
    from rshash.service import ServiceConfig
    from tests.service_server import running_service

    item = LAYOUT.tile_id("fiji", 1, 1)
    with running_service(fiji_scene_index, ServiceConfig(device="cpu")) as url:
        info = httpx.get(f"{url}/scenes/overview", params={"item": item})
        assert info.status_code == 200, info.text
        west, south, east, north = info.json()["bounds_wgs84"]
        png = httpx.get(url + info.json()["image"])
        fc = httpx.post(
            f"{url}/search/text", json={"query": "a parking lot", "k": 16, "format": "geojson"}
        ).json()
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(png.content))
    assert image.mode == "RGBA" and max(image.size) == 1024 and min(image.size) > 900
    alpha = np.asarray(image)[..., 3]
    assert alpha[image.size[1] // 2, image.size[0] // 2] == 255 and alpha[5, 5] == 0

    lo, hi = lon_span(west, east)
    assert west > east and 0.004 < hi - lo < 0.0045  # 0.0041° wide, not the globe
    lons = [x + 360 if x < 0 else x for f in fc["features"] for x in f["bbox"][::2]]
    lats = [y for f in fc["features"] for y in f["bbox"][1::2]]
    assert len(lons) == 32 and lo < min(lons) and max(lons) < hi
    assert south < min(lats) and max(lats) < north
