"""`make demo`: UCM-Captions end to end — features, DUCH training, evaluation report.

Each step skips work already done (features are cached, training resumes, a finished run is
reused). Data come from $RSHASH_DATA (default: ../shared/datasets beside the checkout).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from rshash.errors import RshashError

REPO = Path(__file__).resolve().parent.parent


def data_root() -> Path:
    return Path(os.environ.get("RSHASH_DATA", REPO.parent / "shared" / "datasets"))


def main() -> None:
    from rshash.data import load_dataset
    from rshash.evaluation.report import format_table
    from rshash.evaluation.run_report import evaluate_and_report
    from rshash.features import ExtractConfig, extract_features
    from rshash.training import TrainConfig, train

    ucm = data_root() / "ucm-captions"
    if not ucm.is_dir():
        raise RshashError(f"{ucm}: UCM-Captions not found; set RSHASH_DATA to the datasets folder")
    work = REPO / "demo-output"
    features = work / "ucm-features.h5"
    print(f"[1/3] features of {ucm} -> {features}")
    if not features.exists():
        extract_features(load_dataset(ucm), features, ExtractConfig())
    run = work / "runs" / "duch-64"
    print(f"[2/3] DUCH, 64 bits, 100 epochs -> {run}")
    if not (run / "model.pt").exists():
        train(TrainConfig(features=str(features), bits=64), run)
    print("[3/3] evaluation (PROTOCOL.md)")
    metrics = evaluate_and_report(run)
    print(format_table(metrics))
    print(f"report: {run / 'report.md'}  plots: {run / 'plots'}")


if __name__ == "__main__":
    try:
        main()
    except RshashError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
