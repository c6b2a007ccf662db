"""DJSRH and JDSH baselines on clean UCM per PROTOCOL.md: bits 16/32/64/128 × seeds.

Same features, splits (seed s → split seed 42 + s), optimiser, 100 epochs and evaluation as
`duch_ucm`; mAP@20 in the DUCH definition beside the published rows of
../shared/anchors/duch-paper-map20.csv. Finished runs are reused.
Usage: python -m benchmarks.baselines_ucm [--methods djsrh jdsh] [--bits ...] [--seeds 0 1 2]
       [--table-only]
"""

from __future__ import annotations

import argparse
from dataclasses import replace

from benchmarks.common import CACHE, markdown_table, write_results
from benchmarks.duch_ucm import (
    base_config,
    mean_std,
    override,
    paper_rows,
    run_once,
    ucm_features,
    variant_tag,
)
from rshash.features import FeatureStore
from rshash.training.config import default_lr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--methods", nargs="+", default=["djsrh", "jdsh"])
    parser.add_argument("--bits", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--set", nargs="+", default=[], help="Config overrides, e.g. optim.lr=...")
    parser.add_argument(
        "--table-only",
        action="store_true",
        help="Assemble the table from the recorded runs only; runs not recorded are left out.",
    )
    args = parser.parse_args()
    tag = variant_tag(args.set)
    features = ucm_features()
    store = FeatureStore.open(features)
    records = []
    for method in args.methods:
        for bits in args.bits:
            for seed in args.seeds:
                cfg = replace(base_config(features, bits, seed, args.epochs), method=method)
                cfg = replace(cfg, optim=replace(cfg.optim, lr=default_lr(cfg.method)))
                for assignment in args.set:
                    cfg = override(cfg, assignment)
                name = f"{method}-b{bits}-s{seed}-e{args.epochs}-lr{cfg.optim.lr:g}"
                name += f"-{tag}" if tag else ""
                run_dir = CACHE / "runs" / name
                scores = run_once(cfg, run_dir, store, args.table_only)
                if scores is None:
                    continue
                rec = {"method": method, "bits": bits, "seed": seed, **scores}
                records.append(rec)
                print(rec, flush=True)
    rows = []
    for method in args.methods:
        paper = paper_rows(method.upper())
        for bits in args.bits:
            sel = [r for r in records if r["method"] == method and r["bits"] == bits]
            if not sel:
                continue
            row = [method.upper(), str(bits)]
            for d in ("i2t", "t2i"):
                row.append(mean_std([r[f"{d}_map20"] for r in sel]))
                ref = paper.get((d, bits))
                row.append(f"{ref:.3f}" if ref else "—")
                ours = sum(r[f"{d}_map20"] for r in sel) / len(sel)
                row.append(f"{ours / ref:.2f}" if ref else "—")
            rows.append(row)
    header = ["method", "bits", "I→T ours", "I→T paper", "ratio", "T→I ours", "T→I paper", "ratio"]
    title = (
        "# DJSRH and JDSH on clean UCM-Captions, mAP@20 (DUCH definition), mean ± sample std over "
        f"seeds {args.seeds}{' (those recorded)' if args.table_only else ''}\n\n"
        "Ours: EfficientNet-Lite0 + all-MiniLM-L6-v2 features, "
        f"{args.epochs} epochs, batch 256, Adam 1e-3 {' '.join(args.set)}; joint matrix "
        "β = 0.6, η = 0.4, μ = 1.5, "
        "λ = 1 (DJSRH), 0.1 (JDSH); JDSH decision at ±1 row std, boost 0.2, damp 0.5. Paper rows: "
        "../shared/anchors/duch-paper-map20.csv (ResNet-18 + BERT features).\n\n"
    )
    write_results(
        "baselines_ucm" + (f"-{tag}" if tag else ""),
        records,
        title + markdown_table(header, rows),
        trained_on=records,
    )


if __name__ == "__main__":
    main()
