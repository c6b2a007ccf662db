"""Search engines against a brute-force numpy reference on random codes."""

import numpy as np
import pytest

from rshash.errors import RshashError
from rshash.index import kernels, make_engine, pack_codes, unpack_codes
from rshash.index.engines import recall_against_exact
from rshash.index.packing import query_words, to_words


def _codes(rng, n, bits, clustered=False):
    if not clustered:
        return rng.integers(0, 256, size=(n, bits // 8), dtype=np.uint8)
    centres = rng.normal(size=(8, 32))
    x = centres[rng.integers(0, 8, n)] + 0.5 * rng.normal(size=(n, 32))
    return pack_codes(np.sign(x @ rng.normal(size=(32, bits))))


def _reference(codes, queries, k):
    """Distances by XOR + popcount, stable-sorted: ties go to the earlier item."""
    d = np.bitwise_count(queries[:, None, :] ^ codes[None, :, :]).sum(-1)
    order = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, order, 1), order


@pytest.mark.parametrize("bits", [64, 128, 192])
@pytest.mark.parametrize("nq", [1, 7])
def test_exact_engine_matches_reference_including_ties(bits, nq):
    rng = np.random.default_rng(bits + nq)
    # Few distinct codes: many exact ties, which must go to the earlier item.
    base = rng.integers(0, 256, size=(40, bits // 8), dtype=np.uint8)
    codes = np.concatenate([base[rng.integers(0, 40, 3000)], _codes(rng, 2500, bits)])
    queries = np.concatenate([base[:nq], _codes(rng, nq, bits)])
    engine = make_engine("exact", bits)
    keys = np.arange(len(codes), dtype=np.int64) * 3 + 5
    engine.add(codes, keys)
    for k in (1, 20, 250):
        d, found = engine.search(queries, k)
        ref_d, ref_pos = _reference(codes, queries, k)
        assert np.array_equal(d, ref_d)
        assert np.array_equal(found, keys[ref_pos])


def test_k_larger_than_archive_pads_with_minus_one():
    rng = np.random.default_rng(0)
    codes = _codes(rng, 5, 64)
    engine = make_engine("exact", 64)
    engine.add(codes, np.arange(5, dtype=np.int64))
    d, keys = engine.search(codes[:2], 8)
    ref_d, ref_pos = _reference(codes, codes[:2], 5)
    assert np.array_equal(keys[:, :5], ref_pos) and np.array_equal(d[:, :5], ref_d)
    assert (keys[:, 5:] == -1).all()


@pytest.mark.parametrize("bits", [64, 192])
@pytest.mark.parametrize("name", ["exact", "faiss-flat"])
def test_range_search_matches_reference(name, bits):
    rng = np.random.default_rng(3)
    codes = _codes(rng, 4000, bits, clustered=True)
    queries = codes[:5]
    engine = make_engine(name, bits)
    engine.add(codes, np.arange(len(codes), dtype=np.int64))
    d_all = np.bitwise_count(queries[:, None, :] ^ codes[None]).sum(-1)
    for radius in (0, 6, 12, bits // 4):
        for q, (d, keys) in enumerate(engine.range_search(queries, radius)):
            expect = np.flatnonzero(d_all[q] <= radius)
            expect = expect[np.argsort(d_all[q, expect], kind="stable")]
            assert np.array_equal(keys, expect)
            assert np.array_equal(d, d_all[q, expect])


def test_faiss_flat_distances_match_exact():
    rng = np.random.default_rng(4)
    codes = _codes(rng, 3000, 128, clustered=True)
    exact, flat = make_engine("exact", 128), make_engine("faiss-flat", 128)
    keys = np.arange(len(codes), dtype=np.int64)
    exact.add(codes, keys)
    flat.add(codes, keys)
    assert np.array_equal(exact.search(codes[:50], 20)[0], flat.search(codes[:50], 20)[0])


def test_remove_then_add():
    rng = np.random.default_rng(5)
    codes = _codes(rng, 1000, 64)
    for name in ("exact", "faiss-flat"):
        engine = make_engine(name, 64)
        engine.add(codes[:600], np.arange(600, dtype=np.int64))
        assert engine.remove(np.array([0, 1, 2, 9999])) == 3
        engine.add(codes[600:], np.arange(600, 1000, dtype=np.int64))
        assert engine.ntotal == 997
        d, keys = engine.search(codes[:3], 1)
        assert not np.isin(keys, [0, 1, 2]).any()
        assert (d[:, 0] > 0).all()


def test_ivf_recall_on_clustered_codes():
    rng = np.random.default_rng(6)
    codes = _codes(rng, 20000, 64, clustered=True)
    keys = np.arange(len(codes), dtype=np.int64)
    engine = make_engine("faiss-ivf", 64, {"nprobe": 16})
    report = engine.build(codes, keys)
    assert report["recall_at_20"] == pytest.approx(recall_against_exact(engine, codes, keys, 20))
    assert report["recall_at_20"] > 0.9, report


def test_pack_roundtrip_and_errors():
    codes = np.sign(np.random.default_rng(0).normal(size=(10, 64))).astype(np.int8)
    assert np.array_equal(unpack_codes(pack_codes(codes)), codes)
    assert np.array_equal(unpack_codes(pack_codes(codes[:, :40]), 40), codes[:, :40])
    with pytest.raises(RshashError, match="8 to 1024 bits"):
        pack_codes(codes[:, :4])
    with pytest.raises(RshashError, match="unknown index engine"):
        make_engine("annoy", 64)
    with pytest.raises(RshashError, match="packed bytes"):
        make_engine("exact", 64).search(np.zeros((1, 16), np.uint8), 1)
    with pytest.raises(RshashError, match="8 to 1024 bits"):
        make_engine("exact", 2048)


@pytest.mark.parametrize("n", [1, 13, 1000])
def test_word_layout_is_cache_line_aligned_and_lossless(n):
    packed = np.random.default_rng(n).integers(0, 256, size=(n, 16), dtype=np.uint8)
    words = to_words(packed)
    assert words.ctypes.data % 64 == 0
    assert words.flags.c_contiguous
    assert np.array_equal(words.T.copy().view(np.uint8), packed)


@pytest.mark.parametrize("warm", [1, 3, kernels.WARM])
@pytest.mark.parametrize("parts", [1, 2, 3])
def test_kernel_two_pass_start_and_ranges_match_reference(warm, parts):
    """Every split of the search (warm-start blocks, item ranges, query chunks) is exact."""
    rng = np.random.default_rng(warm + parts)
    base = rng.integers(0, 256, size=(30, 8), dtype=np.uint8)
    codes = np.concatenate([_codes(rng, 4000, 64, clustered=True), base[rng.integers(0, 30, 3500)]])
    queries = np.concatenate([base[:3], codes[:2], _codes(rng, 4, 64)])
    keys = np.arange(len(codes), dtype=np.int64)
    words, q = to_words(codes), query_words(queries)
    for k in (1, 20, 300):
        allowed = kernels.allowed_bits(np.ones(len(codes), bool))
        d, found = kernels.topk(words, keys, q, k, parts, 2, allowed, warm)
        ref_d, ref_pos = _reference(codes, queries, k)
        assert np.array_equal(d, ref_d)
        assert np.array_equal(found, ref_pos)


def test_large_word_arrays_start_on_a_huge_page():
    """An archive of 2 MiB or more gets huge-page-aligned words that survive their buffer."""
    packed = np.random.default_rng(1).integers(0, 256, size=(300_000, 8), dtype=np.uint8)
    words = to_words(packed)
    assert words.ctypes.data % (1 << 21) == 0
    assert np.array_equal(words.T.copy().view(np.uint8), packed)
    words[0, :3] = 7  # writable
    assert (words[0, :3] == 7).all()


@pytest.mark.parametrize("warm", [1, kernels.WARM])
@pytest.mark.parametrize("parts", [1, 3])
@pytest.mark.parametrize("share", [1.0, 0.999, 0.5, 0.01, 0.0])
def test_kernel_mask_gives_exact_top_k_among_allowed_items(warm, parts, share):
    """Filters and tombstones are a bit mask the kernel applies while scanning: the answer must
    be the brute-force top-k of the allowed items, whatever share of items is allowed (the warm
    start's caps and the block minima must not skip an allowed item)."""
    rng = np.random.default_rng(int(share * 100) + warm + parts)
    base = rng.integers(0, 256, size=(30, 16), dtype=np.uint8)
    codes = np.concatenate(
        [_codes(rng, 5000, 128, clustered=True), base[rng.integers(0, 30, 2500)]]
    )
    queries = np.concatenate([base[:3], codes[:2], _codes(rng, 3, 128)])
    allowed = rng.random(len(codes)) < share
    allowed[::997] = share > 0  # the queries' own duplicates are sometimes allowed
    keys = np.arange(len(codes), dtype=np.int64)
    words, q, bits = to_words(codes), query_words(queries), kernels.allowed_bits(allowed)
    for k in (1, 20, 300):
        d, found = kernels.topk(words, keys, q, k, parts, 2, bits, warm)
        ref_d, ref_pos = _reference(codes[allowed], queries, k)
        n = min(k, int(allowed.sum()))
        assert np.array_equal(d[:, :n], ref_d[:, :n])
        assert np.array_equal(found[:, :n], keys[allowed][ref_pos[:, :n]])
        assert (found[:, n:] == -1).all()
    counts = kernels.range_counts(words, q, 40, bits)
    d_all = np.bitwise_count(queries[:, None, :] ^ codes[None]).sum(-1)
    assert np.array_equal(counts, ((d_all <= 40) & allowed).sum(1))


def test_exact_engine_filter_and_tombstones_share_the_mask():
    """A filter must never bring back a removed item."""
    rng = np.random.default_rng(9)
    codes = _codes(rng, 2000, 64)
    engine = make_engine("exact", 64)
    keys = np.arange(2000, dtype=np.int64) * 2
    engine.add(codes, keys)
    engine.remove(keys[:1000:2])
    allowed = keys[:1000]
    d, found = engine.search(codes[:5], 50, allowed)
    live = np.isin(keys, allowed) & ~np.isin(keys, keys[:1000:2])
    ref_d, ref_pos = _reference(codes[live], codes[:5], 50)
    assert np.array_equal(d, ref_d) and np.array_equal(found, keys[live][ref_pos])
    assert engine.ntotal == 1500
    live_codes, live_keys = engine.live()
    assert np.array_equal(live_keys, keys[~np.isin(keys, keys[:1000:2])])
    assert np.array_equal(live_codes, codes[~np.isin(keys, keys[:1000:2])])
