"""The rshash-index/2 store: filters, tombstones, compaction, generations, crashes, writers.

Indexes here hold random codes under the real UCM-trained model (so `Index` is used exactly as in
production, SQLite and segment files included), with records whose fields the tests choose.
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from rshash.errors import RshashError
from rshash.index import Index
from rshash.index.filters import compile_where
from rshash.index.maintenance import check_index
from rshash.index.store import WriteLock
from tests.conftest import REPO, make_caption_dataset, rshash_cli
from tests.index_writer import codes_for

CLASSES = ("river", "forest", "parking")


def _records(start: int, n: int) -> list[dict]:
    return [
        {
            "id": f"img-{i}",
            "path": f"/archive/{i}.tif",
            "class": CLASSES[i % 3],
            "dataset": "a" if i % 2 else "b",
            "captions": [f"caption {i}"],
            "year": 2000 + i % 20,
            "cloud": (i % 10) / 10,
        }
        for i in range(start, start + n)
    ]


def _reference(codes: np.ndarray, keys: np.ndarray, queries: np.ndarray, k: int) -> list:
    """Brute-force (distance, key) top-k, ties to the smaller key."""
    d = np.bitwise_count(queries[:, None, :] ^ codes[None]).sum(-1)
    out = []
    for row in d:
        order = np.lexsort((keys, row))[:k]
        out.append([(int(row[i]), int(keys[i])) for i in order])
    return out


@pytest.fixture
def small_index(ucm_run, tmp_path) -> Path:
    """600 random 64-bit codes in two commits (two segments)."""
    out = tmp_path / "index"
    index = Index.create(out, ucm_run)
    index.add("images", codes_for(0, 300), _records(0, 300))
    index.commit()
    index.add("images", codes_for(300, 300), _records(300, 300))
    index.commit()
    index.close()
    return out


def _ids(index: Index) -> set[str]:
    return {r["id"] for r in index.items()}


@pytest.mark.parametrize("engine", ["exact", "faiss-flat", "faiss-ivf"])
def test_filtered_search_is_exact_top_k_among_matching_items(ucm_run, tmp_path, engine):
    """A filter applied after the top-k (or ignored by an engine) would return fewer or wrong
    items; every engine must return the exact top-k of the matching items."""
    params = {"nlist": 4, "nprobe": 4} if engine == "faiss-ivf" else {}
    index = Index.create(tmp_path / "i", ucm_run, engine, params)
    codes, recs = codes_for(0, 3000), _records(0, 3000)
    index.add("images", codes, recs)
    index.commit()
    queries = codes_for(99, 5)
    keys = np.arange(3000)
    cases = {
        'class = "river" and year >= 2010': lambda r: r["class"] == "river" and r["year"] >= 2010,
        'dataset in ("a") or not (cloud < 0.5)': lambda r: r["dataset"] == "a" or r["cloud"] >= 0.5,
        "year > 2005 and year <= 2007 and class != 'forest'": lambda r: (
            2005 < r["year"] <= 2007 and r["class"] != "forest"
        ),
        'id in ("img-7", "img-8")': lambda r: r["id"] in ("img-7", "img-8"),
    }
    for where, keep in cases.items():
        mask = np.array([keep(r) for r in recs])
        want = _reference(codes[mask], keys[mask], queries, 20)
        got = index.search_codes(queries, k=20, where=where)
        assert [[(h.distance, h.key) for h in g] for g in got] == want, where
        assert all(keep(h.item) for g in got for h in g)
        radius = got[0][-1].distance  # the radius query must find at least the top-k
        within = index.search_codes(queries[:1], radius=radius, where=where)[0]
        assert len(within) >= len(got[0]) > 0
        assert {h.key for h in within} == {
            int(k) for k in keys[mask] if np.bitwise_count(codes[k] ^ queries[0]).sum() <= radius
        }


def test_filter_language_is_parameterised_and_rejects_bad_input():
    """User text must never become SQL: values are bound, field names checked."""
    sql, params = compile_where('class = "x\\" OR 1=1 --" and window.row >= 3')
    assert params == ['x" OR 1=1 --', 3] and "OR 1=1" not in sql
    assert 'json_extract(record, \'$."window"."row"\')' in sql
    for bad, fragment in [
        ("class = ", "expected a value"),
        ('class = "a"; DROP TABLE items', "unexpected"),
        ("class ~ 3", "unexpected"),
        ("(class = 'a'", r"expected \)"),
        ("year < null", "null only compares"),
        ("", "empty filter"),
        ('"class" = 1', "expected name"),
    ]:
        with pytest.raises(RshashError, match=fragment):
            compile_where(bad)


def test_bbox_filter_keeps_intersecting_boxes(ucm_run, tmp_path):
    """Tiles with `bounds_wgs84` go into the R*Tree; a bbox keeps exactly the boxes it meets."""
    index = Index.create(tmp_path / "i", ucm_run)
    recs = [
        {"id": f"t{i}", "class": None, "bounds_wgs84": [i * 0.1, 10.0, i * 0.1 + 0.1, 10.1]}
        for i in range(50)
    ]
    index.add("images", codes_for(0, 50), recs)
    index.commit()
    q = codes_for(0, 1)
    hits = index.search_codes(q, k=50, bbox=(1.05, 10.05, 1.25, 11.0))[0]
    assert sorted(h.id for h in hits) == ["t10", "t11", "t12"]
    both = index.search_codes(q, k=50, bbox=(1.05, 10.05, 1.25, 11.0), where='id != "t11"')[0]
    assert sorted(h.id for h in both) == ["t10", "t12"]
    assert index.search_codes(q, k=5, bbox=(50, 50, 51, 51)) == [[]]
    # minlon > maxlon: the box runs east from 4.85 across ±180° to 0.15
    across = index.search_codes(q, k=50, bbox=(4.85, 10.05, 0.15, 11.0))[0]
    assert sorted(h.id for h in across) == ["t0", "t1", "t48", "t49"]
    with pytest.raises(RshashError, match="bbox"):
        index.search_codes(q, k=5, bbox=(2, 1, 3, 0))


def test_removed_items_are_masked_then_compacted_away(small_index):
    """Tombstones must hide removed items without rewriting anything; compaction must then drop
    them and leave every answer unchanged."""
    index = Index.open(small_index)
    segments = sorted(p.name for p in small_index.glob("seg-*"))
    gone = [f"img-{i}" for i in range(0, 600, 7)]
    assert index.remove(gone) == len(gone)
    index.commit()
    assert sorted(p.name for p in small_index.glob("seg-*")) == segments  # nothing rewritten
    codes, keys = codes_for(0, 300), np.arange(600)
    codes = np.concatenate([codes, codes_for(300, 300)])
    keep = np.ones(600, bool)
    keep[::7] = False
    queries = codes[:4]
    want = _reference(codes[keep], keys[keep], queries, 30)
    for reader in (index, Index.open(small_index)):
        assert len(reader) == keep.sum()
        got = reader.search_codes(queries, k=30)
        assert [[(h.distance, h.key) for h in g] for g in got] == want
        with pytest.raises(RshashError, match="no image"):
            reader.item("img-7")
    assert check_index(small_index)["images"]["tombstones"] == len(gone)
    dropped = index.compact()
    assert dropped == {"images": len(gone)}
    assert len(list(small_index.glob("seg-*"))) == 1
    reopened = Index.open(small_index)
    got = reopened.search_codes(queries, k=30)
    assert [[(h.distance, h.key) for h in g] for g in got] == want
    assert check_index(small_index)["images"] == {
        "items": 600 - len(gone),
        "tombstones": 0,
        "segments": 1,
        "pending_rollback": 0,
    }
    (rows,) = reopened._db().execute("SELECT count(*) FROM items").fetchone()
    assert rows == 600 - len(gone)  # dropped records are deleted too


def test_compaction_runs_by_itself_past_the_threshold(small_index):
    """Tombstones must not pile up forever: past a quarter of the codes, commit compacts."""
    index = Index.open(small_index)
    index.remove([f"img-{i}" for i in range(200)])
    index.commit()
    assert index.manifest["collections"]["images"]["tombstones"] == 0
    assert len(index.manifest["collections"]["images"]["segments"]) == 1
    assert len(Index.open(small_index)) == 400


def test_item_lookup_and_readd_after_remove(small_index):
    """Ids are unique among live items, and a removed id can come back."""
    index = Index.open(small_index)
    assert index.item("img-5")["year"] == 2005
    with pytest.raises(RshashError, match="already in the index"):
        index.add("images", codes_for(5, 1), _records(5, 1))
    index.remove(["img-5"])
    index.add("images", codes_for(5, 1), _records(5, 1))
    index.commit()
    assert index.item("img-5")["path"] == "/archive/5.tif"
    assert len(Index.open(small_index)) == 600


def test_reader_refresh_switches_generation_atomically(small_index):
    """A reader must keep its generation until refresh(), then see all of the new one."""
    reader = Index.open(small_index)
    writer = Index.open(small_index)
    q = codes_for(1000, 1)
    writer.add("images", np.repeat(q, 40, 0), _records(1000, 40))
    assert not reader.refresh()  # not committed yet
    writer.commit()
    assert reader.generation == 2 and len(reader.search_codes(q, radius=0)[0]) == 0
    assert reader.refresh() and reader.generation == 3
    assert len(reader.search_codes(q, radius=0)[0]) == 40
    assert not reader.refresh()


def legacy_model_dir(run: Path, target: Path) -> Path:
    """`run`'s model as an older rshash saved it: one pickled model.pt (tensors and plain
    values), beside config.json and split.json."""
    import torch

    from rshash.models.model_file import load_model

    target.mkdir(parents=True, exist_ok=True)
    torch.save(load_model(run), target / "model.pt")
    for name in ("config.json", "split.json"):
        shutil.copy(run / name, target / name)
    return target


def _v1_index(ucm_run: Path, tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray, list]:
    """An `rshash-index/1` directory of 120 random codes under keys 0, 2, 4, ..."""
    old = tmp_path / "old"
    legacy_model_dir(ucm_run, old / "model")
    codes, keys = codes_for(0, 120), np.arange(120) * 2
    np.save(old / "images.codes.3.npy", codes)
    np.save(old / "images.keys.3.npy", keys)
    recs = _records(0, 120)
    (old / "images.items.3.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    manifest = json.loads(json.dumps(Index.create(tmp_path / "tmp", ucm_run).manifest))
    manifest.update(
        format="rshash-index/1",
        generation=3,
        collections={"images": {"count": 120, "next_key": 240, "report": {}}},
    )
    (old / "index.json").write_text(json.dumps(manifest))
    return old, codes, keys, recs


def test_v1_index_names_upgrade_and_upgrade_keeps_everything(ucm_run, tmp_path):
    """Opening an old-format index must say how to convert it, and the conversion must keep keys,
    records and answers (its pickled model converted to safetensors on the way)."""
    old, codes, keys, recs = _v1_index(ucm_run, tmp_path)
    r = rshash_cli("search", old, "a river")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == (
        f"error: {old}: index format rshash-index/1; convert it with `rshash index upgrade {old}`"
    )
    r = rshash_cli("index", "upgrade", old)
    assert r.returncode == 0, r.stderr
    assert not (old / "model" / "model.pt").exists()
    index = Index.open(old)
    assert index.items() == recs
    got = index.search_codes(codes[:3], k=10)
    assert [[(h.distance, h.key) for h in g] for g in got] == _reference(codes, keys, codes[:3], 10)
    index.add("images", codes_for(500, 1), _records(500, 1))
    index.commit()
    assert index.search_codes(codes_for(500, 1), k=1)[0][0].key == 240
    assert rshash_cli("index", "check", old).returncode == 0


KILL_BETWEEN_RENAMES = """
import os, signal, sys
from rshash.index import maintenance
real, calls = maintenance._finish_swap, []
def finish(*args):
    calls.append(1)
    if len(calls) == 2:  # the old index is parked, the new one not yet moved in
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args)
maintenance._finish_swap = finish
maintenance.upgrade_index(sys.argv[1], progress=False)
"""


def test_upgrade_killed_between_its_renames_is_finished_by_the_next_one(ucm_run, tmp_path):
    """Guards against an upgrade whose swap, killed between its two renames, leaves no index at
    the path: opening names the fix, and running the upgrade again completes the swap."""
    old, _, _, recs = _v1_index(ucm_run, tmp_path)
    killed = subprocess.run(
        [sys.executable, "-c", KILL_BETWEEN_RENAMES, str(old)], cwd=REPO, timeout=300
    )
    assert killed.returncode == -9
    assert not old.exists() and (tmp_path / "old.v1").is_dir()
    r = rshash_cli("search", old, "a river")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"error: {old}: an `rshash index upgrade` was interrupted; run it again to finish"
    ]
    r = rshash_cli("index", "upgrade", old)
    assert r.returncode == 0, r.stderr
    assert Index.open(old).items() == recs
    assert not (tmp_path / "old.v1").exists() and not (tmp_path / "old.upgrade").exists()
    assert rshash_cli("index", "check", old).returncode == 0


def _writer(index: Path, action: str, point: str | None = None, **popen) -> subprocess.Popen:
    args = [sys.executable, "-m", "tests.index_writer", str(index), action]
    return subprocess.Popen([*args, *([point] if point else [])], cwd=REPO, **popen)


def _wait_held(flag: Path, proc: subprocess.Popen) -> None:
    """Wait until the writer paused at its hold point (created FLAG.held)."""
    deadline = time.monotonic() + 120
    while not Path(f"{flag}.held").exists():
        assert proc.poll() is None, f"writer exited with {proc.returncode} before its hold"
        assert time.monotonic() < deadline, "writer never reached its hold point"
        time.sleep(0.05)


def _stderr_line(proc: subprocess.Popen, timeout: float = 60) -> str:
    """The next line the process writes to stderr (fails after `timeout` seconds)."""
    assert proc.stderr is not None
    ready, _, _ = select.select([proc.stderr], [], [], timeout)
    assert ready, "no line on stderr in time"
    return proc.stderr.readline()


def test_lock_wait_names_the_holder_and_gives_up_at_the_deadline(tmp_path, capsys):
    """A waiter used to block forever without a word; it must say who holds the lock, then give
    up at its deadline with one line naming the holder's pid, command and start time."""
    holder = WriteLock(tmp_path)
    holder.acquire()
    waiter = WriteLock(tmp_path, timeout_s=1.5)
    with pytest.raises(RshashError) as err:
        waiter.acquire()
    assert re.fullmatch(
        rf"{re.escape(str(tmp_path))}/write\.lock: held by pid {os.getpid()} \(.+\) since "
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC; gave up after 1\.5 s \(--lock-timeout\)",
        str(err.value),
    ), str(err.value)
    assert f"waiting, held by pid {os.getpid()}" in capsys.readouterr().err
    assert not waiter.held
    holder.release()
    waiter.acquire()  # a released lock is free at once
    assert waiter.held
    waiter.release()


