"""Compiled multi-index hashing (Norouzi, Punjani, Fleet, TPAMI 2014): tables, k-NN and range.

A code's bits are split into m contiguous substrings; table j holds every item sorted by its j-th
substring (a counting sort: bucket offsets over all 2^len values, then the items). By pigeonhole,
an item within Hamming distance m·r' + j of the query has, among substrings 0..j, one within r'
of the query's, or one within r' - 1 among the others. So probing (r', j) in the order
r' = 0, 1, ...; j = 0..m-1 (every bucket at exactly r' from the query's j-th substring) finds
every item within m·r' + j after that step; k-NN stops once its k-th distance is that small.

Tables hold each item's full code beside its position (structure of arrays): candidates of a
bucket are then verified by a sequential read, not a cache miss per candidate into the archive.
An item met again in a later step is recognised without state: it is new only at its first step,
the smallest (substring distance, j) over its substrings.
Results follow the scan's tie rule: by (distance, position).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from rshash.index.kernels import FAR, NO_ITEM, _popcount, _trailing_zeros

MAX_SUBSTRING = 24  # bits: direct-addressed buckets, 2^24 offsets (64 MiB) per table at most
PROBE = 8  # work units (candidates) a bucket costs: cache misses to its offsets and first row


@njit(inline="always")
def _substring(lo_word, hi_word, off, length):
    """`length` bits from bit `off` of lo_word on, continued into hi_word past bit 63."""
    v = lo_word >> np.uint64(off)
    if off + length > 64:
        v |= hi_word << np.uint64(64 - off)
    return v & ((np.uint64(1) << np.uint64(length)) - np.uint64(1))


@njit(inline="always")
def _code_substring(codes, j, t, jj, starts, lens):
    """Substring jj of the code at row t of table j."""
    st, length = starts[jj], lens[jj]
    w, off = st >> 6, st & 63
    hi = codes[j, t, w + 1] if off + length > 64 else np.uint64(0)
    return _substring(codes[j, t, w], hi, off, length)


@njit(parallel=True, cache=True)
def build(words, starts, lens, offsets, codes, pos):
    """Fill table j (in parallel over tables): offsets[j, b] = first row of bucket b, rows in
    position order within a bucket; codes[j, t] and pos[j, t] the row's code and position."""
    nwords, n = words.shape
    for j in prange(starts.shape[0]):
        st, length = starts[j], lens[j]
        w, off = st >> 6, st & 63
        values = np.empty(n, np.uint32)
        nb = 1 << length
        cursor = np.zeros(nb + 1, np.int64)
        for i in range(n):
            hi = words[w + 1, i] if off + length > 64 else np.uint64(0)
            v = np.uint32(_substring(words[w, i], hi, off, length))
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
            for x in range(nwords):
                codes[j, t, x] = words[x, i]


@njit(parallel=True, cache=True)
def gather(words, starts, lens, offsets, pos, codes):
    """Refill codes[j, t] from saved offsets and positions, checking them: returns 0 when every
    table holds each of the n items exactly once, in the bucket of its substring, else 1 + the
    first bad table (so a damaged file can never make a search read out of bounds)."""
    nwords, n = words.shape
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
                if i >= n or seen[i]:
                    bad[j] = 1
                    break
                seen[i] = True
                for x in range(nwords):
                    codes[j, t, x] = words[x, i]
                if _code_substring(codes, j, t, j, starts, lens) != b:
                    bad[j] = 1
                    break
            if bad[j]:
                break
    for j in range(m):
        if bad[j]:
            return j + 1
    return 0


@njit(inline="always")
def _query_substrings(q, starts, lens):
    m = starts.shape[0]
    qs = np.empty(m, np.uint64)
    for j in range(m):
        st, length = starts[j], lens[j]
        w, off = st >> 6, st & 63
        hi = q[w + 1] if off + length > 64 else np.uint64(0)
        qs[j] = _substring(q[w], hi, off, length)
    return qs


@njit(inline="always")
def _next_mask(x):
    """The next larger integer with as many set bits (Gosper's hack); x > 0."""
    c = x & (~x + np.uint64(1))
    r = x + c
    return (((r ^ x) >> np.uint64(2)) >> _trailing_zeros(c)) | r


@njit(inline="always")
def _first_seen(codes, j, t, rp, qs, starts, lens):
    """Whether step (rp, j) is the first that meets row t of table j: no substring jj nearer
    than rp, nor as near with jj < j."""
    for jj in range(starts.shape[0]):
        if jj != j:
            dj = np.int64(_popcount(_code_substring(codes, j, t, jj, starts, lens) ^ qs[jj]))
            if dj < rp or (dj == rp and jj < j):
                return False
    return True


