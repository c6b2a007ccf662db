"""STAC in and out: a catalog of real-UCM mosaics (two collections, two dates; tests/stac_data.py)
indexed, filtered by time and collection, and served as a STAC API that unmodified STAC tools
(pystac-client, stac-api-validator, pystac, stac-pydantic) use."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import httpx
import pytest

from rshash.data.scenes import SceneTiles, TileConfig
from rshash.data.stac import StacTiles
from rshash.errors import DataError, RshashError
from rshash.index.time_filter import parse_datetime
from rshash.service import ServiceConfig
from tests.conftest import rshash_cli
from tests.service_server import running_service
from tests.stac_data import GRID, SPECS, broken_copy, write_catalog

TILES_PER_ITEM = GRID * GRID  # the margin's tiles are all nodata and skipped
QUERY = "many boats in a harbour"


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory, ucm_path: Path) -> Path:
    return write_catalog(tmp_path_factory.mktemp("stac"))


@pytest.fixture(scope="module")
def stac_index(ucm_run: Path, catalog: Path) -> Path:
    """The catalog's 4 Items as 256-px tiles (about a minute on CPU)."""
    from rshash.index.build import BuildConfig, build_index

    out = catalog.parent.parent / "index"
    build_index(ucm_run, StacTiles(catalog), out, BuildConfig(device="cpu"), progress=False)
    return out


def items_of(hits) -> set[str]:
    return {h.item["stac_item"] for h in hits}


def test_every_item_is_tiled_like_its_geotiff_and_keeps_its_stac_fields(catalog):
    """Guards against STAC tiles differing from scene tiles (windows, pixels) and against
    losing the Item's id, collection, time, properties or asset href on the way."""
    tiles = StacTiles(catalog)
    assert len(tiles) == len(SPECS) * TILES_PER_ITEM
    for spec in SPECS:
        tif = catalog.parent.parent / "images" / f"{spec.item_id}.tif"
        scene = SceneTiles(tif, TileConfig())
        mine = [i for i, t in enumerate(tiles.image_ids) if t.startswith(f"{spec.item_id}/")]
        assert [tiles.image_ids[i].split("/")[1] for i in mine] == [
            t.split("/")[1] for t in scene.image_ids
        ]
        rec = tiles.image_record(mine[0])
        assert rec["window"] == scene.image_record(0)["window"]
        assert rec["footprint_wgs84"] == scene.image_record(0)["footprint_wgs84"]
        assert tiles.load_image(mine[0]).tobytes() == scene.load_image(0).tobytes()
        assert rec["stac_item"] == spec.item_id
        assert rec["collection"] == spec.collection
        assert rec["datetime"] == spec.when.isoformat().replace("+00:00", "Z")
        assert rec["eo:cloud_cover"] == spec.cloud
        assert rec["properties"]["platform"] == "ucm-aerial"
        assert rec["asset_href"] == tif.resolve().as_uri()
        assert rec["time_start"] == rec["time_end"] == spec.when.timestamp()


def test_stac_files_are_told_from_caption_json_datasets(catalog, ucm_path):
    """Guards against `index build RUN dataset.json` (a caption-JSON dataset given as a file)
    being read as a STAC catalog."""
    from rshash.data.stac import is_stac_file

    assert is_stac_file(catalog)
    assert is_stac_file(catalog.parent / "aerial-a" / "collection.json")
    assert not is_stac_file(ucm_path / "dataset.json")


def test_a_collection_file_or_an_item_collection_reads_like_the_catalog(catalog, tmp_path):
    """Guards against the other two STAC entry points losing Items or their collection."""
    import pystac

    whole = StacTiles(catalog)
    coast = StacTiles(catalog.parent / "aerial-b" / "collection.json")
    assert {e.item_id for e in coast.entries} == {"coast-2019", "coast-2021"}
    assert {e.collection for e in coast.entries} == {"aerial-b"}
    items = list(pystac.Catalog.from_file(str(catalog)).get_items(recursive=True))
    for item in items:
        item.make_asset_hrefs_absolute()
    feature_collection = tmp_path / "items.json"
    feature_collection.write_text(json.dumps(pystac.ItemCollection(items).to_dict()))
    from_fc = StacTiles(feature_collection)
    assert sorted(from_fc.image_ids) == sorted(whole.image_ids)
    first = from_fc.image_ids.index(whole.image_ids[0])
    assert from_fc.image_record(first)["collection"] == whole.image_record(0)["collection"]


