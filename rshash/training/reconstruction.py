"""DJSRH and JDSH baselines on the shared trainer: codes reconstruct a feature affinity matrix.

Same features, split, optimiser, epoch loop and outputs as DUCH; only the batch objective
differs. No discriminator, augmented views or target codes are used (they stay untouched).
"""

from __future__ import annotations

import torch

from rshash.losses.reconstruction import (
    distribution_decision,
    joint_similarity,
    reconstruction_loss,
)
from rshash.training.duch import DUCHTrainer


class ReconstructionTrainer(DUCHTrainer):
    def _step(
        self, idx: torch.Tensor, w: torch.Tensor | None, gen: torch.Generator
    ) -> tuple[dict[str, float], torch.Tensor]:
        b = self.cfg.baseline
        p, i_net, t_net = self.pairs, self.image_net, self.text_net
        with torch.no_grad():
            image = (p.image[idx] - i_net.feature_mean) / i_net.feature_std
            text = (p.text[idx] - t_net.feature_mean) / t_net.feature_std
            target = joint_similarity(image, text, b.image_weight, b.high_order)
            weight = None
            if self.cfg.method == "jdsh":
                target, weight = distribution_decision(target, b.spread, b.boost, b.damp)
        h_i, h_t = i_net(p.image[idx]), t_net(p.text[idx])
        loss = reconstruction_loss(target, h_i, h_t, b.scale, b.intra_for(self.cfg.method), weight)
        self.hash_optim.zero_grad(set_to_none=True)
        loss.backward()
        self.hash_optim.step()
        return {"loss": loss.item()}, (h_i + h_t).detach()
