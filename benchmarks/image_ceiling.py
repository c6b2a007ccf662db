"""How far the image features can carry I→T on UCM: DUCH against a supervised ceiling.

DUCH's I→T stops near 0.94 while T→I and T→T reach 0.99-1.00, so the image side limits it.
This measures the limit of the image features themselves, on each seed's split:
- supervised probes (a linear one, multinomial logistic regression, and an MLP with one
  hidden layer) on the frozen EfficientNet-Lite0 features, trained with the class labels DUCH
  never sees, their setting chosen on the validation images, each used as an I→T retriever:
  a caption is ranked by the probe's probability of its image's class (an oracle text side,
  which T→T = 1.000 justifies). Its mAP@20 (DUCH definition) is about its test accuracy:
  what perfect captions plus these image features give;
- the float image features' own I→I mAP@20 (cosine), the unsupervised starting point.
DUCH's I→T (the recorded runs in duch_ucm.json) is printed beside the better probe with
their ratio.
Usage: python -m benchmarks.image_ceiling [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.neural_network import MLPClassifier

from benchmarks.common import RESULTS, markdown_table, write_results
from benchmarks.duch_ucm import ucm_features
from rshash.data.splits import Split
from rshash.evaluation.metrics import average_precision_duch, ranked_relevance
from rshash.features import FeatureStore
from rshash.training import TrainConfig
from rshash.training.run import load_or_make_split

# Each probe: its model for a setting, and the settings tried on the validation images.
PROBES: dict[str, tuple[Callable[[float], Any], tuple[float, ...]]] = {
    "linear": (lambda c: LogisticRegression(C=c, max_iter=5000), (0.01, 0.1, 1.0, 10.0)),
    "mlp": (
        lambda a: MLPClassifier((1024,), alpha=a, max_iter=300, random_state=0),
        (1e-4, 1e-2, 1.0),
    ),
}


def probe_scores(
    name: str, x: np.ndarray, labels: np.ndarray, split: Split, owners: np.ndarray
) -> dict[str, float]:
    """One probe: its setting chosen on validation, refitted on every training image, then
    its test accuracy and its I→T mAP@20 with captions ranked by their image class's
    probability."""
    make, settings = PROBES[name]
    fit, val = split.fit_images(True), split.validation
    validation = {s: make(s).fit(x[fit], labels[fit]).score(x[val], labels[val]) for s in settings}
    chosen = max(settings, key=lambda s: validation[s])
    clf = make(chosen).fit(x[split.train], labels[split.train])
    queries = split.query
    column = {k: i for i, k in enumerate(clf.classes_)}
    item_prob = clf.predict_proba(x[queries])[:, [column[k] for k in labels[owners]]]
    relevant = ranked_relevance(-item_prob, labels[queries], labels[owners])
    return {
        f"{name}_setting": chosen,
        f"{name}_validation_accuracy": float(validation[chosen]),
        f"{name}_test_accuracy": float(clf.score(x[queries], labels[queries])),
        f"{name}_i2t_map20": float(average_precision_duch(relevant, 20).mean()),
    }


def seed_row(store: FeatureStore, seed: int) -> dict[str, Any]:
    features = str(store.path)
    cfg = TrainConfig(features=features, seed=seed, split_seed=42 + seed, hold_out_validation=True)
    with tempfile.TemporaryDirectory() as tmp:
        split = load_or_make_split(Path(tmp), store, cfg)
    labels = store.require_labels()
    x = np.asarray(store.image["plain"], dtype=np.float64)
    owners = split.caption_owners(split.retrieval, store.caption_offsets)
    record: dict[str, Any] = {"seed": seed}
    for name in PROBES:
        record.update(probe_scores(name, x, labels, split, owners))
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    cosine = ranked_relevance(
        -(unit[split.query] @ unit[split.retrieval].T),
        labels[split.query],
        labels[split.retrieval],
    )
    record["float_i2i_map20"] = float(average_precision_duch(cosine, 20).mean())
    record["ceiling_i2t_map20"] = max(record[f"{n}_i2t_map20"] for n in PROBES)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    store = FeatureStore.open(ucm_features())
    duch = json.loads((RESULTS / "duch_ucm.json").read_text())
    records, rows = [], []
    for seed in args.seeds:
        rec = seed_row(store, seed)
        for bits in (64, 128):
            got = [r for r in duch if r["bits"] == bits and r["seed"] == seed]
            rec[f"duch_b{bits}_i2t_map20"] = got[0]["i2t_map20"] if got else None
            rec[f"duch_b{bits}_i2i_map20"] = got[0]["i2i_map20"] if got else None
        records.append(rec)
        row = [str(seed)]
        for name in PROBES:
            row += [f"{rec[f'{name}_test_accuracy']:.3f}", f"{rec[f'{name}_i2t_map20']:.3f}"]
        row.append(f"{rec['float_i2i_map20']:.3f}")
        for bits in (64, 128):
            ours = rec[f"duch_b{bits}_i2t_map20"]
            row += (
                [f"{ours:.3f}", f"{ours / rec['ceiling_i2t_map20']:.2f}"]
                if ours is not None
                else ["—", "—"]
            )
        rows.append(row)
    header = [
        "seed",
        "linear probe test accuracy",
        "linear probe I→T",
        "MLP probe test accuracy",
        "MLP probe I→T",
        "float features I→I",
        "DUCH 64 I→T",
        "ratio to the better probe",
        "DUCH 128 I→T",
        "ratio to the better probe",
    ]
    title = (
        "# The image side's ceiling on UCM, mAP@20 (DUCH definition): supervised probes on the "
        "frozen image features (EfficientNet-Lite0; linear: logistic regression, C chosen on "
        "validation among 0.01-10; MLP: one hidden layer of 1024, L2 chosen among 1e-4-1), as "
        "I→T retrievers with an oracle text side, against unsupervised DUCH (duch_ucm.json, "
        "α chosen on validation)\n\n"
    )
    write_results("image_ceiling", records, title + markdown_table(header, rows))


if __name__ == "__main__":
    main()
