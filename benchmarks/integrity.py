"""What verifying segment checksums and key order adds to `Index.open`, at 1e6 and 1e7 items.

An index of n random 64-bit codes in one segment (as after compaction) under the real UCM run;
its records hold a few items only, since opening never reads records (guarded by
`test_open_does_not_load_records`), so the open time is that of a full index. Per n, the median
of 5 alternating opens with `verify=False` and `verify=True` (page cache warm for both), and the
scan alone (`integrity.verify_segments`).
Usage: python -m benchmarks.integrity [--sizes 1000000 10000000] [--run RUN] [--work DIR]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import CACHE, markdown_table, write_results
from rshash.fileio import write_json_atomic
from rshash.index import Index, integrity, store
from rshash.index.store import MANIFEST

REPEATS = 5
CHUNK = 1_000_000


def make_index(run: Path, out: Path, n: int) -> None:
    """An index whose images collection is one segment of n codes (keys 0..n-1)."""
    shutil.rmtree(out, ignore_errors=True)
    index = Index.create(out, run)
    index.add("images", np.zeros((10, 8), np.uint8), [{"id": f"i{i}"} for i in range(10)])
    index.commit()
    index.close()
    manifest = store.read_manifest(out)
    rng = np.random.default_rng(0)
    seg = store.SegmentWriter(out / store.segment_name("images", 2), 8)
    for at in range(0, n, CHUNK):
        m = min(CHUNK, n - at)
        seg.write(np.arange(at, at + m), rng.integers(0, 256, (m, 8), dtype=np.uint8))
    seg.close()
    for old in manifest["collections"]["images"]["segments"]:
        (out / old["file"]).unlink()
    entry = {"file": seg.path.name, "count": n, "crc32": seg.crc32}
    manifest["collections"]["images"].update(segments=[entry], count=n, next_key=n)
    manifest["generation"] = 2
    write_json_atomic(out / MANIFEST, manifest)


def measure(path: Path) -> dict[str, Any]:
    times: dict[str, list[float]] = {"open_s": [], "open_verify_s": [], "scan_s": []}
    manifest = store.read_manifest(path)
    for _ in range(REPEATS):
        for key, verify in (("open_s", False), ("open_verify_s", True)):
            t = time.perf_counter()
            Index.open(path, device="cpu", verify=verify).close()
            times[key].append(time.perf_counter() - t)
        t = time.perf_counter()
        integrity.verify_segments(path, manifest, "images")
        times["scan_s"].append(time.perf_counter() - t)
    row = {k: statistics.median(v) for k, v in times.items()}
    row["verify_share"] = row["scan_s"] / row["open_s"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--run", type=Path, default=CACHE.parent / "tests" / "ucm-duch64")
    parser.add_argument("--work", type=Path, default=CACHE / "integrity")
    args = parser.parse_args()
    records = []
    for n in args.sizes:
        out = args.work / f"n{n}"
        make_index(args.run, out, n)
        records.append({"n": n, **measure(out)})
        shutil.rmtree(out)
    keys = ("open_s", "open_verify_s", "scan_s")
    rows = [
        [f"{r['n']:.0e}", *(f"{r[k]:.3f}" for k in keys), f"{100 * r['verify_share']:.0f} %"]
        for r in records
    ]
    header = ["items", "open_s", "open_verify_s", "scan_s", "scan / open"]
    text = (
        "# Segment verification on open (64-bit codes, one segment, page cache warm)\n\n"
        f"Median of {REPEATS}. `scan_s`: CRC32 and key order of every segment "
        "(`integrity.verify_segments`), what `verify=True` adds to `open_s`.\n\n"
        + markdown_table(header, rows)
    )
    write_results("integrity", records, text)


if __name__ == "__main__":
    main()
