"""Scene pixels → RGB images: band choice, the per-scene percentile stretch, one tile cut again
from its scene (thumbnails), and a scene's overview warped for a web map."""

from __future__ import annotations

import functools
import json
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from PIL import Image
from rasterio.enums import MaskFlags, Resampling
from rasterio.windows import Window

from rshash.errors import DataError

# GDAL's block cache defaults to 5% of RAM; tiles are read block by block and need far less, so
# cap it (unless the user set it) to keep memory flat in scene size.
os.environ.setdefault("GDAL_CACHEMAX", "256")
Stretch = list[list[float]] | None
PERCENTILES = (2.0, 98.0)
# Web Mercator (EPSG:3857's sphere and units) centred on 180°: continuous across the antimeridian
MERCATOR_180 = (
    "+proj=merc +a=6378137 +b=6378137 +lat_ts=0 +lon_0=180 +x_0=0 +y_0=0 +k=1 +units=m"
    " +nadgrids=@null +no_defs"
)


def percentile_stretch(
    sample: np.ndarray, valid: np.ndarray, percentiles: tuple[float, float] = PERCENTILES
) -> list[list[float]]:
    """Per band [lo, hi] at the given percentiles of the valid pixels of a (bands, h, w) sample."""
    out = []
    for band in sample:
        values = band[valid & np.isfinite(band)]
        if values.size == 0:
            out.append([0.0, 1.0])
            continue
        lo, hi = np.percentile(values, percentiles)
        out.append([float(lo), float(hi) if hi > lo else float(lo) + 1.0])
    return out


@functools.lru_cache(maxsize=64)
def _lookup_tables(stretch: str, nodata: float | None, dtype: str) -> list[np.ndarray]:
    """Per band, the 8-bit value of every 16-bit value under a stretch (nodata → 0)."""
    values = np.arange(65536, dtype=np.float32) - (32768 if np.dtype(dtype) == np.int16 else 0)
    luts = []
    for lo, hi in json.loads(stretch):
        lut = np.clip((values - lo) * (255.0 / (hi - lo)), 0.0, 255.0).astype(np.uint8)
        if nodata is not None and values[0] <= nodata <= values[-1]:
            lut[int(nodata - values[0])] = 0
        luts.append(lut)
    return luts


def to_rgb(data: np.ndarray, stretch: Stretch, nodata: float | None = None) -> Image.Image:
    """(1 or 3, h, w) pixels → RGB image: as is without a stretch (8-bit), else each band mapped
    linearly from [lo, hi] to [0, 255]; nodata and NaN become black."""
    if stretch is None:
        rgb = data.astype(np.uint8, copy=False)
    elif data.dtype in (np.uint16, np.int16):  # a lookup table per band: no float pass per tile
        luts = _lookup_tables(json.dumps(stretch), nodata, data.dtype.str)
        index = data.astype(np.int32) + 32768 if data.dtype == np.int16 else data
        rgb = np.stack([np.take(lut, band) for lut, band in zip(luts, index, strict=True)])
    else:
        lo = np.asarray([s[0] for s in stretch], np.float32)[:, None, None]
        scale = 255.0 / (np.asarray([s[1] for s in stretch], np.float32)[:, None, None] - lo)
        scaled = (data.astype(np.float32) - lo) * scale
        if nodata is not None:
            scaled[data == nodata] = 0.0
        rgb = np.nan_to_num(np.clip(scaled, 0.0, 255.0), nan=0.0).astype(np.uint8)
    # one 8-bit image per band, merged by PIL: far cheaper than transposing to (h, w, 3) in numpy
    bands = [Image.fromarray(np.ascontiguousarray(b)) for b in rgb]
    return Image.merge("RGB", bands * 3 if len(bands) == 1 else bands)


