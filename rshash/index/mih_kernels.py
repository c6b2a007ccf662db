"""Compiled multi-index hashing (Norouzi, Punjani, Fleet, TPAMI 2014): tables, k-NN and range.

A code's bits are split into m contiguous substrings; table j holds every item sorted by its j-th
substring (a counting sort: bucket offsets over all 2^len values, then the items). By pigeonhole,
an item within Hamming distance m·r' + j of the query has, among substrings 0..j, one within r'
of the query's, or one within r' - 1 among the others. So probing (r', j) in the order
r' = 0, 1, ...; j = 0..m-1 (every bucket at exactly r' from the query's j-th substring) finds
every item within m·r' + j after that step; k-NN stops once its k-th distance is that small.

Each table row holds the item's position (uint32) and a 32-bit sketch: the code's bits that
follow substring j (cyclically, none of substring j's own). A candidate met in bucket b at r' is
at least r' + popcount(sketch ^ query's sketch) from the query (disjoint bits), so most
candidates are rejected by one sequential 4-byte read (a bucket's bounds in one branch-free pass
into a bit mask per 64 rows); only those within the k-th distance read their full code from the
archive (word-major, one cache miss per word). This costs 8 bytes per
item and table instead of a full code copy (12 bytes per table at 64 bits), at the price of a
miss for the few that pass.
Buckets are probed in chunks: their offsets and first rows are prefetched a chunk ahead, so the
two dependent cache misses per bucket overlap across buckets instead of adding up.
An item met again in a later step is recognised without state: it is new only at its first step,
the smallest (substring distance, j) over its substrings.
Results follow the scan's tie rule: by (distance, position).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from rshash.index.kernels import FAR, NO_ITEM, _popcount, _trailing_zeros

MAX_SUBSTRING = 24  # bits: direct-addressed buckets, 2^24 offsets (64 MiB) per table at most
SKETCH = 32  # bits of each row's sketch (uint32)
CHUNK = 32  # buckets whose offsets and first rows are prefetched together
PROBE = 8  # work units (candidates) a bucket costs in the budget: at 16 (the ratio of the unit
# costs fitted under load) every top-100 query at 1e7 codes passed it and was scanned again
VERIFY = 8  # work units a full code read costs (a random archive read; at 128 bits nearly every
# candidate passes its sketch's bound, and uncounted they made a cut query cost 5-12 scans)


@intrinsic
def _prefetch(typingctx, arr, index):
    """llvm.prefetch of arr[index] (a tuple of indices; no bounds check: a prefetch never
    faults, so a row one past the end is harmless)."""
    sig = types.void(arr, index)

    def codegen(context, builder, signature, args):
        aryty, idxty = signature.args
        ary = context.make_array(aryty)(context, builder, args[0])
        idx = [
            context.cast(builder, v, t, types.intp)
            for v, t in zip(cgutils.unpack_tuple(builder, args[1], len(idxty)), idxty, strict=True)
        ]
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, idx, wraparound=False)
        i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
        builder.call(fn, [builder.bitcast(ptr, i8p), i32(0), i32(3), i32(1)])
        return context.get_dummy_value()

    return sig, codegen


@njit(inline="always")
def _substring(lo_word, hi_word, off, length):
    """`length` (< 64) bits from bit `off` of lo_word on, continued into hi_word past bit 63."""
    v = lo_word >> np.uint64(off)
    if off + length > 64:
        v |= hi_word << np.uint64(64 - off)
    return v & ((np.uint64(1) << np.uint64(length)) - np.uint64(1))


@njit(inline="always")
def _item_bits(words, i, start, length):
    """`length` bits from bit `start` of item i's code (words word-major)."""
    w, off = start >> 6, start & 63
    hi = words[w + 1, i] if off + length > 64 else np.uint64(0)
    return _substring(words[w, i], hi, off, length)


