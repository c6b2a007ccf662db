"""The cluster tier's overhead, availability and freshness on a Ray test cluster on loopback.

Several raylets on this machine (`ray.cluster_utils.Cluster`: a head without CPUs and three
1-CPU worker nodes): the figures measure the sharded path's overhead, not scale. Index: the UCM
test index (`.cache/tests/ucm-index`, 64-bit DUCH codes) and the same items in 2 shards.

Both services run side by side (`rshash serve` processes: the local index, and 2 shards × 2
replicas), and closed-loop wrk text clients load them in alternating rounds (local first in even
rounds, sharded first in odd ones), so that whatever else the machine runs weighs on both alike;
each figure is the median over the rounds, and `server_cpu_ms` is the CPU the service spent per
request (the serve process and, sharded, every shard replica). Then the sharded service through a
worker node's removal (its own round, beside a local round just before it). Freshness: time from
an add's commit (local: `index.json`; sharded: `shards.json` flipped) to /healthz counting the
new items, in `--refresh-interval`s. Records (`results/cluster.json`): scenario, replicas,
node_removed, rps, p50_ms, p99_ms, errors, overhead (1 − sharded rps ÷ local rps),
visible_after_intervals. Usage: python -m benchmarks.cluster [--seconds 10] [--rounds 5]
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


def cpu_seconds(pids: list[int]) -> dict[int, float]:
    """User + system CPU seconds so far of each of these processes still running."""
    spent = {}
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        spent[pid] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return spent


def replica_pids() -> list[int]:
    """The shard replicas' processes (Ray names them after the actor class)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "cmdline").read_bytes().startswith(b"ray::_Shard"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def round_of(
    port: int,
    pids: list[int],
    requests: list,
    clients: int,
    seconds: float,
    work: Path,
    during=None,
) -> dict[str, Any]:
    """One closed-loop round over a seeded order of `requests` (`during` runs in a thread a
    third of the way in): the client's figures and the service's CPU per request."""
    order = [int(i) for i in np.random.default_rng(0).integers(0, len(requests), 200_000)]
    if during is not None:
        threading.Timer(seconds / 3, during).start()
    before = cpu_seconds(pids)
    got = wrk_closed_loop(port, requests, order, clients, seconds, work)
    after = cpu_seconds(pids)  # a replica lost with its node (or one started since): not counted
    spent = sum(after.get(pid, t) - t for pid, t in before.items())
    return {
        "rps": got.served / got.seconds,
        "p50_ms": got.p50_ms,
        "p99_ms": got.p99_ms,
        "errors": sum(got.errors.values()) + got.shed,
        "client_cpu": got.client_cpu,
        "server_cpu_ms": 1e3 * spent / max(got.served, 1),
    }


def entry(scenario: str, replicas: int, removed: bool, rounds: list[dict[str, Any]]) -> dict:
    """A scenario's record: medians over its rounds (errors: their sum)."""
    out: dict[str, Any] = {"scenario": scenario, "replicas": replicas, "node_removed": removed}
    for key in ("rps", "p50_ms", "p99_ms", "server_cpu_ms", "client_cpu"):
        out[key] = round(float(np.median([r[key] for r in rounds])), 3 if "cpu" in key else 1)
    out["errors"] = sum(r["errors"] for r in rounds)
    out["rounds"] = len(rounds)
    return out


