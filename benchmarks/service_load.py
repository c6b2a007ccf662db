"""Load test of the search service on loopback: concurrent clients sending text queries.

Starts `rshash serve` on a UCM index (built on first use from the benchmark feature cache and a
64-bit DUCH run) in its own process, then runs `--clients` concurrent clients for `--seconds`.
Limit: the same text queries answered in-process, one after another (encoder + search, no HTTP).
Usage: python -m benchmarks.service_load [--clients 50] [--seconds 30]
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time

import httpx
import numpy as np

from benchmarks.common import CACHE, DATA_ROOT, markdown_table, write_results
from rshash.data import load_dataset
from rshash.features import ExtractConfig, extract_features
from rshash.index import Index
from rshash.index.build import build_index
from rshash.training import OptimConfig, TrainConfig, train

QUERIES = [
    "a river crossing farmland",
    "many planes parked at the airport",
    "dense residential houses",
    "a parking lot full of cars",
    "green trees in a forest",
    "a baseball field beside a road",
    "white waves on a sandy beach",
    "an overpass over a highway",
]


def ucm_index() -> str:
    ucm = DATA_ROOT / "ucm-captions"
    features = CACHE / "ucm-features.h5"
    if not features.exists():
        extract_features(load_dataset(ucm), features, ExtractConfig())
    run = CACHE / "runs" / "duch-b64-s0-e100"
    if not (run / "model.pt").exists():
        train(TrainConfig(features=str(features), bits=64, optim=OptimConfig(epochs=100)), run)
    out = CACHE / "ucm-index"
    if not (out / "index.json").exists():
        build_index(run, load_dataset(ucm), out, features=features)
    return str(out)


async def client(
    http: httpx.AsyncClient, stop: float, latencies: list[float], errors: list[str], seed: int
) -> None:
    rng = np.random.default_rng(seed)
    while time.perf_counter() < stop:
        query = QUERIES[rng.integers(len(QUERIES))]
        start = time.perf_counter()
        try:
            r = await http.post("/search/text", json={"query": query, "k": 20})
            if r.status_code != 200:
                errors.append(f"{r.status_code}")
        except httpx.HTTPError as exc:
            errors.append(type(exc).__name__)
        latencies.append(time.perf_counter() - start)


async def load(url: str, clients: int, seconds: float) -> tuple[list[float], list[str], float]:
    latencies: list[float] = []
    errors: list[str] = []
    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(
            *(client(http, start + seconds, latencies, errors, i) for i in range(clients))
        )
        return latencies, errors, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args()
    index_path = ucm_index()
    index = Index.open(index_path)
    index.search_text(QUERIES[0])
    start = time.perf_counter()
    for q in QUERIES * 5:
        index.search_text(q)
    limit_rps = len(QUERIES) * 5 / (time.perf_counter() - start)
    del index

    server = subprocess.Popen(
        [sys.executable, "-m", "rshash.cli", "serve", index_path, "--port", str(args.port)]
    )
    url = f"http://127.0.0.1:{args.port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/healthz").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        latencies, errors, elapsed = asyncio.run(load(url, args.clients, args.seconds))
    finally:
        server.terminate()
        server.wait()
    ms = np.array(latencies) * 1000
    record = {
        "clients": args.clients,
        "seconds": round(elapsed, 1),
        "requests": len(latencies),
        "rps": round(len(latencies) / elapsed, 1),
        "p50_ms": round(float(np.percentile(ms, 50)), 1),
        "p99_ms": round(float(np.percentile(ms, 99)), 1),
        "errors": len(errors),
        "limit_rps": round(limit_rps, 1),
        "ratio": round(len(latencies) / elapsed / limit_rps, 3),
    }
    table = markdown_table(
        [
            "clients",
            "requests",
            "req/s",
            "p50 ms",
            "p99 ms",
            "errors",
            "in-process limit req/s",
            "ratio",
        ],
        [
            [
                str(record[k])
                for k in (
                    "clients",
                    "requests",
                    "rps",
                    "p50_ms",
                    "p99_ms",
                    "errors",
                    "limit_rps",
                    "ratio",
                )
            ]
        ],
    )
    intro = (
        "# Search service under load (text queries, k = 20, loopback)\n\n"
        "Limit: the same queries answered in-process one after another (text encoder + search).\n\n"
    )
    write_results("service", record, intro + table)


if __name__ == "__main__":
    main()
