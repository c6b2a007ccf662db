"""Real GeoTIFF scenes built from real UCM images, with a known layout, for tests and benchmarks.

A mosaic is a grid of 256 x 256 UCM images (cell (r, c) holds one image; `Mosaic` says which),
framed by a nodata margin, written with rasterio in a UTM CRS at 0.3 m (UCM's own resolution),
with an acquisition date in TIFFTAG_DATETIME. Variants: 16-bit 4-band (B, G, R, NIR), cloud
optimised (COG, with overviews). Bad inputs: no georeferencing, a rotated transform, another CRS,
a scene smaller than a tile, a truncated file, a file that is not a TIFF at all.
"""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image
from pyproj import Transformer

from tests.conftest import UCM

CELL = 256
CRS = "EPSG:32611"  # UTM zone 11N (Los Angeles, where UCM was photographed)
ORIGIN = (499_000.0, 3_760_000.0)  # upper-left corner of the mosaic's margin, near -117°, 34°N
RESOLUTION = 0.3
ACQUIRED_TAG = "2010:06:15 10:30:00"
ACQUIRED = "2010-06-15"


@cache
def ucm_classes() -> tuple[str, ...]:
    """Class names by class code; image N.jpg has class code (N - 1) // 100."""
    classes = json.loads((UCM / "dataset.json").read_text())["classes"]
    return tuple(classes[str(i)] for i in range(len(classes)))


@cache
def _square_images(code: int) -> tuple[int, ...]:
    """Numbers of the class's images that are exactly 256 x 256 (a few UCM images are not)."""
    numbers = range(code * 100 + 1, code * 100 + 101)
    return tuple(n for n in numbers if Image.open(UCM / "images" / f"{n}.jpg").size == (CELL, CELL))