def system_cpu() -> float:
    """CPU seconds the whole machine has spent (every process, user + system)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    return (sum(values) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")


def search_path(local: Path, shards: Path, address: str, batches: int = 300) -> list[dict]:
    """`search_codes` alone (no encoder, no HTTP), a batch of 16 queries at k = 20: wall time
    and the machine's CPU per batch, local index and 2 shards × 2 replicas, before the services
    start (the machine otherwise idle)."""
    import ray

    from rshash.index.sharded import ShardedIndex

    ray.init(address=address, log_to_driver=False)
    try:
        queries = np.random.default_rng(0).integers(0, 256, (16, 8), np.uint8)
        out = []
        for name, index in (
            ("local", Index.open(local)),
            ("sharded", ShardedIndex(shards, address=address, replicas=2)),
        ):
            index.search_codes(queries, 20)
            walls, cpu = [], system_cpu()
            for _ in range(batches):
                start = time.perf_counter()
                index.search_codes(queries, 20)
                walls.append(time.perf_counter() - start)
            out.append(
                {
                    "scenario": f"search_codes_{name}",
                    "replicas": 2 if name == "sharded" else 0,
                    "batch": 16,
                    "p50_ms": round(1e3 * float(np.median(walls)), 2),
                    "cpu_ms": round(1e3 * (system_cpu() - cpu) / batches, 2),
                }
            )
    finally:
        ray.shutdown()  # the driver's replicas go with it
    return out


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
    parser.add_argument("--seconds", type=float, default=10, help="Seconds per round.")
    parser.add_argument("--rounds", type=int, default=5, help="Rounds per scenario.")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--name", default="cluster", help="Results file name (without suffix).")
    args = parser.parse_args()
    for name in ("seconds", "rounds", "clients"):  # before anything runs or is overwritten
        if getattr(args, name) <= 0:
            parser.error(f"--{name}: expected a positive number, got {getattr(args, name)}")
    requests = [text_request(q) for q in text_pool(random.Random(0))]
    root = Path(tempfile.mkdtemp(prefix="rshash-cluster-bench-"))
    c, workers = start_cluster()
    servers = []
    try:
        local, shards = make_indexes(root)
        path = search_path(local, shards, c.address)
        # Query cache off: rounds replay one seeded order, and a cache warmed by earlier rounds
        # would make later rounds (of either service) measure repeats, not searches.
        refresh = ["--refresh-interval", str(REFRESH_S), "--query-cache", "0"]
        sharded_options = [*refresh, "--ray-address", c.address, "--replicas", "2"]
        ports = {"local": free_port(), "sharded": free_port()}
        servers.append(start_server(local, ports["local"], refresh))
        servers.append(
            start_server(shards, ports["sharded"], [*sharded_options, "--device", "cpu"])
        )
        pids = {"local": [servers[0].pid], "sharded": [servers[1].pid, *replica_pids()]}
        rounds: dict[str, list[dict[str, Any]]] = {"local": [], "sharded": []}
        for r in range(args.rounds):
            for name in ("local", "sharded") if r % 2 == 0 else ("sharded", "local"):
                work = root / f"wrk-{name}-{r}"
                got = round_of(ports[name], pids[name], requests, args.clients, args.seconds, work)
                rounds[name].append(got)
                print(f"round {r} {name}: {got['rps']:.1f} req/s", flush=True)
        results = [entry("local", 0, False, rounds["local"])]
        results.append(entry("sharded", 2, False, rounds["sharded"]))
        results[0]["visible_after_intervals"] = freshness(local, ports["local"], 0)
        results[1]["visible_after_intervals"] = freshness(shards, ports["sharded"], 100)
        just_before = round_of(
            ports["local"], pids["local"], requests, args.clients, args.seconds, root / "wrk-l"
        )
        lose = lambda: c.remove_node(workers[0])  # noqa: E731
        loss = round_of(
            ports["sharded"],
            pids["sharded"],
            requests,
            args.clients,
            args.seconds,
            root / "wrk-loss",
            lose,
        )
        results.append(entry("sharded_node_loss", 2, True, [loss]))
        results[-1]["local_rps_just_before"] = round(just_before["rps"], 1)
    finally:
        for server in servers:
            server.terminate()
            server.wait()
        c.shutdown()
        shutil.rmtree(root, ignore_errors=True)
    local_rps = results[0]["rps"]
    for r in results:
        base = r.get("local_rps_just_before", local_rps)
        r["overhead"] = round(1 - r["rps"] / base, 3) if base else None
        r.setdefault("visible_after_intervals", None)
    header = [k for k in results[0] if k != "rounds"] + ["overhead"]
    header = list(dict.fromkeys(header))
    rows = [[str(r.get(k)) for k in header] for r in results]
    note = (
        f"{args.clients} closed-loop text clients (wrk; client_cpu: its share of one core), query "
        "cache off; both "
        f"services up side by side and loaded in {args.rounds} alternating rounds of "
        f"{args.seconds:g} s (medians); server_cpu_ms: CPU per request of the serve process and "
        "the shard replicas; the node-loss round's overhead is against a local round just "
        "before it. Ray test cluster on loopback (head + 3 one-CPU nodes on this machine)."
    )
    path_header = list(path[0])
    path_rows = [[str(r[k]) for k in path_header] for r in path]
    path_note = (
        "The search path alone (`search_codes`, 16 queries, k = 20, no encoder or HTTP; cpu_ms: "
        "the whole machine's CPU per batch):"
    )
    tables = f"{note}\n\n{markdown_table(header, rows)}\n\n{path_note}\n\n"
    write_results(args.name, results + path, tables + markdown_table(path_header, path_rows))


if __name__ == "__main__":
    main()
