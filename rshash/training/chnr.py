"""CHNR: DUCH plus a noise detector meta-trained on a clean subset, then used as pair weights.

Phase 1 (epochs < meta_epochs): the hash networks train with the DUCH loss on the clean subset
and the detector learns, adversarially, true pairs against mismatched ones. Phase 2: the
detector is frozen (eval mode) and weights every training pair of the DUCH loss. The epoch loop
and the DUCH step are the DUCH trainer's; this class only adds the detector and the weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import average_precision_score, roc_auc_score

from rshash.data.noise import inject_noise, read_clean_subset
from rshash.data.splits import Split
from rshash.errors import RshashError
from rshash.features.store import FeatureStore
from rshash.fileio import write_json_atomic
from rshash.losses import gradient_penalty
from rshash.models import NoiseDetector
from rshash.training.config import TrainConfig
from rshash.training.data import PairFeatures
from rshash.training.duch import DUCHTrainer, epoch_generator
from rshash.training.self_weighting import (
    clean_probability,
    cross_modal_losses,
    smooth_weights,
)

NOISE_FILE = "noise.json"


def pair_weights(scores: torch.Tensor, weighting: str, threshold: float) -> torch.Tensor:
    """Detector scores (sigmoid) to per-pair weights: soft, cubed, discrete or ones."""
    if weighting == "soft":
        return scores
    if weighting == "cubed":
        return scores**3
    if weighting == "discrete":
        return (scores > threshold).float()
    return torch.ones_like(scores)


def noise_detection_scores(
    weights: np.ndarray, noisy: np.ndarray, scored: np.ndarray | None = None
) -> dict[str, float]:
    """ROC-AUC and average precision of weights as a clean-pair score against true flags,
    over the pairs of the mask `scored` (all pairs if None)."""
    if scored is not None:
        weights, noisy = weights[scored], noisy[scored]
    clean = ~noisy
    if clean.all() or noisy.all():
        return {}
    return {
        "noise_auc": float(roc_auc_score(clean, weights)),
        "noise_ap": float(average_precision_score(clean, weights)),
    }


class CHNRTrainer(DUCHTrainer):
    def __init__(
        self,
        cfg: TrainConfig,
        pairs: PairFeatures,
        store: FeatureStore,
        split: Split,
        run_dir: Path,
        device: torch.device,
    ) -> None:
        c = cfg.chnr
        labels = store.labels[pairs.image_index] if store.labels is not None else None
        if c.detector_negatives == "other-class" and labels is None:
            raise RshashError(
                f"{store.path}: --detector-negatives other-class needs class labels; "
                "use the default, random"
            )
        self.noisy: np.ndarray | None = None
        if c.clean_subset:
            pair_ids = [store.image_ids[i] for i in pairs.image_index]
            clean = read_clean_subset(c.clean_subset, pair_ids)
            noise_info: dict[str, Any] = {"clean_subset_file": c.clean_subset}
        else:
            inj = inject_noise(
                len(pairs), c.noise, c.clean_fraction, cfg.seed, labels, pairs.image_index
            )
            pairs = pairs.with_captions_of(
                pairs.caption_row[inj.caption_source], store, cfg.text_view, device
            )
            clean, self.noisy = inj.clean, inj.noisy
            print(inj.summary())
            noise_info = {
                "p": c.noise,
                "clean_fraction": c.clean_fraction,
                "effective_noise": inj.effective_rate,
                "noisy": inj.noisy.tolist(),
                "caption_source": inj.caption_source.tolist(),
            }
        super().__init__(cfg, pairs, device)  # seeds every generator: the detector below too
        self.clean = clean
        self.clean_idx = np.flatnonzero(clean)
        self.labels = labels
        noise_info["clean"] = clean.tolist()
        noise_info["caption_rows"] = pairs.caption_row.tolist()
        write_json_atomic(run_dir / NOISE_FILE, noise_info)

        self.detector = NoiseDetector(pairs.image.shape[1], pairs.text.shape[1], c.detector_dropout)
        self.detector.to(device)
        self.detector_optim = torch.optim.AdamW(
            self.detector.parameters(),
            lr=c.detector_lr,
            betas=c.detector_betas,
            weight_decay=c.detector_weight_decay,
        )
        self.threshold = 0.5
        self.weights: torch.Tensor | None = None

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "detector": self.detector.state_dict(),
            "detector_optim": self.detector_optim.state_dict(),
            "threshold": self.threshold,
            "weights": self.weights,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.detector.load_state_dict(state["detector"])
        self.detector_optim.load_state_dict(state["detector_optim"])
        self.threshold = state["threshold"]
        self.weights = state["weights"]

    def model_extras(self) -> dict[str, Any]:
        if self.cfg.chnr.weighting == "self":
            return {"weighting": "self"}  # no detector was trained
        return {
            "detector": self.detector.state_dict(),
            "detector_threshold": self.threshold,
            "weighting": self.cfg.chnr.weighting,
        }

    def detection_scores(self, weights: np.ndarray) -> dict[str, float]:
        """AUC and AP of `weights` against the true flags over the unprotected pairs: the
        ones CHNR has to judge (the protected clean subset trained the detector)."""
        if self.noisy is None:
            return {}
        return noise_detection_scores(weights, self.noisy, ~self.clean)

    def write_outputs(self, run_dir: Path) -> None:
        """noise_detection.json: final pair weights, detector scores and, with known flags,
        AUC/AP over the unprotected pairs (and, labelled as such, over all pairs)."""
        p = self.pairs
        detector = self.cfg.chnr.weighting != "self"
        scores = self.detector.weights(self.detector_input(p.image, p.text)).cpu().numpy()
        weights = self.weights.cpu().numpy() if self.weights is not None else scores
        out: dict[str, Any] = {
            "weighting": self.cfg.chnr.weighting,
            "threshold": self.threshold if detector else None,
            "weights": weights.tolist(),
            "detector_scores": scores.tolist() if detector else None,
        }
        if self.noisy is not None:
            out["noisy"] = self.noisy.tolist()
            out["protected"] = self.clean.tolist()
            out["scored_pairs"] = "unprotected"
            out.update(self.detection_scores(weights))
            out["noise_auc_all_pairs"] = noise_detection_scores(weights, self.noisy).get(
                "noise_auc"
            )
            if detector:
                out["detector_auc"] = self.detection_scores(scores).get("noise_auc")
        write_json_atomic(run_dir / "noise_detection.json", out)

    def detector_input(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        i, t = self.image_net, self.text_net
        return torch.cat(
            [(image - i.feature_mean) / i.feature_std, (text - t.feature_mean) / t.feature_std],
            dim=1,
        )

    def run_epoch(self, epoch: int) -> dict[str, float]:
        if self.cfg.chnr.weighting == "self":
            return self._self_weighted_epoch(epoch)
        if epoch < self.cfg.chnr.meta_epochs:
            terms = self.hash_epoch(epoch, self.clean_idx, weights=None)
            return {**terms, **self.detector_epoch(epoch)}
        if self.weights is None:
            self.weights = self.score_pairs()
        terms = self.hash_epoch(epoch, np.arange(len(self.pairs)), weights=self.weights)
        terms.update(self.detection_scores(self.weights.cpu().numpy()))
        return terms

    def _self_weighted_epoch(self, epoch: int) -> dict[str, float]:
        """No clean subset: warm up on every pair, then weight pairs by their own losses."""
        everything = np.arange(len(self.pairs))
        if epoch < self.cfg.chnr.meta_epochs:
            return self.hash_epoch(epoch, everything, weights=None)
        self.weights = self.self_weights(epoch)
        terms = self.hash_epoch(epoch, everything, weights=self.weights)
        terms.update(self.detection_scores(self.weights.cpu().numpy()))
        return terms

    def self_weights(self, epoch: int) -> torch.Tensor:
        """Clean-pair probabilities from a 3-component mixture on per-pair contrastive losses."""
        p = self.pairs
        self.image_net.eval()
        self.text_net.eval()
        with torch.no_grad():
            gen = epoch_generator(self.cfg.seed, epoch, stream=2)
            order = torch.randperm(len(p), generator=gen).to(self.device)
            losses = cross_modal_losses(
                self.image_net(p.image),
                self.text_net(p.text),
                self.cfg.loss.temperature,
                order,
                self.cfg.optim.batch_size,
            )
        prob = clean_probability(losses.cpu().numpy(), seed=self.cfg.seed + epoch)
        previous = self.weights.cpu().numpy() if self.weights is not None else None
        prob = smooth_weights(previous, prob, self.cfg.chnr.self_momentum)
        return torch.from_numpy(prob).float().to(self.device)

    def score_pairs(self) -> torch.Tensor:
        """Frozen-detector weights of every training pair (eval mode: no dropout)."""
        p = self.pairs
        scores = self.detector.weights(self.detector_input(p.image, p.text))
        return pair_weights(scores, self.cfg.chnr.weighting, self.threshold)

    def _mismatched_partners(self, gen: torch.Generator) -> np.ndarray:
        """For each clean pair, another clean pair of another image: drawn at random
        (`detector_negatives="random"`, no labels needed), or of another class."""
        idx = self.clean_idx
        owner = self.pairs.image_index
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
        rng = np.random.default_rng(seed)
        partners = np.empty_like(idx)
        by_class = self.cfg.chnr.detector_negatives == "other-class" and self.labels is not None
        for k, n in enumerate(idx):
            allowed = owner[idx] != owner[n]
            if by_class:
                assert self.labels is not None
                allowed &= self.labels[idx] != self.labels[n]
            pool = idx[allowed]
            if len(pool) == 0:
                raise RshashError("the clean subset needs pairs of at least two images (classes)")
            partners[k] = pool[rng.integers(0, len(pool))]
        return partners

    def detector_epoch(self, epoch: int) -> dict[str, float]:
        """One adversarial pass of the detector over the clean subset: true vs swapped pairs.

        Its dropout masks come from the global generator, seeded here per epoch, so an epoch
        is the same whatever ran before it (another trainer, a resumed run).
        """
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.cfg.seed * 1_000_003 + epoch * 101 + 3)
            return self._detector_epoch(epoch)

    def _detector_epoch(self, epoch: int) -> dict[str, float]:
        gen = epoch_generator(self.cfg.seed, epoch, stream=1)
        partner = dict(zip(self.clean_idx, self._mismatched_partners(gen), strict=True))
        order = self.clean_idx[torch.randperm(len(self.clean_idx), generator=gen).numpy()]
        p, bs = self.pairs, self.cfg.optim.batch_size
        self.detector.train()
        totals = {"detector": 0.0}
        real_scores, fake_scores = [], []
        for start in range(0, len(order), bs):
            batch = order[start : start + bs]
            if len(batch) < 2:
                continue
            i = torch.from_numpy(batch).to(self.device)
            j = torch.from_numpy(np.array([partner[n] for n in batch])).to(self.device)
            real = torch.cat(
                [
                    self.detector_input(p.image[i], p.text[i]),
                    self.detector_input(p.image_aug[i], p.text[i]),
                    self.detector_input(p.image[i], p.text_aug[i]),
                    self.detector_input(p.image_aug[i], p.text_aug[i]),
                ]
            )
            fake = torch.cat(
                [
                    self.detector_input(p.image[i], p.text[j]),
                    self.detector_input(p.image_aug[i], p.text_aug[j]),
                ]
            )
            real_logit, fake_logit = self.detector(real), self.detector(fake)
            bce = F.binary_cross_entropy_with_logits(
                real_logit, torch.ones_like(real_logit)
            ) + F.binary_cross_entropy_with_logits(fake_logit, torch.zeros_like(fake_logit))
            n = len(fake)
            gp = gradient_penalty(self.detector, real[:n], fake, generator=gen)
            loss = bce + self.cfg.chnr.detector_gp_weight * gp
            self.detector_optim.zero_grad(set_to_none=True)
            loss.backward()
            self.detector_optim.step()
            totals["detector"] += loss.item()
            real_scores.append(real)
            fake_scores.append(fake)
        # The threshold is applied to eval-mode scores (no dropout), so it is set from them.
        real_mean = self.detector.weights(torch.cat(real_scores)).mean().item()
        fake_mean = self.detector.weights(torch.cat(fake_scores)).mean().item()
        self.threshold = (real_mean + fake_mean) / 2
        return {**totals, "detector_real": real_mean, "detector_fake": fake_mean}
