"""Load test of the search service on loopback: closed- and open-loop clients, text and image.

Index: UCM (from the cached test features) + RSSCN7, encoded with the cached 64-bit DUCH test run
(`.cache/tests/ucm-duch64`). The server (`rshash serve`, default knobs, no result cache) runs in
its own process. Text queries are drawn at random from a large pool: every UCM caption plus
composed phrases; image queries are RSSCN7 files. Clients speak HTTP/1.1 keep-alive over raw
asyncio streams, so the load generator costs little of the shared CPU.

Scenarios: closed loop, 50 text clients; open loop at 100, 200, 400 req/s and 2x the measured
capacity (scenario 1's rate); closed loop, 16 image clients. Limits measured in the same run:
the batched text and image encoders' own rates at batch 64 (`encoder_limit_rps`).
Usage: python -m benchmarks.service_load [--seconds 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import DATA_ROOT, REPO, markdown_table, write_results
from rshash.data import load_dataset
from rshash.index import Index
from rshash.index.build import add_to_index, build_index
from rshash.service.queries import encode_views, image_view

TEST_CACHE = REPO / ".cache" / "tests"
INDEX = REPO / ".cache" / "benchmarks" / "service-index"
SEED = 0
HOST = "127.0.0.1"

ADJECTIVES = ["green", "dense", "sparse", "large", "small", "white", "dark", "curved", "straight"]
THINGS = [
    "trees", "houses", "buildings", "planes", "cars", "roads", "rivers", "fields", "tennis courts",
    "storage tanks", "ships", "beaches", "meadows", "parking lots", "overpasses", "runways",
    "golf courses", "baseball fields", "chaparral", "freeways", "harbors", "farmland",
]  # fmt: skip
RELATIONS = ["next to", "surrounded by", "crossing", "beside", "near", "between", "along"]


def build_index_once() -> Path:
    """UCM from the cached features plus every RSSCN7 image, with the cached test run."""
    run, features = TEST_CACHE / "ucm-duch64", TEST_CACHE / "ucm-features.h5"
    if not (INDEX / "index.json").exists():
        partial = INDEX.with_name("service-index.building")
        if partial.exists():
            import shutil

            shutil.rmtree(partial)
        ucm = load_dataset(DATA_ROOT / "ucm-captions")
        build_index(run, ucm, partial, features=features)
        add_to_index(partial, load_dataset(DATA_ROOT / "rsscn7"))
        partial.rename(INDEX)
    return INDEX


def text_pool(rng: random.Random) -> list[str]:
    """Every UCM caption (deduplicated) and as many composed phrases."""
    data = json.loads((DATA_ROOT / "ucm-captions" / "dataset.json").read_text())
    captions = sorted({s["raw"].strip() for im in data["images"] for s in im["sentences"]})
    composed = {
        f"{rng.choice(ADJECTIVES)} {rng.choice(THINGS)} {rng.choice(RELATIONS)} "
        f"{rng.choice(ADJECTIVES)} {rng.choice(THINGS)}"
        for _ in range(4 * len(captions))
    }
    return captions + sorted(composed)


def image_pool(rng: random.Random, n: int = 400) -> list[tuple[str, bytes]]:
    files = sorted((DATA_ROOT / "rsscn7").rglob("*.jpg"))
    return [(p.name, p.read_bytes()) for p in rng.sample(files, n)]


# --- limits ---------------------------------------------------------------------------------


def encoder_limits(index: Index, texts: list[str], images: list[tuple[str, bytes]]) -> dict:
    """Queries per second of the batched text and image encoders (batch 64), in-process, with
    1 and with 2 torch threads (on a shared CPU either may be faster): the best of 3 timings of
    8 text batches or 2 image batches each, then the best thread count."""
    rng = random.Random(SEED + 1)
    enc = index.encoder
    default_threads = torch.get_num_threads()
    views = [image_view(data, name, enc) for name, data in images[:128]]
    out: dict[str, Any] = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        enc.encode_texts(texts[:64])
        encode_views(enc, views[:8])
        text_rates, image_rates = [], []
        for _ in range(3):
            batches = [rng.sample(texts, 64) for _ in range(8)]
            start = time.perf_counter()
            for b in batches:
                enc.encode_texts(b)
            text_rates.append(64 * len(batches) / (time.perf_counter() - start))
            start = time.perf_counter()
            for i in range(0, len(views), 64):
                encode_views(enc, views[i : i + 64])
            image_rates.append(len(views) / (time.perf_counter() - start))
        out[f"text_{threads}_threads"] = round(max(text_rates), 1)
        out[f"image_{threads}_threads"] = round(max(image_rates), 1)
    torch.set_num_threads(default_threads)
    out["text"] = max(out["text_1_threads"], out["text_2_threads"])
    out["image"] = max(out["image_1_threads"], out["image_2_threads"])
    return out


def server_samples(port: int) -> Counter[tuple[str, tuple[tuple[str, str], ...]]]:
    """Every sample of the server's `GET /metrics`, by (name, sorted labels)."""
    from prometheus_client.parser import text_string_to_metric_families

    async def fetch() -> str:
        reader, writer = await asyncio.open_connection(HOST, port)
        head = f"GET /metrics HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n"
        writer.write(head.encode())
        raw = await reader.read()
        writer.close()
        return raw.split(b"\r\n\r\n", 1)[1].decode()

    out: Counter[tuple[str, tuple[tuple[str, str], ...]]] = Counter()
    for family in text_string_to_metric_families(asyncio.run(fetch())):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def server_view(before: Counter, after: Counter, path: str) -> dict[str, Any]:
    """What the server saw during a scenario: mean batch size, and the 503s' own time (the
    smallest histogram bound under which 99 % of them were answered), so a slow 503 seen by a
    client can be told apart from one the server was slow to write."""
    delta = after.copy()
    delta.subtract(before)
    batches = delta[("rshash_batch_size_count", ())]
    view: dict[str, Any] = {
        "mean_batch": round(delta[("rshash_batch_size_sum", ())] / max(batches, 1), 1)
    }
    labels = (("endpoint", path), ("status", "503"))
    shed = delta[("rshash_request_seconds_count", labels)]
    if shed:
        bounds = sorted(
            (float(dict(lab)["le"]), n)
            for (name, lab), n in delta.items()
            if name == "rshash_request_seconds_bucket"
            and tuple(kv for kv in lab if kv[0] != "le") == labels
        )
        view["server_503_p99_le_ms"] = next(b * 1000 for b, n in bounds if n >= 0.99 * shed)
    return view


