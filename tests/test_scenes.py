"""GeoTIFF scenes as tiles: pixels, places, stretch, bad input, the index, CLI, GeoJSON, service.

Every scene is a real GeoTIFF written with rasterio from real UCM images (tests/scenes_data.py),
so each tile's expected pixels and coordinates are known.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from affine import Affine
from PIL import Image
from pyproj import Transformer

from rshash.data.scene_geo import signed_area
from rshash.data.scene_pixels import read_tile
from rshash.data.scenes import SceneTiles, TileConfig, tile_starts
from rshash.errors import DataError
from rshash.service.geojson import feature_collection
from tests.conftest import rshash_cli
from tests.scenes_data import (
    ACQUIRED,
    CELL,
    CRS,
    UCM,
    mosaic_layout,
    scene_folder,
)

MOSAIC = mosaic_layout()


def ucm_pixels(number: int) -> np.ndarray:
    return np.asarray(Image.open(UCM / "images" / f"{number}.jpg").convert("RGB")).astype(int)


def cell_ring(r: int, c: int, layout=MOSAIC) -> list[list[float]]:
    minx, miny, maxx, maxy = layout.cell_bounds(r, c)
    return [[minx, maxy], [minx, miny], [maxx, miny], [maxx, maxy], [minx, maxy]]


def test_tiles_are_the_mosaic_cells_at_their_places(scene_files):
    """Guards against tiles cut at the wrong window, nodata margin tiles kept, footprints or
    WGS84 coordinates off (axis order, wrong corner), and the date/resolution/CRS not recorded."""
    tiles = SceneTiles(scene_files["mosaic"])
    assert len(tiles) == MOSAIC.grid**2  # the 44 tiles of the nodata margin are skipped
    to_utm = Transformer.from_crs("EPSG:4326", CRS, always_xy=True)
    for r in range(MOSAIC.grid):
        for c in range(MOSAIC.grid):
            i = tiles.image_ids.index(MOSAIC.tile_id("mosaic", r, c))
            rec = tiles.image_record(i)
            assert np.array(rec["footprint"]) == pytest.approx(np.array(cell_ring(r, c)))
            lon, lat = np.array(rec["footprint_wgs84"]).T
            x, y = to_utm.transform(lon, lat)
            assert pytest.approx(np.array(cell_ring(r, c)), abs=0.01) == np.array([x, y]).T
            assert rec["bounds_wgs84"] == [lon.min(), lat.min(), lon.max(), lat.max()]
            assert rec["window"] == {
                "row": MOSAIC.offset(r, c)[0],
                "col": MOSAIC.offset(r, c)[1],
                "width": CELL,
                "height": CELL,
            }
    rec = tiles.image_record(0)
    assert (rec["crs"], rec["resolution_m"], rec["acquired"]) == (CRS, 0.3, ACQUIRED)
    assert (rec["bands"], rec["stretch"], rec["class"], rec["scene"]) == (
        [1, 2, 3],
        None,
        None,
        "mosaic",
    )
    assert -117.02 < rec["bounds_wgs84"][0] < -116.99 and 33.95 < rec["bounds_wgs84"][1] < 33.99
    for r, c in [(0, 0), (4, 7), (9, 9)]:
        i = tiles.image_ids.index(MOSAIC.tile_id("mosaic", r, c))
        expected = np.maximum(ucm_pixels(MOSAIC.image(r, c)), 1)  # 0 is the nodata value
        assert (np.asarray(tiles.load_image(i)).astype(int) == expected).all()
        assert (np.asarray(read_tile(tiles.image_record(i))).astype(int) == expected).all()


def test_sixteen_bit_scene_is_stretched_once_for_the_whole_scene(scene_files):
    """Guards against a per-tile stretch (tiles of one scene inconsistent), a stretch far from the
    scene's own percentiles, band order ignored, and 16-bit values cut to 8 bits."""
    import rasterio

    tiles = SceneTiles(scene_files["mosaic16"], TileConfig(bands=(3, 2, 1)))
    assert len(tiles) == MOSAIC.grid**2
    stretches = {json.dumps(tiles.image_record(i)["stretch"]) for i in range(len(tiles))}
    assert len(stretches) == 1
    stretch = np.array(json.loads(stretches.pop()))
    with rasterio.open(scene_files["mosaic16"]) as src:
        full = src.read([3, 2, 1])
    valid = (full != 0).all(axis=0)
    exact = np.array([np.percentile(b[valid], [2, 98]) for b in full])
    assert np.abs(stretch - exact).max() < 0.02 * (exact[:, 1] - exact[:, 0]).max()
    for r, c in [(0, 0), (6, 3)]:
        i = tiles.image_ids.index(MOSAIC.tile_id("mosaic16", r, c))
        got = np.asarray(tiles.load_image(i)).astype(float)
        row, col = MOSAIC.offset(r, c)
        raw = full[:, row : row + CELL, col : col + CELL].astype(float).transpose(1, 2, 0)
        want = np.clip((raw - stretch[:, 0]) * 255 / (stretch[:, 1] - stretch[:, 0]), 0, 255)
        assert np.abs(got - want).max() <= 1.0
        assert np.corrcoef(got.ravel(), ucm_pixels(MOSAIC.image(r, c)).ravel())[0, 1] > 0.99