@pytest.mark.parametrize(
    ("text", "start", "end"),
    [
        ("2021-06-01T12:00:00Z", 1622548800.0, 1622548800.0),
        ("2021-06-01", 1622505600.0, 1622505600.0 + 86400 - 1e-6),
        ("2021-06-01T00:00:00+02:00/..", 1622498400.0, None),
        ("../2021-06-01T00:00:00Z", None, 1622505600.0),
    ],
)
def test_datetime_instants_and_intervals_parse_with_open_ends(text, start, end):
    """Guards against time zones, bare dates or open ends being read wrongly."""
    assert parse_datetime(text) == (start, end)


@pytest.mark.parametrize("text", ["yesterday", "../..", "2021-06-02/2021-06-01", "a/b/c", ""])
def test_bad_datetime_is_a_one_line_error(text):
    with pytest.raises(RshashError, match=r"^datetime: ") as err:
        parse_datetime(text)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("datetime", "expected"),
    [
        ("2021-01-01/..", {"harbour-2021", "coast-2021"}),
        ("../2019-12-31", {"harbour-2019", "coast-2019"}),
        ("2019-05-02T10:00:00Z", {"harbour-2019"}),
        ("2019-06-01/2021-05-01", {"coast-2019", "coast-2021"}),
        ("2019-08-09", {"coast-2019"}),
        ("2030-01-01/..", set()),
    ],
)
def test_time_filter_keeps_exactly_the_items_of_that_time_and_stays_exact_top_k(
    stac_index, datetime, expected
):
    """Guards against the time filter keeping the wrong tiles, and against it being applied
    after the top-k cut (which would return fewer or other tiles than the exact top-k)."""
    from rshash.index import Index

    idx = Index.open(stac_index, device="cpu")
    every = idx.search_text(QUERY, len(idx))
    hits = idx.search_text(QUERY, 5, datetime=datetime)
    assert items_of(idx.search_text(QUERY, len(idx), datetime=datetime)) == expected
    ranked = [h for h in every if h.item["stac_item"] in expected][:5]
    assert [(h.id, h.distance) for h in hits] == [(h.id, h.distance) for h in ranked]


def test_collection_and_property_filters_combine_with_time(stac_index):
    """Guards against STAC fields being unusable in `where` (prefixed names like eo:cloud_cover)
    or the time filter replacing, instead of joining, the user's filter."""
    from rshash.index import Index

    idx = Index.open(stac_index, device="cpu")
    n = len(idx)
    assert items_of(idx.search_text(QUERY, n, where='collection = "aerial-b"')) == {
        "coast-2019",
        "coast-2021",
    }
    got = idx.search_text(QUERY, n, where="eo:cloud_cover < 10", datetime="2019-01-01/2020-01-01")
    assert items_of(got) == {"harbour-2019"}
    assert len(got) == TILES_PER_ITEM


def test_time_filter_on_an_index_without_times_is_an_error(scene_index):
    from rshash.index import Index

    with pytest.raises(RshashError, match="carry no time"):
        Index.open(scene_index, device="cpu").search_text(QUERY, 5, datetime="2021-01-01/..")


def _not_stac(catalog: Path, dest: Path) -> Path:
    dest.mkdir()
    (dest / "catalog.json").write_text(json.dumps({"type": "Thing", "hello": 1}))
    return dest / "catalog.json"


