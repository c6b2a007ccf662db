"""Damaged index directories: one-line errors on open, checksums, read-only use, check --repair.

Each damage is made on a copy of a small real index (random codes under the real UCM run). The
bugs guarded: tracebacks (FileNotFoundError, KeyError, sqlite3.DatabaseError) or silently
wrong answers from damaged files, and an open that creates or changes files (an empty
records.db, SQLite side files on read-only storage).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from rshash.errors import RshashError
from rshash.index import Index, store
from rshash.index.maintenance import check_index, inspect_index
from tests.conftest import REPO, rshash_cli
from tests.index_writer import codes_for

SEG1, SEG2 = "seg-images-00000001.bin", "seg-images-00000002.bin"
ITEM = 16  # bytes per segment record: int64 key + 8 code bytes
SQLITE_SIDE = ("records.db-wal", "records.db-shm")


def _records(start: int, n: int) -> list[dict]:
    return [{"id": f"img-{i}", "class": "river"} for i in range(start, start + n)]


@pytest.fixture(scope="module")
def built(ucm_run, tmp_path_factory) -> Path:
    """600 codes in two segments (two commits), one item removed (a tombstone)."""
    out = tmp_path_factory.mktemp("integrity") / "index"
    index = Index.create(out, ucm_run)
    index.add("images", codes_for(0, 300), _records(0, 300))
    index.commit()
    index.add("images", codes_for(300, 300), _records(300, 300))
    index.commit()
    index.remove(["img-7"])
    index.commit()
    index.close()
    return out


@pytest.fixture
def index_dir(built, tmp_path) -> Path:
    out = tmp_path / "index"
    shutil.copytree(built, out)
    return out


def _snapshot(path: Path, skip: tuple[str, ...] = ()) -> dict[str, tuple[int, int]]:
    """Every file under `path` with its size and mtime (ns)."""
    return {
        str(f.relative_to(path)): (f.stat().st_size, f.stat().st_mtime_ns)
        for f in sorted(path.rglob("*"))
        if f.is_file() and f.name not in skip
    }


def _manifest(path: Path) -> dict:
    return json.loads((path / "index.json").read_text())


def _edit_manifest(path: Path, change: Callable[[dict], None]) -> None:
    m = _manifest(path)
    change(m)
    (path / "index.json").write_text(json.dumps(m))


def _patch(file: Path, offset: int, data: bytes) -> None:
    with open(file, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _flip_code_byte(path: Path) -> None:
    with open(path / SEG1, "r+b") as f:
        f.seek(ITEM * 10 + 8)  # first code byte of the 11th record
        byte = f.read(1)
        f.seek(ITEM * 10 + 8)
        f.write(bytes([byte[0] ^ 0xFF]))


def _swap_keys(path: Path) -> None:
    """Keys 3 and 4 trade places: the codes would be returned under each other's records."""
    rows = np.fromfile(path / SEG1, store.segment_dtype(8))
    rows["key"][[3, 4]] = rows["key"][[4, 3]]
    rows.tofile(path / SEG1)


def _no_checksums(m: dict) -> None:
    for seg in m["collections"]["images"]["segments"]:
        del seg["crc32"]


def _swap_keys_old_index(path: Path) -> None:
    _swap_keys(path)
    _edit_manifest(path, _no_checksums)


def _set_segment(field: str, value: object) -> Callable[[Path], None]:
    def change(path: Path) -> None:
        _edit_manifest(path, lambda m: m["collections"]["images"]["segments"][0].update(
            {field: value}
        ))  # fmt: skip

    return change


