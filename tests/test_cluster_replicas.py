"""Replicas: 2 shards × 2 replicas on a 3-node Ray test cluster (`ray.cluster_utils.Cluster`,
raylets on 127.0.0.1), served over HTTP while another process adds items and a node is removed:
no query fails, and the service moves to the new cluster generation without a restart."""

import shutil
import subprocess
import sys
import threading

import httpx
import numpy as np
import pytest

from rshash.index import Index
from rshash.service import ServiceConfig
from tests.conftest import shards_of_index
from tests.ray_cluster import loopback_cluster, wait_for
from tests.service_server import running_service

TIMEOUT = 20.0  # the service's shard timeout: a replica slower than a third of it is doubled


@pytest.fixture
def three_nodes(monkeypatch):
    """A head node without CPUs (the driver) and three 1-CPU worker nodes, all on loopback."""
    with loopback_cluster(monkeypatch, 3, hang_s=None) as got:
        yield got


@pytest.mark.slow
def test_replicas_answer_through_a_node_loss_and_a_live_add(
    three_nodes, ucm_index, ucm_run, ucm_path, tmp_path
):
    """Guards against a lost node failing queries when its shards have replicas elsewhere,
    replicas placed on one node, a replica that cannot be rebuilt (its files gone from the
    object store) or answers from an old generation, and a service that needs a restart to see
    an add: every streamed query must answer 200 with the local index's answer before or after
    the add, while a node goes and another process adds; the lost replica comes back."""
    c, workers = three_nodes
    single = Index.open(ucm_index)
    shards = shards_of_index(ucm_index, ucm_run, ucm_path, tmp_path / "shards")
    local = tmp_path / "local"  # the same add, made to a local copy: the answers after it
    shutil.copytree(ucm_index, local)
    after = Index.open(local)
    codes = np.random.default_rng(0).integers(0, 256, (5, 8), np.uint8)
    after.add("images", codes, [{"id": f"img-{i}"} for i in range(5)])
    after.commit()
    query = {"query": "a river", "k": 10}
    wants = [
        [(h.id, h.distance) for h in index.search_text("a river", k=10)]
        for index in (single, after)
    ]
    cfg = ServiceConfig(
        shard_timeout_s=TIMEOUT,
        ray_address=c.address,
        shard_cpus=0.5,
        replicas=2,
        refresh_interval_s=0.5,
    )
    with running_service(shards, cfg) as url, httpx.Client(base_url=url, timeout=120) as http:
        health = http.get("/healthz").json()
        assert health["status"] == "ok" and health["replicas"] == 2
        for name, nodes in health["replica_nodes"].items():
            assert len(set(nodes)) == 2, f"{name}: replicas share a node"
        answers: list[tuple[int, object]] = []
        stop = threading.Event()

        def stream():
            with httpx.Client(base_url=url, timeout=120) as client:
                while not stop.is_set():
                    r = client.post("/search/text", json=query)
                    body = r.json()
                    hits = [(h["id"], h["distance"]) for h in body.get("results", [])]
                    answers.append((r.status_code, hits if r.status_code == 200 else body))

        streamer = threading.Thread(target=stream)
        streamer.start()
        try:
            wait_for(lambda: len(answers) >= 3, 120, "queries before the node loss")
            victim = next(
                w for w in workers if w.node_id == health["replica_nodes"]["shard-000"][0]
            )
            c.remove_node(victim)
            writer = subprocess.run(
                [sys.executable, "-m", "tests.cluster_writer", str(shards), "0", "5", "-"],
                capture_output=True,
                text=True,
            )
            assert writer.returncode == 0, writer.stderr
            wait_for(
                lambda: http.get("/healthz").json()["images"] == 2105, 120, "the new generation"
            )
            n = len(answers)
            wait_for(lambda: len(answers) >= n + 3, 120, "queries after the add")
        finally:
            stop.set()
            streamer.join(timeout=180)
        assert not streamer.is_alive(), "a query never returned"
        failed = [a for a in answers if a[0] != 200]
        assert not failed, failed[:3]
        assert all(hits in wants for _, hits in answers)
        assert answers[-1][1] == wants[1]
        assert http.get("/healthz").json()["generation"] == 1

        def rebuilt() -> bool:
            nodes = http.get("/healthz").json()["replica_nodes"]
            return all(len(set(n)) == 2 and victim.node_id not in n for n in nodes.values())

        wait_for(rebuilt, 240, "the lost replica rebuilt on the remaining nodes")
        for _ in range(6):  # round-robin: the rebuilt replica answers from the new generation
            r = http.post("/search/text", json=query)
            assert (
                r.status_code == 200
                and [(h["id"], h["distance"]) for h in r.json()["results"]] == wants[1]
            )
