"""Scene tiles encoded by Ray Data on a multi-node test cluster (`ray.cluster_utils.Cluster`, on
127.0.0.1; the head has no CPUs, so the encoders run on the two worker nodes): workers read their
tiles' windows from the scene file themselves, and the sharded index equals a local build of the
same tiles."""

import numpy as np
import pytest

from rshash.data.scenes import SceneTiles
from rshash.index import Index
from rshash.index.build import BuildConfig, build_index
from rshash.index.sharded import ShardedIndex, ray_build_shards
from tests.test_service_cluster import cluster as two_worker_nodes

ray = pytest.importorskip("ray")
cluster = two_worker_nodes  # the cluster tests' fixture, under the name this test asks for


@pytest.mark.slow
def test_ray_shards_of_scene_tiles_equal_a_local_build(
    cluster, ucm_run, scene_files, tmp_path, monkeypatch
):
    """Guards against Ray Data taking only image files (scene tiles refused or loaded whole by
    the driver), tiles read from the wrong window or bands on a worker, and shards whose codes or
    records differ from a local build of the same tiles."""
    tiles = SceneTiles(scene_files["munich"])  # 16 tiles of 256 px
    local = build_index(
        ucm_run, tiles, tmp_path / "local", BuildConfig(device="cpu"), progress=False
    )

    def driver_must_not_load(self, i):
        raise AssertionError("the driver loaded tile pixels")

    monkeypatch.setattr(SceneTiles, "load_image", driver_must_not_load)
    paths = ray_build_shards(
        ucm_run, tiles, tmp_path / "shards", shards=2, workers=2, device="cpu", progress=False
    )
    shards = [Index.open(p, device="cpu") for p in paths]
    codes = np.concatenate([s.collections["images"].codes for s in shards])
    assert np.array_equal(codes, local.collections["images"].codes)
    assert [it for s in shards for it in s.items("images")] == local.items("images")

    # cold shard actors load their files and compile kernels first; on a loaded 2-core machine
    # that took over the default 30 s (this test is about equal answers, not timeouts)
    sharded = ShardedIndex(tmp_path / "shards", timeout=300)
    for query in ("a parking lot", "dense residential area"):
        want = [(h.id, h.distance) for h in local.search_text(query, k=5)]
        assert [(h.id, h.distance) for h in sharded.search_text(query, k=5)] == want