def test_cog_gives_the_same_tiles_as_the_plain_geotiff(scene_files):
    """Guards against the cloud-optimised layout (512-px blocks, overviews) changing what a tile
    holds or where it is."""
    plain, cog = SceneTiles(scene_files["mosaic"]), SceneTiles(scene_files["cog"])
    windows = [i.split("/")[1] for i in plain.image_ids]
    assert sorted(i.split("/")[1] for i in cog.image_ids) == sorted(windows)
    for i in (0, 37, 99):
        j = cog.image_ids.index("mosaic-cog/" + windows[i])
        assert cog.image_record(j)["footprint_wgs84"] == plain.image_record(i)["footprint_wgs84"]
        assert np.array_equal(np.asarray(cog.load_image(j)), np.asarray(plain.load_image(i)))


def test_rotated_scene_footprints_come_from_all_four_corners(scene_files):
    """Guards against footprints built from two corners (an axis-aligned box): a rotated scene's
    tiles are rotated quadrilaterals, their rings closed and counter-clockwise."""
    import rasterio

    tiles = SceneTiles(scene_files["rotated"])
    with rasterio.open(scene_files["rotated"]) as src:
        transform: Affine = src.transform
    assert len(tiles) == 9
    for i in range(len(tiles)):
        rec = tiles.image_record(i)
        row, col = rec["window"]["row"], rec["window"]["col"]
        corners = [(col, row), (col, row + CELL), (col + CELL, row + CELL), (col + CELL, row)]
        expected = [list(transform @ p) for p in corners]
        ring = rec["footprint"]
        assert ring[0] == ring[-1]
        assert np.array(ring[:-1]) == pytest.approx(np.array(expected), abs=1e-3)
        assert signed_area(ring) > 0 and signed_area(rec["footprint_wgs84"]) > 0
        area = abs(signed_area(ring))
        assert area == pytest.approx((CELL * 0.3) ** 2, rel=1e-4)
        lons = [p[0] for p in rec["footprint_wgs84"]]
        lats = [p[1] for p in rec["footprint_wgs84"]]
        assert rec["bounds_wgs84"] == [min(lons), min(lats), max(lons), max(lats)]
        assert len({round(x, 6) for x in lons}) == 4  # no two corners share a longitude


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("plain", "no georeferencing"),
        ("small", "200 x 200 px is smaller than one 256-px tile"),
        ("truncated", "truncated file (image data runs to byte"),
        ("cut_header", "not a readable GeoTIFF"),
        ("not_tiff", "not a readable GeoTIFF"),
    ],
)
def test_bad_scene_is_refused_with_one_line_naming_the_file(scene_files, tmp_path, name, expected):
    """Guards against a bad scene being half-read, crashing with a traceback, or failing silently
    among good ones: the whole folder is refused, naming the file."""
    folder = scene_folder(tmp_path, "scenes", scene_files["munich"], scene_files[name])
    with pytest.raises(DataError) as err:
        SceneTiles(folder)
    message = str(err.value)
    assert message.startswith(str(folder / scene_files[name].name))
    assert expected in message and "\n" not in message


