"""Compiled Hamming-distance kernels (numba): exact top-k, range search, and throughput probes.

Codes are held word-major: `words[w, i]` is the w-th 64-bit word of item i, so that for one query
the distance loop over items is a flat, vectorisable XOR + popcount (AVX-512 VPOPCNTQ where the CPU
has it; numba compiles for the host). Items are scanned in cache-sized blocks; each block is
reused by every query of a batch before moving on, so a batch reads the archive from memory once.
A block whose nearest item could enter a query's top-k is rescanned in groups of 64 items that
yield a bit mask of the items to insert, so the rare candidates cost two vector passes, not a
scalar one.
Results are ordered by (distance, position): among equal distances the earlier item wins, which
is what a stable sort of the distances gives.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

BLOCK = 1024  # items per block: 8 KiB of 64-bit codes stay in L1 while every query visits them
PART = 256  # a candidate block is rechecked in parts of this many items
GROUP = 64  # items per candidate mask: one bit each in a uint64
NO_ITEM = -1
FAR = np.iinfo(np.int32).max


@intrinsic
def _popcount(typingctx, x):
    """llvm.ctpop on a uint64, so the loop vectoriser can emit a vector popcount."""
    sig = types.uint64(types.uint64)

    def codegen(context, builder, signature, args):
        fn = builder.module.declare_intrinsic("llvm.ctpop", [ir.IntType(64)])
        return builder.call(fn, args)

    return sig, codegen


@intrinsic
def _trailing_zeros(typingctx, x):
    """llvm.cttz on a non-zero uint64: the position of its lowest set bit."""
    sig = types.uint64(types.uint64)

    def codegen(context, builder, signature, args):
        fn = builder.module.declare_intrinsic("llvm.cttz", [ir.IntType(64), ir.IntType(1)])
        return builder.call(fn, [args[0], ir.Constant(ir.IntType(1), 1)])

    return sig, codegen


@njit(inline="always")
def _distance(words, query, i):
    d = np.uint64(0)
    for w in range(words.shape[0]):
        d += _popcount(words[w, i] ^ query[w])
    return np.int32(d)


@njit(inline="always")
def _partial_distances(words, query, start, stop, acc):
    """acc[j] = distance of item start + j over every word but the last (codes of K > 128)."""
    m = stop - start
    head = words[0, start:stop]
    q_head = query[0]
    for j in range(m):
        acc[j] = _popcount(head[j] ^ q_head)
    for w in range(1, words.shape[0] - 1):
        row = words[w, start:stop]
        qw = query[w]
        for j in range(m):
            acc[j] += _popcount(row[j] ^ qw)


@njit(inline="always")
def _block_min(words, query, start, stop, acc):
    """Smallest distance from `query` to items start..stop (`acc`: scratch for K > 64).

    A fused XOR + popcount + min over a contiguous row vectorises fully; the caller rechecks a
    block only when it holds a candidate, which after the first blocks is rare.
    """
    last = words.shape[0] - 1
    m = stop - start
    lo = np.uint64(FAR)
    tail = words[last, start:stop]
    q_tail = query[last]
    if last == 0:
        for j in range(m):
            lo = min(lo, _popcount(tail[j] ^ q_tail))
        return np.int32(lo)
    head = words[0, start:stop]
    q_head = query[0]
    if last == 1:  # 128 bits: both words in one fused loop
        for j in range(m):
            lo = min(lo, _popcount(head[j] ^ q_head) + _popcount(tail[j] ^ q_tail))
        return np.int32(lo)
    _partial_distances(words, query, start, stop, acc)
    for j in range(m):
        lo = min(lo, acc[j] + _popcount(tail[j] ^ q_tail))
    return np.int32(lo)


@njit(inline="always")
def _group_mask(words, query, start, stop, acc, thr):
    """Bit j set when item start + j is nearer than `thr` (at most GROUP items).

    Written as a shift-or over a fixed-size loop so that it compiles to vector compares into
    mask registers, with no branch per item.
    """
    last = words.shape[0] - 1
    m = stop - start
    t = np.uint64(thr)
    mask = np.uint64(0)
    tail = words[last, start:stop]
    q_tail = query[last]
    if last == 0:
        for j in range(m):
            mask |= np.uint64(_popcount(tail[j] ^ q_tail) < t) << np.uint64(j)
        return mask
    _partial_distances(words, query, start, stop, acc)
    for j in range(m):
        mask |= np.uint64(acc[j] + _popcount(tail[j] ^ q_tail) < t) << np.uint64(j)
    return mask


@njit(inline="always")
def _insert(best_d, best_i, d, item):
    """Insert (d, item) into the sorted top-k row, after any equal distances."""
    p = best_d.shape[0] - 1
    while p > 0 and best_d[p - 1] > d:
        best_d[p] = best_d[p - 1]
        best_i[p] = best_i[p - 1]
        p -= 1
    best_d[p] = d
    best_i[p] = item


@njit(inline="always")
def _scan_block(words, query, start, stop, acc, best_d, best_i):
    """Update one query's sorted top-k row with the items start..stop, in item order."""
    k = best_d.shape[0]
    if _block_min(words, query, start, stop, acc) >= best_d[k - 1]:
        return
    for part in range(start, stop, PART):
        end = min(part + PART, stop)
        if _block_min(words, query, part, end, acc) >= best_d[k - 1]:
            continue
        for g in range(part, end, GROUP):
            mask = _group_mask(words, query, g, min(g + GROUP, end), acc, best_d[k - 1])
            while mask:
                i = g + np.int64(_trailing_zeros(mask))
                mask &= mask - np.uint64(1)
                d = _distance(words, query, i)
                if d < best_d[k - 1]:
                    _insert(best_d, best_i, d, i)


