"""The one epoch loop every method shares: progress, loss log, per-epoch checkpoint, resume."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm import tqdm

from rshash.fileio import atomic_path, write_json_atomic
from rshash.models.model_file import load_restricted

CHECKPOINT = "checkpoint.pt"
HISTORY = "history.json"


class EpochTrainer(Protocol):
    def run_epoch(self, epoch: int) -> dict[str, float]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def run_epochs(
    trainer: EpochTrainer,
    epochs: int,
    run_dir: Path,
    config_key: str,
    progress: bool = True,
) -> list[dict[str, float]]:
    """Run epochs 0..epochs-1, resuming after the last epoch checkpointed in `run_dir`.

    A checkpoint written for a different configuration (`config_key`) is not resumed.
    """
    ckpt_path = run_dir / CHECKPOINT
    history: list[dict[str, float]] = []
    start = 0
    if ckpt_path.exists():
        ckpt = load_restricted(ckpt_path, "not resumed", "delete it to train from the start")
        if ckpt.get("config_key") == config_key:
            trainer.load_state_dict(ckpt["trainer"])
            history, start = ckpt["history"], ckpt["epoch"] + 1
    with tqdm(total=epochs, initial=start, desc="train", unit="epoch", disable=not progress) as bar:
        for epoch in range(start, epochs):
            t0 = time.perf_counter()
            terms = trainer.run_epoch(epoch)
            record = {"epoch": epoch, "seconds": round(time.perf_counter() - t0, 3), **terms}
            history.append(record)
            with atomic_path(ckpt_path) as tmp:
                torch.save(
                    {
                        "config_key": config_key,
                        "epoch": epoch,
                        "history": history,
                        "trainer": trainer.state_dict(),
                    },
                    tmp,
                )
            write_json_atomic(run_dir / HISTORY, history)
            bar.set_postfix(loss=f"{terms.get('loss', float('nan')):.4g}")
            bar.update(1)
    return history


def config_key(config: dict[str, Any]) -> str:
    return json.dumps(config, sort_keys=True)
