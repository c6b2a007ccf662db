"""A sharded index on disk: its shards, the cluster manifest that names their generations, and
the writer that changes them.

Layout of SHARDED/: `shards.json` (the cluster manifest) and one index directory per shard.
`shards.json` (`rshash-shards/2`) holds the cluster generation and, per shard, the manifest of
the shard generation that belongs to it. A change (add, remove) takes the cluster's writer lock,
commits each shard it touches as that shard's next generation (atomically, as any index), and
then replaces `shards.json` (temporary file, fsync, rename) naming the new shard generations:
readers load the shard generations `shards.json` names, so they see the archive before or
after the change, never half of it. While a change runs, each shard keeps the files of the
generation `shards.json` names (no auto-compaction, no sweep of them). A writer killed before
the flip leaves `shards.json` valid; the next writer rolls each shard back to the generation
`shards.json` names (its manifest is restored, then the shard's own recovery deletes the rows
and files past it). A compaction holds the same items, so one killed after compacting a shard is
completed instead (the compacted shard generation is recorded). Writers need the shard
directories (shared storage); readers get snapshots of them (`snapshot`) through Ray.

`add` sends each change to the shard with the fewest images: one add touches one shard (one
shard commit, one shard reloaded by the readers, captions beside their images, so removing an
image removes its captions in the same shard), and the shards stay balanced as the archive grows.
Keys stay global: new items get keys after the largest key of any shard.
"""

from __future__ import annotations

import json
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from rshash.errors import RshashError
from rshash.fileio import write_json_atomic
from rshash.index import store
from rshash.index.index import Index
from rshash.index.store import MANIFEST, RECORDS, coll_code, in_collection, live_sql

SHARDS = "shards.json"
FORMAT = "rshash-shards/2"
OLD_FORMATS = ("rshash-shards/1",)
SNAPSHOT_TRIES = 5  # a snapshot is retried when a writer deletes files under it
MAX_SHARDS_JSON = 64 * 1024 * 1024


