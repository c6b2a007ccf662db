"""Quantisation and bit-balance terms that push continuous codes towards good binary codes."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def quantization_loss(targets: torch.Tensor, codes: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σ over views of ‖B − h‖², with B the per-pair target codes in {-1, +1}."""
    return sum(((targets - h) ** 2).sum() for h in codes)  # type: ignore[return-value]


def bit_balance_loss(codes: torch.Tensor) -> torch.Tensor:
    """Σ_n (Σ_k h_nk)²: zero when every code has as many +1 as −1."""
    return (codes.sum(dim=1) ** 2).sum()
