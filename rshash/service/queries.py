"""Search requests and the batch function the service's batcher runs them through.

A batch of text and image requests is encoded in (at most) one text and one image forward pass;
requests with the same options (collection, radius, where, bbox: everything but k) share one
`search_codes` call at the group's largest k, and each caller's list is cut to its own k.
Exact engines break ties by key, so the cut list equals the one-at-a-time answer. A request's
filter comes resolved (`allowed`, found in a worker thread before it was submitted; a sharded
index's shards keep it in their caches), so a batch never runs a filter's SQL query itself.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from rshash.features.views import plain_view
from rshash.index.base import Allowed, Hit, Searcher, filter_args
from rshash.index.encoder import CodeEncoder, decode_image
from rshash.index.packing import empty_codes, pack_codes
from rshash.service.query_cache import QueryCache

BBox = tuple[float, float, float, float]


@dataclass(frozen=True)
class SearchRequest:
    """One query: a text, or an image already in the encoder's input view."""

    k: int
    collection: str = "images"
    radius: int | None = None
    where: str | None = None
    bbox: BBox | None = None
    text: str | None = None
    image: Image.Image | None = None
    allowed: Allowed | None = None  # where and bbox resolved (Index.resolve_filter)

    def group(self) -> tuple[Any, ...]:
        resolved_at = None if self.allowed is None else self.allowed.generation
        return (self.collection, self.radius, self.where, self.bbox, resolved_at)


def image_view(data: bytes, name: str, encoder: CodeEncoder, max_pixels: int) -> Image.Image:
    """Decode an uploaded image and bring it to the encoder's input view (run in a thread)."""
    return plain_view(decode_image(data, name, max_pixels), encoder.views)


def encode_views(encoder: CodeEncoder, views: Sequence[Image.Image]) -> np.ndarray:
    """Packed codes of images already in the encoder's input view: one forward pass."""
    with torch.no_grad():
        return pack_codes(encoder.run.encode_images(encoder.image_encoder.encode(views)))


def search_batch(
    searcher: Searcher, requests: list[SearchRequest], cache: QueryCache | None = None
) -> list[list[Hit] | Exception]:
    """Answers to `requests`, in order; a failing group fails only its own requests. Text codes
    come through `cache` when given."""
    encoder, index = searcher.encoder, searcher.index
    codes = empty_codes(len(requests), encoder.run.bits)
    texts = [i for i, r in enumerate(requests) if r.text is not None]
    images = [i for i, r in enumerate(requests) if r.image is not None]
    if texts:
        queries = [requests[i].text or "" for i in texts]
        if cache is None:
            codes[texts] = encoder.encode_texts(queries)
        else:
            codes[texts] = cache.encode(queries, encoder.encode_texts)
    if images:
        views = [requests[i].image for i in images]
        codes[images] = encode_views(encoder, [v for v in views if v is not None])
    groups: dict[tuple[Any, ...], list[int]] = defaultdict(list)
    for i, r in enumerate(requests):
        groups[r.group()].append(i)
    out: list[list[Hit] | Exception] = [[] for _ in requests]
    for members in groups.values():
        first = requests[members[0]]
        filters = filter_args(first.where, first.bbox, first.allowed)
        k = max(requests[i].k for i in members)
        try:
            found = index.search_codes(codes[members], k, first.collection, first.radius, **filters)
        except Exception as exc:
            for i in members:
                out[i] = exc
            continue
        for i, hits in zip(members, found, strict=True):
            out[i] = hits if first.radius is not None else hits[: requests[i].k]
    return out