@njit(inline="always")
def _query_bits(q, start, length):
    """`length` bits from bit `start` of the query's words."""
    w, off = start >> 6, start & 63
    hi = q[w + 1] if off + length > 64 else np.uint64(0)
    return _substring(q[w], hi, off, length)


@njit(inline="always")
def _sketch_range(starts, lens, j):
    """(first bit, bits) of table j's sketch: the bits after substring j, cyclically."""
    m = starts.shape[0]
    span = starts[m - 1] + lens[m - 1]
    return (starts[j] + lens[j]) % span, min(SKETCH, span - lens[j]), span


@njit(inline="always")
def _item_sketch(words, i, starts, lens, j):
    st, length, span = _sketch_range(starts, lens, j)
    first = min(length, span - st)
    v = _item_bits(words, i, st, first)
    if length > first:
        v |= _item_bits(words, i, 0, length - first) << np.uint64(first)
    return v


@njit(inline="always")
def _query_sketches(q, starts, lens):
    m = starts.shape[0]
    out = np.empty(m, np.uint64)
    for j in range(m):
        st, length, span = _sketch_range(starts, lens, j)
        first = min(length, span - st)
        v = _query_bits(q, st, first)
        if length > first:
            v |= _query_bits(q, 0, length - first) << np.uint64(first)
        out[j] = v
    return out


@njit(inline="always")
def _query_substrings(q, starts, lens):
    m = starts.shape[0]
    qs = np.empty(m, np.uint64)
    for j in range(m):
        qs[j] = _query_bits(q, starts[j], lens[j])
    return qs


@njit(parallel=True, cache=True)
def build(words, starts, lens, offsets, pos, sketch):
    """Fill table j (in parallel over tables): offsets[j, b] = first row of bucket b, rows in
    position order within a bucket; pos[j, t] and sketch[j, t] the row's item and sketch."""
    n = words.shape[1]
    for j in prange(starts.shape[0]):
        values = np.empty(n, np.uint32)
        nb = 1 << lens[j]
        cursor = np.zeros(nb + 1, np.int64)
        for i in range(n):
            v = np.uint32(_item_bits(words, i, starts[j], lens[j]))
            values[i] = v
            cursor[v + 1] += 1
        for b in range(nb):
            cursor[b + 1] += cursor[b]
        for b in range(nb + 1):
            offsets[j, b] = cursor[b]
        for i in range(n):
            t = cursor[values[i]]
            cursor[values[i]] += 1
            pos[j, t] = i
            sketch[j, t] = np.uint32(_item_sketch(words, i, starts, lens, j))


@njit(parallel=True, cache=True)
def gather(words, starts, lens, offsets, pos, sketch):
    """Refill sketch[j, t] from saved offsets and positions, checking them: returns 0 when every
    table holds each of the n items exactly once, in the bucket of its substring, else 1 + the
    first bad table (so a damaged file can never make a search read out of bounds)."""
    n = words.shape[1]
    m = starts.shape[0]
    bad = np.zeros(m, np.int64)
    for j in prange(m):
        nb = 1 << lens[j]
        if offsets[j, 0] != 0 or offsets[j, nb] != n:
            bad[j] = 1
            continue
        seen = np.zeros(n, np.bool_)
        for b in range(nb):
            if offsets[j, b + 1] < offsets[j, b]:
                bad[j] = 1
                break
            for t in range(offsets[j, b], offsets[j, b + 1]):
                i = pos[j, t]
                if i >= n or seen[i] or _item_bits(words, i, starts[j], lens[j]) != b:
                    bad[j] = 1
                    break
                seen[i] = True
                sketch[j, t] = np.uint32(_item_sketch(words, i, starts, lens, j))
            if bad[j]:
                break
    for j in range(m):
        if bad[j]:
            return j + 1
    return 0


@njit(inline="always")
def _next_mask(x):
    """The next larger integer with as many set bits (Gosper's hack); x > 0."""
    c = x & (~x + np.uint64(1))
    r = x + c
    return (((r ^ x) >> np.uint64(2)) >> _trailing_zeros(c)) | r


