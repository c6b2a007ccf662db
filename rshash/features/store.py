"""Reading a finished feature store: one HDF5 file per dataset and encoder pair.

Layout: `image/{plain,augmented}` (images x d_i), `text/{plain,augmented,perturbed}`
(captions x d_t, rows image by image), `ids/image`, `ids/caption`, `ids/caption_offsets`
(caption rows of image i are offsets[i]:offsets[i+1]), `captions/{raw,augmented,perturbed}`,
`labels` (-1 where unknown) and a JSON `metadata` attribute.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from rshash.errors import DataError

IMAGE_VIEWS = ("plain", "augmented")
TEXT_VIEWS = ("plain", "augmented", "perturbed")
CAPTION_VIEWS = ("raw", "augmented", "perturbed")


@dataclass(frozen=True)
class FeatureStore:
    """All matrices of a store, loaded into memory (UCM: about 90 MB)."""

    path: Path
    metadata: dict[str, Any]
    image_ids: tuple[str, ...]
    caption_offsets: np.ndarray
    labels: np.ndarray | None
    class_names: tuple[str, ...] | None
    image: dict[str, np.ndarray]
    text: dict[str, np.ndarray]
    captions: dict[str, list[str]]

    @property
    def num_images(self) -> int:
        return len(self.image_ids)

    @property
    def caption_counts(self) -> np.ndarray:
        return np.diff(self.caption_offsets)

    @property
    def caption_owner(self) -> np.ndarray:
        return np.repeat(np.arange(self.num_images), self.caption_counts)

    def require_labels(self) -> np.ndarray:
        if self.labels is None or len(np.unique(self.labels)) < 2:
            raise DataError(f"{self.path}: features carry fewer than two class labels")
        return self.labels

    def require_text(self) -> None:
        if not self.text:
            raise DataError(f"{self.path}: features hold no caption features (dataset had none)")

    @classmethod
    def open(cls, path: str | Path) -> FeatureStore:
        path = Path(path)
        if not path.is_file():
            partial = path.with_name(path.name + ".partial")
            hint = (
                " (an unfinished extraction exists: run it again to resume)"
                if partial.exists()
                else ""
            )
            raise DataError(f"{path}: feature file is missing{hint}")
        try:
            with h5py.File(path, "r") as f:
                meta = json.loads(f.attrs["metadata"])
                labels = f["labels"][...] if "labels" in f else None
                has_labels = labels is not None and (labels >= 0).all()
                captions = {
                    v: [s.decode() for s in f[f"captions/{v}"][...]]
                    for v in CAPTION_VIEWS
                    if f"captions/{v}" in f
                }
                return cls(
                    path=path,
                    metadata=meta,
                    image_ids=tuple(s.decode() for s in f["ids/image"][...]),
                    caption_offsets=f["ids/caption_offsets"][...].astype(np.int64),
                    labels=labels if has_labels else None,
                    class_names=tuple(meta["class_names"]) if meta.get("class_names") else None,
                    image={v: f[f"image/{v}"][...] for v in IMAGE_VIEWS},
                    text={v: f[f"text/{v}"][...] for v in TEXT_VIEWS if f"text/{v}" in f},
                    captions=captions,
                )
        except (OSError, KeyError, ValueError) as exc:
            raise DataError(f"{path}: not a complete rshash feature file ({exc})") from None
