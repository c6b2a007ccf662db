"""Wasserstein adversarial terms with gradient penalty, for aligning image and text codes."""

from __future__ import annotations

from collections.abc import Callable

import torch


def critic_loss(real_scores: torch.Tensor, fake_scores: torch.Tensor) -> torch.Tensor:
    """The critic wants high scores on real (text) codes and low scores on fake (image) codes.

    Averaged: the critic has its own optimiser, and the mean keeps it on the gradient
    penalty's scale.
    """
    return fake_scores.mean() - real_scores.mean()


def generator_loss(fake_scores: torch.Tensor) -> torch.Tensor:
    """The image hash network wants its codes scored like real ones.

    Summed over the codes, like every other term of the hash networks' loss (the authors sum
    their BCE): averaged, α = 0.01 scaled it to about 1/50000 of the contrastive gradient.
    """
    return -fake_scores.sum()


def gradient_penalty(
    critic: Callable[[torch.Tensor], torch.Tensor],
    real: torch.Tensor,
    fake: torch.Tensor,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """mean((‖∇ critic(x̂)‖₂ − 1)²) on random interpolates x̂ of real and fake rows.

    The mixing weights are drawn on the CPU (from `generator` if given) for reproducibility.
    """
    eps = torch.rand(real.shape[0], 1, generator=generator).to(real.device)
    mixed = (eps * real + (1 - eps) * fake).detach().requires_grad_(True)
    scores = critic(mixed)
    (grad,) = torch.autograd.grad(scores.sum(), mixed, create_graph=True)
    return ((grad.norm(2, dim=1) - 1) ** 2).mean()
