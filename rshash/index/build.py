"""Encode an archive into an index in one streamed pass: batched, with progress, resumable.

Images go through the run's image encoder (plain view) and image hash network batch by batch;
each finished batch of codes is saved in `INDEX.partial/`, so a killed build resumes at the first
missing batch. Captions, when the archive has them, go through the text side the same way. Only
when everything is encoded is the index committed (see `Index.commit`).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from rshash.data.dataset import Dataset
from rshash.data.images import load_rgb
from rshash.data.source import ImageSource
from rshash.errors import RshashError
from rshash.features.store import FeatureStore
from rshash.fileio import atomic_path, write_json_atomic
from rshash.index.encoder import CodeEncoder
from rshash.index.index import Index, model_fingerprint
from rshash.index.packing import pack_codes


@dataclass(frozen=True)
class BuildConfig:
    engine: str = "exact"
    engine_params: dict[str, Any] = field(default_factory=dict)
    image_batch: int = 32
    text_batch: int = 256
    workers: int = 4
    device: str = "auto"


def image_records(
    ds: Dataset | ImageSource, extra: dict[str, dict[str, Any]] | None = None
) -> list[dict]:
    """One record per image: id, path, captions, class (when known), and any user fields."""
    extra = extra or {}
    if not isinstance(ds, Dataset):  # an image source (scene tiles) makes its own records
        return [{**ds.image_record(i), **extra.get(ds.image_ids[i], {})} for i in range(len(ds))]
    records = []
    for i, image_id in enumerate(ds.image_ids):
        rec: dict[str, Any] = {
            "id": image_id,
            "path": str(Path(ds.image_paths[i]).resolve()),
            "captions": list(ds.captions[i]),
            "class": ds.class_names[ds.labels[i]]
            if ds.labels is not None and ds.class_names
            else None,
            "dataset": ds.name,
        }
        rec.update(extra.get(image_id, {}))
        records.append(rec)
    return records


def caption_records(ds: Dataset) -> list[dict]:
    records = []
    for i, image_id in enumerate(ds.image_ids):
        cls = ds.class_names[ds.labels[i]] if ds.labels is not None and ds.class_names else None
        for j, text in enumerate(ds.captions[i]):
            records.append({"id": f"{image_id}#{j}", "image": image_id, "text": text, "class": cls})
    return records


def _encode_chunked(
    work: Path,
    prefix: str,
    n: int,
    batch: int,
    encode: Callable[[int, int], np.ndarray],
    bar: tqdm,
) -> np.ndarray:
    """Encode rows [0, n) in batches saved as `work/PREFIX-b.npy`, reusing saved batches."""
    parts = []
    for b, start in enumerate(range(0, n, batch)):
        stop = min(start + batch, n)
        path = work / f"{prefix}-{b:06d}.npy"
        if path.exists():
            codes = np.load(path)
        else:
            codes = encode(start, stop)
            with atomic_path(path) as tmp, open(tmp, "wb") as f:
                np.save(f, codes)
        parts.append(codes)
        bar.update(stop - start)
    return np.concatenate(parts) if parts else np.zeros((0, 0), np.uint8)


def _prepare_work(work: Path, key: str) -> None:
    job = work / "job.json"
    if work.exists() and not (job.exists() and json.loads(job.read_text()).get("key") == key):
        shutil.rmtree(work)  # another job's leftovers
    work.mkdir(parents=True, exist_ok=True)
    write_json_atomic(job, {"key": key})


def encode_archive(
    encoder: CodeEncoder,
    ds: Dataset | ImageSource,
    work: Path,
    cfg: BuildConfig,
    store: FeatureStore | None = None,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Packed codes of every image and caption of `ds` (captions None when it has none).

    With `store`, features come from that feature store (same images, same encoders) instead of
    being computed from the image files.
    """
    blob = json.dumps(
        [
            list(ds.image_ids),
            [list(c) for c in ds.captions],
            cfg.image_batch,
            cfg.text_batch,
            model_fingerprint(encoder.run.path),
            store is not None,
        ]
    )
    _prepare_work(work, hashlib.sha256(blob.encode()).hexdigest())
    texts = [t for caps in ds.captions for t in caps]
    run = encoder.run

    def images_from_files(start: int, stop: int) -> np.ndarray:
        load = (
            ds.load_image if not isinstance(ds, Dataset) else lambda i: load_rgb(ds.image_paths[i])
        )
        with ThreadPoolExecutor(max_workers=cfg.workers) as pool:
            imgs = list(pool.map(load, range(start, stop)))
        return encoder.encode_images(imgs)

    def images_from_store(start: int, stop: int) -> np.ndarray:
        assert store is not None
        return pack_codes(run.encode_images(store.image["plain"][start:stop]))

    def captions_from_store(start: int, stop: int) -> np.ndarray:
        assert store is not None
        return pack_codes(run.encode_texts(store.text["plain"][start:stop]))

    def captions_from_text(start: int, stop: int) -> np.ndarray:
        return encoder.encode_texts(texts[start:stop])

    total = len(ds) + len(texts)
    with tqdm(total=total, desc="index", unit="item", disable=not progress) as bar:
        image_codes = _encode_chunked(
            work,
            "images",
            len(ds),
            cfg.image_batch,
            images_from_store if store is not None else images_from_files,
            bar,
        )
        caption_codes = None
        if texts:
            caption_codes = _encode_chunked(
                work,
                "captions",
                len(texts),
                cfg.text_batch,
                captions_from_store if store is not None else captions_from_text,
                bar,
            )
    return image_codes, caption_codes


