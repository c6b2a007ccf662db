"""Georeferenced scenes (GeoTIFF and anything else GDAL reads) as an image source of tiles.

`SceneTiles(folder_or_files, TileConfig(tile=256))` cuts every scene into tiles and serves them
through the image-source protocol the index build consumes (`load_image(i)`, `image_record(i)`).
Every scene is scanned before any tile is served, so a bad scene fails the whole call at once
with a one-line error naming the file, and nothing is added. A scan reads only a decimated
view of the scene (its overviews, when it has them), for the nodata mask and, for 16-bit and
float scenes, the per-scene percentile stretch; tiles are then read window by window, so a scene
is never in memory whole.

Policies:
- no georeferencing (no CRS or no transform) and GCP-only georeferencing: refused;
- rotated and sheared transforms: tiles follow the pixel grid; footprints are the four
  transformed corners;
- scenes in different CRSs in one archive: fine, every record has its WGS84 footprint;
- a scene smaller than one tile: refused (use a smaller `--tile`);
- a tile whose valid fraction is below `min_valid` (nodata, mask): skipped;
- a truncated file (image blocks past its end) or one GDAL cannot open: refused.
"""

from __future__ import annotations

import dataclasses
import json
import math
import threading
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from affine import Affine
from PIL import Image
from rasterio.crs import CRS
from tqdm import tqdm

from rshash.data.bbox import bounds_of
from rshash.data.scene_geo import acquired_date, corner_coords, resolution_m, ring, to_wgs84
from rshash.data.scene_pixels import (
    PERCENTILES,
    Stretch,
    decimated_view,
    open_scene,
    percentile_stretch,
    read_window,
    to_rgb,
)
from rshash.errors import DataError

SCENE_SUFFIXES = frozenset({".tif", ".tiff"})
SCAN_SIDE = 1024  # longest side of the decimated view a scan reads
OPEN_PER_THREAD = 8


@dataclass(frozen=True)
class TileConfig:
    """How scenes are cut: tile side and stride (px), 1-based bands, nodata tolerance."""

    tile: int = 256
    stride: int | None = None
    bands: tuple[int, ...] | None = None
    min_valid: float = 0.5
    percentiles: tuple[float, float] = PERCENTILES

    @property
    def step(self) -> int:
        return self.stride or self.tile

    def check(self) -> None:
        if self.tile < 16:
            raise DataError(f"--tile: expected at least 16 px, got {self.tile}")
        if self.step < 1:
            raise DataError(f"--stride: expected a positive number of px, got {self.step}")
        if self.bands is not None and len(self.bands) not in (1, 3):
            raise DataError(f"--bands: expected 1 or 3 band numbers, got {len(self.bands)}")
        if not 0.0 < self.min_valid <= 1.0:
            raise DataError(f"min_valid: expected a fraction in (0, 1], got {self.min_valid}")


def parse_bands(text: str | None) -> tuple[int, ...] | None:
    """'3,2,1' → (3, 2, 1); None stays None (the scene's first three bands, or its only one)."""
    if text is None:
        return None
    try:
        bands = tuple(int(b) for b in text.split(","))
    except ValueError:
        raise DataError(f"--bands: expected band numbers like 3,2,1, got {text!r}") from None
    if any(b < 1 for b in bands):
        raise DataError(f"--bands: band numbers start at 1, got {text!r}")
    return bands


@dataclass(frozen=True)
class Scene:
    """What a scan learned of one scene: its grid, georeferencing, stretch and kept tiles."""

    path: Path
    name: str
    crs: CRS
    transform: Affine
    width: int
    height: int
    bands: tuple[int, ...]
    stretch: Stretch
    nodata: float | None
    resolution_m: float
    acquired: str | None
    rows: np.ndarray
    cols: np.ndarray

    def __len__(self) -> int:
        return len(self.rows)


def tile_starts(size: int, tile: int, step: int) -> list[int]:
    """Window starts along one axis; the last window is aligned to the edge so nothing is lost."""
    starts = list(range(0, size - tile + 1, step))
    if starts[-1] + tile < size:
        starts.append(size - tile)
    return starts


