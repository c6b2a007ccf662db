"""DUCH: the hashing module and one training epoch; CHNR reuses it with per-pair weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from rshash.losses import (
    bit_balance_loss,
    critic_loss,
    generator_loss,
    gradient_penalty,
    nt_xent,
    quantization_loss,
)
from rshash.models import CodeDiscriminator, HashNet
from rshash.reproducibility import seed_everything
from rshash.training.config import TrainConfig
from rshash.training.data import PairFeatures


def epoch_generator(seed: int, epoch: int, stream: int = 0) -> torch.Generator:
    """A generator fixed by (seed, epoch, stream), so a resumed run repeats the same epoch."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch * 101 + stream)


class DUCHTrainer:
    """Hash networks, discriminator, optimisers and target codes B, with a DUCH epoch.

    `state_dict`/`load_state_dict` cover everything a resumed run needs. Building one seeds
    every generator with `cfg.seed` first, so its initial weights do not depend on what the
    process created before (CLI, API, benchmarks and tests all build trainers through here).
    """

    def __init__(self, cfg: TrainConfig, pairs: PairFeatures, device: torch.device) -> None:
        seed_everything(cfg.seed)
        self.cfg, self.pairs, self.device = cfg, pairs, device
        bits = cfg.bits
        self.image_net = HashNet(pairs.image.shape[1], bits, cfg.hidden).to(device)
        self.text_net = HashNet(pairs.text.shape[1], bits, cfg.hidden).to(device)
        self.image_net.set_standardisation(pairs.image)
        self.text_net.set_standardisation(pairs.text)
        self.discriminator = CodeDiscriminator(bits).to(device)
        o = cfg.optim
        self.hash_optim = torch.optim.Adam(
            [*self.image_net.parameters(), *self.text_net.parameters()],
            lr=o.lr,
            weight_decay=o.weight_decay,
        )
        self.disc_optim = torch.optim.Adam(
            self.discriminator.parameters(), lr=o.disc_lr, betas=o.disc_betas
        )
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.hash_optim, o.lr_step, o.lr_gamma)
        init = torch.randint(0, 2, (len(pairs), bits), generator=epoch_generator(cfg.seed, -1))
        self.targets = (init * 2 - 1).float().to(device)

    def state_dict(self) -> dict[str, Any]:
        return {
            "image_net": self.image_net.state_dict(),
            "text_net": self.text_net.state_dict(),
            "discriminator": self.discriminator.state_dict(),
            "hash_optim": self.hash_optim.state_dict(),
            "disc_optim": self.disc_optim.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "targets": self.targets,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.image_net.load_state_dict(state["image_net"])
        self.text_net.load_state_dict(state["text_net"])
        self.discriminator.load_state_dict(state["discriminator"])
        self.hash_optim.load_state_dict(state["hash_optim"])
        self.disc_optim.load_state_dict(state["disc_optim"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.targets = state["targets"].to(self.device)

    def run_epoch(self, epoch: int) -> dict[str, float]:
        return self.hash_epoch(epoch, np.arange(len(self.pairs)), weights=None)

    def model_extras(self) -> dict[str, Any]:
        """Method-specific parts of the saved model beyond the two hash networks."""
        return {}

    def write_outputs(self, run_dir: Path) -> None:
        """Method-specific files written into the run directory after training."""

    def hash_epoch(
        self, epoch: int, subset: np.ndarray, weights: torch.Tensor | None
    ) -> dict[str, float]:
        """One pass over the training pairs `subset`; B of those pairs is refreshed at the end.

        `weights` (one per training pair) scale the image-caption contrastive term per anchor
        and the intra-modal terms by their batch mean.
        """
        gen = epoch_generator(self.cfg.seed, epoch)
        order = torch.from_numpy(subset)[torch.randperm(len(subset), generator=gen)]
        code_sum = torch.zeros_like(self.targets)
        trained: list[torch.Tensor] = []
        totals: dict[str, float] = {}
        self.image_net.train()
        self.text_net.train()
        self.discriminator.train()
        bs = self.cfg.optim.batch_size
        for start in range(0, len(order), bs):
            idx = order[start : start + bs].to(self.device)
            if len(idx) < 2:
                continue
            w = weights[idx] if weights is not None else None
            terms, codes = self._step(idx, w, gen)
            code_sum[idx] += codes
            trained.append(idx)
            for k, v in terms.items():
                totals[k] = totals.get(k, 0.0) + v
        if trained:  # B of pairs in a skipped batch of one keeps its value: no codes were seen
            touched = torch.cat(trained)
            self.targets[touched] = torch.where(code_sum[touched] >= 0, 1.0, -1.0)
        self.scheduler.step()
        return totals

    def _step(
        self, idx: torch.Tensor, w: torch.Tensor | None, gen: torch.Generator
    ) -> tuple[dict[str, float], torch.Tensor]:
        codes = self.forward_codes(idx)
        d_loss = self.discriminator_step(
            torch.cat([codes[0], codes[1]]), torch.cat([codes[2], codes[3]]), gen
        )
        terms = self.hash_step(idx, codes, w)
        terms["discriminator"] = d_loss
        return terms, sum(h.detach() for h in codes)  # type: ignore[return-value]

    def forward_codes(self, idx: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Continuous codes (h_i, h_i', h_t, h_t') of the training pairs `idx`."""
        p = self.pairs
        return (
            self.image_net(p.image[idx]),
            self.image_net(p.image_aug[idx]),
            self.text_net(p.text[idx]),
            self.text_net(p.text_aug[idx]),
        )

    def discriminator_step(
        self, h_image: torch.Tensor, h_text: torch.Tensor, gen: torch.Generator | None = None
    ) -> float:
        """One critic update on detached codes (both views of each modality); the hash
        networks are untouched."""
        real, fake = h_text.detach(), h_image.detach()
        gp = gradient_penalty(self.discriminator, real, fake, generator=gen)
        loss = critic_loss(self.discriminator(real), self.discriminator(fake))
        loss = loss + self.cfg.loss.gp_weight * gp
        self.disc_optim.zero_grad(set_to_none=True)
        loss.backward()
        self.disc_optim.step()
        return loss.item()

    def hash_step(
        self, idx: torch.Tensor, codes: tuple[torch.Tensor, ...], w: torch.Tensor | None
    ) -> dict[str, float]:
        """One update of both hash networks on the full DUCH loss; the critic is frozen.

        The adversarial term aligns both image views with the text codes (METHODS.md).
        """
        lc = self.cfg.loss
        h_i, h_i2, h_t, h_t2 = codes
        self.discriminator.requires_grad_(False)
        inter = nt_xent(h_i, h_t, lc.temperature, w, lc.reduction)
        intra = torch.zeros((), device=self.device)
        if lc.intra_modal:
            w_mean = w.mean().expand(len(idx)) if w is not None else None
            intra = nt_xent(h_i, h_i2, lc.temperature, w_mean, lc.reduction) + nt_xent(
                h_t, h_t2, lc.temperature, w_mean, lc.reduction
            )
        adv = generator_loss(self.discriminator(h_i)) + generator_loss(self.discriminator(h_i2))
        quant = quantization_loss(self.targets[idx], codes)
        balance = torch.stack([bit_balance_loss(h) for h in codes]).sum()
        loss = inter + intra + lc.alpha * adv + lc.beta * quant + lc.gamma * balance
        self.hash_optim.zero_grad(set_to_none=True)
        loss.backward()
        self.hash_optim.step()
        self.discriminator.requires_grad_(True)
        return {
            "loss": loss.item(),
            "inter": inter.item(),
            "intra": intra.item(),
            "adversarial": adv.item(),
            "quantization": quant.item(),
            "bit_balance": balance.item(),
        }
