"""WGS84 boxes and longitudes across the antimeridian, without rasterio.

A box is (west, south, east, north) in degrees, as RFC 7946 §5.2 writes it: west > east when it
crosses ±180° longitude (a box from 179.9 to -179.9 is 0.2° wide, not 359.8°). On one unwrapped
line, a box covers [west, east] or, when it crosses, [west, east + 360]; two boxes meet when the
lines meet at some shift of 360°.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from rshash.errors import DataError

BBox = tuple[float, float, float, float]


def check_bbox(values: Sequence[float], field: str = "bbox") -> BBox:
    """(west, south, east, north) in WGS84 degrees, or a one-line error naming `field`;
    west > east crosses the antimeridian."""
    if len(values) != 4:
        raise DataError(f"{field}: expected 4 numbers minlon,minlat,maxlon,maxlat")
    minlon, minlat, maxlon, maxlat = (float(v) for v in values)
    if not (-180 <= minlon <= 180 and -180 <= maxlon <= 180 and -90 <= minlat <= maxlat <= 90):
        raise DataError(
            f"{field}: expected -180 ≤ minlon, maxlon ≤ 180 and -90 ≤ minlat ≤ maxlat ≤ 90 "
            "(minlon > maxlon crosses the antimeridian)"
        )
    return minlon, minlat, maxlon, maxlat


def parse_bbox(text: str, field: str = "bbox") -> BBox:
    """'minlon,minlat,maxlon,maxlat' → a WGS84 box, or a one-line error naming `field`."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise DataError(f"{field}: expected minlon,minlat,maxlon,maxlat, got {text!r}") from None
    return check_bbox(values, field)


def unwrap(lons: Sequence[float]) -> list[float]:
    """Longitudes of a path, each shifted by a multiple of 360° to within 180° of the one before."""
    out = [float(lons[0])]
    for lon in lons[1:]:
        out.append(float(lon) - 360.0 * round((float(lon) - out[-1]) / 360.0))
    return out


def crosses_antimeridian(lons: Sequence[float]) -> bool:
    """Whether a path of longitudes in [-180, 180] jumps across ±180° (a step over 180°)."""
    return any(abs(float(b) - float(a)) > 180 for a, b in itertools.pairwise(lons))


def _wrap(lon: float) -> float:
    """A longitude brought into [-180, 180]."""
    return lon - 360.0 * round(lon / 360.0)


def bounds_of(lons: Sequence[float], lats: Sequence[float], digits: int = 8) -> list[float]:
    """[west, south, east, north] of a footprint's corners (a closed path around it); west > east
    when the footprint crosses the antimeridian (RFC 7946 §5.2)."""
    path = unwrap([*lons, lons[0]]) if crosses_antimeridian([*lons, lons[0]]) else list(lons)
    box = (_wrap(min(path)), min(lats), _wrap(max(path)), max(lats))
    return [round(float(v), digits) for v in box]


def lon_span(west: float, east: float) -> tuple[float, float]:
    """A box's longitudes on the unwrapped line: [west, east], or [west, east + 360] across."""
    return west, east if east >= west else east + 360.0


def query_spans(west: float, east: float) -> list[tuple[float, float]]:
    """The query box's span at the shifts (-360, 0, +360) that can meet a stored span (which
    starts in [-180, 180] and ends before 540): a box meets the query when it meets one of these."""
    lo, hi = lon_span(west, east)
    spans = [(lo + shift, hi + shift) for shift in (-360.0, 0.0, 360.0)]
    return [(a, b) for a, b in spans if b >= -180.0 and a <= 540.0]