def _matching_store(features: str | Path, ds: Dataset, encoder: CodeEncoder) -> FeatureStore:
    store = FeatureStore.open(features)
    encoder.run.check_features(store)
    if tuple(store.image_ids) != tuple(ds.image_ids):
        raise RshashError(f"{features}: feature store holds other images than {ds.source}")
    return store


def _add_archive(
    index: Index,
    ds: Dataset | ImageSource,
    cfg: BuildConfig,
    work: Path,
    features: str | Path | None,
    extra: dict[str, dict[str, Any]] | None,
    progress: bool,
) -> int:
    store = (
        _matching_store(features, ds, index.encoder)
        if features and isinstance(ds, Dataset)
        else None
    )
    image_codes, caption_codes = encode_archive(index.encoder, ds, work, cfg, store, progress)
    index.add("images", image_codes, image_records(ds, extra))
    if caption_codes is not None and isinstance(ds, Dataset):
        index.add("captions", caption_codes, caption_records(ds))
    index.commit({"dataset": ds.name, "path": str(ds.source), "images": len(ds)})
    shutil.rmtree(work, ignore_errors=True)
    return len(ds)


def build_index(
    run_dir: str | Path,
    ds: Dataset | ImageSource,
    out: str | Path,
    cfg: BuildConfig | None = None,
    features: str | Path | None = None,
    extra: dict[str, dict[str, Any]] | None = None,
    progress: bool = True,
) -> Index:
    """Encode `ds` with the run's model into a new index at `out`."""
    cfg = cfg or BuildConfig()
    out = Path(out)
    index = Index.create(out, run_dir, cfg.engine, cfg.engine_params, cfg.device)
    _add_archive(index, ds, cfg, out.with_name(out.name + ".partial"), features, extra, progress)
    return index


def add_to_index(
    index_path: str | Path,
    ds: Dataset | ImageSource,
    cfg: BuildConfig | None = None,
    features: str | Path | None = None,
    extra: dict[str, dict[str, Any]] | None = None,
    progress: bool = True,
) -> tuple[Index, int]:
    """Encode `ds` with the index's own model and add it; returns the index and images added."""
    cfg = cfg or BuildConfig()
    index = Index.open(index_path, device=cfg.device)
    held = {it["id"] for it in index.collections["images"].items} if len(index) else set()
    clash = next((i for i in ds.image_ids if i in held), None)
    if clash is not None:
        raise RshashError(f"{ds.source}: image id {clash!r} is already in {index_path}")
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
    return data
