"""The on-disk parts of an `rshash-index/2` directory: records, code segments, manifest, lock.

- `records.db` (SQLite, WAL): one row per item, `rid` = collection·2⁴⁰ + key (collection 0
  images, 1 captions), so a lookup by key is a rowid lookup and a collection is a rowid range;
  columns `id`, `image`, `path`, `class`, `dataset`, `captions`, `record` (the rest of the
  item's record as JSON) and the generations `gen_added` / `gen_removed` that bound the row's
  life; indexes on id, image, (class | dataset, generations: covering a filter's key query) and
  removed rows; an R*Tree `bounds` over the records' `bounds_wgs84` (a box across the
  antimeridian, west > east, as [west, east + 360]). A reader at generation G
  sees the rows with gen_added ≤ G < gen_removed.
- `seg-<collection>-<generation>.bin`: the codes one commit added, as (int64 key, code bytes)
  pairs in key order; append-only, never rewritten, deleted only by compaction.
- `index.json`: the manifest, replaced atomically; it names the generation and its segments.
- `write.lock`: writers hold an exclusive `flock` on it; the kernel drops it when a writer dies.
  The holder writes its pid, command line and start time into it (for waiters' messages).
"""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import sqlite3
import sys
import time
import zlib
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from rshash.data.bbox import lon_span
from rshash.errors import RshashError

FORMAT = "rshash-index/2"
OLD_FORMAT = "rshash-index/1"
MANIFEST = "index.json"
RECORDS = "records.db"
LOCK = "write.lock"
COLLECTIONS = ("images", "captions")
COLUMNS = ("id", "image", "path", "class", "dataset")
BATCH = 900  # SQL parameters per IN (...) list, under SQLite's limit
MAX_MANIFEST_BYTES = 64 << 20  # index.json: a few KiB per commit's source and segments
DAMAGED = "the index is damaged; restore it from a backup or rebuild it with `rshash index build`"

SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    rid INTEGER PRIMARY KEY,
    id TEXT NOT NULL,
    image TEXT,
    path TEXT,
    class TEXT,
    dataset TEXT,
    captions TEXT,
    record TEXT NOT NULL,
    gen_added INTEGER NOT NULL,
    gen_removed INTEGER
);
CREATE INDEX IF NOT EXISTS items_id ON items (id);
CREATE INDEX IF NOT EXISTS items_image ON items (image) WHERE image IS NOT NULL;
CREATE INDEX IF NOT EXISTS items_class ON items (class, gen_added, gen_removed);
CREATE INDEX IF NOT EXISTS items_dataset ON items (dataset, gen_added, gen_removed);
CREATE INDEX IF NOT EXISTS items_removed ON items (gen_removed) WHERE gen_removed IS NOT NULL;
CREATE VIRTUAL TABLE IF NOT EXISTS bounds USING rtree (rid, minlon, maxlon, minlat, maxlat);
"""


KEY_BITS = 40
KEY_MASK = (1 << KEY_BITS) - 1
KEY = f"(rid & {KEY_MASK})"  # SQL: an item's key


def coll_code(collection: str) -> int:
    return COLLECTIONS.index(collection)


def rid(collection: int, key: int) -> int:
    """Row id of key `key` in collection number `collection`."""
    return (collection << KEY_BITS) | key


def in_collection(collection: int) -> str:
    """SQL condition: the row belongs to collection number `collection` (a rowid range)."""
    return f"rid BETWEEN {rid(collection, 0)} AND {rid(collection, KEY_MASK)}"


def live_sql(gen: int) -> str:
    """SQL condition: the row is alive at generation `gen` (an int, safe to inline)."""
    return f"gen_added <= {int(gen)} AND (gen_removed IS NULL OR gen_removed > {int(gen)})"


def connect(path: Path, *, write: bool) -> sqlite3.Connection:
    """A connection to INDEX/records.db in autocommit mode (transactions are explicit).

    Writers get WAL and full sync on commit. Readers open it read-only and never create it: on
    storage they cannot write, as immutable unless a WAL holds commits (then SQLite needs the
    -shm file that came with it), since a read-only WAL database cannot make its -shm file.
    """
    file = path / RECORDS
    if write:
        db = sqlite3.connect(file, isolation_level=None, check_same_thread=False, timeout=60)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
    else:
        mode = "mode=ro"
        wal = path / f"{RECORDS}-wal"
        if not os.access(path, os.W_OK) and not (wal.is_file() and wal.stat().st_size):
            mode = "immutable=1"
        uri = f"{file.resolve().as_uri()}?{mode}"
        db = sqlite3.connect(
            uri, uri=True, isolation_level=None, check_same_thread=False, timeout=60
        )
    db.execute("PRAGMA cache_size=-65536")
    return db


def init_db(db: sqlite3.Connection) -> None:
    db.executescript(SCHEMA)


def row_of(collection: int, key: int, rec: dict[str, Any], gen: int) -> tuple[Any, ...]:
    """One `items` row for record `rec` (captions kept apart, the rest as JSON)."""
    rest = {k: v for k, v in rec.items() if k != "captions"}
    captions = rec.get("captions")

    def text(field: str) -> str | None:
        v = rec.get(field)
        return None if v is None else str(v)

    return (
        rid(collection, key),
        str(rec["id"]),
        text("image"),
        text("path"),
        text("class"),
        text("dataset"),
        None if captions is None else json.dumps(captions, ensure_ascii=False),
        json.dumps(rest, ensure_ascii=False),
        gen,
    )


def record_of(captions: str | None, record: str) -> dict[str, Any]:
    rec: dict[str, Any] = json.loads(record)
    if captions is not None:
        rec["captions"] = json.loads(captions)
    return rec


def insert_rows(db: sqlite3.Connection, rows: Iterable[tuple[Any, ...]]) -> None:
    db.executemany(
        "INSERT INTO items (rid, id, image, path, class, dataset, captions, record, gen_added)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        rows,
    )


def insert_bounds(db: sqlite3.Connection, rid: int, rec: dict[str, Any]) -> None:
    box = rec.get("bounds_wgs84")
    if box is None:
        return
    try:
        minlon, minlat, maxlon, maxlat = (float(v) for v in box)
    except (TypeError, ValueError):
        raise RshashError(
            f"item {rec['id']!r}: bounds_wgs84 must be [minlon, minlat, maxlon, maxlat]"
        ) from None
    west, east = lon_span(minlon, maxlon)  # across the antimeridian: east + 360
    db.execute(
        "INSERT INTO bounds (rid, minlon, maxlon, minlat, maxlat) VALUES (?, ?, ?, ?, ?)",
        (rid, west, east, minlat, maxlat),
    )


def drop_compacted(db: sqlite3.Connection, compacted: int) -> int:
    """Delete the rows (and their bounds) that compaction up to generation `compacted` dropped
    from the segments; returns the rows deleted."""
    db.execute(
        "DELETE FROM bounds WHERE rid IN (SELECT rid FROM items WHERE gen_removed <= ?)",
        (compacted,),
    )
    return int(db.execute("DELETE FROM items WHERE gen_removed <= ?", (compacted,)).rowcount)


def roll_back_past(db: sqlite3.Connection, manifest: dict[str, Any]) -> tuple[int, int]:
    """Undo what a dead writer left past `manifest`: rows from each collection's next key on,
    removals of later generations. Returns (rows deleted, removals undone)."""
    deleted = 0
    for c, name in enumerate(COLLECTIONS):
        info = manifest["collections"].get(name)
        first = rid(c, info["next_key"] if info else 0)
        where = f"rid BETWEEN {first} AND {rid(c, KEY_MASK)}"
        db.execute(f"DELETE FROM bounds WHERE {where}")
        deleted += db.execute(f"DELETE FROM items WHERE {where}").rowcount
    undone = db.execute(
        "UPDATE items SET gen_removed = NULL WHERE gen_removed > ?", (manifest["generation"],)
    ).rowcount
    return deleted, int(undone)


def chunks(values: list[Any], size: int = BATCH) -> Iterator[list[Any]]:
    for i in range(0, len(values), size):
        yield values[i : i + size]


# --- segments ------------------------------------------------------------------------------


def segment_dtype(width: int) -> np.dtype:
    return np.dtype([("key", "<i8"), ("code", "u1", (width,))])


def segment_name(collection: str, gen: int) -> str:
    return f"seg-{collection}-{gen:08d}.bin"


def read_segment(path: Path, width: int, count: int) -> np.ndarray:
    """A segment's (key, code) records, memory-mapped; exactly `count` of them."""
    dtype = segment_dtype(width)
    size = path.stat().st_size
    if size != count * dtype.itemsize:
        raise RshashError(
            f"{path}: {size} bytes, but the manifest says {count} codes of {dtype.itemsize} bytes"
            f" ({DAMAGED})"
        )
    if count == 0:
        return np.zeros(0, dtype)
    return np.memmap(path, dtype, mode="r", shape=(count,))


