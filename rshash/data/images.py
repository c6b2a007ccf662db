"""Reading images (JPEG, PNG, TIFF) and checking that they decode completely."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

from rshash.errors import DataError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".tif", ".tiff"})


def load_rgb(path: Path) -> Image.Image:
    """Decode an image fully into RGB; a missing, unreadable or truncated file raises DataError."""
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"{path}: image file is missing") from None
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"{path}: unreadable or truncated image ({exc})") from None


def image_problem(path: Path) -> str | None:
    """Why `path` cannot be used as an image, or None if it decodes completely."""
    try:
        with Image.open(path) as img:
            img.draft("RGB", (64, 64))  # JPEG: decode at reduced scale, still reads every byte
            img.load()
    except FileNotFoundError:
        return "image file is missing"
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        return f"unreadable or truncated image ({exc})"
    return None


def find_bad_images(paths: Sequence[Path], workers: int = 4) -> list[tuple[int, str]]:
    """(index, reason) for every path that does not decode, in input order."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        problems = list(pool.map(image_problem, paths))
    return [(i, p) for i, p in enumerate(problems) if p is not None]


def image_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as img:
        return img.size
