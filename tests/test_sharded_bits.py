"""Every code length (8 to 1024 bits) works on a sharded index through every path, as on a local
one: the Python API (top-k, range, filtered, text and image queries), the CLI (every output
format, `index info`, `index check`), changes (add, remove, compact) and the service. Each
length gets a short run, a local index of UCM from the cached features, and two shards of that
index's own codes, so the two hold the same items under the same global keys."""

import json
import shutil

import httpx
import numpy as np
import pytest

from rshash.data import load_dataset
from rshash.index import Index, open_index
from rshash.index.build import build_index
from rshash.index.packing import code_bytes, pack_codes, pad_packed
from rshash.index.sharded import ShardedIndex
from rshash.service import ServiceConfig
from tests.conftest import cli_in_process, ranked, shards_of_index
from tests.service_server import running_service

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow  # Ray actors and a short run per code length

BITS = [8, 24, 64, 200, 1024]  # 24 and 200: not whole 64-bit words; 8 and 1024: the limits
COUNTS = {"images": 2100, "captions": 10500}
RIVERS = 'class = "river" or class = "beach"'


@pytest.fixture(scope="module")
def archive_of_bits(tmp_path_factory, short_run, ucm_features, ucm_path):
    """`archive_of_bits(bits)`: (local index, sharded index) of all of UCM at that length."""
    root = tmp_path_factory.mktemp("sharded-bits")
    made = {}

    def make(bits):
        if bits not in made:
            run = short_run(bits)
            local = root / f"local{bits}"
            ds = load_dataset(ucm_path, check_images=False)
            build_index(run, ds, local, features=ucm_features, progress=False)
            made[bits] = local, shards_of_index(local, run, ucm_path, root / f"shards{bits}")
        return made[bits]

    return make


def _found(results):
    return [[(h.key, h.distance, h.id) for h in hits] for hits in results]


def _queries(index, bits, seed):
    """Stored codes of both collections, random codes at the packed width, and random codes
    at their natural width (ceil(bits / 8) bytes, as np.packbits gives them)."""
    rng = np.random.default_rng(seed)
    stored = np.concatenate(
        [index.collections["images"].codes[::1050], index.collections["captions"].codes[::5250]]
    )
    return {
        "stored": stored,
        "packed": pack_codes(rng.choice([-1, 1], (3, bits))),
        "natural": np.packbits(rng.integers(0, 2, (3, bits), dtype=np.uint8), axis=1),
    }


