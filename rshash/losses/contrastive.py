"""NT-Xent (normalised temperature-scaled cross entropy) between two aligned views."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

Reduction = Literal["sum", "mean"]


def nt_xent(
    u: torch.Tensor,
    v: torch.Tensor,
    temperature: float = 1.0,
    weights: torch.Tensor | None = None,
    reduction: Reduction = "sum",
) -> torch.Tensor:
    """NT-Xent over the 2N L2-normalised rows of `u` (N×K) and `v` (N×K).

    Anchor row a's positive is its partner in the other matrix; its negatives are the other 2N−2
    rows. Self-similarity is masked out with −inf before the softmax, so it is excluded exactly
    for any temperature. `weights` (N) scales both anchors of pair n; "mean" divides by 2N.
    """
    n = u.shape[0]
    z = F.normalize(torch.cat([u, v]), dim=1)
    logits = z @ z.T / temperature
    self_mask = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    partner = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    per_anchor = F.cross_entropy(logits, partner, reduction="none")
    if weights is not None:
        per_anchor = per_anchor * torch.cat([weights, weights])
    total = per_anchor.sum()
    return total / (2 * n) if reduction == "mean" else total
