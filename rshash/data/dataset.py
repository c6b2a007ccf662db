"""The dataset object every later layer uses, and the loader that picks the right format."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from rshash.data.images import find_bad_images, load_rgb
from rshash.errors import DataError


@dataclass(frozen=True)
class Dataset:
    """Images with zero or more captions each and, when known, a class label each.

    Row i of every field describes the same image; `labels[i]` indexes `class_names`.
    """

    name: str
    source: Path
    image_ids: tuple[str, ...]
    image_paths: tuple[Path, ...]
    captions: tuple[tuple[str, ...], ...]
    labels: np.ndarray | None = None
    class_names: tuple[str, ...] | None = None
    skipped: tuple[tuple[str, str], ...] = field(default=())

    def __len__(self) -> int:
        return len(self.image_ids)

    def load_image(self, i: int) -> Image.Image:
        """Image i as RGB (the image-source protocol the index build consumes)."""
        return load_rgb(self.image_paths[i])

    def image_record(self, i: int) -> dict[str, Any]:
        """The index record of image i: id, path, captions, class (or None), dataset."""
        return {
            "id": self.image_ids[i],
            "path": str(Path(self.image_paths[i]).resolve()),
            "captions": list(self.captions[i]),
            "class": self.class_names[self.labels[i]]
            if self.labels is not None and self.class_names
            else None,
            "dataset": self.name,
        }

    @property
    def has_captions(self) -> bool:
        return any(self.captions)

    @property
    def caption_counts(self) -> np.ndarray:
        return np.array([len(c) for c in self.captions], dtype=np.int64)

    def caption_rows(self) -> tuple[list[str], np.ndarray]:
        """All captions flattened image by image, and the image index of each."""
        texts = [c for caps in self.captions for c in caps]
        owner = np.repeat(np.arange(len(self)), self.caption_counts)
        return texts, owner

    def require_labels(self) -> np.ndarray:
        """Class labels, or a DataError when the dataset has none or only one class."""
        if self.labels is None or self.class_names is None:
            raise DataError(f"{self.source}: dataset has no class labels, but this step needs them")
        if len(np.unique(self.labels)) < 2:
            raise DataError(
                f"{self.source}: dataset has a single class ({self.class_names[0]!r}); "
                "at least two classes are needed"
            )
        return self.labels

    def subset(self, indices: list[int] | np.ndarray) -> Dataset:
        """The images at `indices` (in that order), with their captions and labels."""
        keep = [int(i) for i in indices]
        return Dataset(
            name=self.name,
            source=self.source,
            image_ids=tuple(self.image_ids[i] for i in keep),
            image_paths=tuple(self.image_paths[i] for i in keep),
            captions=tuple(self.captions[i] for i in keep),
            labels=self.labels[keep] if self.labels is not None else None,
            class_names=self.class_names,
            skipped=self.skipped,
        )

    def require_captions(self) -> None:
        if not self.has_captions:
            raise DataError(f"{self.source}: dataset has no captions, but this step needs them")


def labels_from_names(names: list[str]) -> tuple[np.ndarray, tuple[str, ...]]:
    classes = tuple(sorted(set(names)))
    index = {c: i for i, c in enumerate(classes)}
    return np.array([index[n] for n in names], dtype=np.int64), classes


def drop_bad_images(ds: Dataset, skip_bad: bool) -> Dataset:
    """Check every image decodes; raise on the first bad one, or drop them all if `skip_bad`."""
    bad = find_bad_images(ds.image_paths)
    if not bad:
        return ds
    if not skip_bad:
        index, reason = bad[0]
        more = f" (and {len(bad) - 1} more; --skip-bad skips them)" if len(bad) > 1 else ""
        raise DataError(f"{ds.image_paths[index]}: {reason}{more}")
    bad_set = {i for i, _ in bad}
    kept = ds.subset([i for i in range(len(ds)) if i not in bad_set])
    return replace(kept, skipped=tuple((ds.image_ids[i], reason) for i, reason in bad))


def load_dataset(path: str | Path, skip_bad: bool = False, check_images: bool = True) -> Dataset:
    """Load a caption-JSON dataset (file, or folder holding one) or a folder of class folders."""
    from rshash.data.caption_json import find_caption_json, read_caption_json
    from rshash.data.image_folder import read_image_folder

    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    json_path = path if path.is_file() else find_caption_json(path)
    ds = read_caption_json(json_path) if json_path is not None else read_image_folder(path)
    if len(ds) == 0:
        raise DataError(f"{path}: dataset holds no images")
    return drop_bad_images(ds, skip_bad) if check_images else ds
