"""Feature extraction on real UCM images: views, shapes, determinism, resume, meaning."""

import os
import re
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
from PIL import Image

from rshash.data import load_dataset
from rshash.features import ExtractConfig, FeatureStore, extract_features
from rshash.features.views import (
    ImageViewConfig,
    augmented_caption,
    augmented_view,
    item_rng,
    perturb_caption,
    plain_view,
)


def test_image_views_are_seeded_per_item(ucm_path):
    img = Image.open(ucm_path / "images" / "1.jpg").convert("RGB")
    cfg = ImageViewConfig()
    assert plain_view(img, cfg).size == (224, 224)
    a = np.asarray(augmented_view(img, cfg, item_rng(0, "image", 5)))
    b = np.asarray(augmented_view(img, cfg, item_rng(0, "image", 5)))
    c = np.asarray(augmented_view(img, cfg, item_rng(0, "image", 6)))
    assert a.shape == (224, 224, 3) and np.array_equal(a, b) and not np.array_equal(a, c)
    assert not np.array_equal(a, np.asarray(plain_view(img, cfg)))


def test_caption_views():
    caps = ("a river", "a river", "green trees by a river")
    assert augmented_caption(caps, 0, item_rng(0, "caption", 0), "x") == "green trees by a river"
    assert augmented_caption(("only one",), 0, item_rng(0, "caption", 0), "fallback") == "fallback"
    text = "many buildings and green trees are around the parking lot"
    p = perturb_caption(text, item_rng(1, "perturb", 0))
    assert p != text and set(p.split()) <= set(text.split())
    assert p == perturb_caption(text, item_rng(1, "perturb", 0))


def _extract(dataset, out, **kw):
    cfg = ExtractConfig(image_batch=4, text_batch=16, **kw)
    return FeatureStore.open(extract_features(load_dataset(dataset), out, cfg, progress=False))


def test_extraction_shapes_finite_and_deterministic(mini_dataset, tmp_path):
    a = _extract(mini_dataset, tmp_path / "a.h5")
    b = _extract(mini_dataset, tmp_path / "b.h5")
    assert a.image["plain"].shape == (12, 1280) and a.image["augmented"].shape == (12, 1280)
    for view in ("plain", "augmented", "perturbed"):
        assert a.text[view].shape == (60, 384)
        assert np.isfinite(a.text[view]).all()
        assert np.array_equal(a.text[view], b.text[view])
    assert np.isfinite(a.image["plain"]).all()
    assert np.array_equal(a.image["augmented"], b.image["augmented"])
    assert not np.allclose(a.image["plain"], a.image["augmented"])
    assert a.caption_offsets.tolist() == list(range(0, 61, 5))
    assert a.metadata["image_encoder"]["name"] == "efficientnet-lite0"
    assert a.metadata["text_encoder"] == {"name": "all-minilm-l6-v2", "dim": 384, "backend": "onnx"}
    assert a.metadata["backend"] == "onnx"  # training features: the fp32 export, torch's features
    assert a.metadata["seed"] == 0 and "torch" in a.metadata["versions"]
    assert list(tmp_path.glob("*.partial")) == []


def test_resume_after_kill_equals_uninterrupted(mini_dataset, tmp_path):
    whole = _extract(mini_dataset, tmp_path / "whole.h5")
    out = tmp_path / "killed.h5"
    cmd = [
        sys.executable,
        "-m",
        "rshash.cli",
        "features",
        "extract",
        str(mini_dataset),
        "--out",
        str(out),
        "--batch-size",
        "4",
    ]
    proc = subprocess.Popen(
        cmd, stderr=subprocess.PIPE, text=True, env={**os.environ, "TQDM_MININTERVAL": "0"}
    )
    seen = ""
    deadline = time.time() + 300
    assert proc.stderr is not None
    while time.time() < deadline:
        seen += proc.stderr.read(1)
        done = re.findall(r"features:[^|]*\|[^|]*\| *(\d+)/", seen)
        if done and int(done[-1]) >= 4:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = tmp_path / "killed.h5.partial"
    assert partial.exists() and not out.exists(), seen[-300:]
    with h5py.File(partial, "r") as f:
        done = f["progress/images"][...]
    assert 0 < done.sum() < len(done), f"kill landed outside image extraction: {done}"
    resumed = FeatureStore.open(
        extract_features(
            load_dataset(mini_dataset),
            out,
            ExtractConfig(image_batch=4, text_batch=16),
            progress=False,
        )
    )
    for view in ("plain", "augmented"):
        assert np.array_equal(resumed.image[view], whole.image[view])
    assert np.array_equal(resumed.text["augmented"], whole.text["augmented"])
    assert not partial.exists()


def _neighbour_agreement(x, labels, k=10):
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    sim = x @ x.T
    np.fill_diagonal(sim, -np.inf)
    nn = np.argsort(-sim, axis=1)[:, :k]
    return float((labels[nn] == labels[:, None]).mean())


@pytest.mark.slow
def test_real_ucm_features_carry_meaning(ucm_features):
    store = FeatureStore.open(ucm_features)
    labels = store.require_labels()
    assert store.image["plain"].shape == (2100, 1280)
    assert store.text["plain"].shape == (10500, 384)
    img = _neighbour_agreement(store.image["plain"], labels)
    first_caption = store.text["plain"][store.caption_offsets[:-1]]
    txt = _neighbour_agreement(first_caption, labels)
    chance = 1 / 21
    assert img > 0.7, f"image 10-NN same-class rate {img:.3f} (chance {chance:.3f})"
    assert txt > 0.8, f"caption 10-NN same-class rate {txt:.3f} (chance {chance:.3f})"


def test_demo_reuses_the_features_make_test_cached(ucm_features, ucm_path, mini_dataset, tmp_path):
    """Guards against `make demo` after `make test` extracting UCM features again (ten minutes
    on 2 cores), and against reusing a store that is another extraction (other items, seed or
    backend) as if it were the demo's."""
    from rshash.demo import _reuse_test_features
    from rshash.features.extract import same_extraction

    ucm = load_dataset(ucm_path)
    assert same_extraction(ucm_features, ucm, ExtractConfig())
    assert not same_extraction(ucm_features, ucm, ExtractConfig(seed=1))
    assert not same_extraction(ucm_features, ucm, ExtractConfig(backend="torch"))
    assert not same_extraction(ucm_features, load_dataset(mini_dataset), ExtractConfig())
    out = tmp_path / "demo" / "ucm-features.h5"
    assert _reuse_test_features(ucm, out)
    assert FeatureStore.open(out).image_ids == FeatureStore.open(ucm_features).image_ids
    assert not _reuse_test_features(load_dataset(mini_dataset), tmp_path / "other.h5")
