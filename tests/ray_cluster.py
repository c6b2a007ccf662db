"""A multi-node Ray test cluster on loopback, and waiting on it, for the cluster tests."""

import faulthandler
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

LOCAL = {"node_ip_address": "127.0.0.1", "object_store_memory": 80 * 1024 * 1024}


@contextmanager
def loopback_cluster(
    monkeypatch: Any, workers: int, hang_s: float | None = 600
) -> Iterator[tuple[Cluster, list[Any]]]:
    """A head node without CPUs (the driver) and `workers` 1-CPU worker nodes, all on loopback,
    with this process connected to it; past `hang_s` seconds the test run is stopped with every
    thread's traceback (a hung cluster must not hang CI)."""
    # Ray turns a loopback address into the machine's outward IP unless told to stay local
    # (the switch it uses on laptops); the nodes below listen on 127.0.0.1 only.
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    monkeypatch.setattr(ray._private.ray_constants, "ENABLE_RAY_CLUSTER", False)
    if hang_s is not None:
        faulthandler.dump_traceback_later(hang_s, exit=True)
    c = Cluster(
        initialize_head=True,
        head_node_args={**LOCAL, "num_cpus": 0, "include_dashboard": False},
    )
    nodes = [c.add_node(**LOCAL, num_cpus=1) for _ in range(workers)]
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False)
    try:
        yield c, nodes
    finally:
        ray.shutdown()
        c.shutdown()
        faulthandler.cancel_dump_traceback_later()


def wait_for(predicate: Callable[[], Any], seconds: float, what: str) -> None:
    deadline = time.time() + seconds
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)
