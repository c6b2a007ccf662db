"""JPEG thumbnails of indexed images, made once and cached beside the index."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rshash.data.images import load_rgb
from rshash.data.scene_pixels import read_tile
from rshash.fileio import atomic_path


def thumbnail(source: Path, cache: Path, size: int = 256) -> Path:
    """Path of a cached JPEG (longest side `size`) of `source`, creating it on first use."""
    key = hashlib.sha1(f"{source.resolve()}:{size}".encode()).hexdigest()
    target = cache / f"{key}.jpg"
    if not target.exists():
        img = load_rgb(source)
        img.thumbnail((size, size))
        with atomic_path(target) as tmp:
            img.save(tmp, format="JPEG", quality=85)
    return target


def thumbnail_of(item: Mapping[str, Any], cache: Path, size: int = 256) -> Path:
    """Thumbnail of an item: its image file, or for a scene tile its window cut from the scene."""
    if "window" not in item:
        return thumbnail(Path(item["path"]), cache, size)
    cut = json.dumps([item["path"], item["window"], item["bands"], item.get("stretch"), size])
    target = cache / f"{hashlib.sha1(cut.encode()).hexdigest()}.jpg"
    if not target.exists():
        img = read_tile(item)
        img.thumbnail((size, size))
        with atomic_path(target) as tmp:
            img.save(tmp, format="JPEG", quality=85)
    return target
