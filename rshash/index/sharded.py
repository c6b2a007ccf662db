"""Archives beyond one machine, on Ray: bulk encoding into index shards, sharded search.

`ray_build_shards` encodes images with Ray Data (`map_batches` with one model per worker, on CPU
or GPU workers) and writes S index shards with global keys. `ShardedIndex` holds each shard in a
Ray actor, scatters a query to all of them and merges their top-k by (distance, key), which is
exactly the answer of one index over the union. Both run against a local Ray (`ray.init()`) or a
cluster (`address="ray://head:10001"`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from rshash.data.dataset import Dataset
from rshash.data.images import load_rgb
from rshash.errors import RshashError
from rshash.fileio import write_json_atomic
from rshash.index.build import caption_records, image_records
from rshash.index.encoder import CodeEncoder
from rshash.index.index import Hit, Index, Searcher, check_query
from rshash.training.run import HashRun

SHARDS = "shards.json"


def _ray(address: str | None) -> Any:
    import ray

    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False, include_dashboard=False)
    return ray


class EncodeImages:
    """Ray Data callable class: one model per worker, batches of image paths → packed codes."""

    def __init__(self, run_dir: str, device: str) -> None:
        self.encoder = CodeEncoder(HashRun.open(run_dir), device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = [load_rgb(Path(p)) for p in batch["path"]]
        return {"row": batch["row"], "codes": self.encoder.encode_images(images)}


def ray_encode_images(
    run_dir: str | Path,
    ds: Dataset,
    batch: int = 32,
    workers: int = 2,
    gpus_per_worker: float = 0.0,
    device: str = "auto",
    address: str | None = None,
    progress: bool = True,
) -> np.ndarray:
    """Packed codes of every image of `ds`, encoded by `workers` Ray Data workers."""
    ray = _ray(address)
    rows = ray.data.from_items(
        [{"row": i, "path": str(p)} for i, p in enumerate(ds.image_paths)],
        override_num_blocks=max(1, min(len(ds), workers * 4)),
    )
    encoded = rows.map_batches(
        EncodeImages,
        fn_constructor_args=(str(run_dir), device),
        batch_size=batch,
        batch_format="numpy",
        concurrency=workers,
        num_gpus=gpus_per_worker,
    )
    bits = HashRun.open(run_dir).bits
    codes = np.zeros((len(ds), bits // 8), np.uint8)
    with tqdm(total=len(ds), desc="ray encode", unit="image", disable=not progress) as bar:
        for part in encoded.iter_batches(batch_format="numpy", batch_size=None):
            codes[part["row"]] = part["codes"]
            bar.update(len(part["row"]))
    return codes


def ray_build_shards(
    run_dir: str | Path,
    ds: Dataset,
    out: str | Path,
    shards: int,
    engine: str = "exact",
    image_codes: np.ndarray | None = None,
    caption_codes: np.ndarray | None = None,
    **encode_options: Any,
) -> list[Path]:
    """Encode `ds` on Ray and write `shards` index shards with global keys.

    Codes already at hand (say, from a feature store) can be passed instead of being encoded.
    """
    out = Path(out)
    if (out / SHARDS).exists():
        raise RshashError(f"{out}: a sharded index already exists here")
    if image_codes is None:
        image_codes = ray_encode_images(run_dir, ds, **encode_options)
    images, captions = image_records(ds), caption_records(ds)
    texts = [c["text"] for c in captions]
    if caption_codes is None and texts:
        caption_codes = CodeEncoder(HashRun.open(run_dir)).encode_texts(texts)
    cap_start = np.concatenate([[0], np.cumsum(ds.caption_counts)])
    paths = []
    for s in range(shards):
        lo, hi = s * len(ds) // shards, (s + 1) * len(ds) // shards
        shard = Index.create(out / f"shard-{s:03d}", run_dir, engine)
        shard.add("images", image_codes[lo:hi], images[lo:hi], first_key=lo)
        a, b = int(cap_start[lo]), int(cap_start[hi])
        if caption_codes is not None and b > a:
            shard.add("captions", caption_codes[a:b], captions[a:b], first_key=a)
        shard.commit({"dataset": ds.name, "path": str(ds.source), "rows": [lo, hi]})
        paths.append(shard.path)
    write_json_atomic(
        out / SHARDS,
        {"format": "rshash-shards/1", "shards": [p.name for p in paths], "images": len(ds)},
    )
    return paths


class _Shard:
    """Ray actor body: one index shard in memory, answering searches by packed code."""

    def __init__(self, path: str) -> None:
        self.index = Index.open(path)

    def fingerprint(self) -> str:
        return self.index.fingerprint

    def search(
        self, codes: np.ndarray, k: int, collection: str, radius: int | None
    ) -> list[list[tuple[int, int, dict[str, Any]]]]:
        if collection not in self.index.collections:
            return [[] for _ in codes]
        found = self.index.search_codes(codes, k, collection, radius)
        return [[(h.key, h.distance, h.item) for h in hits] for hits in found]


class ShardedIndex(Searcher):
    """Scatter-gather search over index shards held by Ray actors."""

    def __init__(self, path: str | Path, address: str | None = None) -> None:
        path = Path(path)
        manifest_path = path / SHARDS
        if not manifest_path.is_file():
            raise RshashError(f"{path}: not a sharded index (no {SHARDS})")
        names = json.loads(manifest_path.read_text())["shards"]
        ray = _ray(address)
        actor = ray.remote(_Shard)
        self.path = path
        self.actors = [actor.remote(str(path / name)) for name in names]
        prints = ray.get([a.fingerprint.remote() for a in self.actors])
        if len(set(prints)) != 1:
            bad = names[next(i for i, p in enumerate(prints) if p != prints[0])]
            raise RshashError(f"{path / bad}: shard was built with another model than {names[0]}")
        self.encoder = CodeEncoder(HashRun.open(path / names[0] / "model"))
        self._ray = ray

    def search_codes(
        self, codes: np.ndarray, k: int = 20, collection: str = "images", radius: int | None = None
    ) -> list[list[Hit]]:
        check_query(k, radius)
        parts = self._ray.get([a.search.remote(codes, k, collection, radius) for a in self.actors])
        merged = []
        for q in range(len(codes)):
            hits = sorted((h for part in parts for h in part[q]), key=lambda h: (h[1], h[0]))
            hits = hits if radius is not None else hits[:k]
            merged.append([Hit(key, d, item) for key, d, item in hits])
        return merged
