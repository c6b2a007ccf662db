"""A trained run as an artifact: its config, split and hash networks, ready to encode features.

Below both `training` (which writes runs) and `index` (which copies and serves them), so that
opening an index or serving one imports no training code. Opening a run loads data only
(`model.safetensors`, JSON), never executes code from it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rshash.data.splits import Split
from rshash.errors import RshashError
from rshash.features.store import FeatureStore
from rshash.models.config import TrainConfig
from rshash.models.hashing import HashNet
from rshash.models.model_file import load_model
from rshash.models.noise_detector import NoiseDetector


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`, or a one-line error naming it."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RshashError(f"{path}: missing (the run or index copy is damaged)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RshashError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("config"), dict):
        raise RshashError(f"{path}: expected an object with a 'config' object")
    return data


@dataclass
class HashRun:
    """A trained run: its config, split and hash networks, ready to encode features to codes."""

    path: Path
    config: TrainConfig
    split: Split
    image_net: HashNet
    text_net: HashNet
    info: dict[str, Any]
    detector: NoiseDetector | None = None

    @property
    def bits(self) -> int:
        return self.config.bits

    @classmethod
    def open(cls, path: str | Path) -> HashRun:
        path = Path(path)
        info = load_model(path)
        cfg = TrainConfig.from_dict(_read_json(path / "config.json")["config"])
        image_net = HashNet(info["image_dim"], info["bits"], info["hidden"])
        text_net = HashNet(info["text_dim"], info["bits"], info["hidden"])
        image_net.load_state_dict(info.pop("image_net"))
        text_net.load_state_dict(info.pop("text_net"))
        detector = None
        if "detector" in info:
            detector = NoiseDetector(info["image_dim"], info["text_dim"])
            detector.load_state_dict(info.pop("detector"))
            detector.eval()
        if not (path / "split.json").is_file():
            raise RshashError(f"{path / 'split.json'}: missing (the run or index copy is damaged)")
        split = Split.load(path / "split.json")
        return cls(path, cfg, split, image_net.eval(), text_net.eval(), info, detector)

    def check_features(self, store: FeatureStore) -> None:
        enc = (
            store.metadata["image_encoder"]["name"],
            (store.metadata.get("text_encoder") or {}).get("name"),
        )
        if enc[0] != self.info["image_encoder"]:
            raise RshashError(
                f"{store.path}: image features from {enc[0]!r}, but the run was trained on "
                f"{self.info['image_encoder']!r} features"
            )
        if store.text and enc[1] != self.info["text_encoder"]:
            raise RshashError(
                f"{store.path}: text features from {enc[1]!r}, but the run was trained on "
                f"{self.info['text_encoder']!r} features"
            )

    def pair_scores(self, image_features: np.ndarray, text_features: np.ndarray) -> np.ndarray:
        """Noise-detector score (sigmoid, 1 = looks like a true pair) of aligned feature rows."""
        if self.detector is None:
            raise RshashError(f"{self.path}: run has no noise detector (train with --method chnr)")
        i, t = self.image_net, self.text_net
        x = torch.cat(
            [
                (torch.from_numpy(image_features) - i.feature_mean) / i.feature_std,
                (torch.from_numpy(text_features) - t.feature_mean) / t.feature_std,
            ],
            dim=1,
        )
        return self.detector.weights(x).numpy()

    def encode_images(self, features: np.ndarray) -> np.ndarray:
        return self.image_net.codes(torch.from_numpy(features)).numpy()

    def encode_texts(self, features: np.ndarray) -> np.ndarray:
        return self.text_net.codes(torch.from_numpy(features)).numpy()
