"""Multi-index hashing (`mih`) against the exact scan, codes only, through the `Engine` API.

N = 1e7 and 1e8 codes (64 and 128 bits; 128 bits at 1e8 needs ~15 GB and is left out by
default), k = 1, 20, 100, one query at a time and batches of 256, two code distributions:
- uniform: random codes (queries random too);
- realistic: the real 64-bit codes of the UCM and RSSCN7 images (the default model's, read from
  the test indexes), each synthetic item a real code with every bit flipped with probability p,
  p chosen (bisection at each N) so that the synthetic archive's mean nearest-neighbour distance
  matches the real codes'; both histograms are printed. Queries are drawn the same way.
Every record: queries/s of mih and of the exact scan in the same run and their ratio, whether
every hit equals exact's (keys and distances, in order), buckets probed and candidates verified
per query, memory (codes + tables) / codes, build time, and the paper's cost model: buckets ×
t_bucket + candidates × t_candidate + full code reads × t_verify + t_call, t_call measured
directly, the other unit costs fitted to this run's one-at-a-time query times, beside the
measured time.
Peers (k = 20, at --peer-n codes: an HNSW build of 1e7 codes takes hours on 2 cores): FAISS
IndexBinaryMultiHash (4 × 16-bit tables per 64 bits, nflip 1), IndexBinaryHNSW (M 16) and
usearch (Hamming, b1), with tie-aware recall@20 against exact. One row through the whole store
(`Index.search_codes` with records) at --store-n.
Usage: python -m benchmarks.mih [--sizes 10000000 100000000] [--bits 64 128] [--quick]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numba
import numpy as np

from benchmarks.common import REPO, RESULTS, machine, markdown_table, write_results
from benchmarks.search import rate
from rshash.index import Index, make_engine, store
from rshash.index.engines import Engine, recall_at
from rshash.index.mih import MIHEngine
from rshash.index.packing import code_bytes

KS = (1, 20, 100)
BATCH = 256
SINGLE = 200  # one-at-a-time queries per configuration for mih
SCAN_SINGLE = 40  # ... for the exact scan (15 ms each at 1e8)
CACHE_TESTS = REPO / ".cache" / "tests"
ROUNDS = 3


def real_codes(indexes: list[Path]) -> np.ndarray:
    """Packed image codes of the given (64-bit) indexes."""
    parts = []
    for path in indexes:
        manifest = store.read_manifest(path)
        width = code_bytes(manifest["bits"])
        for seg in manifest["collections"]["images"]["segments"]:
            parts.append(
                np.array(store.read_segment(path / seg["file"], width, seg["count"])["code"])
            )
    return np.concatenate(parts)


def real_nn(codes: np.ndarray) -> np.ndarray:
    """Each real code's distance to its nearest other real code."""
    words = codes.view(np.uint64)
    out = np.empty(len(codes), np.int64)
    for a in range(0, len(codes), 512):
        d = np.bitwise_count(words[a : a + 512, None, :] ^ words[None, :, :]).sum(-1)
        d[np.arange(len(d)), np.arange(a, a + len(d))] = 10**6
        out[a : a + len(d)] = d.min(1)
    return out


