"""`rshash evaluate RUN`: metrics.json, plots and report.md written into the run directory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rshash.evaluation.plots import plot_loss_curves, plot_pr_curves, plot_precision_at_k
from rshash.evaluation.protocol import evaluate_run
from rshash.evaluation.report import markdown_report
from rshash.features.store import FeatureStore
from rshash.fileio import write_json_atomic, write_text_atomic
from rshash.training.run import HashRun


def evaluate_and_report(run_path: str | Path, features: str | Path | None = None) -> dict[str, Any]:
    run = HashRun.open(run_path)
    store = FeatureStore.open(features or run.config.features)
    metrics = evaluate_run(run, store)
    metrics["method"] = run.config.method
    extra = run.path / "run_metrics.json"
    if extra.exists():
        metrics.update(json.loads(extra.read_text()))
    write_json_atomic(run.path / "metrics.json", metrics)
    plots = run.path / "plots"
    plot_pr_curves(metrics, plots / "pr_curves.png")
    plot_precision_at_k(metrics, plots / "precision_at_k.png")
    history_path = run.path / "history.json"
    if history_path.exists():
        plot_loss_curves(json.loads(history_path.read_text()), plots / "loss_curves.png")
    config = json.loads((run.path / "config.json").read_text())
    write_text_atomic(run.path / "report.md", markdown_report(metrics, config))
    return metrics
