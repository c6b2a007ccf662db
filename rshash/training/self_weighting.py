"""Clean-subset-free pair weights: how likely each pair is clean, from the model's own losses.

After a warm-up on all pairs, true pairs are fitted well and swapped ones are not, so the per-pair
cross-modal contrastive losses form two modes. A two-component Gaussian mixture on them gives
each pair's posterior probability of belonging to the low-loss (clean) mode; that probability is
the pair's weight for the next epoch (as in noisy-correspondence learning).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.mixture import GaussianMixture


def clean_probability(losses: np.ndarray, seed: int = 0) -> np.ndarray:
    """Posterior of the lower-mean component of a 2-Gaussian mixture fitted to `losses`."""
    x = np.asarray(losses, np.float64).reshape(-1, 1)
    span = x.max() - x.min()
    if len(x) < 4 or span <= 0:
        return np.ones(len(x))
    x = (x - x.min()) / span
    gmm = GaussianMixture(2, max_iter=50, tol=1e-3, reg_covar=5e-4, random_state=seed).fit(x)
    clean = int(np.argmin(gmm.means_.ravel()))
    return gmm.predict_proba(x)[:, clean]


def cross_modal_losses(
    h_image: torch.Tensor, h_text: torch.Tensor, temperature: float, order: torch.Tensor, batch: int
) -> torch.Tensor:
    """Per-pair symmetric image↔text InfoNCE loss within the batches of `order`."""
    out = torch.empty(len(h_image), device=h_image.device)
    for start in range(0, len(order), batch):
        idx = order[start : start + batch]
        a, b = F.normalize(h_image[idx], dim=1), F.normalize(h_text[idx], dim=1)
        logits = a @ b.T / temperature
        target = torch.arange(len(idx), device=logits.device)
        i2t = F.cross_entropy(logits, target, reduction="none")
        t2i = F.cross_entropy(logits.T, target, reduction="none")
        out[idx] = (i2t + t2i) / 2
    return out
