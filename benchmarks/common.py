"""Helpers shared by the benchmarks: data location, result files, Markdown tables."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import torch

from rshash.fileio import write_json_atomic, write_text_atomic
from rshash.reproducibility import provenance

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
DATA_ROOT = Path(os.environ.get("RSHASH_DATA", REPO.parent / "shared" / "datasets"))
ANCHORS = DATA_ROOT.parent / "anchors"
CACHE = REPO / ".cache" / "benchmarks"


def machine() -> dict[str, Any]:
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def write_results(name: str, records: Any, markdown: str) -> None:
    write_json_atomic(RESULTS / f"{name}.json", records)
    meta = provenance()
    footer = f"\n\nMachine: {machine()}; git {meta['git_revision']}.\n"
    write_text_atomic(RESULTS / f"{name}.md", markdown + footer)
    print(markdown)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)
