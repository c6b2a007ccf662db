"""`index build` of RSSCN7 (2800 JPEGs, no captions) per backend, against its encoder's own rate.

For each backend (torch, the peer, and the default) one full build into a temporary folder,
end to end (decode, resize, encode, hash, write, commit), in images/s; the limit is the same
image encoder alone on in-memory views of 256 of those images at the build's batch size, so the
ratio shows what decoding and the store cost beside the encoder. Seeded, with the cached 64-bit
DUCH test run. Usage: python -m benchmarks.build_rate
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import DATA_ROOT, REPO, markdown_table, write_results
from rshash.data import load_dataset
from rshash.features.backends import DEFAULT_CPU_BACKEND
from rshash.index.build import BuildConfig, build_index
from rshash.index.encoder import CodeEncoder
from rshash.models.run import HashRun
from rshash.reproducibility import seed_everything

SEED = 0


def encoder_rate(encoder: CodeEncoder, paths: list[Path], batch: int) -> float:
    """Images/s of the image encoder and hashing alone, views already decoded and resized."""
    from PIL import Image

    views = [encoder.view(Image.open(p).convert("RGB")) for p in paths]
    encoder.encode_views(views[:batch])
    best = 0.0
    for _ in range(2):
        start = time.perf_counter()
        for i in range(0, len(views), batch):
            encoder.encode_views(views[i : i + batch])
        best = max(best, len(views) / (time.perf_counter() - start))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run", type=Path, default=REPO / ".cache" / "tests" / "ucm-duch64")
    args = parser.parse_args()
    seed_everything(SEED)
    ds = load_dataset(DATA_ROOT / "rsscn7")
    records: list[dict[str, Any]] = []
    for backend in ("torch", DEFAULT_CPU_BACKEND):
        cfg = BuildConfig(backend=backend)
        encoder = CodeEncoder(HashRun.open(args.run), "cpu", backend)
        limit = encoder_rate(encoder, list(ds.image_paths[:256]), cfg.image_batch)
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            build_index(args.run, ds, Path(tmp) / "index", cfg, progress=False)
            rate = len(ds) / (time.perf_counter() - start)
        records.append(
            {
                "backend": backend,
                "images": len(ds),
                "build_per_s": round(rate, 1),
                "encoder_limit_per_s": round(limit, 1),
                "ratio": round(rate / limit, 3),
            }
        )
        print(records[-1], flush=True)
    speedup = round(records[1]["build_per_s"] / records[0]["build_per_s"], 2)
    keys = ["backend", "images", "build_per_s", "encoder_limit_per_s", "ratio"]
    markdown = (
        "# `index build` of RSSCN7 per backend (end to end) against its encoder's own rate\n\n"
        + markdown_table(keys, [[str(r[k]) for k in keys] for r in records])
        + f"\n\nDefault ({DEFAULT_CPU_BACKEND}) over torch, same run: {speedup}x. Decode pool: "
        f"{BuildConfig().workers} threads, image batch {BuildConfig().image_batch}.\n"
    )
    write_results("build_rate", {"records": records, "speedup": speedup}, markdown)


if __name__ == "__main__":
    main()
