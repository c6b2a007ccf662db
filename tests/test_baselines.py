"""DJSRH and JDSH: the reconstruction objective by hand, and short runs on real UCM features."""

import pytest
import torch

from rshash.features import FeatureStore
from rshash.losses.reconstruction import (
    distribution_decision,
    joint_similarity,
    reconstruction_loss,
)
from rshash.training import OptimConfig, TrainConfig
from rshash.training.run import build_trainer, load_or_make_split
from tests.test_chnr import _map20


def test_joint_similarity_by_hand():
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    s = joint_similarity(image, text, image_weight=0.5, high_order=0.0)
    assert torch.allclose(s, torch.tensor([[1.0, 0.5], [0.5, 1.0]]))
    s2 = joint_similarity(image, text, image_weight=0.5, high_order=1.0)
    assert torch.allclose(s2, torch.tensor([[0.625, 0.5], [0.5, 0.625]]))


def test_distribution_decision_raises_similar_and_lowers_dissimilar():
    s = torch.tensor([[0.9, 0.1, 0.1, 0.1, -0.7]])
    target, weight = distribution_decision(s, spread=1.0, boost=0.2, damp=0.5)
    assert target[0, 0] == pytest.approx(1.0)  # 0.9 · 1.2, capped at 1
    assert target[0, 4] == pytest.approx(-0.35)
    assert torch.equal(target[0, 1:4], s[0, 1:4]) and (weight[0, 1:4] == 1).all()
    assert weight[0, 0] > 1 and weight[0, 4] > 1


def test_reconstruction_loss_is_zero_when_codes_match_the_target():
    h = torch.tensor([[1.0, 1.0], [1.0, -1.0]])
    target = torch.eye(2)
    assert reconstruction_loss(target, h, h, scale=1.0, intra_weight=0.1).item() == pytest.approx(0)
    loss = reconstruction_loss(target, h, -h, scale=1.0, intra_weight=0.0)
    assert loss.item() == pytest.approx(2.0)  # cos(h, -h) = -I: (1 - -1)² on the 2 of 4 entries


@pytest.mark.slow
@pytest.mark.parametrize("method", ["djsrh", "jdsh"])
def test_short_baseline_run_on_real_ucm_beats_chance(method, ucm_features, tmp_path):
    cfg = TrainConfig(
        features=str(ucm_features), method=method, device="cpu", optim=OptimConfig(epochs=20)
    )
    store = FeatureStore.open(ucm_features)
    split = load_or_make_split(tmp_path, store, cfg)
    trainer = build_trainer(cfg, store, split, tmp_path)
    for epoch in range(cfg.optim.epochs):
        trainer.run_epoch(epoch)
    got = _map20(trainer, store, split)
    message = f"{method} 20 epochs, mAP@20 I→T {got['i2t']:.3f} T→I {got['t2i']:.3f} (chance 0.05)"
    print(message)
    assert got["i2t"] > 0.5 and got["t2i"] > 0.5, message
