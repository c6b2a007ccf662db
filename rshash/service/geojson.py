"""Search hits as a GeoJSON FeatureCollection (RFC 7946) that GIS tools such as QGIS open as is.

Each hit is a Feature: its WGS84 footprint as a Polygon (exterior ring closed, counter-clockwise),
or a null geometry for an item without one (a plain image, a caption). Properties are flat
scalars, one column each in a GIS attribute table.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from rshash.data.scene_geo import counter_clockwise


def _polygon(ring: list[list[float]] | None) -> dict[str, Any] | None:
    if not ring or len(ring) < 3:
        return None
    points = [[float(x), float(y)] for x, y in ring]
    if points[0] != points[-1]:
        points.append(points[0])
    return {"type": "Polygon", "coordinates": [counter_clockwise(points)]}


def _caption(hit: Mapping[str, Any]) -> str | None:
    captions = hit.get("captions") or []
    return hit.get("text") or (captions[0] if captions else None)


def hit_feature(hit: Mapping[str, Any], rank: int) -> dict[str, Any]:
    """One hit (a record with its "distance") as a GeoJSON Feature."""
    window = hit.get("window") or {}
    props = {
        "rank": rank,
        "id": hit["id"],
        "distance": hit.get("distance"),
        "scene": hit.get("scene"),
        "path": hit.get("path"),
        "caption": _caption(hit),
        "class": hit.get("class"),
        "acquired": hit.get("acquired"),
        "resolution_m": hit.get("resolution_m"),
        "crs": hit.get("crs"),
        **{f"window_{k}": window.get(k) for k in ("row", "col", "width", "height")},
        "thumbnail": hit.get("thumbnail"),
    }
    feature: dict[str, Any] = {
        "type": "Feature",
        "id": hit["id"],
        "geometry": _polygon(hit.get("footprint_wgs84")),
        "properties": {k: v for k, v in props.items() if v is not None},
    }
    if hit.get("bounds_wgs84"):
        feature["bbox"] = [float(b) for b in hit["bounds_wgs84"]]
    return feature


def feature_collection(hits: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Hits, best first, as a FeatureCollection; `rank` keeps their order in GIS tables."""
    return {
        "type": "FeatureCollection",
        "features": [hit_feature(h, rank) for rank, h in enumerate(hits, 1)],
    }