def _check_blocks(src: Any, path: Path) -> None:
    """Refuse a file whose image blocks lie past its end (an interrupted copy or download)."""
    if src.driver != "GTiff":
        return
    size = path.stat().st_size
    bands = [1] if src.interleaving == rasterio.enums.Interleaving.pixel else list(src.indexes)
    bh, bw = src.block_shapes[0]
    for b in bands:
        for y in range(math.ceil(src.height / bh)):
            for x in range(math.ceil(src.width / bw)):
                offset = src.get_tag_item(f"BLOCK_OFFSET_{x}_{y}", "TIFF", bidx=b)
                length = src.get_tag_item(f"BLOCK_SIZE_{x}_{y}", "TIFF", bidx=b)
                if offset and length and int(offset) + int(length) > size:
                    raise DataError(
                        f"{path}: truncated file (image data runs to byte "
                        f"{int(offset) + int(length)}, the file has {size})"
                    )


def _check_georeferencing(src: Any, path: Path) -> None:
    if src.crs is None or src.transform.is_identity:
        if src.gcps[0]:
            raise DataError(
                f"{path}: georeferenced by ground control points only; expected a map grid "
                "(warp it first, e.g. gdalwarp)"
            )
        raise DataError(f"{path}: no georeferencing (CRS and transform); expected a GeoTIFF")


def _valid_fractions(
    valid: np.ndarray, height: int, width: int, rows: np.ndarray, cols: np.ndarray, tile: int
) -> np.ndarray:
    """Fraction of valid cells of a decimated mask under each full-resolution window."""
    sy, sx = valid.shape[0] / height, valid.shape[1] / width
    integral = np.zeros((valid.shape[0] + 1, valid.shape[1] + 1), np.int64)
    integral[1:, 1:] = valid.cumsum(0).cumsum(1)
    r0 = np.floor(rows * sy).astype(np.int64)
    c0 = np.floor(cols * sx).astype(np.int64)
    r1 = np.maximum(r0 + 1, np.ceil((rows + tile) * sy).astype(np.int64)).clip(max=valid.shape[0])
    c1 = np.maximum(c0 + 1, np.ceil((cols + tile) * sx).astype(np.int64)).clip(max=valid.shape[1])
    count = integral[r1, c1] - integral[r0, c1] - integral[r1, c0] + integral[r0, c0]
    return count / ((r1 - r0) * (c1 - c0))


