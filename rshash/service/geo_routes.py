"""Routes for georeferenced items: scene overviews placed on the web map, and the page's Leaflet
(from the npm registry at setup, in ./node_modules; RSHASH_NODE_MODULES overrides the folder)."""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Callable, Mapping
from importlib.resources import files
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse, Response

from rshash.data.scene_pixels import read_tile, render_overview
from rshash.fileio import atomic_path, write_json_atomic
from rshash.service.geojson import feature_collection

OVERVIEW_SIZE = 1024


def leaflet_dir() -> Path | None:
    """Leaflet's dist folder installed by `make setup` (npm ci), or None when it is missing."""
    env = os.environ.get("RSHASH_NODE_MODULES")
    base = Path(env) if env else Path(__file__).resolve().parents[2] / "node_modules"
    dist = base / "leaflet" / "dist"
    return dist.resolve() if dist.is_dir() else None


def render(answer: dict[str, Any], output: str) -> dict[str, Any]:
    """The JSON answer, or its results as a GeoJSON FeatureCollection."""
    return feature_collection(answer["results"]) if output == "geojson" else answer


def tile_png(item: Mapping[str, Any]) -> Response:
    """A scene tile's pixels as PNG (its window cut from the scene)."""
    buf = io.BytesIO()
    read_tile(item).save(buf, format="PNG")
    return Response(buf.getvalue(), media_type="image/png")


def _overview(item: Mapping[str, Any], cache: Path) -> tuple[Path, dict[str, Any]]:
    """Cached overview PNG of the item's scene and its description, rendered on first use."""
    path = Path(item["path"])
    stat = path.stat()
    key = json.dumps([str(path), stat.st_mtime_ns, item["bands"], item.get("stretch")])
    stem = cache / f"overview-{hashlib.sha1(key.encode()).hexdigest()}"
    png, info_file = stem.with_suffix(".png"), stem.with_suffix(".json")
    if not info_file.exists():
        image, bounds = render_overview(path, item["bands"], item.get("stretch"), OVERVIEW_SIZE)
        with atomic_path(png) as tmp:
            image.save(tmp, format="PNG")
        write_json_atomic(info_file, {"scene": item.get("scene"), "bounds_wgs84": bounds})
    return png, json.loads(info_file.read_text())


def geo_router(item_of: Callable[[str], dict[str, Any]], cache: Path) -> APIRouter:
    """Scene overviews by any of the scene's tile ids, and Leaflet's files."""
    router = APIRouter()

    def tile(item_id: str) -> dict[str, Any]:
        item = item_of(item_id)
        if "window" not in item:
            raise HTTPException(404, f"{item_id!r} is not a scene tile")
        return item

    @router.get("/scenes/overview")
    def scene_overview(item: str) -> dict[str, Any]:
        """The scene of tile `item`: name, WGS84 bounds and the URL of its overview image."""
        _, info = _overview(tile(item), cache)
        return {**info, "image": f"/scenes/overview.png?item={quote(item)}"}

    @router.get("/scenes/overview.png", response_class=FileResponse)
    def scene_overview_png(item: str) -> FileResponse:
        png, _ = _overview(tile(item), cache)
        return FileResponse(png, media_type="image/png")

    @router.get("/static/map.js", include_in_schema=False)
    def map_script() -> Response:
        script = files("rshash.service").joinpath("static/map.js").read_text(encoding="utf-8")
        return Response(script, media_type="text/javascript")

    @router.get("/static/vendor/leaflet/{name:path}", include_in_schema=False)
    def leaflet(name: str) -> FileResponse:
        dist = leaflet_dir()
        target = (dist / name).resolve() if dist else None
        if (
            dist is None
            or target is None
            or not target.is_relative_to(dist)
            or not target.is_file()
        ):
            raise HTTPException(404, f"leaflet/{name}: not installed (run `make setup`)")
        return FileResponse(target)

    return router
