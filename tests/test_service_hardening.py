"""The service under unusual and hostile input: every code length, oversized and bomb uploads,
load shedding before decoding, and files served only from the index's own archives."""

from __future__ import annotations

import io
import json
import socket
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx
import numpy as np
import pytest
from PIL import Image

from rshash.data import load_dataset
from rshash.index import Index
from rshash.index.build import RESERVED_FIELDS, build_index
from rshash.service import ServiceConfig
from tests.conftest import RSSCN7
from tests.service_server import running_service

PARKING = RSSCN7 / "gParking" / "g001.jpg"


@pytest.fixture(scope="module")
def index_of_bits(tmp_path_factory, short_run, ucm_features, ucm_path, ucm_index):
    """A UCM index (images and captions, from the cached features) per code length."""
    root = tmp_path_factory.mktemp("bits")

    def make(bits: int) -> Path:
        out = root / f"idx{bits}"
        if bits == 64:
            return ucm_index
        if not out.exists():
            ds = load_dataset(ucm_path, check_images=False)
            build_index(short_run(bits), ds, out, features=ucm_features, progress=False)
        return out

    return make


@pytest.mark.parametrize("bits", [16, 32, 48, 64, 128])
def test_every_code_length_is_served_over_http(index_of_bits, bits):
    """Guards against the service sizing its code buffer as bits // 8 while packed codes are
    whole 64-bit words: below 64 bits every text and image search answered 500."""
    path = index_of_bits(bits)
    index = Index.open(path)
    with running_service(path) as url, httpx.Client(base_url=url, timeout=60) as http:
        assert http.get("/healthz").json()["bits"] == bits
        for collection in ("images", "captions"):
            r = http.post(
                "/search/text", json={"query": "a river", "k": 10, "collection": collection}
            )
            assert r.status_code == 200, r.text
            want = [(h.id, h.distance) for h in index.search_text("a river", 10, collection)]
            assert [(h["id"], h["distance"]) for h in r.json()["results"]] == want
        files = {"file": (PARKING.name, PARKING.read_bytes(), "image/jpeg")}
        r = http.post("/search/image", files=files, data={"k": "5"})
        assert r.status_code == 200, r.text
        want = [(h.id, h.distance) for h in index.search_image(PARKING, 5)]
        assert [(h["id"], h["distance"]) for h in r.json()["results"]] == want


@pytest.fixture(scope="module")
def small_limits(ucm_index):
    config = ServiceConfig(max_upload_bytes=200_000, max_upload_pixels=4_000_000)
    with running_service(ucm_index, config) as url, httpx.Client(base_url=url, timeout=60) as c:
        yield c


def _png(size: tuple[int, int], mode: str = "1") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def test_a_small_file_declaring_a_huge_image_is_refused_before_decoding(small_limits):
    """Guards against decoding whatever an upload declares: a few KB of PNG can say 144 Mpx
    and decode to 432 MB."""
    bomb = _png((12_000, 12_000))
    assert len(bomb) < 200_000  # within the byte limit: only the pixel check can stop it
    r = small_limits.post("/search/image", files={"file": ("bomb.png", bomb, "image/png")})
    assert r.status_code == 400, r.text
    assert "12000×12000 pixels, more than the 4,000,000" in r.json()["error"]
    ok = small_limits.post(
        "/search/image", files={"file": ("ok.png", _png((600, 400), "RGB"), "image/png")}
    )
    assert ok.status_code == 200, ok.text


def _raw_request(url: str, head: bytes, body: bytes = b"") -> bytes:
    """Send a hand-made HTTP request and return what the server answers within 10 s."""
    parsed = urlparse(url)
    with socket.create_connection((parsed.hostname, parsed.port), timeout=10) as s:
        s.sendall(head + body)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        return data


def test_a_declared_oversized_body_is_refused_before_it_is_read(ucm_index):
    """Guards against spooling the whole upload to disk before checking its size: a request
    declaring 1 GB gets 413 at once, though not one byte of its body was sent."""
    with running_service(ucm_index, ServiceConfig(max_upload_bytes=100_000)) as url:
        head = (
            b"POST /search/image HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: multipart/form-data; boundary=b\r\n"
            b"Content-Length: 1000000000\r\n\r\n"
        )
        start = time.perf_counter()
        answer = _raw_request(url, head)
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        assert time.perf_counter() - start < 5
        big_json = b'{"query": "' + b"a" * 70_000 + b'"}'
        head = (
            b"POST /search/text HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(big_json)}\r\n\r\n".encode()
        )
        assert _raw_request(url, head).startswith(b"HTTP/1.1 413")


def test_a_streamed_oversized_body_is_cut_off_at_the_limit(ucm_index):
    """Guards against a limit that only applies to declared lengths: a chunked upload (no
    Content-Length) is refused once it passes the limit, long before the client finished."""
    sent = [0]
    total = 200_000_000

    def body():
        yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\n'
        yield b"Content-Type: image/jpeg\r\n\r\n"
        chunk = b"\0" * 65536
        while sent[0] < total:
            sent[0] += len(chunk)
            yield chunk
        yield b"\r\n--b--\r\n"

    with running_service(ucm_index, ServiceConfig(max_upload_bytes=100_000)) as url:
        headers = {"Content-Type": "multipart/form-data; boundary=b"}
        try:
            r = httpx.post(f"{url}/search/image", content=body(), headers=headers, timeout=30)
            assert r.status_code == 413, r.text
        except httpx.HTTPError:
            pass  # the server may close the connection while the client is still sending
        assert sent[0] < total // 10, f"the server read {sent[0]} bytes before refusing"
        assert httpx.get(f"{url}/healthz").status_code == 200


