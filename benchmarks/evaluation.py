"""Speed of the full PROTOCOL.md scoring: 1,000 queries × 100,000 items, 64-bit codes.

The limit is the bare work every metric needs: Hamming distances (one matrix product) plus a
stable sort of every query's distances; the ratio shows what the metrics add on top.
Usage: python -m benchmarks.evaluation [--queries 1000] [--items 100000]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from benchmarks.common import machine, markdown_table, write_results
from rshash.evaluation.metrics import hamming_distance, score_retrieval


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--bits", type=int, default=64)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    q = np.where(rng.standard_normal((args.queries, args.bits)) > 0, 1, -1).astype(np.int8)
    x = np.where(rng.standard_normal((args.items, args.bits)) > 0, 1, -1).astype(np.int8)
    ql, xl = rng.integers(0, 20, args.queries), rng.integers(0, 20, args.items)

    start = time.perf_counter()
    score_retrieval(q, ql, x, xl)
    ours = time.perf_counter() - start

    start = time.perf_counter()
    for s in range(0, args.queries, 256):
        np.argsort(hamming_distance(q[s : s + 256], x), axis=1, kind="stable")
    limit = time.perf_counter() - start

    record = {
        "queries": args.queries,
        "items": args.items,
        "bits": args.bits,
        "seconds": ours,
        "distance_and_sort_seconds": limit,
        "ratio": limit / ours,
        "machine": machine(),
    }
    table = markdown_table(
        ["task", "ours s", "distances + stable sort only s", "ratio"],
        [
            [
                f"all metrics, {args.queries} × {args.items} codes of {args.bits} bits",
                f"{ours:.1f}",
                f"{limit:.1f}",
                f"{limit / ours:.2f}",
            ]
        ],
    )
    write_results("evaluation", record, "# Evaluation speed\n\n" + table)


if __name__ == "__main__":
    main()