@njit(inline="always")
def _first_seen(words, i, j, rp, qs, starts, lens):
    """Whether step (rp, j) is the first that meets item i: no substring jj nearer than rp,
    nor as near with jj < j."""
    for jj in range(starts.shape[0]):
        if jj != j:
            dj = np.int64(_popcount(_item_bits(words, i, starts[jj], lens[jj]) ^ qs[jj]))
            if dj < rp or (dj == rp and jj < j):
                return False
    return True


@njit(inline="always")
def _allowed(allowed, i):
    return (allowed[i >> 6] >> np.uint64(i & 63)) & np.uint64(1)


@njit(inline="always")
def _distance(words, i, q):
    d = np.uint64(0)
    for x in range(words.shape[0]):
        d += _popcount(words[x, i] ^ q[x])
    return np.int64(d)


@njit(inline="always")
def _insert(best_d, best_p, d, p):
    """Insert (d, p) into the sorted row, ordered by (distance, position)."""
    r = best_d.shape[0] - 1
    while r > 0 and (best_d[r - 1] > d or (best_d[r - 1] == d and best_p[r - 1] > p)):
        best_d[r] = best_d[r - 1]
        best_p[r] = best_p[r - 1]
        r -= 1
    best_d[r] = d
    best_p[r] = p


@njit(inline="always")
def _fill_chunk(offsets, sketch, j, qsj, rp, mask, limit, chunk):
    """The next buckets at exactly rp from qsj (from `mask` on) into chunk, their offsets and
    rows prefetched; returns (count, the mask to continue from)."""
    c = 0
    while c < chunk.shape[0] and mask < limit:
        b = np.int64(qsj ^ mask)
        chunk[c] = b
        _prefetch(offsets, (j, b))
        c += 1
        mask = limit if rp == 0 else _next_mask(mask)
    for i in range(c):
        for t in range(np.int64(offsets[j, chunk[i]]), np.int64(offsets[j, chunk[i] + 1]), 16):
            _prefetch(sketch, (j, t))
    return c, mask


@njit(cache=True, nogil=True)
def knn_one(q, k, starts, lens, offsets, pos, sketch, words, allowed, full, budget, best_d, best_p,
            work):  # fmt: skip
    """Exact top-k of one query into best_d/best_p (sorted by (distance, position), padded with
    (FAR, -1)); work[0], work[1], work[2] count the buckets probed, the candidates met and those
    whose full code was read (past their sketch's bound). Returns False once
    PROBE · buckets + candidates + VERIFY · full reads passes `budget` (the caller then scans)."""
    m = starts.shape[0]
    qs = _query_substrings(q, starts, lens)
    qk = _query_sketches(q, starts, lens)
    chunks = np.empty((2, CHUNK), np.int64)
    longest = 0
    for j in range(m):
        longest = max(longest, lens[j])
    kth = best_d[k - 1]
    for rp in range(longest + 1):
        for j in range(m):
            if kth <= m * rp + j - 1:  # every item that near is already found
                return True
            length = lens[j]
            if rp > length:
                continue
            limit = np.uint64(1) << np.uint64(length)
            mask = (np.uint64(1) << np.uint64(rp)) - np.uint64(1)
            cur, qkj = 0, qk[j]
            c, mask = _fill_chunk(offsets, sketch, j, qs[j], rp, mask, limit, chunks[0])
            while c:
                nxt = 0
                if mask < limit:  # the next chunk's misses overlap this chunk's work
                    nxt, mask = _fill_chunk(
                        offsets, sketch, j, qs[j], rp, mask, limit, chunks[1 - cur]
                    )
                for i in range(c):
                    b = chunks[cur, i]
                    a0, a1 = np.int64(offsets[j, b]), np.int64(offsets[j, b + 1])
                    work[0] += 1
                    work[1] += a1 - a0
                    for g in range(a0, a1, 64):  # sketch bounds of 64 rows, then their passes
                        if kth < rp:
                            break
                        passed = np.uint64(0)
                        for t in range(g, min(a1, g + 64)):
                            near = np.int64(_popcount(np.uint64(sketch[j, t]) ^ qkj)) <= kth - rp
                            passed |= np.uint64(near) << np.uint64(t - g)
                        while passed:
                            t = g + np.int64(_trailing_zeros(passed))
                            passed &= passed - np.uint64(1)
                            p = np.int64(pos[j, t])
                            d = _distance(words, p, q)
                            work[2] += 1
                            if d > kth or (d == kth and p > best_p[k - 1] >= 0):
                                continue
                            if not full and not _allowed(allowed, p):
                                continue
                            if _first_seen(words, p, j, rp, qs, starts, lens):
                                _insert(best_d, best_p, d, p)
                                kth = best_d[k - 1]
                    if PROBE * work[0] + work[1] + VERIFY * work[2] > budget:
                        return False
                c, cur = nxt, 1 - cur
    return True


