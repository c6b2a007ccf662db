"""Clean-subset-free CHNR (`--weighting self`): mixture posteriors and real noisy UCM pairs."""

import copy
from dataclasses import replace

import numpy as np
import pytest
import torch

from rshash.features import FeatureStore
from rshash.training import CHNRConfig, OptimConfig, TrainConfig
from rshash.training.run import build_trainer, load_or_make_split
from rshash.training.self_weighting import clean_probability, cross_modal_losses, smooth_weights
from tests.test_chnr import _map20


def test_clean_probability_separates_two_loss_modes():
    rng = np.random.default_rng(0)
    losses = np.concatenate([rng.normal(1.0, 0.2, 300), rng.normal(4.0, 0.3, 100)])
    prob = clean_probability(losses)
    assert prob[:300].mean() > 0.95 and prob[300:].mean() < 0.05
    assert np.array_equal(clean_probability(np.full(5, 2.0)), np.ones(5))


def test_a_small_cluster_of_easy_pairs_does_not_take_the_clean_label():
    # The shape of real UCM losses after warm-up: ~2 % very easy pairs far below the clean bulk.
    rng = np.random.default_rng(1)
    easy, clean, noisy = (
        rng.normal(0.5, 0.05, 20),
        rng.normal(4.7, 0.1, 700),
        rng.normal(5.4, 0.1, 300),
    )
    losses = np.concatenate([easy, clean, noisy])
    for seed in range(5):
        prob = clean_probability(losses, seed=seed)
        assert prob[:720].mean() > 0.9 and prob[720:].mean() < 0.1
        order = np.argsort(losses)
        assert np.all(np.diff(prob[order][-300:]) <= 1e-12)  # falls with the loss in the tail


def test_smooth_weights_is_an_exponential_moving_average():
    assert np.array_equal(smooth_weights(None, np.array([0.2, 1.0]), 0.5), [0.2, 1.0])
    assert np.allclose(
        smooth_weights(np.array([1.0, 0.0]), np.array([0.0, 1.0]), 0.75), [0.75, 0.25]
    )


def test_cross_modal_losses_are_low_for_matching_pairs():
    torch.manual_seed(0)
    h = torch.nn.functional.normalize(torch.randn(8, 16), dim=1)
    text = h.clone()
    text[5] = -h[5]  # one mismatched pair
    losses = cross_modal_losses(h, text, 0.1, torch.arange(8), batch=4)
    assert losses.argmax().item() == 5 and losses[5] > 5 * losses[[0, 1, 2, 3, 4]].max()


@pytest.mark.slow
def test_self_weights_find_noise_without_a_clean_subset(ucm_features, tmp_path):
    """Guards against self weights that do not find the swapped pairs or do not help: they
    must separate noise (unprotected pairs) and beat equal weights from the same warm-up
    (trainers seed themselves, so the comparison is the same on every run)."""
    warmup, total = 20, 40
    cfg = TrainConfig(
        features=str(ucm_features),
        method="chnr",
        device="cpu",
        optim=OptimConfig(epochs=total),
        chnr=CHNRConfig(meta_epochs=warmup, noise=0.5, clean_fraction=0.3, weighting="self"),
    )
    store = FeatureStore.open(ucm_features)
    split = load_or_make_split(tmp_path, store, cfg)
    ours = build_trainer(cfg, store, split, tmp_path)
    for epoch in range(warmup):
        ours.run_epoch(epoch)
    base = build_trainer(
        replace(cfg, chnr=replace(cfg.chnr, weighting="ones")), store, split, tmp_path / "b"
    )
    base.load_state_dict(copy.deepcopy(ours.state_dict()))
    history = [ours.run_epoch(epoch) for epoch in range(warmup, total)]
    for epoch in range(warmup, total):
        base.run_epoch(epoch)
    auc = ours.detection_scores(ours.weights.numpy())["noise_auc"]
    first_auc = history[0]["noise_auc"]
    a, b = _map20(ours, store, split), _map20(base, store, split)
    message = (
        f"self weights: AUC {first_auc:.3f} → {auc:.3f}; mAP@20 I→T {a['i2t']:.3f} T→I "
        f"{a['t2i']:.3f} vs all pairs equal I→T {b['i2t']:.3f} T→I {b['t2i']:.3f}"
    )
    print(message)
    assert auc > 0.85, message
    assert a["i2t"] > b["i2t"] and a["t2i"] > b["t2i"], message
