"""Load test of the search service on loopback: closed- and open-loop clients, text and image.

Index: UCM (from the cached test features) + RSSCN7, encoded with the cached 64-bit DUCH test run
(`.cache/tests/ucm-duch64`). The server (`rshash serve`, default knobs, query cache off) runs in
its own process. Text queries are drawn from a large pool: every UCM caption plus composed
phrases; image queries are RSSCN7 files; the order of requests is seeded.

Clients: closed loops run `wrk` (a compiled load generator, one thread, keep-alive), whose CPU is
read from the kernel (`os.wait4`); open loops send at fixed intervals from this process over raw
asyncio streams (a compiled generator would not keep a schedule), and its own CPU is measured.
Each scenario reports the client's CPU (`client_cpu`, share of one core).

Scenarios: closed loop, 50 text clients; open loop at 100, 200, 400 req/s and 2x the measured
capacity; closed loop, 16 image clients; the two closed loops again on a `--backend torch`
server (the peer: today's encoders); and 50 text clients sending Zipf-distributed queries
(s = 1) to a server with its default query cache, warmed by the same load first, with the
cache's hit ratio. Limits measured
in the same run: each backend's text and image encoders on the same pool, batch 64.
Usage: python -m benchmarks.service_load [--seconds 20]   (needs `wrk`: apt-get install wrk)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
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
from rshash.index.encoder import MAX_QUERY_PIXELS, CodeEncoder
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


def encoder_limits(enc: CodeEncoder, texts: list[str], images: list[tuple[str, bytes]]) -> dict:
    """Queries per second of one backend's text and image encoders on the load's pools (batch
    64), in-process, with 1 and with 2 threads (on a shared CPU either may be faster): the best
    of 3 timings of 8 text batches or 2 image batches each, then the best thread count. Text is
    also timed on the same queries bucketed by length (`text_bucketed`): what padding a batch to
    its longest query costs (none for the ONNX backends, which run each query unpadded)."""
    rng = random.Random(SEED + 1)
    default_threads = torch.get_num_threads()
    views = [image_view(data, name, enc, MAX_QUERY_PIXELS) for name, data in images[:128]]
    out: dict[str, Any] = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        enc.encode_texts(texts[:64])
        encode_views(enc, views[:8])
        text_rates, bucketed_rates, image_rates = [], [], []
        for _ in range(3):
            sample = rng.sample(texts, 64 * 8)
            for order, rates in ((sample, text_rates), (sorted(sample, key=len), bucketed_rates)):
                start = time.perf_counter()
                for i in range(0, len(order), 64):
                    enc.encode_texts(order[i : i + 64])
                rates.append(len(order) / (time.perf_counter() - start))
            start = time.perf_counter()
            for i in range(0, len(views), 64):
                encode_views(enc, views[i : i + 64])
            image_rates.append(len(views) / (time.perf_counter() - start))
        out[f"text_{threads}_threads"] = round(max(text_rates), 1)
        out[f"text_bucketed_{threads}_threads"] = round(max(bucketed_rates), 1)
        out[f"image_{threads}_threads"] = round(max(image_rates), 1)
    torch.set_num_threads(default_threads)
    for kind in ("text", "text_bucketed", "image"):
        out[kind] = max(out[f"{kind}_1_threads"], out[f"{kind}_2_threads"])
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


# --- wrk: the compiled closed-loop client ----------------------------------------------------

WRK_SCRIPT = Path(__file__).with_name("wrk_pool.lua")


@dataclass
class Outcome:
    """One scenario as the client saw it."""

    served: int
    p50_ms: float
    p99_ms: float
    seconds: float
    connections: int
    client: str
    client_cpu: float  # CPU seconds of the client per second of the scenario (1.0 = one core)
    shed: int = 0
    shed_seconds: list[float] = field(default_factory=list)  # each 503's time (python client)
    errors: Counter[str] = field(default_factory=Counter)


def wrk_closed_loop(
    port: int, requests: list[Request], order: list[int], clients: int, seconds: float, work: Path
) -> Outcome:
    """`clients` keep-alive connections from one wrk thread, replaying `order` over `requests`."""
    work.mkdir(parents=True, exist_ok=True)
    path, _, ctype = requests[0]
    bodies, offsets, at = work / "bodies", [], 0
    with bodies.open("wb") as f:
        for _, body, _ in requests:
            f.write(body)
            offsets.append(f"{at} {len(body)}")
            at += len(body)
    (work / "offsets").write_text("\n".join(offsets) + "\n")
    (work / "order").write_text("\n".join(map(str, order)) + "\n")
    cmd = [
        "wrk", "-t1", f"-c{clients}", f"-d{seconds:g}s", "--timeout", "30s", "-s", str(WRK_SCRIPT),
        f"http://{HOST}:{port}{path}", "--", path, ctype,
        str(bodies), str(work / "offsets"), str(work / "order"),
    ]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    text = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    elapsed = time.perf_counter() - start
    line = next((ln for ln in text.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {text[-2000:]}")
    got = json.loads(line[len("RESULT ") :])
    errors = Counter(
        {k: got[k] for k in ("other_status", "connect", "read", "write", "timeout") if got[k]}
    )
    return Outcome(
        served=got["ok"],
        p50_ms=got["p50_us"] / 1000,
        p99_ms=got["p99_us"] / 1000,
        seconds=got["duration_us"] / 1e6,
        connections=clients,
        client="wrk",
        client_cpu=(usage.ru_utime + usage.ru_stime) / elapsed,
        shed=got["shed"],
        errors=errors,
    )


def python_open_loop(port: int, requests: list[Request], rate: float, seconds: float) -> Outcome:
    cpu, start = time.process_time(), time.perf_counter()
    tally = asyncio.run(open_loop(port, requests, rate, seconds))
    elapsed = time.perf_counter() - start
    ms = np.array(tally.served) * 1000 if tally.served else np.array([np.nan])
    return Outcome(
        served=len(tally.served),
        p50_ms=float(np.percentile(ms, 50)),
        p99_ms=float(np.percentile(ms, 99)),
        seconds=elapsed,
        connections=tally.connections,
        client="python asyncio",
        client_cpu=(time.process_time() - cpu) / elapsed,
        shed=len(tally.shed),
        shed_seconds=tally.shed,
        errors=Counter(tally.errors),
    )


def zipf_order(n_items: int, length: int, rng: np.random.Generator, s: float = 1.0) -> list[int]:
    """`length` draws over `n_items` with P(rank i) ∝ 1 / i^s, ranks shuffled over the items."""
    p = 1.0 / np.arange(1, n_items + 1) ** s
    ranked = rng.permutation(n_items)
    return [int(i) for i in ranked[rng.choice(n_items, size=length, p=p / p.sum())]]


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
    """Whether the server answers a text and an image query (which also loads both encoders,
    so no scenario pays for a first use)."""
    conn = Connection(port)
    try:
        status, _ = await conn.post(*text_request("warm up"))
        if status != 200:
            return False
        name, data = image_pool(random.Random(SEED), 1)[0]
        status, _ = await conn.post(*image_request(name, data))
        return status == 200
    finally:
        conn.close()


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system, all threads) a live process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def entry(
    scenario: str, kind: str, backend: str, got: Outcome, limit: float, offered: float | None
) -> dict[str, Any]:
    rps = got.served / got.seconds
    return {
        "scenario": scenario,
        "kind": kind,
        "backend": backend,
        "clients": got.connections,
        "offered_rps": offered,
        "rps": round(rps, 1),
        "p50_ms": round(got.p50_ms, 1),
        "p99_ms": round(got.p99_ms, 1),
        "errors": sum(got.errors.values()),
        "shed": got.shed,
        "encoder_limit_rps": limit,
        "ratio": round(rps / limit, 3),
        "client": got.client,
        "client_cpu": round(got.client_cpu, 3),
        "cache_hit_ratio": None,
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
    if shutil.which("wrk") is None:
        sys.exit("wrk not found: install it (Debian: apt-get install wrk)")
    rng = random.Random(SEED)
    nprng = np.random.default_rng(SEED)
    index_path = args.index or build_index_once()
    texts, images = text_pool(rng), image_pool(rng)
    index = Index.open(index_path)
    default_backend = index.encoder.backend
    encoders = {default_backend: index.encoder, "torch": CodeEncoder(index.run, "cpu", "torch")}
    limits_before = {b: encoder_limits(e, texts, images) for b, e in encoders.items()}
    print(f"pool: {len(texts)} texts, {len(images)} images; encoder limits {limits_before}")
    text_requests = [text_request(q) for q in texts]
    image_requests = [image_request(n, d) for n, d in images]
    uniform = [int(i) for i in nprng.integers(0, len(texts), 200_000)]
    image_order = [int(i) for i in nprng.integers(0, len(images), 20_000)]
    zipf = zipf_order(len(texts), 200_000, nprng)

    results, shed_ms, load, error_kinds = [], {}, {}, {}
    seen: dict[str, dict[str, Any]] = {}
    work = Path(tempfile.mkdtemp(prefix="rshash-load-"))
    extra = args.serve_options.split()
    s = args.seconds

    def run(scenario: str, kind: str, backend: str, client: Any, offered: float | None) -> dict:
        before = os.getloadavg()
        seen_before = server_samples(args.port)
        cpu_before = process_cpu(server.pid)
        got: Outcome = client()
        server_cpu = process_cpu(server.pid) - cpu_before
        e = entry(scenario, kind, backend, got, limits_before[backend][kind], offered)
        e["server_cpu_ms_per_request"] = round(1000 * server_cpu / max(got.served, 1), 2)
        path = "/search/text" if kind == "text" else "/search/image"
        after = server_samples(args.port)
        seen[scenario] = server_view(seen_before, after, path)
        hits = (
            after[("rshash_query_cache_hits_total", ())]
            - seen_before[("rshash_query_cache_hits_total", ())]
        )
        misses = (
            after[("rshash_query_cache_misses_total", ())]
            - seen_before[("rshash_query_cache_misses_total", ())]
        )
        if hits + misses:
            e["cache_hit_ratio"] = round(hits / (hits + misses), 3)
        results.append(e)
        load[scenario] = {"before": before, "after": os.getloadavg()}
        if got.errors:
            error_kinds[scenario] = dict(got.errors)
        if got.shed_seconds:
            shed = np.array(got.shed_seconds) * 1000
            shed_ms[scenario] = {
                "p50": round(float(np.percentile(shed, 50)), 1),
                "p99": round(float(np.percentile(shed, 99)), 1),
                "max": round(float(shed.max()), 1),
            }
        print(e, load[scenario], shed_ms.get(scenario), flush=True)
        time.sleep(2)
        return e

    def serving(options: list[str]) -> subprocess.Popen:
        return start_server(index_path, args.port, [*options, *extra])

    def closed(requests: list[Request], order: list[int], clients: int, name: str) -> Any:
        return lambda: wrk_closed_loop(args.port, requests, order, clients, s, work / name)

    server: subprocess.Popen
    try:
        server = serving(["--query-cache", "0"])
        try:
            first = run(
                "closed_text_50", "text", default_backend,
                closed(text_requests, uniform, 50, "text"), None,
            )  # fmt: skip
            capacity = first["rps"]
            for rate in (100, 200, 400, round(2 * capacity)):
                name = (
                    f"open_text_{rate}" if rate != round(2 * capacity) else "open_text_2x_capacity"
                )
                client = (lambda r: lambda: python_open_loop(args.port, text_requests, r, s))(rate)
                run(name, "text", default_backend, client, float(rate))
            run(
                "closed_image_16", "image", default_backend,
                closed(image_requests, image_order, 16, "image"), None,
            )  # fmt: skip
        finally:
            server.terminate()
            server.wait()
        server = serving(["--query-cache", "0", "--backend", "torch"])
        try:
            run(
                "closed_text_50_torch",
                "text",
                "torch",
                closed(text_requests, uniform, 50, "t"),
                None,
            )
            run(
                "closed_image_16_torch", "image", "torch",
                closed(image_requests, image_order, 16, "i"), None,
            )  # fmt: skip
        finally:
            server.terminate()
            server.wait()
        server = serving([])
        try:
            closed(text_requests, zipf, 50, "zipf-warm")()  # a service's cache is warm
            run(
                "closed_text_50_zipf_cache", "text", default_backend,
                closed(text_requests, zipf, 50, "zipf"), None,
            )  # fmt: skip
        finally:
            server.terminate()
            server.wait()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    limits_after = {b: encoder_limits(e, texts, images) for b, e in encoders.items()}
    print(f"encoder limits after the scenarios: {limits_after}")
    # The CPU is shared: the limit is the mean of its measurements before and after the load.
    limits = {
        b: {
            k: round((limits_before[b][k] + limits_after[b][k]) / 2, 1)
            for k in ("text", "text_bucketed", "image")
        }
        for b in encoders
    }
    for e in results:
        e["encoder_limit_rps"] = limits[e["backend"]][e["kind"]]
        e["ratio"] = round(e["rps"] / e["encoder_limit_rps"], 3)
    by_name = {e["scenario"]: e for e in results}
    speedup = {
        kind: round(by_name[f"closed_{kind}"]["rps"] / by_name[f"closed_{kind}_torch"]["rps"], 2)
        for kind in ("text_50", "image_16")
    }

    record = {
        "scenarios": results,
        "speedup_over_torch": speedup,
        "shed_answer_ms": shed_ms,
        "error_kinds": error_kinds,
        "loadavg": load,
        "server_side": seen,
        "encoder_limits": {"before": limits_before, "after": limits_after, "mean": limits},
        "pool": {"texts": len(texts), "images": len(images)},
        "index": {"images": len(index), "path": str(index_path)},
        "default_backend": default_backend,
        "seconds_per_scenario": args.seconds,
        "serve_options": args.serve_options,
    }
    keys = ["scenario", "kind", "backend", "clients", "offered_rps", "rps", "p50_ms", "p99_ms"]
    keys += ["errors", "shed", "encoder_limit_rps", "ratio", "client", "client_cpu"]
    keys += ["cache_hit_ratio", "server_cpu_ms_per_request"]
    rows = [[str(e[k]) if e[k] is not None else "-" for k in keys] for e in results]
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
    limit_lines = "".join(
        f"- {b}: text {v['text']} q/s (bucketed by length: {v['text_bucketed']}), image "
        f"{v['image']} img/s\n"
        for b, v in limits.items()
    )
    intro = (
        "# Search service under load (k = 20, loopback, server in its own process)\n\n"
        f"Index: {record['index']['images']} images (UCM + RSSCN7). Pool: {len(texts)} text "
        f"queries (UCM captions + composed phrases), {len(images)} RSSCN7 images. "
        f"{args.seconds:g} s per scenario. Default backend: {default_backend}; query cache off "
        "except in the zipf scenario. Closed loops: wrk (one thread); open loops: a Python "
        "asyncio client on a fixed schedule (latency from the scheduled send time). client_cpu: "
        "the client's CPU seconds per second (1.0 = one of the 2 cores); "
        "server_cpu_ms_per_request: the server process's CPU (all threads) per answered "
        "request. rps counts 200 answers. "
        f"Speedup over the torch server, same run: text {speedup['text_50']}x, image "
        f"{speedup['image_16']}x. Server: `rshash serve` with "
        f"{args.serve_options or 'its default knobs'}.\n\n"
        "Encoder limits (same run, in-process, batch 64, best of 1 and 2 threads, mean of before "
        "and after the load):\n\n" + limit_lines + "\n"
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
