"""Similarity-reconstruction objectives of the DJSRH and JDSH baselines, as pure functions.

Both build a target affinity matrix S for a batch from the image and text features and train
the hash codes so that their cosine similarities (image-text, image-image, text-text)
reconstruct μ·S. They differ in how S is built.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cosine_matrix(a: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    a = F.normalize(a, dim=1)
    return a @ (a if b is None else F.normalize(b, dim=1)).T


def joint_similarity(
    image: torch.Tensor, text: torch.Tensor, image_weight: float, high_order: float
) -> torch.Tensor:
    """DJSRH's joint semantics: S = (1-η)·S_c + η·S_c S_cᵀ / m, S_c = β·S_I + (1-β)·S_T."""
    s = image_weight * cosine_matrix(image) + (1 - image_weight) * cosine_matrix(text)
    return (1 - high_order) * s + high_order * (s @ s.T) / len(s)


def distribution_decision(
    s: torch.Tensor, spread: float, boost: float, damp: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """JDSH's distribution-based similarity decision and weighting on a joint matrix `s`.

    Per row, pairs beyond `spread` standard deviations above the row mean are decided similar
    (target raised by `boost`, capped at 1), those as far below decided dissimilar (target
    lowered by `damp`); decided pairs weigh 1 + their distance from the mean in standard
    deviations, undecided ones 1. Returns (targets, weights).
    """
    mean = s.mean(dim=1, keepdim=True)
    std = s.std(dim=1, keepdim=True).clamp_min(1e-6)
    z = (s - mean) / std
    similar, dissimilar = z >= spread, z <= -spread
    target = torch.where(similar, (s * (1 + boost)).clamp(max=1.0), s)
    target = torch.where(dissimilar, s * (1 - damp), target)
    weight = torch.where(similar | dissimilar, 1 + z.abs(), torch.ones_like(s))
    return target, weight


def reconstruction_loss(
    target: torch.Tensor,
    h_image: torch.Tensor,
    h_text: torch.Tensor,
    scale: float,
    intra_weight: float,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """‖μS − cos(H_I, H_T)‖² + λ(‖μS − cos(H_I, H_I)‖² + ‖μS − cos(H_T, H_T)‖²), mean per entry."""
    goal = scale * target
    w = torch.ones_like(goal) if weight is None else weight

    def term(c: torch.Tensor) -> torch.Tensor:
        return (w * (goal - c) ** 2).mean()

    inter = term(cosine_matrix(h_image, h_text))
    intra = term(cosine_matrix(h_image)) + term(cosine_matrix(h_text))
    return inter + intra_weight * intra
