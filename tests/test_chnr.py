"""CHNR on real UCM features with half of the unprotected captions swapped (p = 0.5)."""

import copy
from dataclasses import replace

import numpy as np
import pytest
import torch

from rshash.evaluation.protocol import score_directions
from rshash.features import FeatureStore
from rshash.training import CHNRConfig, OptimConfig, TrainConfig
from rshash.training.chnr import noise_detection_scores, pair_weights
from rshash.training.duch import epoch_generator
from rshash.training.run import build_trainer, load_or_make_split


def test_pair_weightings():
    s = torch.tensor([0.2, 0.5, 0.9])
    assert torch.allclose(pair_weights(s, "soft", 0.6), s)
    assert torch.allclose(pair_weights(s, "cubed", 0.6), s**3)
    assert pair_weights(s, "discrete", 0.6).tolist() == [0.0, 0.0, 1.0]
    assert pair_weights(s, "ones", 0.6).tolist() == [1.0, 1.0, 1.0]


def test_noise_detection_scores():
    noisy = np.array([True, False, True, False])
    assert noise_detection_scores(np.array([0.1, 0.9, 0.2, 0.8]), noisy)["noise_auc"] == 1.0
    assert noise_detection_scores(np.array([0.9, 0.1, 0.8, 0.2]), noisy)["noise_auc"] == 0.0


def test_noise_detection_scores_only_the_pairs_asked_for():
    """Guards against an AUC inflated by the protected clean pairs the detector trained on:
    here they score 1.0 and would lift the AUC from 0.5 to 0.75 if counted."""
    noisy = np.array([True, False, True, False, False, False])
    weights = np.array([0.5, 0.5, 0.5, 0.5, 1.0, 1.0])
    unprotected = np.array([True, True, True, True, False, False])
    assert noise_detection_scores(weights, noisy, unprotected)["noise_auc"] == 0.5
    assert noise_detection_scores(weights, noisy)["noise_auc"] == 0.75


def _small_chnr(ucm_features, tmp_path, **chnr):
    cfg = TrainConfig(
        features=str(ucm_features),
        method="chnr",
        bits=16,
        hidden=64,
        device="cpu",
        optim=OptimConfig(epochs=4, batch_size=128),
        chnr=CHNRConfig(meta_epochs=2, noise=0.5, weighting="soft", **chnr),
    )
    store = FeatureStore.open(ucm_features)
    split = load_or_make_split(tmp_path, store, cfg)
    return build_trainer(cfg, store, split, tmp_path), store


def test_phase_one_trains_on_the_clean_subset_only(ucm_features, tmp_path):
    """Guards against meta-learning that sees noisy pairs (the hash networks or the
    detector's true and mismatched pairs drawn outside the protected clean subset)."""
    tr, _ = _small_chnr(ucm_features, tmp_path)
    hashed, partners = [], []
    forward, mismatched = tr.forward_codes, tr._mismatched_partners
    tr.forward_codes = lambda idx: (hashed.append(idx.clone()), forward(idx))[1]
    tr._mismatched_partners = lambda gen: (partners.append(mismatched(gen)), partners[-1])[1]
    for epoch in range(2):
        tr.run_epoch(epoch)
    used = torch.cat(hashed).numpy()
    assert set(used) == set(tr.clean_idx) and len(used) == 2 * len(tr.clean_idx)
    assert set(np.concatenate(partners)) <= set(tr.clean_idx)
    assert not tr.noisy[used].any()
    hashed.clear()
    tr.run_epoch(2)  # phase 2: every pair
    assert len(torch.cat(hashed)) == len(tr.pairs)


def test_training_never_reads_the_true_noise_flags(ucm_features, tmp_path):
    """Guards against the flags leaking into training: a trainer whose flags are replaced by
    random ones must train exactly the same detector, weights and hash networks."""
    a, _ = _small_chnr(ucm_features, tmp_path / "a")
    b, _ = _small_chnr(ucm_features, tmp_path / "b")
    b.noisy = np.random.default_rng(0).random(len(b.noisy)) < 0.5
    for epoch in range(3):
        ta, tb = a.run_epoch(epoch), b.run_epoch(epoch)
    assert ta["noise_auc"] != tb["noise_auc"]  # the flags differ; only the report sees them
    assert torch.equal(a.weights, b.weights)
    for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True):
        if isinstance(x, torch.Tensor):
            assert torch.equal(x, y)
    for x, y in zip(a.image_net.parameters(), b.image_net.parameters(), strict=True):
        assert torch.equal(x, y)
    for x, y in zip(a.detector.parameters(), b.detector.parameters(), strict=True):
        assert torch.equal(x, y)


