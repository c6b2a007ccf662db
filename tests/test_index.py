"""Index directories on real data: build, search, add / remove / reopen, crash safety, errors."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from rshash.data import load_dataset
from rshash.errors import RshashError
from rshash.index import Index
from rshash.index import build as build_module
from rshash.index import index as index_module
from rshash.index.build import BuildConfig, add_to_index, build_index
from tests.conftest import RSSCN7, make_caption_dataset, rshash_cli


def _tree_digest(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f.relative_to(path).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()


@pytest.mark.slow
def test_rsscn7_text_queries_find_the_matching_class(rsscn7_index):
    index = Index.open(rsscn7_index)
    assert len(index) == 2800
    wanted = {
        "a river": "dRiverLake",
        "dense residential houses": "fResident",
        "a parking lot": "gParking",
    }
    precision = {}
    for query, cls in wanted.items():
        hits = index.search_text(query, k=20)
        assert len(hits) == 20 and [h.distance for h in hits] == sorted(h.distance for h in hits)
        precision[query] = sum(h.item["class"] == cls for h in hits) / 20
    message = ", ".join(f"{q!r} P@20 {p:.2f}" for q, p in precision.items())
    print(message)
    assert all(p > 0.5 for p in precision.values()), message


def test_ucm_index_holds_images_and_captions(ucm_index):
    index = Index.open(ucm_index)
    assert len(index.collections["images"]) == 2100
    assert len(index.collections["captions"]) == 10500
    hits = index.search_image(RSSCN7 / "dRiverLake" / "d001.jpg", k=5, collection="captions")
    assert len(hits) == 5 and all("text" in h.item for h in hits)
    within = index.search_text("a river", collection="images", radius=8)
    assert all(h.distance <= 8 for h in within)
    assert [h.key for h in within[:20]] == [h.key for h in index.search_text("a river", k=20)][
        : min(20, len(within))
    ]


def test_add_remove_reopen_round_trip(ucm_run, tmp_path):
    first = load_dataset(make_caption_dataset(tmp_path / "a", per_class=3, classes=(0, 8)))
    second = load_dataset(make_caption_dataset(tmp_path / "b", per_class=2, classes=(16,)))
    out = tmp_path / "index"
    build_index(ucm_run, first, out, progress=False)
    _, added = add_to_index(out, second, progress=False)
    assert added == 2
    index = Index.open(out)
    assert [it["id"] for it in index.collections["images"].items] == [
        *first.image_ids,
        *second.image_ids,
    ]
    query = second.image_paths[0]
    top = index.search_image(query, k=1)[0]
    assert top.id == second.image_ids[0] and top.distance == 0

    gone = second.image_ids[0]
    assert index.remove([gone]) == 1
    index.commit()
    reopened = Index.open(out)
    assert gone not in {it["id"] for it in reopened.collections["images"].items}
    assert not any(c["image"] == gone for c in reopened.collections["captions"].items)
    assert reopened.search_image(query, k=1)[0].id != gone
    assert len(reopened) == 7
    files = sorted(p.name for p in out.iterdir() if p.is_file())
    assert all(".3." in f for f in files if f != "index.json"), files  # old generations gone


def test_failed_commit_leaves_the_previous_index(ucm_run, tmp_path, monkeypatch):
    ds = load_dataset(make_caption_dataset(tmp_path / "a", per_class=2, classes=(0,)))
    more = load_dataset(make_caption_dataset(tmp_path / "b", per_class=2, classes=(8,)))
    out = tmp_path / "index"
    build_index(ucm_run, ds, out, progress=False)
    before = _tree_digest(out)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(index_module, "write_json_atomic", crash)
    with pytest.raises(OSError):
        add_to_index(out, more, progress=False)
    monkeypatch.undo()
    for stray in out.glob("*.2.*"):  # new-generation files the next commit overwrites
        stray.unlink()
    assert _tree_digest(out) == before
    assert len(Index.open(out)) == 2


def test_interrupted_build_resumes_from_saved_batches(ucm_run, tmp_path, monkeypatch):
    ds = load_dataset(make_caption_dataset(tmp_path / "a", per_class=3, classes=(0, 8)))
    out = tmp_path / "index"
    cfg = BuildConfig(image_batch=2)
    real = build_module.CodeEncoder.encode_images
    calls = []

    def counted(fail_at):
        def encode(self, images):
            calls.append(len(images))
            if len(calls) == fail_at:
                raise KeyboardInterrupt
            return real(self, images)

        return encode

    monkeypatch.setattr(build_module.CodeEncoder, "encode_images", counted(fail_at=3))
    with pytest.raises(KeyboardInterrupt):
        build_index(ucm_run, ds, out, cfg, progress=False)
    assert not (out / "index.json").exists()
    assert len(list((tmp_path / "index.partial").glob("images-*.npy"))) == 2
    calls.clear()
    monkeypatch.setattr(build_module.CodeEncoder, "encode_images", counted(fail_at=0))
    index = build_index(ucm_run, ds, out, cfg, progress=False)
    assert calls == [2]  # only the one unfinished batch of two images was encoded again
    assert not (tmp_path / "index.partial").exists()
    fresh = build_index(ucm_run, ds, tmp_path / "fresh", cfg, progress=False)
    assert np.array_equal(index.collections["images"].codes, fresh.collections["images"].codes)


def test_index_refuses_another_model(ucm_index, ucm_run, tmp_path):
    other = tmp_path / "other-run"
    other.mkdir()
    for name in ("config.json", "split.json"):
        (other / name).write_text((ucm_run / name).read_text())
    (other / "model.pt").write_bytes((ucm_run / "model.pt").read_bytes() + b"\0")
    with pytest.raises(RshashError, match="built with the model of"):
        Index.open(ucm_index, expect_model=other)


def test_cli_search_and_bad_input(ucm_index, tmp_path):
    before = _tree_digest(ucm_index)
    ok = rshash_cli("search", ucm_index, "a river crossing farmland", "-k", "5", "--json")
    assert ok.returncode == 0, ok.stderr
    hits = json.loads(ok.stdout)
    assert len(hits) == 5 and {"id", "distance", "path", "captions", "class"} <= set(hits[0])

    bad_image = tmp_path / "broken.jpg"
    bad_image.write_bytes(b"\xff\xd8 not really a jpeg")
    cases = {
        ("search", ucm_index, "x", "-k", "0"): "-k",
        ("search", ucm_index, "   "): "empty text query",
        ("search", ucm_index, "--image", bad_image): "cannot decode image",
        ("search", ucm_index, "--image", tmp_path / "none.png"): "not found",
        ("search", tmp_path, "a river"): "not an rshash index",
        ("index", "remove", ucm_index, "no-such-id.tif"): "no image with id",
    }
    for args, fragment in cases.items():
        r = rshash_cli(*args)
        assert r.returncode == 2, (args, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert lines[-1].startswith("error:") and fragment in lines[-1], (args, r.stderr)
    assert _tree_digest(ucm_index) == before