@numba.njit(parallel=True, cache=True)
def _flip(base, pick, p, seed, out):
    """out[i] = base[pick[i]] with each of its bits flipped with probability p."""
    n, nwords = out.shape
    for c in numba.prange((n + 65535) // 65536):
        np.random.seed(seed * 100003 + c)
        for i in range(c * 65536, min(n, (c + 1) * 65536)):
            for w in range(nwords):
                x = base[pick[i], w]
                flips = np.random.binomial(64, p) if p > 0 else 0
                for _ in range(flips):
                    x ^= np.uint64(1) << np.uint64(np.random.randint(0, 64))
                out[i, w] = x


def synthetic(real: np.ndarray, n: int, p: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(real), n)
    out = np.empty((n, real.shape[1] // 8), np.uint64)
    _flip(real.view(np.uint64), pick, p, seed, out)
    return out.view(np.uint8)


def archive_nn(engine: Engine, archive: np.ndarray, sample: int = 200) -> np.ndarray:
    """Nearest-neighbour distances (self excluded) of `sample` archive items."""
    pick = np.random.default_rng(5).choice(len(archive), sample, replace=False)
    return engine.search(archive[np.sort(pick)], 2)[0][:, 1].astype(np.int64)


def calibrate(real: np.ndarray, n: int, target: float) -> tuple[float, np.ndarray, np.ndarray]:
    """p whose synthetic archive of n codes has the real mean NN distance; (p, archive, nn)."""
    lo, hi = 0.0, 0.2
    best: tuple[float, float, np.ndarray, np.ndarray] | None = None
    for _ in range(7):
        p = (lo + hi) / 2
        archive = synthetic(real, n, p, seed=1)
        exact = make_engine("exact", 64)
        exact.add(archive, np.arange(n, dtype=np.int64))
        nn = archive_nn(exact, archive)
        del exact
        gap = abs(nn.mean() - target)
        if best is None or gap < best[0]:
            best = (gap, p, archive, nn)
        lo, hi = (p, hi) if nn.mean() < target else (lo, p)
        print(f"  calibrate n={n:.0e}: p={p:.4f} mean NN {nn.mean():.2f} (real {target:.2f})")
    assert best is not None
    return best[1], best[2], best[3]


def histogram(d: np.ndarray, top: int = 16) -> str:
    counts = np.bincount(np.minimum(d, top), minlength=top + 1) / len(d)
    return " ".join(f"{c:.2f}" for c in counts)


def single_times(engine: Engine, queries: np.ndarray, k: int) -> tuple[np.ndarray, Any, Any]:
    """Per-query seconds, and the hits of one-at-a-time search."""
    times, dist, keys = [], [], []
    work = []
    for q in queries:
        start = time.perf_counter()
        d, i = engine.search(q[None], k)
        times.append(time.perf_counter() - start)
        dist.append(d[0])
        keys.append(i[0])
        if isinstance(engine, MIHEngine):
            work.append([*engine.work[0], engine.scanned[0]])
    return np.array(times), (np.stack(dist), np.stack(keys)), np.array(work)


def call_time(engine: Engine, items: np.ndarray) -> float:
    """Median seconds of a one-at-a-time top-1 search for an archived code: one bucket, one
    candidate, so the rest is the call's fixed cost (checks, lock, allocation, key lookup)."""
    engine.search(items[:1], 1)
    return float(np.median(single_times(engine, items, 1)[0]))


def run_config(kind: str, n: int, bits: int, real: np.ndarray, histograms: list[str]) -> list:
    rng = np.random.default_rng(2)
    if kind == "uniform":
        archive = rng.integers(0, 256, size=(n, bits // 8), dtype=np.uint8)
        queries = rng.integers(0, 256, size=(1000, bits // 8), dtype=np.uint8)
        p = None
    else:
        target = real_nn(real)
        p, archive, nn = calibrate(real, n, float(target.mean()))
        queries = synthetic(real, 1000, p, seed=3)
        histograms.append(
            f"- N = {n:.0e}, p = {p:.4f}: real NN histogram (d = 0..15, 16+) {histogram(target)};"
            f" synthetic {histogram(nn)}"
        )
    keys = np.arange(n, dtype=np.int64)
    exact = make_engine("exact", bits)
    exact.add(archive, keys)
    engine = make_engine("mih", bits)
    assert isinstance(engine, MIHEngine)
    start = time.perf_counter()
    engine.add(archive, keys)
    build_s = time.perf_counter() - start
    mem = engine.memory()
    memory_ratio = (mem["codes"] + mem["tables"]) / mem["codes"]
    call_s = call_time(engine, archive[:SINGLE].copy())
    del archive
    records = []
    for k in KS:
        engine.search(queries[:2], k)
        exact.search(queries[:2], k)
        # Rounds in turn, medians: the machine is shared and its speed drifts within a run.
        rounds = [
            (
                single_times(engine, queries[:SINGLE], k),
                single_times(exact, queries[:SCAN_SINGLE], k),
            )
            for _ in range(ROUNDS)
        ]
        (_, hits, work), (_, ref, _) = rounds[0]
        t_exact = np.concatenate([r[1][0] for r in rounds])
        equal = bool(
            np.array_equal(hits[0][:SCAN_SINGLE], ref[0])
            and np.array_equal(hits[1][:SCAN_SINGLE], ref[1])
        )
        base = {"engine": "mih", "codes": kind, "n": n, "bits": bits, "k": k, "p_flip": p}
        records.append(
            {
                **base,
                "batch": 1,
                "qps": round(float(np.median([len(r[0][0]) / r[0][0].sum() for r in rounds])), 1),
                "exact_qps": round(
                    float(np.median([len(r[1][0]) / r[1][0].sum() for r in rounds])), 1
                ),
                "exact_equal": equal,
                "buckets_per_query": float(work[:, 0].mean()),
                "candidates_per_query": float(work[:, 1].mean()),
                "verified_per_query": float(work[:, 2].mean()),
                "scanned_share": float(work[:, 3].mean()),
                "memory_ratio": round(memory_ratio, 2),
                "build_s": round(build_s, 1),
                "m": int(engine._tables.m) if engine._tables is not None else 0,
                "call_us": round(call_s * 1e6, 2),
            }
        )
        batch = queries[:BATCH]
        got, want = engine.search(batch, k), exact.search(batch, k)
        work_b = engine.work
        records.append(
            {
                **base,
                "batch": BATCH,
                "qps": round(rate(lambda b=batch, k=k: engine.search(b, k), BATCH), 1),
                "exact_qps": round(rate(lambda b=batch, k=k: exact.search(b, k), BATCH), 1),
                "exact_equal": bool(
                    np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])
                ),
                "buckets_per_query": float(work_b[:, 0].mean()),
                "candidates_per_query": float(work_b[:, 1].mean()),
                "verified_per_query": float(work_b[:, 2].mean()),
                "scanned_share": float(engine.scanned.mean()),
                "memory_ratio": round(memory_ratio, 2),
                "build_s": round(build_s, 1),
                "m": records[-1]["m"],
            }
        )
        for r in records[-2:]:
            r["speedup"] = round(r["qps"] / r["exact_qps"], 2)
            print({k_: v for k_, v in r.items() if not k_.startswith("_")}, flush=True)
    scan_s = float(np.median(t_exact))
    for r in records:
        r["scan_ns_per_code"] = round(scan_s / n * 1e9, 4)
    return records


def fit_costs(records: list[dict]) -> dict[str, float]:
    """t_call (measured: the median `call_us`), then t_bucket, t_candidate, t_verify (seconds,
    non-negative least squares of relative error) over the mean one-at-a-time query time, less
    t_call, of every configuration answered by probing alone."""
    from scipy.optimize import nnls

    probed = [
        r
        for r in records
        if r["engine"] == "mih" and r["batch"] == 1 and r.get("scanned_share") == 0
        and "call_us" in r
    ]  # fmt: skip
    if not probed:
        return {"t_call": 0.0, "t_bucket": 0.0, "t_candidate": 0.0, "t_verify": 0.0}
    t_call = float(np.median([r["call_us"] for r in probed])) * 1e-6
    rows = [
        [r[f"{w}_per_query"] * r["qps"] for w in ("buckets", "candidates", "verified")]
        for r in probed
    ]
    times = [1 - t_call * r["qps"] for r in probed]
    coef = nnls(np.array(rows), np.array(times))[0]
    return {
        "t_call": t_call,
        "t_bucket": float(coef[0]),
        "t_candidate": float(coef[1]),
        "t_verify": float(coef[2]),
    }


def peers(kind: str, n: int, bits: int, real: np.ndarray, p: float | None) -> list[dict]:
    """FAISS MultiHash, FAISS HNSW and usearch at n codes, k = 20, against exact."""
    import faiss

    rng = np.random.default_rng(2)
    if kind == "uniform":
        archive = rng.integers(0, 256, size=(n, bits // 8), dtype=np.uint8)
        queries = rng.integers(0, 256, size=(SINGLE, bits // 8), dtype=np.uint8)
    else:
        archive = synthetic(real, n, float(p or 0), seed=1)
        queries = synthetic(real, SINGLE, float(p or 0), seed=3)
    k, keys = 20, np.arange(n, dtype=np.int64)
    exact = make_engine("exact", bits)
    exact.add(archive, keys)
    mih = make_engine("mih", bits)
    mih.add(archive, keys)
    ref = exact.search(queries, k)[0]
    out = []

    def one(
        name: str, build: Callable[[], Any], search: Callable[[np.ndarray], np.ndarray]
    ) -> None:
        start = time.perf_counter()
        index = build()
        build_s = time.perf_counter() - start
        found = np.stack([search(index, q[None])[0] for q in queries])
        start = time.perf_counter()
        for q in queries:
            search(index, q[None])
        qps = len(queries) / (time.perf_counter() - start)
        start = time.perf_counter()
        for q in queries[:SCAN_SINGLE]:
            exact.search(q[None], k)
        exact_qps = SCAN_SINGLE / (time.perf_counter() - start)
        out.append(
            {
                "engine": name,
                "codes": kind,
                "n": n,
                "bits": bits,
                "k": k,
                "batch": 1,
                "qps": round(qps, 1),
                "exact_qps": round(exact_qps, 1),
                "speedup": round(qps / exact_qps, 2),
                "recall": round(recall_at(found, ref, k), 4),
                "exact_equal": bool(np.array_equal(found, ref)),
                "build_s": round(build_s, 1),
            }
        )
        print(out[-1], flush=True)

    one("mih", lambda: mih, lambda e, q: e.search(q, k)[0])

    def multihash() -> Any:
        index = faiss.IndexBinaryMultiHash(bits, bits // 16, 16)
        index.nflip = 1
        index.add(archive)
        return index

    one("faiss-multihash", multihash, lambda e, q: e.search(q, k)[0])

    def hnsw() -> Any:
        index = faiss.IndexBinaryHNSW(bits, 16)
        index.add(archive)
        index.hnsw.efSearch = 64
        return index

    one("faiss-hnsw", hnsw, lambda e, q: e.search(q, k)[0])
    try:
        from usearch.index import Index as USearch
    except ImportError:
        print("usearch not installed: skipped")
        return out

    def usearch() -> Any:
        index = USearch(ndim=bits, metric="hamming", dtype="b1")
        index.add(keys, archive)
        return index

    def usearch_find(index: Any, q: np.ndarray) -> np.ndarray:
        found = index.search(q[0], k)
        return np.sort(found.distances.astype(np.int64))[None]

    one("usearch", usearch, usearch_find)
    return out


def store_row(n: int, run_dir: Path) -> dict:
    """Top-20 through `Index.search_codes` (records fetched) on an mih and an exact index."""
    rng = np.random.default_rng(4)
    archive = rng.integers(0, 256, size=(n, 8), dtype=np.uint8)
    queries = rng.integers(0, 256, size=(SINGLE, 8), dtype=np.uint8)
    tmp = Path(tempfile.mkdtemp(prefix="mih-store-"))
    qps, build = {}, {}
    try:
        hits = {}
        for name in ("mih", "exact"):
            start = time.perf_counter()
            index = Index.create(tmp / name, run_dir, engine=name)
            for a in range(0, n, 1_000_000):
                part = range(a, min(n, a + 1_000_000))
                index.add("images", archive[part.start : part.stop], [{"id": str(i)} for i in part])
            index.commit()
            build[name] = time.perf_counter() - start
            index = Index.open(tmp / name)
            index.search_codes(queries[:2], 20)
            count = SINGLE if name == "mih" else SCAN_SINGLE
            start = time.perf_counter()
            hits[name] = [index.search_codes(q[None], 20)[0] for q in queries[:count]]
            qps[name] = count / (time.perf_counter() - start)
            index.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    same = [
        [(h.key, h.distance) for h in a] == [(h.key, h.distance) for h in b]
        for a, b in zip(hits["mih"], hits["exact"], strict=False)
    ]
    row = {
        "engine": "mih (Index.search_codes)", "codes": "uniform", "n": n, "bits": 64, "k": 20,
        "batch": 1, "qps": round(qps["mih"], 1), "exact_qps": round(qps["exact"], 1),
        "speedup": round(qps["mih"] / qps["exact"], 2), "exact_equal": all(same),
        "build_s": round(build["mih"], 1), "exact_build_s": round(build["exact"], 1),
    }  # fmt: skip
    print(row, flush=True)
    return row


def _fmt(v: Any, spec: str = "") -> str:
    if v is None:
        return "-"
    return format(v, spec) if spec else str(v)


def markdown(records: list[dict], costs: dict[str, float], histograms: list[str]) -> str:
    header = [
        "engine", "codes", "N", "bits", "k", "batch", "q/s", "exact q/s", "speedup", "equal",
        "recall", "buckets/q", "cand./q", "full reads/q", "scanned", "model ms", "measured ms",
        "model speedup", "memory ×", "build s",
    ]  # fmt: skip
    rows = []
    for r in records:
        model = measured = model_speedup = None
        if r["engine"] == "mih" and "buckets_per_query" in r:
            model = 1e3 * (
                costs["t_call"]
                + costs["t_bucket"] * r["buckets_per_query"]
                + costs["t_candidate"] * r["candidates_per_query"]
                + costs["t_verify"] * r.get("verified_per_query", 0)
            )
            measured = 1e3 / r["qps"] if r["batch"] == 1 else None
            if r["batch"] == 1 and r.get("scanned_share", 0) == 0:
                model_speedup = 1e3 / r["exact_qps"] / model
        rows.append(
            [
                r["engine"] + (" (earlier run)" if r.get("kept_from_earlier_run") else ""),
                r["codes"],
                f"{r['n']:.0e}",
                str(r["bits"]),
                str(r["k"]),
                str(r["batch"]),
                f"{r['qps']:.0f}",
                f"{r['exact_qps']:.0f}",
                f"{r['speedup']:.1f}",
                "yes" if r["exact_equal"] else "no",
                _fmt(r.get("recall"), ".3f"),
                _fmt(r.get("buckets_per_query"), ".0f"),
                _fmt(r.get("candidates_per_query"), ".0f"),
                _fmt(r.get("verified_per_query"), ".0f"),
                _fmt(r.get("scanned_share"), ".2f"),
                _fmt(model, ".3f"),
                _fmt(measured, ".3f"),
                _fmt(model_speedup, ".1f"),
                _fmt(r.get("memory_ratio"), ".2f"),
                _fmt(r.get("build_s"), ".1f"),
            ]
        )
    intro = (
        "# Multi-index hashing (mih) against the exact scan\n\n"
        "Codes only through the Engine API (the last row: through `Index.search_codes`). "
        "speedup = mih q/s ÷ exact q/s measured in the same run; equal: every hit of mih equals "
        "exact's (keys and distances, in order) on the queries both answered. "
        "Cost model (the paper's, plus the archive reads of candidates past their sketch's bound):"
        " buckets × t_bucket + candidates × t_candidate + full reads × t_verify + t_call; t_call "
        "measured (median one-at-a-time top-1 search for an archived code: one bucket), the "
        "others fitted (non-negative least squares of relative error) to this run's "
        f"one-at-a-time queries: t_bucket {costs['t_bucket'] * 1e9:.1f} ns, t_candidate "
        f"{costs['t_candidate'] * 1e9:.2f} ns, t_verify {costs.get('t_verify', 0) * 1e9:.1f} ns, "
        f"t_call {costs['t_call'] * 1e6:.1f} µs; model speedup = exact ms ÷ model ms. "
        "The machine is shared with other jobs: absolute q/s drift with their load, mih and "
        "exact are measured in turns in the same run, so the speedup is the figure to read. "
        "memory × = "
        "(codes + tables) ÷ codes. scanned: share of queries whose probing passed the budget "
        "and were answered by the scan (their time counts in q/s, not in the model). "
        "(earlier run): a peer row kept from the previous table (--keep-peers), not re-measured. "
        "Machine threads: "
        f"{numba.get_num_threads()}; {machine()}.\n\n"
        "Realistic codes: real 64-bit codes of UCM + RSSCN7 images, bits flipped with p:\n"
        + "\n".join(histograms)
        + "\n\n"
    )
    return intro + markdown_table(header, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000_000, 100_000_000])
    parser.add_argument("--bits", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--peer-n", type=int, default=1_000_000)
    parser.add_argument("--store-n", type=int, default=10_000_000)
    parser.add_argument("--max-bytes", type=float, default=1.0e9, help="Largest archive (codes).")
    parser.add_argument(
        "--real", type=Path, nargs="+",
        default=[CACHE_TESTS / "ucm-index", CACHE_TESTS / "rsscn7-index"],
        help="64-bit indexes whose image codes are the real codes.",
    )  # fmt: skip
    parser.add_argument("--run", type=Path, default=CACHE_TESTS / "ucm-duch64")
    parser.add_argument("--quick", action="store_true", help="1e6 codes, no peers or store row.")
    parser.add_argument(
        "--keep-peers", action="store_true",
        help="With --peer-n 0: keep the peer rows (FAISS, usearch) of the saved mih.json.",
    )  # fmt: skip
    parser.add_argument(
        "--render", action="store_true", help="Only rewrite mih.md from results/mih.json."
    )
    args = parser.parse_args()
    if args.render:
        saved = json.loads((RESULTS / "mih.json").read_text())
        old_md = (RESULTS / "mih.md").read_text().splitlines()
        histograms = saved.get("histograms") or [h for h in old_md if h.startswith("- N = ")]
        costs = fit_costs(saved["records"])
        result = {**saved, "unit_costs": costs, "histograms": histograms}
        write_results("mih", result, markdown(saved["records"], costs, histograms))
        return
    if args.quick:
        args.sizes, args.peer_n, args.store_n = [1_000_000], 0, 0
    real = real_codes(args.real)
    print(f"{len(real)} real codes")
    records: list[dict] = []
    histograms: list[str] = []
    p_at: dict[int, float] = {}
    for n in args.sizes:
        for bits in args.bits:
            if n * bits // 8 > args.max_bytes:
                print(f"skip n={n:.0e} bits={bits}: over --max-bytes")
                continue
            for kind in ("uniform", "realistic") if bits == 64 else ("uniform",):
                records += run_config(kind, n, bits, real, histograms)
                if kind == "realistic":
                    p_at[n] = records[-1]["p_flip"]
    costs = fit_costs(records)
    print(costs)
    if args.peer_n:
        for kind in ("uniform", "realistic"):
            p = None
            if kind == "realistic":
                p = calibrate(real, args.peer_n, float(real_nn(real).mean()))[0]
            records += peers(kind, args.peer_n, 64, real, p)
    if args.keep_peers and not args.peer_n:
        saved = json.loads((RESULTS / "mih.json").read_text())["records"]
        records += [{**r, "kept_from_earlier_run": True} for r in saved if "recall" in r]
    if args.store_n:
        records.append(store_row(args.store_n, args.run))
    clean = [{k: v for k, v in r.items() if not k.startswith("_")} for r in records]
    write_results(
        "mih", {"unit_costs": costs, "records": clean}, markdown(clean, costs, histograms)
    )


if __name__ == "__main__":
    main()
