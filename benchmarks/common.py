"""Helpers shared by the benchmarks: data location, result files, Markdown tables."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rshash.fileio import write_json_atomic, write_text_atomic
from rshash.reproducibility import machine, provenance

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
DATA_ROOT = Path(os.environ.get("RSHASH_DATA", REPO.parent / "shared" / "datasets"))
ANCHORS = DATA_ROOT.parent / "anchors"
CACHE = REPO / ".cache" / "benchmarks"
# Finished training runs' records, committed: a later session (or another machine) resumes a
# long sweep where the last one stopped, and only a training-code change re-runs a setting.
RUN_RECORDS = RESULTS / "runs"

__all__ = ["machine"]

# The code a trained result depends on: a change here invalidates cached results.
TRAINING_CODE = (
    "rshash/training",
    "rshash/losses",
    "rshash/models",
    "rshash/data/noise.py",
    "rshash/data/splits.py",
    "rshash/evaluation/metrics.py",
    "rshash/evaluation/protocol.py",
)


def training_code_revision() -> str:
    """SHA-256 (12 hex digits) of the training and scoring sources, committed or not."""
    digest = hashlib.sha256()
    for root in TRAINING_CODE:
        path = REPO / root
        for f in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            digest.update(str(f.relative_to(REPO)).encode())
            digest.update(f.read_bytes())
    return digest.hexdigest()[:12]


def cache_key(config: Any) -> str:
    """Key of a cached result: the training code's revision and the full configuration.

    A `features` path counts by its file name only, so the key does not depend on where the
    checkout lives.
    """
    if isinstance(config, dict) and "features" in config:
        config = {**config, "features": Path(str(config["features"])).name}
    blob = json.dumps({"code": training_code_revision(), "config": config}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def recorded_run(
    benchmark: str, name: str, config: Any, train: Callable[[], list[dict[str, Any]]] | None
) -> list[dict[str, Any]]:
    """The records of one training run: read from `RUN_RECORDS/benchmark/name-KEY.json` when
    this code revision already ran `config`, else trained now (with provenance) and saved;
    with `train` None, a run not yet recorded gives no records."""
    key = cache_key(config)
    path = RUN_RECORDS / benchmark / f"{name}-{key}.json"
    done = sorted((RUN_RECORDS / benchmark).glob(f"*-{key}.json"))  # the same run, named otherwise
    if done:
        return list(json.loads(done[0].read_text()))
    if train is None:
        return []
    records = [{**r, **run_provenance()} for r in train()]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, records)
    return records


def run_provenance() -> dict[str, Any]:
    """What each trained record carries: where it trained and with which code."""
    return {
        "machine": machine(),
        "code": training_code_revision(),
        "git": provenance()["git_revision"],
    }


def write_results(
    name: str, records: Any, markdown: str, trained_on: list[dict[str, Any]] | None = None
) -> None:
    """`name`.json and `name`.md; `trained_on` (records with `machine`) lists where runs
    trained, beside the machine that assembled the table."""
    meta = provenance()  # before writing: the results files must not make the tree dirty
    write_json_atomic(RESULTS / f"{name}.json", records)
    footer = f"\n\nTable assembled on: {machine()}; git {meta['git_revision']}.\n"
    if trained_on is not None:
        machines = sorted({json.dumps(r.get("machine"), sort_keys=True) for r in trained_on})
        codes = sorted({str(r.get("code")) for r in trained_on})
        footer += (
            f"Runs trained on: {'; '.join(machines)} (null: recorded before this was tracked); "
            f"training code revision(s): {', '.join(codes)}.\n"
        )
    write_text_atomic(RESULTS / f"{name}.md", markdown + footer)
    print(markdown)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)
