"""`make demo`: UCM-Captions end to end, then a search service over UCM and RSSCN7.

1. features of UCM-Captions (cached); 2. CHNR, 64 bits, with 20 % of the captions swapped
(a short schedule); 3. evaluation report per PROTOCOL.md (table, plots); 4. one index holding
UCM (images and captions) and RSSCN7 (images the model never saw); 5. the search service, whose
URL is printed. Each step skips work already done. Data come from $RSHASH_DATA (default:
../shared/datasets beside the checkout); without it, `rshash datasets fetch ucm-captions`
downloads UCM-Captions, and RSSCN7 is left out when absent.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from rshash.data import Dataset
from rshash.errors import RshashError

REPO = Path(__file__).resolve().parent.parent


def data_root() -> Path:
    return Path(os.environ.get("RSHASH_DATA", REPO.parent / "shared" / "datasets"))


def _dataset_dir(name: str) -> Path:
    path = data_root() / name
    if not path.is_dir():
        raise RshashError(
            f"{path}: {name} not found; set RSHASH_DATA to the datasets folder, or download it "
            f"with: rshash datasets fetch {name} --out {data_root()}"
        )
    return path


def _reuse_test_features(ucm: Dataset, features: Path) -> bool:
    """Link the features `make test` cached, when they are what the demo would extract (about
    ten minutes of a fresh demo on 2 cores)."""
    from rshash.features import ExtractConfig
    from rshash.features.extract import same_extraction

    cached = REPO / ".cache" / "tests" / "ucm-features.h5"
    if not cached.exists() or not same_extraction(cached, ucm, ExtractConfig()):
        return False
    features.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(cached, features)
    except OSError:
        shutil.copyfile(cached, features)
    print(f"      reusing {cached} (the same extraction, cached by make test)")
    return True


def build_demo(work: Path, epochs: int = 60, meta_epochs: int = 30) -> Path:
    """Run steps 1-4 into `work`; returns the index directory."""
    from rshash.data import load_dataset
    from rshash.evaluation.report import format_table
    from rshash.evaluation.run_report import evaluate_and_report
    from rshash.features import ExtractConfig, extract_features
    from rshash.index.build import add_to_index, build_index
    from rshash.training import CHNRConfig, OptimConfig, TrainConfig, train

    ucm = _dataset_dir("ucm-captions")
    rsscn7 = data_root() / "rsscn7"
    features = work / "ucm-features.h5"
    print(f"[1/5] features of {ucm} -> {features}")
    if not features.exists() and not _reuse_test_features(load_dataset(ucm), features):
        extract_features(load_dataset(ucm), features, ExtractConfig())
    run = work / "runs" / "chnr-64-p0.2"
    print(f"[2/5] CHNR, 64 bits, 20 % swapped captions, {epochs} epochs -> {run}")
    if not (run / "model.json").exists():
        cfg = TrainConfig(
            features=str(features),
            method="chnr",
            bits=64,
            optim=OptimConfig(epochs=epochs),
            chnr=CHNRConfig(meta_epochs=meta_epochs, noise=0.2, clean_fraction=0.3),
        )
        train(cfg, run)
    print("[3/5] evaluation (PROTOCOL.md)")
    if not (run / "metrics.json").exists():
        evaluate_and_report(run)
    print(format_table(json.loads((run / "metrics.json").read_text())))
    print(f"report: {run / 'report.md'}  plots: {run / 'plots'}")
    index = work / "index"
    print(f"[4/5] index of UCM-Captions and RSSCN7 -> {index}")
    if not (index / "index.json").exists():
        build_index(run, load_dataset(ucm), index, features=features)
    sources = json.loads((index / "index.json").read_text())["sources"]
    if not rsscn7.is_dir():
        print(f"      {rsscn7} not found: the index holds UCM-Captions only")
    elif not any(s.get("dataset") == "rsscn7" for s in sources):
        add_to_index(index, load_dataset(rsscn7))
    return index


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--no-serve", action="store_true", help="Stop after building the index.")
    args = parser.parse_args()
    index = build_demo(REPO / "demo-output")
    if args.no_serve:
        return
    import uvicorn

    from rshash.service import create_app

    app = create_app(index)
    print(f"[5/5] search service: http://127.0.0.1:{args.port}/  (API docs at /docs; Ctrl-C stops)")
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    try:
        main()
    except RshashError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
