"""Exact search without reading the whole archive: multi-index hashing (`mih`, `auto` engines).

`mih` answers exactly what `exact` answers (same hits, same order: by distance, then key) by
probing m substring tables at growing radii (see `mih_kernels`), reading a few thousand buckets
instead of every code. m follows the paper: m = round(bits / log2 N), at least bits / 24 (buckets
are addressed directly, 2^24 at most per table), so a substring has about log2 N bits and a
bucket holds about one item.

Memory: beside the codes (kept word-major, as `exact` keeps them, for scans and `live()`), each
table holds, per item in bucket order, its position (uint32) and a 32-bit sketch of the code's
other bits (see `mih_kernels`), plus 2^len + 1 bucket offsets (uint32): 8 bytes per item and
table, so the engine holds 1 + 8m / bytes per code times the codes, plus the offsets (64 bits at
1e8 codes, m = 3: 4.06×; 128 bits at 1e7, m = 6: 4.3×). The sketch rejects almost every
candidate by one sequential read; a full code copy per table (as before: 1 + m · 12 / 8 = 5.5×
at 64 bits) would save only the archive read of the few that pass.

The tables are rebuilt over every code when codes are added (a counting sort per table, a few
seconds per 1e7 codes on 2 cores). Only bucket offsets and positions are persisted (the engine
state, `engine-<collection>-<gen>.bin`); opening an index recomputes the sketches from the
segments while checking that every table holds each item exactly once in its bucket.

The exact scan answers instead when it is cheaper:
- a query whose probing passes `budget` work units (about the cost of scanning every code: far
  queries, large k, archives a few times 1e5 codes or smaller) is answered again by the scan;
- a filter that keeps under 1/FILTER_SCAN of the items is answered by scanning their gathered
  codes (as `exact` does): MIH has to verify about 1/share as many candidates to find k allowed
  ones, while the gathered scan reads only the share;
- a range search whose buckets to probe cost more than the budget.
`auto` is `mih` that builds tables only from AUTO_MIN_ITEMS codes of at most AUTO_MAX_BITS bits
on, and probes them only for k ≤ AUTO_MAX_K, and batches with k > AUTO_BATCH_MAX_K only from
AUTO_BATCH_MIN_ITEMS codes on (elsewhere the scan won or was not measured to lose: see
`benchmarks/results/mih.md`); else it is `exact`.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Any, ClassVar

import numba
import numpy as np

from rshash.errors import RshashError
from rshash.index import kernels, mih_kernels
from rshash.index.engines import ExactEngine, Hits, _order
from rshash.index.packing import aligned_empty, query_words

FILTER_SCAN = 16  # a filter keeping under 1/16 of the items is scanned, not probed
SCAN_UNITS = 8  # codes (per word) scanned in the time of 1 candidate met (sketch bound), measured
# ~7 under load (8 ns against 1.2 ns): probing stops near the scan's cost (a bucket costs PROBE
# candidates, a full code read VERIFY; benchmarks/results/mih.md)
MIN_BUDGET = 4096  # work units below which probing is never cut short
AUTO_MIN_ITEMS = 2_000_000  # auto: codes from which tables are built
AUTO_MAX_K = 100  # auto: largest k probed
AUTO_MAX_BITS = 64  # auto: longest codes probed (128-bit random codes: the scan won at 1e7)
# auto: a batch with k above AUTO_BATCH_MAX_K is scanned below AUTO_BATCH_MIN_ITEMS codes (the
# batched scan reads the archive once for all queries: at 1e7 it was 2x mih at k = 100, at 1e8
# mih won every batch by 3.7x or more)
AUTO_BATCH_MAX_K = 20
AUTO_BATCH_MIN_ITEMS = 50_000_000
RANGE_ROOM = 1024  # hits a range query first makes room for
MAGIC = b"rshash-mih/1\n"
MAX_ITEMS = 2**32 - 1  # positions are uint32


def substrings_for(bits: int, n: int) -> int:
    """m = round(span / log2 n), span the code's bits rounded up to bytes; substrings ≤ 24 bits."""
    span = 8 * -(-bits // 8)
    m = round(span / max(math.log2(max(n, 2)), 1.0))
    return min(span, max(m, -(-span // mih_kernels.MAX_SUBSTRING), 1))


@dataclass
class Tables:
    """m substring tables: bit ranges, bucket offsets, positions and sketches in bucket order."""

    starts: np.ndarray  # (m,) int64: first bit of each substring
    lens: np.ndarray  # (m,) int64: its length
    offsets: np.ndarray  # (m, 2^max(lens) + 1) uint32: first row of each bucket
    pos: np.ndarray  # (m, n) uint32: the item at each row
    sketch: np.ndarray  # (m, n) uint32: its sketch (the code's bits after substring j)

    @classmethod
    def empty(cls, bits: int, m: int, n: int) -> Tables:
        span = 8 * -(-bits // 8)
        if not 1 <= m <= span or -(-span // m) > mih_kernels.MAX_SUBSTRING:
            raise RshashError(
                f"mih substrings: expected {-(-span // mih_kernels.MAX_SUBSTRING)} to {span} for "
                f"{bits}-bit codes (substrings of at most {mih_kernels.MAX_SUBSTRING} bits),"
                f" got {m}"
            )
        if n > MAX_ITEMS:
            raise RshashError(f"mih engine: at most {MAX_ITEMS} codes per collection, got {n}")
        lens = np.array([span // m + (j < span % m) for j in range(m)], np.int64)
        starts = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64)
        offsets = aligned_empty((m, (1 << int(lens.max())) + 1), np.uint32)
        offsets[:] = 0
        pos, sketch = aligned_empty((m, n), np.uint32), aligned_empty((m, n), np.uint32)
        return cls(starts, lens, offsets, pos, sketch)  # huge pages: fewer TLB misses per probe

    @property
    def m(self) -> int:
        return len(self.starts)

    def arrays(self) -> tuple[np.ndarray, ...]:
        """What the kernels take: bit ranges, offsets, positions, sketches."""
        return self.starts, self.lens, self.offsets, self.pos, self.sketch

    @property
    def nbytes(self) -> int:
        return int(self.offsets.nbytes + self.pos.nbytes + self.sketch.nbytes)

    def to_bytes(self, words: int) -> bytes:
        """MAGIC, header length (uint64), JSON header, offsets, positions (little-endian)."""
        n = self.pos.shape[1]
        head = {"n": n, "words": words, "starts": self.starts.tolist(), "lens": self.lens.tolist()}
        blob = json.dumps(head).encode()
        parts = [MAGIC, struct.pack("<Q", len(blob)), blob]
        return b"".join([*parts, self.offsets.astype("<u4").tobytes(), self.pos.tobytes()])

    @classmethod
    def from_bytes(cls, state: bytes, bits: int, words: np.ndarray) -> Tables:
        """Tables saved by `to_bytes` over the codes `words`, checked item by item."""
        n = words.shape[1]
        if not state.startswith(MAGIC) or len(state) < len(MAGIC) + 8:
            raise RshashError("mih tables: not an rshash-mih/1 file")
        at = len(MAGIC) + 8
        (size,) = struct.unpack("<Q", state[len(MAGIC) : at])
        try:
            head = json.loads(state[at : at + size])
            m, lens = len(head["starts"]), head["lens"]
            tables = cls.empty(bits, m, n)
            same = head["n"] == n and head["words"] == words.shape[0]
            same = (
                same and lens == tables.lens.tolist() and head["starts"] == tables.starts.tolist()
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise RshashError(f"mih tables: unreadable header ({exc})") from None
        if not same:
            raise RshashError(
                f"mih tables: made for {head.get('n')} codes in {m} substrings, the segments hold"
                f" {n} codes of {bits} bits"
            )
        at += size
        sizes = (tables.offsets.nbytes, tables.pos.nbytes)
        if len(state) != at + sum(sizes):
            raise RshashError(
                f"mih tables: {len(state)} bytes, expected {at + sum(sizes)} (truncated or damaged)"
            )
        tables.offsets[:] = np.frombuffer(state, "<u4", tables.offsets.size, at).reshape(
            tables.offsets.shape
        )
        tables.pos[:] = np.frombuffer(state, "<u4", tables.pos.size, at + sizes[0]).reshape(
            tables.pos.shape
        )
        args = (words, tables.starts, tables.lens, tables.offsets, tables.pos, tables.sketch)
        bad = mih_kernels.gather(*args)
        if bad:
            raise RshashError(f"mih tables: table {bad - 1} does not index every code once")
        return tables


class MIHEngine(ExactEngine):
    """Exact top-k and range search by multi-index hashing; the exact scan where it is cheaper."""

    name = "mih"
    min_items: ClassVar[int] = 0
    max_k: ClassVar[int] = 2**31
    max_bits: ClassVar[int] = 1024

    def __init__(self, bits: int, substrings: int | None = None) -> None:
        super().__init__(bits)
        if substrings is not None:
            Tables.empty(bits, substrings, 0)  # check it now
        self.substrings = substrings
        self._tables: Tables | None = None
        self._full = True
        self._mask: tuple[np.ndarray | None, np.ndarray, int] = (None, self._bits, 0)
        # The last search's buckets, candidates and full codes read per query, and which
        # queries the scan answered (for benchmarks and tests: concurrent searches overwrite).
        self.work = np.zeros((0, 3), np.int64)
        self.scanned = np.zeros(0, bool)

    def params(self) -> dict[str, Any]:
        return {} if self.substrings is None else {"substrings": self.substrings}

    def add(self, packed: np.ndarray, keys: np.ndarray) -> None:
        super().add(packed, keys)
        self._rebuild()

    def _rebuild(self) -> None:
        """Tables over every code held (tombstoned ones too: they are masked when verified)."""
        n = self._words.shape[1]
        tables = None
        if n >= max(self.min_items, 1) and self.bits <= self.max_bits:
            m = self.substrings or substrings_for(self.bits, n)
            tables = Tables.empty(self.bits, m, n)
            mih_kernels.build(
                self._words, tables.starts, tables.lens, tables.offsets, tables.pos, tables.sketch
            )
        with self._lock:
            self._tables = tables

    def _set_alive(self, alive: np.ndarray) -> None:
        super()._set_alive(alive)
        self._full = bool(alive.all())
        self._mask = (None, self._bits, 0)

    def state(self) -> bytes | None:
        return None if self._tables is None else self._tables.to_bytes(self._words.shape[0])

    def restore(self, state: bytes | None, packed: np.ndarray, keys: np.ndarray) -> None:
        ExactEngine.add(self, packed, keys)
        if state is None:
            self._rebuild()
        else:
            self._tables = Tables.from_bytes(state, self.bits, self._words)

    def memory(self) -> dict[str, int]:
        """Bytes held: the codes (word-major) and the tables."""
        tables = 0 if self._tables is None else self._tables.nbytes
        return {"codes": int(self._words.nbytes), "tables": tables}

    def describe(self) -> str:
        t = self._tables
        if t is None:
            return (
                f"exact scan (tables from {self.min_items:,} codes of at most {self.max_bits}"
                " bits on)"
            )
        lens = sorted({int(v) for v in t.lens})
        return f"multi-index hashing, {t.m} tables of {'/'.join(map(str, lens))}-bit substrings"

    def _budget(self) -> int:
        return max(MIN_BUDGET, self._words.size // SCAN_UNITS)

    def _probes(self, queries: int, k: int) -> bool:
        """Whether `queries` queries of top-`k` are worth probing at all."""
        return k <= self.max_k

    def _plan(self, allowed: np.ndarray | None) -> tuple[np.ndarray, bool] | None:
        """(allowed bits, all allowed) to probe with, or None where the scan is cheaper."""
        if allowed is None:
            return self._bits, self._full
        last, bits, count = self._mask
        if last is not allowed:
            mask = np.zeros(len(self._keys), bool)
            mask[self._positions(allowed)] = True
            mask &= self._alive
            bits, count = kernels.allowed_bits(mask), int(mask.sum())
            self._mask = (allowed, bits, count)
        if count * FILTER_SCAN < len(self._keys):
            return None
        return bits, False

    def _scan(self, q: np.ndarray, k: int, allowed: np.ndarray | None) -> Hits:
        threads = numba.get_num_threads()
        parts = 1 if len(q) >= threads else threads
        words, keys, bits = self._view(allowed)
        return kernels.topk(words, keys, q, k, parts, threads, bits)

    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None) -> Hits:
        """Top-k by probing; one query runs on one core without the engine lock (the kernel
        releases the GIL), so concurrent single queries do not wait for each other."""
        q = query_words(self._check(queries))
        with self._lock:
            t = self._tables
            plan = None if t is None or not self._probes(len(q), k) else self._plan(allowed)
            if t is None or plan is None or not len(q):
                self.work, self.scanned = np.zeros((len(q), 3), np.int64), np.ones(len(q), bool)
                return self._scan(q, k, allowed)
            args = (*t.arrays(), self._words, *plan, self._budget())
            held = self._keys  # positions in `t` index these keys (keys are only appended)
            if len(q) > 1:
                found = mih_kernels.knn_parallel(q, k, *args)
        if len(q) == 1:
            found = mih_kernels.knn_serial(q, k, *args)
        dist, pos, ok, self.work = found
        self.scanned = ~ok
        keys = np.where(pos >= 0, held[np.maximum(pos, 0)], kernels.NO_ITEM)
        dist = dist.astype(np.int32)
        if not ok.all():
            with self._lock:
                dist[~ok], keys[~ok] = self._scan(q[~ok], k, allowed)
        return dist, keys

    def _range_cost(self, t: Tables, radius: int) -> int:
        """Work units to probe every bucket a range search of `radius` needs."""
        buckets = 0
        for j, length in enumerate(t.lens.tolist()):
            top = (radius - j) // t.m
            buckets += sum(math.comb(length, r) for r in range(min(top, length) + 1))
        return mih_kernels.PROBE * buckets

    def range_search(
        self, queries: np.ndarray, radius: int, allowed: np.ndarray | None = None
    ) -> list[Hits]:
        q = query_words(self._check(queries))
        with self._lock:
            t = self._tables
            plan = None if t is None else self._plan(allowed)
            if t is not None and plan is not None and self._range_cost(t, radius) <= self._budget():
                return [self._within(t, row, radius, *plan) for row in q]
        return super().range_search(queries, radius, allowed)

    def _within(self, t: Tables, q: np.ndarray, radius: int, bits: np.ndarray, full: bool) -> Hits:
        room = RANGE_ROOM
        while True:
            dist, pos = np.empty(room, np.int64), np.empty(room, np.int64)
            args = (*t.arrays(), self._words, bits, full, dist, pos)
            found = mih_kernels.within(q, radius, *args)
            if found <= room:
                return _order(dist[:found], self._keys[pos[:found]])
            room = found


class AutoEngine(MIHEngine):
    """`mih` where it wins (AUTO_MIN_ITEMS codes or more of at most AUTO_MAX_BITS bits,
    k ≤ AUTO_MAX_K), else `exact`."""

    name = "auto"
    min_items = AUTO_MIN_ITEMS
    max_k = AUTO_MAX_K
    max_bits = AUTO_MAX_BITS

    def _probes(self, queries: int, k: int) -> bool:
        batch_scans = (
            queries > 1 and k > AUTO_BATCH_MAX_K and len(self._keys) < AUTO_BATCH_MIN_ITEMS
        )
        return k <= self.max_k and not batch_scans
