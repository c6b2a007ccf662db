"""Which files the service may read for an item: only under the roots the index was built from.

An item's `path` is written by `rshash index build/add` (user `--fields` cannot set it), and the
service reads pixels from it for `/items/{id}/image`, thumbnails and scene overviews. As a second
line of defence, the path is resolved (symbolic links followed) and must still lie under the
root of one of the archives the index records in its manifest's `sources`; anything else is
answered 404 without being opened.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from fastapi import HTTPException


def source_roots(sources: Iterable[dict[str, Any]]) -> list[Path]:
    """The resolved folders of a manifest's sources: `root` where recorded, else the folder of
    `path` (a dataset JSON's or a single scene's folder, or the folder itself)."""
    roots = []
    for source in sources:
        where = source.get("root") or source.get("path")
        if not where:
            continue
        p = Path(where).resolve()
        roots.append(p if p.is_dir() or "root" in source else p.parent)
    return roots


class ServedFiles:
    """Checks item paths against the source roots of the index's current manifests (read per
    call, so a live `index add` of a new archive is picked up)."""

    def __init__(self, sources: Callable[[], Iterable[dict[str, Any]]]) -> None:
        self._sources = sources

    def checked(self, item: dict[str, Any]) -> dict[str, Any]:
        """`item` with its `path` resolved, or 404 if it is not a file under a source root."""
        raw = item.get("path")
        target = Path(str(raw)).resolve() if raw else None
        roots = source_roots(self._sources())
        if (
            target is None
            or not any(target.is_relative_to(root) for root in roots)
            or not target.is_file()
        ):
            raise HTTPException(404, f"item {item.get('id')!r}: its image file is not available")
        return {**item, "path": str(target)}
