"""JPEG thumbnails of indexed images, made once and cached beside the index."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from PIL import Image

from rshash.data.images import load_rgb
from rshash.data.scene_pixels import read_tile
from rshash.fileio import atomic_path


def _cached(key: str, cache: Path, size: int, load: Callable[[], Image.Image]) -> Path:
    """Path of the cached JPEG (longest side `size`) named by `key`, made from `load()` once."""
    target = cache / f"{hashlib.sha1(key.encode()).hexdigest()}.jpg"
    if not target.exists():
        img = load()
        img.thumbnail((size, size))
        with atomic_path(target) as tmp:
            img.save(tmp, format="JPEG", quality=85)
    return target


def thumbnail(source: Path, cache: Path, size: int = 256) -> Path:
    """Path of a cached JPEG (longest side `size`) of `source`, creating it on first use."""
    return _cached(f"{source.resolve()}:{size}", cache, size, lambda: load_rgb(source))


def thumbnail_of(item: Mapping[str, Any], cache: Path, size: int = 256) -> Path:
    """Thumbnail of an item: its image file, or for a scene tile its window cut from the scene."""
    if "window" not in item:
        return thumbnail(Path(item["path"]), cache, size)
    cut = json.dumps([item["path"], item["window"], item["bands"], item.get("stretch"), size])
    return _cached(cut, cache, size, lambda: read_tile(item))