@njit(inline="always")
def _allowed(allowed, i):
    return (allowed[i >> 6] >> np.uint64(i & 63)) & np.uint64(1)


@njit(inline="always")
def _distance(codes, j, t, q):
    d = np.uint64(0)
    for x in range(codes.shape[2]):
        d += _popcount(codes[j, t, x] ^ q[x])
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


@njit(cache=True, nogil=True)
def knn_one(q, k, starts, lens, offsets, codes, pos, allowed, full, budget, best_d, best_p, work):
    """Exact top-k of one query into best_d/best_p (sorted by (distance, position), padded with
    (FAR, -1)); work[0], work[1] count the buckets probed and candidates verified. Returns
    False once PROBE · buckets + candidates passes `budget` (the caller then scans instead)."""
    m = starts.shape[0]
    qs = _query_substrings(q, starts, lens)
    longest = 0
    for j in range(m):
        longest = max(longest, lens[j])
    for rp in range(longest + 1):
        for j in range(m):
            if best_d[k - 1] <= m * rp + j - 1:  # every item that near is already found
                return True
            length = lens[j]
            if rp > length:
                continue
            limit = np.uint64(1) << np.uint64(length)
            mask = (np.uint64(1) << np.uint64(rp)) - np.uint64(1)
            while mask < limit:
                b = qs[j] ^ mask
                a0, a1 = offsets[j, b], offsets[j, b + 1]
                work[0] += 1
                work[1] += a1 - a0
                for t in range(a0, a1):
                    d = _distance(codes, j, t, q)
                    if d > best_d[k - 1]:
                        continue
                    p = np.int64(pos[j, t])
                    if d == best_d[k - 1] and p > best_p[k - 1] >= 0:
                        continue
                    if not full and not _allowed(allowed, p):
                        continue
                    if _first_seen(codes, j, t, rp, qs, starts, lens):
                        _insert(best_d, best_p, d, p)
                if PROBE * work[0] + work[1] > budget:
                    return False
                if rp == 0:
                    break
                mask = _next_mask(mask)
    return True


@njit(cache=True, nogil=True)
def knn_serial(queries, k, starts, lens, offsets, codes, pos, allowed, full, budget):
    """knn_one for each query in turn (one query: no thread start-up)."""
    nq = queries.shape[0]
    out_d = np.full((nq, k), FAR, np.int64)
    out_p = np.full((nq, k), NO_ITEM, np.int64)
    ok = np.empty(nq, np.bool_)
    work = np.zeros((nq, 2), np.int64)
    for i in range(nq):
        ok[i] = knn_one(
            queries[i], k, starts, lens, offsets, codes, pos, allowed, full, budget,
            out_d[i], out_p[i], work[i],
        )  # fmt: skip
    return out_d, out_p, ok, work


@njit(parallel=True, cache=True)
def knn_parallel(queries, k, starts, lens, offsets, codes, pos, allowed, full, budget):
    """knn_one for a batch, queries in parallel."""
    nq = queries.shape[0]
    out_d = np.full((nq, k), FAR, np.int64)
    out_p = np.full((nq, k), NO_ITEM, np.int64)
    ok = np.empty(nq, np.bool_)
    work = np.zeros((nq, 2), np.int64)
    for i in prange(nq):
        ok[i] = knn_one(
            queries[i], k, starts, lens, offsets, codes, pos, allowed, full, budget,
            out_d[i], out_p[i], work[i],
        )  # fmt: skip
    return out_d, out_p, ok, work


@njit(cache=True)
def within(q, radius, starts, lens, offsets, codes, pos, allowed, full, out_d, out_p):
    """Every allowed item within `radius` of query q, unordered, into out_d/out_p; returns how
    many there are (only the first len(out_d) are written: call again with room for them)."""
    m = starts.shape[0]
    qs = _query_substrings(q, starts, lens)
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
                    d = _distance(codes, j, t, q)
                    p = np.int64(pos[j, t])
                    if d > radius or (not full and not _allowed(allowed, p)):
                        continue
                    if _first_seen(codes, j, t, rp, qs, starts, lens):
                        if found < out_d.shape[0]:
                            out_d[found] = d
                            out_p[found] = p
                        found += 1
                if rp == 0:
                    break
                mask = _next_mask(mask)
        rp += 1
    return found