def test_corrupt_block_fails_the_add_and_leaves_the_index_as_it_was(
    scene_index, scene_files, tmp_path
):
    """Guards against a scene that passes the scan but has a corrupt block deep inside leaving
    a half-added index: the add fails naming the file, and the index is unchanged."""
    import shutil

    from rshash.index import Index
    from rshash.index.build import BuildConfig, add_to_index

    index = tmp_path / "index"
    shutil.copytree(scene_index, index)
    before = (index / "index.json").read_text()
    tiles = SceneTiles(scene_files["corrupt"])  # header, block table and overviews are fine
    with pytest.raises(DataError) as err:
        add_to_index(index, tiles, BuildConfig(device="cpu"), progress=False)
    assert str(err.value).startswith(str(scene_files["corrupt"].resolve()))
    assert "cannot read window" in str(err.value) and "\n" not in str(err.value)
    assert (index / "index.json").read_text() == before
    assert len(Index.open(index, device="cpu")) == 116


def test_stride_overlaps_tiles_and_the_last_tile_meets_the_edge(scene_files):
    """Guards against a stride ignored, windows outside the scene, or the strip at the right and
    bottom edges left out when the scene is not a whole number of tiles."""
    assert tile_starts(1000, 256, 256) == [0, 256, 512, 744]
    assert tile_starts(512, 256, 128) == [0, 128, 256]
    tiles = SceneTiles(scene_files["munich"], TileConfig(tile=200, stride=100))
    windows = [tiles.image_record(i)["window"] for i in range(len(tiles))]
    size = mosaic_layout(4).size
    assert all(w["row"] + 200 <= size and w["col"] + 200 <= size for w in windows)
    assert len(set(tiles.image_ids)) == len(tiles)
    cols = sorted({w["col"] for w in windows})
    assert 100 in np.diff(cols)  # overlapping windows
    with pytest.raises(DataError, match="--bands asks for band 4, scene has 3"):
        SceneTiles(scene_files["munich"], TileConfig(bands=(4, 3, 2)))


def test_text_query_finds_the_parking_lots_at_their_coordinates(scene_index):
    """Guards against tiles encoded from the wrong window or records paired with the wrong codes:
    'a parking lot' must find the mosaic's five parking-lot cells, with their footprints."""
    from rshash.index import Index

    index = Index.open(scene_index, device="cpu")
    expected = {MOSAIC.tile_id("mosaic", r, c): (r, c) for r, c in MOSAIC.cells_of("parkinglot")}
    small = mosaic_layout(4, shift=1)
    (munich_lot,) = small.cells_of("parkinglot")
    hits = index.search_text("a parking lot", k=len(expected) + 1)
    assert {h.id for h in hits} == {*expected, small.tile_id("munich", *munich_lot)}
    for h in hits:
        if h.id in expected:
            ring = cell_ring(*expected[h.id])
            assert np.array(h.item["footprint"]) == pytest.approx(np.array(ring))
    munich = [it for it in index.items("images") if it["scene"] == "munich"]
    assert len(munich) == 16 and {it["crs"] for it in munich} == {"EPSG:32632"}
    assert all(
        11.5 < it["bounds_wgs84"][0] < 11.7 and 48.1 < it["bounds_wgs84"][1] < 48.2 for it in munich
    )


