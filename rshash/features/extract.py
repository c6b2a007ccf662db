"""Batched, resumable feature extraction into a feature store.

Work goes into `OUT.partial` in fixed batches, each marked done once written; a killed run picks
up at the first unfinished batch and, because batch boundaries and per-item augmentation seeds are
fixed, produces the same file as an uninterrupted run. The finished store is then written to a
temporary file and renamed onto OUT, so OUT is never half-written.
"""

from __future__ import annotations

import hashlib
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from tqdm import tqdm

from rshash.data.dataset import Dataset
from rshash.data.images import load_rgb
from rshash.features.backends import AUTO, FEATURES_CPU_BACKEND, resolve_backend, with_backend
from rshash.features.encoders import (
    DEFAULT_IMAGE_ENCODER,
    DEFAULT_TEXT_ENCODER,
    ImageEncoder,
    TextEncoder,
    load_image_encoder,
    load_text_encoder,
)
from rshash.features.views import (
    ImageViewConfig,
    augmented_caption,
    augmented_view,
    item_rng,
    perturb_caption,
    plain_view,
)
from rshash.fileio import atomic_path
from rshash.reproducibility import library_versions, resolve_device

_STR = h5py.string_dtype("utf-8")


@dataclass(frozen=True)
class ExtractConfig:
    image_encoder: str = DEFAULT_IMAGE_ENCODER
    text_encoder: str = DEFAULT_TEXT_ENCODER
    image_batch: int = 64
    text_batch: int = 256
    seed: int = 0
    device: str = "auto"
    backend: str = AUTO  # inference backend (see rshash.features.backends); recorded in the store
    workers: int = 4
    views: ImageViewConfig = field(default_factory=ImageViewConfig)


@dataclass(frozen=True)
class CaptionViews:
    raw: list[str]
    augmented: list[str]
    perturbed: list[str]
    offsets: np.ndarray


def caption_views(ds: Dataset, seed: int) -> CaptionViews:
    raw, augmented, perturbed = [], [], []
    row = 0
    for caps in ds.captions:
        for j, text in enumerate(caps):
            pert = perturb_caption(text, item_rng(seed, "perturb", row))
            raw.append(text)
            perturbed.append(pert)
            augmented.append(augmented_caption(caps, j, item_rng(seed, "caption", row), pert))
            row += 1
    offsets = np.concatenate([[0], np.cumsum(ds.caption_counts)]).astype(np.int64)
    return CaptionViews(raw, augmented, perturbed, offsets)


