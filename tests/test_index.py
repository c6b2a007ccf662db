"""Index directories on real data: build, search, add / remove / reopen, crash safety, errors."""

import hashlib
import json
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rshash.data import load_dataset
from rshash.errors import RshashError
from rshash.index import Index
from rshash.index import build as build_module
from rshash.index import index as index_module
from rshash.index.build import BuildConfig, add_to_index, build_index
from rshash.index.maintenance import check_index
from tests.conftest import RSSCN7, make_caption_dataset, rshash_cli


def _tree_digest(path: Path) -> str:
    """Digest of an index's content: its files but the database, and the database's rows."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        if f.name.startswith("records.db") or f.name == "write.lock":
            continue
        h.update(f.relative_to(path).as_posix().encode())
        h.update(f.read_bytes())
    db = sqlite3.connect(path / "records.db")
    for row in db.execute("SELECT * FROM items ORDER BY rid"):
        h.update(repr(row).encode())
    db.close()
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
    top = index.search_text("a river", k=20)
    radius = top[-1].distance  # so that the radius query must find at least these 20
    within = index.search_text("a river", collection="images", radius=radius)
    assert len(within) >= 20 and all(h.distance <= radius for h in within)
    assert [h.key for h in within[:20]] == [h.key for h in top]


def test_cached_records_equal_stored_ones_and_stay_unchanged_by_callers(ucm_index):
    """Guards against the record cache handing out its own dicts (a caller that edits a hit's
    record, or its captions, would change every later answer) or answering other records than
    SQLite holds."""
    index = Index.open(ucm_index)
    first = index.search_text("a river", k=10, collection="images")
    stored = [h.item for h in Index.open(ucm_index).search_text("a river", k=10)]
    assert [h.item for h in first] == stored
    for h in first:
        h.item["class"] = "edited"
        h.item.setdefault("captions", []).append("edited")
    again = index.search_text("a river", k=10, collection="images")
    assert [h.item for h in again] == stored
    assert len(index.records._cache) >= 10  # served from the cache this time


def test_add_remove_reopen_round_trip(ucm_run, tmp_path):
    first = load_dataset(make_caption_dataset(tmp_path / "a", per_class=3, classes=(0, 8)))
    second = load_dataset(make_caption_dataset(tmp_path / "b", per_class=2, classes=(16,)))
    out = tmp_path / "index"
    build_index(ucm_run, first, out, progress=False)
    _, added = add_to_index(out, second, progress=False)
    assert added == 2
    index = Index.open(out)
    assert [it["id"] for it in index.items()] == [*first.image_ids, *second.image_ids]
    query = second.image_paths[0]
    top = index.search_image(query, k=1)[0]
    assert top.id == second.image_ids[0] and top.distance == 0

    gone = second.image_ids[0]
    assert index.remove([gone]) == 1
    index.commit()
    reopened = Index.open(out)
    assert gone not in {it["id"] for it in reopened.items()}
    assert not any(c["image"] == gone for c in reopened.items("captions"))
    assert reopened.search_image(query, k=1)[0].id != gone
    assert len(reopened) == 7
    assert len(reopened.collections["captions"]) == 35
    segments = sorted(p.name for p in out.glob("seg-*"))
    assert segments == [
        "seg-captions-00000001.bin",
        "seg-captions-00000002.bin",
        "seg-images-00000001.bin",
        "seg-images-00000002.bin",
    ]  # one segment per add; the removal rewrote none


def test_failed_commit_leaves_the_previous_index(ucm_run, tmp_path, monkeypatch):
    """A commit that fails before the manifest must leave readers on the previous index and the
    next writer able to roll its rows back."""
    ds = load_dataset(make_caption_dataset(tmp_path / "a", per_class=2, classes=(0,)))
    more = load_dataset(make_caption_dataset(tmp_path / "b", per_class=2, classes=(8,)))
    out = tmp_path / "index"
    build_index(ucm_run, ds, out, progress=False)
    before = Index.open(out).items()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(index_module, "write_json_atomic", crash)
    with pytest.raises(OSError):
        add_to_index(out, more, progress=False)
    monkeypatch.undo()
    index = Index.open(out)
    assert len(index) == 2 and index.generation == 1 and index.items() == before
    check_index(out)  # the committed rows of generation 2 are invisible, then rolled back
    index.remove([])
    index.commit()
    assert check_index(out)["images"]["pending_rollback"] == 0
    assert len(Index.open(out)) == 2


def test_interrupted_build_resumes_from_saved_batches(ucm_run, tmp_path, monkeypatch):
    ds = load_dataset(make_caption_dataset(tmp_path / "a", per_class=3, classes=(0, 8)))
    out = tmp_path / "index"
    cfg = BuildConfig(image_batch=2)
    real = build_module.CodeEncoder.encode_views
    calls = []

    def counted(fail_at):
        def encode(self, images):
            calls.append(len(images))
            if len(calls) == fail_at:
                raise KeyboardInterrupt
            return real(self, images)

        return encode

    monkeypatch.setattr(build_module.CodeEncoder, "encode_views", counted(fail_at=3))
    with pytest.raises(KeyboardInterrupt):
        build_index(ucm_run, ds, out, cfg, progress=False)
    assert not (out / "index.json").exists()
    assert len(list((tmp_path / "index.partial").glob("*/images-*.npy"))) == 2
    calls.clear()
    monkeypatch.setattr(build_module.CodeEncoder, "encode_views", counted(fail_at=0))
    index = build_index(ucm_run, ds, out, cfg, progress=False)
    assert calls == [2]  # only the one unfinished batch of two images was encoded again
    assert not (tmp_path / "index.partial").exists()
    fresh = build_index(ucm_run, ds, tmp_path / "fresh", cfg, progress=False)
    assert np.array_equal(index.collections["images"].codes, fresh.collections["images"].codes)
    assert index.items() == fresh.items()


def test_index_refuses_another_model(ucm_index, ucm_run, tmp_path):
    other = tmp_path / "other-run"
    other.mkdir()
    for name in ("config.json", "split.json", "model.safetensors"):
        (other / name).write_bytes((ucm_run / name).read_bytes())
    info = json.loads((ucm_run / "model.json").read_text())
    (other / "model.json").write_text(json.dumps({**info, "train_seconds": -1}))
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
        ("search", ucm_index, "x", "--where", "class = "): "where: expected a value",
        ("search", ucm_index, "x", "--where", "class = 'a' drop"): "where: expected end",
        ("search", ucm_index, "x", "--bbox", "1,2,3"): "bbox:",
        ("search", ucm_index, "x", "--radius", 2**63): "radius: expected 0 to 64",
        ("search", ucm_index, "x", "--radius", 65): "radius: expected 0 to 64",
    }
    for args, fragment in cases.items():
        r = rshash_cli(*args)
        assert r.returncode == 2, (args, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert lines[-1].startswith("error:") and fragment in lines[-1], (args, r.stderr)
    assert _tree_digest(ucm_index) == before


def _rsscn7_subset(root: Path, classes: tuple[str, ...], per_class: int, offset: int) -> Path:
    """A class-folder archive of real RSSCN7 images (copies)."""
    for cls in classes:
        (root / cls).mkdir(parents=True)
        for path in sorted((RSSCN7 / cls).iterdir())[offset : offset + per_class]:
            shutil.copy(path, root / cls / path.name)
    return root


@pytest.mark.slow
def test_ucm_and_rsscn7_through_the_cli(ucm_index, tmp_path):
    """The whole life of an archive on real data, as a user runs it: two concurrent adds (which
    used to lose one writer's images), filtered search, remove, compact, check."""
    archive = tmp_path / "archive"
    shutil.copytree(ucm_index, archive)
    first = _rsscn7_subset(tmp_path / "rs-a", ("dRiverLake", "gParking"), 5, 0)
    second = _rsscn7_subset(tmp_path / "rs-b", ("dRiverLake", "gParking"), 5, 5)
    fields = tmp_path / "fields.json"
    fields.write_text(json.dumps({p: {"year": 2020} for p in load_dataset(first).image_ids}))
    adds = [
        subprocess.Popen(
            [sys.executable, "-m", "rshash.cli", "index", "add", archive, src, *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for src, extra in ((first, ["--fields", str(fields)]), (second, []))
    ]
    for proc in adds:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
        assert "added 10 images" in out
    info = rshash_cli("index", "info", archive)
    assert "images: 2120 items" in info.stdout, info.stdout
    r = rshash_cli(
        "search",
        archive,
        "a river",
        "-k",
        "5",
        "--json",
        "--where",
        'dataset = "rs-a" or year = 2020',
    )
    assert r.returncode == 0, r.stderr
    hits = json.loads(r.stdout)
    assert len(hits) == 5 and all(h["dataset"] == "rs-a" and h["year"] == 2020 for h in hits)
    r = rshash_cli(
        "search", archive, "a river", "-k", "20", "--json", "--where", 'dataset = "rs-b"'
    )
    assert {h["class"] for h in json.loads(r.stdout)} == {"dRiverLake", "gParking"}
    assert len(json.loads(r.stdout)) == 10
    gone = load_dataset(second).image_ids[0]
    assert rshash_cli("index", "remove", archive, gone).returncode == 0
    r = rshash_cli("index", "compact", archive)
    assert r.returncode == 0 and "images: dropped 1 removed codes" in r.stdout, r.stdout
    r = rshash_cli("index", "check", archive)
    assert r.returncode == 0 and "images: ok, items 2119, tombstones 0" in r.stdout, r.stdout
    assert "captions: ok, items 10500" in r.stdout
    index = Index.open(archive)
    assert len(index) == 2119 and index.item(load_dataset(first).image_ids[0])["year"] == 2020


def test_build_streams_batches_into_the_index(ucm_run, tmp_path, monkeypatch):
    """A build that collected every record before the first write would hold the whole archive
    in memory; each encoded batch must go into the index as it comes."""
    ds = load_dataset(make_caption_dataset(tmp_path / "a", per_class=3, classes=(0, 8)))
    sizes = []
    real_add = Index.add

    def add(self, collection, codes, items, first_key=None):
        sizes.append((collection, len(items)))
        return real_add(self, collection, codes, items, first_key)

    monkeypatch.setattr(Index, "add", add)
    build_index(ucm_run, ds, tmp_path / "index", BuildConfig(image_batch=4, text_batch=8))
    assert sizes == [("images", 4), ("images", 2), *[("captions", 8)] * 3, ("captions", 6)]
    assert check_index(tmp_path / "index") == {
        "images": {"items": 6, "tombstones": 0, "segments": 1, "pending_rollback": 0},
        "captions": {"items": 30, "tombstones": 0, "segments": 1, "pending_rollback": 0},
    }
