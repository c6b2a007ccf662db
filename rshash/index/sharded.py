"""Archives beyond one machine, on Ray: bulk encoding into index shards, sharded search.

`ray_build_shards` encodes any image source (a `Dataset`, the `SceneTiles` of many scenes) with
Ray Data (`map_batches` with one model per worker, on CPU or GPU workers; each worker reads its
own images or tile windows) and writes S index shards with global keys. `ShardedIndex` holds each
shard in R replica actors (on R different nodes), scatters a query to one replica of every shard
and merges their top-k by (distance, key), which is exactly the answer of one index over the
union. It is a `CodeIndex` like `Index`: changes go through `cluster.ShardWriter` (each shard
committed, then `shards.json` flipped) and `refresh()` moves the replicas to a new cluster
generation. Both run against a local Ray (`ray.init()`) or a cluster
(`address="ray://head:10001"`).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from rshash.data.source import ImageSource
from rshash.errors import RshashError
from rshash.features.backends import AUTO, check_backend, check_encoded_with, resolve_backend
from rshash.index.base import Allowed, BBox, Hit, Queries, check_query, filter_args
from rshash.index.build import (
    BuildConfig,
    _batch,
    _job_dir,
    _saved,
    caption_records,
    check_extra_fields,
    encode_archive,
    image_record,
    image_records,
    prepare_build,
    source_entry,
)
from rshash.index.cluster import (
    SHARDS,
    ShardWriter,
    check_cluster,
    count_of,
    read_cluster,
    snapshot,
    write_cluster,
)
from rshash.index.encoder import CodeEncoder
from rshash.index.engines import Hits
from rshash.index.filters import check_bbox, compile_where
from rshash.index.index import Index, encoded_with
from rshash.index.packing import empty_codes
from rshash.index.records import Records, copy_record, record_fields
from rshash.index.store import COLLECTIONS, LOCK_TIMEOUT_S, connect, read_manifest
from rshash.models.run import HashRun
from rshash.reproducibility import resolve_device

START_TIMEOUT = 300.0  # seconds for every shard actor to come up
# Seconds a shard has for one of its replicas to answer a health ping: generous, since an
# overloaded machine delays a healthy replica's answer by seconds, and a slow /healthz only
# costs time when a shard is really down (answers from up shards end the wait).
HEALTH_TIMEOUT = 5.0
HEALTH_GRACE = 0.2  # seconds the other replicas get once every shard has answered
# A call not answered within HEDGE_FACTOR × the recent typical call time (at least HEDGE_MIN_S,
# at most timeout / (replicas + 1)) is asked of the next replica too: a replica whose node just
# died hangs until Ray declares it dead (seconds), and every query sent to it would wait as long.
HEDGE_FACTOR = 4.0
HEDGE_MIN_S = 0.25
SUSPECT_S = 2.0  # a replica that failed or was hedged past is asked last for this long
KEEP_GENERATIONS = 2  # shard generations a replica holds: the current and the one before

__all__ = [
    "SHARDS",
    "ShardUnavailable",
    "ShardedIndex",
    "build_sharded",
    "ray_build_shards",
    "ray_encode_images",
]


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
    names = [p.name for p in paths]
    write_cluster(out, names, {n: read_manifest(out / n) for n in names}, generation=0)
    return paths


def build_sharded(
    run_dir: str | Path,
    ds: ImageSource,
    out: str | Path,
    shards: int,
    cfg: BuildConfig | None = None,
    features: str | Path | None = None,
    extra: dict[str, dict[str, Any]] | None = None,
    progress: bool = True,
    ray_address: str | None = None,
    ray_workers: int = 2,
) -> Path:
    """The local build's streaming, resumable encoding (`build.encode_archive`, `--fields`,
    scene tiles), written into `shards` index shards with global keys and a `shards.json`.

    With `ray_address`, the images are encoded by `ray_workers` Ray Data workers (each node
    reads its images: shared storage), batch by batch into the same saved batches, so a killed
    build resumes from the batches saved, with or without Ray. Writing the shards (fast) is
    redone from the saved batches when a build died in it: nothing is published before
    `shards.json`.
    """
    cfg = cfg or BuildConfig()
    check_extra_fields(extra or {})
    out = Path(out)
    if not 1 <= shards <= MAX_SHARDS:
        raise RshashError(f"--shards: expected 1 to {MAX_SHARDS}, got {shards}")
    if (out / SHARDS).exists() or (out / "index.json").exists():
        raise RshashError(f"{out}: an index already exists here (use `rshash index add`)")
    encoder, store, key = prepare_build(run_dir, ds, cfg, features)
    with _job_dir(out.with_name(out.name + ".partial"), key) as work:
        if ray_address is not None and store is None:
            _ray_encode_batches(run_dir, ds, work, cfg, encoder.backend, ray_address, ray_workers)
        encode_archive(encoder, ds, work, cfg, store, progress)  # captions, images left
        _write_shards(run_dir, ds, work, out, shards, cfg, extra, encoder.backend)
    return out


MAX_SHARDS = 1024


def _ray_encode_batches(
    run_dir: str | Path,
    ds: ImageSource,
    work: Path,
    cfg: BuildConfig,
    backend: str,
    address: str,
    workers: int,
) -> None:
    """Encode the image batches not saved yet on Ray Data; each saved once all its rows came."""
    ray = _ray(address)
    ranges = [
        (b, lo, min(lo + cfg.image_batch, len(ds)))
        for b, lo in enumerate(range(0, len(ds), cfg.image_batch))
    ]
    todo = [(b, lo, hi) for b, lo, hi in ranges if not (work / f"images-{b:06d}.npy").exists()]
    if not todo:
        return
    rows = [{"row": i} for _, lo, hi in todo for i in range(lo, hi)]
    encoded = ray.data.from_items(
        rows, override_num_blocks=max(1, min(len(rows), workers * 4))
    ).map_batches(
        EncodeImages,
        fn_constructor_args=(str(run_dir), cfg.device, ds, backend),
        batch_size=cfg.image_batch,
        batch_format="numpy",
        concurrency=workers,
    )
    codes = empty_codes(len(ds), HashRun.open(run_dir).bits)
    left = {b: hi - lo for b, lo, hi in todo}
    batch_of = {i: b for b, lo, hi in todo for i in range(lo, hi)}
    bounds = {b: (lo, hi) for b, lo, hi in todo}
    for part in encoded.iter_batches(batch_format="numpy", batch_size=None):
        codes[part["row"]] = part["codes"]
        for i in part["row"].tolist():
            b = batch_of[i]
            left[b] -= 1
            if not left[b]:
                lo, hi = bounds[b]
                _saved(work, "images", b, partial(np.array, codes[lo:hi]))


def _write_shards(
    run_dir: str | Path,
    ds: ImageSource,
    work: Path,
    out: Path,
    shards: int,
    cfg: BuildConfig,
    extra: dict[str, dict[str, Any]] | None,
    backend: str,
) -> None:
    """Shards s = 0..S-1 of the saved batches: images [s·n/S, (s+1)·n/S) with their captions,
    keys global; then `shards.json` (what a build killed here left is redone)."""
    for stale in out.glob("shard-*"):
        shutil.rmtree(stale)
    n = len(ds)
    cap_start = np.concatenate([[0], np.cumsum([len(c) for c in ds.captions])]).astype(int)
    image_codes = _concat(work, "images", len(range(0, n, cfg.image_batch)))
    n_caps = int(cap_start[-1])
    caption_codes = _concat(work, "captions", len(range(0, n_caps, cfg.text_batch)))
    captions = caption_records(ds)
    names = []
    for s in range(shards):
        lo, hi = s * n // shards, (s + 1) * n // shards
        shard = Index.create(
            out / f"shard-{s:03d}",
            run_dir,
            cfg.engine,
            cfg.engine_params,
            cfg.device,
            cfg.lock_timeout_s,
            backend,
        )
        for start in range(lo, hi, cfg.image_batch):
            stop = min(start + cfg.image_batch, hi)
            records = [image_record(ds, i, extra) for i in range(start, stop)]
            shard.add("images", image_codes[start:stop], records, first_key=start)
        a, b = int(cap_start[lo]), int(cap_start[hi])
        for start in range(a, b, cfg.text_batch):
            stop = min(start + cfg.text_batch, b)
            shard.add("captions", caption_codes[start:stop], captions[start:stop], first_key=start)
        shard.commit(source_entry(ds, rows=[lo, hi], images=hi - lo, backend=backend))
        names.append(shard.path.name)
    write_cluster(out, names, {n: read_manifest(out / n) for n in names}, generation=0)


def _concat(work: Path, prefix: str, batches: int) -> np.ndarray:
    parts = [_batch(work, prefix, b) for b in range(batches)]
    return np.concatenate(parts) if parts else np.empty((0, 0), np.uint8)


def _records_call(replica: Any, generation: int, collection: str, keys: list[int]) -> Any:
    return replica.records.remote(generation, collection, keys)


Packed = tuple[np.ndarray, ...]


def pack_found(found: list[Hits]) -> Packed:
    """Hits of many queries as three arrays (distances, keys, hits per query): Ray moves a few
    arrays much faster than two per query (0.6 ms less CPU per call of 16 queries)."""
    counts = np.array([len(keys) for _, keys in found], np.int64)
    if not len(found):
        return np.zeros(0, np.int32), np.zeros(0, np.int64), counts
    return np.concatenate([d for d, _ in found]), np.concatenate([k for _, k in found]), counts


def merge_found(parts: list[Packed], k: int | None) -> Packed:
    """The hits of a batch of queries from every shard (each part as `pack_found` gives it),
    merged: per query ordered by (distance, key) as every engine orders them, the first `k`
    (all with None); as (distances, keys, shard position of each hit) and hits per query."""
    nq = len(parts[0][2])
    d = np.concatenate([p[0] for p in parts]).astype(np.int32)
    keys = np.concatenate([p[1] for p in parts]).astype(np.int64)
    query = np.concatenate([np.repeat(np.arange(nq), p[2]) for p in parts])
    shard = np.concatenate([np.full(len(p[1]), i) for i, p in enumerate(parts)])
    order = np.lexsort((keys, d, query))
    d, keys, query, shard = d[order], keys[order], query[order], shard[order]
    counts = np.bincount(query, minlength=nq)
    if k is not None:
        rank = np.arange(len(query)) - np.repeat(np.cumsum(counts) - counts, counts)
        keep = rank < k
        d, keys, shard, counts = d[keep], keys[keep], shard[keep], np.minimum(counts, k)
    return d, keys, shard, counts


class ShardUnavailable(RshashError):
    """No replica of a shard answered in time (the service answers 503 naming it)."""


class ShardBehind(RshashError):
    """A replica (restarted, say) does not hold the shard generation asked for."""


class _Shard:
    """Ray actor body: one shard, at the last few generations it was given, answering searches.

    The shard's files come through Ray's object store, so the actor runs (and restarts) on any
    node: it writes each generation to a private temporary folder that lives as long as it is
    held (the index reads its records from SQLite there). Every call names the generation it
    is for, so the shards of one query answer from one cluster generation.
    """

    def __init__(self, name: str, generation: int, contents: Any) -> None:
        import numba
        import ray

        self.name = name
        self._held: dict[int, tuple[tempfile.TemporaryDirectory[str], Index]] = {}
        # The search kernels' threads: as many as the CPUs Ray gave this replica (at least
        # one). More only contend for them, with the other replicas on the node, and an idle
        # OpenMP thread spins: with numba's default of one per core, every replica burned
        # milliseconds of CPU after each tiny search.
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
        numba.set_num_threads(max(1, min(int(cpus), numba.get_num_threads())))
        self.load(generation, contents)

    def load(self, generation: int, contents: Any) -> None:
        """Hold `generation` of the shard, from its files; drop all but the newest two."""
        if generation in self._held:
            return
        folder = tempfile.TemporaryDirectory(prefix=f"rshash-{self.name}-{generation}-")
        for rel, data in contents.items():
            target = Path(folder.name) / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        built = encoded_with(json.loads((Path(folder.name) / "index.json").read_text()))
        index = Index.open(folder.name, device="cpu", backend=built, model=False)
        probe = empty_codes(1, index.bits)
        for name, col in index.collections.items():  # compile the search kernels now
            if len(col):
                index.search_codes(probe, min(2, len(col)), name)  # top-k of k > 1
                index.search_codes(probe, 1, name, radius=0)
        self._held[generation] = (folder, index)
        for old in sorted(self._held)[:-KEEP_GENERATIONS]:
            self._held.pop(old)[0].cleanup()

    def _at(self, generation: int) -> Index:
        held = self._held.get(generation)
        if held is None:
            raise ShardBehind(f"{self.name}: generation {generation} not loaded here")
        return held[1]

    def ping(self) -> tuple[str, str]:
        """The shard's name and the id of the Ray node it runs on."""
        import ray

        return self.name, ray.get_runtime_context().get_node_id()

    def search(
        self,
        generation: int,
        codes: np.ndarray,
        k: int,
        collection: str,
        radius: int | None,
        filters: dict[str, Any],
        fields: dict[str, frozenset[str]] | None = None,
    ) -> Packed:
        """Each query's hits in this shard as (distances, keys) in three arrays (see
        `pack_found`): no records (the caller reads those of the merged top k only), a few
        bytes per hit through Ray. A filter comes with the fields of every shard (see
        `_Shard.filtering`)."""
        index = self.filtering(self._at(generation), fields)
        if collection not in index.collections:
            return pack_found([(np.zeros(0, np.int32), np.zeros(0, np.int64)) for _ in codes])
        return pack_found(index.search_found(codes, k, collection, radius, **filters))

    def records(self, generation: int, collection: str, keys: list[int]) -> dict[int, Any]:
        """Records by key, from the shard generation held here."""
        return self._at(generation).records.by_keys(collection, keys)

    @staticmethod
    def filtering(index: Index, fields: dict[str, frozenset[str]] | None) -> Index:
        """`index`, knowing the fields of the cluster generation a filter is checked against
        (they come with every filter, not with a loaded generation: a change to another shard
        may add fields that this shard, unchanged and not reloaded, matches nothing for)."""
        if fields is not None:
            index.shared_fields = fields
        return index

    def prepare(
        self,
        generation: int,
        collection: str,
        filters: dict[str, Any],
        fields: dict[str, frozenset[str]] | None = None,
    ) -> None:
        """Resolve a filter into the shard's cache of matching keys, ahead of its searches."""
        index = self.filtering(self._at(generation), fields)
        if collection in index.collections:
            index.matching_keys(collection, **filters)

    def item(self, generation: int, item_id: str, collection: str) -> dict[str, Any] | None:
        try:
            return self._at(generation).item(item_id, collection)
        except ShardBehind:
            raise
        except RshashError:
            return None

    def items(self, generation: int, collection: str) -> list[tuple[int, dict[str, Any]]]:
        """(key, record) of every live item, in key order."""
        index = self._at(generation)
        if collection not in index.collections:
            return []
        keys = index.collections[collection].keys.tolist()
        return list(zip(keys, index.items(collection), strict=True))