BAD = {
    "no geometry": (
        lambda c, d: broken_copy(c, d, "coast-2019", {"geometry": None}),
        None,
        r"item 'coast-2019': geometry: missing",
    ),
    "no datetime": (
        lambda c, d: broken_copy(c, d, "harbour-2021", {"properties.datetime": None}),
        None,
        r"item 'harbour-2021': datetime: missing",
    ),
    "missing file": (
        lambda c, d: broken_copy(c, d, "coast-2021", {"assets.visual.href": "../../nope.tif"}),
        None,
        r"item 'coast-2021': assets.visual.href: .*nope.tif does not exist",
    ),
    "no such asset": (lambda c, d: broken_copy(c, d, "coast-2021"), "nir", r"assets: no 'nir'"),
    "duplicate id": (
        lambda c, d: broken_copy(c, d, "coast-2019", {"id": "harbour-2019"}),
        None,
        r"item 'harbour-2019': id: appears twice",
    ),
    "not STAC": (_not_stac, None, r"not a STAC Catalog, Collection or ItemCollection"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_catalog_is_refused_naming_the_item_and_field(catalog, tmp_path, case):
    """Guards against a bad Item being skipped silently or failing mid-build."""
    make, asset, message = BAD[case]
    bad = make(catalog, tmp_path / "bad")
    with pytest.raises(DataError, match=message) as err:
        StacTiles(bad, asset=asset)
    assert "\n" not in str(err.value)


def test_cli_refuses_a_bad_catalog_with_nothing_added(stac_index, catalog, tmp_path):
    """Guards against a half-added catalog: the bad Item is last in walk order, so a reader
    that added Items as it went would have added the others."""
    from rshash.index import Index

    index = tmp_path / "index"
    shutil.copytree(stac_index, index)
    before = Index.open(index, device="cpu")
    n, gen = len(before), before.generation
    bad = broken_copy(catalog, tmp_path / "bad", "coast-2021", {"geometry": None})
    done = rshash_cli("index", "add", index, bad, "--device", "cpu")
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "error: item 'coast-2021': geometry: missing (rshash places tiles by it)"
    )
    after = Index.open(index, device="cpu")
    assert (len(after), after.generation) == (n, gen)


def test_search_format_stac_writes_an_item_collection_pystac_loads(stac_index):
    """Guards against `--format stac` and `--datetime` drifting from the service's Items."""
    import pystac

    done = rshash_cli(
        "search", stac_index, QUERY, "-k", "4", "--datetime", "2021-01-01/..",
        "--format", "stac", "--device", "cpu",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    collection = pystac.ItemCollection.from_dict(json.loads(done.stdout))
    assert len(collection.items) == 4
    assert all(i.datetime is not None and i.datetime.year == 2021 for i in collection.items)
    assert [i.properties["rshash:rank"] for i in collection.items] == [1, 2, 3, 4]
    assert all(i.assets["source"].href.startswith("file://") for i in collection.items)


# --- the STAC API ------------------------------------------------------------------------------

BOX = (-117.02, 33.97, -116.98, 33.99)  # holds every Item (they lie side by side)
COAST_ONLY = {
    "type": "Polygon",
    "coordinates": [[[-116.99, 33.97], [-116.98, 33.97], [-116.98, 33.99], [-116.99, 33.99],
                     [-116.99, 33.97]]],
}  # fmt: skip


@pytest.fixture(scope="module")
def stac_service(stac_index):
    with running_service(stac_index, ServiceConfig(device="cpu")) as url:
        yield url


def test_pystac_client_pages_through_a_text_search_equal_to_index_search_text(
    stac_service, stac_index
):
    """A real, unmodified client: free text + bbox + datetime through its own arguments,
    several pages; guards against paging that skips or repeats tiles and against an order
    other than the index's exact ranking under the same filters."""
    from pystac_client import Client

    from rshash.index import Index

    def free_text(request):
        """pystac-client's documented hook for parameters it has no argument for (its
        Client.search takes no `q` yet): add the free-text `q` to every search request."""
        if request.url.endswith("/search"):
            if request.method == "POST":
                request.json = {**request.json, "q": QUERY}
            else:
                request.params = {**request.params, "q": QUERY}
        return request

    client = Client.open(f"{stac_service}/stac/", request_modifier=free_text)
    assert {c.id for c in client.get_collections()} == {"aerial-a", "aerial-b"}
    search = client.search(bbox=BOX, datetime="2021-01-01/..", limit=4)
    pages = list(search.pages())
    assert len(pages) > 1
    got = [item.id for page in pages for item in page.items]
    idx = Index.open(stac_index, device="cpu")
    want = idx.search_text(QUERY, len(idx), bbox=BOX, datetime="2021-01-01/..")
    assert got == [h.id.replace("/", "~") for h in want]
    assert len(got) == 2 * TILES_PER_ITEM
    distances = [item.properties["rshash:distance"] for page in pages for item in page.items]
    assert distances == [h.distance for h in want]


def test_metadata_search_collections_ids_and_intersects(stac_service):
    """Guards against the filters of a search without `q` (and `intersects`) keeping the wrong
    tiles."""
    search = f"{stac_service}/stac/search"
    body = httpx.post(search, json={"collections": ["aerial-b"], "limit": 100}, timeout=60).json()
    assert {f["properties"]["rshash:source_item"] for f in body["features"]} == {
        "coast-2019",
        "coast-2021",
    }
    body = httpx.get(
        search, params={"intersects": json.dumps(COAST_ONLY), "limit": 100}, timeout=60
    ).json()
    assert {f["collection"] for f in body["features"]} == {"aerial-b"}
    assert len(body["features"]) == 2 * TILES_PER_ITEM
    ids = ["harbour-2019~r256_c256", "coast-2021~r512_c512"]
    body = httpx.get(search, params={"ids": ",".join(ids)}, timeout=60).json()
    assert sorted(f["id"] for f in body["features"]) == sorted(ids)


def test_every_item_and_item_collection_validates_with_pystac_and_stac_pydantic(stac_service):
    """Guards against answers STAC tools cannot read (no network: both validate offline)."""
    import pystac
    from stac_pydantic import Collection, Item, ItemCollection

    base = f"{stac_service}/stac"
    answers = [
        httpx.get(f"{base}/search", params={"q": QUERY, "limit": 5}, timeout=60).json(),
        httpx.get(f"{base}/collections/aerial-a/items", params={"limit": 5}, timeout=60).json(),
    ]
    for answer in answers:
        ItemCollection.model_validate(answer)
        assert len(pystac.ItemCollection.from_dict(answer).items) == 5
        for feature in answer["features"]:
            Item.model_validate(feature)
            one = httpx.get(f"{base}/collections/{feature['collection']}/items/{feature['id']}")
            assert one.status_code == 200
            Item.model_validate(one.json())
            pystac.Item.from_dict(one.json())
            png = httpx.get(one.json()["assets"]["tile"]["href"], timeout=60)
            assert png.headers["content-type"] == "image/png"
    for col in httpx.get(f"{base}/collections", timeout=60).json()["collections"]:
        Collection.model_validate(col)
        pystac.Collection.from_dict(col)


@pytest.mark.parametrize(
    "params",
    [
        {"datetime": "yesterday"},
        {"limit": "0"},
        {"token": "abc"},
        {"bbox": "1,2,3"},
        {"intersects": "{not json"},
        {"q": "x" * 600},
    ],
)
def test_bad_search_is_400_with_code_and_description(stac_service, params):
    """The STAC API's error form, and the service keeps serving."""
    r = httpx.get(f"{stac_service}/stac/search", params=params, timeout=60)
    assert r.status_code == 400
    assert set(r.json()) == {"code", "description"}
    assert httpx.get(f"{stac_service}/stac/", timeout=60).status_code == 200


def test_unknown_collection_or_item_is_404(stac_service):
    base = f"{stac_service}/stac/collections"
    assert httpx.get(f"{base}/nope", timeout=60).status_code == 404
    assert httpx.get(f"{base}/aerial-b/items/harbour-2019~r256_c256", timeout=60).status_code == 404


def _box_polygon(box: tuple[float, ...]) -> dict:
    west, south, east, north = box
    ring = [[west, south], [east, south], [east, north], [west, north], [west, south]]
    return {"type": "Polygon", "coordinates": [ring]}


def _local_schemas(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Serve the JSON schemas stac-validator fetches from the copies pystac ships (STAC 1.1.0,
    GeoJSON); returns the URLs it asked for that have no local copy."""
    import importlib.resources

    import requests

    root = Path(str(importlib.resources.files("pystac.validation") / "jsonschemas"))
    real_get = requests.get
    missing: list[str] = []

    def get(url: str, *args, **kwargs):
        local = None
        if url.startswith("https://schemas.stacspec.org/v1.1.0/"):
            local = root / "stac-spec" / "v1.1.0" / url.rsplit("/", 1)[1]
        elif url.startswith("https://geojson.org/schema/"):
            local = root / "geojson" / url.rsplit("/", 1)[1]
        if local is None:
            return real_get(url, *args, **kwargs)
        if not local.is_file():
            missing.append(url)
        response = requests.Response()
        response.status_code = 200 if local.is_file() else 404
        response._content = local.read_bytes() if local.is_file() else b"{}"
        response.url = url
        return response

    monkeypatch.setattr(requests, "get", get)
    return missing


def test_stac_api_validator_passes_core_item_search_collections_features(stac_service, monkeypatch):
    """The community's conformance checker, with the JSON schemas it would download served from
    pystac's local copies (no network at test time)."""
    from stac_api_validator.validations import QueryConfig, validate_api

    missing = _local_schemas(monkeypatch)
    query = QueryConfig(*([None] * len(QueryConfig.__dataclass_fields__)))
    _, errors = validate_api(
        root_url=f"{stac_service}/stac/",
        ccs_to_validate=["core", "item-search", "collections", "features"],
        collection="aerial-a",
        geometry=json.dumps(_box_polygon(BOX)),  # it searches collection aerial-a with it
        auth_bearer_token=None,
        auth_query_parameter=None,
        fields_nested_property=None,
        validate_pagination=True,
        query_config=query,
        transaction_collection=None,
        headers=None,
    )
    assert not missing
    assert not errors.errors, "\n".join(str(e) for e in errors.errors)


def test_service_text_search_takes_datetime_like_where(stac_service, stac_index):
    """Guards against /search/text ignoring `datetime` or applying it after the top-k cut."""
    from rshash.index import Index

    body = {"query": QUERY, "k": 5, "datetime": "../2019-12-31"}
    got = httpx.post(f"{stac_service}/search/text", json=body, timeout=60).json()
    want = Index.open(stac_index, device="cpu").search_text(QUERY, 5, datetime="../2019-12-31")
    assert [r["id"] for r in got["results"]] == [h.id for h in want]
    assert {r["stac_item"] for r in got["results"]} <= {"harbour-2019", "coast-2019"}
    bad = httpx.post(f"{stac_service}/search/text", json={**body, "datetime": "soon"}, timeout=60)
    assert bad.status_code == 400
    assert bad.json()["error"].startswith("datetime: ")


@pytest.mark.slow
def test_web_page_searches_by_time(stac_index):
    """The page's from/to dates reach the search: guards against the time filter being shown
    but not sent (cards from other dates would appear)."""
    from tests.test_web_page import CHROMIUM, FLAGS

    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail(f"chromium not found at {CHROMIUM}; .ci/run installs Debian's chromium")
        pytest.skip("Debian chromium is not installed")
    from playwright.sync_api import sync_playwright

    with (
        running_service(stac_index, ServiceConfig(device="cpu")) as url,
        sync_playwright() as p,
    ):
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(url + "/")
        page.wait_for_function("document.getElementById('status').textContent.includes('images')")
        page.fill("#from", "2021-01-01")
        page.fill("#query", QUERY)
        page.press("#query", "Enter")
        page.wait_for_selector("#results .card")
        ids = page.eval_on_selector_all("#results .card", "cs => cs.map(c => c.dataset.id)")
        assert len(ids) == 2 * TILES_PER_ITEM
        assert all("-2021/" in i for i in ids)
        page.fill("#to", "2019-12-31")
        page.fill("#from", "")
        page.dispatch_event("#to", "change")
        page.wait_for_function(
            "[...document.querySelectorAll('#results .card')].every("
            "c => c.dataset.id.includes('-2019/'))"
        )
        browser.close()
