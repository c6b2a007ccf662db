"""The `mih` engine (multi-index hashing) against `exact`: same hits, same order, everywhere.

Probing is forced (no fall-back to the scan) unless a test is about the fall-back: a probing bug
hidden behind the scan would otherwise pass.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from rshash.errors import RshashError
from rshash.index import Index, make_engine, mih, pack_codes
from rshash.index.maintenance import check_index
from rshash.index.packing import code_bytes, query_words
from tests.conftest import REPO, rshash_cli
from tests.index_writer import codes_for


@pytest.fixture
def probe_always(monkeypatch):
    """No budget: every query is answered by probing the tables."""
    monkeypatch.setattr(mih, "MIN_BUDGET", 2**62)


def _codes(rng, n, bits, clustered=False):
    width = code_bytes(bits)
    if clustered:
        centres = rng.normal(size=(6, 16))
        x = centres[rng.integers(0, 6, n)] + 0.4 * rng.normal(size=(n, 16))
        return pack_codes(np.sign(x @ rng.normal(size=(16, bits))))
    out = np.zeros((n, width), np.uint8)
    out[:, : bits // 8] = rng.integers(0, 256, size=(n, bits // 8), dtype=np.uint8)
    return out


def _archive(bits, clustered, seed=0):
    """Random or clustered codes with exact duplicates (ties), and queries near and on them."""
    rng = np.random.default_rng(seed + bits)
    codes = _codes(rng, 6000, bits, clustered)
    codes[4000:4600] = codes[rng.integers(0, 300, 600)]
    queries = np.concatenate([codes[:3], codes[10:13] ^ np.uint8(5), _codes(rng, 3, bits)])
    return codes, queries


def _pair(codes, keys, bits, **params):
    exact, fast = make_engine("exact", bits), make_engine("mih", bits, params)
    exact.add(codes, keys)
    fast.add(codes, keys)
    return exact, fast


def _same(a, b):
    assert np.array_equal(a[0], b[0]), (a[0], b[0])
    assert np.array_equal(a[1], b[1]), (a[1], b[1])


@pytest.mark.parametrize("bits", [8, 48, 64, 128, 200])
@pytest.mark.parametrize("clustered", [False, True])
def test_top_k_equals_exact_ties_included(probe_always, bits, clustered):
    """Missed buckets (a wrong pigeonhole radius, a substring crossing a word), duplicates met
    in two tables, or ties ordered otherwise than by key would all change a row."""
    codes, queries = _archive(bits, clustered)
    keys = np.arange(len(codes), dtype=np.int64) * 3 + 1
    exact, fast = _pair(codes, keys, bits)
    for k in (1, 20, 100, 1000):
        _same(exact.search(queries, k), fast.search(queries, k))
        _same(exact.search(queries[:1], k), fast.search(queries[:1], k))
        assert not fast.scanned.any() and (fast.work[:, 0] > 0).all()  # the tables answered


@pytest.mark.parametrize("bits", [48, 128])
def test_range_search_equals_exact(probe_always, monkeypatch, bits):
    """Range probing must cover the radius exactly: one step short loses the farthest hits."""
    monkeypatch.setattr(mih, "RANGE_ROOM", 4)  # also the retry with more room
    codes, queries = _archive(bits, clustered=True, seed=1)
    keys = np.arange(len(codes), dtype=np.int64)
    exact, fast = _pair(codes, keys, bits)
    for radius in (0, 1, 5, bits // 8, bits // 4):
        assert fast._range_cost(fast._tables, radius) <= fast._budget()
        found = fast.range_search(queries, radius)
        for a, b in zip(exact.range_search(queries, radius), found, strict=True):
            _same(a, b)


@pytest.mark.parametrize("share", [0.9, 0.3, 0.02])
def test_filters_tombstones_and_several_adds(probe_always, share):
    """Removed or filtered-out items must never come back, over tables rebuilt at every add;
    share 0.02 takes the gathered scan (under 1/FILTER_SCAN), the others probe with a mask."""
    rng = np.random.default_rng(7)
    codes, queries = _archive(64, clustered=True, seed=2)
    keys = np.arange(len(codes), dtype=np.int64) * 2
    exact, fast = make_engine("exact", 64), make_engine("mih", 64)
    for a, b in ((0, 2000), (2000, 2100), (2100, len(codes))):
        for e in (exact, fast):
            e.add(codes[a:b], keys[a:b])
    gone = keys[rng.random(len(keys)) < 0.2]
    assert exact.remove(gone) == fast.remove(gone) == len(gone)
    allowed = np.sort(keys[rng.random(len(keys)) < share])
    for k in (1, 20, 300):
        _same(exact.search(queries, k, allowed), fast.search(queries, k, allowed))
        _same(exact.search(queries, k), fast.search(queries, k))
        found = fast.search(queries, k, allowed)[1]
        assert not np.isin(found, gone).any()
        assert np.isin(found[found >= 0], allowed).all()
    found = fast.range_search(queries, 12, allowed)
    for a, b in zip(exact.range_search(queries, 12, allowed), found, strict=True):
        _same(a, b)


def test_queries_over_budget_fall_back_to_the_scan_and_stay_exact(monkeypatch):
    """A query cut short must be answered again by the scan, not returned half-probed."""
    monkeypatch.setattr(mih, "MIN_BUDGET", 1)
    monkeypatch.setattr(mih, "SCAN_UNITS", 10**9)
    codes, queries = _archive(64, clustered=False, seed=3)
    keys = np.arange(len(codes), dtype=np.int64)
    exact, fast = _pair(codes, keys, 64)
    for k in (1, 50):
        _same(exact.search(queries, k), fast.search(queries, k))
        assert fast.scanned.all()
        _same(exact.search(queries[:1], k), fast.search(queries[:1], k))


def test_k_past_the_archive_pads_like_exact(probe_always):
    codes, queries = _archive(64, clustered=False)
    keys = np.arange(40, dtype=np.int64)
    exact, fast = _pair(codes[:40], keys, 64)
    fast.remove(keys[:5])
    exact.remove(keys[:5])
    d, found = fast.search(queries, 60)
    _same(exact.search(queries, 60), (d, found))
    assert (found[:, 35:] == -1).all()


def test_substrings_follow_the_paper_and_are_checked():
    """m = round(bits / log2 N), substrings at most 24 bits (direct-addressed buckets)."""
    assert mih.substrings_for(64, 10**7) == 3
    assert mih.substrings_for(64, 10**8) == 3  # round(2.4) = 2 would need 32-bit substrings
    assert mih.substrings_for(128, 10**7) == 6
    assert mih.substrings_for(64, 1000) == 6
    assert mih.substrings_for(8, 10) == 2
    with pytest.raises(RshashError, match="mih substrings: expected 3 to 64"):
        make_engine("mih", 64, {"substrings": 2})


def test_state_round_trip_and_damage(probe_always):
    """Saved tables are reused as they are; a damaged or foreign file is refused with one line
    (a bad position would otherwise make the kernels read out of bounds)."""
    codes, queries = _archive(64, clustered=True)
    keys = np.arange(len(codes), dtype=np.int64)
    exact, fast = _pair(codes, keys, 64)
    state = fast.state()
    assert state is not None
    again = make_engine("mih", 64)
    again.restore(state, codes, keys)
    _same(exact.search(queries, 20), again.search(queries, 20))
    m, n = fast._tables.m, len(codes)
    bad = bytearray(state)
    bad[len(state) - 4 * n * m + 8] ^= 0x55  # a position in table 0
    cases = {
        bytes(bad): "mih tables: table 0 does not index every code once",
        state[:-7]: "truncated or damaged",
        b"junk": "not an rshash-mih/1 file",
    }
    for blob, message in cases.items():
        with pytest.raises(RshashError, match=message):
            make_engine("mih", 64).restore(blob, codes, keys)
    with pytest.raises(RshashError, match="made for 6000 codes"):
        make_engine("mih", 64).restore(state, codes[:100], keys[:100])


def _records(start, n):
    return [{"id": f"img-{i}", "path": f"/archive/{i}.tif", "class": "c"} for i in range(start, n)]


@pytest.fixture
def mih_index(ucm_run, tmp_path):
    """600 random 64-bit codes in two commits, engine mih, 30 removed."""
    out = tmp_path / "index"
    index = Index.create(out, ucm_run, engine="mih")
    for a in (0, 300):
        index.add("images", codes_for(a, 300), _records(a, a + 300))
        index.commit()
    index.remove([f"img-{i}" for i in range(0, 600, 20)])
    index.commit()
    index.close()
    return out


def _exact_answer(index_path, queries, k):
    index = Index.open(index_path)
    codes, keys = index.collections["images"].engine.live()
    exact = make_engine("exact", 64)
    exact.add(codes, keys)
    return exact.search(queries, k)


def test_index_reopens_without_rebuilding_and_compacts(mih_index, monkeypatch):
    """Opening must load the saved tables (rebuilding costs minutes at 1e8 codes), and
    compaction must rebuild them over the live codes (stale tables would index dropped ones)."""
    queries = np.concatenate([codes_for(0, 5), codes_for(900, 5)])
    expect = _exact_answer(mih_index, queries, 25)

    def no_build(*args):
        raise AssertionError("tables rebuilt on open")

    monkeypatch.setattr(mih.mih_kernels, "build", no_build)
    index = Index.open(mih_index)
    engine = index.collections["images"].engine
    assert engine.state() is not None and engine.memory()["tables"] > 0
    _same(expect, index.search_keys(queries, 25))
    monkeypatch.undo()
    assert index.compact() == {"images": 30}
    index.close()
    assert check_index(mih_index)["images"]["items"] == 570
    index = Index.open(mih_index)
    assert index.collections["images"].engine._tables.pos.shape[1] == 570
    _same(expect, index.search_keys(queries, 25))


@pytest.mark.parametrize("point", ["tables", "state"])
def test_kill_during_table_build_leaves_a_consistent_index(mih_index, point):
    """A writer SIGKILLed while building the tables of a commit, or halfway through writing them,
    must leave the last committed generation searchable and checkable, and the next writer must
    sweep the half-written file and commit."""
    queries = codes_for(7, 4)
    expect = _exact_answer(mih_index, queries, 20)
    args = [sys.executable, "-m", "tests.index_writer", str(mih_index), "add:1000:120", point]
    assert subprocess.run(args, cwd=REPO).returncode == -9
    if point == "state":
        assert any(f.stat().st_size for f in mih_index.glob("engine-images-00000004.bin"))
    assert check_index(mih_index)["images"]["items"] == 570
    _same(expect, Index.open(mih_index).search_keys(queries, 20))
    assert subprocess.run(args[:-1], cwd=REPO).returncode == 0
    report = check_index(mih_index)["images"]
    assert report["items"] == 690 and report["pending_rollback"] == 0
    index = Index.open(mih_index)
    assert index.manifest["collections"]["images"]["state"] == "engine-images-00000004.bin"
    _same(_exact_answer(mih_index, queries, 20), index.search_keys(queries, 20))


def test_check_and_open_name_a_damaged_table_file(mih_index):
    """A damaged table file: `index check` and search print one line naming the file."""
    state = mih_index / Index.open(mih_index).manifest["collections"]["images"]["state"]
    blob = bytearray(state.read_bytes())
    blob[-10] ^= 0xFF
    state.write_bytes(bytes(blob))
    problem = f"{state}: mih tables: table 6 does not index every code once"
    r = rshash_cli("search", mih_index, "a river")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"error: {problem}"], r.stderr
    r = rshash_cli("index", "check", mih_index)
    assert r.returncode == 2
    assert f"problem: {problem}" in r.stdout.splitlines(), r.stdout
    assert r.stderr.strip().splitlines() == [f"error: {mih_index}: 1 problem found (listed above)"]


def test_auto_builds_tables_only_for_large_archives(monkeypatch, probe_always):
    """auto is exact (no tables, no state file) for small archives and codes over 64 bits, and
    mih past its threshold; k above AUTO_MAX_K, and batches with k above AUTO_BATCH_MAX_K below
    AUTO_BATCH_MIN_ITEMS codes, are scanned."""
    codes, queries = _archive(64, clustered=False)
    keys = np.arange(len(codes), dtype=np.int64)
    small = make_engine("auto", 64)
    small.add(codes, keys)
    assert small.state() is None and small.memory()["tables"] == 0
    monkeypatch.setattr(mih.AutoEngine, "min_items", 5000)
    big = make_engine("auto", 64)
    big.add(codes, keys)
    assert big.state() is not None
    exact = make_engine("exact", 64)
    exact.add(codes, keys)
    _same(exact.search(queries, 20), big.search(queries, 20))
    assert not big.scanned.any()
    _same(exact.search(queries, 101), big.search(queries, 101))
    assert big.scanned.all() and (big.work == 0).all()
    _same(exact.search(queries, 50), big.search(queries, 50))
    assert big.scanned.all()  # a batch with k > 20 below 5e7 codes: the batched scan won
    _same(exact.search(queries[:1], 50), big.search(queries[:1], 50))
    assert not big.scanned.any()  # one query of the same k is probed
    long_codes, _ = _archive(128, clustered=False)
    wide = make_engine("auto", 128)
    wide.add(long_codes, keys)
    assert wide.state() is None  # 128-bit codes: the scan won at 1e7 random codes


def test_info_shows_the_serving_engine_and_its_memory(mih_index):
    r = rshash_cli("index", "info", mih_index)
    assert r.returncode == 0, r.stderr
    assert "engine mih" in r.stdout
    assert "served by multi-index hashing, 7 tables of 9/10-bit substrings" in r.stdout
    assert "memory: codes 0.0 MiB, tables 0.1 MiB" in r.stdout


def test_single_queries_probe_concurrently(monkeypatch):
    """One query's probing must not hold the engine lock: the service's concurrent single
    queries would otherwise queue behind each other. Both threads must be inside the kernel at
    once to pass the barrier (broken after 60 s if the lock serialises them)."""
    codes, queries = _archive(64, clustered=True)
    keys = np.arange(len(codes), dtype=np.int64)
    exact, fast = _pair(codes, keys, 64)
    barrier = threading.Barrier(2, timeout=60)
    real = mih.mih_kernels.knn_serial

    def meet(*args):
        barrier.wait()
        return real(*args)

    monkeypatch.setattr(mih.mih_kernels, "knn_serial", meet)
    with ThreadPoolExecutor(2) as pool:
        found = list(pool.map(lambda q: fast.search(q[None], 20), queries[:2]))
    for q, got in zip(queries[:2], found, strict=True):
        _same(exact.search(q[None], 20), got)


@pytest.mark.parametrize(("bits", "m"), [(8, 1), (40, 2), (64, 3), (100, 5), (200, 9)])
def test_sketch_bound_counts_each_of_its_bits_once(bits, m):
    """Each row's bound (its substring's distance + its sketch's) is the distance over exactly
    substring j's bits and the up-to-32 bits after them (cyclically), hence never above the full
    distance. Guards the bound's exactness: a sketch sharing bits with its own substring, or
    misplaced across a word or the code's end, would count bits twice and drop true hits. Also
    guards the memory: 8 bytes per item and table beside the offsets (no code copies)."""
    rng = np.random.default_rng(bits)
    codes, queries = _codes(rng, 2000, bits), _codes(rng, 10, bits)
    fast = make_engine("mih", bits, {"substrings": m})
    fast.add(codes, np.arange(len(codes), dtype=np.int64))
    t, kernels = fast._tables, mih.mih_kernels
    assert t.nbytes == t.offsets.nbytes + 8 * t.m * len(codes)
    span = int(t.starts[-1] + t.lens[-1])
    subs = np.array([kernels._query_substrings(w, t.starts, t.lens) for w in query_words(codes)])
    item_bits = np.unpackbits(codes, axis=1, bitorder="little")
    query_bits = np.unpackbits(queries, axis=1, bitorder="little")
    for q, q_bits in zip(query_words(queries), query_bits, strict=True):
        differ = item_bits != q_bits
        qs = kernels._query_substrings(q, t.starts, t.lens)
        qk = kernels._query_sketches(q, t.starts, t.lens)
        for j in range(t.m):
            st, length = int(t.starts[j]), int(t.lens[j])
            covered = [*range(st, st + length)]
            covered += [(st + length + i) % span for i in range(min(32, span - length))]
            assert len(set(covered)) == len(covered)
            p = t.pos[j].astype(np.int64)
            bound = np.bitwise_count(subs[p, j] ^ qs[j]) + np.bitwise_count(
                t.sketch[j].astype(np.uint64) ^ qk[j]
            )
            assert np.array_equal(bound, differ[p][:, covered].sum(1))
