"""The HTTP API with the real model and a real index of UCM: every endpoint and bad input,
batching, load shedding, live index updates and metrics."""

import asyncio
import io
import shutil
import subprocess
import sys
import threading
import time

import httpx
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from rshash.index import Index
from rshash.service import ServiceConfig
from tests.conftest import RSSCN7
from tests.service_server import running_service


@pytest.fixture(scope="module")
def service(ucm_index):
    config = ServiceConfig(max_upload_bytes=2_000_000, max_k=100)
    with (
        running_service(ucm_index, config) as url,
        httpx.Client(base_url=url, timeout=60) as client,
    ):
        yield client


def _jpeg(size=(300, 200), color=(30, 90, 160)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG")
    return buf.getvalue()


def test_health_and_docs(service):
    health = service.get("/healthz").json()
    assert health == {
        "status": "ok",
        "images": 2100,
        "captions": 10500,
        "bits": 64,
        "engine": "exact",
        "model": "duch",
        "generation": 1,
    }
    assert service.get("/docs").status_code == 200
    assert "/search/text" in service.get("/openapi.json").json()["paths"]
    assert "<title>rshash" in service.get("/").text


def test_text_search_results_carry_metadata_and_thumbnails(service):
    r = service.post("/search/text", json={"query": "many planes parked at the airport", "k": 10})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["count"] == 10
    first = body["results"][0]
    assert {"id", "distance", "captions", "class", "thumbnail", "image_url"} <= set(first)
    assert sum(h["class"] == "airplane" for h in body["results"]) >= 5, body["results"]
    distances = [h["distance"] for h in body["results"]]
    assert distances == sorted(distances)
    thumb = service.get(first["thumbnail"])
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(thumb.content)).size) == 256
    assert service.get(first["thumbnail"]).content == thumb.content  # served from the cache
    item = service.get(f"/items/{first['id']}").json()
    assert item["id"] == first["id"] and item["captions"] == first["captions"]
    captions = service.post("/search/text", json={"query": "a river", "collection": "captions"})
    assert all("text" in h and "image" in h for h in captions.json()["results"])


def test_image_search(service):
    path = RSSCN7 / "gParking" / "g001.jpg"
    files = {"file": ("g001.jpg", path.read_bytes(), "image/jpeg")}
    r = service.post("/search/image", files=files, data={"k": "5"})
    assert r.status_code == 200, r.text
    assert r.json()["count"] == 5 and r.json()["filename"] == "g001.jpg"


@pytest.mark.parametrize(
    ("call", "status", "fragment"),
    [
        (lambda s: s.post("/search/text", json={"query": "x" * 501}), 422, "longer than 500"),
        (lambda s: s.post("/search/text", json={"query": "   "}), 400, "empty text query"),
        (lambda s: s.post("/search/text", json={"query": ""}), 422, "query"),
        (lambda s: s.post("/search/text", json={"query": "a", "k": 0}), 422, "k:"),
        (lambda s: s.post("/search/text", json={"query": "a", "k": 101}), 422, "k: expected"),
        (lambda s: s.post("/search/text", content=b"{not json"), 422, ""),
        (
            lambda s: s.post("/search/image", files={"file": ("a.txt", b"hello", "text/plain")}),
            415,
            "not an image type",
        ),
        (
            lambda s: s.post(
                "/search/image", files={"file": ("a.jpg", b"\xff\xd8junk", "image/jpeg")}
            ),
            400,
            "cannot decode image",
        ),
        (
            lambda s: s.post(
                "/search/image", files={"file": ("big.jpg", b"\0" * 2_000_001, "image/jpeg")}
            ),
            413,
            "larger than",
        ),
        (
            lambda s: s.post(
                "/search/image", files={"file": ("a.jpg", _jpeg(), "image/jpeg")}, data={"k": "0"}
            ),
            422,
            "k: expected",
        ),
        (lambda s: s.get("/items/no-such-image.tif"), 404, "no image with id"),
        (lambda s: s.get("/items/no-such-image.tif/thumbnail"), 404, "no image with id"),
    ],
)
def test_bad_requests_get_json_errors_and_server_keeps_serving(service, call, status, fragment):
    r = call(service)
    assert r.status_code == status, r.text
    assert fragment in r.json()["error"]
    assert service.get("/healthz").status_code == 200


def test_model_loads_once(service, monkeypatch):
    import rshash.index.index as index_module

    def forbidden(*args, **kwargs):
        raise AssertionError("a request reloaded the model")

    monkeypatch.setattr(index_module.HashRun, "open", forbidden)
    r = service.post("/search/text", json={"query": "green trees", "k": 3})
    assert r.status_code == 200


