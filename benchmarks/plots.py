"""Figures for the README from the benchmark records: mAP@20 against noise and against bits.

Reads benchmarks/results/{chnr_ucm,duch_ucm,duch_ucm-old-code,baselines_ucm}.json (mean ± std
over seeds) and the published rows of ../shared/anchors, writes noise_sweep.png and
bits_sweep.png beside them.
Usage: python -m benchmarks.plots
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable

import matplotlib.pyplot as plt
import numpy as np

from benchmarks.chnr_ucm import paper_table
from benchmarks.common import RESULTS
from benchmarks.duch_ucm import paper_rows
from rshash.fileio import atomic_path

DIRECTIONS = {"i2t": "image → text", "t2i": "text → image"}


def _series(
    records: list[dict], key: Callable[[dict], str | None], x: str, direction: str
) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """name → (x values, mean, sample std) of `direction`'s mAP@20 over seeds."""
    groups: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        name = key(r)
        if name:
            groups[name][r[x]].append(r[f"{direction}_map20"])
    out = {}
    for name, by_x in groups.items():
        xs = np.array(sorted(by_x))
        vals = [by_x[v] for v in xs]
        std = [np.std(v, ddof=1) if len(v) > 1 else 0.0 for v in vals]
        out[name] = (xs, np.array([np.mean(v) for v in vals]), np.array(std))
    return out


def _save(fig: plt.Figure, name: str) -> None:
    with atomic_path(RESULTS / name) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {RESULTS / name}")


def noise_sweep() -> None:
    """mAP@20 by noise probability, with clean DUCH (64 bits) and the goal 0.03 below it."""
    records = json.loads((RESULTS / "chnr_ucm.json").read_text())
    clean = [r for r in json.loads((RESULTS / "duch_ucm.json").read_text()) if r["bits"] == 64]
    names = {
        "duch": "DUCH",
        "chnr-oracle": "CHNR, true flags as weights",
        "chnr-free": "CHNR clean-free",
        "djsrh": "DJSRH",
        "jdsh": "JDSH",
    }

    def key(r: dict) -> str | None:
        if r["method"] == "chnr":
            return "CHNR (weighting chosen on validation)"
        return names.get(r["method"])

    paper = paper_table()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, (d, title) in zip(axes, DIRECTIONS.items(), strict=True):
        for name, (xs, mean, std) in _series(records, key, "p", d).items():
            ax.errorbar(xs, mean, yerr=std, marker="o", capsize=3, label=name)
        ps = sorted(paper[("DUCH-NR-EW", d)])
        best = [
            max(paper[(n, d)][p] for n in ("DUCH-NR-NW", "DUCH-NR-EW", "DUCH-NR-DW")) for p in ps
        ]
        ax.plot(ps, best, "k--", label="paper, best CHNR weighting")
        level = float(np.mean([r[f"{d}_map20"] for r in clean]))
        ax.axhline(
            level, color="0.4", linestyle=":", label=f"DUCH on clean pairs ({len(clean)} seeds)"
        )
        ax.axhspan(level - 0.03, level, color="0.85", alpha=0.5, label="within 0.03 of clean")
        ax.set(title=f"UCM, 64 bits, {title}", xlabel="noise probability p")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mAP@20 (DUCH def.)")
    axes[1].legend(fontsize=8, loc="lower left")
    _save(fig, "noise_sweep.png")


def bits_sweep() -> None:
    """DUCH and the baselines by code length with the fixed code (settings chosen on
    validation), the published rows, and the DUCH line from before issue 16 for comparison."""
    old = json.loads((RESULTS / "duch_ucm-old-code.json").read_text())
    fixed = json.loads((RESULTS / "duch_ucm.json").read_text())
    base = json.loads((RESULTS / "baselines_ucm.json").read_text())
    records = [{**r, "method": "duch"} for r in fixed] + base
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, (d, title) in zip(axes, DIRECTIONS.items(), strict=True):
        series = _series(records, lambda r: str(r["method"]).upper(), "bits", d)
        for name, (xs, mean, std) in series.items():
            line = ax.errorbar(xs, mean, yerr=std, marker="o", capsize=3, label=f"{name} (ours)")
            ref = paper_rows(name)
            bits = sorted(b for (direction, b) in ref if direction == d)
            ax.plot(
                bits,
                [ref[(d, b)] for b in bits],
                linestyle=":",
                marker="x",
                color=line[0].get_color(),
                label=f"{name} (paper)",
            )
        for _, (xs, mean, std) in _series(old, lambda r: "DUCH", "bits", d).items():
            ax.errorbar(
                xs,
                mean,
                yerr=std,
                linestyle="--",
                color="0.6",
                capsize=2,
                label="DUCH before issue 16 (3 seeds)",
            )
        ax.set(title=f"UCM, clean, {title}", xlabel="code length (bits)")
        ax.set_xscale("log", base=2)
        ax.set_xticks([16, 32, 64, 128], labels=["16", "32", "64", "128"])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mAP@20 (DUCH def.)")
    axes[1].legend(fontsize=8, loc="lower right")
    _save(fig, "bits_sweep.png")


def main() -> None:
    noise_sweep()
    bits_sweep()


if __name__ == "__main__":
    main()