def read_cluster(path: Path) -> dict[str, Any]:
    """`shards.json`, checked, with every shard's committed manifest (older formats: the shard's
    own manifest, generation 0)."""
    file = path / SHARDS
    if not file.is_file():
        raise RshashError(f"{path}: not a sharded index (no {SHARDS})")
    if file.stat().st_size > MAX_SHARDS_JSON:
        raise RshashError(f"{file}: over {MAX_SHARDS_JSON >> 20} MiB; not a cluster manifest")
    try:
        data = json.loads(file.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RshashError(f"{file}: not readable JSON ({exc})") from None
    fmt = data.get("format") if isinstance(data, dict) else None
    if fmt not in (FORMAT, *OLD_FORMATS):
        raise RshashError(f"{file}: expected format {FORMAT}, got {fmt!r}")
    names = data.get("shards")
    if not isinstance(names, list) or not names or not all(_shard_name(n) for n in names):
        raise RshashError(f"{file}: 'shards' must list shard folder names")
    if fmt in OLD_FORMATS:
        committed = {n: store.read_manifest(path / n) for n in names}
        return {"format": FORMAT, "generation": 0, "shards": names, "committed": committed}
    committed = data.get("committed")
    if not isinstance(committed, dict) or set(committed) != set(names):
        raise RshashError(f"{file}: 'committed' must hold a manifest for every shard")
    if not isinstance(data.get("generation"), int):
        raise RshashError(f"{file}: 'generation' must be an integer")
    return data


def _shard_name(name: Any) -> bool:
    return isinstance(name, str) and name == Path(name).name and name not in ("", ".", "..")


def write_cluster(path: Path, names: list[str], committed: dict[str, Any], generation: int) -> None:
    """Replace `shards.json` atomically (the flip that publishes a change)."""
    manifest = {
        "format": FORMAT,
        "generation": generation,
        "shards": names,
        "committed": committed,
        "updated": time.time(),
    }
    write_json_atomic(path / SHARDS, manifest)


def count_of(manifests: list[dict[str, Any]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for m in manifests:
        for name, info in m["collections"].items():
            total[name] = total.get(name, 0) + int(info["count"])
    return total


def snapshot(path: Path, committed: dict[str, Any]) -> dict[str, bytes]:
    """The files of shard `path` at its committed generation, by relative path: the manifest
    of `committed` (or a compaction's newer one: same items), a consistent copy of the records
    (SQLite's backup), and the segment and engine files it names: what a replica needs to search
    codes and resolve filters (no model: queries are encoded where they arrive)."""
    for attempt in range(SNAPSHOT_TRIES):
        try:
            return _snapshot(path, committed)
        except (FileNotFoundError, _Moved):
            if attempt == SNAPSHOT_TRIES - 1:
                raise RshashError(f"{path}: kept changing while being read; try again") from None
    raise AssertionError("unreachable")


class _Moved(Exception):
    """The shard was compacted while its snapshot was taken."""


def _snapshot(path: Path, committed: dict[str, Any]) -> dict[str, bytes]:
    before = store.read_manifest(path)
    manifest = before if before["compacted"] > committed.get("compacted", 0) else committed
    files = {MANIFEST: json.dumps(manifest).encode(), RECORDS: _records_copy(path)}
    for name in sorted(store.files_named(manifest)):
        files[name] = (path / name).read_bytes()
    if store.read_manifest(path)["compacted"] != before["compacted"]:
        raise _Moved
    return files


def _records_copy(path: Path) -> bytes:
    """records.db as one self-contained file, copied in one SQLite read transaction."""
    src = store.connect(path, write=False)
    with tempfile.TemporaryDirectory(prefix="rshash-records-") as tmp:
        dst = sqlite3.connect(Path(tmp) / RECORDS)
        try:
            src.backup(dst)
            dst.execute("PRAGMA journal_mode=DELETE")
        finally:
            dst.close()
            src.close()
        return (Path(tmp) / RECORDS).read_bytes()


def live_ids(path: Path, collection: str, ids: list[str], generation: int) -> list[str]:
    """Which of `ids` are live items of `collection` in shard `path` at `generation`."""
    db = store.connect(path, write=False)
    found: list[str] = []
    try:
        for part in store.chunks(ids):
            marks = ", ".join("?" * len(part))
            rows = db.execute(
                f"SELECT id FROM items WHERE id IN ({marks}) AND"
                f" {in_collection(coll_code(collection))} AND {live_sql(generation)}",
                part,
            )
            found.extend(r[0] for r in rows)
    finally:
        db.close()
    return found


class ShardWriter:
    """Changes to a sharded index: one change at a time under the cluster's writer lock, each
    shard committed, then `shards.json` flipped (see the module)."""

    def __init__(self, path: Path, lock_timeout_s: float = store.LOCK_TIMEOUT_S) -> None:
        self.path = path
        self.lock_timeout_s = lock_timeout_s
        self._lock = store.WriteLock(path, lock_timeout_s)
        self.cluster = read_cluster(path)
        self._open: dict[str, Index] = {}  # shards with pending changes
        self._target: str | None = None  # the shard this change adds to
        self._first: set[str] = set()  # collections added to in this change

    @property
    def names(self) -> list[str]:
        return list(self.cluster["shards"])

    def _begin(self) -> None:
        if self._lock.held:
            return
        self._lock.acquire()
        try:
            self.cluster = read_cluster(self.path)
            self._recover()
        except BaseException:
            self._lock.release()
            raise

    def _recover(self) -> None:
        """Bring every shard back to the generation `shards.json` names (see the module)."""
        committed = dict(self.cluster["committed"])
        adopted = False
        for name in self.names:
            shard, want = self.path / name, committed[name]
            have = store.read_manifest(shard)
            if have["generation"] == want["generation"]:
                continue
            if have["compacted"] > want.get("compacted", 0):
                committed[name] = have  # a compaction, killed before the flip: complete it
                adopted = True
                continue
            write_json_atomic(shard / MANIFEST, want)
            idx = self._shard(name, want)
            idx.recover()
            idx.close()
        if adopted:
            self._flip(committed)

    def _shard(self, name: str, committed: dict[str, Any]) -> Index:
        idx = Index.open(
            self.path / name, device="cpu", lock_timeout_s=self.lock_timeout_s, verify=False
        )
        idx.auto_compact = False
        idx.keep_files_of = committed
        return idx

    def _writer(self, name: str) -> Index:
        self._begin()
        if name not in self._open:
            self._open[name] = self._shard(name, self.cluster["committed"][name])
        return self._open[name]

    def _flip(self, committed: dict[str, Any]) -> None:
        generation = int(self.cluster["generation"]) + 1
        write_cluster(self.path, self.names, committed, generation)
        self.cluster = read_cluster(self.path)

    def check_new_ids(self, collection: str, items: list[dict[str, Any]]) -> None:
        ids = [str(it["id"]) for it in items]
        if len(set(ids)) != len(ids):
            twice = next(i for i in ids if ids.count(i) > 1)
            raise RshashError(f"{collection}: item id {twice!r} appears twice")
        for name in self.names:
            gen = int(self.cluster["committed"][name]["generation"])
            found = live_ids(self.path / name, collection, ids, gen)
            if found:
                raise RshashError(f"{collection}: item id {found[0]!r} is already in the index")

    def add(self, collection: str, codes: np.ndarray, items: list[dict[str, Any]]) -> np.ndarray:
        """Add to this change's shard (the one with the fewest images), keys after every
        shard's. A refused add drops the whole change, as `Index.add` does."""
        self._begin()
        try:
            return self._add(collection, codes, items)
        except BaseException:
            self.close()
            raise

    def _add(self, collection: str, codes: np.ndarray, items: list[dict[str, Any]]) -> np.ndarray:
        if self._target is None:
            self.check_new_ids(collection, items)
            counts = {
                n: int(m["collections"].get("images", {}).get("count", 0))
                for n, m in self.cluster["committed"].items()
            }
            self._target = min(self.names, key=lambda n: (counts[n], n))
        elif collection not in self._first:
            self.check_new_ids(collection, items)
        first = None
        if collection not in self._first:
            first = max(
                int(m["collections"].get(collection, {}).get("next_key", 0))
                for m in self.cluster["committed"].values()
            )
            self._first.add(collection)
        return self._writer(self._target).add(collection, codes, items, first_key=first)

    def remove(self, ids: list[str]) -> int:
        """Remove from the shards that hold the ids; images removed."""
        self._begin()
        wanted = [str(i) for i in ids]
        removed = 0
        try:
            for name in self.names:
                gen = int(self.cluster["committed"][name]["generation"])
                shard = self.path / name
                held = live_ids(shard, "images", wanted, gen) or live_ids(
                    shard, "captions", wanted, gen
                )
                if held:
                    removed += self._writer(name).remove(wanted)
        except BaseException:
            self.close()
            raise
        return removed

    def commit(self, source: dict[str, Any] | None = None) -> None:
        """Commit every shard changed, then flip `shards.json` to their new generations."""
        self._begin()
        try:
            committed = dict(self.cluster["committed"])
            for name, idx in self._open.items():
                idx.commit(source)
                committed[name] = idx.manifest
            if self._open:
                self._flip(committed)
        finally:
            self.close()

    def compact(self) -> dict[str, int]:
        """Compact each shard and record it at once (a compaction changes no items, so every
        cluster generation on the way holds the same archive)."""
        self._begin()
        dropped: dict[str, int] = {}
        try:
            for name in self.names:
                idx = self._writer(name)
                for col, n in idx.compact().items():
                    dropped[col] = dropped.get(col, 0) + n
                self._flip({**self.cluster["committed"], name: idx.manifest})
        finally:
            self.close()
        return dropped

    def repair(self) -> None:
        """Roll back now what a killed change left in the shards (as the next change would)."""
        self._begin()
        self.close()

    def close(self) -> None:
        """Drop uncommitted changes, release the locks."""
        for idx in self._open.values():
            idx.close()
        self._open.clear()
        self._target = None
        self._first.clear()
        self._lock.release()


def check_cluster(path: Path) -> dict[str, dict[str, int]]:
    """Counts per collection over every shard, each shard checked as an index; RshashError
    naming the first problem. `items` counts what `shards.json` names; a shard ahead of it (a
    writer killed before the flip, rolled back by the next writer) is counted in
    `shards_ahead`, not an error."""
    from rshash.index.maintenance import check_index

    cluster = read_cluster(path)
    total: dict[str, dict[str, int]] = {}
    ahead = 0
    for name in cluster["shards"]:
        want = cluster["committed"][name]
        missing = [f for f in sorted(store.files_named(want)) if not (path / name / f).is_file()]
        if missing:
            raise RshashError(f"{path / name / missing[0]}: missing (named by {SHARDS})")
        ahead += store.read_manifest(path / name)["generation"] != want["generation"]
        for col, counts in check_index(path / name).items():
            into = total.setdefault(col, {})
            for k, v in counts.items():
                into[k] = into.get(k, 0) + v
    committed = count_of(list(cluster["committed"].values()))
    for col, counts in total.items():
        counts.update(items=committed.get(col, 0), shards_ahead=ahead)
    return total
