"""The four retrieval directions of PROTOCOL.md, scored for a trained run."""

from __future__ import annotations

from typing import Any

import numpy as np

from rshash.data.splits import Split
from rshash.evaluation.metrics import RetrievalScores, score_retrieval
from rshash.features.store import FeatureStore
from rshash.models.run import HashRun

DIRECTIONS = {
    "i2t": ("image", "text"),
    "t2i": ("text", "image"),
    "i2i": ("image", "image"),
    "t2t": ("text", "text"),
}
DIRECTION_NAMES = {"i2t": "I→T", "t2i": "T→I", "i2i": "I→I", "t2t": "T→T"}


def score_directions(
    image_codes: np.ndarray,
    text_codes: np.ndarray,
    labels: np.ndarray,
    split: Split,
    caption_offsets: np.ndarray,
) -> dict[str, RetrievalScores]:
    """Score I→T, T→I, I→I and T→T: split.query against split.retrieval, one label per image.

    `text_codes` has one row per caption (store order); the split picks the caption row(s).
    """
    sides: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    for role, images in (("query", split.query), ("retrieval", split.retrieval)):
        rows = split.caption_rows(images, caption_offsets)
        owners = split.caption_owners(images, caption_offsets)
        sides[role] = {
            "image": (image_codes[images], labels[images]),
            "text": (text_codes[rows], labels[owners]),
        }
    return {
        name: score_retrieval(*sides["query"][q], *sides["retrieval"][r])
        for name, (q, r) in DIRECTIONS.items()
    }


def evaluate_run(run: HashRun, store: FeatureStore) -> dict[str, Any]:
    """Codes for every image and caption of `store`, scored in all four directions.

    A run that held out the validation images is also scored on them (`"validation"`: its
    queries against every training image), the figure settings are chosen on.
    """
    run.check_features(store)
    run.split.check_matches(store.image_ids, str(store.path))
    labels = store.require_labels()
    image_codes = run.encode_images(store.image["plain"])
    text_codes = run.encode_texts(store.text["plain"])
    scores = score_directions(image_codes, text_codes, labels, run.split, store.caption_offsets)
    out: dict[str, Any] = {
        "bits": run.bits,
        "caption_mode": run.split.caption_mode,
        "split": run.split.sizes(),
        "directions": {name: s.summary() for name, s in scores.items()},
    }
    if run.config.hold_out_validation:
        val = score_directions(
            image_codes, text_codes, labels, run.split.validation_view(), store.caption_offsets
        )
        out["validation"] = {name: s.summary() for name, s in val.items()}
    return out