class _Loading(threading.Thread):
    """A refresh in progress: the replicas loading a new cluster generation's shards, then
    queries switching to it (at once, not at the next look for a new generation)."""

    def __init__(self, index: ShardedIndex, view: _View) -> None:
        super().__init__(name="rshash-shard-refresh", daemon=True)
        self.index, self.view = index, view
        self.error: Exception | None = None
        self.switched = False

    def run(self) -> None:
        try:
            self.index._load(self.view)
            self.switched = self.index._switch(self.view)
        except Exception as exc:  # handed to the next refresh() call
            self.error = exc


@dataclass(frozen=True)
class _View:
    """One cluster generation as the queries see it: each shard's generation and manifest."""

    generation: int
    names: list[str]
    committed: dict[str, dict[str, Any]]
    fields: dict[str, frozenset[str]]

    def shard_generation(self, name: str) -> int:
        return int(self.committed[name]["generation"])


class ShardedIndex(Queries):
    """Scatter-gather search over index shards, each held by `replicas` Ray actors.

    Each shard's files are read here and shipped through Ray's object store (no node needs the
    driver's path). Replicas of a shard run on different nodes (a STRICT_SPREAD placement
    group); a query goes to the next replica of each shard in turn, and to another replica when
    one fails or is slow (HEDGE_FACTOR × the typical call time, between HEDGE_MIN_S and
    `timeout` / (replicas + 1) seconds), so a lost node costs no query while another replica
    lives; replicas that failed or lagged are asked last for SUSPECT_S. Replicas return keys
    and distances; the merged top k's records are read from the shard directories here. With
    one replica, actors restart when they or their node die, calls in flight are retried on
    the restarted actor, and a shard that does not answer within `timeout` seconds fails the
    query with `ShardUnavailable` naming it.
    Actors start at the first search, so opening one to change it (`add`, `remove`, `compact`:
    see `cluster.ShardWriter`, run where the shard directories are) needs no Ray.
    """

    def __init__(
        self,
        path: str | Path,
        address: str | None = None,
        timeout: float = 30.0,
        shard_cpus: float = 0.5,
        backend: str = AUTO,
        device: str = "auto",
        replicas: int = 1,
        lock_timeout_s: float = LOCK_TIMEOUT_S,
    ) -> None:
        path = Path(path)
        if replicas < 1:
            raise RshashError(f"--replicas: expected at least 1, got {replicas}")
        cluster = read_cluster(path)
        self.path = path
        self.address = address
        self.timeout = timeout
        self.shard_cpus = shard_cpus
        self.replicas = replicas
        self.lock_timeout_s = lock_timeout_s
        prints = [cluster["committed"][n]["model"]["fingerprint"] for n in cluster["shards"]]
        if len(set(prints)) != 1:
            bad = cluster["shards"][next(i for i, p in enumerate(prints) if p != prints[0])]
            first = cluster["shards"][0]
            raise RshashError(f"{path / bad}: shard was built with another model than {first}")
        self._view = self._view_of(cluster)
        # Hits' records are read here, from the shard directories, for the merged top k only.
        self._records = {n: Records.reading(path / n) for n in self._view.names}
        first = self._view.names[0]
        self.encoder = CodeEncoder(HashRun.open(path / first / "model"), device, backend)
        for name in self._view.names:
            manifest = self._view.committed[name]
            check_encoded_with(encoded_with(manifest), str(path / name))
        self._actors: dict[str, list[Any]] = {}
        # The shards' files in Ray's object store, held here: each shard's current generation,
        # and the one its replicas were created with (Ray rebuilds a restarted actor from it).
        self._contents: dict[str, tuple[int, Any]] = {}
        self._first_contents: dict[str, Any] = {}
        self._turn = itertools.count()
        self._typical_s = HEDGE_MIN_S  # moving average of a scatter's time, for the hedge delay
        self._suspect: dict[tuple[str, int], float] = {}  # (shard, replica): asked last until
        self._start_lock = threading.Lock()
        self._writer: ShardWriter | None = None
        self._refresh_lock = threading.Lock()
        self._loading: _Loading | None = None
        self._ray: Any = None
        self.nodes: dict[str, list[str]] = {}
        self.last_degraded: list[str] = []

    # --- what readers see -----------------------------------------------------------------

    def _view_of(self, cluster: dict[str, Any]) -> _View:
        names = list(cluster["shards"])
        committed = dict(cluster["committed"])
        fields = {c: self._union_fields(names, committed, c) for c in COLLECTIONS}
        return _View(int(cluster["generation"]), names, committed, fields)

    def _union_fields(
        self, names: list[str], committed: dict[str, Any], collection: str
    ) -> frozenset[str]:
        """The record fields of `collection` in any shard: from its manifest, or for a shard
        written before manifests listed them, from its records."""
        known: set[str] = set()
        for name in names:
            manifest = committed[name]
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

    @property
    def names(self) -> list[str]:
        return list(self._view.names)

    def fields(self, collection: str = "images") -> frozenset[str]:
        """The record fields of a collection in any shard (what a `where` filter may name)."""
        return self._view.fields.get(collection, frozenset())

    @property
    def manifests(self) -> list[dict[str, Any]]:
        return [self._view.committed[n] for n in self._view.names]

    @property
    def manifest(self) -> dict[str, Any]:
        """The archive's manifest: format, bits, engine and model of the shards, the cluster
        generation, per collection the sums over the shards (segments listed together)."""
        collections: dict[str, dict[str, Any]] = {}
        for m in self.manifests:
            for name, info in m["collections"].items():
                into = collections.setdefault(
                    name,
                    {"count": 0, "tombstones": 0, "segments": [], "report": info.get("report", {})},
                )
                into["count"] += int(info["count"])
                into["tombstones"] += int(info["tombstones"])
                into["segments"] = [*into["segments"], *info["segments"]]
        return {
            **self.manifests[0],
            "generation": self._view.generation,
            "collections": collections,
        }

    @property
    def bits(self) -> int:
        return int(self.manifests[0]["bits"])

    @property
    def generation(self) -> int:
        return self._view.generation

    def counts(self) -> dict[str, int]:
        return count_of(self.manifests)

    def sources(self) -> list[dict[str, Any]]:
        return [s for m in self.manifests for s in m.get("sources", [])]

    def check(self) -> dict[str, dict[str, int]]:
        return check_cluster(self.path)

    # --- the actors -----------------------------------------------------------------------

    def _started(self) -> dict[str, list[Any]]:
        """The replicas of every shard, started at the first call that needs them."""
        with self._start_lock:
            if not self._actors:
                self._start()
        return self._actors

    def _start(self) -> None:
        ray = self._ray = _ray(self.address)
        view = self._view
        alive = sum(1 for n in ray.nodes() if n.get("Alive"))
        if self.replicas > 1 and alive < self.replicas:
            raise RshashError(
                f"--replicas {self.replicas}: needs as many Ray nodes, the cluster has {alive}"
            )
        actors: dict[str, list[Any]] = {}
        for name in view.names:
            contents = ray.put(snapshot(self.path / name, view.committed[name]))
            self._contents[name] = (view.shard_generation(name), contents)
            self._first_contents[name] = contents  # a restarting replica is built from it
            actors[name] = [
                self._actor(name, i).remote(name, view.shard_generation(name), contents)
                for i in range(self.replicas)
            ]
        pings = {name: [a.ping.remote() for a in reps] for name, reps in actors.items()}
        for name, refs in pings.items():
            self._gather_all(refs, name, "start", max(self.timeout, START_TIMEOUT))
        self._actors = actors
        self.nodes = {n: [ray.get(r)[1] for r in refs] for n, refs in pings.items()}

    def _actor(self, name: str, replica: int) -> Any:
        """The actor class for one replica: with one, spread and retried in place; with more,
        one bundle each of a STRICT_SPREAD placement group (different nodes)."""
        ray = self._ray
        options: dict[str, Any] = {"num_cpus": self.shard_cpus, "max_restarts": -1}
        if self.replicas == 1:
            options.update(max_task_retries=-1, scheduling_strategy="SPREAD")
        else:
            from ray.util.placement_group import placement_group
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            if replica == 0:
                bundles = [{"CPU": self.shard_cpus}] * self.replicas
                self._group = placement_group(bundles, strategy="STRICT_SPREAD")
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                self._group, placement_group_bundle_index=replica
            )
        return ray.remote(_Shard).options(**options)

    def _gather_all(self, refs: list[Any], name: str, what: str, timeout: float) -> None:
        ray = self._ray
        _, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout)
        if pending:
            raise ShardUnavailable(
                f"{self.path}: {what}: shard {name} (no answer within {timeout:g} s) unavailable"
            )
        ray.get(refs)

    def _scatter(
        self,
        view: _View,
        what: str,
        call: Callable[[Any, int], Any],
        names: list[str] | None = None,
    ) -> list[Any]:
        """Every shard's (or those of `names`) answer to `call(replica, shard generation)`,
        from one replica each: the next in turn (replicas that lately failed or lagged last),
        another when one fails or is slow; ShardUnavailable naming the shards with no answer
        within the timeout."""
        actors = self._started()
        ray = self._ray
        names, count = names or view.names, self.replicas
        turn = next(self._turn)
        now = time.monotonic()
        suspect = {key for key, until in self._suspect.items() if until > now}
        rotated = [(turn + j) % count for j in range(count)]
        order = {  # in turn, suspects last
            name: [i for i in rotated if (name, i) not in suspect]
            + [i for i in rotated if (name, i) in suspect]
            for name in names
        }
        tried = dict.fromkeys(names, 0)
        outstanding: dict[Any, tuple[str, int]] = {}
        results: dict[str, Any] = {}
        failed: dict[str, str] = {}

        def launch(name: str) -> None:
            replica = order[name][tried[name]]
            tried[name] += 1
            ref = call(actors[name][replica], view.shard_generation(name))
            outstanding[ref] = (name, replica)

        for name in names:
            launch(name)
        start = time.monotonic()
        hedge = min(self.timeout / (count + 1), max(HEDGE_MIN_S, HEDGE_FACTOR * self._typical_s))
        next_hedge, hedged = start + hedge, False
        while outstanding and len(results) < len(names):
            until = start + self.timeout
            if count > 1:
                until = min(until, next_hedge)
            left = max(0.0, until - time.monotonic())
            ready, _ = ray.wait(list(outstanding), num_returns=1, timeout=left)
            if not ready:
                if time.monotonic() >= start + self.timeout:
                    break
                hedged = True
                for late, replica in outstanding.values():  # slow: ask the next replica too
                    if late not in results:
                        self._suspect[(late, replica)] = time.monotonic() + SUSPECT_S
                for name in names:
                    if name not in results and tried[name] < count:
                        launch(name)
                next_hedge += hedge
                continue
            name, replica = outstanding.pop(ready[0])
            try:
                answer = ray.get(ready[0])
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as exc:
                self._suspect[(name, replica)] = time.monotonic() + SUSPECT_S
                failed.setdefault(name, type(exc).__name__)
                if name not in results and tried[name] < count:
                    launch(name)
                continue
            except ShardBehind as exc:
                failed.setdefault(name, str(exc))
                self._reload(name, view)
                if name not in results and tried[name] < count:
                    launch(name)
                continue
            self._suspect.pop((name, replica), None)
            results.setdefault(name, answer)
        missing = []
        for name in names:
            if name not in results:
                why = failed.get(name) or f"no answer within {self.timeout:g} s"
                missing.append(f"{name} ({why})")
        if missing:
            raise ShardUnavailable(f"{self.path}: {what}: shard {', '.join(missing)} unavailable")
        if not hedged:
            self._typical_s += 0.05 * (time.monotonic() - start - self._typical_s)
        return [results[n] for n in names]

    def _reload(self, name: str, view: _View) -> None:
        """Give every replica of `name` the view's generation (a restarted one lacks it)."""
        generation, contents = self._contents[name]
        if view is not self._view or generation != view.shard_generation(name):
            return  # a query of a generation since replaced: nothing to do
        for replica in self._actors[name]:
            replica.load.remote(generation, contents)

    def refresh(self) -> bool:
        """Move to the newest cluster generation; True once switched.

        The changed shards' files are shipped to and loaded by their replicas in a thread of
        their own (seconds for a large shard), so the caller (the service's batch thread) is
        never held up: calls return False until the replicas hold it, then queries switch at
        once (those running finish on the old generation).
        """
        with self._refresh_lock:
            loading = self._loading
            if loading is not None:
                if loading.is_alive():
                    return False
                self._loading = None
                if loading.error is not None:
                    raise loading.error
                return loading.switched
            cluster = read_cluster(self.path)
            if int(cluster["generation"]) == self._view.generation:
                return False
            view = self._view_of(cluster)
            if not self._actors:
                self._view = view
                return True
            self._loading = _Loading(self, view)
            self._loading.start()
            return False

    def _switch(self, view: _View) -> bool:
        """Queries from now on see `view` (unless a newer one is already seen)."""
        with self._refresh_lock:
            if view.generation <= self._view.generation:
                return False
            self._view = view
            return True

    def _refresh_now(self) -> None:
        """Switch to the newest generation before returning (after this index's own change)."""
        while not self.refresh() and self._loading is not None:
            self._loading.join()

    def _load(self, view: _View) -> None:
        """Have the replicas of every shard that changed load its generation in `view`."""
        for name in view.names:
            if view.shard_generation(name) == self._view.shard_generation(name):
                continue
            contents = self._ray.put(snapshot(self.path / name, view.committed[name]))
            refs = [
                a.load.remote(view.shard_generation(name), contents) for a in self._actors[name]
            ]
            ready, _ = self._ray.wait(refs, num_returns=1, timeout=START_TIMEOUT)
            if not ready:
                raise ShardUnavailable(f"{self.path}: refresh: no replica of {name} loaded")
            self._ray.get(ready[0])  # a replica that failed to load reloads when asked
            self._contents[name] = (view.shard_generation(name), contents)

    def health(self) -> dict[str, Any]:
        """Shards (`degraded`: those with no replica answering a ping within a second) and the
        Ray nodes their replicas run on."""
        self._started()
        down = self.degraded(HEALTH_TIMEOUT)
        body: dict[str, Any] = {
            "shards": len(self._view.names),
            "replicas": self.replicas,
            "shard_nodes": {n: nodes[0] for n, nodes in self.nodes.items() if nodes},
            "replica_nodes": {n: list(nodes) for n, nodes in self.nodes.items()},
        }
        if down:
            body["degraded"] = down
        return body

    def degraded(self, timeout: float = HEALTH_TIMEOUT) -> list[str]:
        """Names of the shards of which no replica answers a ping within `timeout` seconds.

        Also updates `nodes`: the Ray node ids the answering replicas run on. Returns once
        every shard has an answer (and HEALTH_GRACE more for the other replicas) or at the
        timeout.
        """
        actors = self._started()
        ray = self._ray
        owner = {a.ping.remote(): name for name, reps in actors.items() for a in reps}
        nodes: dict[str, list[str]] = {name: [] for name in actors}
        pending = list(owner)
        deadline = time.monotonic() + timeout
        while pending:
            if all(nodes.values()):
                deadline = min(deadline, time.monotonic() + HEALTH_GRACE)
            left = deadline - time.monotonic()
            if left <= 0:
                break
            ready, pending = ray.wait(pending, num_returns=1, timeout=left)
            for ref in ready:
                with contextlib.suppress(ray.exceptions.RayError):
                    nodes[owner[ref]].append(ray.get(ref)[1])
        self.nodes.update(nodes)
        down = [name for name, found in nodes.items() if not found]
        self.last_degraded = down
        return down

    # --- searching ------------------------------------------------------------------------

    def _filters(
        self, view: _View, collection: str, where: str | None, bbox: BBox | None
    ) -> dict[str, Any]:
        """The filter as the shards take it, checked first against the fields of every shard
        (one answer for the union: a shard that lacks a field just matches nothing)."""
        if where is not None:
            compile_where(where, view.fields.get(collection, frozenset()))
        return filter_args(where, check_bbox(bbox) if bbox is not None else None)

    def resolve_filter(self, collection: str, where: str | None, bbox: BBox | None) -> None:
        """Check the filter, and have one replica of every shard resolve it into its cache
        ahead of the search (the keys stay in the shards: the search applies the filter)."""
        view = self._view
        filters = self._filters(view, collection, where, bbox)
        fields = view.fields if where is not None else None
        if filters:
            self._scatter(
                view, "filter", lambda a, g: a.prepare.remote(g, collection, filters, fields)
            )

    def search_codes(
        self,
        codes: np.ndarray,
        k: int = 20,
        collection: str = "images",
        radius: int | None = None,
        *,
        where: str | None = None,
        bbox: BBox | None = None,
        allowed: Allowed | None = None,
    ) -> list[list[Hit]]:
        check_query(k, radius, self.bits)
        if allowed is not None:
            raise RshashError(f"{self.path}: shards resolve filters themselves; pass where/bbox")
        view = self._view
        filters = self._filters(view, collection, where, bbox)
        fields = view.fields if where is not None else None
        codes = np.ascontiguousarray(codes, np.uint8)
        parts = self._scatter(
            view,
            "search",
            lambda a, g: a.search.remote(g, codes, k, collection, radius, filters, fields),
        )
        d, keys, shard, counts = merge_found(parts, None if radius is not None else k)
        records = self._hit_records(view, collection, keys, shard)
        rows = list(zip(d.tolist(), keys.tolist(), shard.tolist(), strict=True))
        ends = np.cumsum(counts).tolist()
        return [
            [
                Hit(key, dist, copy_record(records[s][key]))
                for dist, key, s in rows[a:b]
                if key in records[s]  # as a local index: a hit without a record is left out
            ]
            for a, b in zip([0, *ends[:-1]], ends, strict=True)
        ]

    def _hit_records(
        self, view: _View, collection: str, keys: np.ndarray, shard: np.ndarray
    ) -> list[dict[int, dict[str, Any]]]:
        """Per shard (by position in the view), the records of its keys among the hits: read
        from its directory; a record gone from there (compacted since this view's generation)
        comes from a replica, which holds the generation."""
        found = []
        for s, name in enumerate(view.names):
            wanted = np.unique(keys[shard == s]).tolist()
            records = self._records[name].by_keys(collection, wanted)
            gone = [key for key in wanted if key not in records]
            if gone:
                ask = partial(_records_call, collection=collection, keys=gone)
                [held] = self._scatter(view, "records", ask, [name])
                records = {**records, **held}
            found.append(records)
        return found

    def item(self, item_id: str, collection: str = "images") -> dict[str, Any]:
        view = self._view
        for name in view.names:
            try:
                return self._records[name].item(item_id, collection, view.shard_generation(name))
            except RshashError:
                continue
        found = self._scatter(view, "item", lambda a, g: a.item.remote(g, item_id, collection))
        for it in found:
            if it is not None:
                return dict(it)
        raise RshashError(f"{self.path}: no {collection[:-1]} with id {item_id!r}")

    def items(self, collection: str = "images") -> list[dict[str, Any]]:
        """Every live record of a collection, in key order (for tests and small archives)."""
        view = self._view
        parts = self._scatter(view, "items", lambda a, g: a.items.remote(g, collection))
        return [
            rec for _, rec in sorted((kr for part in parts for kr in part), key=lambda kr: kr[0])
        ]

    # --- changing (where the shard directories are; see cluster.ShardWriter) ----------------

    def _writing(self) -> ShardWriter:
        if self._writer is None:
            self._writer = ShardWriter(self.path, self.lock_timeout_s)
        return self._writer

    def check_new_ids(self, collection: str, items: list[dict[str, Any]]) -> None:
        self._writing().check_new_ids(collection, items)

    def add(self, collection: str, codes: np.ndarray, items: list[dict[str, Any]]) -> np.ndarray:
        return self._writing().add(collection, codes, items)

    def remove(self, ids: Any) -> int:
        return self._writing().remove(list(ids))

    def commit(self, source: dict[str, Any] | None = None) -> None:
        self._writing().commit(source)
        self._refresh_now()

    def compact(self) -> dict[str, int]:
        dropped = self._writing().compact()
        self._refresh_now()
        return dropped

    def close(self) -> None:
        """Drop uncommitted changes and release the writer lock (the actors stay up)."""
        if self._writer is not None:
            self._writer.close()