def test_uploads_are_shed_before_they_are_decoded(ucm_index, monkeypatch):
    """Guards against decoding uploads that load shedding then refuses: with the queue full,
    an image search must get 503 without its image being decoded. The overlap is forced: the
    batch in flight waits on an event until the upload has been answered."""
    import rshash.service.app as app_module

    release, in_batch = threading.Event(), threading.Event()
    real_batch, real_view = app_module.search_batch, app_module.image_view
    decoded: list[str] = []

    def held_batch(index, requests, *rest):
        in_batch.set()
        assert release.wait(60)
        return real_batch(index, requests, *rest)

    def counted_view(data, name, *args):
        decoded.append(name)
        return real_view(data, name, *args)

    monkeypatch.setattr(app_module, "search_batch", held_batch)
    monkeypatch.setattr(app_module, "image_view", counted_view)
    cfg = ServiceConfig(max_batch=1, max_queue=1, max_wait_ms=0)
    with running_service(ucm_index, cfg) as url:
        results: dict[str, int] = {}

        def query(name: str) -> None:
            r = httpx.post(f"{url}/search/text", json={"query": name}, timeout=60)
            results[name] = r.status_code

        first = threading.Thread(target=query, args=("a river",))
        first.start()
        assert in_batch.wait(30)  # the first query is being answered, the queue is empty
        second = threading.Thread(target=query, args=("a beach",))
        second.start()
        deadline = time.time() + 30
        while httpx.get(f"{url}/metrics").text.find("rshash_queue_depth 1.0") < 0:
            assert time.time() < deadline, "the second query never queued"
            time.sleep(0.05)
        files = {"file": (PARKING.name, PARKING.read_bytes(), "image/jpeg")}
        r = httpx.post(f"{url}/search/image", files=files, timeout=60)
        assert r.status_code == 503 and r.headers["Retry-After"] == "1", r.text
        assert decoded == []
        release.set()
        first.join(60)
        second.join(60)
        assert results == {"a river": 200, "a beach": 200}
        r = httpx.post(f"{url}/search/image", files=files, timeout=60)
        assert r.status_code == 200 and len(decoded) == 1


@pytest.fixture
def planted_index(ucm_run, tmp_path):
    """An index whose records name files inside its archive, outside it, and through a
    symbolic link that leads outside (as a hand-edited or hostile index could)."""
    archive = tmp_path / "archive"
    archive.mkdir()
    inside = archive / "inside.jpg"
    inside.write_bytes(PARKING.read_bytes())
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the web")
    (archive / "link.jpg").symlink_to(secret)
    index = Index.create(tmp_path / "idx", ucm_run)
    items = [
        {"id": "inside", "path": str(inside)},
        {"id": "outside", "path": str(secret)},
        {"id": "linked", "path": str(archive / "link.jpg")},
        {"id": "relative", "path": "../secret.txt"},
    ]
    codes = np.random.default_rng(0).integers(0, 256, (len(items), 8), dtype=np.uint8)
    index.add("images", codes, items)
    index.commit({"dataset": "planted", "path": str(archive), "root": str(archive)})
    index.close()
    return tmp_path / "idx"


def test_only_files_under_the_index_archives_are_served(planted_index):
    """Guards against serving whatever file a record's `path` names: only files that resolve
    (links followed) under a root recorded in the manifest are read."""
    with running_service(planted_index) as url, httpx.Client(base_url=url, timeout=30) as http:
        assert http.get("/items/inside/image").status_code == 200
        assert http.get("/items/inside/thumbnail").status_code == 200
        for item in ("outside", "linked", "relative"):
            for what in ("image", "thumbnail"):
                r = http.get(f"/items/{item}/{what}")
                assert r.status_code == 404, (item, what, r.text)
                assert "not available" in r.json()["error"]
                assert "not for the web" not in r.text


def test_user_fields_cannot_replace_reserved_record_fields(ucm_run, tmp_path, mini_dataset):
    """Guards against `--fields` rewriting `path` (the service would then serve any file),
    `id` or `window`: refused with one line, and no index is made."""
    from tests.conftest import rshash_cli

    first = json.loads((mini_dataset / "dataset.json").read_text())["images"][0]["filename"]
    fields = tmp_path / "fields.json"
    fields.write_text(json.dumps({first: {"year": 2010, "path": "/etc/passwd"}}))
    r = rshash_cli(
        "index", "build", ucm_run, mini_dataset, "--out", tmp_path / "idx", "--fields", fields
    )
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"error: {fields}: {first!r} sets path, which rshash sets from the archive (reserved: "
        f"{', '.join(sorted(RESERVED_FIELDS))}); rename the field"
    ]
    assert {"path", "window", "bands", "id", "stac_item", "asset_href"} <= RESERVED_FIELDS
    assert not (tmp_path / "idx").exists()
    from rshash.errors import RshashError

    with pytest.raises(RshashError, match="sets id, window"):
        build_index(
            ucm_run,
            load_dataset(mini_dataset),
            tmp_path / "idx2",
            extra={first: {"id": "x", "window": {}}},
            progress=False,
        )
    assert not (tmp_path / "idx2").exists()
