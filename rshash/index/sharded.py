"""Archives beyond one machine, on Ray: bulk encoding into index shards, sharded search.

`ray_build_shards` encodes any image source (a `Dataset`, the `SceneTiles` of many scenes) with
Ray Data (`map_batches` with one model per worker, on CPU or GPU workers; each worker reads its
own images or tile windows) and writes S index shards with global keys. `ShardedIndex` holds each
shard in a Ray actor, scatters a query to all of them and merges their top-k by (distance, key),
which is exactly the answer of one index over the union. Both run against a local Ray
(`ray.init()`) or a cluster (`address="ray://head:10001"`).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from rshash.data.source import ImageSource
from rshash.errors import RshashError
from rshash.features.backends import AUTO, check_backend, check_compatible, resolve_backend
from rshash.fileio import write_json_atomic
from rshash.index.build import caption_records, image_records, source_entry
from rshash.index.encoder import CodeEncoder
from rshash.index.filters import check_bbox, compile_where
from rshash.index.index import (
    Allowed,
    Hit,
    Index,
    Searcher,
    check_query,
    encoded_with,
    record_fields,
)
from rshash.index.packing import empty_codes
from rshash.index.store import COLLECTIONS, LOCK, connect
from rshash.models.run import HashRun
from rshash.reproducibility import resolve_device

SHARDS = "shards.json"
START_TIMEOUT = 300.0  # seconds for every shard actor to come up


def _ray(address: str | None) -> Any:
    import ray

    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False, include_dashboard=False)
    return ray


class EncodeImages:
    """Ray Data callable class: one model and one copy of the image source per worker; batches
    of image numbers → packed codes. Workers load the images themselves (files, or tiles read
    from their scenes' windows), so no pixels pass through the driver."""

    def __init__(self, run_dir: str, device: str, source: ImageSource, backend: str = AUTO) -> None:
        self.encoder = CodeEncoder(HashRun.open(run_dir), device, backend)
        self.source = source

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = [self.source.load_image(int(i)) for i in batch["row"]]
        return {"row": batch["row"], "codes": self.encoder.encode_images(images)}


def ray_encode_images(
    run_dir: str | Path,
    ds: ImageSource,
    batch: int = 32,
    workers: int = 2,
    gpus_per_worker: float = 0.0,
    device: str = "auto",
    address: str | None = None,
    progress: bool = True,
    backend: str = AUTO,
) -> np.ndarray:
    """Packed codes of every image of `ds` (a `Dataset`, `SceneTiles`: any image source),
    encoded by `workers` Ray Data workers. Each worker gets a copy of the source and loads its
    images from the source's paths, so every node must read them (shared storage)."""
    ray = _ray(address)
    rows = ray.data.from_items(
        [{"row": i} for i in range(len(ds))],
        override_num_blocks=max(1, min(len(ds), workers * 4)),
    )
    encoded = rows.map_batches(
        EncodeImages,
        fn_constructor_args=(str(run_dir), device, ds, check_backend(backend)),
        batch_size=batch,
        batch_format="numpy",
        concurrency=workers,
        num_gpus=gpus_per_worker,
    )
    bits = HashRun.open(run_dir).bits
    codes = empty_codes(len(ds), bits)
    with tqdm(total=len(ds), desc="ray encode", unit="image", disable=not progress) as bar:
        for part in encoded.iter_batches(batch_format="numpy", batch_size=None):
            codes[part["row"]] = part["codes"]
            bar.update(len(part["row"]))
    return codes


def ray_build_shards(
    run_dir: str | Path,
    ds: ImageSource,
    out: str | Path,
    shards: int,
    engine: str = "exact",
    image_codes: np.ndarray | None = None,
    caption_codes: np.ndarray | None = None,
    backend: str = AUTO,
    **encode_options: Any,
) -> list[Path]:
    """Encode `ds` on Ray and write `shards` index shards with global keys.

    Codes already at hand (say, from a feature store) can be passed instead of being encoded.
    `backend` (see `rshash.features.backends`) encodes images on the workers and captions here;
    "auto" resolves on this (the driver's) device and is recorded in every shard.
    """
    backend = resolve_backend(backend, resolve_device(encode_options.get("device", "auto")))
    out = Path(out)
    if (out / SHARDS).exists():
        raise RshashError(f"{out}: a sharded index already exists here")
    if image_codes is None:
        image_codes = ray_encode_images(run_dir, ds, backend=backend, **encode_options)
    images, captions = image_records(ds), caption_records(ds)
    texts = [c["text"] for c in captions]
    if caption_codes is None and texts:
        caption_codes = CodeEncoder(HashRun.open(run_dir), backend=backend).encode_texts(texts)
    cap_start = np.concatenate([[0], np.cumsum([len(c) for c in ds.captions])])
    paths = []
    for s in range(shards):
        lo, hi = s * len(ds) // shards, (s + 1) * len(ds) // shards
        shard = Index.create(out / f"shard-{s:03d}", run_dir, engine, backend=backend)
        shard.add("images", image_codes[lo:hi], images[lo:hi], first_key=lo)
        a, b = int(cap_start[lo]), int(cap_start[hi])
        if caption_codes is not None and b > a:
            shard.add("captions", caption_codes[a:b], captions[a:b], first_key=a)
        shard.commit(source_entry(ds, rows=[lo, hi]))
        paths.append(shard.path)
    write_json_atomic(
        out / SHARDS,
        {"format": "rshash-shards/1", "shards": [p.name for p in paths], "images": len(ds)},
    )
    return paths


class ShardUnavailable(RshashError):
    """A shard did not answer in time or its actor is gone (the service answers 503)."""


def shard_files(path: Path) -> dict[str, bytes]:
    """Every file of a shard directory (index files and model copy), by relative path.

    SQLite's shared-memory index (`-shm`) and the writers' lock belong to the machine that made
    them; the actor's SQLite rebuilds the former from the WAL.
    """
    return {
        str(p.relative_to(path)): p.read_bytes()
        for p in sorted(path.rglob("*"))
        if p.is_file()
        and "thumbnails" not in p.relative_to(path).parts
        and not p.name.endswith("-shm")
        and p.name != LOCK
    }


class _Shard:
    """Ray actor body: one index shard in memory, answering searches by packed code.

    The shard's files come through Ray's object store, so the actor runs (and restarts) on any
    node: it writes them to a private temporary folder that lives as long as the actor (the
    index reads its records from SQLite there).
    """

    def __init__(
        self, name: str, contents: dict[str, bytes], fields: dict[str, frozenset[str]]
    ) -> None:
        self.name = name
        self._folder = tempfile.TemporaryDirectory(prefix=f"rshash-{name}-")
        tmp = self._folder.name
        for rel, data in contents.items():
            target = Path(tmp) / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        built = encoded_with(json.loads((Path(tmp) / "index.json").read_text()))
        self.index = Index.open(tmp, device="cpu", backend=built)  # searches codes only
        self.index.shared_fields = fields  # a field of another shard matches nothing here
        probe = empty_codes(1, self.index.bits)
        for name, col in self.index.collections.items():  # compile the search kernels now
            if len(col):
                self.index.search_codes(probe, 1, name)

    def ping(self) -> tuple[str, str]:
        """The shard's name and the id of the Ray node it runs on."""
        import ray

        return self.name, ray.get_runtime_context().get_node_id()

    def search(
        self,
        codes: np.ndarray,
        k: int,
        collection: str,
        radius: int | None,
        filters: dict[str, Any],
    ) -> list[list[tuple[int, int, dict[str, Any]]]]:
        if collection not in self.index.collections:
            return [[] for _ in codes]
        found = self.index.search_codes(codes, k, collection, radius, **filters)
        return [[(h.key, h.distance, h.item) for h in hits] for hits in found]

    def prepare(self, collection: str, filters: dict[str, Any]) -> None:
        """Resolve a filter into the shard's cache of matching keys, ahead of its searches."""
        if collection in self.index.collections:
            self.index.matching_keys(collection, **filters)

    def item(self, item_id: str, collection: str) -> dict[str, Any] | None:
        try:
            return self.index.item(item_id, collection)
        except RshashError:
            return None


class ShardedIndex(Searcher):
    """Scatter-gather search over index shards held by Ray actors.

    Each shard's files are read here once and shipped through Ray's object store (no node needs
    the driver's path). Actors restart when they or their node die (`max_restarts`), and calls
    in flight are retried on the restarted actor (`max_task_retries`); a shard that does not
    answer within `timeout` seconds fails the query with `ShardUnavailable` naming it, instead
    of hanging. A sharded index is rebuilt, not updated: its generation stays 0.
    """

    def __init__(
        self,
        path: str | Path,
        address: str | None = None,
        timeout: float = 30.0,
        shard_cpus: float = 0.5,
        backend: str = AUTO,
    ) -> None:
        path = Path(path)
        manifest_path = path / SHARDS
        if not manifest_path.is_file():
            raise RshashError(f"{path}: not a sharded index (no {SHARDS})")
        self.names: list[str] = json.loads(manifest_path.read_text())["shards"]
        self.manifests = [json.loads((path / n / "index.json").read_text()) for n in self.names]
        prints = [m["model"]["fingerprint"] for m in self.manifests]
        if len(set(prints)) != 1:
            bad = self.names[next(i for i, p in enumerate(prints) if p != prints[0])]
            first = self.names[0]
            raise RshashError(f"{path / bad}: shard was built with another model than {first}")
        ray = _ray(address)
        actor = ray.remote(_Shard).options(
            num_cpus=shard_cpus,
            max_restarts=-1,
            max_task_retries=-1,
            scheduling_strategy="SPREAD",
        )
        self.path = path
        self.timeout = timeout
        self.manifest = self.manifests[0]
        self.fields = {c: self._union_fields(c) for c in COLLECTIONS}
        self._contents = [ray.put(shard_files(path / name)) for name in self.names]
        self.actors = [
            actor.remote(name, contents, self.fields)
            for name, contents in zip(self.names, self._contents, strict=True)
        ]
        self._ray = ray
        # Starting a shard (a worker process, imports, loading) can take far longer than a search.
        pings = [a.ping.remote() for a in self.actors]
        started = self._gather(pings, "start", timeout=max(self.timeout, START_TIMEOUT))
        self.nodes: dict[str, str] = dict(started)
        self.encoder = CodeEncoder(HashRun.open(path / self.names[0] / "model"), backend=backend)
        for name, manifest in zip(self.names, self.manifests, strict=True):
            check_compatible(encoded_with(manifest), self.encoder.backend, str(path / name))
        self.last_degraded: list[str] = []

    def _union_fields(self, collection: str) -> frozenset[str]:
        """The record fields of `collection` in any shard: from its manifest, or for a shard
        written before manifests listed them, from its records."""
        known: set[str] = set()
        for name, manifest in zip(self.names, self.manifests, strict=True):
            if collection not in manifest["collections"]:
                continue
            if "fields" in manifest:
                known.update(manifest["fields"].get(collection, ()))
                continue
            db = connect(self.path / name, write=False)
            try:
                known |= record_fields(db, collection)
            finally:
                db.close()
        return frozenset(known)

    def _filters(
        self, collection: str, where: str | None, bbox: tuple[float, float, float, float] | None
    ) -> dict[str, Any]:
        """The filter as the shards take it, checked first against the fields of every shard
        (one answer for the union: a shard that lacks a field just matches nothing)."""
        filters: dict[str, Any] = {}
        if where is not None:
            compile_where(where, self.fields.get(collection, frozenset()))
            filters["where"] = where
        if bbox is not None:
            filters["bbox"] = check_bbox(bbox)
        return filters

    def resolve_filter(
        self, collection: str, where: str | None, bbox: tuple[float, float, float, float] | None
    ) -> None:
        """Check the filter, and have every shard resolve it into its cache ahead of the search
        (the keys stay in the shards: the search applies the filter there)."""
        filters = self._filters(collection, where, bbox)
        if filters:
            self._gather([a.prepare.remote(collection, filters) for a in self.actors], "filter")

    @property
    def bits(self) -> int:
        return int(self.manifest["bits"])

    @property
    def generation(self) -> int:
        return 0

    def refresh(self) -> bool:
        return False

    def counts(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for m in self.manifests:
            for name, info in m["collections"].items():
                total[name] = total.get(name, 0) + int(info["count"])
        return total

    def _gather(self, refs: list[Any], what: str, timeout: float | None = None) -> list[Any]:
        """Every shard's answer, or ShardUnavailable naming the shards that gave none in time."""
        ray = self._ray
        limit = self.timeout if timeout is None else timeout
        _, pending = ray.wait(refs, num_returns=len(refs), timeout=limit)
        waiting = set(pending)
        out, missing = [], []
        for name, ref in zip(self.names, refs, strict=True):
            if ref in waiting:
                missing.append(f"{name} (no answer within {limit:g} s)")
                continue
            try:
                out.append(ray.get(ref))
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as exc:
                missing.append(f"{name} ({type(exc).__name__})")
        if missing:
            raise ShardUnavailable(f"{self.path}: {what}: shard {', '.join(missing)} unavailable")
        return out

    def degraded(self, timeout: float = 1.0) -> list[str]:
        """Names of the shards that do not answer a ping within `timeout` seconds.

        Also updates `nodes`: the Ray node id each answering shard runs on.
        """
        refs = [a.ping.remote() for a in self.actors]
        _, pending = self._ray.wait(refs, num_returns=len(refs), timeout=timeout)
        down = []
        for name, ref in zip(self.names, refs, strict=True):
            try:
                if ref in pending:
                    raise TimeoutError
                self.nodes[name] = self._ray.get(ref)[1]
            except (TimeoutError, self._ray.exceptions.RayError):
                down.append(name)
                self.nodes.pop(name, None)
        self.last_degraded = down
        return down

    def search_codes(
        self,
        codes: np.ndarray,
        k: int = 20,
        collection: str = "images",
        radius: int | None = None,
        *,
        where: str | None = None,
        bbox: tuple[float, float, float, float] | None = None,
        allowed: Allowed | None = None,
    ) -> list[list[Hit]]:
        check_query(k, radius, self.bits)
        if allowed is not None:
            raise RshashError(f"{self.path}: shards resolve filters themselves; pass where/bbox")
        filters = self._filters(collection, where, bbox)
        codes = np.ascontiguousarray(codes, np.uint8)
        refs = [a.search.remote(codes, k, collection, radius, filters) for a in self.actors]
        parts = self._gather(refs, "search")
        merged = []
        for q in range(len(codes)):
            hits = sorted((h for part in parts for h in part[q]), key=lambda h: (h[1], h[0]))
            hits = hits if radius is not None else hits[:k]
            merged.append([Hit(key, d, item) for key, d, item in hits])
        return merged

    def item(self, item_id: str, collection: str = "images") -> dict[str, Any]:
        found = self._gather([a.item.remote(item_id, collection) for a in self.actors], "item")
        for it in found:
            if it is not None:
                return dict(it)
        raise RshashError(f"{self.path}: no {collection[:-1]} with id {item_id!r}")
