import numpy as np

from rshash.data import Split, load_dataset, make_split
from rshash.data.inspect import describe
from tests.conftest import RSSCN7, UCM


def test_ucm_captions_loads_completely():
    ds = load_dataset(UCM)
    assert len(ds) == 2100
    texts, owner = ds.caption_rows()
    assert len(texts) == 10500
    assert (ds.caption_counts == 5).all()
    assert ds.class_names is not None and len(ds.class_names) == 21
    assert np.bincount(ds.labels).tolist() == [100] * 21
    assert ds.image_ids[0] == "1.jpg" and ds.class_names[ds.labels[0]] == "agricultural"
    assert owner[5] == 1


def test_rsscn7_class_folders():
    ds = load_dataset(RSSCN7)
    assert len(ds) == 2800
    assert ds.class_names == (
        "aGrass",
        "bField",
        "cIndustry",
        "dRiverLake",
        "eForest",
        "fResident",
        "gParking",
    )
    assert np.bincount(ds.labels).tolist() == [400] * 7
    assert not ds.has_captions


def test_tiff_sample_reads():
    from rshash.data.images import load_rgb

    ds = load_dataset(UCM / "tif-sample")
    assert len(ds) == 21
    assert all(p.suffix == ".tif" for p in ds.image_paths)
    img = load_rgb(ds.image_paths[0])
    assert img.mode == "RGB" and min(img.size) > 200


def test_ucm_split_sizes_and_determinism():
    ds = load_dataset(UCM, check_images=False)
    a, b = make_split(ds, seed=7), make_split(ds, seed=7)
    assert a.sizes() == {"train": 1050, "query": 210, "retrieval": 840, "validation": 105}
    for field in ("train", "query", "retrieval", "caption_choice"):
        assert np.array_equal(getattr(a, field), getattr(b, field))
    union = np.concatenate([a.train, a.query, a.retrieval])
    assert len(np.unique(union)) == 2100
    assert not np.array_equal(a.train, make_split(ds, seed=8).train)


def test_rsicd_sized_split():
    ids = tuple(str(i) for i in range(10921))
    s = make_split(image_ids=ids, caption_counts=np.full(10921, 5), seed=0)
    assert s.sizes() == {
        "train": 5460,
        "query": 1092,
        "retrieval": 4369,
        "validation": 546,
    }


def test_split_roundtrip_and_caption_modes(tmp_path):
    ds = load_dataset(UCM, check_images=False)
    s = make_split(ds, seed=3)
    s.save(tmp_path / "split.json")
    r = Split.load(tmp_path / "split.json")
    assert np.array_equal(r.query, s.query) and np.array_equal(r.caption_choice, s.caption_choice)
    offsets = np.concatenate([[0], np.cumsum(ds.caption_counts)])
    one = s.caption_rows(s.query, offsets)
    assert len(one) == 210 and ((one - offsets[s.query]) < 5).all()
    every = make_split(ds, seed=3, caption_mode="all")
    rows = every.caption_rows(every.query, offsets)
    assert len(rows) == 1050
    assert np.array_equal(every.caption_owners(every.query, offsets), np.repeat(every.query, 5))


def test_describe_counts():
    info = describe(load_dataset(UCM, check_images=False))
    assert info["images"] == 2100 and info["captions"] == 10500
    assert info["distinct_captions"] == 2032
    assert info["captions_per_image"]["mean"] == 5.0
    assert len(info["classes"]) == 21
