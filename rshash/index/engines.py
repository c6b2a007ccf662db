"""Search engines over packed binary codes, behind one interface (like FAISS's `Index`).

Every engine holds (packed code, key) pairs, keys being int64 item keys chosen by the caller
(increasing as items are added), and answers top-k and range queries by Hamming distance, each
optionally restricted to `allowed` keys (a sorted int64 array: a filter's matches):

- `exact`: our compiled XOR + popcount scan (see `kernels`); the default. It returns exactly the
  brute-force answer, ties broken by insertion order, and beats FAISS's exact scan (see
  `benchmarks/results/search.md`).
- `faiss-flat`: FAISS `IndexBinaryFlat`, exact, for comparison and as a reference; filters go
  in as an `IDSelectorBatch`.
- `mih`, `auto`: exact search by multi-index hashing, sublinear in the archive (see `mih`).
- `faiss-ivf`: FAISS `IndexBinaryIVF`, approximate, for large archives; its recall@k against
  exact search is measured when it is built. FAISS has no selectors for binary IVF, so a filtered
  query is answered exactly over the matching codes.

Codes are `code_bytes(bits)` bytes: any length from 8 to 1024 bits, zero-padded to whole words.
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
from rshash.index.packing import aligned_empty, check_bits, code_bytes, query_words

Hits = tuple[np.ndarray, np.ndarray]  # (distances int32, keys int64)
_View = tuple[np.ndarray, np.ndarray, np.ndarray]  # (words, keys, allowed bits) to scan


class Engine(ABC):
    """Top-k and range search by Hamming distance over (packed code, key) pairs."""

    name: ClassVar[str]

    def __init__(self, bits: int) -> None:
        self.bits = check_bits(bits)
        self.width = code_bytes(bits)

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
    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None) -> Hits:
        """(q, k) distances and keys, nearest first; rows padded with key -1 past the archive.

        With `allowed` (sorted keys), only those items are candidates.
        """

    @abstractmethod
    def range_search(
        self, queries: np.ndarray, radius: int, allowed: np.ndarray | None = None
    ) -> list[Hits]:
        """Per query, every (allowed) item within Hamming `radius`, nearest first."""

    @abstractmethod
    def live(self) -> tuple[np.ndarray, np.ndarray]:
        """Packed codes and keys of every item held, in key order."""

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

    def compacted(self, packed: np.ndarray, keys: np.ndarray) -> Engine:
        """The engine that serves the live codes after compaction: a new one over them."""
        engine = type(self)(self.bits, **self.params())
        engine.restore(None, packed, keys)
        return engine

    def memory(self) -> dict[str, int]:
        """Bytes held, by part."""
        return {"codes": self.ntotal * self.width}

    def describe(self) -> str:
        """How it searches, in a few words (for `rshash index info`)."""
        return self.name

    def _check(self, queries: np.ndarray) -> np.ndarray:
        queries = np.ascontiguousarray(queries, np.uint8)
        if queries.ndim != 2 or queries.shape[1] != self.width:
            raise RshashError(
                f"query codes must be (q, {self.width}) packed bytes, got {queries.shape}"
            )
        return queries


def _order(d: np.ndarray, keys: np.ndarray) -> Hits:
    """Sort hits by (distance, key): the one tie-break rule every engine reports in."""
    order = np.lexsort((keys, d))
    return d[order].astype(np.int32), keys[order].astype(np.int64)


class ExactEngine(Engine):
    """Exact scan with the compiled kernel; codes kept word-major in memory.

    Removed items stay in the words with their bit cleared in `alive` (tombstones); compaction
    (a new engine over the live codes) drops them. Kernel calls are serialised: numba's parallel
    runtime is not re-entrant across threads, and one call already uses every core.
    """

    name = "exact"

    def __init__(self, bits: int) -> None:
        super().__init__(bits)
        self._lock = threading.Lock()
        self._keys = np.zeros(0, np.int64)
        self._words = aligned_empty((self.width // 8, 0))
        self._alive = np.zeros(0, bool)
        self._bits = kernels.allowed_bits(self._alive)
        self._filter: tuple[np.ndarray | None, _View] = (None, self._full_view())

    @property
    def ntotal(self) -> int:
        return int(self._alive.sum())

    def add(self, packed: np.ndarray, keys: np.ndarray) -> None:
        packed = self._check(packed)
        n, m = len(self._keys), len(packed)
        words = aligned_empty((self.width // 8, n + m))
        words[:, :n] = self._words
        words[:, n:] = packed.view(np.uint64).T
        keys = np.concatenate([self._keys, np.asarray(keys, np.int64)])
        alive = np.concatenate([self._alive, np.ones(m, bool)])
        with self._lock:
            self._words, self._keys = words, keys
            self._set_alive(alive)

    def _set_alive(self, alive: np.ndarray) -> None:
        self._alive = alive
        self._bits = kernels.allowed_bits(alive)
        self._filter = (None, self._full_view())

    def _full_view(self) -> _View:
        return self._words, self._keys, self._bits

    def remove(self, keys: np.ndarray) -> int:
        pos = self._positions(np.asarray(keys, np.int64))
        pos = pos[self._alive[pos]]
        if not len(pos):
            return 0
        alive = self._alive.copy()
        alive[pos] = False
        with self._lock:
            self._set_alive(alive)
        return len(pos)

    def _positions(self, keys: np.ndarray) -> np.ndarray:
        """Positions of those `keys` that are held (tombstoned or not)."""
        pos = np.searchsorted(self._keys, keys)
        held = pos < len(self._keys)
        pos, keys = pos[held], keys[held]
        return pos[self._keys[pos] == keys]

    def _view(self, allowed: np.ndarray | None) -> _View:
        """(words, keys, allowed bits) to scan for the live items among `allowed` keys.

        A filter that keeps under half of the items gets its codes gathered into a compact
        word array (a tenth of the archive is then scanned ten times faster); a broader one is
        a mask over all codes. Cached for the last filter.
        """
        if allowed is None:
            return self._words, self._keys, self._bits
        last, view = self._filter
        if last is allowed:
            return view
        mask = np.zeros(len(self._keys), bool)
        mask[self._positions(allowed)] = True
        mask &= self._alive
        if 2 * mask.sum() < len(mask):
            pos = np.flatnonzero(mask)
            words = aligned_empty((self.width // 8, len(pos)))
            words[:] = self._words[:, pos]
            view = (words, self._keys[pos], kernels.allowed_bits(np.ones(len(pos), bool)))
        else:
            view = (self._words, self._keys, kernels.allowed_bits(mask))
        self._filter = (allowed, view)
        return view

    def live(self) -> tuple[np.ndarray, np.ndarray]:
        words = self._words[:, self._alive]
        return np.ascontiguousarray(words.T).view(np.uint8), self._keys[self._alive]

    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None) -> Hits:
        q = query_words(self._check(queries))
        threads = numba.get_num_threads()
        parts = 1 if len(q) >= threads else threads
        with self._lock:
            words, keys, bits = self._view(allowed)
            return kernels.topk(words, keys, q, k, parts, threads, bits)

    def range_search(
        self, queries: np.ndarray, radius: int, allowed: np.ndarray | None = None
    ) -> list[Hits]:
        q = query_words(self._check(queries))
        with self._lock:
            words, keys, bits = self._view(allowed)
            counts = kernels.range_counts(words, q, radius, bits)
            offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
            dist = np.empty(offsets[-1], np.int32)
            pos = np.empty(offsets[-1], np.int64)
            kernels.range_fill(words, q, radius, offsets, dist, pos, bits)
        return [_order(dist[a:b], keys[pos[a:b]]) for a, b in pairwise(offsets)]


class _FaissEngine(Engine):
    """Shared FAISS plumbing: an ID-mapped binary index, and the codes it holds by key."""

    def __init__(self, bits: int) -> None:
        super().__init__(bits)
        self.index: Any = None
        self._packed = np.zeros((0, self.width), np.uint8)
        self._keys = np.zeros(0, np.int64)

    @property
    def ntotal(self) -> int:
        return 0 if self.index is None else int(self.index.ntotal)

    def _hold(self, packed: np.ndarray, keys: np.ndarray) -> None:
        self._packed = np.concatenate([self._packed, packed])
        self._keys = np.concatenate([self._keys, np.asarray(keys, np.int64)])

    def add(self, packed: np.ndarray, keys: np.ndarray) -> None:
        packed = self._check(packed)
        self.index.add_with_ids(packed, np.asarray(keys, np.int64))
        self._hold(packed, keys)

    def remove(self, keys: np.ndarray) -> int:
        keep = ~np.isin(self._keys, keys)
        self._packed, self._keys = self._packed[keep], self._keys[keep]
        return int(self.index.remove_ids(np.asarray(keys, np.int64)))

    def live(self) -> tuple[np.ndarray, np.ndarray]:
        return self._packed, self._keys

    def _search(self, queries: np.ndarray, k: int, allowed: np.ndarray) -> tuple[Any, Any]:
        """FAISS search restricted to `allowed` keys."""
        import faiss

        params = faiss.SearchParameters(sel=faiss.IDSelectorBatch(allowed))  # type: ignore[call-arg]
        return self.index.search(queries, k, params=params)

    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None) -> Hits:
        queries = self._check(queries)
        if allowed is None:
            dist, keys = self.index.search(queries, k)
        else:
            dist, keys = self._search(queries, k, np.asarray(allowed, np.int64))
        dist = np.where(keys >= 0, dist, kernels.FAR)
        rows = [_order(d, i) for d, i in zip(dist, keys, strict=True)]
        return np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])

    def range_search(
        self, queries: np.ndarray, radius: int, allowed: np.ndarray | None = None
    ) -> list[Hits]:
        # FAISS keeps distances strictly below the threshold.
        lims, dist, keys = self.index.range_search(self._check(queries), radius + 1)
        found = [(dist[a:b], keys[a:b]) for a, b in pairwise(lims)]
        if allowed is not None:
            found = [(d[np.isin(i, allowed)], i[np.isin(i, allowed)]) for d, i in found]
        return [_order(d, i) for d, i in found]

    def state(self) -> bytes | None:
        import faiss

        return bytes(faiss.serialize_index_binary(self.index))

    def restore(self, state: bytes | None, packed: np.ndarray, keys: np.ndarray) -> None:
        import faiss

        if state is None:
            raise RshashError(f"{self.name} engine: no saved state to restore")
        self.index = faiss.deserialize_index_binary(np.frombuffer(state, np.uint8))
        self._hold(self._check(packed), keys)


class FaissFlatEngine(_FaissEngine):
    name = "faiss-flat"

    def __init__(self, bits: int) -> None:
        import faiss

        super().__init__(bits)
        self.index = faiss.IndexBinaryIDMap2(faiss.IndexBinaryFlat(self.width * 8))

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
        quantizer = faiss.IndexBinaryFlat(self.width * 8)
        self.index = faiss.IndexBinaryIVF(quantizer, self.width * 8, self.nlist)
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

    def compacted(self, packed: np.ndarray, keys: np.ndarray) -> Engine:
        """Itself: removed items left its lists, and its trained cells stay valid."""
        return self

    def _search(self, queries: np.ndarray, k: int, allowed: np.ndarray) -> tuple[Any, Any]:
        """Exact search over the allowed codes: FAISS has no selectors for binary IVF."""
        import faiss

        pick = np.isin(self._keys, allowed)
        flat = faiss.IndexBinaryFlat(self.width * 8)
        flat.add(self._packed[pick])
        dist, pos = flat.search(queries, k)
        return dist, np.where(pos >= 0, self._keys[pick][np.maximum(pos, 0)], -1)


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


def _engines() -> dict[str, type[Engine]]:
    from rshash.index.mih import AutoEngine, MIHEngine  # it builds on ExactEngine, defined above

    engines = (ExactEngine, FaissFlatEngine, FaissIVFEngine, MIHEngine, AutoEngine)
    return {e.name: e for e in engines}


ENGINES: dict[str, type[Engine]] = _engines()


def make_engine(name: str, bits: int, params: dict[str, Any] | None = None) -> Engine:
    if name not in ENGINES:
        raise RshashError(f"unknown index engine {name!r}; choose one of {', '.join(ENGINES)}")
    return ENGINES[name](bits, **(params or {}))
