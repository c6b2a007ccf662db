"""`rshash evaluate RUN`: metrics.json, plots and report.md written into the run directory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rshash.evaluation.plots import (
    plot_loss_curves,
    plot_pr_curves,
    plot_precision_at_k,
    plot_weight_distributions,
)
from rshash.evaluation.protocol import evaluate_run
from rshash.evaluation.report import markdown_report
from rshash.features.store import FeatureStore
from rshash.fileio import write_json_atomic, write_text_atomic
from rshash.models.run import HashRun


def evaluate_and_report(run_path: str | Path, features: str | Path | None = None) -> dict[str, Any]:
    run = HashRun.open(run_path)
    store = FeatureStore.open(features or run.config.features)
    metrics = evaluate_run(run, store)
    metrics["method"] = run.config.method
    history = _read(run.path / "history.json") or []
    plots = run.path / "plots"
    detection = _read(run.path / "noise_detection.json")
    if detection and "noisy" in detection:
        metrics["noise_detection"] = {
            "weighting": detection["weighting"],
            "noise_auc": detection.get("noise_auc"),
            "noise_ap": detection.get("noise_ap"),
            "scored_pairs": detection.get("scored_pairs", "all"),
            "noise_auc_all_pairs": detection.get("noise_auc_all_pairs"),
            "detector_auc": detection.get("detector_auc"),
            "per_epoch": [
                {"epoch": h["epoch"], "noise_auc": h["noise_auc"], "noise_ap": h.get("noise_ap")}
                for h in history
                if "noise_auc" in h
            ],
        }
        # Detector scores where a detector was trained; the applied weights of `self` runs.
        scores = detection.get("detector_scores") or detection["weights"]
        plot_weight_distributions(
            scores,
            detection["noisy"],
            plots / "pair_weights.png",
            protected=detection.get("protected"),
        )
    write_json_atomic(run.path / "metrics.json", metrics)
    plot_pr_curves(metrics, plots / "pr_curves.png")
    plot_precision_at_k(metrics, plots / "precision_at_k.png")
    if history:
        plot_loss_curves(history, plots / "loss_curves.png")
    config = json.loads((run.path / "config.json").read_text())
    write_text_atomic(run.path / "report.md", markdown_report(metrics, config))
    return metrics


def _read(path: Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None
