"""Search speed: our exact engine, FAISS exact and IVF, a numpy baseline, and two limits.

N = 1e5, 1e6, 1e7 codes of 64 bits (and 1e6 of 128 bits), random and clustered (signs of
random projections of a Gaussian mixture, like real hash codes); 1000 queries; k = 20.

Limits, measured on this machine in this run:
- (a) single query: read bandwidth over a buffer as large as the codes ÷ bytes per query;
- (b) batched: in-cache XOR + popcount throughput (64-bit words/s, all cores) ÷ words per query.
Each figure is measured in turn with its limit, five times: the machine is shared and its speed
drifts (memory bandwidth swings by 2x within a run), so a figure and its limit are taken under
the same load. The ratio is the median of the five paired ratios, robust to a burst in either;
queries/s and limit are the medians of their five measurements.
Recall@20 is tie-aware: the share of returned items no farther than the exact 20th neighbour.
Usage: python -m benchmarks.search [--sizes 100000 1000000 10000000] [--quick]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numba
import numpy as np

from benchmarks.common import machine, markdown_table, write_results
from rshash.index import kernels, make_engine, pack_codes
from rshash.index.engines import recall_at
from rshash.index.packing import aligned_empty

K = 20
QUERIES = 1000


def codes(kind: str, n: int, bits: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "random":
        return rng.integers(0, 256, size=(n, bits // 8), dtype=np.uint8)
    mix = np.random.default_rng(12345)  # the same mixture and projection for archive and queries
    centres = mix.normal(size=(64, 32)).astype(np.float32)
    proj = mix.normal(size=(32, bits)).astype(np.float32)
    out = np.empty((n, bits // 8), np.uint8)
    for s in range(0, n, 1_000_000):
        m = min(n, s + 1_000_000) - s
        x = centres[rng.integers(0, 64, m)] + 0.6 * rng.normal(size=(m, 32)).astype(np.float32)
        out[s : s + m] = pack_codes(x @ proj)
    return out


def rate(fn: Callable[[], object], items: int, min_seconds: float = 0.5) -> float:
    """Items per second of `fn`, repeated until at least `min_seconds` have passed."""
    reps, start = 0, time.perf_counter()
    while True:
        fn()
        reps += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return items * reps / elapsed


class Limits:
    """The two physical limits for n codes of `bits` bits, measured on demand on this machine.

    (a) all cores reading a buffer as large as the codes, ÷ bytes per query; (b) in-cache
    XOR + popcount on all cores (a cache-line-aligned buffer: the best case), ÷ words per query.
    """

    def __init__(self, n: int, bits: int) -> None:
        self.threads = numba.get_num_threads()
        self.words_per_query = n * bits // 64
        rng = np.random.default_rng(7)
        self.buf = aligned_empty((max(self.words_per_query, 1 << 16),))
        self.buf[:] = rng.integers(0, 2**63, size=len(self.buf), dtype=np.int64).view(np.uint64)
        self.small = self.buf[:4096]
        kernels.read_bandwidth(self.small, self.threads)
        kernels.popcount_throughput(self.small, 1, self.threads)

    def measure(self, batch: int) -> float:
        """One measurement of limit (a) (batch 1) or (b) (batches), in queries/s."""
        if batch == 1:
            bytes_s = rate(lambda: kernels.read_bandwidth(self.buf, self.threads), self.buf.nbytes)
            return bytes_s / (self.words_per_query * 8)
        words_s = rate(
            lambda: kernels.popcount_throughput(self.small, 2000, self.threads),
            len(self.small) * 2000 * self.threads,
        )
        return words_s / self.words_per_query


def paired(
    measure: Callable[[], float], limit: Callable[[], float], tries: int = 5
) -> tuple[float, float, float]:
    """Medians of `measure`, of `limit` and of their ratio, the two taken in turn `tries` times.

    The machine is shared: its speed drifts within a run. Interleaving puts a figure and its
    limit under the same conditions, and medians keep one burst from deciding the result.
    """
    ours, bound = (
        np.array(v) for v in zip(*((measure(), limit()) for _ in range(tries)), strict=True)
    )
    return float(np.median(ours)), float(np.median(bound)), float(np.median(ours / bound))


def numpy_search(archive: np.ndarray, query: np.ndarray) -> np.ndarray:
    d = np.bitwise_count(archive ^ query).sum(1, dtype=np.int32)
    top = np.argpartition(d, K)[:K]
    return top[np.lexsort((top, d[top]))]


def run_config(kind: str, n: int, bits: int, single_queries: int) -> list[dict]:
    archive = codes(kind, n, bits, seed=1)
    queries = codes(kind, QUERIES, bits, seed=2)
    keys = np.arange(n, dtype=np.int64)
    limits = Limits(n, bits)
    records = []

    def record(
        engine: str,
        batch: int,
        measure: Callable[[], float],
        recall: float | None,
        build_s: float,
        bytes_per_item: float,
        tries: int = 5,
    ) -> None:
        qps, limit, ratio = paired(measure, lambda: limits.measure(batch), tries)
        records.append(
            {
                "engine": engine,
                "codes": kind,
                "n": n,
                "bits": bits,
                "batch": batch,
                "qps": round(qps, 1),
                "recall_at_20": recall,
                "limit_qps": round(limit, 1),
                "ratio": round(ratio, 3),
                "build_s": round(build_s, 2),
                "bytes_per_item": bytes_per_item,
            }
        )
        print(records[-1], flush=True)

    exact_d = None
    for name in ("exact", "faiss-flat", "faiss-ivf"):
        engine = make_engine(name, bits)
        start = time.perf_counter()
        engine.build(archive, keys)
        build_s = time.perf_counter() - start
        engine.search(queries[:2], K)  # compile / warm up
        found = engine.search(queries, K)[0]
        if exact_d is None:
            exact_d = found
        recall = recall_at(found, exact_d, K)
        per_item = bits / 8 + (8 if name != "exact" else 0)  # FAISS ID maps store int64 ids
        recall = round(recall, 4)
        record(
            name,
            QUERIES,
            lambda e=engine: rate(lambda: e.search(queries, K), QUERIES),
            recall,
            build_s,
            per_item,
        )
        if name != "faiss-ivf":
            record(
                name,
                1,
                lambda e=engine: rate(
                    lambda: [e.search(queries[i : i + 1], K) for i in range(single_queries)],
                    single_queries,
                ),
                recall,
                build_s,
                per_item,
            )
        del engine
    few = max(3, single_queries // 10)

    def numpy_qps() -> float:
        return rate(lambda: [numpy_search(archive, queries[i]) for i in range(few)], few)

    record("numpy", 1, numpy_qps, 1.0, 0.0, bits / 8, tries=1)
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000, 10_000_000])
    parser.add_argument("--quick", action="store_true", help="Only 1e5 and 1e6 codes.")
    args = parser.parse_args()
    sizes = [s for s in args.sizes if not (args.quick and s > 1_000_000)]
    configs = [(n, 64) for n in sizes] + ([(1_000_000, 128)] if 1_000_000 in sizes else [])
    records = []
    for n, bits in configs:
        for kind in ("random", "clustered"):
            records += run_config(kind, n, bits, single_queries=200 if n <= 1_000_000 else 50)
    rows = [
        [
            r["engine"],
            r["codes"],
            f"{r['n']:.0e}",
            str(r["bits"]),
            str(r["batch"]),
            f"{r['qps']:.0f}",
            "-" if r["recall_at_20"] is None else f"{r['recall_at_20']:.3f}",
            f"{r['limit_qps']:.0f}",
            f"{r['ratio']:.2f}",
            f"{r['build_s']:.1f}",
            f"{r['bytes_per_item']:g}",
        ]
        for r in records
    ]
    header = [
        "engine",
        "codes",
        "N",
        "bits",
        "batch",
        "queries/s",
        "recall@20",
        "limit q/s",
        "ratio",
        "build s",
        "bytes/item",
    ]
    intro = (
        "# Search speed (k = 20, 1000 queries)\n\n"
        "Limit for batch 1: read bandwidth over a buffer the size of the codes ÷ bytes per query; "
        "for batches: in-cache XOR+popcount words/s on all cores (cache-line-aligned buffer) ÷ "
        "words per query. Each figure and its limit are measured in turn, 5 times; the table gives "
        "the medians, and the ratio is the median of the 5 paired ratios. "
        f"Machine threads: {numba.get_num_threads()}; {machine()}.\n\n"
    )
    write_results("search", records, intro + markdown_table(header, rows))


if __name__ == "__main__":
    main()
