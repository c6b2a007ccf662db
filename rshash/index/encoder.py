"""Images and texts → packed hash codes, with the exact encoders and views a run was trained on."""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from rshash.data.images import load_rgb
from rshash.errors import RshashError
from rshash.features.backends import AUTO, resolve_backend, with_backend
from rshash.features.encoders import (
    ImageEncoder,
    TextEncoder,
    load_image_encoder,
    load_text_encoder,
)
from rshash.features.views import ImageViewConfig, plain_view
from rshash.index.packing import pack_codes
from rshash.models.run import HashRun
from rshash.reproducibility import resolve_device


class CodeEncoder:
    """Feature encoders + hash networks of one run, on one inference backend (see
    `rshash.features.backends`); encoders load on first use."""

    def __init__(self, run: HashRun, device: str = "auto", backend: str = AUTO) -> None:
        self.run = run
        self.device = resolve_device(device)
        self.backend = resolve_backend(backend, self.device)
        features = json.loads((run.path / "config.json").read_text())["features"]
        views: dict[str, Any] = {
            k: tuple(v) if isinstance(v, list) else v
            for k, v in features["preprocessing"]["image_views"].items()
        }
        self.views = ImageViewConfig(**views)
        self._image: ImageEncoder | None = None
        self._text: TextEncoder | None = None

    @property
    def image_encoder(self) -> ImageEncoder:
        if self._image is None:
            encoder = load_image_encoder(self.run.info["image_encoder"], self.device)
            self._image = with_backend(encoder, self.backend)
        return self._image

    @property
    def text_encoder(self) -> TextEncoder:
        if self._text is None:
            encoder = load_text_encoder(self.run.info["text_encoder"], self.device)
            self._text = with_backend(encoder, self.backend)
        return self._text

    def image_features(self, images: Sequence[Image.Image]) -> np.ndarray:
        return self.image_encoder.encode([plain_view(img, self.views) for img in images])

    def view(self, image: Image.Image) -> Image.Image:
        """An image in the encoder's input view (decode-side work, safe in any thread)."""
        return plain_view(image, self.views)

    def encode_views(self, views: Sequence[Image.Image]) -> np.ndarray:
        """Packed codes of images already in the input view: one forward pass."""
        with torch.no_grad():
            return pack_codes(self.run.encode_images(self.image_encoder.encode(views)))

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Packed codes (n, K/8) of PIL images."""
        with torch.no_grad():
            return pack_codes(self.run.encode_images(self.image_features(images)))

    def encode_image_files(self, paths: Sequence[Path]) -> np.ndarray:
        return self.encode_images([load_rgb(p) for p in paths])

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Packed codes (n, K/8) of texts."""
        with torch.no_grad():
            return pack_codes(self.run.encode_texts(self.text_encoder.encode(list(texts))))


MAX_QUERY_PIXELS = 50_000_000  # a query image's width × height (decoded RGB: 150 MB)


def decode_image(
    data: bytes, name: str = "query image", max_pixels: int = MAX_QUERY_PIXELS
) -> Image.Image:
    """Bytes of an image file → RGB image, or a one-line error naming `name`.

    The pixel count is read from the header and checked before any pixel is decoded: a small
    file can declare a huge image (a 17 KB PNG of 144 Mpx decodes to 432 MB).
    """
    try:
        with warnings.catch_warnings():  # PIL's own bomb warning: the size is checked below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Exception as exc:  # PIL raises several unrelated types for bad files
        raise RshashError(f"{name}: cannot decode image ({exc.__class__.__name__}: {exc})") from exc
    width, height = img.size
    if width * height > max_pixels:
        raise RshashError(
            f"{name}: {width}×{height} pixels, more than the {max_pixels:,} a query image may have"
        )
    try:
        img.load()
        return img.convert("RGB")
    except Exception as exc:  # PIL raises several unrelated types for bad files
        raise RshashError(f"{name}: cannot decode image ({exc.__class__.__name__}: {exc})") from exc
