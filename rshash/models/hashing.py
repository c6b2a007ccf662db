"""DUCH hash networks and the code discriminator (METHODS.md)."""

from __future__ import annotations

import torch
from torch import nn


class HashNet(nn.Module):
    """Linear(d→hidden) → BatchNorm → ReLU → Linear(hidden→K) → tanh, on standardised input.

    The standardisation statistics of the training features live in buffers, so the network
    takes raw encoder features and a saved model needs nothing else to encode.
    """

    feature_mean: torch.Tensor
    feature_std: torch.Tensor

    def __init__(self, in_dim: int, bits: int, hidden: int = 4096) -> None:
        super().__init__()
        self.in_dim, self.bits, self.hidden = in_dim, bits, hidden
        self.register_buffer("feature_mean", torch.zeros(in_dim))
        self.register_buffer("feature_std", torch.ones(in_dim))
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, bits),
            nn.Tanh(),
        )

    def set_standardisation(self, features: torch.Tensor) -> None:
        self.feature_mean.copy_(features.mean(0))
        self.feature_std.copy_(features.std(0).clamp(min=1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.feature_mean) / self.feature_std)

    @torch.no_grad()
    def codes(self, x: torch.Tensor, batch: int = 4096) -> torch.Tensor:
        """Binary codes in {-1, +1} (int8, on the CPU), eval mode; sign(0) counts as +1.

        Input on any device is moved, chunk by chunk, to the network's device.
        """
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        out = torch.cat([self(x[i : i + batch].to(device)).cpu() for i in range(0, len(x), batch)])
        self.train(was_training)
        return torch.where(out >= 0, 1, -1).to(torch.int8)


class CodeDiscriminator(nn.Module):
    """Linear(K→2K) → BatchNorm → ReLU → Linear(2K→1): scores text codes real, image codes fake."""

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(bits, 2 * bits),
            nn.BatchNorm1d(2 * bits),
            nn.ReLU(inplace=True),
            nn.Linear(2 * bits, 1),
        )

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return self.net(codes).squeeze(-1)