def test_geojson_is_rfc7946_and_gdal_opens_it(scene_index, tmp_path):
    """Guards against GeoJSON that QGIS (GDAL/OGR) rejects or misplaces: unclosed or clockwise
    rings, [lat, lon] order, nested properties, hits out of rank order."""
    import pyogrio
    import pyogrio.raw

    from rshash.index import Index

    hits = Index.open(scene_index, device="cpu").search_text("a parking lot", k=8)
    fc = feature_collection(h.to_dict() for h in hits)
    assert fc["type"] == "FeatureCollection" and len(fc["features"]) == 8
    for rank, (f, h) in enumerate(zip(fc["features"], hits, strict=True), 1):
        ring = f["geometry"]["coordinates"][0]
        assert f["geometry"]["type"] == "Polygon" and ring[0] == ring[-1] and len(ring) == 5
        assert signed_area(ring) > 0
        lon, lat = (-117, 34) if h.item["scene"] == "mosaic" else (11.6, 48.1)  # [lon, lat] order
        assert all(abs(x - lon) < 0.1 and abs(y - lat) < 0.1 for x, y in ring)
        assert f["properties"]["rank"] == rank and f["properties"]["distance"] == h.distance
        assert f["properties"]["scene"] == h.item["scene"] and f["id"] == h.id
        assert all(not isinstance(v, dict | list) for v in f["properties"].values())
    clockwise = {"id": "x", "footprint_wgs84": [[0, 0], [0, 1], [1, 1], [1, 0]]}
    ring = feature_collection([clockwise])["features"][0]["geometry"]["coordinates"][0]
    assert ring[0] == ring[-1] and signed_area(ring) > 0
    assert (
        feature_collection([{"id": "a.jpg", "captions": ["c"]}])["features"][0]["geometry"] is None
    )

    path = tmp_path / "hits.geojson"
    path.write_text(json.dumps(fc))
    info = pyogrio.read_info(path)
    assert info["features"] == 8 and info["geometry_type"] == "Polygon"
    assert info["crs"] == "EPSG:4326"
    meta, _, geometry, fields = pyogrio.raw.read(path)
    names = list(meta["fields"])
    assert list(fields[names.index("rank")]) == list(range(1, 9))
    assert {"id", "distance", "scene", "path", "window_row"} <= set(names)
    assert len(geometry) == 8


@pytest.mark.slow
def test_cli_builds_adds_and_searches_scenes_with_nothing_half_added(
    ucm_run, scene_files, tmp_path
):
    """Guards against the CLI options not reaching the tiler, a bad scene half-added to an index,
    multi-line errors, and `--format geojson` printing something other than a FeatureCollection."""
    munich = scene_folder(tmp_path, "munich", scene_files["munich"])
    index = tmp_path / "index"
    done = rshash_cli(
        "index", "build", ucm_run, munich, "--out", index, "--tile", 256, "--device", "cpu"
    )
    assert done.returncode == 0, done.stderr
    assert "images: 16 items" in done.stdout
    manifest = (index / "index.json").read_text()

    bad = scene_folder(tmp_path, "bad", scene_files["rotated"], scene_files["truncated"])
    done = rshash_cli("index", "add", index, bad, "--tile", 256, "--device", "cpu")
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0
    assert done.stderr.startswith(f"error: {bad / 'truncated.tif'}: truncated file")
    assert (index / "index.json").read_text() == manifest

    sixteen = scene_folder(tmp_path, "sixteen", scene_files["mosaic16"])
    done = rshash_cli(
        "index",
        "add",
        index,
        sixteen,
        "--tile",
        256,
        "--stride",
        256,
        "--bands",
        "3,2,1",
        "--device",
        "cpu",
    )
    assert done.returncode == 0, done.stderr
    assert "added 100 images" in done.stdout

    done = rshash_cli(
        "search", index, "a parking lot", "-k", 6, "--format", "geojson", "--device", "cpu"
    )
    assert done.returncode == 0, done.stderr
    fc = json.loads(done.stdout)
    assert fc["type"] == "FeatureCollection" and len(fc["features"]) == 6
    expected = {MOSAIC.tile_id("mosaic16", r, c) for r, c in MOSAIC.cells_of("parkinglot")}
    expected.add("munich/r1024_c1024")  # the 4 x 4 mosaic's parking lot, cell (3, 3)
    assert {f["id"] for f in fc["features"]} == expected

    done = rshash_cli("search", index, "a parking lot", "--bbox", "1,2,3", "--device", "cpu")
    assert done.returncode == 2 and "--bbox: expected 4 numbers" in done.stderr
    done = rshash_cli("index", "add", index, sixteen, "--bands", "3,2,1", "--device", "cpu")
    assert done.returncode == 2 and "--bands: only with --tile" in done.stderr


