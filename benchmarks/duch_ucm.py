"""DUCH on UCM per PROTOCOL.md: bits 16/32/64/128 × seeds, and an ablation at 64 bits.

Seed s trains with seed s on the split drawn with seed 42 + s. mAP@20 is in the DUCH definition
(the one of ../shared/anchors). Finished runs are recorded in benchmarks/results/runs/duch/
(committed), so an interrupted benchmark resumes, in a later session too.
Usage: python -m benchmarks.duch_ucm [--bits 16 32 64 128] [--seeds 0 1 2] [--no-ablation]
       [--set loss.temperature=0.5 ...]   (a variant: results go to duch_ucm-<variant>.json)
       [--choose loss.alpha=0,0.001,0.01 16:loss.temperature=1,2 ...]   (settings chosen on the
       validation images; a `BITS:` prefix limits an option to that code length; default:
       CHOICES; `--choose` alone: none)
       [--table-only]   (assemble the tables from the recorded runs, skipping missing ones)
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import (
    ANCHORS,
    CACHE,
    DATA_ROOT,
    cache_key,
    markdown_table,
    recorded_run,
    write_results,
)
from rshash.data import load_dataset
from rshash.evaluation.protocol import evaluate_run
from rshash.features import ExtractConfig, FeatureStore, extract_features
from rshash.training import HashRun, TrainConfig, train

DIRECTIONS = ("i2t", "t2i", "i2i", "t2t")
# Settings chosen per code length and seed on the validation images: α everywhere, and the two
# settings the table before issue 16 had picked on the test queries (τ at 16 bits, lr at 32).
CHOICES = (
    "16:loss.alpha=0,0.01",
    "16:loss.temperature=1,2",
    "32:loss.alpha=0,0.01",
    "32:optim.lr=0.0001,0.0003",
    "64:loss.alpha=0,0.001,0.01",
    "128:loss.alpha=0,0.001,0.01",
)
ABLATIONS: dict[str, Callable[[TrainConfig], TrainConfig]] = {
    "full": lambda c: c,
    "no adversarial (α=0)": lambda c: replace(c, loss=replace(c.loss, alpha=0.0)),
    "no intra-modal terms": lambda c: replace(c, loss=replace(c.loss, intra_modal=False)),
    "no bit balance (γ=0)": lambda c: replace(c, loss=replace(c.loss, gamma=0.0)),
    "rule-based text view": lambda c: replace(c, text_view="perturbed"),
}


def ucm_features() -> Path:
    out = CACHE / "ucm-features.h5"
    if not out.exists():
        extract_features(load_dataset(DATA_ROOT / "ucm-captions"), out, ExtractConfig())
    return out


def run_once(
    cfg: TrainConfig, run_dir: Path, store: FeatureStore, table_only: bool = False
) -> dict[str, Any] | None:
    """Train (or reuse) one run and return its mAP@20 (DUCH def.) per direction; with
    `table_only`, a run not yet recorded gives None instead of training.

    The record is kept in benchmarks/results/runs/ under a key of the training code's revision
    and the full config, so it is reused only for the same code and settings, and says where
    the run trained. With `hold_out_validation` it also holds the validation figures.
    """

    def train_and_score() -> list[dict[str, Any]]:
        key = cache_key(cfg.to_dict())
        directory = run_dir.with_name(f"{run_dir.name}-{key}")
        train(cfg, directory, progress=False)
        run = HashRun.open(directory)
        scores = evaluate_run(run, store)
        record: dict[str, Any] = {
            f"{d}_map20": scores["directions"][d]["map@20_duch"] for d in DIRECTIONS
        }
        for d in DIRECTIONS if "validation" in scores else ():
            record[f"validation_{d}_map20"] = scores["validation"][d]["map@20_duch"]
        record["train_seconds"] = run.info["train_seconds"]
        return [record]

    records = recorded_run(
        "duch", run_dir.name, cfg.to_dict(), None if table_only else train_and_score
    )
    return records[0] if records else None


def base_config(features: Path, bits: int, seed: int, epochs: int) -> TrainConfig:
    cfg = TrainConfig(features=str(features), bits=bits, seed=seed, split_seed=42 + seed)
    return replace(cfg, optim=replace(cfg.optim, epochs=epochs))


def override(cfg: Any, assignment: str) -> Any:
    """`cfg` with one dotted field set, e.g. "loss.temperature=0.5" (cast to the field's type)."""
    key, _, text = assignment.partition("=")
    head, _, rest = key.partition(".")
    current = getattr(cfg, head)
    if rest:
        return replace(cfg, **{head: override(current, f"{rest}={text}")})
    value: Any = text.lower() in ("1", "true", "yes") if isinstance(current, bool) else text
    if not isinstance(current, bool):
        value = float(text) if current is None else type(current)(text)
    return replace(cfg, **{head: value})


def with_settings(cfg: TrainConfig, assignments: list[str]) -> TrainConfig:
    for assignment in assignments:
        cfg = override(cfg, assignment)
    return cfg


def candidates(choose: list[str], bits: int) -> list[list[str]]:
    """Every combination of the options `[BITS:]FIELD=V1,V2,...` that apply at `bits` (each a
    list of FIELD=V); an option with a `BITS:` prefix applies at that code length only."""
    options = []
    for spec in choose:
        head, colon, rest = spec.partition(":")
        if colon and not head.isdigit():
            raise SystemExit(f"--choose: expected [BITS:]FIELD=V1,V2,..., got {spec!r}")
        if colon and int(head) != bits:
            continue
        key, _, values = (rest if colon else spec).partition("=")
        if not key or not values:
            raise SystemExit(f"--choose: expected [BITS:]FIELD=V1,V2,..., got {spec!r}")
        options.append([f"{key}={v}" for v in values.split(",")])
    return [list(c) for c in itertools.product(*options)]


def choose_on_validation(
    base: TrainConfig,
    choose: list[str],
    name: str,
    runs: Path,
    store: FeatureStore,
    table_only: bool = False,
) -> tuple[str, dict[str, list[float]]] | None:
    """The candidate (space-separated FIELD=V) with the best validation mAP@20 (I→T + T→I),
    each fitted without the validation images, and every candidate's validation figures.
    With `table_only`, None unless every candidate's run is recorded."""
    validation: dict[str, list[float]] = {}
    for assignments in candidates(choose, base.bits):
        cfg = replace(with_settings(base, assignments), hold_out_validation=True)
        rec = run_once(cfg, runs / f"{name}-val-{variant_tag(assignments)}", store, table_only)
        if rec is None:
            return None
        validation[" ".join(assignments)] = [
            rec["validation_i2t_map20"],
            rec["validation_t2i_map20"],
        ]
        print(f"{name} validation {assignments}: {validation[' '.join(assignments)]}", flush=True)
    return max(validation, key=lambda k: sum(validation[k])), validation


def chosen_run(
    base: TrainConfig,
    choose: list[str],
    name: str,
    runs: Path,
    store: FeatureStore,
    table_only: bool = False,
) -> dict[str, Any] | None:
    """The setting chosen on validation (`choose_on_validation`), trained on the whole training
    set and scored on the test queries. With `table_only`, None unless all is recorded."""
    got = choose_on_validation(base, choose, name, runs, store, table_only)
    if got is None:
        return None
    best, validation = got
    rec = final_run(base, best, name, runs, store, table_only)
    return None if rec is None else {**rec, "chosen": best, "validation": validation}


def final_run(
    base: TrainConfig,
    best: str,
    name: str,
    runs: Path,
    store: FeatureStore,
    table_only: bool = False,
) -> dict[str, Any] | None:
    """`base` with the chosen assignments `best`, on the whole training set, scored on test."""
    final = with_settings(base, best.split())
    final_name = name if final == base else f"{name}-{variant_tag(best.split())}"
    return run_once(final, runs / final_name, store, table_only)


def variant_tag(assignments: list[str]) -> str:
    return "-".join(a.replace("=", "").replace(".", "_") for a in assignments)


def paper_rows(method: str = "DUCH") -> dict[tuple[str, int], float]:
    rows: dict[tuple[str, int], float] = {}
    with (ANCHORS / "duch-paper-map20.csv").open() as fh:
        for r in csv.DictReader(line for line in fh if not line.startswith("#")):
            if r["dataset"] == "UCM" and r["method"] == method:
                for bits in (16, 32, 64, 128):
                    rows[(r["direction"].lower(), bits)] = float(r[str(bits)])
    return rows


def mean_std(values: list[float]) -> str:
    """Mean ± sample standard deviation (ddof = 1); one value is marked as such."""
    if len(values) < 2:
        return f"{np.mean(values):.3f} (1 seed)"
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bits", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--ablation-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--no-ablation", action="store_true")
    parser.add_argument(
        "--ablations", nargs="+", default=list(ABLATIONS), help="Variants of the ablation to run."
    )
    parser.add_argument("--set", nargs="+", default=[], help="Config overrides, e.g. lr=...")
    parser.add_argument(
        "--choose",
        nargs="*",
        default=list(CHOICES),
        metavar="FIELD=V1,V2",
        help="Settings chosen per code length and seed on the validation images, e.g. "
        "loss.alpha=0,0.01 or 16:loss.temperature=1,2 (at 16 bits only; every combination is "
        "tried); the table reports the chosen ones. Default: CHOICES; none (`--choose` alone): "
        "the paper's settings, or --set.",
    )
    parser.add_argument(
        "--table-only",
        action="store_true",
        help="Assemble the tables from the recorded runs only; runs not recorded are left out.",
    )
    args = parser.parse_args()
    tag = variant_tag(args.set)
    features = ucm_features()
    store = FeatureStore.open(features)
    runs = CACHE / "runs"

    records = []
    for bits in args.bits:
        for seed in args.seeds:
            cfg = with_settings(base_config(features, bits, seed, args.epochs), args.set)
            name = f"duch-b{bits}-s{seed}-e{args.epochs}" + (f"-{tag}" if tag else "")
            if args.choose:
                rec = chosen_run(cfg, args.choose, name, runs, store, args.table_only)
            else:
                rec = run_once(cfg, runs / name, store, args.table_only)
            if rec is None:
                continue
            records.append({"bits": bits, "seed": seed, **rec})
            print(json.dumps(records[-1]), flush=True)
    recorded = " (those recorded)" if args.table_only else ""
    paper = paper_rows()
    rows = []
    for bits in args.bits:
        sel = [r for r in records if r["bits"] == bits]
        if not sel:
            continue
        row = [str(bits)]
        for d in ("i2t", "t2i"):
            ours = [r[f"{d}_map20"] for r in sel]
            row += [
                mean_std(ours),
                f"{paper[(d, bits)]:.3f}",
                f"{np.mean(ours) / paper[(d, bits)]:.2f}",
            ]
        row += [mean_std([r[f"{d}_map20"] for r in sel]) for d in ("i2i", "t2t")]
        row.append(f"{np.mean([r['train_seconds'] for r in sel]):.0f}")
        if args.choose:
            row.append("; ".join(f"s{r['seed']}: {r['chosen']}" for r in sel))
        rows.append(row)
    header = [
        "bits",
        "I→T ours",
        "I→T paper",
        "ratio",
        "T→I ours",
        "T→I paper",
        "ratio",
        "I→I ours",
        "T→T ours",
        "train s",
    ] + (["chosen on validation"] if args.choose else [])
    chosen = (
        f"; per code length and seed, {' and '.join(args.choose)} chosen on the validation "
        "images (a seeded 10 % of the training images, held out while choosing; best "
        "I→T + T→I mAP@20), then trained on the whole training set and scored once on the test "
        "queries"
        if args.choose
        else ""
    )
    title = (
        f"# DUCH on UCM-Captions, mAP@20 (DUCH definition), mean ± sample std over seeds "
        f"{args.seeds}{recorded}\n\nOurs: EfficientNet-Lite0 + all-MiniLM-L6-v2 features, "
        f"{args.epochs} epochs, {', '.join(args.set) or 'paper defaults'}{chosen}. Paper: "
        "ResNet-18 + BERT features (../shared/anchors/duch-paper-map20.csv).\n\n"
    )
    name = "duch_ucm" + (f"-{tag}" if tag else "")
    write_results(name, records, title + markdown_table(header, rows), trained_on=records)

    if args.no_ablation or tag:
        return
    ablation = []
    for name, change in ABLATIONS.items():
        if name not in args.ablations:
            continue
        for seed in args.ablation_seeds:
            cfg = change(base_config(features, 64, seed, args.epochs))
            slug = "".join(c for c in name if c.isascii() and c.isalnum())
            tag = "duch-b64" if name == "full" else f"abl-{slug}"
            rec = run_once(cfg, runs / f"{tag}-s{seed}-e{args.epochs}", store, args.table_only)
            if rec is None:
                continue
            ablation.append({"variant": name, "bits": 64, "seed": seed, **rec})
            print(json.dumps(ablation[-1]), flush=True)
    full = {
        d: np.mean([r[f"{d}_map20"] for r in ablation if r["variant"] == "full"])
        for d in DIRECTIONS
    }
    rows = []
    for name in args.ablations:
        sel = [r for r in ablation if r["variant"] == name]
        if not sel:
            continue
        row = [name]
        for d in DIRECTIONS:
            vals = [r[f"{d}_map20"] for r in sel]
            row.append(f"{mean_std(vals)} ({np.mean(vals) - full[d]:+.3f})")
        rows.append(row)
    title = (
        f"# DUCH ablation at 64 bits on UCM, mAP@20 (DUCH def.), mean ± sample std over seeds "
        f"{args.ablation_seeds}{recorded}; in brackets: change against the full method\n\n"
    )
    write_results(
        "duch_ablation",
        ablation,
        title + markdown_table(["variant", "I→T", "T→I", "I→I", "T→T"], rows),
        trained_on=ablation,
    )


if __name__ == "__main__":
    main()
