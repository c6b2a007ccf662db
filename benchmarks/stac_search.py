"""`/stac/search` with `q` against `/search/text` with the same filters: closed loop, 16 clients.

Index: the STAC catalog of real-UCM mosaics the tests use (tests/stac_data.py: two collections,
two dates, 36 tiles), encoded with the cached 64-bit DUCH test run. The server (`rshash serve`,
default knobs) runs in its own process; queries are UCM captions and composed phrases
(benchmarks.service_load's pool). Both endpoints get the same filters (the box holding every
Item and `datetime` 2021-01-01T00:00:00Z/..) and k = limit = 20. The two are measured in turn,
`--pairs` times in alternating order, after an unmeasured warm-up of both (numba kernels, the
query cache); the machine is shared, so the ratio is the median of the paired ratios.
Goal: `/stac/search` at >= 0.8 of `/search/text`.
Usage: python -m benchmarks.stac_search [--seconds 20] [--pairs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from pathlib import Path
from typing import Any

from benchmarks.common import REPO, markdown_table, write_results
from benchmarks.service_load import SEED, Connection, Request, start_server, text_pool

CACHE = REPO / ".cache" / "benchmarks" / "stac"
RUN = REPO / ".cache" / "tests" / "ucm-duch64"
BOX = [-117.02, 33.97, -116.98, 33.99]
DATETIME = "2021-01-01T00:00:00Z/.."  # the STAC API takes full RFC 3339 timestamps
CLIENTS = 16
K = 20
GOAL = 0.8


def stac_index() -> Path:
    """The tests' STAC catalog, indexed once (cached)."""
    from rshash.data.stac import StacTiles
    from rshash.index.build import BuildConfig, build_index
    from tests.stac_data import write_catalog

    out = CACHE / "index"
    if not (out / "index.json").exists():
        catalog = CACHE / "catalog" / "stac" / "catalog.json"
        if not catalog.exists():
            catalog = write_catalog(CACHE / "catalog")
        build_index(RUN, StacTiles(catalog), out, BuildConfig(device="cpu"), progress=False)
    return out


def text_request(query: str) -> Request:
    body = {"query": query, "k": K, "bbox": BOX, "datetime": DATETIME}
    return "/search/text", json.dumps(body).encode(), "application/json"


def stac_request(query: str) -> Request:
    body = {"q": query, "limit": K, "bbox": BOX, "datetime": DATETIME}
    return "/stac/search", json.dumps(body).encode(), "application/json"


async def closed_loop(port: int, requests: list[Request], seconds: float) -> dict[str, int]:
    """CLIENTS keep-alive clients, each sending its next request when the last is answered."""
    counts = {"served": 0, "shed": 0, "errors": 0}
    rng = random.Random(SEED)
    stop = time.perf_counter() + seconds

    async def client() -> None:
        conn = Connection(port)
        while time.perf_counter() < stop:
            try:
                status, _ = await conn.post(*rng.choice(requests))
            except (OSError, asyncio.IncompleteReadError):
                counts["errors"] += 1
                conn.close()
                conn = Connection(port)
                continue
            kind = {200: "served", 503: "shed"}.get(status, "errors")
            counts[kind] += 1
        conn.close()

    await asyncio.gather(*(client() for _ in range(CLIENTS)))
    return counts


def measure(port: int, requests: list[Request], seconds: float) -> dict[str, Any]:
    start = time.perf_counter()
    counts = asyncio.run(closed_loop(port, requests, seconds))
    elapsed = time.perf_counter() - start
    return {"rps": counts["served"] / elapsed, "errors": counts["errors"], "shed": counts["shed"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--port", type=int, default=8766)
    args = parser.parse_args()
    index = stac_index()
    texts = text_pool(random.Random(SEED))
    plain = [text_request(q) for q in texts]
    stac = [stac_request(q) for q in texts]
    server = start_server(index, args.port, [])
    runs: list[dict[str, Any]] = []
    try:
        measure(args.port, plain + stac, args.seconds)  # warm-up: JIT kernels, the query cache
        for i in range(args.pairs):
            order = [("text", plain), ("stac", stac)]
            pair = {}
            for name, requests in order if i % 2 == 0 else order[::-1]:
                pair[name] = measure(args.port, requests, args.seconds)
                time.sleep(1)
            pair["ratio"] = pair["stac"]["rps"] / pair["text"]["rps"]
            print(pair, flush=True)
            runs.append(pair)
    finally:
        server.terminate()
        server.wait()
    ratio = statistics.median(r["ratio"] for r in runs)
    record = {
        "goal_ratio": GOAL,
        "ratio": ratio,
        "pairs": runs,
        "clients": CLIENTS,
        "k": K,
        "filters": {"bbox": BOX, "datetime": DATETIME},
        "seconds_per_run": args.seconds,
    }
    rows = [
        [str(i + 1), f"{r['text']['rps']:.1f}", f"{r['stac']['rps']:.1f}", f"{r['ratio']:.2f}",
         str(r["text"]["errors"] + r["stac"]["errors"])]
        for i, r in enumerate(runs)
    ]  # fmt: skip
    markdown = (
        "# STAC search with q against /search/text (same filters, closed loop)\n\n"
        f"{CLIENTS} clients, k = limit = {K}, bbox {BOX}, datetime {DATETIME}, "
        f"{args.seconds:g} s per run, alternating order. Median ratio {ratio:.2f} "
        f"(goal >= {GOAL}).\n\n"
        + markdown_table(["pair", "/search/text rps", "/stac/search rps", "ratio", "errors"], rows)
        + "\n"
    )
    write_results("stac_search", record, markdown)


if __name__ == "__main__":
    main()
