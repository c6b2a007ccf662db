"""Encoder backends (torch, onnx, onnx-int8) on real UCM images and captions: same features
within stated tolerances, a verified export cache, the backend recorded and checked by the
index, the build's decode pool, and the service's query cache."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from rshash.data import load_dataset
from rshash.errors import RshashError
from rshash.features import backends
from rshash.features.backends import DEFAULT_CPU_BACKEND, OnnxImageEncoder, OnnxTextEncoder
from rshash.features.encoders import load_image_encoder, load_text_encoder
from rshash.features.views import ImageViewConfig, plain_view
from rshash.index import Index
from rshash.index.build import BuildConfig, build_index
from rshash.index.encoder import CodeEncoder
from rshash.models.run import HashRun
from rshash.service import ServiceConfig
from rshash.service.query_cache import QueryCache
from tests.conftest import UCM, rshash_cli
from tests.service_server import running_service

CPU = torch.device("cpu")
CAPTIONS = [
    "many buildings and green trees are in a dense residential area",
    "a river",
    "two tennis courts are beside a road with some cars",
    "an airplane is parked at the airport",
]


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.fixture(scope="module")
def views() -> list[Image.Image]:
    paths = sorted((UCM / "images").iterdir())[::300][:6]
    return [plain_view(Image.open(p).convert("RGB"), ImageViewConfig()) for p in paths]


@pytest.fixture(scope="module")
def torch_image():
    return load_image_encoder("efficientnet-lite0", CPU)


@pytest.fixture(scope="module")
def torch_text():
    return load_text_encoder("all-minilm-l6-v2", CPU)


def test_onnx_image_features_equal_torch(torch_image, views):
    """Guards against an export that drops or changes a layer (fp32 must match torch)."""
    ref = torch_image.encode(views)
    out = OnnxImageEncoder(torch_image, "onnx").encode(views)
    assert out.shape == ref.shape
    assert _cos(out, ref).min() >= 0.9999


def test_onnx_text_features_equal_torch_and_int8_stays_close(torch_text):
    """Guards against a text graph that pools or tokenizes differently from sentence-transformers
    (fp32: cosine ≥ 0.9999), and an int8 model that drifts (measured min 0.993; bound 0.98)."""
    texts = [*CAPTIONS, "  a river  "]  # padding to the longest text, stripped whitespace
    ref = torch_text.encode(texts)
    assert _cos(OnnxTextEncoder(torch_text, "onnx").encode(texts), ref).min() >= 0.9999
    assert _cos(OnnxTextEncoder(torch_text, "onnx-int8").encode(texts), ref).min() >= 0.98


def test_corrupt_or_missing_cache_files_are_exported_again(
    tmp_path, monkeypatch, torch_image, views
):
    """Guards against trusting a damaged cached model: a flipped byte or a broken pointer file
    must lead to a fresh export, never to a session built from the damaged bytes."""
    monkeypatch.setenv("RSHASH_CACHE", str(tmp_path))
    ref = torch_image.encode(views[:2])
    OnnxImageEncoder(torch_image, "onnx")
    (pointer,) = (tmp_path / "onnx").glob("*.json")
    model = tmp_path / "onnx" / json.loads(pointer.read_text())["file"]
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    assert backends._verified(pointer) is None
    out = OnnxImageEncoder(torch_image, "onnx").encode(views[:2])
    assert _cos(out, ref).min() >= 0.9999
    assert backends._verified(pointer) is not None  # rewritten, verified again
    pointer.write_text("{not json")
    assert _cos(OnnxImageEncoder(torch_image, "onnx").encode(views[:2]), ref).min() >= 0.9999
    assert backends._verified(pointer) is not None


def test_bad_backend_is_a_one_line_error(tmp_path, ucm_run):
    """Guards against an unknown --backend reaching the encoders (a traceback, or silently
    falling back to another backend)."""
    for args in (
        ("features", "extract", UCM, "--out", tmp_path / "f.h5", "--backend", "tpu"),
        ("search", tmp_path / "nothing", "a river", "--backend", "onnx-int4"),
    ):
        done = rshash_cli(*args)
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: unknown backend"), done.stderr
    with pytest.raises(RshashError, match="unknown backend"):
        CodeEncoder(HashRun.open(ucm_run), "cpu", "openvino")


def test_index_records_backend_and_mixes_only_measured_backends(tmp_path, mini_dataset, ucm_run):
    """Guards against an index that forgets which backend encoded it, that refuses a backend
    measured to give the same retrieval (benchmarks/encoders.py, mixed), or that trusts a
    manifest naming a backend we do not have. Also checks that the build's decode pool keeps
    batches in order: its codes equal a direct encode of the files."""
    ds = load_dataset(mini_dataset)
    out = tmp_path / "idx"
    cfg = BuildConfig(image_batch=4, workers=2, backend="onnx")
    build_index(ucm_run, ds, out, cfg, progress=False)
    assert json.loads((out / "index.json").read_text())["model"]["backend"] == "onnx"
    info = rshash_cli("index", "info", out)
    assert info.returncode == 0 and "encoded with backend: onnx" in info.stdout
    index = Index.open(out)
    direct = CodeEncoder(HashRun.open(ucm_run), "cpu", "onnx").encode_image_files(ds.image_paths)
    assert np.array_equal(index.collections["images"].codes, direct)
    assert index.encoder.backend == DEFAULT_CPU_BACKEND == "onnx-int8"  # queries: the default
    assert Index.open(out, backend="torch").encoder.backend == "torch"
    manifest = json.loads((out / "index.json").read_text())
    manifest["model"]["backend"] = "onnx-int4"
    (out / "index.json").write_text(json.dumps(manifest))
    with pytest.raises(RshashError, match=r"model\.backend: expected one of") as exc:
        Index.open(out)
    assert "\n" not in str(exc.value)


def test_int8_text_codes_do_not_depend_on_their_batch(ucm_run):
    """Guards against dynamic int8 scaling a padded batch's activations together: a query's code
    (and so its answer) would change with the queries the service batched beside it."""
    encoder = CodeEncoder(HashRun.open(ucm_run), "cpu", "onnx-int8")
    texts = [*CAPTIONS, "a river", "many tall buildings beside a wide road and a parking lot"]
    alone = np.concatenate([encoder.encode_texts([t]) for t in texts])
    assert np.array_equal(encoder.encode_texts(texts), alone)
    assert np.array_equal(encoder.encode_texts(texts[::-1]), alone[::-1])


def test_query_cache_returns_the_uncached_code(ucm_index):
    """Guards against a cache that keys or normalises queries so that a hit differs from what
    the encoder gives for the query, or that mixes up codes within a batch."""
    encoder = Index.open(ucm_index).encoder
    cache = QueryCache(8)
    queries = ["  a   river ", "a river", *CAPTIONS]
    first = cache.encode(queries, encoder.encode_texts)
    again = cache.encode(list(reversed(queries)), encoder.encode_texts)
    uncached = encoder.encode_texts(queries)
    assert np.array_equal(first, uncached)
    assert np.array_equal(again, uncached[::-1])
    assert len(cache) == len(CAPTIONS)  # "  a   river " and "a river" share one entry
    small = QueryCache(2)
    small.encode(CAPTIONS, encoder.encode_texts)
    assert len(small) == 2


def test_service_counts_cache_hits_and_misses(ucm_index):
    """Guards against /metrics missing the cache counters, or a repeated query not hitting."""
    with running_service(ucm_index, ServiceConfig(query_cache=16)) as url:
        http = httpx.Client(base_url=url, timeout=300)  # the first query loads the encoder
        answers = [
            http.post("/search/text", json={"query": q, "k": 5}).json()
            for q in ("a river", "a  river", "a beach")
        ]
        text = http.get("/metrics").text
    assert answers[0]["results"] == answers[1]["results"]
    samples = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples["rshash_query_cache_hits_total"] == 1
    assert samples["rshash_query_cache_misses_total"] == 2