@njit(cache=True, nogil=True)
def knn_serial(queries, k, starts, lens, offsets, pos, sketch, words, allowed, full, budget):
    """knn_one for each query in turn (one query: no thread start-up)."""
    nq = queries.shape[0]
    out_d = np.full((nq, k), FAR, np.int64)
    out_p = np.full((nq, k), NO_ITEM, np.int64)
    ok = np.empty(nq, np.bool_)
    work = np.zeros((nq, 3), np.int64)
    for i in range(nq):
        ok[i] = knn_one(
            queries[i], k, starts, lens, offsets, pos, sketch, words, allowed, full, budget,
            out_d[i], out_p[i], work[i],
        )  # fmt: skip
    return out_d, out_p, ok, work


@njit(parallel=True, cache=True)
def knn_parallel(queries, k, starts, lens, offsets, pos, sketch, words, allowed, full, budget):
    """knn_one for a batch, queries in parallel."""
    nq = queries.shape[0]
    out_d = np.full((nq, k), FAR, np.int64)
    out_p = np.full((nq, k), NO_ITEM, np.int64)
    ok = np.empty(nq, np.bool_)
    work = np.zeros((nq, 3), np.int64)
    for i in prange(nq):
        ok[i] = knn_one(
            queries[i], k, starts, lens, offsets, pos, sketch, words, allowed, full, budget,
            out_d[i], out_p[i], work[i],
        )  # fmt: skip
    return out_d, out_p, ok, work


@njit(cache=True)
def within(q, radius, starts, lens, offsets, pos, sketch, words, allowed, full, out_d, out_p):
    """Every allowed item within `radius` of query q, unordered, into out_d/out_p; returns how
    many there are (only the first len(out_d) are written: call again with room for them)."""
    m = starts.shape[0]
    qs = _query_substrings(q, starts, lens)
    qk = _query_sketches(q, starts, lens)
    found = 0
    rp = 0
    while m * rp <= radius:
        for j in range(m):
            if m * rp + j > radius:  # the steps so far cover `radius`
                break
            length = lens[j]
            if rp > length:
                continue
            limit = np.uint64(1) << np.uint64(length)
            mask = (np.uint64(1) << np.uint64(rp)) - np.uint64(1)
            while mask < limit:
                b = qs[j] ^ mask
                for t in range(offsets[j, b], offsets[j, b + 1]):
                    if rp + np.int64(_popcount(np.uint64(sketch[j, t]) ^ qk[j])) > radius:
                        continue
                    p = np.int64(pos[j, t])
                    d = _distance(words, p, q)
                    if d > radius or (not full and not _allowed(allowed, p)):
                        continue
                    if _first_seen(words, p, j, rp, qs, starts, lens):
                        if found < out_d.shape[0]:
                            out_d[found] = d
                            out_p[found] = p
                        found += 1
                if rp == 0:
                    break
                mask = _next_mask(mask)
        rp += 1
    return found
