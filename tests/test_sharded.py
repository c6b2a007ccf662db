"""Ray: bulk encoding with Ray Data, and sharded search equal to one index over the union."""

import numpy as np
import pytest

from rshash.data import load_dataset
from rshash.index import Index
from rshash.index.encoder import CodeEncoder
from rshash.index.sharded import ShardedIndex, ray_build_shards, ray_encode_images
from rshash.training import HashRun
from tests.conftest import make_caption_dataset

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("bits", [48, 64])
def test_ray_data_encoding_matches_local_encoding(local_ray, ucm_run, short_run, bits, tmp_path):
    """At 48 bits guards against a code buffer of bits // 8 bytes beside whole-word codes."""
    run = ucm_run if bits == 64 else short_run(bits)
    ds = load_dataset(make_caption_dataset(tmp_path / "mini", per_class=2, classes=(0, 8, 16)))
    codes = ray_encode_images(run, ds, batch=3, workers=2, device="cpu", progress=False)
    local = CodeEncoder(HashRun.open(run), "cpu").encode_image_files(ds.image_paths)
    differing_bits = np.unpackbits(codes ^ local, axis=1).sum(1)
    assert (differing_bits <= 1).all(), differing_bits  # float round-off may flip a marginal bit


@pytest.mark.slow
def test_sharded_search_equals_single_index(local_ray, ucm_index, ucm_run, ucm_path, tmp_path):
    single = Index.open(ucm_index)
    images, captions = single.collections["images"], single.collections["captions"]
    ray_build_shards(
        ucm_run,
        load_dataset(ucm_path, check_images=False),
        tmp_path / "shards",
        shards=3,
        image_codes=images.codes,
        caption_codes=captions.codes,
    )
    sharded = ShardedIndex(tmp_path / "shards")
    queries = np.concatenate([images.codes[::97], captions.codes[::499]])
    for collection in ("images", "captions"):
        for kwargs in ({"k": 20}, {"k": 3000}, {"radius": 6}):
            want = single.search_codes(queries, collection=collection, **kwargs)
            got = sharded.search_codes(queries, collection=collection, **kwargs)
            for w, g in zip(want, got, strict=True):
                assert [(h.key, h.distance, h.id) for h in g] == [
                    (h.key, h.distance, h.id) for h in w
                ]
    assert [h.id for h in sharded.search_text("a river", k=10)] == [
        h.id for h in single.search_text("a river", k=10)
    ]