def test_service_answers_geojson_and_cuts_tile_images_from_the_scene(scene_index):
    """Guards against `"format": "geojson"` ignored, tile thumbnails/images served as the whole
    scene file, and the map overview misplaced or without a transparent nodata margin."""
    import io

    import httpx

    from rshash.service import ServiceConfig
    from tests.service_server import running_service

    with running_service(scene_index, ServiceConfig(device="cpu")) as url:
        fc = httpx.post(
            f"{url}/search/text", json={"query": "a parking lot", "k": 5, "format": "geojson"}
        ).json()
        assert fc["type"] == "FeatureCollection" and len(fc["features"]) == 5
        feature = fc["features"][0]
        r, c = next(
            (r, c)
            for r, c in MOSAIC.cells_of("parkinglot")
            if MOSAIC.tile_id("mosaic", r, c) == feature["id"]
        )

        image = httpx.get(f"{url}/items/{feature['id']}/image")
        assert image.headers["content-type"] == "image/png"
        pixels = np.asarray(Image.open(io.BytesIO(image.content))).astype(int)
        assert (pixels == np.maximum(ucm_pixels(MOSAIC.image(r, c)), 1)).all()
        thumb = Image.open(
            io.BytesIO(httpx.get(f"{url}{feature['properties']['thumbnail']}").content)
        )
        assert thumb.size == (256, 256) and thumb.format == "JPEG"

        info = httpx.get(f"{url}/scenes/overview", params={"item": feature["id"]}).json()
        assert info["scene"] == "mosaic"
        in_mosaic = [f for f in fc["features"] if f["properties"]["scene"] == "mosaic"]
        lons = [p[0] for f in in_mosaic for p in f["geometry"]["coordinates"][0]]
        assert info["bounds_wgs84"][0] < min(lons) and max(lons) < info["bounds_wgs84"][2]
        png = Image.open(io.BytesIO(httpx.get(url + info["image"]).content))
        assert png.mode == "RGBA" and max(png.size) == 1024
        alpha = np.asarray(png)[..., 3]
        assert alpha[png.size[1] // 2, png.size[0] // 2] == 255  # the mosaic
        assert alpha[5, png.size[0] // 2] == 0  # its nodata margin

        bad = httpx.post(f"{url}/search/text", json={"query": "x", "bbox": [200, 0, 1, 1]})
        assert bad.status_code == 422 and "bbox" in bad.json()["error"]
        assert httpx.get(f"{url}/static/vendor/leaflet/leaflet.js").status_code == 200
        assert httpx.get(f"{url}/static/vendor/leaflet/../../package.json").status_code == 404


def test_resumed_build_with_other_bands_does_not_reuse_stale_codes(ucm_run, scene_files, tmp_path):
    """Guards against the build's resume key ignoring the tile config: tile ids do not change
    with --bands, so a build killed with bands 1,2,3 and resumed with 3,2,1 must encode again,
    not reuse the first bands' codes left in INDEX.partial/."""
    from rshash.index import build as build_module
    from rshash.index.build import BuildConfig, build_index

    cfg = BuildConfig(image_batch=4, device="cpu")
    real = build_module.CodeEncoder.encode_views
    calls = []

    def killed_at_third_batch(self, images):
        calls.append(len(images))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, images)

    out = tmp_path / "index"
    rgb = SceneTiles(scene_files["munich"], TileConfig(bands=(1, 2, 3)))
    bgr = SceneTiles(scene_files["munich"], TileConfig(bands=(3, 2, 1)))
    assert rgb.image_ids == bgr.image_ids
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(build_module.CodeEncoder, "encode_views", killed_at_third_batch)
        with pytest.raises(KeyboardInterrupt):
            build_index(ucm_run, rgb, out, cfg, progress=False)
    saved = sorted((tmp_path / "index.partial").glob("*/*.npy"))
    stale = np.concatenate([np.load(p) for p in saved])
    assert len(stale) == 8

    resumed = build_index(ucm_run, bgr, out, cfg, progress=False)
    fresh = build_index(ucm_run, bgr, tmp_path / "fresh", cfg, progress=False)
    codes = resumed.collections["images"].codes
    assert np.array_equal(codes, fresh.collections["images"].codes)
    assert not np.array_equal(codes[:8], stale)
    assert [it["bands"] for it in resumed.items("images")] == [[3, 2, 1]] * 16
