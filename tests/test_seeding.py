"""Seeding is part of building a trainer: fresh processes give identical codes."""

import subprocess
import sys

import numpy as np

SCRIPT = """
import sys
import numpy as np
import torch
from rshash.training import CHNRConfig, OptimConfig, TrainConfig, HashRun, train
from rshash.features import FeatureStore

features, out, clutter = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
if clutter:  # what a benchmark or test might have created before: must not matter
    unrelated = [torch.nn.Linear(384, 4096), torch.nn.Dropout(0.3)]
    torch.rand(1000)
    np.random.rand(10)
cfg = TrainConfig(
    features=features,
    method="chnr",
    bits=16,
    hidden=64,
    device="cpu",
    optim=OptimConfig(epochs=3, batch_size=256),
    chnr=CHNRConfig(meta_epochs=2, noise=0.5, weighting="soft"),
)
run = HashRun.open(train(cfg, out, progress=False))
store = FeatureStore.open(features)
np.save(out + "/codes.npy", np.concatenate([
    run.encode_images(store.image["plain"]), run.encode_texts(store.text["plain"])
]))
"""


def test_training_twice_in_fresh_processes_gives_identical_codes(ucm_features, tmp_path):
    """Guards against trainers that are not seeded when built: initial weights (and the
    detector's dropout masks) then depend on what the process created before, which moved
    benchmark figures by ±0.02 between otherwise identical runs."""
    codes = []
    for clutter in ("0", "1"):
        out = tmp_path / f"run{clutter}"
        done = subprocess.run(
            [sys.executable, "-c", SCRIPT, str(ucm_features), str(out), clutter],
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        codes.append(np.load(out / "codes.npy"))
    assert codes[0].shape[1] == 16
    assert np.array_equal(codes[0], codes[1])
    assert len(np.unique(codes[0], axis=0)) > 50  # trained codes, not a constant
