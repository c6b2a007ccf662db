"""The image-source protocol the index build consumes: datasets of files and scene tiles alike."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from PIL import Image


class ImageSource(Protocol):
    """Images to encode, with their ids, captions (may be empty) and records.

    A source whose pixels depend on more than its image ids (scene tiles: bands, stride, the
    scene files) also has a `build_key` string, so a resumed build never reuses stale codes.
    """

    @property
    def name(self) -> str: ...

    @property
    def source(self) -> Path: ...

    @property
    def image_ids(self) -> Sequence[str]: ...

    @property
    def captions(self) -> Sequence[Sequence[str]]: ...

    def __len__(self) -> int: ...

    def load_image(self, i: int) -> Image.Image:
        """Image i, decoded to RGB."""
        ...

    def image_record(self, i: int) -> dict[str, Any]:
        """Image i's record: id, path, dataset, class, captions and source-specific fields."""
        ...
