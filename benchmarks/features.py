"""Feature-extraction throughput on UCM against the encoders' bare forward-pass rate.

The limit is the encoder alone on in-memory tensors of the same batch size (no decoding, no
augmentation, no writing); the ratio shows what decoding and preprocessing cost.
Usage: python -m benchmarks.features [--images 256]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import DATA_ROOT, machine, markdown_table, write_results
from rshash.data import load_dataset
from rshash.features import ExtractConfig, FeatureStore, extract_features
from rshash.features.backends import FEATURES_CPU_BACKEND, resolve_backend, with_backend
from rshash.features.encoders import load_image_encoder, load_text_encoder
from rshash.features.extract import caption_views
from rshash.reproducibility import resolve_device


def backend_of(cfg: ExtractConfig) -> str:
    """The backend extraction runs on (the limits are measured on the same one)."""
    return resolve_backend(cfg.backend, resolve_device(cfg.device), FEATURES_CPU_BACKEND)


def image_forward_rate(cfg: ExtractConfig, repeats: int) -> float:
    """Images/s if only the two forward passes per image ran (plain + augmented view)."""
    device = resolve_device(cfg.device)
    enc = with_backend(load_image_encoder(cfg.image_encoder, device), backend_of(cfg))
    size = cfg.views.size
    batch = torch.randn(cfg.image_batch, 3, size, size).to(enc.device)
    if backend_of(cfg) == "torch":
        batch = batch.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        enc.forward(batch)
        start = time.perf_counter()
        for _ in range(repeats):
            enc.forward(batch)
        elapsed = time.perf_counter() - start
    return cfg.image_batch * repeats / elapsed / 2


def text_forward_rate(cfg: ExtractConfig, texts: list[str], n_captions: int) -> float:
    """Captions/s if only the forward passes over the same texts ran (pre-tokenised for torch;
    an ONNX backend's encode tokenises each batch itself)."""
    enc = load_text_encoder(cfg.text_encoder, resolve_device(cfg.device))
    if backend_of(cfg) != "torch":
        onnx = with_backend(enc, backend_of(cfg))
        batches_of_texts = [
            texts[s : s + cfg.text_batch] for s in range(0, len(texts), cfg.text_batch)
        ]
        onnx.encode(batches_of_texts[0])
        start = time.perf_counter()
        for t in batches_of_texts:
            onnx.encode(t)
        return n_captions / (time.perf_counter() - start)
    model = enc.model  # type: ignore[attr-defined]
    batches = [
        model.tokenize(texts[s : s + cfg.text_batch]) for s in range(0, len(texts), cfg.text_batch)
    ]
    with torch.inference_mode():
        model(batches[0])
        start = time.perf_counter()
        for b in batches:
            model(b)
        elapsed = time.perf_counter() - start
    return n_captions / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=256, help="UCM images to extract")
    args = parser.parse_args()
    cfg = ExtractConfig()
    full = load_dataset(DATA_ROOT / "ucm-captions", check_images=False)
    ds = full.subset(np.linspace(0, len(full) - 1, args.images).astype(int))
    with tempfile.TemporaryDirectory() as tmp:
        store = FeatureStore.open(extract_features(ds, Path(tmp) / "f.h5", cfg, progress=False))
    timing = store.metadata["timing"]
    n_captions = int(store.caption_offsets[-1])
    views = caption_views(ds, cfg.seed)
    unique = sorted(set(views.raw + views.augmented + views.perturbed))
    record = {
        "images": len(ds),
        "captions": n_captions,
        "unique_texts": len(unique),
        "image_batch": cfg.image_batch,
        "text_batch": cfg.text_batch,
        "images_per_s": len(ds) / timing["image_seconds"],
        "captions_per_s": n_captions / timing["text_seconds"],
        "image_forward_limit_per_s": image_forward_rate(cfg, repeats=4),
        "text_forward_limit_per_s": text_forward_rate(cfg, unique, n_captions),
        "backend": backend_of(cfg),
        "machine": machine(),
    }
    img_ratio = record["images_per_s"] / record["image_forward_limit_per_s"]
    txt_ratio = record["captions_per_s"] / record["text_forward_limit_per_s"]
    record["image_ratio"], record["caption_ratio"] = img_ratio, txt_ratio
    rows = [
        [
            "images (2 views each)",
            f"{record['images_per_s']:.1f}",
            f"{record['image_forward_limit_per_s']:.1f}",
            f"{img_ratio:.2f}",
        ],
        [
            "captions (3 views, deduplicated)",
            f"{record['captions_per_s']:.1f}",
            f"{record['text_forward_limit_per_s']:.1f}",
            f"{txt_ratio:.2f}",
        ],
    ]
    table = markdown_table(["UCM extraction", "ours /s", "bare forward limit /s", "ratio"], rows)
    title = (
        f"# Feature extraction throughput ({len(ds)} UCM images, {n_captions} captions; "
        f"{cfg.image_encoder} + {cfg.text_encoder}, batch {cfg.image_batch}, backend "
        f"{backend_of(cfg)})\n\n"
    )
    write_results("features", record, title + table)


if __name__ == "__main__":
    main()