# --- a small keep-alive HTTP/1.1 client ------------------------------------------------------


class Connection:
    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.answered = 0

    @property
    def reused(self) -> bool:
        return self.answered > 0

    async def post(self, path: str, body: bytes, content_type: str) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(HOST, self.port)
        assert self.reader is not None
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        self.writer.write(head + body)
        raw = await self.reader.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        length = next(
            int(v)
            for k, _, v in (h.partition(":") for h in lines[1:])
            if k.lower() == "content-length"
        )
        body = await self.reader.readexactly(length)
        self.answered += 1
        return status, body

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


@dataclass
class Tally:
    served: list[float] = field(default_factory=list)
    shed: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    connections: int = 0


def _record(tally: Tally, status: int, seconds: float) -> None:
    if status == 200:
        tally.served.append(seconds)
    elif status == 503:
        tally.shed.append(seconds)
    else:
        tally.errors.append(str(status))


Request = tuple[str, bytes, str]


def text_request(query: str) -> Request:
    return "/search/text", json.dumps({"query": query, "k": 20}).encode(), "application/json"


def image_request(name: str, data: bytes) -> Request:
    boundary = "rshashbenchboundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="k"\r\n\r\n20\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
            f"Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return "/search/image", body, f"multipart/form-data; boundary={boundary}"


async def closed_loop(port: int, requests: list[Request], clients: int, seconds: float) -> Tally:
    tally = Tally(connections=clients)
    rng = random.Random(SEED + clients)
    stop = time.perf_counter() + seconds

    async def client() -> None:
        conn = Connection(port)
        while time.perf_counter() < stop:
            path, body, ctype = rng.choice(requests)
            start = time.perf_counter()
            try:
                status, _ = await conn.post(path, body, ctype)
            except (OSError, asyncio.IncompleteReadError) as exc:
                tally.errors.append(type(exc).__name__)
                conn.close()
                conn = Connection(port)
                continue
            _record(tally, status, time.perf_counter() - start)
        conn.close()

    await asyncio.gather(*(client() for _ in range(clients)))
    return tally


