"""The caption-JSON layout of UCM-Captions, RSICD, Sydney-Captions and RSITMD."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from rshash.data.dataset import Dataset, labels_from_names
from rshash.errors import DataError

_IMAGES_LIST = re.compile(r'"images"\s*:\s*\[')
_IMAGE_DIR_NAMES = ("images", "imgs", "RSICD_images", "RSITMD_images")


def find_caption_json(folder: Path) -> Path | None:
    """The caption JSON inside `folder` (a *.json with an `images` list), if there is one.

    Files named dataset*.json are tried first, so a manifest beside them is never taken.
    """
    candidates = sorted(folder.glob("*.json"), key=lambda c: (not c.name.startswith("dataset"), c))
    for candidate in candidates:
        try:
            with candidate.open(encoding="utf-8") as fh:
                head = fh.read(4096)
        except OSError:
            continue
        if _IMAGES_LIST.search(head) or candidate.name.startswith("dataset"):
            return candidate
    return None


def _image_dir(json_path: Path, first_filename: str) -> Path:
    folder = json_path.parent
    for name in _IMAGE_DIR_NAMES:
        if (folder / name / first_filename).exists():
            return folder / name
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        if (sub / first_filename).exists():
            return sub
    if (folder / first_filename).exists():
        return folder
    return folder / "images"


def _field(entry: dict[str, Any], key: str, where: str, json_path: Path) -> Any:
    if key not in entry:
        raise DataError(f"{json_path}: {where} has no {key!r} key")
    return entry[key]


def read_caption_json(json_path: Path) -> Dataset:
    """Parse and validate the JSON; image files are checked for existence here, decoding later."""
    try:
        data = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{json_path}: not a readable JSON file ({exc})") from None
    if not isinstance(data, dict):
        raise DataError(f"{json_path}: expected a JSON object with an 'images' list")
    entries = _field(data, "images", "the top level", json_path)
    if not isinstance(entries, list) or not entries:
        raise DataError(f"{json_path}: 'images' must be a non-empty list")

    filenames: list[str] = []
    captions: list[tuple[str, ...]] = []
    class_names: list[str | None] = []
    seen: dict[str, int] = {}
    for i, entry in enumerate(entries):
        where = f"images[{i}]"
        if not isinstance(entry, dict):
            raise DataError(f"{json_path}: {where} must be an object")
        filename = _field(entry, "filename", where, json_path)
        if not isinstance(filename, str) or not filename:
            raise DataError(f"{json_path}: {where}.filename must be a non-empty string")
        if filename in seen:
            raise DataError(
                f"{json_path}: duplicate filename {filename!r} in images[{seen[filename]}] "
                f"and {where}"
            )
        seen[filename] = i
        sentences = _field(entry, "sentences", where, json_path)
        if not isinstance(sentences, list) or not sentences:
            raise DataError(f"{json_path}: {where} ({filename}) has an empty caption list")
        raws = []
        for j, sentence in enumerate(sentences):
            if not isinstance(sentence, dict):
                raise DataError(f"{json_path}: {where}.sentences[{j}] must be an object")
            raw = _field(sentence, "raw", f"{where}.sentences[{j}]", json_path)
            if not isinstance(raw, str) or not raw.strip():
                raise DataError(f"{json_path}: {where}.sentences[{j}].raw must be non-empty text")
            raws.append(raw.strip())
        filenames.append(filename)
        captions.append(tuple(raws))
        name = entry.get("classname", entry.get("classcode"))
        class_names.append(None if name is None else str(name))

    image_dir = _image_dir(json_path, filenames[0])
    paths = tuple(image_dir / f for f in filenames)
    for path in paths:
        if not path.is_file():
            raise DataError(f"{path}: image file listed in {json_path.name} is missing")

    labels = names = None
    if all(n is not None for n in class_names):
        labels, names = labels_from_names([n for n in class_names if n is not None])
    return Dataset(
        name=str(data.get("dataset", json_path.parent.name)),
        source=json_path,
        image_ids=tuple(filenames),
        image_paths=paths,
        captions=tuple(captions),
        labels=labels,
        class_names=names,
    )