@pytest.mark.parametrize("bits", BITS)
def test_python_api_answers_alike_at_every_length(local_ray, archive_of_bits, ucm_path, bits):
    """Guards against a sharded search path that works at 64 bits only (a code buffer of
    bits // 8 bytes, a kernel probe or a merge that assumes one 64-bit word): top-k past one
    shard's share, range search, where filters, text and image queries, items, on both
    collections, with queries at the packed width and at np.packbits' width, must equal the
    local index's, keys and distances included."""
    local_path, shards_path = archive_of_bits(bits)
    local, sharded = Index.open(local_path), open_index(shards_path)
    assert isinstance(sharded, ShardedIndex)
    assert sharded.bits == local.bits == bits
    assert sharded.counts() == local.counts() == COUNTS
    assert local.collections["images"].codes.shape == (2100, code_bytes(bits))
    radius = max(1, bits // 5)
    for what, codes in _queries(local, bits, bits).items():
        for collection, big in (("images", 1500), ("captions", 6000)):  # a shard holds half
            for kwargs in (
                {"k": 10},
                {"k": big},
                {"radius": radius},
                {"k": 25, "where": RIVERS},
                {"radius": radius, "where": RIVERS},
            ):
                if what != "stored" and kwargs.get("k") == big:
                    continue  # the widest merges once per collection are enough
                want = local.search_codes(codes, collection=collection, **kwargs)
                got = sharded.search_codes(codes, collection=collection, **kwargs)
                assert _found(got) == _found(want), (what, collection, kwargs)
    for collection in ("images", "captions"):
        for kwargs in ({"k": 10}, {"k": 10, "where": RIVERS}, {"radius": radius}):
            want = local.search_text("a river", collection=collection, **kwargs)
            got = sharded.search_text("a river", collection=collection, **kwargs)
            assert _found([got]) == _found([want]), (collection, kwargs)
    image = ucm_path / "images" / "1500.jpg"
    want = local.search_image(image, 10)
    assert want and _found([sharded.search_image(image, 10)]) == _found([want])
    items = local.items("images")
    first, last = items[0]["id"], items[-1]["id"]  # one in each shard
    assert sharded.item(first) == local.item(first)
    assert sharded.item(last) == local.item(last)
    assert sharded.items("images") == items


@pytest.mark.parametrize("bits", BITS)
def test_cli_search_info_check_alike_at_every_length(local_ray, archive_of_bits, bits):
    """Guards against `rshash search`, `index info` or `index check` failing on a sharded index
    of a code length other than 64 bits, or answering differently from a local index: the
    ranked JSON hits must be the local ones, info must report the length and the counts, and
    check must pass with every item counted."""
    local, shards = archive_of_bits(bits)
    query = ("search", "a river", "-k", "10", "--format", "json")
    want = ranked(cli_in_process(query[0], local, *query[1:]))
    assert len(want) == 10
    assert ranked(cli_in_process(query[0], shards, *query[1:])) == want
    info = cli_in_process("index", "info", shards)
    assert f"{bits}-bit codes" in info
    assert "images: 2100 items, 0 removed" in info and "captions: 10500 items" in info
    checked = cli_in_process("index", "check", shards)
    assert "images: ok, items 2100" in checked and "captions: ok, items 10500" in checked
    assert checked.rstrip().endswith(f"{shards}: ok")


def test_cli_formats_alike_on_a_sharded_index(local_ray, archive_of_bits, ucm_path):
    """Guards against an output format, --target, --where, --radius or --image that works on
    a local index only, at a length that is not whole 64-bit words (24 bits): the table (of
    captions, filtered), the GeoJSON (of an image's range search) and the STAC ItemCollection
    must be the local index's, non-empty. (The formats only render hits; the hits themselves
    are compared at every length above.)"""
    local, shards = archive_of_bits(24)
    image = ucm_path / "images" / "700.jpg"
    table = ("a river", "-k", "10", "--target", "captions", "--where", RIVERS)
    want = cli_in_process("search", local, *table)
    assert cli_in_process("search", shards, *table) == want and len(want.splitlines()) == 10
    for args in (
        ("--image", image, "--radius", "3", "--format", "geojson"),
        ("a river", "-k", "10", "--format", "stac"),
    ):
        want = json.loads(cli_in_process("search", local, *args))["features"]
        got = json.loads(cli_in_process("search", shards, *args))["features"]
        assert want and [f["id"] for f in got] == [f["id"] for f in want]
        assert got == want


def _new_items(bits, codes_from, seed):
    """Four new images with bounds (two coded as stored images of each shard, two at random)
    and a caption each, its code at np.packbits' width."""
    rng = np.random.default_rng(seed)
    image_codes = np.concatenate(
        [codes_from[[0, len(codes_from) - 1]], pack_codes(rng.choice([-1, 1], (2, bits)))]
    )
    images = [
        {
            "id": f"new-{i}",
            "class": "river",
            "bounds_wgs84": [10.0 + i, 45.0, 10.5 + i, 45.5],
        }
        for i in range(4)
    ]
    caption_codes = np.packbits(rng.integers(0, 2, (4, bits), dtype=np.uint8), axis=1)
    captions = [
        {"id": f"new-{i}#0", "image": f"new-{i}", "text": "a new river", "class": "river"}
        for i in range(4)
    ]
    return image_codes, images, caption_codes, captions


@pytest.mark.parametrize("bits", BITS)
def test_updates_keep_sharded_and_local_alike(local_ray, archive_of_bits, bits, tmp_path):
    """Guards against add, remove or compact breaking a sharded index whose codes are not one
    64-bit word (codes written at the wrong width, a segment read back with the wrong stride,
    replicas reloading a generation they cannot search): the same changes on a local and a
    sharded copy must give the same keys, counts and hits (top-k, range, where, bbox), and
    both must pass `index check`."""
    local_src, shards_src = archive_of_bits(bits)
    shutil.copytree(local_src, tmp_path / "local")
    shutil.copytree(shards_src, tmp_path / "shards")
    local, sharded = Index.open(tmp_path / "local"), open_index(tmp_path / "shards")
    stored = local.collections["images"].codes
    image_codes, images, caption_codes, captions = _new_items(bits, stored, bits)
    queries = np.concatenate([stored[::420], image_codes, pad_packed(caption_codes, bits)])
    radius = max(1, bits // 5)

    def same(counts):
        assert sharded.counts() == local.counts() == counts
        for collection, kwargs in (
            ("images", {"k": 10}),
            ("images", {"k": 1200}),
            ("images", {"radius": radius}),
            ("images", {"k": 10, "where": RIVERS}),
            ("images", {"k": 10, "bbox": (9.0, 44.0, 12.2, 46.0)}),
            ("captions", {"k": 10}),
            ("captions", {"radius": radius}),
        ):
            want = local.search_codes(queries, collection=collection, **kwargs)
            got = sharded.search_codes(queries, collection=collection, **kwargs)
            assert _found(got) == _found(want), (collection, kwargs)

    same(COUNTS)
    for index in (local, sharded):
        assert index.add("images", image_codes, images).tolist() == [2100, 2101, 2102, 2103]
        assert index.add("captions", caption_codes, captions).tolist() == list(range(10500, 10504))
        index.commit()
    same({"images": 2104, "captions": 10504})
    found = sharded.search_codes(image_codes, 10, bbox=(9.0, 44.0, 12.2, 46.0))
    assert [h.id for h in found[2]][:1] == ["new-2"]  # a new item, found by its bounds
    assert {h.id for hits in found for h in hits} == {"new-0", "new-1", "new-2"}

    items = local.items("images")
    gone = [items[0]["id"], items[2099]["id"], "new-0"]  # from each shard, and a new one
    for index in (local, sharded):
        assert index.remove(gone) == 3
        index.commit()
    same({"images": 2101, "captions": 10493})

    assert sharded.compact() == local.compact()
    same({"images": 2101, "captions": 10493})
    for path in (tmp_path / "local", tmp_path / "shards"):
        checked = cli_in_process("index", "check", path)
        assert "images: ok, items 2101" in checked and "captions: ok, items 10493" in checked
    assert "images: 2101 items, 0 removed" in cli_in_process("index", "info", tmp_path / "shards")


def test_a_field_new_to_one_shard_filters_after_a_refresh(local_ray, archive_of_bits, tmp_path):
    """Guards against a where filter on a field that an add brought into one shard failing in
    the other shards of an open sharded index (the service's) after it refreshed: it must
    match the new items there and nothing in the shards without the field, as it does in an
    index opened afresh."""
    shutil.copytree(archive_of_bits(24)[1], tmp_path / "shards")
    sharded = open_index(tmp_path / "shards")
    code = pack_codes(np.ones((1, 24)))
    assert sharded.search_codes(code, 1)  # the replicas hold generation 0
    sharded.add("images", code, [{"id": "new-0", "year": 2020}])
    sharded.commit()  # to one shard; the replicas move to generation 1
    found = sharded.search_codes(code, 5, where="year >= 2020")
    assert [h.id for h in found[0]] == ["new-0"]


@pytest.mark.parametrize("bits", [8, 200])
def test_service_answers_alike_on_a_sharded_index(local_ray, archive_of_bits, ucm_path, bits):
    """Guards against the service sizing query codes for whole words or for 64 bits on a
    sharded index (every search answering 500, or other hits than the local index): below
    one word (8 bits) and past three words but not four (200 bits), /search/text on both
    collections, with a where filter, and /search/image must answer 200 with the local
    index's hits."""
    local_path, shards = archive_of_bits(bits)
    local = Index.open(local_path)
    image = ucm_path / "images" / "300.jpg"
    cfg = ServiceConfig(device="cpu", shard_timeout_s=120)
    with running_service(shards, cfg) as url, httpx.Client(base_url=url, timeout=180) as http:
        health = http.get("/healthz").json()
        assert (health["bits"], health["shards"]) == (bits, 2)
        assert (health["images"], health["captions"]) == (2100, 10500)
        for collection in ("images", "captions"):
            for where in (None, RIVERS):
                body = {"query": "a river", "k": 10, "collection": collection, "where": where}
                r = http.post("/search/text", json=body)
                assert r.status_code == 200, r.text
                want = local.search_text("a river", 10, collection, where=where)
                assert [(h["id"], h["distance"]) for h in r.json()["results"]] == [
                    (h.id, h.distance) for h in want
                ], (collection, where)
        files = {"file": (image.name, image.read_bytes(), "image/jpeg")}
        r = http.post("/search/image", files=files, data={"k": "10"})
        assert r.status_code == 200, r.text
        want = local.search_image(image, 10)
        assert [(h["id"], h["distance"]) for h in r.json()["results"]] == [
            (h.id, h.distance) for h in want
        ]