QUERIES = [
    "a river crossing farmland",
    "many planes parked at the airport",
    "dense residential houses",
    "a parking lot full of cars",
    "green trees in a forest",
    "a baseball field beside a road",
    "white waves on a sandy beach",
    "an overpass over a highway",
    "two tennis courts",
    "storage tanks near a harbor",
    "a golf course with sand",
    "boats in the harbor",
]


async def _concurrently(url: str, calls: list) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        return await asyncio.gather(*(call(http) for call in calls))


def _metric(url: str) -> dict:
    """Samples of /metrics by (name, sorted labels), via prometheus_client's own parser."""
    text = httpx.get(url + "/metrics").text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _ids(body: dict) -> list[tuple[str, int]]:
    return [(h["id"], h["distance"]) for h in body["results"]]


@pytest.fixture(scope="module")
def batching_service(ucm_index):
    """A service whose batches fill: 20 ms to gather concurrent queries."""
    with running_service(ucm_index, ServiceConfig(max_wait_ms=20, max_batch=16)) as url:
        yield url


def test_batched_answers_equal_one_at_a_time_answers(batching_service, ucm_index):
    """Guards against batching mixing callers' results up, using the group's k for everyone,
    or grouping requests with different collections into one search."""
    index = Index.open(ucm_index)
    calls, want = [], []
    for i in range(36):
        query, k = QUERIES[i % len(QUERIES)], 1 + (7 * i) % 30
        collection = "captions" if i % 3 == 2 else "images"
        body = {"query": query, "k": k, "collection": collection}
        calls.append(lambda http, body=body: http.post("/search/text", json=body))
        want.append([(h.id, h.distance) for h in index.search_text(query, k, collection)])
    before = _metric(batching_service)
    got = asyncio.run(_concurrently(batching_service, calls))
    after = _metric(batching_service)
    for r, w in zip(got, want, strict=True):
        assert r.status_code == 200, r.text
        assert _ids(r.json()) == w
    batches = after[("rshash_batch_size_count", ())] - before[("rshash_batch_size_count", ())]
    queries = after[("rshash_batch_size_sum", ())] - before[("rshash_batch_size_sum", ())]
    assert queries == 36
    assert batches < 36 / 2, f"{batches} batches for 36 concurrent queries: not batched"


def test_batched_image_queries_equal_one_at_a_time_answers(batching_service, ucm_index):
    """Guards against image uploads in one batch getting each other's codes or views."""
    index = Index.open(ucm_index)
    paths = [
        RSSCN7 / c / f"{c[0]}00{i}.jpg"
        for c in ("aGrass", "gParking", "dRiverLake")
        for i in (1, 2)
    ]
    calls = [
        lambda http, p=p: http.post(
            "/search/image", files={"file": (p.name, p.read_bytes(), "image/jpeg")}, data={"k": "8"}
        )
        for p in paths
    ]
    got = asyncio.run(_concurrently(batching_service, calls))
    for r, p in zip(got, paths, strict=True):
        assert r.status_code == 200, r.text
        assert _ids(r.json()) == [(h.id, h.distance) for h in index.search_image(p, 8)]


def test_a_lone_query_is_answered_without_waiting_for_a_batch(ucm_index):
    """Guards against the batcher holding a single query for its full wait."""
    with running_service(ucm_index, ServiceConfig(max_wait_ms=5000)) as url:
        http = httpx.Client(base_url=url, timeout=60)
        http.post("/search/text", json={"query": "warm up", "k": 1})
        start = time.perf_counter()
        for q in QUERIES[:3]:
            assert http.post("/search/text", json={"query": q, "k": 5}).status_code == 200
        assert time.perf_counter() - start < 5


@pytest.mark.parametrize(
    "bound",
    [{"max_queue": 2}, {"max_queue": 1000, "max_queue_ms": 1}],
    ids=["by-count", "by-expected-wait"],
)
def test_excess_load_is_shed_at_once_with_retry_after(ucm_index, bound):
    """Guards against an unbounded queue: past the bound (a count, or the time the waiting
    queries need at the recent rate), requests must get 503 + Retry-After immediately, while
    the accepted ones are still answered correctly."""
    cfg = ServiceConfig(max_batch=1, retry_after_s=3, **bound)
    index = Index.open(ucm_index)
    with running_service(ucm_index, cfg) as url:
        warm = httpx.post(url + "/search/text", json={"query": "warm up", "k": 1}, timeout=60)
        assert warm.status_code == 200  # also gives the batcher its first service time

        calls = [
            lambda http, q=q: http.post("/search/text", json={"query": q, "k": 5})
            for q in QUERIES * 3
        ]
        answers = asyncio.run(_concurrently(url, calls))
        metrics = _metric(url)
    shed = [r for r in answers if r.status_code == 503]
    served = [r for r in answers if r.status_code == 200]
    assert len(shed) + len(served) == len(answers), [r.status_code for r in answers]
    assert shed and served
    for r in shed:
        assert r.headers["retry-after"] == "3"
        assert "busy" in r.json()["error"]
    for r in served:
        query = r.json()["query"]
        assert _ids(r.json()) == [(h.id, h.distance) for h in index.search_text(query, 5)]
    assert metrics[("rshash_shed_total", ())] == len(shed)
    text_503 = ("rshash_requests_total", (("endpoint", "/search/text"), ("status", "503")))
    assert metrics[text_503] == len(shed)


