"""Where a scene's pixels are: tile footprints in the scene CRS and in WGS84, ground resolution,
acquisition date. Pure functions of a scene's transform, CRS and tags."""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Mapping, Sequence

import numpy as np
from affine import Affine
from rasterio.crs import CRS
from rasterio.warp import transform as warp_transform

from rshash.data.bbox import unwrap

Ring = list[list[float]]
WGS84 = "EPSG:4326"
DATE_TAGS = ("TIFFTAG_DATETIME", "ACQUISITIONDATETIME", "ACQUISITION_DATE", "DATE_ACQUIRED")
_DATE = re.compile(r"^\s*(\d{4})[:\-](\d{2})[:\-](\d{2})")


def signed_area(ring: Sequence[Sequence[float]]) -> float:
    """Shoelace area of a closed ring: positive when counter-clockwise (x east, y north)."""
    return 0.5 * sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in itertools.pairwise(ring))


def counter_clockwise(ring: Ring) -> Ring:
    """The closed ring, reversed if needed so its exterior runs counter-clockwise (RFC 7946)."""
    return ring if signed_area(ring) >= 0 else ring[::-1]


def corner_coords(
    transform: Affine, rows: np.ndarray, cols: np.ndarray, height: int, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """Map x, y (n, 4) of the four corners of windows at (rows, cols): all four, so rotated and
    sheared transforms give true quadrilaterals. Order: upper-left, lower-left, lower-right,
    upper-right, which runs counter-clockwise on a north-up grid."""
    pc = np.stack([cols, cols, cols + width, cols + width], axis=1).astype(np.float64)
    pr = np.stack([rows, rows + height, rows + height, rows], axis=1).astype(np.float64)
    a, b, c, d, e, f = transform.a, transform.b, transform.c, transform.d, transform.e, transform.f
    return a * pc + b * pr + c, d * pc + e * pr + f


def to_wgs84(crs: CRS, xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Longitudes and latitudes of points given in `crs` (same shapes as `xs`, `ys`)."""
    lon, lat = warp_transform(crs, WGS84, xs.ravel().tolist(), ys.ravel().tolist())
    return np.asarray(lon).reshape(xs.shape), np.asarray(lat).reshape(ys.shape)


def ring(xs: Sequence[float], ys: Sequence[float], digits: int, lonlat: bool = False) -> Ring:
    """A closed, counter-clockwise ring from corner coordinates. `lonlat`: longitudes, which stay
    in [-180, 180]; a ring across the antimeridian is oriented on its unwrapped longitudes."""
    pts = [[round(float(x), digits), round(float(y), digits)] for x, y in zip(xs, ys, strict=True)]
    closed = [*pts, pts[0]]
    lons = unwrap([p[0] for p in closed]) if lonlat else [p[0] for p in closed]
    ccw = signed_area([[x, p[1]] for x, p in zip(lons, closed, strict=True)]) >= 0
    return closed if ccw else closed[::-1]


def resolution_m(crs: CRS, transform: Affine, lon: float, lat: float) -> float:
    """Ground size of a pixel in metres (geometric mean of its two sides).

    Projected CRSs: from the transform, in the CRS's linear unit converted to metres; geographic
    CRSs: degrees converted at the scene's centre latitude.
    """
    sx = math.hypot(transform.a, transform.d)
    sy = math.hypot(transform.b, transform.e)
    if crs.is_geographic:
        metres_per_degree = 111_320.0
        sx *= metres_per_degree * math.cos(math.radians(lat))
        sy *= metres_per_degree
    else:
        factor = crs.linear_units_factor[1]
        sx, sy = sx * factor, sy * factor
    return round(math.sqrt(sx * sy), 6)


def acquired_date(tags: Mapping[str, str]) -> str | None:
    """ISO date (YYYY-MM-DD) from the first date tag a scene has (TIFF 'YYYY:MM:DD hh:mm:ss',
    or ISO), or None."""
    for name in DATE_TAGS:
        match = _DATE.match(tags.get(name, ""))
        if match:
            return "-".join(match.groups())
    return None
