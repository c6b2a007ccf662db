"""The cluster tier as a cluster: a sharded index served over a multi-node Ray test cluster
(`ray.cluster_utils.Cluster`: several raylets on this machine, on 127.0.0.1), through the same
HTTP API, while the node holding a shard is removed and a replacement node joins."""

import threading
import time

import httpx
import pytest

from rshash.data import load_dataset
from rshash.index import Index
from rshash.index.sharded import ray_build_shards
from rshash.service import ServiceConfig
from tests.ray_cluster import LOCAL, loopback_cluster, wait_for
from tests.service_server import running_service

TIMEOUT = 5.0  # the service's shard timeout in this test


@pytest.fixture
def cluster(monkeypatch):
    """A head node without CPUs (the driver) and two 1-CPU worker nodes, all on loopback."""
    with loopback_cluster(monkeypatch, 2) as got:
        yield got


@pytest.mark.slow
def test_sharded_service_survives_node_loss(cluster, ucm_index, ucm_run, ucm_path, tmp_path):
    """Guards against shards that need the driver's disk, a dead shard actor that never comes
    back, and queries that hang (or fail vaguely) while a node is gone: each query must answer
    200 or, within the shard timeout, 503 naming the missing shard; /healthz must report it."""
    c, workers = cluster
    single = Index.open(ucm_index)
    images, captions = single.collections["images"], single.collections["captions"]
    shards = tmp_path / "shards"
    ray_build_shards(
        ucm_run,
        load_dataset(ucm_path, check_images=False),
        shards,
        shards=2,
        image_codes=images.codes,
        caption_codes=captions.codes,
    )
    cfg = ServiceConfig(shard_timeout_s=TIMEOUT, ray_address=c.address, shard_cpus=1)
    with running_service(shards, cfg) as url, httpx.Client(base_url=url, timeout=60) as http:
        health = http.get("/healthz").json()
        assert health["status"] == "ok" and health["shards"] == 2
        assert (health["images"], health["captions"]) == (2100, 10500)
        want = [(h.id, h.distance) for h in single.search_text("a river", k=10)]
        river = {"query": "a river", "k": 10}
        # Cold shards (kernels compiling on one loaded CPU) may answer 503 at first, within the
        # timeout and naming the shards; they must come to answer.
        deadline = time.time() + 180
        while (first := http.post("/search/text", json=river)).status_code != 200:
            assert first.status_code == 503 and "shard-00" in first.text, first.text
            assert time.time() < deadline, f"shards never answered: {first.text}"
            time.sleep(1)
        assert [
            (h["id"], h["distance"])
            for h in http.post("/search/text", json=river).json()["results"]
        ] == want
        assert http.get(f"/items/{want[0][0]}").json()["id"] == want[0][0]

        placed = health["shard_nodes"]
        assert set(placed.values()) == {w.node_id for w in workers}, "shards share a node"
        victim = next(w for w in workers if w.node_id == placed["shard-001"])

        answers: list[tuple[int, float, str]] = []
        stop = threading.Event()

        def stream() -> None:
            with httpx.Client(base_url=url, timeout=60) as client:
                while not stop.is_set():
                    start = time.perf_counter()
                    r = client.post("/search/text", json=river)
                    error = r.json().get("error", "") if r.status_code != 200 else ""
                    answers.append((r.status_code, time.perf_counter() - start, error))

        streamer = threading.Thread(target=stream)
        streamer.start()
        try:
            wait_for(lambda: len(answers) >= 3, 60, "queries before the node loss")
            c.remove_node(victim)
            degraded: list[str] = []

            def reports_degraded() -> bool:
                body = http.get("/healthz").json()
                degraded[:] = body.get("degraded_shards", [])
                return body["status"] == "degraded"

            wait_for(reports_degraded, 60, "/healthz to report the lost shard")
            assert degraded == ["shard-001"]
            wait_for(lambda: any(s == 503 for s, _, _ in answers), 60, "a 503 for the lost shard")
            c.add_node(**LOCAL, num_cpus=1)
            wait_for(lambda: http.get("/healthz").json()["status"] == "ok", 120, "recovery")
            n = len(answers)
            wait_for(lambda: len(answers) >= n + 3, 60, "queries after recovery")
        finally:
            stop.set()
            streamer.join(timeout=120)
        assert not streamer.is_alive(), "a query never returned"
        lost = "shard-001"
        assert {s for s, _, _ in answers} <= {200, 503}
        for status, seconds, error in answers:
            assert seconds < 2 * TIMEOUT + 5, f"a query took {seconds:.1f} s"
            if status == 503:
                assert f"shard {lost}" in error, error
        assert answers[-1][0] == 200
        after = http.post("/search/text", json=river).json()["results"]
        assert [(h["id"], h["distance"]) for h in after] == want
