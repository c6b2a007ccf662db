"""Search hits as a GeoJSON FeatureCollection (RFC 7946) that GIS tools such as QGIS open as is.

Each hit is a Feature: its WGS84 footprint as a Polygon (exterior ring closed, counter-clockwise),
a footprint across the antimeridian as a MultiPolygon of its parts either side of ±180° (RFC 7946
§3.1.9), or a null geometry for an item without one (a plain image, a caption). Properties are flat
scalars, one column each in a GIS attribute table.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from typing import Any

from rshash.data.bbox import crosses_antimeridian, unwrap
from rshash.data.scene_geo import counter_clockwise

Ring = list[list[float]]


def _clip(points: Ring, west: bool) -> Ring:
    """The closed ring cut to the side of the 180° meridian (`west`: lon ≤ 180), closed."""
    inside = (lambda x: x <= 180.0) if west else (lambda x: x >= 180.0)
    out: Ring = []
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        if inside(x0):
            out.append([x0, y0])
        if inside(x0) != inside(x1) and x0 != x1:
            out.append([180.0, y0 + (180.0 - x0) * (y1 - y0) / (x1 - x0)])
    out = [p for p, q in itertools.pairwise([*out, out[0]]) if p != q] if out else []
    return [*out, out[0]] if len(out) >= 3 else []


def _antimeridian_parts(points: Ring) -> list[Ring]:
    """A closed ring across ±180° cut there: its parts, each with longitudes in [-180, 180]."""
    lons = unwrap([x for x, _ in points])
    if min(lons) < -180.0:  # make it straddle +180, then cut at +180
        lons = [x + 360.0 for x in lons]
    line = [[x, y] for x, (_, y) in zip(lons, points, strict=True)]
    west, east = _clip(line, west=True), _clip(line, west=False)
    east = [[x - 360.0, y] for x, y in east]
    return [counter_clockwise(part) for part in (west, east) if part]


def _geometry(ring: Ring | None) -> dict[str, Any] | None:
    if not ring or len(ring) < 3:
        return None
    points = [[float(x), float(y)] for x, y in ring]
    if points[0] != points[-1]:
        points.append(points[0])
    if crosses_antimeridian([x for x, _ in points]):
        parts = _antimeridian_parts(points)
        return {"type": "MultiPolygon", "coordinates": [[part] for part in parts]}
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
        "geometry": _geometry(hit.get("footprint_wgs84")),
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
