"""Seeding and provenance: what every run records beside its outputs."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import random
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import torch

_TRACKED_PACKAGES = (
    "rshash",
    "torch",
    "numpy",
    "h5py",
    "pillow",
    "sentence-transformers",
    "transformers",
    "efficientnet-lite-pytorch",
    "scikit-learn",
)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every GPU)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _TRACKED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def git_revision() -> str | None:
    """The commit of the rshash checkout (with `-dirty` if modified), or None outside git."""
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return rev + ("-dirty" if dirty else "")


def machine() -> dict[str, Any]:
    """Where this process computes: CPU model, cores, torch threads and the GPU (if any)."""
    return {
        "cpu": _cpu_model() or platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def provenance() -> dict[str, Any]:
    return {"versions": library_versions(), "git_revision": git_revision()}


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when present, else CPU; any other name is passed to torch."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