def _job_key(ds: Dataset, cfg: ExtractConfig) -> str:
    """Identifies the work: a partial file from a different job is never resumed."""
    blob = json.dumps(
        {
            "ids": list(ds.image_ids),
            "captions": [list(c) for c in ds.captions],
            "image_encoder": cfg.image_encoder,
            "text_encoder": cfg.text_encoder,
            "backend": cfg.backend,
            "image_batch": cfg.image_batch,
            "text_batch": cfg.text_batch,
            "seed": cfg.seed,
            "views": cfg.views.to_dict(),
        }
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def _load_views(ds: Dataset, cfg: ExtractConfig, index: int) -> tuple[Any, Any]:
    img = load_rgb(ds.image_paths[index])
    return (
        plain_view(img, cfg.views),
        augmented_view(img, cfg.views, item_rng(cfg.seed, "image", index)),
    )


def _batches(n: int, size: int) -> list[tuple[int, int]]:
    return [(s, min(s + size, n)) for s in range(0, n, size)]


def _dataset(f: h5py.File, name: str, shape: tuple[int, ...], dtype: Any) -> h5py.Dataset:
    return f[name] if name in f else f.create_dataset(name, shape=shape, dtype=dtype)


def _extract_images(
    f: h5py.File, ds: Dataset, cfg: ExtractConfig, enc: ImageEncoder, bar: tqdm
) -> None:
    batches = _batches(len(ds), cfg.image_batch)
    done = _dataset(f, "progress/images", (len(batches),), bool)
    plain = _dataset(f, "image/plain", (len(ds), enc.dim), np.float32)
    aug = _dataset(f, "image/augmented", (len(ds), enc.dim), np.float32)
    with ThreadPoolExecutor(max_workers=cfg.workers) as pool:
        for b, (start, stop) in enumerate(batches):
            if done[b]:
                bar.update(stop - start)
                continue
            views = list(pool.map(lambda i: _load_views(ds, cfg, i), range(start, stop)))
            plain[start:stop] = enc.encode([v[0] for v in views])
            aug[start:stop] = enc.encode([v[1] for v in views])
            done[b] = True
            f.flush()
            bar.update(stop - start)


def _extract_texts(
    f: h5py.File, unique: list[str], cfg: ExtractConfig, enc: TextEncoder, bar: tqdm
) -> None:
    batches = _batches(len(unique), cfg.text_batch)
    done = _dataset(f, "progress/texts", (len(batches),), bool)
    out = _dataset(f, "text/unique", (len(unique), enc.dim), np.float32)
    for b, (start, stop) in enumerate(batches):
        if not done[b]:
            out[start:stop] = enc.encode(unique[start:stop])
            done[b] = True
            f.flush()
        bar.update(stop - start)


def _metadata(
    ds: Dataset, cfg: ExtractConfig, img: ImageEncoder, txt: TextEncoder | None, backend: str
) -> dict:
    return {
        "format": "rshash-features/1",
        "backend": backend,
        "dataset": {"name": ds.name, "source": str(ds.source), "images": len(ds)},
        "class_names": list(ds.class_names) if ds.class_names else None,
        "image_encoder": img.describe(),
        "text_encoder": txt.describe() if txt else None,
        "preprocessing": {
            "image_views": cfg.views.to_dict(),
            "text_views": {
                "plain": "caption",
                "augmented": "another caption of the same image, else the perturbed caption",
                "perturbed": "word dropout (p=0.15) and one neighbour swap",
            },
        },
        "seed": cfg.seed,
        "versions": library_versions(),
        "skipped_images": [{"id": i, "reason": r} for i, r in ds.skipped],
    }


def _write_final(
    target: Path,
    partial: h5py.File,
    ds: Dataset,
    views: CaptionViews | None,
    unique_index: dict[str, int] | None,
    meta: dict,
) -> None:
    with atomic_path(target) as tmp, h5py.File(tmp, "w") as out:
        out.attrs["metadata"] = json.dumps(meta)
        out["image/plain"] = partial["image/plain"][...]
        out["image/augmented"] = partial["image/augmented"][...]
        out["ids/image"] = np.array(ds.image_ids, dtype=_STR)
        labels = ds.labels if ds.labels is not None else np.full(len(ds), -1)
        out["labels"] = labels.astype(np.int64)
        offsets = views.offsets if views else np.zeros(len(ds) + 1, np.int64)
        out["ids/caption_offsets"] = offsets
        if views is not None and unique_index is not None:
            unique = partial["text/unique"][...]
            owner = np.repeat(np.arange(len(ds)), np.diff(views.offsets))
            caption_ids = [f"{ds.image_ids[o]}#{r - views.offsets[o]}" for r, o in enumerate(owner)]
            out["ids/caption"] = np.array(caption_ids, dtype=_STR)
            for name, texts in (
                ("plain", views.raw),
                ("augmented", views.augmented),
                ("perturbed", views.perturbed),
            ):
                out[f"text/{name}"] = unique[[unique_index[t] for t in texts]]
                key = "raw" if name == "plain" else name
                out[f"captions/{key}"] = np.array(texts, dtype=_STR)


def extract_features(
    ds: Dataset, out: str | Path, cfg: ExtractConfig, progress: bool = True
) -> Path:
    """Extract both views of every image and caption of `ds` into the store `out`."""
    out = Path(out)
    partial_path = out.with_name(out.name + ".partial")
    out.parent.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    backend = resolve_backend(cfg.backend, device, FEATURES_CPU_BACKEND)
    cfg = replace(cfg, backend=backend)
    img_enc = with_backend(load_image_encoder(cfg.image_encoder, device), backend)
    txt_enc = None
    if ds.has_captions:
        txt_enc = with_backend(load_text_encoder(cfg.text_encoder, device), backend)
    views = caption_views(ds, cfg.seed) if ds.has_captions else None
    unique = sorted(set(views.raw + views.augmented + views.perturbed)) if views else []
    key = _job_key(ds, cfg)

    if partial_path.exists() and not _resumable(partial_path, key):
        partial_path.unlink()  # another job's work, or killed mid-write beyond repair
    mode = "a" if partial_path.exists() else "w"
    with h5py.File(partial_path, mode) as f:
        f.attrs["job_key"] = key
        started = time.perf_counter()
        total = len(ds) + len(unique)
        with tqdm(total=total, desc="features", unit="item", disable=not progress) as bar:
            _extract_images(f, ds, cfg, img_enc, bar)
            images_done = time.perf_counter()
            if txt_enc is not None:
                _extract_texts(f, unique, cfg, txt_enc, bar)
        meta = _metadata(ds, cfg, img_enc, txt_enc, backend)
        meta["job_key"] = key
        meta["timing"] = {
            "image_seconds": round(images_done - started, 3),
            "text_seconds": round(time.perf_counter() - images_done, 3),
            "unique_texts": len(unique),
            "resumed": mode == "a",
        }
        index = {t: i for i, t in enumerate(unique)} if views else None
        _write_final(out, f, ds, views, index, meta)
    partial_path.unlink()
    return out


def same_extraction(path: str | Path, ds: Dataset, cfg: ExtractConfig) -> bool:
    """Whether the finished store at `path` holds exactly what `extract_features(ds, _, cfg)`
    would write now (same items, encoders, resolved backend, views and seed), so that it can be
    reused instead of extracted again."""
    backend = resolve_backend(cfg.backend, resolve_device(cfg.device), FEATURES_CPU_BACKEND)
    try:
        with h5py.File(path, "r") as f:
            meta = json.loads(f.attrs["metadata"])
    except (OSError, KeyError, ValueError):
        return False
    return bool(meta.get("job_key") == _job_key(ds, replace(cfg, backend=backend)))


def _resumable(path: Path, key: str) -> bool:
    """Whether `path` is an unfinished extraction of this very job that can still be read."""
    try:
        with h5py.File(path, "r") as f:
            return bool(f.attrs.get("job_key") == key)
    except OSError:
        return False
