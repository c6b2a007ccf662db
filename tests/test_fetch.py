"""`rshash datasets fetch` against a loopback HTTP server holding a small UCM-like archive."""

import hashlib
import http.server
import json
import threading
import zipfile
from dataclasses import replace
from functools import partial

import pytest

from rshash.data import load_dataset
from rshash.data.fetch import UCM_CAPTIONS, FetchSpec, Source, fetch_dataset
from rshash.errors import DataError
from tests.conftest import UCM, rshash_cli

CLASSES = ("beach", "agricultural", "river")  # zipped out of order: numbering is alphabetical


@pytest.fixture
def server(tmp_path):
    """Serve `tmp_path/www` on 127.0.0.1; yields (folder, base URL)."""
    www = tmp_path / "www"
    www.mkdir()
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield www, f"http://127.0.0.1:{httpd.server_port}/"
    httpd.shutdown()


def _publish(www, per_class=2, drop_caption=False):
    """A zip of real UCM TIFFs laid out like UCMerced_LandUse.zip, and its caption JSON."""
    tif = sorted((UCM / "tif-sample").glob("*.tif"))
    with zipfile.ZipFile(www / "UCMerced_LandUse.zip", "w") as zf:
        for c, cls in enumerate(CLASSES):
            for n in range(per_class):
                zf.write(tif[c], f"UCMerced_LandUse/Images/{cls}/{cls}{n:02d}.tif")
    images = [
        {
            "filename": f"{i}.tif",
            "classname": sorted(CLASSES)[(i - 1) // per_class],
            "sentences": [{"raw": f"caption {i} a"}, {"raw": f"caption {i} b"}],
        }
        for i in range(1, len(CLASSES) * per_class + 1)
    ]
    if drop_caption:
        images = images[:-1]
    (www / "dataset.json").write_text(json.dumps({"images": images}))
    zipped = (www / "UCMerced_LandUse.zip").read_bytes()
    return len(zipped), hashlib.md5(zipped).hexdigest()


def _spec(base, size, md5):
    return FetchSpec(
        name="mini-ucm",
        images=Source(base + "UCMerced_LandUse.zip", "UCMerced_LandUse.zip", size, md5),
        captions=Source(base + "dataset.json", "dataset.json"),
        classes=len(CLASSES),
        images_per_class=2,
    )


def test_fetch_verifies_lays_out_and_skips_done_work(server, tmp_path):
    www, base = server
    size, md5 = _publish(www)
    out = tmp_path / "datasets"
    target = fetch_dataset(_spec(base, size, md5), out, progress=False)
    ds = load_dataset(target)
    assert len(ds.image_paths) == 6 and sum(len(c) for c in ds.captions) == 12
    # image N is class (N-1)//2 in alphabetical order: 3.tif comes from beach00.tif
    assert (target / "images" / "3.tif").read_bytes() == sorted(UCM.glob("tif-sample/*.tif"))[
        0
    ].read_bytes()
    record = json.loads((target / "FETCH.json").read_text())
    assert record["images"] == 6 and record["captions"] == 12
    assert record["sources"][0]["md5"] == md5
    (www / "UCMerced_LandUse.zip").unlink()  # a second fetch must not download again
    assert fetch_dataset(_spec(base, size, md5), out, progress=False) == target


def test_checksum_mismatch_keeps_nothing(server, tmp_path):
    www, base = server
    size, _ = _publish(www)
    out = tmp_path / "datasets"
    with pytest.raises(DataError, match=r"MD5 .* expected 0{32}; nothing was kept"):
        fetch_dataset(_spec(base, size, "0" * 32), out, progress=False)
    assert not (out / "mini-ucm").exists()
    assert not list(out.rglob("*.part")) and not list(out.rglob("*.zip"))


def test_caption_json_must_cover_every_image(server, tmp_path):
    www, base = server
    size, md5 = _publish(www, drop_caption=True)
    with pytest.raises(DataError, match=r"must name 1.tif..6.tif once each; got 5 entries"):
        fetch_dataset(_spec(base, size, md5), tmp_path / "datasets", progress=False)
    assert not (tmp_path / "datasets" / "mini-ucm").exists()


def test_cli_checks_the_published_ucm_checksum(server, tmp_path):
    www, base = server
    _publish(www)
    out = tmp_path / "datasets"
    r = rshash_cli("datasets", "fetch", "ucm-captions", "--mirror", base, "--out", out)
    assert r.returncode == 2
    error = r.stderr.strip().splitlines()[-1]  # after the download's progress bar
    assert error.startswith("error: ") and "UCMerced_LandUse.zip: MD5 " in error
    assert error.endswith(f"expected {UCM_CAPTIONS.images.md5}; nothing was kept")
    assert not (out / "ucm-captions").exists()


def test_cli_without_a_caption_url_says_where_to_get_it(tmp_path):
    r = rshash_cli("datasets", "fetch", "ucm-captions", "--out", tmp_path)
    assert r.returncode == 2 and "--captions-url" in r.stderr and "Google Drive" in r.stderr
    r = rshash_cli("datasets", "fetch", "sydney", "--out", tmp_path)
    assert r.returncode == 2 and "expected one of ucm-captions" in r.stderr


def test_mirror_replaces_both_urls():
    spec = UCM_CAPTIONS.with_mirror("http://127.0.0.1:9/ucm")
    assert spec.images.url == "http://127.0.0.1:9/ucm/UCMerced_LandUse.zip"
    assert spec.captions.url == "http://127.0.0.1:9/ucm/dataset.json"
    assert replace(spec, name="x").images.md5 == UCM_CAPTIONS.images.md5
