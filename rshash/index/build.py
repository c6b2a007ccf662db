"""Encode an archive into an index in one streamed pass: batched, with progress, resumable.

The archive is any image source (`ImageSource`: `rshash.data.Dataset`, or the scene tiles of a
GeoTIFF). Images go through the run's image encoder (plain view) and image hash network batch by
batch, and each batch goes straight into the index with its records, so memory stays flat however
large the archive. Each finished batch of codes is also saved in `INDEX.partial/`, so a killed
build resumes at the first missing batch. Captions, when the archive has them, go through the
text side the same way. Only when everything is encoded is the index committed (`Index.commit`).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from tqdm import tqdm

from rshash.data.source import ImageSource
from rshash.errors import RshashError
from rshash.features.store import FeatureStore
from rshash.fileio import atomic_path, write_json_atomic
from rshash.index.encoder import CodeEncoder
from rshash.index.index import Index, model_fingerprint
from rshash.index.packing import pack_codes

T = TypeVar("T")


@dataclass(frozen=True)
class BuildConfig:
    engine: str = "exact"
    engine_params: dict[str, Any] = field(default_factory=dict)
    image_batch: int = 32
    text_batch: int = 256
    workers: int = 4
    device: str = "auto"


# Record fields that name files, pixels or places: set by the archive's reader, never by
# `--fields` (the service reads pixels from `path`, `window` and `bands`; filters trust the rest).
RESERVED_FIELDS = frozenset(
    {
        "id", "image", "path", "captions", "text", "dataset", "scene", "window", "bands",
        "stretch", "crs", "footprint", "footprint_wgs84", "bounds_wgs84", "resolution_m",
    }
)  # fmt: skip


def source_entry(ds: ImageSource, **extra: Any) -> dict[str, Any]:
    """The manifest's record of an archive added to an index: its name, the path given, and the
    resolved folder its files lie under (the service serves files from there only)."""
    given = Path(ds.source).resolve()
    root = given if given.is_dir() else given.parent
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


def _saved(work: Path, prefix: str, b: int, encode: Callable[[], np.ndarray]) -> np.ndarray:
    """Batch b's codes from `work/PREFIX-b.npy`, or encoded and saved there."""
    path = work / f"{prefix}-{b:06d}.npy"
    if path.exists():
        return np.load(path)
    codes = encode()
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, codes)
    return codes


def _prepare_work(work: Path, key: str) -> None:
    job = work / "job.json"
    if work.exists() and not (job.exists() and json.loads(job.read_text()).get("key") == key):
        shutil.rmtree(work)  # another job's leftovers
    work.mkdir(parents=True, exist_ok=True)
    write_json_atomic(job, {"key": key})


def _job_key(ds: ImageSource, cfg: BuildConfig, encoder: CodeEncoder, features: bool) -> str:
    """What saved batches depend on: ids, captions, batch sizes, the model, and the source's own
    `build_key` when it has one (scene tiles: the tile config and the scene files)."""
    h = hashlib.sha256()
    h.update(str(getattr(ds, "build_key", "")).encode())
    for image_id, caps in zip(ds.image_ids, ds.captions, strict=True):
        h.update(json.dumps([image_id, list(caps)]).encode())
    h.update(json.dumps([cfg.image_batch, cfg.text_batch, features]).encode())
    h.update(model_fingerprint(encoder.run.path).encode())
    return h.hexdigest()


def stream_archive(
    index: Index,
    ds: ImageSource,
    work: Path,
    cfg: BuildConfig,
    store: FeatureStore | None = None,
    extra: dict[str, dict[str, Any]] | None = None,
    progress: bool = True,
) -> None:
    """Encode every image and caption of `ds` batch by batch into `index` (not committed).

    With `store`, features come from that feature store (same images, same encoders) instead of
    being computed from the images.
    """
    encoder, run = index.encoder, index.encoder.run
    _prepare_work(work, _job_key(ds, cfg, encoder, store is not None))
    n_texts = sum(len(c) for c in ds.captions)

    def images(start: int, stop: int) -> np.ndarray:
        if store is not None:
            return pack_codes(run.encode_images(store.image["plain"][start:stop]))
        with ThreadPoolExecutor(max_workers=cfg.workers) as pool:
            return encoder.encode_images(list(pool.map(ds.load_image, range(start, stop))))

    def texts(start: int, batch: list[dict[str, Any]]) -> np.ndarray:
        if store is not None:
            return pack_codes(run.encode_texts(store.text["plain"][start : start + len(batch)]))
        return encoder.encode_texts([r["text"] for r in batch])

    with tqdm(total=len(ds) + n_texts, desc="index", unit="item", disable=not progress) as bar:
        for b, start in enumerate(range(0, len(ds), cfg.image_batch)):
            stop = min(start + cfg.image_batch, len(ds))
            codes = _saved(work, "images", b, partial(images, start, stop))
            index.add("images", codes, [image_record(ds, i, extra) for i in range(start, stop)])
            bar.update(stop - start)
        start = 0
        for b, batch in enumerate(_batches(_caption_rows(ds), cfg.text_batch)):
            codes = _saved(work, "captions", b, partial(texts, start, batch))
            index.add("captions", codes, batch)
            start += len(batch)
            bar.update(len(batch))


def _matching_store(features: str | Path, ds: ImageSource, encoder: CodeEncoder) -> FeatureStore:
    store = FeatureStore.open(features)
    encoder.run.check_features(store)
    if tuple(store.image_ids) != tuple(ds.image_ids):
        raise RshashError(f"{features}: feature store holds other images than {ds.source}")
    return store


def _add_archive(
    index: Index,
    ds: ImageSource,
    cfg: BuildConfig,
    work: Path,
    features: str | Path | None,
    extra: dict[str, dict[str, Any]] | None,
    progress: bool,
) -> int:
    store = _matching_store(features, ds, index.encoder) if features else None
    try:
        stream_archive(index, ds, work, cfg, store, extra, progress)
        index.commit(source_entry(ds, images=len(ds)))
    finally:
        index.close()
    shutil.rmtree(work, ignore_errors=True)
    return len(ds)


def build_index(
    run_dir: str | Path,
    ds: ImageSource,
    out: str | Path,
    cfg: BuildConfig | None = None,
    features: str | Path | None = None,
    extra: dict[str, dict[str, Any]] | None = None,
    progress: bool = True,
) -> Index:
    """Encode `ds` with the run's model into a new index at `out`."""
    cfg = cfg or BuildConfig()
    check_extra_fields(extra or {})
    out = Path(out)
    index = Index.create(out, run_dir, cfg.engine, cfg.engine_params, cfg.device)
    _add_archive(index, ds, cfg, out.with_name(out.name + ".partial"), features, extra, progress)
    return index


def add_to_index(
    index_path: str | Path,
    ds: ImageSource,
    cfg: BuildConfig | None = None,
    features: str | Path | None = None,
    extra: dict[str, dict[str, Any]] | None = None,
    progress: bool = True,
) -> tuple[Index, int]:
    """Encode `ds` with the index's own model and add it; returns the index and images added."""
    cfg = cfg or BuildConfig()
    check_extra_fields(extra or {})
    index = Index.open(index_path, device=cfg.device)
    work = Path(index_path).with_name(Path(index_path).name + ".partial")
    return index, _add_archive(index, ds, cfg, work, features, extra, progress)


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
