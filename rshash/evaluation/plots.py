"""PNG plots of a run: PR curves over Hamming radius, precision@k curves, loss curves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from rshash.evaluation.protocol import DIRECTION_NAMES
from rshash.fileio import atomic_path


def _save(fig: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)


def _direction_curves(
    metrics: dict[str, Any], path: Path, curve: str, x: str, y: str, **axes: Any
) -> None:
    """One line per retrieval direction from `metrics["directions"][d][curve]`."""
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for name, d in metrics["directions"].items():
        ax.plot(d[curve][x], d[curve][y], marker=".", label=DIRECTION_NAMES[name])
    ax.set(ylim=(0, 1.02), **axes)
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)


def plot_pr_curves(metrics: dict[str, Any], path: Path) -> None:
    _direction_curves(
        metrics,
        path,
        "pr_radius",
        "recall",
        "precision",
        xlabel="recall",
        ylabel="precision",
        xlim=(0, 1.02),
        title=f"Precision-recall within Hamming radius ({metrics['bits']} bits)",
    )


def plot_precision_at_k(metrics: dict[str, Any], path: Path) -> None:
    _direction_curves(
        metrics,
        path,
        "precision_at_k",
        "k",
        "precision",
        xlabel="k (retrieved items)",
        ylabel="precision@k",
        xscale="log",
        title=f"Precision@k ({metrics['bits']} bits)",
    )


def plot_loss_curves(history: list[dict[str, float]], path: Path) -> None:
    skip = {"epoch", "seconds"}
    terms = [k for k in history[0] if k not in skip] if history else []
    cols = 4
    rows = max(1, -(-len(terms) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    epochs = [h["epoch"] + 1 for h in history]
    for ax, term in zip(axes.flat, terms, strict=False):
        ax.plot(epochs, [h.get(term, float("nan")) for h in history])
        ax.set_title(term, fontsize=10)
        ax.set_xlabel("epoch", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(terms) :]:
        ax.axis("off")
    fig.suptitle("Training loss terms per epoch (sum over batches)")
    fig.tight_layout()
    _save(fig, path)


def plot_weight_distributions(
    weights: list[float], noisy: list[bool], path: Path, protected: list[bool] | None = None
) -> None:
    """Histograms of CHNR pair weights for truly clean and truly noisy training pairs
    (the unprotected ones when `protected` marks the clean subset the detector trained on)."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    keep = [not p for p in protected] if protected is not None else [True] * len(weights)
    rows = [(w, n) for w, n, k in zip(weights, noisy, keep, strict=True) if k]
    clean_w = [w for w, n in rows if not n]
    noisy_w = [w for w, n in rows if n]
    bins = [i / 25 for i in range(26)]
    ax.hist(clean_w, bins=bins, alpha=0.6, label=f"clean pairs ({len(clean_w)})")
    ax.hist(noisy_w, bins=bins, alpha=0.6, label=f"noisy pairs ({len(noisy_w)})")
    ax.set(
        xlabel="detector score / pair weight",
        ylabel="training pairs",
        title="CHNR pair weights by true noise flag"
        + (" (unprotected pairs)" if protected is not None else ""),
    )
    ax.legend()
    _save(fig, path)
