"""Encode an archive into an index in two streamed passes: batched, with progress, resumable.

The archive is any image source (`ImageSource`: `rshash.data.Dataset`, or the scene tiles of a
GeoTIFF). First every batch of images goes through the run's image encoder (plain view) and
image hash network, and captions, when the archive has them, through the text side; each
batch's codes are saved in `INDEX.partial/<job>/`, so a killed build resumes at the first
missing batch. This takes no lock: other writers (`index remove`, another `index add`) go on
meanwhile. Then, under the writer lock, the saved batches go into the index one at a time with
their records (memory stays flat however large the archive) and the index is committed.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from tqdm import tqdm

from rshash.data.source import ImageSource
from rshash.errors import RshashError
from rshash.features.backends import AUTO, check_encoded_with
from rshash.features.store import FeatureStore
from rshash.fileio import atomic_path
from rshash.index.base import CodeIndex
from rshash.index.encoder import CodeEncoder
from rshash.index.engines import make_engine
from rshash.index.index import Index, model_fingerprint
from rshash.index.packing import pack_codes
from rshash.index.store import LOCK_TIMEOUT_S, MANIFEST
from rshash.models.run import HashRun

T = TypeVar("T")
JOB_LOCK = "job.lock"  # held by the process encoding into a job folder
PREFETCH = 2  # image batches decoded ahead of the one being encoded


@dataclass(frozen=True)
class BuildConfig:
    engine: str = "exact"
    engine_params: dict[str, Any] = field(default_factory=dict)
    image_batch: int = 32
    text_batch: int = 256
    workers: int = 4  # threads decoding and resizing images ahead of the encoder
    device: str = "auto"
    backend: str = AUTO  # inference backend (see rshash.features.backends)
    lock_timeout_s: float = LOCK_TIMEOUT_S  # longest wait for another writer's lock


# Record fields that name files, pixels or places: set by the archive's reader, never by
# `--fields` (the service reads pixels from `path`, `window` and `bands`; filters trust the rest).
RESERVED_FIELDS = frozenset(
    {
        "id", "image", "path", "captions", "text", "dataset", "scene", "window", "bands",
        "stretch", "crs", "footprint", "footprint_wgs84", "bounds_wgs84", "resolution_m",
        "stac_item", "asset_href", "time_start", "time_end",
    }
)  # fmt: skip


def source_entry(ds: ImageSource, **extra: Any) -> dict[str, Any]:
    """The manifest's record of an archive added to an index: its name, the path given, and the
    resolved folder its files lie under (the service serves files from there only)."""
    given = Path(ds.source).resolve()
    # a STAC catalog's `root` holds it and its assets; anything else lies under its own folder
    root = Path(getattr(ds, "root", None) or (given if given.is_dir() else given.parent))
    return {"dataset": ds.name, "path": str(ds.source), "root": str(root), **extra}


def image_record(
    ds: ImageSource, i: int, extra: dict[str, dict[str, Any]] | None = None
) -> dict[str, Any]:
    """The source's record of image i, with the user's fields for it."""
    rec = ds.image_record(i)
    rec.update((extra or {}).get(rec["id"], {}))
    return rec


def image_records(ds: ImageSource, extra: dict[str, dict[str, Any]] | None = None) -> list[dict]:
    """One record per image: id, path, captions, class (when known), and any user fields."""
    return [image_record(ds, i, extra) for i in range(len(ds))]


def _caption_rows(ds: ImageSource) -> Iterator[dict[str, Any]]:
    """Caption records in order, image by image."""
    for i, caps in enumerate(ds.captions):
        if not caps:
            continue
        image_id, cls = ds.image_ids[i], ds.image_record(i).get("class")
        for j, text in enumerate(caps):
            yield {"id": f"{image_id}#{j}", "image": image_id, "text": text, "class": cls}


def caption_records(ds: ImageSource) -> list[dict]:
    return list(_caption_rows(ds))


def _batches(items: Iterator[T], size: int) -> Iterator[list[T]]:
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _saved(work: Path, prefix: str, b: int, encode: Callable[[], np.ndarray]) -> None:
    """Encode batch b into `work/PREFIX-b.npy` unless a previous run saved it there."""
    path = work / f"{prefix}-{b:06d}.npy"
    if path.exists():
        return
    codes = encode()
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, codes)


def _batch(work: Path, prefix: str, b: int) -> np.ndarray:
    return np.load(work / f"{prefix}-{b:06d}.npy")


@contextmanager
def _job_dir(root: Path, key: str) -> Iterator[Path]:
    """This job's folder of saved batches, `root/KEY`, held (flock) while the job runs.

    Kept when the job fails, so a rerun of the same job resumes from it; removed when it
    succeeds. Other jobs' folders go unless a live job holds them (several writers may encode
    into one index at once, each in its own folder).
    """
    work = root / key[:32]
    fd = _claim(work)
    try:
        for other in root.iterdir():
            if other != work:
                _remove_if_dead(other)
        yield work
        shutil.rmtree(work, ignore_errors=True)
        with suppress(OSError):
            root.rmdir()  # unless another job's folder is in it
    finally:
        os.close(fd)


def _claim(work: Path) -> int:
    """An fd holding the flock of `work/job.lock` (another job's cleanup may race the open)."""
    for _ in range(3):
        work.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(work / JOB_LOCK, os.O_RDWR | os.O_CREAT, 0o666)
        except FileNotFoundError:
            continue  # the folder was just removed as a dead job's: make it again
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RshashError(
                f"{work}: another process is encoding the same archive for this index"
            ) from None
        with suppress(FileNotFoundError):
            if os.stat(work / JOB_LOCK).st_ino == os.fstat(fd).st_ino:
                return fd
        os.close(fd)
    raise RshashError(f"{work}: could not claim the folder of saved batches")


def _remove_if_dead(path: Path) -> None:
    """Remove another job's folder (or an older layout's file) unless a live job holds it."""
    if not path.is_dir():
        path.unlink(missing_ok=True)
        return
    try:
        fd = os.open(path / JOB_LOCK, os.O_RDWR)
    except FileNotFoundError:
        shutil.rmtree(path, ignore_errors=True)
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        shutil.rmtree(path, ignore_errors=True)
    except BlockingIOError:
        pass  # a live job's
    finally:
        os.close(fd)


def _job_key(ds: ImageSource, cfg: BuildConfig, encoder: CodeEncoder, features: bool) -> str:
    """What saved batches depend on: ids, captions, batch sizes, the model, and the source's own
    `build_key` when it has one (scene tiles: the tile config and the scene files)."""
    h = hashlib.sha256()
    h.update(str(getattr(ds, "build_key", "")).encode())
    for image_id, caps in zip(ds.image_ids, ds.captions, strict=True):
        h.update(json.dumps([image_id, list(caps)]).encode())
    h.update(json.dumps([cfg.image_batch, cfg.text_batch, features, encoder.backend]).encode())
    h.update(model_fingerprint(encoder.run.path).encode())
    return h.hexdigest()


def encode_archive(
    encoder: CodeEncoder,
    ds: ImageSource,
    work: Path,
    cfg: BuildConfig,
    store: FeatureStore | None = None,
    progress: bool = True,
) -> None:
    """Encode every image and caption of `ds` batch by batch into `work/` (no index involved).

    With `store`, features come from that feature store (same images, same encoders) instead of
    being computed from the images. Batches saved by an earlier, killed run are kept.
    """
    run = encoder.run

    def texts(start: int, batch: list[dict[str, Any]]) -> np.ndarray:
        if store is not None:
            return pack_codes(run.encode_texts(store.text["plain"][start : start + len(batch)]))
        return encoder.encode_texts([r["text"] for r in batch])

    with _bar(ds, "encode", progress) as bar:
        if store is not None:
            for b, (start, stop) in enumerate(_ranges(len(ds), cfg.image_batch)):
                features = store.image["plain"][start:stop]
                _saved(work, "images", b, partial(_store_codes, run, features))
                bar.update(stop - start)
        else:
            _encode_images(encoder, ds, work, cfg, bar)
        start = 0
        for b, batch in enumerate(_batches(_caption_rows(ds), cfg.text_batch)):
            _saved(work, "captions", b, partial(texts, start, batch))
            start += len(batch)
            bar.update(len(batch))


def _store_codes(run: HashRun, features: np.ndarray) -> np.ndarray:
    return pack_codes(run.encode_images(features))


def _ranges(n: int, size: int) -> list[tuple[int, int]]:
    return [(start, min(start + size, n)) for start in range(0, n, size)]


def _encode_images(
    encoder: CodeEncoder, ds: ImageSource, work: Path, cfg: BuildConfig, bar: tqdm
) -> None:
    """Image batches not saved yet, encoded while a thread pool decodes and resizes the next
    `PREFETCH` batches: the encoder's thread does nothing but encode."""
    todo = [
        (b, r)
        for b, r in enumerate(_ranges(len(ds), cfg.image_batch))
        if not (work / f"images-{b:06d}.npy").exists()
    ]
    bar.update(len(ds) - sum(stop - start for _, (start, stop) in todo))

    def view(i: int) -> Any:
        return encoder.view(ds.load_image(i))

    with ThreadPoolExecutor(max_workers=max(cfg.workers, 1)) as pool:
        pending: list[list[Future[Any]]] = []
        for j, (b, (start, stop)) in enumerate(todo):
            while len(pending) <= PREFETCH and j + len(pending) < len(todo):
                lo, hi = todo[j + len(pending)][1]
                pending.append([pool.submit(view, i) for i in range(lo, hi)])
            views = [f.result() for f in pending.pop(0)]
            _saved(work, "images", b, partial(encoder.encode_views, views))
            bar.update(stop - start)


def ingest_archive(
    index: CodeIndex,
    ds: ImageSource,
    work: Path,
    cfg: BuildConfig,
    extra: dict[str, dict[str, Any]] | None = None,
    progress: bool = True,
) -> None:
    """Add the batches `encode_archive` saved in `work/` to `index`, one at a time (not
    committed); the first takes the writer lock."""
    with _bar(ds, "index", progress) as bar:
        for b, start in enumerate(range(0, len(ds), cfg.image_batch)):
            stop = min(start + cfg.image_batch, len(ds))
            records = [image_record(ds, i, extra) for i in range(start, stop)]
            index.add("images", _batch(work, "images", b), records)
            bar.update(stop - start)
        for b, batch in enumerate(_batches(_caption_rows(ds), cfg.text_batch)):
            index.add("captions", _batch(work, "captions", b), batch)
            bar.update(len(batch))


def _bar(ds: ImageSource, desc: str, progress: bool) -> tqdm:
    total = len(ds) + sum(len(c) for c in ds.captions)
    return tqdm(total=total, desc=desc, unit="item", disable=not progress)


def prepare_build(
    run_dir: str | Path, ds: ImageSource, cfg: BuildConfig, features: str | Path | None
) -> tuple[CodeEncoder, FeatureStore | None, str]:
    """What a new build encodes with: the run's encoder, the matching feature store if given,
    and the job key its saved batches are kept under. A bad engine fails here, before encoding."""
    run = HashRun.open(run_dir)
    make_engine(cfg.engine, run.bits, cfg.engine_params)
    encoder = CodeEncoder(run, cfg.device, cfg.backend)
    store = _matching_store(features, ds, encoder) if features else None
    return encoder, store, _job_key(ds, cfg, encoder, store is not None)


def _matching_store(features: str | Path, ds: ImageSource, encoder: CodeEncoder) -> FeatureStore:
    store = FeatureStore.open(features)
    encoder.run.check_features(store)
    built = str(store.metadata.get("backend", "torch"))
    check_encoded_with(built, f"{features} (feature store)")
    if tuple(store.image_ids) != tuple(ds.image_ids):
        raise RshashError(f"{features}: feature store holds other images than {ds.source}")
    return store


def _commit_archive(
    index: CodeIndex,
    ds: ImageSource,
    work: Path,
    cfg: BuildConfig,
    extra: dict[str, dict[str, Any]] | None,
    progress: bool,
) -> None:
    """Ingest the saved batches under the writer lock and commit them as one generation."""
    try:
        ingest_archive(index, ds, work, cfg, extra, progress)
        index.commit(source_entry(ds, images=len(ds), backend=index.encoder.backend))
    finally:
        index.close()


def build_index(
    run_dir: str | Path,
    ds: ImageSource,
    out: str | Path,
    cfg: BuildConfig | None = None,
    features: str | Path | None = None,
    extra: dict[str, dict[str, Any]] | None = None,
    progress: bool = True,
) -> Index:
    """Encode `ds` with the run's model into a new index at `out`.

    The encoding (hours for a large archive) runs before the index exists and without the
    writer lock; the lock is held only to write the encoded batches and commit.
    """
    cfg = cfg or BuildConfig()
    check_extra_fields(extra or {})
    out = Path(out)
    if (out / MANIFEST).exists():
        raise RshashError(f"{out}: an index already exists here (use `rshash index add`)")
    encoder, store, key = prepare_build(run_dir, ds, cfg, features)
    with _job_dir(out.with_name(out.name + ".partial"), key) as work:
        encode_archive(encoder, ds, work, cfg, store, progress)
        index = Index.create(
            out,
            run_dir,
            cfg.engine,
            cfg.engine_params,
            cfg.device,
            cfg.lock_timeout_s,
            encoder.backend,
        )
        _commit_archive(index, ds, work, cfg, extra, progress)
    return index


def add_to_index(
    index_path: str | Path,
    ds: ImageSource,
    cfg: BuildConfig | None = None,
    features: str | Path | None = None,
    extra: dict[str, dict[str, Any]] | None = None,
    progress: bool = True,
) -> tuple[CodeIndex, int]:
    """Encode `ds` with the index's own model and add it; returns the index and images added.

    As in `build_index`, only writing the encoded batches and the commit hold the lock.
    """
    cfg = cfg or BuildConfig()
    check_extra_fields(extra or {})
    from rshash.index.opening import OpenConfig, open_index

    opening = OpenConfig(device=cfg.device, backend=cfg.backend, lock_timeout_s=cfg.lock_timeout_s)
    index = open_index(index_path, opening)  # local or sharded
    index.check_new_ids("images", [{"id": i} for i in ds.image_ids])  # fail before encoding
    store = _matching_store(features, ds, index.encoder) if features else None
    key = _job_key(ds, cfg, index.encoder, store is not None)
    work_root = Path(index_path).with_name(Path(index_path).name + ".partial")
    with _job_dir(work_root, key) as work:
        encode_archive(index.encoder, ds, work, cfg, store, progress)
        _commit_archive(index, ds, work, cfg, extra, progress)
    return index, len(ds)


def read_extra_fields(path: str | Path | None, ids: Sequence[str]) -> dict[str, dict[str, Any]]:
    """User fields per image id from a JSON object {id: {field: value}}."""
    if path is None:
        return {}
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise RshashError(f"{path}: cannot read item fields ({exc})") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise RshashError(f"{path}: expected a JSON object mapping image id → object of fields")
    unknown = next((k for k in data if k not in set(ids)), None)
    if unknown is not None:
        raise RshashError(f"{path}: fields given for {unknown!r}, which is not in the archive")
    check_extra_fields(data, str(path))
    return data


def check_extra_fields(extra: dict[str, dict[str, Any]], where: str = "fields") -> None:
    """Refuse user fields that would replace a reserved field of the archive's own records."""
    for image_id, fields in extra.items():
        taken = sorted(RESERVED_FIELDS.intersection(fields))
        if taken:
            raise RshashError(
                f"{where}: {image_id!r} sets {', '.join(taken)}, which rshash sets from the archive"
                f" (reserved: {', '.join(sorted(RESERVED_FIELDS))}); rename the field"
            )