def test_commit_syncs_files_then_directory_then_manifest(small_index, monkeypatch):
    """Without fsyncs a power loss could undo a commit the user was told succeeded: the new
    segment's data and directory entry, then the new manifest's data, then its rename must reach
    the disk, in that order."""
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst) -> None:
        events.append(("replace", str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    index = Index.open(small_index)
    index.add("images", codes_for(600, 5), _records(600, 5))
    index.commit()
    where = str(small_index)
    segment = events.index(("fsync", f"{where}/seg-images-00000003.bin"))
    directory = events.index(("fsync", where), segment)
    manifest_data = next(
        i for i, (op, path) in enumerate(events) if op == "fsync" and "/.index.json." in path
    )
    rename = events.index(("replace", f"{where}/index.json"))
    assert segment < directory < manifest_data < rename, events
    assert ("fsync", where) in events[rename:], events  # the rename itself made durable


def test_reader_loading_during_a_compaction_keeps_removed_items_out(small_index, monkeypatch):
    """A reader that loaded generation G's segments and read its tombstones only after a
    compaction had deleted the dropped rows saw removed codes come back (and fewer than k
    results). The reader is paused between the two while a compaction (its own Index, as in
    another process) completes; it must still mask every removed item."""
    reader = Index.open(small_index)
    writer = Index.open(small_index)
    gone = list(range(0, 600, 6))  # keys = image numbers; 100 of 600, under the compaction bar
    writer.remove([f"img-{i}" for i in gone])
    writer.commit()
    compactor = Index.open(small_index)
    paused, go = threading.Event(), threading.Event()
    real = Index._tombstones

    def tombstones(self, collection, manifest):
        if self is reader:
            paused.set()
            assert go.wait(60)
        return real(self, collection, manifest)

    monkeypatch.setattr(Index, "_tombstones", tombstones)
    loading = threading.Thread(target=reader.refresh)
    loading.start()
    try:
        assert paused.wait(60)
        compactor.compact()
        (rows,) = compactor._db().execute("SELECT count(*) FROM items").fetchone()
        assert rows == 500  # the removed rows are really deleted while the reader waits
    finally:
        go.set()
        loading.join(60)
    assert reader.generation == 3
    assert not set(reader.collections["images"].keys.tolist()) & set(gone)
    assert len(reader) == 500
    assert len(reader.search_codes(codes_for(0, 1), k=500)[0]) == 500
    assert reader.refresh() and reader.generation == 4 and len(reader) == 500


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", ["insert", "seal", "manifest", "rename", "sweep"])
def test_killed_add_leaves_old_or_new_items(small_index, kill_at):
    """SIGKILL at any point of an add must leave an index that opens, passes the check and holds
    the old items or all the new ones, never some; the next writer must clean up after it,
    including the temporary manifest of a writer killed before its rename."""
    before = _ids(Index.open(small_index))
    proc = _writer(small_index, "add:600:120", kill_at)
    assert proc.wait(120) == -9
    if kill_at == "rename":
        assert list(small_index.glob(".index.json.*.tmp"))  # killed between write and rename
    index = Index.open(small_index)
    after = _ids(index)
    new = {f"img-{i}" for i in range(600, 720)}
    assert after in (before, before | new), kill_at
    assert after == (before | new if kill_at == "sweep" else before)
    check_index(small_index)
    done = _writer(small_index, "add:800:10")
    assert done.wait(120) == 0
    assert check_index(small_index)["images"]["pending_rollback"] == 0
    assert _ids(Index.open(small_index)) == after | {f"img-{i}" for i in range(800, 810)}
    named = {
        s["file"] for s in Index.open(small_index).manifest["collections"]["images"]["segments"]
    }
    assert {p.name for p in small_index.glob("seg-*")} == named  # no stray segments
    assert not list(small_index.glob(".*.tmp"))  # no temporary files


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", ["manifest", "gc", "sweep"])
def test_killed_compact_leaves_a_consistent_index(small_index, kill_at):
    """SIGKILL during compaction must leave the items as they were, before or after merging."""
    index = Index.open(small_index)
    index.remove([f"img-{i}" for i in range(0, 600, 5)])
    index.commit()
    index.close()
    before = _ids(Index.open(small_index))
    proc = _writer(small_index, "compact", kill_at)
    assert proc.wait(120) == -9
    assert _ids(Index.open(small_index)) == before
    report = check_index(small_index)["images"]
    assert report["segments"] == (2 if kill_at == "manifest" else 1)
    q = codes_for(1, 3)
    fresh = Index.open(small_index).search_codes(q, k=15)
    assert _writer(small_index, "compact").wait(120) == 0
    assert check_index(small_index)["images"]["tombstones"] == 0
    again = Index.open(small_index).search_codes(q, k=15)
    assert [[h.key for h in g] for g in again] == [[h.key for h in g] for g in fresh]


@pytest.mark.slow
def test_concurrent_writers_in_separate_processes_take_turns(small_index, tmp_path):
    """Two writers at once must take turns, each adding to what the other committed. Writer A is
    held inside its write, lock taken; B, started then, must wait (and say for whom) until A
    commits: a lock that did not exclude would let B commit first or lose A's rows."""
    flag = tmp_path / "release-a"
    a = _writer(small_index, "add:1000:150", f"hold-lock:{flag}")
    try:
        _wait_held(flag, a)
        b = _writer(small_index, "add:2000:150", stderr=subprocess.PIPE, text=True)
        line = _stderr_line(b)
        assert f"write.lock: waiting, held by pid {a.pid}" in line, line
        assert b.poll() is None  # still waiting
    finally:
        flag.touch()
    assert a.wait(180) == 0 and b.wait(180) == 0
    index = Index.open(small_index)
    assert [s["writer"] for s in index.manifest["sources"]] == ["add:1000:150", "add:2000:150"]
    ids = _ids(index)
    assert {f"img-{i}" for i in [*range(1000, 1150), *range(2000, 2150)]} <= ids
    assert len(ids) == 900
    check_index(small_index)


@pytest.mark.slow
def test_writer_gives_up_after_lock_timeout_naming_the_holder(small_index, tmp_path):
    """`index remove` used to hang silently behind another writer; with a holder that never
    lets go it must fail after --lock-timeout with one line naming the holder's pid and
    command, exit status 2, and leave the index as it was."""
    flag = tmp_path / "release"
    a = _writer(small_index, "add:1000:150", f"hold-lock:{flag}")
    try:
        _wait_held(flag, a)
        before = Index.open(small_index)
        r = rshash_cli("index", "remove", small_index, "img-1", "--lock-timeout", "2")
        after = Index.open(small_index)
    finally:
        flag.touch()
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert re.fullmatch(
        rf"error: {re.escape(str(small_index))}/write\.lock: held by pid {a.pid} "
        rf"\(\S*tests/index_writer\.py {re.escape(str(small_index))} add:1000:150 .*\) since "
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC; gave up after 2 s \(--lock-timeout\)",
        lines[-1],
    ), r.stderr
    assert f"waiting, held by pid {a.pid}" in r.stderr  # said so while it waited
    assert after.generation == before.generation and _ids(after) == _ids(before)
    assert a.wait(120) == 0
    assert "img-1" in _ids(Index.open(small_index))
    check_index(small_index)


@pytest.mark.slow
def test_remove_completes_while_an_add_is_encoding(small_index, tmp_path):
    """`index add` held the writer lock from its first encoded batch on, through hours of
    encoding, so an `index remove` in another process hung. Paused in its encoding (images
    done, captions not), the add must hold no lock: the remove goes through at once."""
    data = make_caption_dataset(tmp_path / "more", per_class=2, classes=(0,))
    flag = tmp_path / "release"
    adder = _writer(small_index, f"archive:{data}", f"hold-encode:{flag}")
    try:
        _wait_held(flag, adder)
        r = rshash_cli("index", "remove", small_index, "img-3", "--lock-timeout", "10")
    finally:
        flag.touch()
    assert r.returncode == 0, r.stderr
    assert "waiting" not in r.stderr
    assert adder.wait(120) == 0
    index = Index.open(small_index)
    added = json.loads((data / "dataset.json").read_text())["images"]
    assert "img-3" not in _ids(index) and len(index) == 601
    assert {e["filename"] for e in added} <= _ids(index)
    assert len(index.collections["captions"]) == 5 * len(added)
    check_index(small_index)


@pytest.mark.slow
def test_two_adds_encode_at_once_without_touching_each_others_batches(small_index, tmp_path):
    """Encoding no longer holds the lock, so two `index add`s encode at once; sharing one
    INDEX.partial/ folder, each would delete or overwrite the other's saved batches. Add A is
    paused in its encoding while add B runs from start to commit; A must then finish too."""
    first = make_caption_dataset(tmp_path / "a", per_class=2, classes=(0,))
    second = make_caption_dataset(tmp_path / "b", per_class=2, classes=(8,))
    flag = tmp_path / "release"
    a = _writer(small_index, f"archive:{first}", f"hold-encode:{flag}")
    try:
        _wait_held(flag, a)
        assert _writer(small_index, f"archive:{second}").wait(120) == 0
    finally:
        flag.touch()
    assert a.wait(120) == 0
    assert len(Index.open(small_index)) == 604
    assert not (small_index.parent / "index.partial").exists()
    check_index(small_index)


READER = """
import json, sys, numpy as np
from rshash.index import Index
from tests.index_writer import codes_for
index = Index.open(sys.argv[1])
q = np.repeat(codes_for(5000, 1), 1, 0)
seen = [[index.generation, len(index.search_codes(q, radius=0)[0])]]
print("ready", flush=True)
while True:
    index.refresh()
    n = len(index.search_codes(q, radius=0)[0])
    seen.append([index.generation, n])
    if n >= 200:
        break
print(json.dumps(seen))
"""


@pytest.mark.slow
def test_reader_process_sees_whole_generations_while_a_writer_commits(small_index):
    """A searching process must see each commit whole (old or new, never part), and pick up new
    generations by refresh() without reopening."""
    reader = subprocess.Popen(
        [sys.executable, "-c", READER, str(small_index)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert reader.stdout is not None and reader.stdout.readline() == "ready\n"
    writer = Index.open(small_index)
    q = codes_for(5000, 1)
    for step in range(4):
        for part in range(5):  # each commit: 50 items matching the query, added in 5 calls
            at = 5000 + step * 50 + part * 10
            writer.add("images", np.repeat(q, 10, 0), _records(at, 10))
        writer.commit()
        time.sleep(0.5)
    out, _ = reader.communicate(timeout=120)
    seen = json.loads(out)
    assert all(n == 50 * (gen - 2) for gen, n in seen if gen >= 2), seen
    assert seen[-1] == [6, 200]
    assert len({gen for gen, _ in seen}) >= 2  # it saw more than one generation


def test_code_lengths_that_are_not_whole_words(tmp_path):
    """16-, 32- and 48-bit runs (the papers' settings) must index and search in every engine,
    and padding to words must not change a distance."""
    from rshash.index import make_engine, pack_codes

    rng = np.random.default_rng(0)
    for bits in (8, 16, 32, 48, 100, 1024):
        signs = np.sign(rng.normal(size=(2000, bits)))
        packed = pack_codes(signs)
        assert packed.shape == (2000, 8 * -(-bits // 64))
        queries = packed[:3]
        d_ref = (signs[:3, None, :] != signs[None, :, :]).sum(-1)
        keys = np.arange(2000, dtype=np.int64)
        for name in ("exact", "faiss-flat", "faiss-ivf"):
            engine = make_engine(
                name, bits, {"nlist": 2, "nprobe": 2} if name == "faiss-ivf" else {}
            )
            engine.build(packed, keys)
            d, found = engine.search(queries, 10)
            assert np.array_equal(d, np.take_along_axis(d_ref, found, 1)), (bits, name)
            if name != "faiss-ivf":
                assert np.array_equal(d, np.sort(d_ref, 1)[:, :10]), (bits, name)
    with pytest.raises(RshashError, match="8 to 1024 bits"):
        pack_codes(np.ones((2, 1030)))


@pytest.mark.slow
def test_48_bit_run_builds_and_searches_through_the_cli(mini_features, tmp_path):
    """`rshash index build` on a 48-bit run used to fail with "multiple of 64 bits"."""
    run = tmp_path / "run48"
    r = rshash_cli(
        "train", "--features", mini_features, "--out", run, "--bits", "48", "--epochs", "2",
        "--batch-size", "8",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    data = mini_features.parent / "mini"
    out = tmp_path / "index48"
    r = rshash_cli("index", "build", run, data, "--out", out, "--features", mini_features)
    assert r.returncode == 0, r.stderr
    assert "48-bit codes" in r.stdout
    r = rshash_cli("search", out, "a river", "-k", "3", "--json")
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout)) == 3
    index = Index.open(out)
    codes = index.collections["images"].codes
    hits = index.search_codes(codes[:1], k=1)[0]
    assert hits[0].distance == 0 and codes.shape[1] == 8


def test_open_does_not_load_records(small_index, monkeypatch):
    """Opening must not read every record into Python (its cost must not grow with them)."""
    from rshash.index import store

    monkeypatch.setattr(store, "record_of", lambda *a: pytest.fail("open read a record"))
    index = Index.open(small_index)
    assert len(index) == 600
    assert os.path.getsize(small_index / "records.db") > 0