def test_metrics_parse_and_count_requests(ucm_index):
    """Guards against /metrics output that Prometheus cannot parse or that misses families."""
    with running_service(ucm_index) as url:
        http = httpx.Client(base_url=url, timeout=60)
        for q in QUERIES[:4]:
            assert http.post("/search/text", json={"query": q, "k": 3}).status_code == 200
        assert http.post("/search/text", json={"query": "a", "k": 0}).status_code == 422
        assert http.get("/items/nope/thumbnail").status_code == 404
        text = http.get("/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert {
        "rshash_requests",
        "rshash_request_seconds",
        "rshash_batch_size",
        "rshash_queue_depth",
        "rshash_index_items",
        "rshash_index_generation",
    } <= set(families)
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in families.values()
        for s in f.samples
    }
    assert (
        samples[("rshash_requests_total", (("endpoint", "/search/text"), ("status", "200")))] == 4
    )
    assert (
        samples[("rshash_requests_total", (("endpoint", "/search/text"), ("status", "422")))] == 1
    )
    assert (
        samples[
            ("rshash_requests_total", (("endpoint", "/items/{id}/thumbnail"), ("status", "404")))
        ]
        == 1
    )
    text_200 = (("endpoint", "/search/text"), ("status", "200"))
    assert samples[("rshash_request_seconds_count", text_200)] == 4
    assert (
        samples[("rshash_request_seconds_count", (("endpoint", "/search/text"), ("status", "422")))]
        == 1
    )
    assert samples[("rshash_batch_size_sum", ())] == 4
    assert samples[("rshash_index_items", (("collection", "images"),))] == 2100
    assert samples[("rshash_index_items", (("collection", "captions"),))] == 10500
    assert samples[("rshash_index_generation", ())] == 1
    assert samples[("rshash_queue_depth", ())] == 0


def test_live_index_update_while_serving(ucm_index, tmp_path):
    """Guards against a service that needs a restart to see `rshash index add` from another
    process, or that fails requests while the index switches generation."""
    index_copy = tmp_path / "index"
    shutil.copytree(ucm_index, index_copy, ignore=shutil.ignore_patterns("thumbnails"))
    new = tmp_path / "new"
    for cls in ("aGrass", "gParking"):
        (new / cls).mkdir(parents=True)
        for i in (1, 2, 3):
            shutil.copy(RSSCN7 / cls / f"{cls[0]}00{i}.jpg", new / cls)
    cfg = ServiceConfig(refresh_interval_s=0.2)
    statuses: list[int] = []
    stop = threading.Event()
    with running_service(index_copy, cfg) as url:

        def stream() -> None:
            with httpx.Client(base_url=url, timeout=60) as http:
                i = 0
                while not stop.is_set():
                    r = http.post("/search/text", json={"query": QUERIES[i % 12], "k": 10})
                    statuses.append(r.status_code)
                    i += 1

        streamer = threading.Thread(target=stream)
        streamer.start()
        try:
            added = subprocess.run(
                [sys.executable, "-m", "rshash.cli", "index", "add", str(index_copy), str(new)],
                capture_output=True,
                text=True,
                timeout=600,
            )
            assert added.returncode == 0, added.stderr
            http = httpx.Client(base_url=url, timeout=60)
            deadline = time.time() + 30
            while http.get("/healthz").json()["images"] != 2106 and time.time() < deadline:
                http.post("/search/text", json={"query": "a river", "k": 1})
                time.sleep(0.1)
            n_before = len(statuses)
            deadline = time.time() + 60
            while len(statuses) < n_before + 5 and time.time() < deadline:
                time.sleep(0.05)
            assert len(statuses) >= n_before + 5, "the query stream stalled after the switch"
        finally:
            stop.set()
            streamer.join(timeout=120)
        assert not streamer.is_alive(), "a query never returned"
        health = http.get("/healthz").json()
        assert health["images"] == 2106 and health["generation"] == 2
        probe = new / "gParking" / "g002.jpg"
        files = {"file": (probe.name, probe.read_bytes(), "image/jpeg")}
        top = http.post("/search/image", files=files, data={"k": "1"}).json()["results"][0]
        assert top["id"] == "gParking/g002.jpg" and top["distance"] == 0
        assert http.get("/items/gParking/g002.jpg").status_code == 200
    assert len(statuses) > 10
    assert set(statuses) == {200}, statuses
