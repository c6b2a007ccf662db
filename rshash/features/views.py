"""The two views of every image and caption; augmented views are seeded per item.

Each item draws from its own generator, seeded by (seed, modality, index), so a view does not
depend on batch order, on resuming half-way, or on which other items were processed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageFilter

_STREAMS = {"image": 1, "caption": 2, "perturb": 3}


def item_rng(seed: int, stream: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, _STREAMS[stream], index])


@dataclass(frozen=True)
class ImageViewConfig:
    """Plain view: resize the short side to `resize`, centre-crop `size`.

    Augmented view: rotate by up to ±`max_rotation` degrees, Gaussian blur with a radius drawn
    from `blur_radius`, crop a centred square of `crop_scale` of the side, resize to `size`.
    """

    size: int = 224
    resize: int = 256
    max_rotation: float = 10.0
    blur_radius: tuple[float, float] = (0.1, 1.5)
    crop_scale: tuple[float, float] = (0.75, 0.95)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def _resize_short(img: Image.Image, short: int) -> Image.Image:
    w, h = img.size
    scale = short / min(w, h)
    return img.resize(
        (max(short, round(w * scale)), max(short, round(h * scale))), Image.Resampling.BICUBIC
    )


def _centre_crop(img: Image.Image, side: int) -> Image.Image:
    w, h = img.size
    left, top = (w - side) // 2, (h - side) // 2
    return img.crop((left, top, left + side, top + side))


def plain_view(img: Image.Image, cfg: ImageViewConfig) -> Image.Image:
    return _centre_crop(_resize_short(img, cfg.resize), cfg.size)


def augmented_view(img: Image.Image, cfg: ImageViewConfig, rng: np.random.Generator) -> Image.Image:
    angle = float(rng.uniform(-cfg.max_rotation, cfg.max_rotation))
    radius = float(rng.uniform(*cfg.blur_radius))
    scale = float(rng.uniform(*cfg.crop_scale))
    img = _resize_short(img, cfg.resize)
    img = img.rotate(angle, resample=Image.Resampling.BILINEAR)
    img = img.filter(ImageFilter.GaussianBlur(radius))
    side = int(min(img.size) * scale)
    return _centre_crop(img, side).resize((cfg.size, cfg.size), Image.Resampling.BICUBIC)


def perturb_caption(text: str, rng: np.random.Generator, drop: float = 0.15) -> str:
    """Rule-based text view: drop each word with probability `drop`, then swap two neighbours."""
    words = text.split()
    kept = [w for w in words if rng.random() >= drop] or words
    if len(kept) > 2:
        i = int(rng.integers(0, len(kept) - 1))
        kept[i], kept[i + 1] = kept[i + 1], kept[i]
    return " ".join(kept)


def augmented_caption(
    captions: Sequence[str], j: int, rng: np.random.Generator, perturbed: str
) -> str:
    """Another caption of the same image (differing in text) if there is one, else `perturbed`."""
    others = [c for k, c in enumerate(captions) if k != j and c != captions[j]]
    if not others:
        return perturbed
    return others[int(rng.integers(0, len(others)))]