DAMAGES: dict[str, tuple[Callable[[Path], None], str]] = {
    "missing segment": (lambda p: (p / SEG1).unlink(), rf"{SEG1}: missing \(the index is damaged"),
    "truncated segment": (
        lambda p: os.truncate(p / SEG2, 299 * ITEM + 5),
        rf"{SEG2}: 4789 bytes, but the manifest says 300 codes of 16 bytes",
    ),
    "flipped code byte": (_flip_code_byte, rf"{SEG1}: checksum mismatch"),
    "swapped keys": (_swap_keys, rf"{SEG1}: checksum mismatch"),
    "swapped keys, no checksums": (_swap_keys_old_index, rf"{SEG1}: keys out of order"),
    "missing records.db": (
        lambda p: (p / "records.db").unlink(),
        r"records\.db: missing \(the index is damaged; restore it from a backup or rebuild",
    ),
    "garbled records.db": (
        lambda p: _patch(p / "records.db", 0, b"\x13" * 100),
        r"records\.db: not a readable SQLite database \(file is not a database\)",
    ),
    "missing model/config.json": (
        lambda p: (p / "model" / "config.json").unlink(),
        r"model/config\.json: missing",
    ),
    "no collections": (
        lambda p: _edit_manifest(p, lambda m: m.pop("collections")),
        r"index\.json: collections: expected dict, got NoneType",
    ),
    "index.json not JSON": (
        lambda p: (p / "index.json").write_text('{"format": "rshash-index/2", '),
        r"index\.json: not valid JSON",
    ),
    "generation a string": (
        lambda p: _edit_manifest(p, lambda m: m.update(generation="3")),
        r"index\.json: generation: expected an integer ≥ 0, got '3'",
    ),
    "negative count": (
        _set_segment("count", -1),
        r"collections\.images\.segments\[0\]\.count: expected an integer ≥ 0, got -1",
    ),
    "file outside the index": (
        _set_segment("file", "../../etc/passwd"),
        r"segments\[0\]\.file: expected a file name seg-images-NNNNNNNN\.bin, "
        r"got '\.\./\.\./etc/passwd'",
    ),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damage_fails_open_search_and_check_in_one_line_and_creates_nothing(index_dir, damage):
    """Each damage used to give a traceback, create an empty records.db or return wrong records;
    now open (Python and CLI) and check name the file and the fix in one line, writing nothing."""
    make, message = DAMAGES[damage]
    make(index_dir)
    before = _snapshot(index_dir)
    with pytest.raises(RshashError, match=message) as err:
        Index.open(index_dir).search_codes(codes_for(1, 1), k=3)
    assert "\n" not in str(err.value)
    assert "rebuild it with `rshash index build`" in str(err.value)
    r = rshash_cli("search", index_dir, "a river", "-k", "3")
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert _snapshot(index_dir) == before  # no records.db, no SQLite side files, no lock
    r = rshash_cli("index", "check", index_dir)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert any(line.startswith("problem: ") for line in r.stdout.splitlines()), r.stdout
    assert _snapshot(index_dir, SQLITE_SIDE) == {
        f: v for f, v in before.items() if f not in SQLITE_SIDE
    }


def test_garbled_records_pages_are_found_by_check(index_dir):
    """Damage past records.db's header passes the cheap look on open; check must find it."""
    size = (index_dir / "records.db").stat().st_size
    _patch(index_dir / "records.db", 4096, os.urandom(size - 4096))
    report = inspect_index(index_dir)
    assert any("records.db" in d and "restore it from a backup" in d for d in report.damage)
    with pytest.raises(RshashError, match=r"records\.db"):
        check_index(index_dir)


def test_segments_record_checksums_at_commit_and_compaction(index_dir):
    """Checksums must describe the bytes a writer wrote, or verify would reject good indexes."""
    import zlib

    def crcs() -> dict[str, int]:
        segs = _manifest(index_dir)["collections"]["images"]["segments"]
        return {s["file"]: s["crc32"] for s in segs}

    for name, crc in crcs().items():
        assert zlib.crc32((index_dir / name).read_bytes()) == crc
    index = Index.open(index_dir)
    assert index.compact() == {"images": 1}
    index.close()
    ((name, crc),) = crcs().items()
    assert zlib.crc32((index_dir / name).read_bytes()) == crc
    assert len(Index.open(index_dir)) == 599


def test_verify_off_still_checks_files(index_dir, monkeypatch):
    """`verify=False` (the default past VERIFY_UP_TO codes) skips the checksum pass only:
    sizes and presence are still checked, and `verify=True` always checksums."""
    from rshash.index import integrity

    _flip_code_byte(index_dir)
    assert len(Index.open(index_dir, verify=False)) == 599
    monkeypatch.setattr(integrity, "VERIFY_UP_TO", 500)
    assert len(Index.open(index_dir)) == 599
    with pytest.raises(RshashError, match=f"{SEG1}: checksum mismatch"):
        Index.open(index_dir, verify=True)
    os.truncate(index_dir / SEG1, 10)
    with pytest.raises(RshashError, match=f"{SEG1}: 10 bytes"):
        Index.open(index_dir, verify=False)


def test_reading_changes_no_file_and_a_writer_still_writes(index_dir):
    """A reader must not create records.db, a lock or temp files, nor touch the index's files
    (SQLite's WAL side files aside: readers of writable storage need them to see commits)."""
    before = _snapshot(index_dir, SQLITE_SIDE)
    index = Index.open(index_dir)
    hits = index.search_codes(codes_for(0, 1), k=3)[0]
    assert hits[0].id == "img-0" and hits[0].distance == 0
    assert index.item("img-5")["class"] == "river"
    assert len(index.matching_keys(where='class = "river"')) == 599
    with pytest.raises(RshashError, match="no image with id 'img-7'"):
        index.item("img-7")
    assert _snapshot(index_dir, SQLITE_SIDE) == before
    index.add("images", codes_for(900, 2), _records(900, 2))  # the same object then writes
    index.commit()
    assert Index.open(index_dir).item("img-901")["id"] == "img-901"


READ_ONLY = """
import errno, sys
from rshash.index import Index
from tests.index_writer import codes_for
path = sys.argv[1]
try:
    open(path + "/probe", "w")
except OSError as exc:
    assert exc.errno == errno.EROFS, exc
else:
    sys.exit("storage is writable")
index = Index.open(path)
print(len(index), index.search_codes(codes_for(0, 1), k=1)[0][0].id)
print(*(index.item(i)["id"] for i in sys.argv[2:]))
"""


def _read_only_run(path: Path, *ids: str) -> subprocess.CompletedProcess[str]:
    """Run READ_ONLY in a process that sees `path` through a read-only bind mount (this also
    binds root, which chmod would not)."""
    mount = 'mount --bind -o ro "$0" "$0" && exec "$@"'
    args = [sys.executable, "-c", READ_ONLY, str(path), *ids]
    return subprocess.run(
        ["unshare", "--mount", "sh", "-c", mount, str(path), *args],
        capture_output=True,
        text=True,
        cwd=REPO,
    )


def _need_unshare(tmp_path: Path) -> None:
    probe = tmp_path / "probe"
    probe.mkdir()
    r = subprocess.run(
        ["unshare", "--mount", "sh", "-c", f"mount --bind -o ro {probe} {probe}"],
        capture_output=True,
    )
    if r.returncode != 0:
        pytest.skip("read-only storage needs a bind mount (unshare as root); not available here")


@pytest.mark.parametrize("wal", [False, True], ids=["checkpointed", "wal-with-commits"])
def test_index_on_read_only_storage_opens_serves_and_stays_byte_identical(index_dir, tmp_path, wal):
    """On read-only storage SQLite cannot make its -shm file: opening used to fail (or, before,
    create an empty records.db). With `wal`, a writer was SIGKILLed after committing, so its
    records live only in records.db-wal, which a read-only reader must still read."""
    _need_unshare(tmp_path)
    if wal:
        writer = [sys.executable, "-m", "tests.index_writer", str(index_dir), "add:600:60"]
        assert subprocess.run([*writer, "sweep"], cwd=REPO).returncode == -9
        assert (index_dir / "records.db-wal").stat().st_size > 0
    before = _snapshot(index_dir)
    r = _read_only_run(index_dir, *(["img-650"] if wal else []))
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == (["659", "img-0", "img-650"] if wal else ["599", "img-0"])
    assert _snapshot(index_dir) == before


def test_check_passes_a_clean_index(index_dir):
    """A check that flagged sound indexes (checksums, tombstones, two segments) would cry wolf."""
    r = rshash_cli("index", "check", index_dir)
    assert r.returncode == 0, r.stderr
    assert "images: ok, items 599, tombstones 1, segments 2, pending_rollback 0" in r.stdout
    assert r.stdout.strip().endswith(": ok") and "note:" not in r.stdout


def test_check_repair_removes_what_a_killed_writer_left(index_dir):
    """A writer SIGKILLed after committing its records but before the manifest leaves rows and a
    segment past the manifest: check notes them, --repair deletes them, nothing else changes."""
    proc = subprocess.run(
        [sys.executable, "-m", "tests.index_writer", str(index_dir), "add:600:120", "manifest"],
        cwd=REPO,
    )
    assert proc.returncode == -9
    (index_dir / ".index.json.abc.tmp").write_text("{}")
    r = rshash_cli("index", "check", index_dir)
    assert r.returncode == 0, r.stderr  # harmless: readers ignore them, the next writer cleans
    assert "pending_rollback 120" in r.stdout
    assert "note: " in r.stdout and "seg-images-00000004.bin: not part of the index" in r.stdout
    r = rshash_cli("index", "check", index_dir, "--repair")
    assert r.returncode == 0, r.stderr
    assert "repaired: " in r.stdout and "120 dead writer rows deleted" in r.stdout
    assert "pending_rollback 0" in r.stdout and "note:" not in r.stdout
    assert not (index_dir / "seg-images-00000004.bin").exists()
    assert not (index_dir / ".index.json.abc.tmp").exists()
    assert len(Index.open(index_dir)) == 599


def test_check_repair_records_checksums_of_an_old_index(index_dir):
    """Indexes written before checksums open as before; --repair records the checksums."""
    want = [s["crc32"] for s in _manifest(index_dir)["collections"]["images"]["segments"]]
    _edit_manifest(index_dir, _no_checksums)
    assert len(Index.open(index_dir)) == 599
    r = rshash_cli("index", "check", index_dir)
    assert r.returncode == 0 and "no checksum (an older index)" in r.stdout, r.stdout
    report = inspect_index(index_dir, repair=True)
    assert report.clean and not report.leftovers, report
    got = [s["crc32"] for s in _manifest(index_dir)["collections"]["images"]["segments"]]
    assert got == want


def test_check_repair_fixes_a_stale_count(index_dir):
    """A manifest count that disagrees with the records is reported (exit 2) and recounted."""
    _edit_manifest(index_dir, lambda m: m["collections"]["images"].update(count=5))
    r = rshash_cli("index", "check", index_dir)
    assert r.returncode == 2 and "manifest says 5 and 1" in r.stdout, r.stdout
    r = rshash_cli("index", "check", index_dir, "--repair")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "counts set to 599 items, 1 tombstones (were 5 and 1)" in r.stdout
    assert _manifest(index_dir)["collections"]["images"]["count"] == 599


def test_check_repair_names_what_it_cannot_repair(index_dir):
    """A missing segment cannot be repaired: --repair must say so and exit 2, not invent codes."""
    (index_dir / SEG2).unlink()
    (index_dir / "seg-images-00000009.bin").write_bytes(b"")
    r = rshash_cli("index", "check", index_dir, "--repair")
    assert r.returncode == 2
    assert f"problem: {index_dir / SEG2}: missing (the index is damaged; restore" in r.stdout
    assert "seg-images-00000009.bin: deleted" in r.stdout
    assert r.stderr == f"error: {index_dir}: 1 problem found (listed above)\n"