def test_discrete_threshold_comes_from_eval_mode_scores(ucm_features, tmp_path):
    """Guards against a threshold computed from dropout-on scores but applied to eval-mode
    ones (it dropped 16 % of the clean unprotected pairs)."""
    tr, _ = _small_chnr(ucm_features, tmp_path)
    tr.run_epoch(0)
    gen = epoch_generator(tr.cfg.seed, 0, stream=1)
    j = tr._mismatched_partners(gen)
    i, p = tr.clean_idx, tr.pairs
    real = torch.cat(
        [
            tr.detector_input(a[i], b[i])
            for a, b in ((p.image, p.text), (p.image_aug, p.text), (p.image, p.text_aug))
        ]
        + [tr.detector_input(p.image_aug[i], p.text_aug[i])]
    )
    fake = torch.cat(
        [tr.detector_input(p.image[i], p.text[j]), tr.detector_input(p.image_aug[i], p.text_aug[j])]
    )
    expected = (tr.detector.weights(real).mean() + tr.detector.weights(fake).mean()) / 2
    assert tr.threshold == pytest.approx(expected.item(), abs=1e-6)


@pytest.mark.parametrize("negatives", ["random", "other-class"])
def test_detector_negatives(ucm_features, tmp_path, negatives):
    """Guards against label use where none is asked for: by default the mismatched pairs are
    any other image's caption (runs on archives without labels); `other-class` reproduces
    the authors' class-aware draw."""
    tr, store = _small_chnr(ucm_features, tmp_path, detector_negatives=negatives)
    partners = tr._mismatched_partners(epoch_generator(0, 0, stream=1))
    owner = tr.pairs.image_index
    assert (owner[partners] != owner[tr.clean_idx]).all()
    same_class = store.labels[owner[partners]] == store.labels[owner[tr.clean_idx]]
    assert same_class.any() if negatives == "random" else not same_class.any()


def _map20(trainer, store, split):
    codes_i = trainer.image_net.codes(torch.from_numpy(store.image["plain"])).numpy()
    codes_t = trainer.text_net.codes(torch.from_numpy(store.text["plain"])).numpy()
    scores = score_directions(codes_i, codes_t, store.labels, split, store.caption_offsets)
    return {d: float(scores[d].map_at[20].mean()) for d in ("i2t", "t2i")}


@pytest.mark.slow
def test_detector_separates_noise_and_weighting_beats_unweighted(ucm_features, tmp_path):
    """Guards against a detector that cannot tell swapped captions from true ones, and pair
    weights that do not help: at p = 0.5 soft weights must beat the unweighted run from the
    same phase 1 (trainers seed themselves, so this comparison is the same on every run)."""
    meta, total = 30, 50
    cfg = TrainConfig(
        features=str(ucm_features),
        method="chnr",
        device="cpu",
        optim=OptimConfig(epochs=total),
        chnr=CHNRConfig(meta_epochs=meta, noise=0.5, clean_fraction=0.3, weighting="soft"),
    )
    store = FeatureStore.open(ucm_features)
    split = load_or_make_split(tmp_path, store, cfg)
    weighted = build_trainer(cfg, store, split, tmp_path)
    assert weighted.noisy is not None and 0.25 < weighted.noisy.mean() < 0.40
    for epoch in range(meta):
        weighted.run_epoch(epoch)
    p = weighted.pairs
    scores = weighted.detector.weights(weighted.detector_input(p.image, p.text)).numpy()
    auc = weighted.detection_scores(scores)["noise_auc"]  # unprotected pairs only
    assert auc > 0.9, f"noise-detection ROC-AUC after phase 1: {auc:.3f} (chance 0.5)"

    ones_cfg = replace(cfg, chnr=replace(cfg.chnr, weighting="ones"))
    unweighted = build_trainer(ones_cfg, store, split, tmp_path / "ones")
    unweighted.load_state_dict(copy.deepcopy(weighted.state_dict()))
    for epoch in range(meta, total):
        weighted.run_epoch(epoch)
        unweighted.run_epoch(epoch)
    ours, base = _map20(weighted, store, split), _map20(unweighted, store, split)
    message = (
        f"mAP@20 (DUCH def.) at p=0.5: soft weights I→T {ours['i2t']:.3f} "
        f"T→I {ours['t2i']:.3f}; unweighted I→T {base['i2t']:.3f} T→I {base['t2i']:.3f}; "
        f"detector AUC {auc:.3f}"
    )
    print(message)
    assert ours["i2t"] > base["i2t"] and ours["t2i"] > base["t2i"], message
