"""`rshash audit`: rank a dataset's image-caption pairs by how suspicious the noise detector
finds them, as a CSV and an HTML page with thumbnails — for curators hunting wrong captions."""

from __future__ import annotations

import base64
import csv
import html
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rshash.data.dataset import Dataset
from rshash.data.images import load_rgb
from rshash.errors import DataError
from rshash.features.store import FeatureStore
from rshash.fileio import atomic_path, write_text_atomic
from rshash.models.run import HashRun


@dataclass(frozen=True)
class AuditRow:
    rank: int
    image_id: str
    caption_index: int
    caption: str
    class_name: str
    score: float


def audit_pairs(run: HashRun, dataset: Dataset, store: FeatureStore) -> list[AuditRow]:
    """Every image-caption pair of `dataset`, most suspicious (lowest detector score) first."""
    run.check_features(store)
    if tuple(store.image_ids) != dataset.image_ids:
        raise DataError(f"{store.path}: features were not extracted from {dataset.source}")
    store.require_text()
    owner = store.caption_owner
    scores = run.pair_scores(store.image["plain"][owner], store.text["plain"])
    order = np.argsort(scores, kind="stable")
    texts, _ = dataset.caption_rows()
    offsets = store.caption_offsets
    rows = []
    for rank, r in enumerate(order, start=1):
        i = int(owner[r])
        label = ""
        if dataset.labels is not None and dataset.class_names is not None:
            label = dataset.class_names[dataset.labels[i]]
        rows.append(
            AuditRow(
                rank, dataset.image_ids[i], int(r - offsets[i]), texts[r], label, float(scores[r])
            )
        )
    return rows


def write_csv(rows: list[AuditRow], path: Path) -> None:
    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["rank", "image_id", "caption_index", "caption", "class", "score"])
        for r in rows:
            writer.writerow(
                [r.rank, r.image_id, r.caption_index, r.caption, r.class_name, f"{r.score:.6f}"]
            )


def _thumbnail(path: Path, size: int = 128) -> str:
    img = load_rgb(path)
    img.thumbnail((size, size))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return base64.b64encode(buf.getvalue()).decode()


def write_html(rows: list[AuditRow], dataset: Dataset, path: Path, top: int) -> None:
    paths = dict(zip(dataset.image_ids, dataset.image_paths, strict=True))
    cards = []
    for r in rows[:top]:
        cards.append(
            "<tr>"
            f"<td>{r.rank}</td>"
            f'<td><img alt="{html.escape(r.image_id)}" '
            f'src="data:image/jpeg;base64,{_thumbnail(paths[r.image_id])}"></td>'
            f"<td>{html.escape(r.image_id)}<br><small>{html.escape(r.class_name)}</small></td>"
            f"<td>{html.escape(r.caption)}</td>"
            f"<td>{r.score:.3f}</td>"
            "</tr>"
        )
    page = (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>rshash audit: {html.escape(dataset.name)}</title>"
        "<style>body{font-family:sans-serif;margin:2em}td{padding:4px 10px;"
        "border-bottom:1px solid #ddd;vertical-align:middle}img{width:128px}</style>"
        f"</head><body><h1>Most suspicious image-caption pairs of {html.escape(dataset.name)}</h1>"
        f"<p>{top} of {len(rows)} pairs, lowest noise-detector score first "
        "(score = estimated probability that the caption describes the image).</p>"
        "<table><tr><th>rank</th><th>image</th><th>id / class</th><th>caption</th>"
        f"<th>score</th></tr>{''.join(cards)}</table></body></html>"
    )
    write_text_atomic(path, page)
