"""Noisy-correspondence injection per PROTOCOL.md, and user-verified clean subsets."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rshash.errors import DataError


@dataclass(frozen=True)
class NoiseInjection:
    """Which training pairs are protected (clean subset) and which captions were swapped.

    `caption_source[n]` is the training pair whose caption pair n now carries (itself if clean).
    """

    p: float
    clean_fraction: float
    clean: np.ndarray
    noisy: np.ndarray
    caption_source: np.ndarray

    @property
    def effective_rate(self) -> float:
        return float(self.noisy.mean())

    def summary(self) -> str:
        return (
            f"noise p={self.p:g}, clean fraction c={self.clean_fraction:g}: "
            f"{int(self.noisy.sum())} of {len(self.noisy)} training pairs corrupted "
            f"(effective noise rate {self.effective_rate:.3f}), "
            f"{int(self.clean.sum())} pairs protected"
        )


def inject_noise(
    n_pairs: int,
    p: float,
    clean_fraction: float,
    seed: int,
    labels: np.ndarray | None = None,
    owners: np.ndarray | None = None,
) -> NoiseInjection:
    """Draw the protected clean subset first, then swap each other pair's caption with prob. p.

    The replacement caption comes from a random other training pair of a different class when
    `labels` are given (label-aware), else from any other pair (label-free). `owners` (the
    image of each pair, for several captions per image) makes the clean subset a set of whole
    images and keeps a swap off the image's own other captions, which would not be noise.
    """
    if not 0.0 <= p <= 1.0 or not 0.0 <= clean_fraction <= 1.0:
        raise DataError(f"noise p={p} and clean fraction c={clean_fraction} must lie in [0, 1]")
    rng = np.random.default_rng([seed, 7919])
    owner = np.arange(n_pairs) if owners is None else np.asarray(owners)
    images = np.unique(owner)
    protected = images[rng.permutation(len(images))[: round(clean_fraction * len(images))]]
    clean = np.isin(owner, protected)
    noisy = (~clean) & (rng.random(n_pairs) < p)
    source = np.arange(n_pairs)
    for n in np.flatnonzero(noisy):
        allowed = owner != owner[n]
        if labels is not None:
            allowed &= labels != labels[n]
        pool = np.flatnonzero(allowed)
        if len(pool) == 0:
            raise DataError("label-aware noise needs at least two classes among training pairs")
        source[n] = pool[rng.integers(0, len(pool))]
    return NoiseInjection(p, clean_fraction, clean, noisy, source)


def read_clean_subset(path: str | Path, pair_ids: list[str]) -> np.ndarray:
    """Mask of training pairs listed (one image or caption id per line) in a verified-pairs file."""
    path = Path(path)
    try:
        wanted = {
            line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()
        }
    except OSError as exc:
        raise DataError(f"{path}: cannot read clean-subset file ({exc})") from None
    mask = np.array([pid in wanted or pid.split("#")[0] in wanted for pid in pair_ids])
    if not mask.any():
        raise DataError(f"{path}: none of its {len(wanted)} ids is a training pair of this split")
    return mask