async def open_loop(port: int, requests: list[Request], rate: float, seconds: float) -> Tally:
    """Requests sent at fixed intervals, whatever the answers; latency counts from the
    scheduled send time, so a slow server cannot hide its queue (no coordinated omission)."""
    tally = Tally()
    rng = random.Random(SEED + int(rate))
    idle: list[Connection] = []
    tasks = []

    async def one(scheduled: float, request: Request) -> None:
        conn = idle.pop() if idle else Connection(port)
        if conn.writer is None:
            tally.connections += 1
        try:
            status, _ = await conn.post(*request)
        except (OSError, asyncio.IncompleteReadError) as exc:
            conn.close()
            if conn.reused:  # the server closed an idle keep-alive connection: a fresh one
                conn = Connection(port)
                tally.connections += 1
                try:
                    status, _ = await conn.post(*request)
                except (OSError, asyncio.IncompleteReadError) as again:
                    tally.errors.append(type(again).__name__)
                    conn.close()
                    return
            else:
                tally.errors.append(type(exc).__name__)
                return
        _record(tally, status, time.perf_counter() - scheduled)
        idle.append(conn)

    start = time.perf_counter()
    for i in range(int(rate * seconds)):
        scheduled = start + i / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(scheduled, rng.choice(requests))))
    await asyncio.gather(*tasks)
    for conn in idle:
        conn.close()
    return tally


# --- running --------------------------------------------------------------------------------


def start_server(index: Path, port: int, options: list[str]) -> subprocess.Popen:
    server = subprocess.Popen(
        [sys.executable, "-m", "rshash.cli", "serve", str(index), "--port", str(port), *options]
    )
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            conn = asyncio.run(_probe(port))
            if conn:
                return server
        except OSError:
            time.sleep(0.2)
    server.kill()
    raise RuntimeError("server did not start")


async def _probe(port: int) -> bool:
    conn = Connection(port)
    try:
        status, _ = await conn.post(*text_request("warm up"))
        return status == 200
    finally:
        conn.close()


