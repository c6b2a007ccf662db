"""Search engines over packed binary codes, behind one interface (like FAISS's `Index`).

Every engine holds (packed code, key) pairs, keys being int64 item keys chosen by the caller,
and answers top-k and range queries by Hamming distance:

- `exact`: our compiled XOR + popcount scan (see `kernels`); the default. It returns exactly the
  brute-force answer, ties broken by insertion order, and beats FAISS's exact scan (see
  `benchmarks/results/search.md`).
- `faiss-flat`: FAISS `IndexBinaryFlat`, exact, for comparison and as a reference.
- `faiss-ivf`: FAISS `IndexBinaryIVF`, approximate, for large archives; its recall@k against
  exact search is measured when it is built.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from itertools import pairwise
from typing import Any, ClassVar

import numba
import numpy as np

from rshash.errors import RshashError
from rshash.index import kernels
from rshash.index.packing import query_words, to_words

Hits = tuple[np.ndarray, np.ndarray]  # (distances int32, keys int64)


class Engine(ABC):
    """Top-k and range search by Hamming distance over (packed code, key) pairs."""

    name: ClassVar[str]

    def __init__(self, bits: int) -> None:
        if bits <= 0 or bits % 64:
            raise RshashError(f"code length must be a positive multiple of 64 bits, got {bits}")
        self.bits = bits

    @property
    @abstractmethod
    def ntotal(self) -> int: ...

    @abstractmethod
    def add(self, packed: np.ndarray, keys: np.ndarray) -> None:
        """Append codes under `keys` (int64, larger than every key already held)."""

    @abstractmethod
    def remove(self, keys: np.ndarray) -> int:
        """Drop the items with these keys; returns how many were held."""

    @abstractmethod
    def search(self, queries: np.ndarray, k: int) -> Hits:
        """(q, k) distances and keys, nearest first; rows padded with key -1 past the archive."""

    @abstractmethod
    def range_search(self, queries: np.ndarray, radius: int) -> list[Hits]:
        """Per query, every item within Hamming `radius`, nearest first."""

    def build(self, packed: np.ndarray, keys: np.ndarray) -> dict[str, Any]:
        """Fill an empty engine (approximate engines train here); returns a build report."""
        self.add(packed, keys)
        return {}

    def params(self) -> dict[str, Any]:
        return {}

    def state(self) -> bytes | None:
        """Trained state to persist beside the codes (None: rebuilt from the codes on load)."""
        return None

    def restore(self, state: bytes | None, packed: np.ndarray, keys: np.ndarray) -> None:
        self.add(packed, keys)

    def _check(self, queries: np.ndarray) -> np.ndarray:
        queries = np.ascontiguousarray(queries, np.uint8)
        if queries.ndim != 2 or queries.shape[1] * 8 != self.bits:
            raise RshashError(
                f"query codes must be (q, {self.bits // 8}) packed bytes, got {queries.shape}"
            )
        return queries


def _order(d: np.ndarray, keys: np.ndarray) -> Hits:
    """Sort hits by (distance, key): the one tie-break rule every engine reports in."""
    order = np.lexsort((keys, d))
    return d[order].astype(np.int32), keys[order].astype(np.int64)


class ExactEngine(Engine):
    """Exact scan with the compiled kernel; codes kept word-major in memory.

    Kernel calls are serialised: numba's parallel runtime is not re-entrant across threads, and
    one call already uses every core.
    """

    name = "exact"

    def __init__(self, bits: int) -> None:
        super().__init__(bits)
        self._lock = threading.Lock()
        self._packed = np.zeros((0, bits // 8), np.uint8)
        self._keys = np.zeros(0, np.int64)
        self._words = to_words(self._packed)

    @property
    def ntotal(self) -> int:
        return len(self._keys)

    def _set(self, packed: np.ndarray, keys: np.ndarray) -> None:
        self._packed, self._keys = packed, keys
        self._words = to_words(packed)

    def add(self, packed: np.ndarray, keys: np.ndarray) -> None:
        packed = self._check(packed)
        self._set(np.concatenate([self._packed, packed]), np.concatenate([self._keys, keys]))

    def remove(self, keys: np.ndarray) -> int:
        keep = ~np.isin(self._keys, keys)
        self._set(self._packed[keep], self._keys[keep])
        return int((~keep).sum())

    def search(self, queries: np.ndarray, k: int) -> Hits:
        q = query_words(self._check(queries))
        threads = numba.get_num_threads()
        parts = 1 if len(q) >= threads else threads
        with self._lock:
            return kernels.topk(self._words, self._keys, q, k, parts, threads)

    def range_search(self, queries: np.ndarray, radius: int) -> list[Hits]:
        q = query_words(self._check(queries))
        with self._lock:
            counts = kernels.range_counts(self._words, q, radius)
            offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
            dist = np.empty(offsets[-1], np.int32)
            pos = np.empty(offsets[-1], np.int64)
            kernels.range_fill(self._words, q, radius, offsets, dist, pos)
        return [_order(dist[a:b], self._keys[pos[a:b]]) for a, b in pairwise(offsets)]


class _FaissEngine(Engine):
    """Shared FAISS plumbing: an ID-mapped binary index."""

    def __init__(self, bits: int) -> None:
        super().__init__(bits)
        self.index: Any = None

    @property
    def ntotal(self) -> int:
        return 0 if self.index is None else int(self.index.ntotal)

    def add(self, packed: np.ndarray, keys: np.ndarray) -> None:
        self.index.add_with_ids(self._check(packed), np.asarray(keys, np.int64))

    def remove(self, keys: np.ndarray) -> int:
        return int(self.index.remove_ids(np.asarray(keys, np.int64)))

    def search(self, queries: np.ndarray, k: int) -> Hits:
        dist, keys = self.index.search(self._check(queries), k)
        dist = np.where(keys >= 0, dist, kernels.FAR)
        rows = [_order(d, i) for d, i in zip(dist, keys, strict=True)]
        return np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])

    def range_search(self, queries: np.ndarray, radius: int) -> list[Hits]:
        # FAISS keeps distances strictly below the threshold.
        lims, dist, keys = self.index.range_search(self._check(queries), radius + 1)
        return [_order(dist[a:b], keys[a:b]) for a, b in pairwise(lims)]

    def state(self) -> bytes | None:
        import faiss

        return bytes(faiss.serialize_index_binary(self.index))

    def restore(self, state: bytes | None, packed: np.ndarray, keys: np.ndarray) -> None:
        import faiss

        if state is None:
            raise RshashError(f"{self.name} engine: no saved state to restore")
        self.index = faiss.deserialize_index_binary(np.frombuffer(state, np.uint8))


class FaissFlatEngine(_FaissEngine):
    name = "faiss-flat"

    def __init__(self, bits: int) -> None:
        import faiss

        super().__init__(bits)
        self.index = faiss.IndexBinaryIDMap2(faiss.IndexBinaryFlat(bits))

    def state(self) -> bytes | None:
        return None

    def restore(self, state: bytes | None, packed: np.ndarray, keys: np.ndarray) -> None:
        self.add(packed, keys)


class FaissIVFEngine(_FaissEngine):
    """Inverted lists over binary k-means cells; probes `nprobe` of `nlist` cells per query."""

    name = "faiss-ivf"

    def __init__(
        self, bits: int, nlist: int | None = None, nprobe: int = 16, train_per_list: int = 64
    ) -> None:
        super().__init__(bits)
        self.nlist, self.nprobe, self.train_per_list = nlist, nprobe, train_per_list

    def params(self) -> dict[str, Any]:
        return {"nlist": self.nlist, "nprobe": self.nprobe, "train_per_list": self.train_per_list}

    def build(self, packed: np.ndarray, keys: np.ndarray) -> dict[str, Any]:
        import faiss

        packed = self._check(packed)
        n = len(packed)
        if self.nlist is None:
            self.nlist = int(max(1, min(4 * np.sqrt(n), n // 39, 1024)))
        quantizer = faiss.IndexBinaryFlat(self.bits)
        self.index = faiss.IndexBinaryIVF(quantizer, self.bits, self.nlist)
        self._quantizer = quantizer  # FAISS does not own it: keep it alive with the index
        sample = np.random.default_rng(0).permutation(n)[: self.train_per_list * self.nlist]
        self.index.train(packed[np.sort(sample)])
        self.index.nprobe = self.nprobe
        self.add(packed, keys)
        return {"recall_at_20": recall_against_exact(self, packed, keys, k=20)}

    def add(self, packed: np.ndarray, keys: np.ndarray) -> None:
        if self.index is None:
            raise RshashError("faiss-ivf engine: build it on an initial set of codes before add")
        super().add(packed, keys)

    def restore(self, state: bytes | None, packed: np.ndarray, keys: np.ndarray) -> None:
        super().restore(state, packed, keys)
        self.index.nprobe = self.nprobe


def recall_at(found_d: np.ndarray, exact_d: np.ndarray, k: int) -> float:
    """Tie-aware recall@k: share of returned items at most as far as the exact k-th neighbour."""
    kth = exact_d[:, k - 1 : k]
    return float((found_d[:, :k] <= kth).sum() / found_d[:, :k].size)


def recall_against_exact(
    engine: Engine, packed: np.ndarray, keys: np.ndarray, k: int, queries: int = 1000
) -> float:
    """Recall@k of `engine` on up to `queries` archive items used as queries."""
    exact = ExactEngine(engine.bits)
    exact.add(packed, keys)
    k = min(k, len(keys))
    pick = np.random.default_rng(1).permutation(len(packed))[:queries]
    q = packed[np.sort(pick)]
    return recall_at(engine.search(q, k)[0], exact.search(q, k)[0], k)


ENGINES: dict[str, type[Engine]] = {
    e.name: e for e in (ExactEngine, FaissFlatEngine, FaissIVFEngine)
}


def make_engine(name: str, bits: int, params: dict[str, Any] | None = None) -> Engine:
    if name not in ENGINES:
        raise RshashError(f"unknown index engine {name!r}; choose one of {', '.join(ENGINES)}")
    return ENGINES[name](bits, **(params or {}))
