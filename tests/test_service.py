"""The HTTP API with the real model and a real index of UCM: every endpoint and bad input."""

import io

import httpx
import pytest
from PIL import Image

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
