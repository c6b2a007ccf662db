"""Training entry point and the run directory it writes.

A run directory holds `config.json` (full config, provenance), `split.json`, `history.json`
(every loss term per epoch), `checkpoint.pt` (last epoch, for resuming) and the model:
`model.safetensors` (the networks' tensors) and `model.json` (sizes, encoders, method), so that
opening a run or an index copied from someone else loads data and never executes code.
The run as an artifact (`HashRun`) lives in `rshash.models.run`; it is re-exported here.
"""

from __future__ import annotations

import time
from pathlib import Path

from rshash.data.splits import Split, make_split
from rshash.features.store import FeatureStore
from rshash.fileio import write_json_atomic
from rshash.models.config import TrainConfig
from rshash.models.model_file import save_model
from rshash.models.run import HashRun
from rshash.reproducibility import machine, provenance, resolve_device
from rshash.training.data import training_pairs
from rshash.training.duch import DUCHTrainer
from rshash.training.loop import config_key, run_epochs

__all__ = ["HashRun", "build_trainer", "load_or_make_split", "train"]


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
