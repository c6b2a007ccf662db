"""What every index is: the `CodeIndex` protocol, its hits and query checks, and the `Searcher`.

`Index` (one directory) and `ShardedIndex` (shards on Ray) both implement `CodeIndex`, the way
FAISS's `IndexShards` is an index made of indexes: the Python API, the CLI and the service hold
a `Searcher` (a code encoder plus any `CodeIndex`) and never ask which kind of index it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
from PIL import Image

from rshash.errors import RshashError
from rshash.index.encoder import CodeEncoder, decode_image
from rshash.index.time_filter import with_datetime

MAX_K = 10_000
BBox = tuple[float, float, float, float]


@dataclass(frozen=True)
class Hit:
    """One search result: the item's record and its Hamming distance to the query."""

    key: int
    distance: int
    item: dict[str, Any]

    @property
    def id(self) -> str:
        return str(self.item["id"])

    def to_dict(self) -> dict[str, Any]:
        return {"distance": self.distance, **self.item}


@dataclass(frozen=True)
class Allowed:
    """A filter resolved at one generation: the sorted keys of a collection's matching items."""

    collection: str
    generation: int
    keys: np.ndarray


class StaleFilter(RshashError):
    """The index moved to another generation after the filter was resolved: resolve it again."""


def check_query(k: int, radius: int | None, bits: int) -> None:
    """k in 1..MAX_K, or a radius in 0..bits (a code is never farther than its length)."""
    if radius is not None and not 0 <= radius <= bits:
        raise RshashError(f"radius: expected 0 to {bits} (the code length), got {radius}")
    if radius is None and not 1 <= k <= MAX_K:
        raise RshashError(f"k must be between 1 and {MAX_K}, got {k}")


def filter_args(
    where: str | None, bbox: BBox | None, allowed: Allowed | None = None
) -> dict[str, Any]:
    """The keyword arguments of `search_codes` for a filter: `allowed` when resolved (it
    stands for where and bbox), else whichever of where and bbox is given."""
    if allowed is not None:
        return {"allowed": allowed}
    out: dict[str, Any] = {}
    if where is not None:
        out["where"] = where
    if bbox is not None:
        out["bbox"] = bbox
    return out


@runtime_checkable
class CodeIndex(Protocol):
    """An archive of packed codes with item records, searched, read and changed by generation.

    Changes (`add`, `remove`) become visible at `commit()` as one new generation; readers of
    another process move to it at `refresh()`.
    """

    path: Path

    @property
    def encoder(self) -> CodeEncoder:
        """Turns text and image queries into this archive's codes."""
        ...

    @property
    def manifest(self) -> dict[str, Any]:
        """Format, bits, engine, model of the archive (one shard's, for a sharded index)."""

    @property
    def bits(self) -> int: ...

    @property
    def generation(self) -> int: ...

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
        """Nearest items to each packed query code: top-k, or all within `radius` if given."""

    def resolve_filter(self, collection: str, where: str | None, bbox: BBox | None) -> Any:
        """Check a filter and prepare its matching items ahead of the search; the result goes
        to `search_codes(allowed=...)` (None: pass where and bbox instead)."""

    def item(self, item_id: str, collection: str = "images") -> dict[str, Any]: ...

    def items(self, collection: str = "images") -> list[dict[str, Any]]: ...

    def counts(self) -> dict[str, int]:
        """Live items per collection."""

    def sources(self) -> list[dict[str, Any]]:
        """What was indexed, commit by commit (roots of the served files)."""

    def fields(self, collection: str = "images") -> frozenset[str]:
        """The record fields a `where` filter may name in `collection`."""

    def refresh(self) -> bool:
        """Switch to the newest committed generation; True if it changed."""

    def check_new_ids(self, collection: str, items: list[dict[str, Any]]) -> None:
        """RshashError if an item's id is given twice or already in the archive."""

    def add(self, collection: str, codes: np.ndarray, items: list[dict[str, Any]]) -> np.ndarray:
        """Add packed codes with their records (not visible before `commit`); their keys."""

    def remove(self, ids: list[str]) -> int:
        """Remove images (and their captions) or captions by id; images removed."""

    def commit(self, source: dict[str, Any] | None = None) -> None: ...

    def compact(self) -> dict[str, int]:
        """Drop removed items' codes; tombstones dropped per collection."""

    def check(self) -> dict[str, dict[str, int]]:
        """Counts per collection, checked; RshashError naming the first problem."""

    def health(self) -> dict[str, Any]:
        """What /healthz adds for this index; "degraded": [...] names parts not answering."""

    def close(self) -> None: ...


@dataclass
class Searcher:
    """Text and image queries: the index's own encoder turns them into codes for any index."""

    index: CodeIndex

    @property
    def encoder(self) -> CodeEncoder:
        return self.index.encoder

    def search_text(
        self,
        query: str,
        k: int = 20,
        collection: str = "images",
        radius: int | None = None,
        *,
        where: str | None = None,
        bbox: BBox | None = None,
        datetime: str | None = None,
    ) -> list[Hit]:
        """Nearest items to a text; `datetime` (RFC 3339 instant or interval) filters by time
        like `where` (see `time_filter`)."""
        if not query.strip():
            raise RshashError("empty text query")
        where = self._with_datetime(where, datetime, collection)
        codes = self.encoder.encode_texts([query])
        return self.index.search_codes(codes, k, collection, radius, **filter_args(where, bbox))[0]

    def search_image(
        self,
        image: str | Path | bytes | Image.Image,
        k: int = 20,
        collection: str = "images",
        radius: int | None = None,
        *,
        where: str | None = None,
        bbox: BBox | None = None,
        datetime: str | None = None,
    ) -> list[Hit]:
        where = self._with_datetime(where, datetime, collection)
        if isinstance(image, str | Path):
            path = Path(image)
            if not path.is_file():
                raise RshashError(f"{path}: query image not found")
            image = decode_image(path.read_bytes(), str(path))
        elif isinstance(image, bytes):
            image = decode_image(image)
        codes = self.encoder.encode_images([image])
        return self.index.search_codes(codes, k, collection, radius, **filter_args(where, bbox))[0]

    def _with_datetime(
        self, where: str | None, datetime: str | None, collection: str
    ) -> str | None:
        """`where` joined with the time filter `datetime` (checked against the index's fields)."""
        if datetime is None:
            return where
        return with_datetime(where, datetime, self.index.fields(collection))


class Queries:
    """`search_text` and `search_image` on an index itself (`Index.open(p).search_text(...)`),
    through a `Searcher` over it."""

    def search_text(
        self,
        query: str,
        k: int = 20,
        collection: str = "images",
        radius: int | None = None,
        *,
        where: str | None = None,
        bbox: BBox | None = None,
        datetime: str | None = None,
    ) -> list[Hit]:
        searcher = Searcher(self)  # type: ignore[arg-type]
        return searcher.search_text(
            query, k, collection, radius, where=where, bbox=bbox, datetime=datetime
        )

    def search_image(
        self,
        image: str | Path | bytes | Image.Image,
        k: int = 20,
        collection: str = "images",
        radius: int | None = None,
        *,
        where: str | None = None,
        bbox: BBox | None = None,
        datetime: str | None = None,
    ) -> list[Hit]:
        searcher = Searcher(self)  # type: ignore[arg-type]
        return searcher.search_image(
            image, k, collection, radius, where=where, bbox=bbox, datetime=datetime
        )