def scan_factor(width: int, height: int, tile: int) -> int:
    """Power-of-two decimation for a scan: the view at most SCAN_SIDE px on a side, and at
    least 8 samples along a tile's side."""
    factor = 1
    while max(width, height) / factor > SCAN_SIDE and factor * 2 <= max(1, tile // 8):
        factor *= 2
    return factor


def scan_scene(path: Path, cfg: TileConfig) -> Scene:
    """Validate one scene and decide its tiles, reading only a decimated view of it."""
    with open_scene(path) as src:
        _check_georeferencing(src, path)
        if src.width < cfg.tile or src.height < cfg.tile:
            raise DataError(
                f"{path}: {src.width} x {src.height} px is smaller than one {cfg.tile}-px tile; "
                "use a smaller --tile or leave the scene out"
            )
        bands = cfg.bands or ((1, 2, 3) if src.count >= 3 else (1,))
        if max(bands) > src.count:
            raise DataError(f"{path}: --bands asks for band {max(bands)}, scene has {src.count}")
        _check_blocks(src, path)
        eight_bit = all(src.dtypes[b - 1] == "uint8" for b in bands)
        all_valid = all(
            rasterio.enums.MaskFlags.all_valid in src.mask_flag_enums[b - 1] for b in bands
        )
        rows_1d = tile_starts(src.height, cfg.tile, cfg.step)
        cols_1d = tile_starts(src.width, cfg.tile, cfg.step)
        rows, cols = (g.ravel() for g in np.meshgrid(rows_1d, cols_1d, indexing="ij"))
        stretch: Stretch = None
        if not (eight_bit and all_valid):
            factor = scan_factor(src.width, src.height, cfg.tile)
            try:
                sample, valid = decimated_view(src, bands, factor)
            except rasterio.errors.RasterioError as exc:
                raise DataError(f"{path}: unreadable image data ({exc})") from None
            keep = _valid_fractions(valid, src.height, src.width, rows, cols, cfg.tile)
            rows, cols = rows[keep >= cfg.min_valid], cols[keep >= cfg.min_valid]
            if not eight_bit:
                stretch = percentile_stretch(sample, valid, cfg.percentiles)
        # block by block (all tiles of one block row and column, then the next), so GDAL's block
        # cache only ever needs the blocks under a few tiles, whatever the scene's size
        bh, bw = src.block_shapes[0]
        order = np.lexsort((cols, rows, cols // bw, rows // bh))
        rows, cols = rows[order], cols[order]
        if len(rows) == 0:
            raise DataError(
                f"{path}: no {cfg.tile}-px tile is at least {cfg.min_valid:.0%} valid pixels"
            )
        cx, cy = src.transform @ (src.width / 2, src.height / 2)
        lon, lat = to_wgs84(src.crs, np.array([cx]), np.array([cy]))
        return Scene(
            path=path.resolve(),
            name=path.stem,
            crs=src.crs,
            transform=src.transform,
            width=src.width,
            height=src.height,
            bands=tuple(bands),
            stretch=stretch,
            nodata=src.nodata,
            resolution_m=resolution_m(src.crs, src.transform, float(lon[0]), float(lat[0])),
            acquired=acquired_date(src.tags()),
            rows=rows.astype(np.int64),
            cols=cols.astype(np.int64),
        )


def find_scenes(source: str | Path | Sequence[str | Path]) -> list[Path]:
    """Scene files: a folder's *.tif / *.tiff (not recursive), one file, or a list of files."""
    if isinstance(source, str):
        source = Path(source)
    if not isinstance(source, Path):
        paths = [Path(p) for p in source]
    elif source.is_dir():
        paths = sorted(
            p for p in source.iterdir() if p.is_file() and p.suffix.lower() in SCENE_SUFFIXES
        )
        if not paths:
            raise DataError(f"{source}: no scenes (expected *.tif or *.tiff files)")
    elif source.is_file():
        paths = [source]
    else:
        raise DataError(f"{source}: no such file or folder")
    missing = next((p for p in paths if not p.is_file()), None)
    if missing is not None:
        raise DataError(f"{missing}: no such scene file")
    stems: dict[str, Path] = {}
    for p in paths:
        if p.stem in stems:
            raise DataError(f"{p}: same name as {stems[p.stem]}; tile ids need unique scene names")
        stems[p.stem] = p
    return paths


class _OpenScenes(threading.local):
    """Each thread's open datasets (GDAL handles are not shared across threads), a few at once."""

    def __init__(self) -> None:
        self.datasets: OrderedDict[Path, Any] = OrderedDict()

    def get(self, path: Path) -> Any:
        src = self.datasets.pop(path, None)
        if src is None:
            src = open_scene(path)
            if len(self.datasets) >= OPEN_PER_THREAD:
                self.datasets.popitem(last=False)[1].close()
        self.datasets[path] = src
        return src


class SceneTiles:
    """Tiles of georeferenced scenes as an image source (`name`, `source`, `image_ids`,
    `captions`, `load_image(i)`, `image_record(i)`), ready for `build_index`/`add_to_index`."""

    def __init__(
        self,
        source: str | Path | Sequence[str | Path],
        cfg: TileConfig | None = None,
        name: str | None = None,
        progress: bool = False,
    ) -> None:
        self.cfg = cfg or TileConfig()
        self.cfg.check()
        paths = find_scenes(source)
        self.source = Path(source) if isinstance(source, str | Path) else paths[0].parent
        self.name = name or self.source.stem
        # the bar shows only when scanning takes a while, and is closed before any error
        bar = tqdm(paths, desc="scan scenes", unit="scene", disable=not progress, delay=2.0)
        with warnings.catch_warnings(), bar:
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            self._set_scenes([scan_scene(p, self.cfg) for p in bar])

    def _set_scenes(self, scenes: list[Scene]) -> None:
        """Take the scanned scenes: tile ids `SCENE/rROW_cCOL`, in scene order."""
        self.scenes = scenes
        self._ends = np.cumsum([len(s) for s in self.scenes])
        self.image_ids = tuple(
            f"{s.name}/r{r}_c{c}" for s in self.scenes for r, c in zip(s.rows, s.cols, strict=True)
        )
        self.captions: tuple[tuple[str, ...], ...] = tuple(() for _ in self.image_ids)
        self._open = _OpenScenes()
        self._footprints: dict[int, tuple[np.ndarray, ...]] = {}

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getstate__(self) -> dict[str, Any]:
        """Picklable (Ray ships the tiles to its workers), without open datasets or caches."""
        return {**self.__dict__, "_open": None, "_footprints": {}}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._open = _OpenScenes()

    @property
    def build_key(self) -> str:
        """What a tile's pixels depend on beyond its id (the build's resume key takes it in): the
        tile config and each scene file's path, size and modification time."""
        stats = [(s.path, s.path.stat()) for s in self.scenes]
        files = [(str(path), st.st_size, st.st_mtime_ns) for path, st in stats]
        return json.dumps([dataclasses.asdict(self.cfg), files])

    def _locate(self, i: int) -> tuple[int, int]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        s = int(np.searchsorted(self._ends, i, side="right"))
        return s, i - (int(self._ends[s - 1]) if s else 0)

    def load_image(self, i: int) -> Image.Image:
        """Tile i as an RGB image, read from its scene's window."""
        s, j = self._locate(i)
        scene, size = self.scenes[s], self.cfg.tile
        src = self._open.get(scene.path)
        data = read_window(src, scene.bands, int(scene.rows[j]), int(scene.cols[j]), size, size)
        return to_rgb(data, scene.stretch, scene.nodata)

    def _corners(self, s: int) -> tuple[np.ndarray, ...]:
        """Scene-CRS and WGS84 corners of every kept tile of scene s, in one transform call."""
        if s not in self._footprints:
            scene, size = self.scenes[s], self.cfg.tile
            xs, ys = corner_coords(scene.transform, scene.rows, scene.cols, size, size)
            self._footprints[s] = (xs, ys, *to_wgs84(scene.crs, xs, ys))
        return self._footprints[s]

    def image_record(self, i: int) -> dict[str, Any]:
        """Tile i's record: scene, window, footprints (scene CRS, WGS84), resolution, date."""
        s, j = self._locate(i)
        scene, size = self.scenes[s], self.cfg.tile
        xs, ys, lon, lat = (a[j] for a in self._corners(s))
        digits = 9 if scene.crs.is_geographic else 3
        return {
            "id": self.image_ids[i],
            "path": str(scene.path),
            "dataset": self.name,
            "class": None,
            "captions": [],
            "scene": scene.name,
            "window": {
                "row": int(scene.rows[j]),
                "col": int(scene.cols[j]),
                "width": size,
                "height": size,
            },
            "crs": scene.crs.to_string(),
            "footprint": ring(xs, ys, digits),
            "footprint_wgs84": ring(lon, lat, 8, lonlat=True),
            "bounds_wgs84": bounds_of(lon.tolist(), lat.tolist()),
            "resolution_m": scene.resolution_m,
            "acquired": scene.acquired,
            "bands": list(scene.bands),
            "stretch": scene.stretch,
        }

    def close(self) -> None:
        """Close this thread's open scenes (other threads' close when they end)."""
        for src in self._open.datasets.values():
            src.close()
        self._open.datasets.clear()
