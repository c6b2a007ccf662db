"""The cluster tier's overhead, availability and freshness on a Ray test cluster on loopback.

Several raylets on this machine (`ray.cluster_utils.Cluster`: a head without CPUs and three
1-CPU worker nodes): the figures measure the sharded path's overhead, not scale. Index: the UCM
test index (`.cache/tests/ucm-index`, 64-bit DUCH codes) and the same items in 2 shards.

Scenarios, each closed-loop text clients through `rshash serve` in its own process: the local
index; 2 shards × 2 replicas; the same while one worker node is removed. Freshness: time from an
add's commit (local: `index.json`; sharded: `shards.json` flipped) to /healthz counting the new
items, in `--refresh-interval`s. Records (`results/cluster.json`): scenario, replicas,
node_removed, rps, p50_ms, p99_ms, errors, overhead (1 − sharded rps ÷ local rps),
visible_after_intervals. Usage: python -m benchmarks.cluster [--seconds 20] [--clients 50]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from benchmarks.common import DATA_ROOT, REPO, markdown_table, write_results
from benchmarks.service_load import (
    Outcome,
    start_server,
    text_pool,
    text_request,
    wrk_closed_loop,
)
from rshash.data import load_dataset
from rshash.index import Index, open_index
from rshash.index.sharded import ray_build_shards

TEST_CACHE = REPO / ".cache" / "tests"
LOCAL = {"node_ip_address": "127.0.0.1", "object_store_memory": 80 * 1024 * 1024}
REFRESH_S = 1.0
ADDED = 10  # images each freshness probe adds


def make_indexes(root: Path) -> tuple[Path, Path]:
    """A copy of the UCM test index, and its items in 2 shards (the same codes and keys)."""
    local = root / "local"
    shutil.copytree(TEST_CACHE / "ucm-index", local)
    single = Index.open(local)
    ray_build_shards(
        TEST_CACHE / "ucm-duch64",
        load_dataset(DATA_ROOT / "ucm-captions", check_images=False),
        root / "shards",
        shards=2,
        image_codes=single.collections["images"].codes,
        caption_codes=single.collections["captions"].codes,
    )
    return local, root / "shards"


def free_port() -> int:
    """A port nobody listens on (a fixed one may be another benchmark's server)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_cluster() -> Any:
    import ray
    from ray.cluster_utils import Cluster

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray._private.ray_constants.ENABLE_RAY_CLUSTER = False  # stay on loopback
    c = Cluster(
        initialize_head=True,
        head_node_args={**LOCAL, "num_cpus": 0, "include_dashboard": False},
    )
    workers = [c.add_node(**LOCAL, num_cpus=1) for _ in range(3)]
    c.wait_for_nodes()
    return c, workers


def entry(scenario: str, replicas: int, removed: bool, got: Outcome) -> dict[str, Any]:
    return {
        "scenario": scenario,
        "replicas": replicas,
        "node_removed": removed,
        "rps": round(got.served / got.seconds, 1),
        "p50_ms": round(got.p50_ms, 1),
        "p99_ms": round(got.p99_ms, 1),
        "errors": sum(got.errors.values()) + got.shed,
        "client_cpu": round(got.client_cpu, 3),
    }


def load(
    port: int, requests: list, clients: int, seconds: float, work: Path, during: Any = None
) -> Outcome:
    """Closed-loop wrk clients for `seconds` over a seeded order of `requests`; `during` runs in a
    thread a third of the way in."""
    order = [int(i) for i in np.random.default_rng(0).integers(0, len(requests), 200_000)]
    if during is not None:
        threading.Timer(seconds / 3, during).start()
    return wrk_closed_loop(port, requests, order, clients, seconds, work)


def freshness(index_path: Path, port: int, start: int) -> float:
    """Refresh intervals from an add's commit to /healthz counting the new images."""
    index = open_index(index_path)
    before = index.counts()["images"]
    codes = np.random.default_rng(start).integers(0, 256, (ADDED, 8), np.uint8)
    index.add("images", codes, [{"id": f"bench-{start + i}"} for i in range(ADDED)])
    index.commit()
    committed = time.perf_counter()
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
        # The service looks for a new generation between batches: a query keeps them coming.
        while http.post("/search/text", json={"query": "a river", "k": 1}).status_code and (
            http.get("/healthz").json()["images"] < before + ADDED
        ):
            time.sleep(0.02)
    return round((time.perf_counter() - committed) / REFRESH_S, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--port", type=int, default=0, help="Server port (0: a free one).")
    parser.add_argument("--name", default="cluster", help="Results file name (without suffix).")
    args = parser.parse_args()
    args.port = args.port or free_port()
    requests = [text_request(q) for q in text_pool(random.Random(0))]
    root = Path(tempfile.mkdtemp(prefix="rshash-cluster-bench-"))
    results: list[dict[str, Any]] = []
    c, workers = start_cluster()
    try:
        local, shards = make_indexes(root)
        refresh = ["--refresh-interval", str(REFRESH_S)]
        server = start_server(local, args.port, refresh)
        try:
            got = load(args.port, requests, args.clients, args.seconds, root / "wrk-local")
            results.append(entry("local", 0, False, got))
            results[-1]["visible_after_intervals"] = freshness(local, args.port, 0)
        finally:
            server.terminate()
            server.wait()
        sharded = [*refresh, "--ray-address", c.address, "--replicas", "2", "--device", "cpu"]
        server = start_server(shards, args.port, sharded)
        try:
            got = load(args.port, requests, args.clients, args.seconds, root / "wrk-sharded")
            results.append(entry("sharded", 2, False, got))
            results[-1]["visible_after_intervals"] = freshness(shards, args.port, 100)
            lose = lambda: c.remove_node(workers[0])  # noqa: E731
            got = load(args.port, requests, args.clients, args.seconds, root / "wrk-loss", lose)
            results.append(entry("sharded_node_loss", 2, True, got))
        finally:
            server.terminate()
            server.wait()
    finally:
        c.shutdown()
        shutil.rmtree(root, ignore_errors=True)
    local_rps = results[0]["rps"]
    for r in results:
        r["overhead"] = round(1 - r["rps"] / local_rps, 3) if local_rps else None
        r.setdefault("visible_after_intervals", None)
    header = list(results[0])
    rows = [[str(r[k]) for k in header] for r in results]
    note = (
        f"{args.clients} closed-loop text clients (wrk; client_cpu: its share of one core), "
        f"{args.seconds:g} s per scenario, on a Ray test cluster on loopback (head + 3 one-CPU "
        "nodes on this machine)."
    )
    write_results(args.name, results, f"{note}\n\n" + markdown_table(header, rows))


if __name__ == "__main__":
    main()