@njit(parallel=True, cache=True)
def _topk_tiles(words, queries, k, parts, threads):
    """Top-k of every query over `parts` contiguous item ranges: (parts, q, k) partial results.

    Tiles (query chunk × item range) run in parallel; a batch splits over queries, a single
    query over item ranges.
    """
    n = words.shape[1]
    nq = queries.shape[0]
    qchunks = max(1, min(nq, threads))
    out_d = np.full((parts, nq, k), FAR, np.int32)
    out_i = np.full((parts, nq, k), NO_ITEM, np.int64)
    span = (n + parts - 1) // parts
    for tile in prange(parts * qchunks):
        part, chunk = tile // qchunks, tile % qchunks
        lo, hi = part * span, min(n, (part + 1) * span)
        q_lo, q_hi = chunk * nq // qchunks, (chunk + 1) * nq // qchunks
        acc = np.empty(BLOCK, np.uint64)
        for start in range(lo, hi, BLOCK):
            stop = min(start + BLOCK, hi)
            for q in range(q_lo, q_hi):
                _scan_block(words, queries[q], start, stop, acc, out_d[part, q], out_i[part, q])
    return out_d, out_i


@njit(cache=True)
def _merge_tiles(tile_d, tile_i):
    """Merge per-range top-k lists (ranges in item order) into one top-k per query."""
    parts, nq, k = tile_d.shape
    if parts == 1:
        return tile_d[0], tile_i[0]
    out_d = np.full((nq, k), FAR, np.int32)
    out_i = np.full((nq, k), NO_ITEM, np.int64)
    for q in range(nq):
        for part in range(parts):
            for r in range(k):
                d = tile_d[part, q, r]
                if d >= out_d[q, k - 1]:
                    break
                _insert(out_d[q], out_i[q], d, tile_i[part, q, r])
    return out_d, out_i


@njit(cache=True)
def topk(words, keys, queries, k, parts, threads):
    """Exact top-k: (distances, keys) per query, (FAR, -1) past the end of the archive.

    One compiled call from query words to keys, so a single query pays one dispatch.
    """
    dist, pos = _merge_tiles(*_topk_tiles(words, queries, k, parts, threads))
    out = np.full(pos.shape, NO_ITEM, np.int64)
    for q in range(pos.shape[0]):
        for r in range(k):
            if pos[q, r] >= 0:
                out[q, r] = keys[pos[q, r]]
    return dist, out


@njit(parallel=True, cache=True)
def range_counts(words, queries, radius):
    """Number of items within Hamming `radius` of each query."""
    nq, n = queries.shape[0], words.shape[1]
    counts = np.zeros(nq, np.int64)
    for q in prange(nq):
        acc = np.empty(BLOCK, np.uint64)
        query = queries[q]
        c = 0
        for start in range(0, n, BLOCK):
            stop = min(start + BLOCK, n)
            if _block_min(words, query, start, stop, acc) <= radius:
                for i in range(start, stop):
                    c += _distance(words, query, i) <= radius
        counts[q] = c
    return counts


@njit(parallel=True, cache=True)
def range_fill(words, queries, radius, offsets, out_d, out_i):
    """Write the (distance, position) of every item within `radius`, per query, in item order."""
    nq, n = queries.shape[0], words.shape[1]
    for q in prange(nq):
        acc = np.empty(BLOCK, np.uint64)
        query = queries[q]
        at = offsets[q]
        for start in range(0, n, BLOCK):
            stop = min(start + BLOCK, n)
            if _block_min(words, query, start, stop, acc) > radius:
                continue
            for i in range(start, stop):
                d = _distance(words, query, i)
                if d <= radius:
                    out_d[at] = d
                    out_i[at] = i
                    at += 1


@njit(parallel=True, cache=True)
def popcount_throughput(words, repeats, threads):
    """XOR + popcount over an in-cache `words` array, `repeats` times on every thread.

    The batched-search ceiling: returns a checksum so the work cannot be optimised away.
    """
    sums = np.zeros(threads, np.int64)
    n = words.shape[0]
    for t in prange(threads):
        s = 0
        for r in range(repeats):
            key = np.uint64(r * 0x9E3779B97F4A7C15 + t)
            for j in range(n):
                s += _popcount(words[j] ^ key)
        sums[t] = s
    return sums.sum()


@njit(parallel=True, cache=True)
def read_bandwidth(data, threads):
    """XOR-reduce a uint64 array on every core: read bandwidth, the single-query ceiling."""
    n = data.shape[0]
    sums = np.zeros(threads, np.uint64)
    for t in prange(threads):
        part = data[t * n // threads : (t + 1) * n // threads]
        s = np.uint64(0)
        for j in range(part.shape[0]):
            s ^= part[j]
        sums[t] = s
    return sums.sum()