@dataclass(frozen=True)
class Mosaic:
    """A grid of UCM images: cell i (row-major) holds image `cells[i]`, after a nodata margin."""

    grid: int
    cells: tuple[int, ...]
    margin: int = CELL

    @property
    def size(self) -> int:
        return self.grid * CELL + 2 * self.margin

    def image(self, r: int, c: int) -> int:
        return self.cells[r * self.grid + c]

    def class_of(self, r: int, c: int) -> str:
        return ucm_classes()[(self.image(r, c) - 1) // 100]

    def offset(self, r: int, c: int) -> tuple[int, int]:
        """Pixel (row, col) of the cell's upper-left corner in the scene."""
        return self.margin + r * CELL, self.margin + c * CELL

    def tile_id(self, stem: str, r: int, c: int) -> str:
        row, col = self.offset(r, c)
        return f"{stem}/r{row}_c{col}"

    def cells_of(self, class_name: str) -> list[tuple[int, int]]:
        return [
            (r, c)
            for r in range(self.grid)
            for c in range(self.grid)
            if self.class_of(r, c) == class_name
        ]

    def cell_bounds(
        self, r: int, c: int, origin: tuple[float, float] = ORIGIN
    ) -> tuple[float, float, float, float]:
        """(minx, miny, maxx, maxy) of the cell in the scene CRS."""
        row, col = self.offset(r, c)
        x0, y0 = origin[0] + col * RESOLUTION, origin[1] - row * RESOLUTION
        return x0, y0 - CELL * RESOLUTION, x0 + CELL * RESOLUTION, y0


def mosaic_layout(grid: int = 10, shift: int = 0) -> Mosaic:
    """Cell i holds a square image of class i mod 21: every class, spread over the grid."""
    n = len(ucm_classes())
    cells = []
    for i in range(grid * grid):
        square = _square_images(i % n)
        cells.append(square[(i // n + shift) % len(square)])
    return Mosaic(grid, tuple(cells))


def _cell_pixels(number: int) -> np.ndarray:
    """(3, 256, 256) uint8 pixels of UCM image `number`, decoded as rshash decodes it."""
    with Image.open(UCM / "images" / f"{number}.jpg") as img:
        return np.asarray(img.convert("RGB")).transpose(2, 0, 1)


def _cells(layout: Mosaic) -> Iterator[tuple[int, int, np.ndarray]]:
    for r in range(layout.grid):
        for c in range(layout.grid):
            yield r, c, _cell_pixels(layout.image(r, c))


def write_mosaic(
    path: Path,
    layout: Mosaic,
    *,
    crs: str | None = CRS,
    origin: tuple[float, float] = ORIGIN,
    sixteen_bit: bool = False,
    rotation: float = 0.0,
    acquired: str | None = ACQUIRED_TAG,
    overviews: bool = False,
) -> Path:
    """Write the mosaic as a tiled, deflated GeoTIFF, one cell at a time (flat memory).

    `sixteen_bit`: 4 bands B, G, R, NIR as uint16 (value 500 + 40 * v, nodata 0), so `--bands
    3,2,1` gives back red, green, blue. `crs=None` writes a TIFF without georeferencing.
    `rotation` (degrees) gives a rotated transform; `overviews` adds internal overviews.
    """
    import rasterio
    from rasterio.enums import Resampling
    from rasterio.transform import Affine

    transform = (
        Affine.translation(*origin)
        @ Affine.rotation(rotation)
        @ Affine.scale(RESOLUTION, -RESOLUTION)
    )
    profile = {
        "driver": "GTiff",
        "width": layout.size,
        "height": layout.size,
        "count": 4 if sixteen_bit else 3,
        "dtype": "uint16" if sixteen_bit else "uint8",
        "nodata": 0,
        "tiled": True,
        "blockxsize": CELL,
        "blockysize": CELL,
        "compress": "deflate",
        "interleave": "pixel",
    }
    if crs is not None:
        profile.update(crs=crs, transform=transform)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NotGeoreferencedWarning for the crs=None variant
        with rasterio.open(path, "w", **profile) as dst:
            for r, c, px in _cells(layout):
                row, col = layout.offset(r, c)
                if sixteen_bit:
                    # never 0 inside the image, so only the margin is nodata
                    data = 500 + 40 * px[[2, 1, 0, 1]].astype(np.uint16)
                else:
                    data = np.maximum(px, 1)  # 0 is nodata
                dst.write(data, window=((row, row + CELL), (col, col + CELL)))
            if acquired:
                dst.update_tags(TIFFTAG_DATETIME=acquired)
            if overviews:
                dst.build_overviews([2, 4, 8, 16], Resampling.average)
    return path


def write_cog(path: Path, layout: Mosaic, **kwargs: object) -> Path:
    """The mosaic as a cloud-optimised GeoTIFF (GDAL's COG driver: 512-px blocks, overviews)."""
    import rasterio.shutil

    plain = path.with_name(path.stem + ".plain.tif")
    write_mosaic(plain, layout, **kwargs)  # type: ignore[arg-type]
    rasterio.shutil.copy(
        plain, path, driver="COG", compress="deflate", overview_resampling="average"
    )
    plain.unlink()
    return path


def write_small(path: Path, size: int = 200) -> Path:
    """A georeferenced scene smaller than one 256-px tile."""
    import rasterio
    from rasterio.transform import from_origin

    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=size,
        height=size,
        count=3,
        dtype="uint8",
        crs=CRS,
        transform=from_origin(*ORIGIN, RESOLUTION, RESOLUTION),
    ) as dst:
        dst.write(_cell_pixels(1)[:, :size, :size])
    return path


def write_truncated(path: Path, source: Path) -> Path:
    """A copy of `source` cut off at 60% of its bytes, as an interrupted download leaves it.

    A COG (header first) keeps a readable header; a plain GeoTIFF from GDAL loses its header,
    which GDAL writes last."""
    data = source.read_bytes()
    path.write_bytes(data[: int(len(data) * 0.6)])
    return path


def write_corrupt(path: Path, source: Path) -> Path:
    """A copy of the COG `source` with garbage inside one full-resolution block: its header,
    block table and overviews are intact, so only reading that block fails."""
    import rasterio

    with rasterio.open(source) as src:
        offset = int(src.get_tag_item("BLOCK_OFFSET_2_2", "TIFF", bidx=1))
    data = bytearray(source.read_bytes())
    data[offset : offset + 400] = bytes(range(200)) * 2
    path.write_bytes(bytes(data))
    return path


def write_not_a_tiff(path: Path) -> Path:
    path.write_bytes(b"II*\x00" + b"\x17" * 1000)  # a TIFF signature, then garbage
    return path


def scene_folder(root: Path, name: str, *files: Path) -> Path:
    """A folder `root/name` holding copies of `files` (one scene folder per test case)."""
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copy(f, folder / f.name)
    return folder


# A second scene in another CRS (UTM 32N, Munich) for archives mixing CRSs.
MUNICH = {"crs": "EPSG:32632", "origin": (691_000.0, 5_336_000.0)}
# A scene across the antimeridian (Fiji, PDC Mercator): with a one-cell margin, 180° runs through
# the middle of cell column 1 (x = 3_339_584.72 m); columns 0 lie west of it, 2 and 3 east.
FIJI = {
    "crs": "EPSG:3832",
    "origin": (3_339_584.72 - (CELL + 1.5 * CELL) * RESOLUTION, -1_885_000.0),
}


QUARTER = CELL * RESOLUTION / 4


def box_around(
    cells: list[tuple[int, int]],
    layout: Mosaic | None = None,
    crs: str = CRS,
    origin: tuple[float, float] | None = None,
) -> tuple[float, float, float, float]:
    """WGS84 (minlon, minlat, maxlon, maxlat) of the cells' extent shrunk by a quarter cell, so
    only their tiles meet it (neighbours stay a quarter cell away)."""
    layout = layout or mosaic_layout()
    kwargs = {"origin": origin} if origin else {}
    bounds = [layout.cell_bounds(r, c, **kwargs) for r, c in cells]
    minx, miny = min(b[0] for b in bounds) + QUARTER, min(b[1] for b in bounds) + QUARTER
    maxx, maxy = max(b[2] for b in bounds) - QUARTER, max(b[3] for b in bounds) - QUARTER
    lon, lat = Transformer.from_crs(crs, "EPSG:4326", always_xy=True).transform(
        [minx, minx, maxx, maxx], [miny, maxy, miny, maxy]
    )
    return (min(lon), min(lat), max(lon), max(lat))


CORNER = [(r, c) for r in range(3) for c in range(3)]
CORNER_IDS = {Mosaic(10, ()).tile_id("mosaic", r, c) for r, c in CORNER}  # its upper-left 3 x 3
