"""DUCH trainer: gradient isolation, resume, and a short real run on UCM features."""

import json

import numpy as np
import pytest
import torch

from rshash.features import FeatureStore
from rshash.training import HashRun, LossConfig, OptimConfig, TrainConfig, train
from rshash.training.data import training_pairs
from rshash.training.duch import DUCHTrainer, epoch_generator
from rshash.training.run import load_or_make_split


def _params(module):
    return [p.detach().clone() for p in module.parameters()]


def _same(before, module):
    return all(torch.equal(a, b) for a, b in zip(before, module.parameters(), strict=True))


def _small_trainer(ucm_features, tmp_path, bits=16):
    cfg = TrainConfig(
        features=str(ucm_features),
        bits=bits,
        hidden=64,
        device="cpu",
        optim=OptimConfig(epochs=4, batch_size=64),
    )
    store = FeatureStore.open(ucm_features)
    split = load_or_make_split(tmp_path, store, cfg)
    pairs = training_pairs(store, split, "augmented", "augmented", torch.device("cpu"))
    return DUCHTrainer(cfg, pairs, torch.device("cpu"))


def test_discriminator_and_hash_steps_update_only_their_networks(ucm_features, tmp_path):
    tr = _small_trainer(ucm_features, tmp_path)
    idx = torch.arange(64)
    codes = tr.forward_codes(idx)
    img, txt, disc = _params(tr.image_net), _params(tr.text_net), _params(tr.discriminator)
    tr.discriminator_step(codes[0], codes[2])
    assert _same(img, tr.image_net) and _same(txt, tr.text_net)
    assert not _same(disc, tr.discriminator)
    disc = _params(tr.discriminator)
    tr.hash_step(idx, codes, None)
    assert _same(disc, tr.discriminator)
    assert not _same(img, tr.image_net) and not _same(txt, tr.text_net)


def _grad_norm(module):
    return float(sum((p.grad**2).sum() for p in module.parameters() if p.grad is not None) ** 0.5)


def test_adversarial_gradient_reaches_image_net_only_with_a_real_magnitude(ucm_features, tmp_path):
    """Guards against an adversarial term applied to the text codes (the authors' bug) and
    against one scaled to nothing (averaged while every other term is summed: its gradient
    on the image net was 1e-5 of the others'). Runs the real `hash_step`: zero pair weights
    silence the image-caption term, the other terms are switched off."""
    tr = _small_trainer(ucm_features, tmp_path)
    idx = torch.arange(64)
    tr.cfg.loss = LossConfig(beta=0.0, gamma=0.0, intra_modal=False)  # α stays 0.01
    tr.hash_step(idx, tr.forward_codes(idx), torch.zeros(64))
    adversarial = _grad_norm(tr.image_net)
    assert all(p.grad is not None for p in tr.image_net.parameters())
    assert all(p.grad is None or not p.grad.any() for p in tr.text_net.parameters())

    full = _small_trainer(ucm_features, tmp_path)  # same seed: same weights
    full.hash_step(idx, full.forward_codes(idx), None)
    ratio = adversarial / _grad_norm(full.image_net)
    assert 1e-3 < ratio < 0.5, f"adversarial / full-loss gradient norm on the image net: {ratio}"


def test_targets_are_signs_of_the_summed_views(ucm_features, tmp_path):
    """Guards against B refreshed from anything but sign(h_i + h_i' + h_t + h_t') of the
    epoch (e.g. one view, or the codes of other rows)."""
    tr = _small_trainer(ucm_features, tmp_path)
    seen = {}
    forward = tr.forward_codes

    def recording(idx):
        codes = forward(idx)
        for row, total in zip(idx.tolist(), sum(h.detach() for h in codes), strict=True):
            seen[row] = total
        return codes

    tr.forward_codes = recording
    before = tr.targets.clone()
    tr.run_epoch(0)
    expected = torch.stack([torch.where(seen[r] >= 0, 1.0, -1.0) for r in range(len(tr.pairs))])
    assert torch.equal(tr.targets, expected)
    assert not torch.equal(before, tr.targets)


def test_a_skipped_batch_of_one_keeps_its_target(ucm_features, tmp_path):
    """Guards against B of a pair that trained on nothing being overwritten (with +1)."""
    tr = _small_trainer(ucm_features, tmp_path)
    subset = np.arange(65)  # batches of 64: the last holds one pair and is skipped
    before = tr.targets.clone()
    tr.hash_epoch(0, subset, None)
    order = subset[torch.randperm(65, generator=epoch_generator(tr.cfg.seed, 0)).numpy()]
    alone = int(order[-1])
    assert torch.equal(tr.targets[alone], before[alone])
    assert not torch.equal(tr.targets[order[:64]], before[order[:64]])
    assert torch.equal(tr.targets[65:], before[65:])


def test_interrupted_training_resumes_to_the_same_result(ucm_features, tmp_path, monkeypatch):
    cfg = TrainConfig(
        features=str(ucm_features),
        bits=16,
        hidden=64,
        device="cpu",
        optim=OptimConfig(epochs=4, batch_size=128),
    )
    train(cfg, tmp_path / "whole", progress=False)
    original = DUCHTrainer.run_epoch

    def crash_at_two(self, epoch):
        if epoch == 2:
            raise KeyboardInterrupt
        return original(self, epoch)

    monkeypatch.setattr(DUCHTrainer, "run_epoch", crash_at_two)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "resumed", progress=False)
    assert not (tmp_path / "resumed" / "model.json").exists()
    monkeypatch.setattr(DUCHTrainer, "run_epoch", original)
    train(cfg, tmp_path / "resumed", progress=False)
    a, b = HashRun.open(tmp_path / "whole"), HashRun.open(tmp_path / "resumed")
    for x, y in zip(
        a.image_net.state_dict().values(), b.image_net.state_dict().values(), strict=True
    ):
        assert torch.equal(x, y)
    hist = json.loads((tmp_path / "resumed" / "history.json").read_text())
    assert [h["epoch"] for h in hist] == [0, 1, 2, 3]


@pytest.mark.slow
def test_short_duch_run_on_real_ucm_beats_chance(ucm_features, tmp_path):
    from rshash.evaluation.run_report import evaluate_and_report

    cfg = TrainConfig(features=str(ucm_features), bits=64, optim=OptimConfig(epochs=15))
    run = train(cfg, tmp_path / "run", progress=False)
    metrics = evaluate_and_report(run)
    i2t = metrics["directions"]["i2t"]["map@20_duch"]
    t2i = metrics["directions"]["t2i"]["map@20_duch"]
    chance = 1 / 21
    message = (
        f"mAP@20 (DUCH def.) after 15 epochs: I→T {i2t:.3f}, T→I {t2i:.3f}; chance ≈ {chance:.3f}"
    )
    assert i2t > 0.75 and t2i > 0.8, message
    for name in (
        "metrics.json",
        "report.md",
        "plots/pr_curves.png",
        "plots/loss_curves.png",
        "plots/precision_at_k.png",
        "split.json",
        "config.json",
    ):
        assert (run / name).exists(), name
    codes = HashRun.open(run).encode_images(FeatureStore.open(ucm_features).image["plain"][:5])
    assert codes.shape == (5, 64) and set(np.unique(codes)) <= {-1, 1}
