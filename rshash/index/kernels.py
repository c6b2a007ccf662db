"""Compiled Hamming-distance kernels (numba): exact top-k, range search, and throughput probes.

Codes are held word-major: `words[w, i]` is the w-th 64-bit word of item i, so that for one query
the distance loop over items is a flat, vectorisable XOR + popcount (AVX-512 VPOPCNTQ where the CPU
has it; numba compiles for the host). Items are scanned in cache-sized blocks; each block is
reused by every query of a batch before moving on, so a batch reads the archive from memory once.
A block whose nearest item could enter a query's top-k gets its distances in one more vector pass
and a bit mask per 64 items, so the rare candidates are never walked item by item. The first
blocks are searched in two passes (block minima, then candidates under their k-th smallest), so
that a cold top-k list does not turn them all into candidates.
Everything in the loops is indexed, never sliced: a numba slice is a view whose reference count is
updated atomically, which costs more than the distances in these short loops.
Results are ordered by (distance, position): among equal distances the earlier item wins, which
is what a stable sort of the distances gives.

Every search takes `allowed`, a bit set over positions (bit i of word i // 64: item i may be
returned; see `allowed_bits`). Tombstones and filters clear bits. The bits are applied to the
candidate masks, so a filtered search is still exact top-k among the allowed items at no cost to
the scan; block minima over all items stay valid lower bounds. Only the warm start's caps need
minima over allowed items, which it computes when some bit is clear.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

BLOCK = 1024  # items per block: 8 KiB of 64-bit codes stay in L1 while every query visits them
GROUP = 64  # items per candidate mask: one bit each in a uint64
WARM = 1024  # blocks that fill the top-k rows in two passes: 8 MiB of 64-bit codes, in L3
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
def _at(j):
    """An unsigned index: numba then skips the negative-index fix-up, which blocks vectorising."""
    return np.uint64(j)


@njit(inline="always")
def _distances(words, queries, q, start, stop, acc, nwords):
    """acc[j] = distance from query q to item start + j over the first `nwords` words."""
    q_head = queries[q, 0]
    for j in range(start, stop):
        acc[_at(j - start)] = _popcount(words[0, _at(j)] ^ q_head)
    for w in range(1, nwords):
        qw = queries[q, w]
        for j in range(start, stop):
            acc[_at(j - start)] += _popcount(words[w, _at(j)] ^ qw)


@njit(inline="always")
def _block_min(words, queries, q, start, stop, acc):
    """Smallest distance from query q to items start..stop (`acc`: scratch for K > 128).

    A fused XOR + popcount + min over a contiguous row vectorises fully; the caller rechecks a
    block only when it holds a candidate, which after the first blocks is rare.
    """
    last = words.shape[0] - 1
    lo = np.uint64(FAR)
    q_tail = queries[q, last]
    if last == 0:
        for j in range(start, stop):
            lo = min(lo, _popcount(words[0, _at(j)] ^ q_tail))
        return np.int32(lo)
    if last == 1:  # 128 bits: both words in one fused loop
        q_head = queries[q, 0]
        for j in range(start, stop):
            lo = min(
                lo, _popcount(words[0, _at(j)] ^ q_head) + _popcount(words[1, _at(j)] ^ q_tail)
            )
        return np.int32(lo)
    _distances(words, queries, q, start, stop, acc, last)
    for j in range(start, stop):
        lo = min(lo, acc[_at(j - start)] + _popcount(words[last, _at(j)] ^ q_tail))
    return np.int32(lo)


@njit(inline="always")
def _allowed_min(words, queries, q, start, stop, acc, allowed):
    """Smallest distance from query q to the allowed items start..stop (FAR when none)."""
    _distances(words, queries, q, start, stop, acc, words.shape[0])
    lo = np.uint64(FAR)
    for j in range(start, stop):
        bit = (allowed[_at(j >> 6)] >> np.uint64(j & 63)) & np.uint64(1)
        lo = min(lo, acc[_at(j - start)] if bit else np.uint64(FAR))
    return np.int32(lo)


@njit(inline="always")
def _block_allowed(allowed, start, stop):
    """1: every item start..stop allowed, 0: none, -1: some (start a multiple of 64)."""
    every, some = True, False
    for w in range(start >> 6, (stop + 63) >> 6):
        want = np.uint64(0xFFFFFFFFFFFFFFFF)
        if (w + 1) * 64 > stop:
            want = (np.uint64(1) << np.uint64(stop - w * 64)) - np.uint64(1)
        got = allowed[_at(w)] & want
        every = every and got == want
        some = some or got != np.uint64(0)
    return 1 if every else (0 if not some else -1)


@njit(cache=True)
def all_allowed(allowed, n):
    """Whether every one of the n items is allowed."""
    full = n // 64
    for w in range(full):
        if allowed[w] != np.uint64(0xFFFFFFFFFFFFFFFF):
            return False
    if n % 64:
        want = (np.uint64(1) << np.uint64(n % 64)) - np.uint64(1)
        if allowed[full] & want != want:
            return False
    return True


def allowed_bits(mask: np.ndarray) -> np.ndarray:
    """A boolean mask over n items → the kernels' bit set: ⌈n/64⌉ uint64 words."""
    words = np.zeros(-(-len(mask) // 64) * 8, np.uint8)
    packed = np.packbits(np.asarray(mask, bool), bitorder="little")
    words[: len(packed)] = packed
    return words.view("<u8").astype(np.uint64)


@njit(inline="always")
def _insert(best_d, best_i, q, d, item):
    """Insert (d, item) into query q's sorted top-k row, after any equal distances."""
    p = best_d.shape[1] - 1
    while p > 0 and best_d[q, p - 1] > d:
        best_d[q, p] = best_d[q, p - 1]
        best_i[q, p] = best_i[q, p - 1]
        p -= 1
    best_d[q, p] = d
    best_i[q, p] = item


@njit(inline="always")
def _scan_candidate(words, queries, q, start, stop, acc, best_d, best_i, cap, allowed):
    """Update query q's sorted top-k row (best_d[q], best_i[q]) with the allowed items
    start..stop that are nearer than `cap`, in item order.

    The block's distances come from one vector pass, then a bit mask per GROUP items from
    branch-free compares, and-ed with the allowed bits; only the set bits are visited.
    """
    last = best_d.shape[1] - 1
    _distances(words, queries, q, start, stop, acc, words.shape[0])
    for g in range(start, stop, GROUP):
        t = np.uint64(min(best_d[q, last], cap))
        mask = np.uint64(0)
        for j in range(g, min(g + GROUP, stop)):
            mask |= np.uint64(acc[_at(j - start)] < t) << np.uint64(j - g)
        mask &= allowed[_at(g >> 6)]
        while mask:
            i = g + np.int64(_trailing_zeros(mask))
            mask &= mask - np.uint64(1)
            d = np.int32(acc[_at(i - start)])
            if d < best_d[q, last]:
                _insert(best_d, best_i, q, d, i)


@njit(inline="always")
def _caps(hist, k, cap):
    """cap[j] = 1 + the k-th smallest block minimum of query j (no cap with fewer blocks)."""
    nq, width = hist.shape
    for j in range(nq):
        cap[j] = width
        seen = 0
        for d in range(width):
            seen += hist[j, d]
            if seen >= k:
                cap[j] = d + 1
                break


@njit(inline="always")
def _warm_start(words, queries, q_lo, q_hi, b_lo, b_hi, acc, best_d, best_i, allowed, full):
    """Fill the top-k rows of queries q_lo..q_hi from blocks b_lo..b_hi, in two passes.

    First the nearest distance of every (block, query); the k-th smallest per query caps the
    distances that can enter the top-k (k blocks hold k distinct items that near). Then only
    the blocks whose minimum is under that cap and the current k-th distance are visited. A
    cold top-k row would instead let a stream of early candidates through. With some items not
    allowed (`full` false), a block's minimum is taken over its allowed items (the fused minimum
    where all are allowed, none where none is), so the caps stay exact.
    """
    n, k = words.shape[1], best_d.shape[1]
    mins = np.empty((b_hi - b_lo, q_hi - q_lo), np.int32)
    hist = np.zeros((q_hi - q_lo, 64 * words.shape[0] + 1), np.int32)
    cap = np.empty(q_hi - q_lo, np.int32)
    for b in range(b_lo, b_hi):
        start = b * BLOCK
        stop = min(start + BLOCK, n)
        state = 1 if full else _block_allowed(allowed, start, stop)
        for q in range(q_lo, q_hi):
            if full or state == 1:
                m = _block_min(words, queries, q, start, stop, acc)
            elif state == 0:
                m = np.int32(FAR)
            else:
                m = _allowed_min(words, queries, q, start, stop, acc, allowed)
            mins[b - b_lo, q - q_lo] = m
            if m < FAR:
                hist[q - q_lo, m] += 1
    _caps(hist, k, cap)
    for b in range(b_lo, b_hi):
        start = b * BLOCK
        stop = min(start + BLOCK, n)
        for q in range(q_lo, q_hi):
            c = cap[q - q_lo]
            if mins[b - b_lo, q - q_lo] < min(best_d[q, k - 1], c):
                _scan_candidate(words, queries, q, start, stop, acc, best_d, best_i, c, allowed)


@njit(parallel=True, cache=True)
def _topk_tiles(words, queries, k, parts, threads, warm, allowed, full):
    """Top-k of every query over `parts` contiguous block ranges: (parts, q, k) partial results.

    Tiles (query chunk × block range) run in parallel: a batch splits over queries, a single
    query over blocks. The first `warm` blocks of a tile fill its rows (`_warm_start`); after
    them a block is rescanned only when its minimum can still enter a query's row.
    """
    n, nq = words.shape[1], queries.shape[0]
    nblocks = (n + BLOCK - 1) // BLOCK
    qchunks = max(1, min(nq, threads))
    out_d = np.full((parts, nq, k), FAR, np.int32)
    out_i = np.full((parts, nq, k), NO_ITEM, np.int64)
    per_part = (nblocks + parts - 1) // parts
    for tile in prange(parts * qchunks):
        part, chunk = tile // qchunks, tile % qchunks
        b_lo, b_hi = part * per_part, min(nblocks, (part + 1) * per_part)
        q_lo, q_hi = chunk * nq // qchunks, (chunk + 1) * nq // qchunks
        acc = np.empty(BLOCK, np.uint64)
        best_d, best_i = out_d[part], out_i[part]
        w_hi = min(b_hi, b_lo + warm)
        _warm_start(words, queries, q_lo, q_hi, b_lo, w_hi, acc, best_d, best_i, allowed, full)
        for b in range(w_hi, b_hi):
            start = b * BLOCK
            stop = min(start + BLOCK, n)
            for q in range(q_lo, q_hi):
                if _block_min(words, queries, q, start, stop, acc) < best_d[q, k - 1]:
                    _scan_candidate(
                        words, queries, q, start, stop, acc, best_d, best_i, FAR, allowed
                    )
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
                _insert(out_d, out_i, q, d, tile_i[part, q, r])
    return out_d, out_i


@njit(cache=True)
def topk(words, keys, queries, k, parts, threads, allowed, warm=WARM):
    """Exact top-k among allowed items: (distances, keys) per query, (FAR, -1) past the end.

    `parts` item ranges are searched in parallel, each over `threads` query chunks; the first
    `warm` blocks of each range are searched in two passes. One compiled call from query words
    to keys, so a single query pays one dispatch.
    """
    full = all_allowed(allowed, words.shape[1])
    dist, pos = _merge_tiles(*_topk_tiles(words, queries, k, parts, threads, warm, allowed, full))
    out = np.full(pos.shape, NO_ITEM, np.int64)
    for q in range(pos.shape[0]):
        for r in range(k):
            if pos[q, r] >= 0:
                out[q, r] = keys[pos[q, r]]
    return dist, out


@njit(parallel=True, cache=True)
def range_counts(words, queries, radius, allowed):
    """Number of allowed items within Hamming `radius` of each query."""
    nq, n = queries.shape[0], words.shape[1]
    counts = np.zeros(nq, np.int64)
    for q in prange(nq):
        acc = np.empty(BLOCK, np.uint64)
        c = 0
        for start in range(0, n, BLOCK):
            stop = min(start + BLOCK, n)
            if _block_min(words, queries, q, start, stop, acc) <= radius:
                _distances(words, queries, q, start, stop, acc, words.shape[0])
                r = np.uint64(radius)
                for j in range(start, stop):
                    bit = (allowed[_at(j >> 6)] >> np.uint64(j & 63)) & np.uint64(1)
                    c += (acc[_at(j - start)] <= r) & (bit == 1)
        counts[q] = c
    return counts


@njit(parallel=True, cache=True)
def range_fill(words, queries, radius, offsets, out_d, out_i, allowed):
    """Write the (distance, position) of every allowed item within `radius`, in item order."""
    nq, n = queries.shape[0], words.shape[1]
    for q in prange(nq):
        acc = np.empty(BLOCK, np.uint64)
        at = offsets[q]
        for start in range(0, n, BLOCK):
            stop = min(start + BLOCK, n)
            if _block_min(words, queries, q, start, stop, acc) > radius:
                continue
            _distances(words, queries, q, start, stop, acc, words.shape[0])
            r = np.uint64(radius)
            for j in range(start, stop):
                bit = (allowed[_at(j >> 6)] >> np.uint64(j & 63)) & np.uint64(1)
                if acc[_at(j - start)] <= r and bit:
                    out_d[at] = acc[_at(j - start)]
                    out_i[at] = j
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
