"""CHNR noise detector: scores how likely an image-caption pair is a true correspondence."""

from __future__ import annotations

import torch
from torch import nn


class NoiseDetector(nn.Module):
    """MLP on [image feature; caption feature]: (Linear(d→d) → ReLU → Dropout) ×3 → Linear(d→1).

    Returns a logit; sigmoid(logit) is the pair weight. Inputs are standardised with the
    statistics of the hash networks' training features.
    """

    def __init__(self, image_dim: int, text_dim: int, dropout: float = 0.2) -> None:
        super().__init__()
        d = image_dim + text_dim
        layers: list[nn.Module] = []
        for _ in range(3):
            layers += [nn.Linear(d, d), nn.ReLU(inplace=True), nn.Dropout(dropout)]
        self.net = nn.Sequential(*layers, nn.Linear(d, 1))

    def forward(self, pair: torch.Tensor) -> torch.Tensor:
        return self.net(pair).squeeze(-1)

    @torch.no_grad()
    def weights(self, pair: torch.Tensor, batch: int = 4096) -> torch.Tensor:
        """sigmoid scores in eval mode (dropout off), whatever mode the module was in."""
        was_training = self.training
        self.eval()
        out = torch.cat(
            [torch.sigmoid(self(pair[i : i + batch])) for i in range(0, len(pair), batch)]
        )
        self.train(was_training)
        return out
