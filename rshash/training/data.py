"""Training pairs and evaluation features assembled from a feature store and a split."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from rshash.data.splits import Split
from rshash.features.store import FeatureStore


@dataclass
class PairFeatures:
    """Aligned image-caption training pairs (raw encoder features, on the training device)."""

    image: torch.Tensor
    image_aug: torch.Tensor
    text: torch.Tensor
    text_aug: torch.Tensor
    image_index: np.ndarray
    caption_row: np.ndarray

    def __len__(self) -> int:
        return len(self.image_index)

    def with_captions_of(
        self, other_rows: np.ndarray, store: FeatureStore, text_view: str, device: torch.device
    ) -> PairFeatures:
        """The same images paired with the caption rows `other_rows` (for noise injection)."""
        return PairFeatures(
            image=self.image,
            image_aug=self.image_aug,
            text=_rows(store.text["plain"], other_rows, device),
            text_aug=_rows(store.text[text_view], other_rows, device),
            image_index=self.image_index,
            caption_row=np.asarray(other_rows, dtype=np.int64),
        )


def _rows(matrix: np.ndarray, rows: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(matrix[rows])).to(device)


def training_pairs(
    store: FeatureStore,
    split: Split,
    image_view: str,
    text_view: str,
    device: torch.device,
    hold_out_validation: bool = False,
) -> PairFeatures:
    """The pairs of the split's training images (without its validation part if held out)."""
    store.require_text()
    fit = split.fit_images(hold_out_validation)
    images = split.caption_owners(fit, store.caption_offsets)
    captions = split.caption_rows(fit, store.caption_offsets)
    return PairFeatures(
        image=_rows(store.image["plain"], images, device),
        image_aug=_rows(store.image[image_view], images, device),
        text=_rows(store.text["plain"], captions, device),
        text_aug=_rows(store.text[text_view], captions, device),
        image_index=images,
        caption_row=captions,
    )
