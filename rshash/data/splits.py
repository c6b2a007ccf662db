"""The DUCH/CHNR protocol split over images, and the caption(s) each image contributes."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np

from rshash.data.dataset import Dataset
from rshash.errors import DataError
from rshash.fileio import write_json_atomic

CaptionMode = Literal["one", "all"]


@dataclass(frozen=True)
class Split:
    """Image indices of the train / query / retrieval sets and the caption choice per image.

    `caption_mode="one"`: image i contributes caption `caption_choice[i]` (the protocol of the
    papers). `"all"`: every caption of an image is used (common image-text retrieval protocol).
    `validation` is a seeded part of `train` (drawn with `validation_seed`) on which settings
    are chosen: held out of training while choosing, then trained on with the rest.
    """

    seed: int
    train: np.ndarray
    query: np.ndarray
    retrieval: np.ndarray
    caption_choice: np.ndarray
    caption_mode: CaptionMode
    image_ids: tuple[str, ...]
    validation: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    validation_seed: int | None = None

    def sizes(self) -> dict[str, int]:
        return {
            "train": len(self.train),
            "query": len(self.query),
            "retrieval": len(self.retrieval),
            "validation": len(self.validation),
        }

    def fit_images(self, hold_out_validation: bool) -> np.ndarray:
        """The training images a run fits on: all of `train`, or `train` without validation."""
        if not hold_out_validation:
            return self.train
        if len(self.validation) == 0:
            raise DataError("this split has no validation images to hold out (draw it again)")
        return np.setdiff1d(self.train, self.validation)

    def validation_view(self) -> Split:
        """The split settings are chosen on: validation images as queries against every
        training image (validation and the rest, PROTOCOL.md), fitted on the rest."""
        return replace(
            self,
            train=self.fit_images(True),
            query=self.validation,
            retrieval=self.train,
        )

    def caption_rows(self, images: np.ndarray, caption_offsets: np.ndarray) -> np.ndarray:
        """Rows of the flattened caption matrix used for `images` under this split's mode."""
        if self.caption_mode == "one":
            return caption_offsets[images] + self.caption_choice[images]
        return np.concatenate(
            [np.arange(caption_offsets[i], caption_offsets[i + 1]) for i in images]
        ).astype(np.int64)

    def caption_owners(self, images: np.ndarray, caption_offsets: np.ndarray) -> np.ndarray:
        """The image index of each row returned by `caption_rows` (same order)."""
        if self.caption_mode == "one":
            return np.asarray(images, dtype=np.int64)
        counts = np.diff(caption_offsets)[images]
        return np.repeat(np.asarray(images, dtype=np.int64), counts)

    def to_dict(self) -> dict[str, object]:
        return {
            "seed": self.seed,
            "caption_mode": self.caption_mode,
            "sizes": self.sizes(),
            "train": self.train.tolist(),
            "query": self.query.tolist(),
            "retrieval": self.retrieval.tolist(),
            "caption_choice": self.caption_choice.tolist(),
            "image_ids": list(self.image_ids),
            "validation_seed": self.validation_seed,
            "validation": self.validation.tolist(),
        }

    def save(self, path: str | Path) -> None:
        write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> Split:
        path = Path(path)
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
            return cls(
                seed=int(d["seed"]),
                train=np.asarray(d["train"], dtype=np.int64),
                query=np.asarray(d["query"], dtype=np.int64),
                retrieval=np.asarray(d["retrieval"], dtype=np.int64),
                caption_choice=np.asarray(d["caption_choice"], dtype=np.int64),
                caption_mode=d["caption_mode"],
                image_ids=tuple(d["image_ids"]),
                validation=np.asarray(d.get("validation", []), dtype=np.int64),
                validation_seed=d.get("validation_seed"),
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DataError(f"{path}: not a readable split file ({exc})") from None

    def check_matches(self, image_ids: tuple[str, ...] | list[str], where: str) -> None:
        if tuple(image_ids) != self.image_ids:
            raise DataError(f"{where}: its images differ from those the split was drawn over")


def make_split(
    dataset: Dataset | None = None,
    seed: int = 42,
    *,
    image_ids: tuple[str, ...] | None = None,
    caption_counts: np.ndarray | None = None,
    train_fraction: float = 0.5,
    query_fraction: float = 0.2,
    caption_mode: CaptionMode = "one",
    validation_fraction: float = 0.1,
    validation_seed: int | None = None,
) -> Split:
    """Seeded split: `train_fraction` of images train, `query_fraction` of the rest are queries.

    Sizes are floored, which gives the published 1050/210/840 (UCM) and 5460/1092/4369 (RSICD).
    A `validation_fraction` of the training images (UCM: 105) is drawn with `validation_seed`
    (default: `seed`) from its own stream, so train/query/retrieval do not depend on it.
    Pass a Dataset, or `image_ids` and `caption_counts` (e.g. read from a feature store).
    """
    if dataset is not None:
        image_ids, caption_counts = dataset.image_ids, dataset.caption_counts
    if image_ids is None or caption_counts is None:
        raise ValueError("make_split needs a dataset, or image_ids and caption_counts")
    n = len(image_ids)
    if n < 3:
        raise DataError(f"cannot split {n} images into train, query and retrieval sets")
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    n_train = int(n * train_fraction)
    n_query = int((n - n_train) * query_fraction)
    counts = np.maximum(np.asarray(caption_counts, dtype=np.int64), 1)
    choice = (rng.random(n) * counts).astype(np.int64)
    train = np.sort(order[:n_train])
    vseed = seed if validation_seed is None else validation_seed
    n_val = int(len(train) * validation_fraction)
    validation = np.sort(np.random.default_rng([vseed, 104729]).permutation(train)[:n_val])
    return Split(
        seed=seed,
        train=train,
        query=np.sort(order[n_train : n_train + n_query]),
        retrieval=np.sort(order[n_train + n_query :]),
        caption_choice=choice,
        caption_mode=caption_mode,
        image_ids=tuple(image_ids),
        validation=validation,
        validation_seed=vseed,
    )
