"""Summary statistics of a dataset, for `rshash data inspect`."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from rshash.data.dataset import Dataset
from rshash.data.images import image_size


def describe(ds: Dataset) -> dict[str, Any]:
    counts = ds.caption_counts
    texts, _ = ds.caption_rows()
    words = np.array([len(t.split()) for t in texts]) if texts else np.zeros(0)
    sizes = Counter(image_size(p) for p in ds.image_paths)
    classes: dict[str, int] = {}
    if ds.labels is not None and ds.class_names is not None:
        per = np.bincount(ds.labels, minlength=len(ds.class_names))
        classes = {name: int(c) for name, c in zip(ds.class_names, per, strict=True)}
    suffixes = Counter(p.suffix.lower() for p in ds.image_paths)
    return {
        "name": ds.name,
        "source": str(ds.source),
        "images": len(ds),
        "captions": len(texts),
        "distinct_captions": len(set(texts)),
        "captions_per_image": _stats(counts) if texts else None,
        "caption_words": _stats(words) if texts else None,
        "classes": classes,
        "image_formats": dict(suffixes),
        "image_sizes": {f"{w}x{h}": c for (w, h), c in sizes.most_common()},
        "skipped": [{"id": i, "reason": r} for i, r in ds.skipped],
    }


def _stats(x: np.ndarray) -> dict[str, float]:
    return {
        "min": float(x.min()),
        "mean": round(float(x.mean()), 2),
        "median": float(np.median(x)),
        "max": float(x.max()),
    }


def format_description(d: dict[str, Any]) -> str:
    lines = [
        f"dataset      {d['name']}  ({d['source']})",
        f"images       {d['images']}  formats {d['image_formats']}",
    ]
    if d["captions"]:
        cpi, cw = d["captions_per_image"], d["caption_words"]
        lines += [
            f"captions     {d['captions']} ({d['distinct_captions']} distinct)",
            f"per image    min {cpi['min']:.0f}  mean {cpi['mean']}  max {cpi['max']:.0f}",
            f"words        min {cw['min']:.0f}  mean {cw['mean']}  median {cw['median']:.0f}"
            f"  max {cw['max']:.0f}",
        ]
    else:
        lines.append("captions     none")
    if d["classes"]:
        lines.append(f"classes      {len(d['classes'])}")
        lines += [f"  {name:<24} {count}" for name, count in d["classes"].items()]
    else:
        lines.append("classes      none")
    sizes = list(d["image_sizes"].items())
    shown = ", ".join(f"{s} ×{c}" for s, c in sizes[:5])
    lines.append(f"image sizes  {shown}{' …' if len(sizes) > 5 else ''}")
    if d["skipped"]:
        lines.append(f"skipped      {len(d['skipped'])} unreadable images:")
        lines += [f"  {s['id']}: {s['reason']}" for s in d["skipped"]]
    return "\n".join(lines)
