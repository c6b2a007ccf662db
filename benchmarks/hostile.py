"""Hostile filters against a real `rshash serve` process on loopback (UCM index, the cached
64-bit test run, default knobs).

1. Fuzzed filters: N seeded inputs (token soup, deep nesting, huge numbers, lone surrogates,
   over-long texts) sent as `where` of `POST /search/text`: every answer must be 200 (a filter
   that happens to be valid) or 4xx; recorded: the count of each and the p99 time to reject.
2. Interference: the latency of plain text queries from one client, alone, then while 4 clients
   send hostile filters back to back: valid filters at the length limit (comparisons on an
   unindexed column and a record field, different each time, so every one runs its SQL query),
   nesting at the depth limit and rejected ones (deeper, longer, out-of-range numbers). Goal:
   a hostile request never slows another by more than 50 ms (p50 and p99 with vs. without). A
   third phase sends as many ordinary queries (small filters) instead, to tell load from
   hostility.

Usage: python -m benchmarks.hostile [--seconds 10] [--inputs 500]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import DATA_ROOT, REPO, markdown_table, write_results
from benchmarks.service_load import Connection, start_server
from rshash.errors import RshashError
from rshash.index import filters
from rshash.reproducibility import provenance

TEST_CACHE = REPO / ".cache" / "tests"
INDEX = REPO / ".cache" / "benchmarks" / "hostile-index"
SEED = 0
GOAL_MS = 50.0
PLAIN = ["a river crossing farmland", "dense residential houses", "green trees in a forest",
         "many planes parked at the airport", "parking lots", "two tennis courts"]  # fmt: skip
WORDS = ["and", "or", "not", "in", "(", ")", ",", "=", "!=", "<=", ">", "true", "null",
         "class", "dataset.v", "clas", "'river'", '"x\\"', "--", ";"]  # fmt: skip


def index_once() -> Path:
    """The UCM test index if the test cache has it, else one built from its features."""
    if (TEST_CACHE / "ucm-index" / "index.json").exists():
        return TEST_CACHE / "ucm-index"
    if not (INDEX / "index.json").exists():
        from rshash.data import load_dataset
        from rshash.index.build import build_index

        ucm = load_dataset(DATA_ROOT / "ucm-captions")
        feats = TEST_CACHE / "ucm-features.h5"
        build_index(TEST_CACHE / "ucm-duch64", ucm, INDEX, features=feats, progress=False)
    return INDEX


def fuzzed(rng: random.Random) -> str:
    """One hostile filter of a random kind."""
    kind = rng.randrange(6)
    if kind == 0:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randrange(1, 40)))
    if kind == 1:
        depth = rng.randrange(20, 400)
        return "(" * depth + "class = 'river'" + ")" * depth
    if kind == 2:
        return f"dataset.v = {rng.choice(['', '-'])}{rng.randrange(2**63, 2**80)}"
    if kind == 3:
        return "class = " + "9" * rng.randrange(60, 6000)
    if kind == 4:
        return "class = '" + chr(rng.randrange(0xD800, 0xE000)) + "'"
    return "class = 'x' or " * rng.randrange(300, 400) + "class = 'y'"


def max_length_filter(rng: random.Random) -> str:
    """A valid filter at the limits: up to 256 comparisons (unindexed column, record field),
    all different, so that SQLite runs each on every item."""
    parts = [
        f"path = '{rng.randrange(10**6)}' or dataset.v = {rng.randrange(10**6)}" for _ in range(128)
    ]
    text = " or ".join(parts)
    while len(text) > filters.MAX_CHARS:
        parts.pop()
        text = " or ".join(parts)
    return text


def deepest_filter(rng: random.Random) -> str:
    d = filters.MAX_DEPTH // 2
    inner = f"dataset.v != {rng.randrange(10**6)}"
    return "".join("class = 'x' or (class != 'y' and (" for _ in range(d)) + inner + "))" * d


def ordinary_filter(rng: random.Random) -> str:
    return f"class = '{rng.choice(['river', 'forest', 'airplane'])}'"


def body(query: str, where: str | None = None) -> bytes:
    payload: dict[str, Any] = {"query": query, "k": 20}
    if where is not None:
        payload["where"] = where
    return json.dumps(payload).encode()


async def post(conn: Connection, data: bytes) -> tuple[int, float]:
    start = time.perf_counter()
    status, _ = await conn.post("/search/text", data, "application/json")
    return status, time.perf_counter() - start


async def fuzz(port: int, inputs: list[str]) -> dict[str, Any]:
    conn = Connection(port)
    statuses: dict[str, int] = {}
    reject_s = []
    for where in inputs:
        status, seconds = await post(conn, body("a river", where))
        statuses[str(status)] = statuses.get(str(status), 0) + 1
        if 400 <= status < 500:
            reject_s.append(seconds)
    conn.close()
    non_4xx = sum(n for s, n in statuses.items() if not (400 <= int(s) < 500 or s == "200"))
    return {
        "inputs": len(inputs),
        "statuses": statuses,
        "not_200_or_4xx": non_4xx,
        "p99_reject_ms": round(float(np.percentile(reject_s, 99)) * 1000, 2),
        "max_reject_ms": round(max(reject_s) * 1000, 2),
    }


async def interference(
    port: int, seconds: float, hostile_clients: int, hostile: bool = True
) -> dict[str, Any]:
    """Plain-query latencies from one client while `hostile_clients` send hostile filters (or,
    with `hostile` False, as many ordinary queries with small filters: the same load, benign)."""
    rng = random.Random(SEED + hostile_clients)
    stop = time.perf_counter() + seconds
    plain: list[float] = []
    statuses: dict[str, int] = {}
    hostile_s: list[float] = []

    async def plain_client() -> None:
        conn = Connection(port)
        i = 0
        while time.perf_counter() < stop:
            status, took = await post(conn, body(PLAIN[i % len(PLAIN)]))
            assert status == 200, status
            plain.append(took)
            i += 1
        conn.close()

    async def hostile_client(c: int) -> None:
        conn = Connection(port)
        makers = [max_length_filter, deepest_filter, fuzzed] if hostile else [ordinary_filter]
        i = c
        while time.perf_counter() < stop:
            status, took = await post(conn, body("a river", makers[i % len(makers)](rng)))
            statuses[str(status)] = statuses.get(str(status), 0) + 1
            hostile_s.append(took)
            i += 1
        conn.close()

    await asyncio.gather(plain_client(), *(hostile_client(c) for c in range(hostile_clients)))
    ms = np.array(plain) * 1000
    return {
        "other_clients": hostile_clients,
        "hostile": hostile,
        "plain_queries": len(plain),
        "plain_p50_ms": round(float(np.percentile(ms, 50)), 1),
        "plain_p99_ms": round(float(np.percentile(ms, 99)), 1),
        "other_requests": sum(statuses.values()),
        "other_statuses": statuses,
        "other_p50_ms": (
            round(float(np.percentile(hostile_s, 50)) * 1000, 1) if hostile_s else None
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--inputs", type=int, default=500)
    parser.add_argument("--port", type=int, default=8766)
    args = parser.parse_args()
    rng = random.Random(SEED)
    inputs = [fuzzed(rng) for _ in range(args.inputs)]
    compile_s = []
    for where in inputs:
        start = time.perf_counter()
        with contextlib.suppress(RshashError):  # the time counts here; HTTP checks answers
            filters.compile_where(where, {"class", "dataset"})
        compile_s.append(time.perf_counter() - start)
    server = start_server(index_once(), args.port, [])
    try:
        fuzzing = asyncio.run(fuzz(args.port, inputs))
        fuzzing["p99_compile_ms"] = round(float(np.percentile(compile_s, 99)) * 1000, 3)
        print(fuzzing, flush=True)
        asyncio.run(interference(args.port, 2, 0))  # warm-up
        alone = asyncio.run(interference(args.port, args.seconds, 0))
        print(alone, flush=True)
        attacked = asyncio.run(interference(args.port, args.seconds, 4))
        print(attacked, flush=True)
        loaded = asyncio.run(interference(args.port, args.seconds, 4, hostile=False))
        print(loaded, flush=True)
    finally:
        server.terminate()
        server.wait()
    slowdown = {
        q: round(attacked[f"plain_{q}_ms"] - alone[f"plain_{q}_ms"], 1) for q in ("p50", "p99")
    }
    beyond_load = {
        q: round(attacked[f"plain_{q}_ms"] - loaded[f"plain_{q}_ms"], 1) for q in ("p50", "p99")
    }
    record = {
        "seed": SEED,
        "git": provenance()["git_revision"],
        "limits": {
            "chars": filters.MAX_CHARS,
            "tokens": filters.MAX_TOKENS,
            "depth": filters.MAX_DEPTH,
            "in_values": filters.MAX_IN_VALUES,
            "number_chars": filters.MAX_NUMBER_CHARS,
        },
        "fuzz": fuzzing,
        "plain_alone": alone,
        "plain_with_hostile": attacked,
        "plain_with_ordinary": loaded,
        "slowdown_ms": slowdown,
        "slowdown_beyond_ordinary_load_ms": beyond_load,
        "goal_ms": GOAL_MS,
        "goals_met": {
            "no_5xx": fuzzing["not_200_or_4xx"] == 0,
            "p99_reject": fuzzing["p99_reject_ms"] <= GOAL_MS,
            "slowdown": max(slowdown.values()) <= GOAL_MS,
        },
    }
    statuses, hostile_statuses = fuzzing["statuses"], attacked["other_statuses"]
    rows = [
        ["fuzzed filters sent", str(fuzzing["inputs"])],
        ["answers by status", ", ".join(f"{s}: {n}" for s, n in sorted(statuses.items()))],
        ["answers not 200/4xx", str(fuzzing["not_200_or_4xx"])],
        ["p99 time to reject over HTTP", f"{fuzzing['p99_reject_ms']} ms (goal ≤ {GOAL_MS:g})"],
        ["p99 time to compile or reject in-process", f"{fuzzing['p99_compile_ms']} ms"],
        ["plain query p50 / p99 alone", f"{alone['plain_p50_ms']} / {alone['plain_p99_ms']} ms"],
        [
            "plain query p50 / p99 with 4 hostile clients",
            f"{attacked['plain_p50_ms']} / {attacked['plain_p99_ms']} ms",
        ],
        ["hostile requests meanwhile", f"{attacked['other_requests']} {hostile_statuses}"],
        [
            "plain query p50 / p99 with 4 ordinary clients (small filters)",
            f"{loaded['plain_p50_ms']} / {loaded['plain_p99_ms']} ms",
        ],
        [
            "slowdown p50 / p99 vs. alone",
            f"{slowdown['p50']} / {slowdown['p99']} ms (goal ≤ {GOAL_MS:g})",
        ],
        ["slowdown p50 / p99 vs. ordinary load", f"{beyond_load['p50']} / {beyond_load['p99']} ms"],
    ]  # fmt: skip
    text = (
        "# Hostile filters\n\n"
        f"`rshash serve` subprocess on loopback, UCM index; seed {SEED}, {args.seconds:g} s per"
        " latency phase.\n\n" + markdown_table(["measure", "value"], rows)
    )
    write_results("hostile", record, text)


if __name__ == "__main__":
    main()
