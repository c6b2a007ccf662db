"""JPEG thumbnails of indexed images, made once and cached beside the index."""

from __future__ import annotations

import hashlib
from pathlib import Path

from rshash.data.images import load_rgb
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