def open_scene(path: str | Path) -> Any:
    """rasterio dataset of a scene, or a one-line DataError naming the file."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            return rasterio.open(path)
    except rasterio.errors.RasterioIOError as exc:
        raise DataError(f"{path}: not a readable GeoTIFF ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def read_window(
    src: Any, bands: Sequence[int], row: int, col: int, height: int, width: int
) -> np.ndarray:
    """(bands, height, width) pixels of one window, or a DataError naming the scene."""
    try:
        return np.asarray(src.read(list(bands), window=Window(col, row, width, height)))
    except rasterio.errors.RasterioError as exc:
        raise DataError(
            f"{src.name}: cannot read window row {row}, col {col} ({_first_line(exc)})"
        ) from None


def decimated_view(
    src: Any, bands: Sequence[int], factor: int, chunk: int = 2048
) -> tuple[np.ndarray, np.ndarray]:
    """Every `factor`-th pixel of the scene (bands, ceil(h/f), ceil(w/f)) and where it is valid.

    With overviews, GDAL reads them. Without, GDAL's own decimated read decodes blocks several
    times over, so the scene is read once in block-aligned chunks (a multiple of `factor`, a
    power of two) and subsampled here: one decode of the scene, and memory of one chunk.
    """
    h, w = math.ceil(src.height / factor), math.ceil(src.width / factor)
    if src.overviews(bands[0]):
        sample = src.read(
            list(bands), out_shape=(len(bands), h, w), masked=True, resampling=Resampling.nearest
        )
        return np.ma.getdata(sample), np.asarray(~np.ma.getmaskarray(sample).any(axis=0), bool)
    bh, bw = src.block_shapes[0]
    striped = bw == src.width
    ch = max(chunk if not striped else 256, -(-bh // factor) * factor)
    cw = src.width if striped else chunk
    sample = np.empty((len(bands), h, w), src.dtypes[bands[0] - 1])
    valid = np.empty((h, w), bool)
    use_mask = src.nodata is None and any(
        MaskFlags.all_valid not in src.mask_flag_enums[b - 1] for b in bands
    )
    for row in range(0, src.height, ch):
        for col in range(0, src.width, cw):
            win = Window(col, row, min(cw, src.width - col), min(ch, src.height - row))
            data = src.read(list(bands), window=win)[:, ::factor, ::factor]
            ok = np.ones(data.shape[1:], bool)
            if src.nodata is not None:
                ok &= (data != src.nodata).all(axis=0)
            if use_mask:
                ok &= src.dataset_mask(window=win)[::factor, ::factor] > 0
            if data.dtype.kind == "f":
                ok &= np.isfinite(data).all(axis=0)
            r, c = row // factor, col // factor
            sample[:, r : r + data.shape[1], c : c + data.shape[2]] = data
            valid[r : r + data.shape[1], c : c + data.shape[2]] = ok
    return sample, valid


def read_tile(record: Mapping[str, Any]) -> Image.Image:
    """A tile record's RGB image, cut again from its scene with the record's bands and stretch."""
    w = record["window"]
    with open_scene(record["path"]) as src:
        data = read_window(src, record["bands"], w["row"], w["col"], w["height"], w["width"])
        return to_rgb(data, record.get("stretch"), src.nodata)


def render_overview(
    path: str | Path, bands: Sequence[int], stretch: Stretch, max_size: int = 1024
) -> tuple[Image.Image, list[float]]:
    """The whole scene warped to Web Mercator and shrunk to at most `max_size` px (from its
    overviews when it has them), as RGBA (nodata transparent), with its [west, south, east,
    north]: a web map can lay it exactly over its bounds. A scene across the antimeridian gets
    west > east (RFC 7946) and is warped to Web Mercator centred on 180°, which is continuous
    there: the image covers [west, east + 360]."""
    from rasterio.vrt import WarpedVRT
    from rasterio.warp import transform_bounds

    with open_scene(path) as src:
        west, _, east, _ = transform_bounds(src.crs, "EPSG:4326", *src.bounds)
        crs = MERCATOR_180 if west > east else "EPSG:3857"
        with WarpedVRT(src, crs=crs, add_alpha=True) as vrt:
            scale = max(vrt.width, vrt.height) / max_size
            h, w = max(1, math.ceil(vrt.height / scale)), max(1, math.ceil(vrt.width / scale))
            data = vrt.read(
                list(bands), out_shape=(len(bands), h, w), resampling=Resampling.average
            )
            alpha = vrt.read(vrt.count, out_shape=(h, w), resampling=Resampling.nearest)
            rgb = np.asarray(to_rgb(data, stretch, src.nodata))
            bounds = transform_bounds(vrt.crs, "EPSG:4326", *vrt.bounds)
        if src.nodata is not None:
            alpha = np.where((data == src.nodata).all(axis=0), 0, alpha)
    rgba = np.dstack([rgb, alpha.astype(np.uint8)])
    return Image.fromarray(rgba, "RGBA"), [round(float(b), 8) for b in bounds]
