"""Archive store at 1e6 and 1e7 items: open, memory, lookups, changes, search with the store.

Through the public `Index` API, n items of 64 bits (clustered codes, as in `search.py`) with
realistic records: path, class (one of 20), dataset (one of 3), five captions of 60-90
characters, two user fields (`year`, `cloud`). The index is built once per n (`build_s`), then a
fresh process measures, so `rss_mb` is what opening adds to a process that opened an empty index
of the same model:

open_s, rss_mb, codes_mb, lookup_ms (median of 1000 `item(id)`), page_ms (median of 50 single
queries by code, top-20 with records), search_batched_qps (1000 queries, top-20 keys through the
store, tombstone mask included) beside search_limit_qps (the in-cache XOR + popcount limit of
`search.py`, measured in turn, median of 5 paired ratios), records_batched_qps (the same with
every hit's record), filtered_qps (10 % of items match; the filter's key set cached, its first
evaluation is filter_first_s), add_1k_s (add 1000 items + commit), remove_1k_s (remove 1000 ids
+ commit), compact_s, disk_mb.

Peer: FAISS IndexBinaryIDMap2 + a Python dict of records (pickled), measured the same way at 1e6
(at 1e7 its records alone need about 15 GB of memory; the machine has 23 GB shared by others).
The rshash-index/1 figures at 1e6 are those measured in issue 13 on this machine.
Usage: python -m benchmarks.store [--sizes 1000000 10000000] [--run RUN] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numba
import numpy as np
from tqdm import tqdm

from benchmarks.common import CACHE, REPO, RESULTS, markdown_table, write_results
from benchmarks.search import Limits, codes, paired, rate

CLASSES = tuple(f"class-{i:02d}" for i in range(20))
DATASETS = ("ucm", "rsscn7", "scenes")
FILTER = 'class in ("class-03", "class-11")'  # 2 of 20 classes: 10 % of the items
BATCH = 100_000
QUERIES = 1000
K = 20
WORDS = [
    "a",
    "river",
    "crossing",
    "farmland",
    "with",
    "green",
    "fields",
    "many",
    "buildings",
    "dense",
    "residential",
    "area",
    "parking",
    "lot",
    "full",
    "of",
    "cars",
    "near",
    "the",
    "road",
    "some",
    "trees",
    "an",
    "airport",
    "runway",
    "two",
    "planes",
    "beach",
    "with",
    "white",
    "waves",
    "the",
    "sea",
    "bare",
    "land",
    "with",
    "sparse",
    "vegetation",
    "industrial",
    "storage",
    "tanks",
]
V1_1E6 = {  # issue 13, this machine, five captions + two fields per record
    "open_s": 8.4,
    "rss_mb": 2400,
    "lookup_ms": 90,
    "page_ms": 1800 / 20,
    "add_1k_s": 6.3,
    "remove_1k_s": 5.3,
}


def caption_pool(rng: np.random.Generator, size: int = 4000) -> list[str]:
    pool = []
    while len(pool) < size:
        target = int(rng.integers(60, 91))
        words: list[str] = []
        while len(" ".join(words)) < target:
            words.append(WORDS[int(rng.integers(len(WORDS)))])
        pool.append(" ".join(words)[:target].rstrip() + ".")
    return pool


def make_records(start: int, n: int, pool: list[str], seed: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    cls = rng.integers(0, len(CLASSES), n).tolist()
    year = rng.integers(2000, 2025, n).tolist()
    cloud = np.round(rng.random(n), 3).tolist()
    caps = rng.integers(0, len(pool), (n, 5)).tolist()
    return [
        {
            "id": f"scene-{i:08d}",
            "path": f"/archive/{DATASETS[i % 3]}/{i // 1000:05d}/{i:08d}.tif",
            "class": CLASSES[c],
            "dataset": DATASETS[i % 3],
            "captions": [pool[j] for j in cj],
            "year": y,
            "cloud": cl,
        }
        for i, c, y, cl, cj in zip(range(start, start + n), cls, year, cloud, caps, strict=True)
    ]


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def disk_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def build(run: Path, path: Path, n: int, pool: list[str]) -> float:
    """The index of n items, through `Index.add` in batches of 100k and one commit."""
    from rshash.index import Index

    shutil.rmtree(path, ignore_errors=True)
    start = time.perf_counter()
    index = Index.create(path, run)
    for s in tqdm(range(0, n, BATCH), desc=f"build {n:.0e}", unit="batch"):
        m = min(BATCH, n - s)
        index.add("images", codes("clustered", m, 64, seed=1000 + s), make_records(s, m, pool, s))
    index.commit()
    index.close()
    return time.perf_counter() - start


def _median_ms(fn: Any, reps: int) -> float:
    times = []
    for i in range(reps):
        t = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1000)


def measure_store(run: str, path: str, n: int) -> dict[str, Any]:
    """In a fresh process: every figure of the store at n items."""
    from rshash.index import Index

    empty_dir = Path(path).with_name("empty-index")
    shutil.rmtree(empty_dir, ignore_errors=True)
    empty = Index.create(empty_dir, run)
    empty.commit()
    Index.open(empty_dir)
    base = rss_mb()
    t = time.perf_counter()
    index = Index.open(path)
    open_s = time.perf_counter() - t
    opened = rss_mb() - base
    t = time.perf_counter()
    Index.open(path)
    open_warm_s = time.perf_counter() - t
    rng = np.random.default_rng(3)
    ids = [f"scene-{i:08d}" for i in rng.integers(0, n, 1000)]
    lookup_ms = _median_ms(lambda i: index.item(ids[i]), 1000)
    queries = codes("clustered", QUERIES, 64, seed=2)
    index.search_codes(queries[:1], k=K)
    page_ms = _median_ms(lambda i: index.search_codes(queries[i : i + 1], k=K), 50)
    limits = Limits(n, 64)
    page_limit_ms = 1000 / float(np.median([limits.measure(1) for _ in range(5)]))
    index.search_keys(queries[:2], K)
    batched, limit, ratio = paired(
        lambda: rate(lambda: index.search_keys(queries, K), QUERIES), lambda: limits.measure(2)
    )
    records_qps = rate(lambda: index.search_codes(queries, K), QUERIES, min_seconds=1)
    t = time.perf_counter()
    matching = index.matching_keys(where=FILTER)
    filter_first_s = time.perf_counter() - t
    filtered, _, filtered_ratio = paired(
        lambda: rate(lambda: index.search_keys(queries, K, where=FILTER), QUERIES),
        lambda: rate(lambda: index.search_keys(queries, K), QUERIES),
    )
    pool = caption_pool(np.random.default_rng(5), 200)
    new_codes, new_records = codes("clustered", 1000, 64, seed=77), make_records(n, 1000, pool, 77)
    t = time.perf_counter()
    index.add("images", new_codes, new_records)
    staged = time.perf_counter() - t
    index.commit()
    add_s = time.perf_counter() - t
    t = time.perf_counter()
    index.remove([f"scene-{i:08d}" for i in range(0, 1000 * (n // 1000), n // 1000)])
    staged_remove = time.perf_counter() - t
    index.commit()
    remove_s = time.perf_counter() - t
    t = time.perf_counter()
    index.compact()
    compact_s = time.perf_counter() - t
    return {
        "open_s": open_s,
        "open_warm_s": open_warm_s,
        "rss_mb": opened,
        "lookup_ms": lookup_ms,
        "page_ms": page_ms,
        "page_limit_ms": page_limit_ms,
        "add_staged_s": staged,
        "remove_staged_s": staged_remove,
        "search_batched_qps": batched,
        "search_limit_qps": limit,
        "search_ratio": ratio,
        "records_batched_qps": records_qps,
        "filter_first_s": filter_first_s,
        "filter_share": len(matching) / n,
        "filtered_qps": filtered,
        "filtered_ratio": filtered_ratio,
        "add_1k_s": add_s,
        "remove_1k_s": remove_s,
        "compact_s": compact_s,
    }


def build_peer(path: Path, n: int, pool: list[str]) -> float:
    """FAISS IndexBinaryIDMap2 + a dict id → record, pickled: the do-it-yourself store."""
    import faiss

    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    start = time.perf_counter()
    index = faiss.IndexBinaryIDMap2(faiss.IndexBinaryFlat(64))
    records: dict[int, dict[str, Any]] = {}
    for s in tqdm(range(0, n, BATCH), desc=f"peer {n:.0e}", unit="batch"):
        m = min(BATCH, n - s)
        index.add_with_ids(codes("clustered", m, 64, seed=1000 + s), np.arange(s, s + m))
        records.update(enumerate(make_records(s, m, pool, s), s))
    _save_peer(path, index, records)
    return time.perf_counter() - start


def _save_peer(path: Path, index: Any, records: dict[int, dict[str, Any]]) -> None:
    import faiss

    faiss.write_index_binary(index, str(path / "codes.faiss"))
    with open(path / "records.pkl", "wb") as f:
        pickle.dump(records, f, protocol=pickle.HIGHEST_PROTOCOL)


def measure_peer(path_s: str, n: int) -> dict[str, Any]:
    import faiss

    path = Path(path_s)
    base = rss_mb()
    t = time.perf_counter()
    index = faiss.read_index_binary(str(path / "codes.faiss"))
    with open(path / "records.pkl", "rb") as f:
        records: dict[int, dict[str, Any]] = pickle.load(f)
    by_id = {r["id"]: key for key, r in records.items()}
    open_s = time.perf_counter() - t
    opened = rss_mb() - base
    rng = np.random.default_rng(3)
    ids = [f"scene-{i:08d}" for i in rng.integers(0, n, 1000)]
    lookup_ms = _median_ms(lambda i: records[by_id[ids[i]]], 1000)
    queries = codes("clustered", QUERIES, 64, seed=2)

    def page(i: int) -> list[dict[str, Any]]:
        _, keys = index.search(queries[i : i + 1], K)
        return [records[int(k)] for k in keys[0]]

    page_ms = _median_ms(page, 50)
    limits = Limits(n, 64)
    batched, limit, ratio = paired(
        lambda: rate(lambda: index.search(queries, K), QUERIES, min_seconds=2),
        lambda: limits.measure(2),
        tries=3,
    )
    t = time.perf_counter()
    match = np.array([k for k, r in records.items() if r["class"] in ("class-03", "class-11")])
    filter_first_s = time.perf_counter() - t
    params = faiss.SearchParameters(sel=faiss.IDSelectorBatch(match))  # type: ignore[call-arg]
    filtered = rate(lambda: index.search(queries, K, params=params), QUERIES, min_seconds=2)
    pool = caption_pool(np.random.default_rng(5), 200)
    t = time.perf_counter()
    index.add_with_ids(codes("clustered", 1000, 64, seed=77), np.arange(n, n + 1000))
    records.update(enumerate(make_records(n, 1000, pool, 77), n))
    _save_peer(path, index, records)
    add_s = time.perf_counter() - t
    t = time.perf_counter()
    gone = np.arange(0, 1000 * (n // 1000), n // 1000)
    index.remove_ids(gone)
    for key in gone.tolist():
        del records[key]
    _save_peer(path, index, records)
    remove_s = time.perf_counter() - t
    return {
        "open_s": open_s,
        "rss_mb": opened,
        "lookup_ms": lookup_ms,
        "page_ms": page_ms,
        "search_batched_qps": batched,
        "search_limit_qps": limit,
        "search_ratio": ratio,
        "filter_first_s": filter_first_s,
        "filtered_qps": filtered,
        "add_1k_s": add_s,
        "remove_1k_s": remove_s,
    }


def _child(*args: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.store", "--measure", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


GOALS = {  # at 1e7; rss goal is 3 × codes_mb + 300
    "open_s": ("≤ 2", lambda r: r["open_s"] <= 2),
    "rss_mb": ("≤ 3·codes + 300", lambda r: r["rss_mb"] <= 3 * r["codes_mb"] + 300),
    "lookup_ms": ("≤ 1", lambda r: r["lookup_ms"] <= 1),
    "page_ms": ("≤ 20", lambda r: r["page_ms"] <= 20),
    "add_1k_s": ("≤ 2", lambda r: r["add_1k_s"] <= 2),
    "remove_1k_s": ("≤ 2", lambda r: r["remove_1k_s"] <= 2),
    "search_ratio": ("≥ 0.6", lambda r: r["search_ratio"] >= 0.6),
    "filtered_ratio": ("≥ 0.5", lambda r: r["filtered_ratio"] >= 0.5),
}


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def report(records: list[dict[str, Any]]) -> str:
    keys = [
        "open_s",
        "open_warm_s",
        "rss_mb",
        "codes_mb",
        "lookup_ms",
        "page_ms",
        "page_limit_ms",
        "add_1k_s",
        "add_staged_s",
        "remove_1k_s",
        "remove_staged_s",
        "compact_s",
        "search_batched_qps",
        "search_limit_qps",
        "search_ratio",
        "records_batched_qps",
        "filtered_qps",
        "filtered_ratio",
        "filter_first_s",
        "disk_mb",
        "build_s",
        "load_avg",
        "numba_threads",
    ]
    columns = [(f"{r['store']} {r['n']:.0e}", r) for r in records]
    columns.append(("rshash-index/1 1e+06 (issue 13)", V1_1E6))
    header = ["figure", *[c for c, _ in columns], "goal at 1e7"]
    rows = []
    for key in keys:
        goal = GOALS.get(key)
        row = [key, *[_fmt(r.get(key)) for _, r in columns]]
        if goal:
            met = [r for r in records if r["store"] == "rshash-index/2" and r["n"] >= 10_000_000]
            verdict = ("met" if goal[1](met[0]) else "missed") if met else "not measured"
            row.append(f"{goal[0]} ({verdict})")
        else:
            row.append("")
        rows.append(row)
    ours = {r["n"]: r for r in records if r["store"] == "rshash-index/2"}
    peer = {r["n"]: r for r in records if r["store"] != "rshash-index/2"}
    ratios = []
    for n, r in ours.items():
        if n == 1_000_000:
            for key in ("open_s", "rss_mb", "lookup_ms", "page_ms", "add_1k_s", "remove_1k_s"):
                ratios.append(f"{key}: v1 / v2 = {V1_1E6[key] / max(r[key], 1e-9):.0f}×")
        if n in peer:
            p = peer[n]
            for key in ("open_s", "rss_mb", "add_1k_s", "remove_1k_s"):
                ratios.append(f"{key}: peer / v2 at {n:.0e} = {p[key] / max(r[key], 1e-9):.1f}×")
            q = r["search_batched_qps"] / p["search_batched_qps"]
            ratios.append(f"batched search: v2 / peer at {n:.0e} = {q:.1f}×")
    intro = (
        "# Archive store (64-bit codes, records with path, class, dataset, five captions of "
        "60-90 characters, two user fields)\n\n"
        "Through the public `Index` API; each store measured in a fresh process. `rss_mb`: "
        "resident memory that opening adds (over an opened empty index of the same model). "
        "`search_ratio`: batched exact top-20 through the store (tombstone mask included, keys "
        "only) over the in-cache XOR+popcount limit, median of 5 paired ratios; "
        "`records_batched_qps` adds every hit's record. `filtered_qps`: 10 % of items match "
        f"(`{FILTER}`), the matching key set cached after its first evaluation "
        "(`filter_first_s`); `filtered_ratio` over the unfiltered rate measured in turn. "
        "Peer: FAISS IndexBinaryIDMap2 + a pickled Python dict (every change rewrites both). "
        "rshash-index/1 figures: issue 13 (same machine); `page_ms` there is 1/20 of a "
        "20-thumbnail page of lookups. `load_avg`: the machine's 1-minute load while measuring "
        "(2 cores, shared with other jobs).\n\n"
    )
    return intro + markdown_table(header, rows) + "\n\nRatios: " + "; ".join(ratios) + "."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--run", type=Path, default=REPO / ".cache" / "tests" / "ucm-duch64")
    parser.add_argument("--work", type=Path, default=CACHE / "store")
    parser.add_argument("--peer-sizes", type=int, nargs="*", default=[1_000_000])
    parser.add_argument("--keep", action="store_true", help="Keep the built indexes.")
    parser.add_argument(
        "--merge", action="store_true", help="Keep earlier results for sizes not measured now."
    )
    parser.add_argument("--measure", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        kind, *rest = args.measure
        out = (
            measure_store(rest[0], rest[1], int(rest[2]))
            if kind == "store"
            else (measure_peer(rest[0], int(rest[1])))
        )
        out.update(load_avg=os.getloadavg()[0], numba_threads=numba.get_num_threads())
        print(json.dumps(out))
        return
    pool = caption_pool(np.random.default_rng(0))
    records = []
    if args.merge and (RESULTS / "store.json").exists():
        old = json.loads((RESULTS / "store.json").read_text())
        records = [
            r
            for r in old
            if r["n"] not in (args.sizes if r["store"] == "rshash-index/2" else args.peer_sizes)
        ]
    for n in args.sizes:
        path = args.work / f"store-{n}"
        if args.keep and (path / "index.json").exists():
            build_s = float("nan")
        else:
            build_s = build(args.run, path, n, pool)
        os.sync()  # the build's dirty pages would otherwise stall every fsync measured next
        size = disk_mb(path)
        rec = {"store": "rshash-index/2", "n": n, "bits": 64, "codes_mb": n * 8 / 2**20}
        rec.update(build_s=build_s, disk_mb=size)
        rec.update(_child("store", str(args.run), str(path), str(n)))
        records.append(rec)
        print(rec, flush=True)
        if not args.keep:
            shutil.rmtree(path)
        if n in args.peer_sizes:
            peer_path = args.work / f"peer-{n}"
            peer = {"store": "faiss+dict", "n": n, "bits": 64, "codes_mb": n * 8 / 2**20}
            peer["build_s"] = build_peer(peer_path, n, pool)
            peer["disk_mb"] = disk_mb(peer_path)
            os.sync()
            peer.update(_child("peer", str(peer_path), str(n)))
            records.append(peer)
            print(peer, flush=True)
            shutil.rmtree(peer_path)
        records.sort(key=lambda r: (r["n"], r["store"] != "rshash-index/2"))
        write_results("store", records, report(records))


if __name__ == "__main__":
    main()
