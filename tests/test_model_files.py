"""Model files never execute code: runs and indexes hold safetensors + JSON, a pickled model.pt
from an older rshash is refused until converted, and the conversion itself cannot run code."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from rshash.errors import RshashError
from rshash.features import FeatureStore
from rshash.index import Index
from rshash.models.model_file import load_model, model_fingerprint
from rshash.training import HashRun
from tests.conftest import rshash_cli
from tests.test_index_store import legacy_model_dir


class _Payload:
    """Unpickling this runs `touch MARKER`: what a hostile model file would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _hostile_pickle(target: Path, marker: Path) -> None:
    with open(target, "wb") as f:
        pickle.dump({"bits": 64, "image_net": _Payload(marker)}, f)


def _run_copy(run: Path, target: Path) -> Path:
    shutil.copytree(run, target, ignore=shutil.ignore_patterns("checkpoint.pt"))
    return target


def test_a_run_holds_no_pickle(ucm_run):
    assert {p.name for p in ucm_run.glob("model*")} == {"model.safetensors", "model.json"}
    assert HashRun.open(ucm_run).bits == 64
    assert set(load_model(ucm_run)) >= {"image_net", "text_net", "bits", "image_encoder"}


def test_a_hostile_pickle_is_never_executed(ucm_run, ucm_index, tmp_path):
    """Guards against `torch.load(weights_only=False)` on a model file: a run or an index from
    someone else ran arbitrary code when opened, served or upgraded."""
    marker = tmp_path / "pwned"
    run = tmp_path / "run"
    run.mkdir()
    for name in ("config.json", "split.json"):
        shutil.copy(ucm_run / name, run / name)
    _hostile_pickle(run / "model.pt", marker)
    with pytest.raises(RshashError, match=r"pickled model\.pt .* not loaded"):
        HashRun.open(run)
    r = rshash_cli("index", "upgrade", run)
    assert r.returncode == 2 and r.stderr.startswith(f"error: {run / 'model.pt'}: not converted")
    index = tmp_path / "index"
    shutil.copytree(ucm_index, index, ignore=shutil.ignore_patterns("thumbnails"))
    for name in ("model.safetensors", "model.json"):
        (index / "model" / name).unlink()
    _hostile_pickle(index / "model" / "model.pt", marker)
    for args in (("search", index, "a river"), ("index", "info", index)):
        r = rshash_cli(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert "rshash index upgrade" in r.stderr.strip().splitlines()[-1]
    from rshash.service import create_app

    with pytest.raises(RshashError, match="rshash index upgrade"):
        create_app(index)
    assert rshash_cli("index", "upgrade", index).returncode == 2
    checkpoint = _run_copy(ucm_run, tmp_path / "resume")
    _hostile_pickle(checkpoint / "checkpoint.pt", marker)
    from rshash.training import OptimConfig, TrainConfig, train

    features = HashRun.open(ucm_run).config.features
    with pytest.raises(RshashError, match=r"checkpoint\.pt: not resumed"):
        train(
            TrainConfig(features=features, bits=64, optim=OptimConfig(epochs=61)),
            checkpoint,
            progress=False,
        )
    assert not marker.exists()


def test_an_older_run_and_index_convert_and_keep_their_codes(ucm_run, ucm_index, tmp_path):
    """Guards against an upgrade that loses or changes the model: after conversion the run and
    the index encode exactly as before, and the index names the converted model."""
    run = legacy_model_dir(ucm_run, tmp_path / "run")
    with pytest.raises(RshashError, match=f"rshash index upgrade {run}"):
        HashRun.open(run)
    r = rshash_cli("index", "upgrade", run)
    assert r.returncode == 0, r.stderr
    assert not (run / "model.pt").exists()
    features = FeatureStore.open(HashRun.open(ucm_run).config.features).image["plain"][:50]
    assert np.array_equal(
        HashRun.open(run).encode_images(features), HashRun.open(ucm_run).encode_images(features)
    )
    index = tmp_path / "index"
    shutil.copytree(ucm_index, index, ignore=shutil.ignore_patterns("thumbnails", "model"))
    legacy_model_dir(ucm_run, index / "model")
    r = rshash_cli("index", "upgrade", index)
    assert r.returncode == 0, r.stderr
    upgraded = Index.open(index)
    assert upgraded.fingerprint == model_fingerprint(index / "model")
    want = [(h.id, h.distance) for h in Index.open(ucm_index).search_text("a river", k=20)]
    assert [(h.id, h.distance) for h in upgraded.search_text("a river", k=20)] == want
    r = rshash_cli("index", "upgrade", index)
    assert r.returncode == 2 and "already in the current format" in r.stderr


def test_weights_only_loading_keeps_resuming_real_checkpoints(ucm_run):
    """The restricted loader must still read the checkpoints training writes."""
    state = torch.load(ucm_run / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert state["epoch"] == 59 and "trainer" in state
