"""Training entry point and the run directory it writes.

A run directory holds `config.json` (full config, provenance), `split.json`, `history.json`
(every loss term per epoch), `checkpoint.pt` (last epoch, for resuming) and the model:
`model.safetensors` (the networks' tensors) and `model.json` (sizes, encoders, method), so that
opening a run or an index copied from someone else loads data and never executes code.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rshash.data.splits import Split, make_split
from rshash.errors import RshashError
from rshash.features.store import FeatureStore
from rshash.fileio import write_json_atomic
from rshash.models import HashNet, NoiseDetector
from rshash.models.model_file import load_model, save_model
from rshash.reproducibility import machine, provenance, resolve_device
from rshash.training.config import TrainConfig
from rshash.training.data import training_pairs
from rshash.training.duch import DUCHTrainer
from rshash.training.loop import config_key, run_epochs


def load_or_make_split(run_dir: Path, store: FeatureStore, cfg: TrainConfig) -> Split:
    path = run_dir / "split.json"
    if path.exists():
        split = Split.load(path)
        split.check_matches(store.image_ids, str(store.path))
        return split
    split = make_split(
        image_ids=store.image_ids,
        caption_counts=store.caption_counts,
        seed=cfg.split_seed,
        caption_mode=cfg.caption_mode,
    )
    split.save(path)
    return split


def build_trainer(
    cfg: TrainConfig, store: FeatureStore, split: Split, run_dir: Path
) -> DUCHTrainer:
    device = resolve_device(cfg.device)
    pairs = training_pairs(
        store, split, cfg.image_view, cfg.text_view, device, cfg.hold_out_validation
    )
    if cfg.method == "duch":
        return DUCHTrainer(cfg, pairs, device)
    if cfg.method in ("djsrh", "jdsh"):
        from rshash.training.reconstruction import ReconstructionTrainer

        return ReconstructionTrainer(cfg, pairs, device)
    from rshash.training.chnr import CHNRTrainer

    return CHNRTrainer(cfg, pairs, store, split, run_dir, device)


def train(cfg: TrainConfig, run_dir: str | Path, progress: bool = True) -> Path:
    """Train `cfg.method` on `cfg.features`; resumes if `run_dir` holds a checkpoint of it.

    The trainer seeds itself when built, so the same config gives the same codes whatever the
    calling process did before. config.json records the code revision and the machine.
    """
    cfg.validate()
    run_dir = Path(run_dir)
    store = FeatureStore.open(cfg.features)
    store.require_text()
    run_dir.mkdir(parents=True, exist_ok=True)
    split = load_or_make_split(run_dir, store, cfg)
    trainer = build_trainer(cfg, store, split, run_dir)
    write_json_atomic(
        run_dir / "config.json",
        {
            "config": cfg.to_dict(),
            "features": store.metadata,
            **provenance(),
            "machine": {**machine(), "device": str(trainer.device)},
        },
    )
    started = time.perf_counter()
    run_epochs(trainer, cfg.optim.epochs, run_dir, config_key(cfg.to_dict()), progress)
    model = {
        "bits": cfg.bits,
        "hidden": cfg.hidden,
        "method": cfg.method,
        "image_dim": trainer.image_net.in_dim,
        "text_dim": trainer.text_net.in_dim,
        "image_net": trainer.image_net.state_dict(),
        "text_net": trainer.text_net.state_dict(),
        "image_encoder": store.metadata["image_encoder"]["name"],
        "text_encoder": store.metadata["text_encoder"]["name"],
        "train_seconds": round(time.perf_counter() - started, 2),
        **trainer.model_extras(),
    }
    trainer.write_outputs(run_dir)
    save_model(run_dir, model)
    return run_dir


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
