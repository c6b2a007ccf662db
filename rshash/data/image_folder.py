"""An image archive laid out as one sub-folder of images per class, with no captions."""

from __future__ import annotations

from pathlib import Path

from rshash.data.dataset import Dataset, labels_from_names
from rshash.data.images import IMAGE_SUFFIXES
from rshash.errors import DataError


def read_image_folder(root: Path) -> Dataset:
    """Images in `root/<class>/...`; images directly in `root` form an unlabelled archive."""
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    ids: list[str] = []
    paths: list[Path] = []
    names: list[str] = []
    for class_dir in class_dirs:
        for path in sorted(class_dir.rglob("*")):
            if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
                ids.append(path.relative_to(root).as_posix())
                paths.append(path)
                names.append(class_dir.name)
    loose = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if loose and paths:
        raise DataError(
            f"{root}: mixes loose images ({loose[0].name}) with class sub-folders; "
            "expected one or the other"
        )
    if not paths and not loose:
        raise DataError(
            f"{root}: no caption JSON and no images (expected *.jpg/*.png/*.tif in class folders)"
        )
    if loose:
        return Dataset(
            name=root.name,
            source=root,
            image_ids=tuple(p.name for p in loose),
            image_paths=tuple(loose),
            captions=tuple(() for _ in loose),
        )
    labels, classes = labels_from_names(names)
    return Dataset(
        name=root.name,
        source=root,
        image_ids=tuple(ids),
        image_paths=tuple(paths),
        captions=tuple(() for _ in paths),
        labels=labels,
        class_names=classes,
    )