class SegmentWriter:
    """Appends (key, code) records to a new segment file; `close()` syncs it to disk.

    `crc32` is the CRC32 of the bytes written so far, recorded in the manifest for `verify`.
    """

    def __init__(self, path: Path, width: int) -> None:
        self.path = path
        self.dtype = segment_dtype(width)
        self.file = open(path, "wb")  # noqa: SIM115 - kept open across add() calls
        self.count = 0
        self.crc32 = 0

    def write(self, keys: np.ndarray, codes: np.ndarray) -> None:
        rows = np.empty(len(keys), self.dtype)
        rows["key"], rows["code"] = keys, codes
        data = rows.tobytes()
        self.file.write(data)
        self.crc32 = zlib.crc32(data, self.crc32)
        self.count += len(keys)

    def close(self) -> None:
        if not self.file.closed:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()

    def discard(self) -> None:
        self.file.close()
        self.path.unlink(missing_ok=True)


# --- manifest and lock ---------------------------------------------------------------------


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of index directory `path`, checked to be this format and of its shape."""
    from rshash.index.integrity import check_manifest  # integrity builds on store

    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        if not path.exists() and path.with_name(path.name + ".upgrade").is_dir():
            raise RshashError(
                f"{path}: an `rshash index upgrade` was interrupted; run it again to finish"
            )
        raise RshashError(f"{path}: not an rshash index (no {MANIFEST})")
    if manifest_path.stat().st_size > MAX_MANIFEST_BYTES:
        raise RshashError(f"{manifest_path}: over {MAX_MANIFEST_BYTES >> 20} MiB ({DAMAGED})")
    try:
        manifest = json.loads(manifest_path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise RshashError(f"{manifest_path}: not valid JSON ({exc}; {DAMAGED})") from None
    if not isinstance(manifest, dict):
        raise RshashError(f"{manifest_path}: expected a JSON object ({DAMAGED})")
    fmt = manifest.get("format")
    if fmt == OLD_FORMAT:
        raise RshashError(
            f"{path}: index format {OLD_FORMAT}; convert it with `rshash index upgrade {path}`"
        )
    if fmt != FORMAT:
        raise RshashError(f"{manifest_path}: format {fmt!r}, not {FORMAT}")
    check_manifest(manifest_path, manifest)
    return manifest


LOCK_TIMEOUT_S = 60.0  # default longest wait for the writer lock
LOCK_POLL_S = 0.05  # how often a waiter tries the lock again
LOCK_NOTICE_S = 1.0  # a waiter says who holds the lock once it has waited this long
HOLDER_MAX = 4096  # bytes of holder information read from the lock file


class WriteLock:
    """An exclusive `flock` on INDEX/write.lock: writers take turns; a killed one lets go.

    The kernel's flock is the lock; the holder also writes its pid, command line and start time
    into the file so that a waiter can say who it waits for. A dead holder's flock is released
    by the kernel, so its stale information is only ever shown while a live writer holds the
    lock (at worst in the instant before that writer has replaced it).
    """

    def __init__(self, path: Path, timeout_s: float = LOCK_TIMEOUT_S) -> None:
        self.path = path / LOCK
        self.timeout_s = timeout_s
        self.fd: int | None = None

    @property
    def held(self) -> bool:
        return self.fd is not None

    def acquire(self) -> None:
        """Take the lock, polling until `timeout_s` has passed; then fail naming the holder."""
        if self.fd is not None:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        start, told = time.monotonic(), False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                waited = time.monotonic() - start
                if waited >= self.timeout_s:
                    os.close(fd)
                    raise RshashError(
                        f"{self.path}: {self.holder()}; gave up after {self.timeout_s:g} s"
                        " (--lock-timeout)"
                    ) from None
                if not told and waited >= LOCK_NOTICE_S:
                    print(f"{self.path}: waiting, {self.holder()}", file=sys.stderr, flush=True)
                    told = True
                time.sleep(min(LOCK_POLL_S, max(self.timeout_s - waited, 0)))
        self.fd = fd
        info = {"pid": os.getpid(), "command": shlex.join(sys.argv)[:1000], "since": time.time()}
        data = json.dumps(info).encode()
        os.pwrite(fd, data, 0)
        os.ftruncate(fd, len(data))

    def holder(self) -> str:
        """Who holds the lock, from what the holder wrote into the lock file."""
        try:
            with open(self.path, "rb") as f:
                info = json.loads(f.read(HOLDER_MAX))
            since = datetime.fromtimestamp(float(info["since"]), UTC)
            return (
                f"held by pid {int(info['pid'])} ({str(info['command'])[:200]})"
                f" since {since:%Y-%m-%d %H:%M:%S} UTC"
            )
        except (OSError, ValueError, TypeError, KeyError):  # being rewritten, or an old writer
            return "held by another writer"

    def release(self) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def files_named(manifest: dict[str, Any]) -> set[str]:
    """The segment and engine-state files a manifest names."""
    cols = manifest["collections"].values()
    return {s["file"] for info in cols for s in info["segments"]} | {
        info["state"] for info in cols if info.get("state")
    }