def entry(
    scenario: str, kind: str, tally: Tally, seconds: float, limit: float, offered: float | None
) -> dict[str, Any]:
    ms = np.array(tally.served) * 1000 if tally.served else np.array([np.nan])
    rps = len(tally.served) / seconds
    return {
        "scenario": scenario,
        "kind": kind,
        "clients": tally.connections,
        "offered_rps": offered,
        "rps": round(rps, 1),
        "p50_ms": round(float(np.percentile(ms, 50)), 1),
        "p99_ms": round(float(np.percentile(ms, 99)), 1),
        "errors": len(tally.errors),
        "shed": len(tally.shed),
        "encoder_limit_rps": limit,
        "ratio": round(rps / limit, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--index", type=Path, help="Serve this index instead (a dry run).")
    parser.add_argument("--name", default="service", help="Results file name (without suffix).")
    parser.add_argument(
        "--serve-options",
        default="",
        help="Extra `rshash serve` options, e.g. '--max-queue-ms 250' (default: its defaults).",
    )
    args = parser.parse_args()
    rng = random.Random(SEED)
    index_path = args.index or build_index_once()
    texts, images = text_pool(rng), image_pool(rng)
    index = Index.open(index_path)
    limits_before = encoder_limits(index, texts, images)
    print(f"pool: {len(texts)} texts, {len(images)} images; encoder limits {limits_before}")
    text_requests = [text_request(q) for q in texts]
    image_requests = [image_request(n, d) for n, d in images]

    server = start_server(index_path, args.port, args.serve_options.split())
    results, shed_ms, load, error_kinds = [], {}, {}, {}
    seen: dict[str, dict[str, Any]] = {}
    try:

        def run(scenario: str, kind: str, coro: Any, offered: float | None) -> dict:
            before = os.getloadavg()
            seen_before = server_samples(args.port)
            start = time.perf_counter()
            tally = asyncio.run(coro)
            seconds = time.perf_counter() - start
            e = entry(scenario, kind, tally, seconds, limits_before[kind], offered)
            path = "/search/text" if kind == "text" else "/search/image"
            seen[scenario] = server_view(seen_before, server_samples(args.port), path)
            results.append(e)
            load[scenario] = {"before": before, "after": os.getloadavg()}
            if tally.errors:
                error_kinds[scenario] = dict(Counter(tally.errors))
            if tally.shed:
                shed = np.array(tally.shed) * 1000
                shed_ms[scenario] = {
                    "p50": round(float(np.percentile(shed, 50)), 1),
                    "p99": round(float(np.percentile(shed, 99)), 1),
                    "max": round(float(shed.max()), 1),
                }
            print(e, load[scenario], shed_ms.get(scenario), flush=True)
            time.sleep(2)
            return e

        s = args.seconds
        first = run("closed_text_50", "text", closed_loop(args.port, text_requests, 50, s), None)
        capacity = first["rps"]
        for rate in (100, 200, 400, round(2 * capacity)):
            name = f"open_text_{rate}" if rate != round(2 * capacity) else "open_text_2x_capacity"
            run(name, "text", open_loop(args.port, text_requests, rate, s), float(rate))
        run("closed_image_16", "image", closed_loop(args.port, image_requests, 16, s), None)
    finally:
        server.terminate()
        server.wait()
    limits_after = encoder_limits(index, texts, images)
    print(f"encoder limits after the scenarios: {limits_after}")
    # The CPU is shared: the limit is the mean of its measurements before and after the load.
    limits = {k: round((limits_before[k] + limits_after[k]) / 2, 1) for k in ("text", "image")}
    for e in results:
        e["encoder_limit_rps"] = limits[e["kind"]]
        e["ratio"] = round(e["rps"] / e["encoder_limit_rps"], 3)

    record = {
        "scenarios": results,
        "shed_answer_ms": shed_ms,
        "error_kinds": error_kinds,
        "loadavg": load,
        "server_side": seen,
        "encoder_limits": {"before": limits_before, "after": limits_after},
        "pool": {"texts": len(texts), "images": len(images)},
        "index": {"images": len(index), "path": str(index_path)},
        "seconds_per_scenario": args.seconds,
        "serve_options": args.serve_options,
    }
    keys = ["scenario", "kind", "clients", "offered_rps", "rps", "p50_ms", "p99_ms", "errors"]
    keys += ["shed", "encoder_limit_rps", "ratio"]
    rows = [[str(e[k]) for k in keys] for e in results]
    shed_lines = "".join(
        f"- {name}: 503 answered in p50 {v['p50']} ms, p99 {v['p99']} ms, max {v['max']} ms\n"
        for name, v in shed_ms.items()
    )
    server_lines = "".join(
        f"- {name}: mean batch {v['mean_batch']} queries"
        + (f"; 503s written within {v['server_503_p99_le_ms']:g} ms (p99)" if len(v) > 1 else "")
        + "\n"
        for name, v in seen.items()
    )
    load_lines = "".join(
        f"- {name}: load average {v['before'][0]:.2f} before, {v['after'][0]:.2f} after\n"
        for name, v in load.items()
    )
    intro = (
        "# Search service under load (k = 20, loopback, server in its own process)\n\n"
        f"Index: {record['index']['images']} images (UCM + RSSCN7). Pool: {len(texts)} text "
        f"queries (UCM captions + composed phrases), {len(images)} RSSCN7 images. "
        f"{args.seconds:g} s per scenario. Limits (same run, in-process, batch 64, best of 1 and "
        f"2 torch threads, mean of before and after the load): text encoder {limits['text']} "
        f"q/s, image encoder {limits['image']} q/s (before {limits_before}, after "
        f"{limits_after}). rps counts 200 answers; p50/p99 are over them (open loop: from the "
        "scheduled send time). Server: `rshash serve` with "
        f"{args.serve_options or 'its default knobs'}.\n\n"
    )
    markdown = (
        intro
        + markdown_table(keys, rows)
        + "\n\nShed requests:\n\n"
        + (shed_lines or "- none\n")
        + "\nErrors by kind (HTTP status or client exception):\n\n"
        + ("".join(f"- {n}: {v}\n" for n, v in error_kinds.items()) or "- none\n")
        + "\nSeen by the server (its `/metrics`: batch sizes, request seconds):\n\n"
        + server_lines
        + "\nCPU load (shared machine, os.getloadavg, 1 min):\n\n"
        + load_lines
    )
    write_results(args.name, record, markdown)


if __name__ == "__main__":
    main()
