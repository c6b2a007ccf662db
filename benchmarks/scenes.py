"""Scene tiling throughput and memory: read-and-cut against rasterio windowed reads alone.

Scenes: mosaics of real UCM images (tests/scenes_data.py) written with rasterio, 40 x 40 and
80 x 80 cells of 256 px plus a 256-px nodata margin (10,752 and 20,992 px square), as COGs
(deflate, 512-px blocks, overviews); the 20,992-px mosaic also as a plain tiled GeoTIFF without
overviews, and the 10,752-px one as a 16-bit 4-band COG (`--bands 3,2,1`, percentile stretch).

- read-and-cut: `SceneTiles(scene)` (the scan: validation, nodata mask and stretch from a
  decimated read) and then `load_image(i)` for every tile, one thread: tiles/s from the start;
- read limit, in the same run: the same windows read with `rasterio` `src.read(window=...)`,
  same order, same bands, nothing else (no scan, no conversion);
- each figure is measured in turn with its limit (3 pairs, each in a fresh process so peak
  memory is its own); the ratio is the median of the paired ratios (the machine is shared);
- peak memory (max RSS) of read-and-cut at both scene sizes: flat in scene size is the goal;
- end to end: `build_index` of the 10,752-px COG with the UCM-trained 64-bit run on CPU
  (reading, cutting, encoding, committing), tiles/s;
- STAC in: the 10,752-px COG as the one Item of a STAC catalog (rio-stac, relative hrefs),
  read-and-cut through `StacTiles(catalog)` (reading and checking the catalog, then as above)
  against the same read limit.
Usage: python -m benchmarks.scenes [--run RUN] [--pairs 3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# benchmarks.common imports torch (500 MB resident): only the parent process imports it, so the
# measuring processes' peak memory is the tiler's own
REPO = Path(__file__).resolve().parent.parent
SCENES = REPO / ".cache" / "benchmarks" / "scenes"
GOAL = 0.8


def scene(kind: str, grid: int) -> Path:
    """A cached mosaic of `grid` x `grid` UCM images: 'cog', 'cog16' or 'gtiff'."""
    from tests.scenes_data import mosaic_layout, write_cog, write_mosaic

    path = SCENES / f"mosaic{grid}-{kind}.tif"
    if not path.exists():
        layout = mosaic_layout(grid)
        tmp = path.with_name("tmp-" + path.name)
        if kind == "gtiff":
            write_mosaic(tmp, layout)
        else:
            write_cog(tmp, layout, sixteen_bit=kind == "cog16")
        tmp.rename(path)
    return path


def _peak_mb() -> float:
    """This process's peak resident memory (VmHWM: its own address space since exec; ru_maxrss
    would carry over the peak of the parent that forked it)."""
    status = Path("/proc/self/status").read_text()
    return int(next(ln.split()[1] for ln in status.splitlines() if ln.startswith("VmHWM:"))) / 1024


def stage(name: str, path: Path, bands: tuple[int, ...] | None) -> dict[str, Any]:
    """One measurement in this (fresh) process."""
    import rasterio
    from rasterio.windows import Window

    from rshash.data.scenes import SceneTiles, TileConfig

    cfg = TileConfig(bands=bands)
    if name == "stac_read_and_cut":
        from rshash.data.stac import StacTiles  # imported before the clock starts, as SceneTiles
    baseline = _peak_mb()
    if name == "read_limit":
        tiles = SceneTiles(path, cfg)  # only for the windows; not timed
        sc = tiles.scenes[0]
        windows = [
            Window(int(c), int(r), cfg.tile, cfg.tile)
            for r, c in zip(sc.rows, sc.cols, strict=True)
        ]
        start = time.perf_counter()
        with rasterio.open(path) as src:
            for w in windows:
                src.read(list(sc.bands), window=w)
        seconds = time.perf_counter() - start
        n = len(windows)
    else:
        start = time.perf_counter()
        tiles = StacTiles(path, cfg) if name == "stac_read_and_cut" else SceneTiles(path, cfg)
        scan = time.perf_counter() - start
        for i in range(len(tiles)):
            tiles.load_image(i)
        seconds = time.perf_counter() - start
        n = len(tiles)
    result = {
        "tiles": n,
        "seconds": seconds,
        "tiles_per_s": n / seconds,
        "peak_mb": _peak_mb(),
        "imports_mb": baseline,
    }
    if name != "read_limit":
        result["scan_seconds"] = scan
    return result


def run_stage(name: str, path: Path, bands: str | None) -> dict[str, Any]:
    args = [sys.executable, "-m", "benchmarks.scenes", "--stage", name, "--scene", str(path)]
    if bands:
        args += ["--bands", bands]
    done = subprocess.run(args, capture_output=True, text=True, cwd=REPO, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def stac_catalog(path: Path) -> Path:
    """A cached STAC catalog whose one Item is the scene at `path` (its asset: the COG)."""
    from datetime import UTC, datetime

    import pystac
    from rio_stac import create_stac_item

    out = path.with_name(path.stem + "-stac")
    if not (out / "catalog.json").exists():
        item = create_stac_item(
            str(path), input_datetime=datetime(2021, 6, 1, tzinfo=UTC), id=path.stem,
            asset_name="visual", asset_roles=["visual"], asset_media_type=pystac.MediaType.COG,
        )  # fmt: skip
        catalog = pystac.Catalog(path.stem, "benchmark scene")
        catalog.add_item(item)
        catalog.normalize_hrefs(str(out))
        catalog.make_all_asset_hrefs_relative()
        catalog.save(pystac.CatalogType.SELF_CONTAINED)
    return out / "catalog.json"


def paired(path: Path, bands: str | None, pairs: int, stac: bool = False) -> dict[str, Any]:
    """Read-and-cut (of the scene, or with `stac` of a catalog holding it) and its read limit
    measured in turn, `pairs` times."""
    cut, limit = [], []
    subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True)  # page cache warm
    for _ in range(pairs):
        limit.append(run_stage("read_limit", path, bands))
        if stac:
            cut.append(run_stage("stac_read_and_cut", stac_catalog(path), bands))
        else:
            cut.append(run_stage("read_and_cut", path, bands))
    ratios = [c["tiles_per_s"] / lim["tiles_per_s"] for c, lim in zip(cut, limit, strict=True)]
    import rasterio

    with rasterio.open(path) as src:
        size = f"{src.width} x {src.height}"
    return {
        "scene": f"{path.name} (STAC Item)" if stac else path.name,
        "size_px": size,
        "bands": bands or "1,2,3",
        "tiles": cut[0]["tiles"],
        "tiles_per_s": statistics.median(c["tiles_per_s"] for c in cut),
        "read_limit_tiles_per_s": statistics.median(lim["tiles_per_s"] for lim in limit),
        "ratio": statistics.median(ratios),
        "ratios": ratios,
        "scan_seconds": statistics.median(c["scan_seconds"] for c in cut),
        "peak_mb": max(c["peak_mb"] for c in cut),
        "read_limit_peak_mb": max(lim["peak_mb"] for lim in limit),
        "imports_mb": max(c["imports_mb"] for c in cut),
        "file_mb": path.stat().st_size / 2**20,
    }


def end_to_end(run: Path, path: Path) -> dict[str, Any]:
    from rshash.data.scenes import SceneTiles
    from rshash.index.build import BuildConfig, build_index

    out = SCENES / "e2e-index"
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(out.with_name(out.name + ".partial"), ignore_errors=True)
    start = time.perf_counter()
    tiles = SceneTiles(path)
    build_index(run, tiles, out, BuildConfig(device="cpu"), progress=False)
    seconds = time.perf_counter() - start
    shutil.rmtree(out)
    return {
        "scene": path.name,
        "tiles": len(tiles),
        "seconds": seconds,
        "tiles_per_s": len(tiles) / seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--stage", choices=["read_limit", "read_and_cut", "stac_read_and_cut"])
    parser.add_argument("--scene", type=Path)
    parser.add_argument("--bands")
    parser.add_argument("--run", type=Path, default=REPO / ".cache" / "tests" / "ucm-duch64")
    parser.add_argument("--pairs", type=int, default=3)
    args = parser.parse_args()
    if args.stage:
        bands = tuple(int(b) for b in args.bands.split(",")) if args.bands else None
        print(json.dumps(stage(args.stage, args.scene, bands)))
        return
    from benchmarks.common import machine, markdown_table, write_results

    cases = [
        (scene("cog", 40), None),
        (scene("cog", 80), None),
        (scene("gtiff", 80), None),
        (scene("cog16", 40), "3,2,1"),
    ]
    rows = [paired(path, bands, args.pairs) for path, bands in cases]
    rows.append(paired(scene("cog", 40), None, args.pairs, stac=True))
    e2e = end_to_end(args.run, scene("cog", 40))
    small, large = rows[0], rows[1]
    records = {
        "goal_ratio": GOAL,
        "read_and_cut": rows,
        "memory_flat": {
            "peak_mb_10k": small["peak_mb"],
            "peak_mb_21k": large["peak_mb"],
            "growth": large["peak_mb"] / small["peak_mb"],
            "scene_pixels_growth": (80 / 40) ** 2,
        },
        "end_to_end": e2e,
        "machine": machine(),
    }
    table = markdown_table(
        ["scene", "size (px)", "bands", "tiles", "read-and-cut tiles/s", "read limit tiles/s",
         "ratio (goal ≥ 0.8)", "scan s", "peak MB"],
        [
            [r["scene"], r["size_px"], r["bands"], str(r["tiles"]), f"{r['tiles_per_s']:.0f}",
             f"{r['read_limit_tiles_per_s']:.0f}", f"{r['ratio']:.2f}", f"{r['scan_seconds']:.2f}",
             f"{r['peak_mb']:.0f}"]
            for r in rows
        ],
    )  # fmt: skip
    markdown = (
        "# Scene tiling: read-and-cut against rasterio windowed reads\n\n"
        "One thread; 256-px tiles, stride 256; ratio = median of "
        f"{args.pairs} paired ratios (each figure measured in turn with its limit).\n\n"
        f"{table}\n\n"
        f"Peak memory of read-and-cut: {small['peak_mb']:.0f} MB at {small['size_px']} px, "
        f"{large['peak_mb']:.0f} MB at {large['size_px']} px "
        f"(x{large['peak_mb'] / small['peak_mb']:.2f} for x4 the pixels).\n\n"
        f"End to end (`build_index`, CPU encoding, {e2e['scene']}): {e2e['tiles']} tiles in "
        f"{e2e['seconds']:.0f} s, {e2e['tiles_per_s']:.1f} tiles/s."
    )
    write_results("scenes", records, markdown)


if __name__ == "__main__":
    main()
