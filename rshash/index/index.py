"""An index directory (`rshash-index/2`): code segments, item records, the model that made them.

Layout of INDEX/ (see `store` for the file formats):

- `index.json`: manifest (format, bits, engine, model fingerprint, generation, per collection its
  segments, live count, tombstones and next key);
- `model/`: a copy of the run (`model.safetensors`, `model.json`, `config.json`, `split.json`),
  so queries are always encoded by the model that encoded the archive;
- `records.db`: every item's record (SQLite), with the generations that added and removed it;
- `seg-<collection>-<generation>.bin`: the codes each commit added (append-only);
- `engine-<collection>-<generation>.bin`: engine state (faiss-ivf's trained index, mih's tables).

A change (add, remove) takes the writer lock, writes the new codes to the next generation's
segment and the records into one SQLite transaction, then `commit()` syncs the segment, commits
the transaction and atomically replaces `index.json`, syncing files and directory so that a
committed generation survives a power loss. A writer waits for the lock at most `lock_timeout_s`
(default 60 s), then fails naming the holder. Readers load the manifest's generation
only (rows added later are invisible to them, rows removed later still visible), so they see the
old or the new state, never a mix; `refresh()` moves them to the newest. A writer that dies
leaves rows and files of a generation no manifest names, and temporary files: the next writer
deletes them first.
Removed items stay in their segments as tombstones (a mask during search) until `compact()`.
"""

from __future__ import annotations

import shutil
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rshash.errors import RshashError
from rshash.features.backends import AUTO, check_encoded_with, resolve_backend
from rshash.fileio import fsync_dir, fsync_file, write_bytes_durable, write_json_atomic
from rshash.index import integrity, store
from rshash.index.base import (
    Allowed,
    Hit,
    Queries,
    StaleFilter,
    check_query,
)
from rshash.index.encoder import CodeEncoder
from rshash.index.engines import Engine, Hits, make_engine
from rshash.index.filters import check_bbox
from rshash.index.packing import code_bytes, pad_packed
from rshash.index.records import Records
from rshash.index.store import (
    COLLECTIONS,
    FORMAT,
    MANIFEST,
)
from rshash.models.model_file import MODEL, MODEL_FILES, model_fingerprint
from rshash.models.run import HashRun
from rshash.reproducibility import provenance, resolve_device

COMPACT_FRACTION = 0.25  # compact once tombstones exceed this share of a collection's codes
MAX_SEGMENTS = 64  # ... or once a collection has more segments than this
FILTER_CACHE = 16  # filters whose matching keys are kept, per index
OPEN_TRIES = 5  # a reader retries when compaction deletes segments under it


class Collection:
    """The items of one kind (images or captions) at one generation: an engine over codes."""

    def __init__(self, name: str, engine: Engine, report: dict[str, Any] | None = None) -> None:
        self.name = name
        self.engine = engine
        self.report = report or {}

    def __len__(self) -> int:
        return self.engine.ntotal

    @property
    def codes(self) -> np.ndarray:
        """Packed codes of the live items, in key order."""
        return self.engine.live()[0]

    @property
    def keys(self) -> np.ndarray:
        return self.engine.live()[1]


@dataclass
class _State:
    """What readers see: one generation's manifest and collections."""

    manifest: dict[str, Any]
    collections: dict[str, Collection] = field(default_factory=dict)


class _Superseded(Exception):
    """A newer manifest replaced the one being loaded (its tombstones may be gone)."""


@dataclass
class _Pending:
    """A writer's uncommitted changes: next generation, open segments, next keys."""

    gen: int
    next_key: dict[str, int]
    segments: dict[str, store.SegmentWriter] = field(default_factory=dict)
    removed: bool = False
    reserved: bool = False
    fields: dict[str, set[str]] = field(default_factory=dict)  # record fields added, per collection


def encoded_with(manifest: dict[str, Any]) -> str:
    """The backend an index's codes were encoded with (indexes before backends: torch)."""
    return str(manifest["model"].get("backend", "torch"))


class Index(Queries):
    """A searchable archive. `Index.open(path).search_text("a river", k=20)`."""

    def __init__(
        self,
        path: Path,
        manifest: dict[str, Any],
        run: HashRun | None,
        device: str = "auto",
        lock_timeout_s: float = store.LOCK_TIMEOUT_S,
        backend: str = AUTO,
    ) -> None:
        self.path = path
        self._run = run
        self._encoder: CodeEncoder | None = None
        self._device = device
        self._backend = resolve_backend(backend, resolve_device(device))  # a bad name fails here
        check_encoded_with(encoded_with(manifest), str(path))
        self._state = _State(manifest)
        self._lock = store.WriteLock(path, lock_timeout_s)
        self._local = threading.local()
        self._pending: _Pending | None = None
        self._filters: OrderedDict[tuple[Any, ...], np.ndarray] = OrderedDict()
        self._filters_lock = threading.Lock()
        self.records = Records(self._db, str(path))
        self._fields: dict[tuple[int, str], frozenset[str]] = {}
        # Fields other shards of a sharded index hold: valid here too, matching nothing.
        self.shared_fields: dict[str, frozenset[str]] = {}
        # A shard written by a sharded index: compaction only when the cluster asks for it, and
        # the files of the generation the cluster manifest names stay until it names another.
        self.auto_compact = True
        self.keep_files_of: dict[str, Any] | None = None

    # --- what readers see -----------------------------------------------------------------

    @property
    def run(self) -> HashRun:
        """The model that encoded the archive (opened with `model=False`: loaded at first use;
        searching codes and reading or changing records need none of it)."""
        if self._run is None:
            self._run = integrity.load_model(self.path)
        return self._run

    @property
    def encoder(self) -> CodeEncoder:
        if self._encoder is None:
            self._encoder = CodeEncoder(self.run, self._device, self._backend)
        return self._encoder

    @property
    def manifest(self) -> dict[str, Any]:
        return self._state.manifest

    @property
    def collections(self) -> dict[str, Collection]:
        return self._state.collections

    @property
    def generation(self) -> int:
        return int(self._state.manifest["generation"])

    @property
    def bits(self) -> int:
        return int(self.manifest["bits"])

    @property
    def fingerprint(self) -> str:
        return str(self.manifest["model"]["fingerprint"])

    def _db(self) -> sqlite3.Connection:
        """This thread's connection to the records (SQLite connections are not shared)."""
        db = getattr(self._local, "db", None)
        if db is None or (self._lock.held and not self._local.write):
            if db is not None:
                db.close()  # a reader's, read-only: this index now writes
            db = self._local.db = store.connect(self.path, write=self._lock.held)
            self._local.write = self._lock.held
        return db

    # --- creating and opening -------------------------------------------------------------

    @classmethod
    def create(
        cls,
        path: str | Path,
        run_dir: str | Path,
        engine: str = "exact",
        engine_params: dict[str, Any] | None = None,
        device: str = "auto",
        lock_timeout_s: float = store.LOCK_TIMEOUT_S,
        backend: str = AUTO,
    ) -> Index:
        """A new, empty index for `run_dir`'s model; holds the writer lock until `commit()`.

        Waits at most `lock_timeout_s` for another writer's lock (RshashError naming it).
        """
        path, run_dir = Path(path), Path(run_dir)
        if (path / MANIFEST).exists():
            raise RshashError(f"{path}: an index already exists here (use `rshash index add`)")
        run = HashRun.open(run_dir)
        make_engine(engine, run.bits, engine_params)  # validate the name and parameters now
        manifest = {
            "format": FORMAT,
            "generation": 0,
            "compacted": 0,
            "bits": run.bits,
            "code_bytes": code_bytes(run.bits),
            "engine": {"name": engine, "params": engine_params or {}},
            "model": {
                "fingerprint": model_fingerprint(run_dir),
                "source_run": str(run_dir.resolve()),
                "method": run.config.method,
                "image_encoder": run.info["image_encoder"],
                "text_encoder": run.info["text_encoder"],
                "backend": resolve_backend(backend, resolve_device(device)),
            },
            "collections": {},
            "sources": [],
        }
        path.mkdir(parents=True, exist_ok=True)
        index = cls(path, manifest, run, device, lock_timeout_s, backend)
        index._lock.acquire()
        if (path / MANIFEST).exists():
            index._lock.release()
            raise RshashError(f"{path}: an index already exists here (use `rshash index add`)")
        for stale in [*path.glob(f"{store.RECORDS}*"), *path.glob("seg-*"), *path.glob("engine-*")]:
            stale.unlink()  # left by a create that died before its first commit
        index._sweep_temp()
        store.init_db(index._db())
        model_dir = path / "model"
        if not (model_dir / MODEL).exists():
            tmp = path / ".model.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            for name in (*MODEL_FILES, "config.json", "split.json"):
                shutil.copy2(run_dir / name, tmp / name)
                fsync_file(tmp / name)
            fsync_dir(tmp)
            shutil.rmtree(model_dir, ignore_errors=True)
            tmp.rename(model_dir)  # made durable by the first commit's directory sync
        index._run = HashRun.open(model_dir)
        return index

    @classmethod
    def open(
        cls,
        path: str | Path,
        expect_model: str | Path | None = None,
        device: str = "auto",
        lock_timeout_s: float = store.LOCK_TIMEOUT_S,
        verify: bool | None = None,
        backend: str = AUTO,
        model: bool = True,
    ) -> Index:
        """Open an index; with `expect_model` (a run directory), refuse one built by another.

        With `model=False` the model is neither checked nor loaded until a query needs it
        (a shard replica that searches codes only gets no copy of the weights).

        A change waits at most `lock_timeout_s` for another writer's lock. Missing or damaged
        files fail here, in one line (see `integrity`); `verify` also checks every segment's
        checksum and key order (one more read of the codes); by default only indexes of up to
        `integrity.VERIFY_UP_TO` codes, where it is cheap.
        """
        path = Path(path)
        manifest = integrity.open_manifest(path, verify, model)
        if expect_model is not None:
            other = model_fingerprint(Path(expect_model))
            if other != manifest["model"]["fingerprint"]:
                raise RshashError(
                    f"{path}: index was built with the model of {manifest['model']['source_run']}"
                    f", not with {expect_model}; rebuild it or use that model"
                )
        run = integrity.load_model(path) if model else None
        index = cls(path, manifest, run, device, lock_timeout_s, backend)
        index._state = index._load_newest(manifest)
        return index

    def _engine(self) -> Engine:
        spec = self.manifest["engine"]
        return make_engine(spec["name"], self.bits, spec["params"])

    def _load_newest(self, manifest: dict[str, Any]) -> _State:
        """The state of `manifest`, or of a newer one if compaction removed its files."""
        for _ in range(OPEN_TRIES):
            try:
                return self._load(manifest)
            except (FileNotFoundError, _Superseded):
                manifest = store.read_manifest(self.path)
        return self._load(manifest)

    def _load(self, manifest: dict[str, Any]) -> _State:
        """Codes of every segment of `manifest`'s generation, less its tombstones.

        The tombstones are read in a SQLite snapshot pinned while `manifest` was still the
        newest: compaction replaces the manifest before it deletes the rows it dropped, so that
        snapshot still holds them (read later, removed codes would come back).
        """
        db = self._db()
        db.execute("BEGIN")
        try:
            db.execute("SELECT count(*) FROM items WHERE rid = -1").fetchone()  # pins a snapshot
            if store.read_manifest(self.path)["generation"] != manifest["generation"]:
                raise _Superseded
            return self._load_pinned(manifest)
        finally:
            db.execute("COMMIT")

    def _load_pinned(self, manifest: dict[str, Any]) -> _State:
        state = _State(manifest)
        width = code_bytes(manifest["bits"])
        for name, info in manifest["collections"].items():
            total = sum(s["count"] for s in info["segments"])
            packed = np.empty((total, width), np.uint8)
            keys = np.empty(total, np.int64)
            at = 0
            for seg in info["segments"]:
                rows = store.read_segment(self.path / seg["file"], width, seg["count"])
                packed[at : at + len(rows)] = rows["code"]
                keys[at : at + len(rows)] = rows["key"]
                at += len(rows)
                del rows
            engine = self._engine()
            blob = info.get("state")
            try:
                engine.restore((self.path / blob).read_bytes() if blob else None, packed, keys)
            except RshashError as exc:
                raise RshashError(f"{self.path / str(blob)}: {exc}") from None
            del packed
            engine.remove(self._tombstones(name, manifest))
            state.collections[name] = Collection(name, engine, info.get("report", {}))
        return state

    def _tombstones(self, collection: str, manifest: dict[str, Any]) -> np.ndarray:
        """Keys removed after the last compaction and up to the manifest's generation."""
        compacted = manifest.get("compacted", 0)
        return self.records.tombstones(collection, compacted, manifest["generation"])

    def refresh(self) -> bool:
        """Switch to the newest committed generation if another process made one.

        Searches already running finish on the state they started with.
        """
        if self._pending is not None:
            return False
        manifest = store.read_manifest(self.path)
        if manifest["generation"] == self.generation:
            return False
        self._state = self._load_newest(manifest)
        self._filters.clear()
        return True

    def close(self) -> None:
        """Drop uncommitted changes, release the writer lock, close this thread's connection."""
        if self._pending is not None:
            self._abort()
        self._lock.release()
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None

    # --- changing --------------------------------------------------------------------------

    def _begin(self) -> _Pending:
        """Take the writer lock, catch up with the newest generation, start a transaction."""
        if self._pending is not None:
            return self._pending
        self._lock.acquire()
        if (self.path / MANIFEST).exists():
            newest = store.read_manifest(self.path)
            if newest["generation"] != self.generation:
                self._state = self._load(newest)
                self._filters.clear()
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        self._recover(db)
        info = self.manifest["collections"]
        self._pending = _Pending(
            gen=self.generation + 1,
            next_key={c: info[c]["next_key"] if c in info else 0 for c in COLLECTIONS},
        )
        return self._pending

    def _recover(self, db: sqlite3.Connection) -> None:
        """Undo what a writer that died left past the manifest; drop compacted rows."""
        store.roll_back_past(db, self.manifest)
        self._drop_compacted(db)
        self._sweep(self.manifest)

    def _drop_compacted(self, db: sqlite3.Connection) -> None:
        store.drop_compacted(db, self.manifest.get("compacted", 0))

    def _sweep(self, manifest: dict[str, Any]) -> None:
        """Delete segment and engine files that `manifest` does not name, and temporary files.

        Called with the writer lock held, so no live writer's file goes.
        """
        keep = {s["file"] for info in manifest["collections"].values() for s in info["segments"]}
        keep |= {info["state"] for info in manifest["collections"].values() if info.get("state")}
        if self.keep_files_of is not None:
            keep |= store.files_named(self.keep_files_of)
        for f in [*self.path.glob("seg-*"), *self.path.glob("engine-*")]:
            if f.name not in keep:
                f.unlink(missing_ok=True)
        self._sweep_temp()

    def _sweep_temp(self) -> None:
        """Delete what a killed writer left of atomic writes (`.NAME.XXXX.tmp`, `.model.tmp`)."""
        for f in self.path.glob(".*.tmp"):
            if f.is_dir():
                shutil.rmtree(f, ignore_errors=True)
            else:
                f.unlink(missing_ok=True)

    def _abort(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            for seg in pending.segments.values():
                seg.discard()
            db = self._db()
            if db.in_transaction:
                db.execute("ROLLBACK")
        self._lock.release()

    def add(
        self,
        collection: str,
        codes: np.ndarray,
        items: list[dict[str, Any]],
        first_key: int | None = None,
    ) -> np.ndarray:
        """Add packed codes with their records (each with a unique "id"); returns their keys.

        Keys count up from `first_key` (default: after the last key); shards of one archive use
        it to keep keys global, which is also the order ties are broken in. The items become
        searchable at `commit()`.
        """
        pending = self._begin()
        start = pending.next_key.get(collection, 0)
        if first_key is not None and first_key < start:
            raise RshashError(f"{collection}: first key {first_key} is below {start}")
        start = start if first_key is None else first_key
        keys = np.arange(start, start + len(items), dtype=np.int64)
        self.add_keyed(collection, codes, items, keys)
        return keys

    def add_keyed(
        self, collection: str, codes: np.ndarray, items: list[dict[str, Any]], keys: np.ndarray
    ) -> None:
        """Add items under the given increasing keys (all from the next key on)."""
        if collection not in COLLECTIONS:
            raise RshashError(f"unknown collection {collection!r}; expected one of {COLLECTIONS}")
        codes = pad_packed(codes, self.bits)
        keys = np.asarray(keys, np.int64)
        if not len(codes) == len(items) == len(keys):
            raise RshashError(f"{len(codes)} codes but {len(items)} item records")
        pending = self._begin()
        if len(keys) and (keys[0] < pending.next_key[collection] or (np.diff(keys) <= 0).any()):
            raise RshashError(
                f"{collection}: keys must increase from {pending.next_key[collection]}"
            )
        try:
            self._check_new_ids(collection, items)
            seg = pending.segments.get(collection)
            if seg is None:
                seg = pending.segments[collection] = store.SegmentWriter(
                    self.path / store.segment_name(collection, pending.gen), codes.shape[1]
                )
            seg.write(keys, codes)
            self._insert(collection, keys, items, pending.gen)
        except BaseException:
            self._abort()
            raise
        if len(keys):
            pending.next_key[collection] = int(keys[-1]) + 1

    def reserve_keys(self, collection: str, next_key: int) -> None:
        """Start the collection's next keys at `next_key` (at least); kept by the next commit."""
        pending = self._begin()
        pending.next_key[collection] = max(pending.next_key[collection], next_key)
        pending.reserved = True

    def check_new_ids(self, collection: str, items: list[dict[str, Any]]) -> None:
        """RshashError if an item's id is given twice or is live in the index already."""
        self._check_new_ids(collection, items)

    def _check_new_ids(self, collection: str, items: list[dict[str, Any]]) -> None:
        self.records.check_new_ids(collection, items)

    def _insert(
        self, collection: str, keys: np.ndarray, items: list[dict[str, Any]], gen: int
    ) -> None:
        if self._pending is not None:
            added = self._pending.fields.setdefault(collection, set())
            added.update(name for it in items for name in it if name != "captions")
        self.records.insert(collection, keys, items, gen)

    def remove(self, ids: Iterable[str]) -> int:
        """Remove images (and their captions) or single captions by id; returns images removed."""
        wanted = [str(i) for i in ids]
        pending = self._begin()
        try:
            removed = self.records.mark_removed(wanted, pending.gen)
        except BaseException:
            self._abort()
            raise
        pending.removed = True
        return removed

    def commit(self, source: dict[str, Any] | None = None) -> None:
        """Make the pending changes the next generation: segments, records, then manifest."""
        pending = self._begin()
        manifest = {**self.manifest, "collections": dict(self.manifest["collections"])}
        manifest["sources"] = [*self.manifest["sources"], *([source] if source else [])]
        db = self._db()
        try:
            for name in COLLECTIONS:
                seg = pending.segments.get(name)
                removed = self.records.removed_in(name, pending.gen) if pending.removed else None
                if seg is None and (removed is None or not len(removed)) and not pending.reserved:
                    continue
                info = dict(manifest["collections"].get(name) or self._new_info())
                col = self.collections.get(name) or Collection(name, self._engine())
                if seg is not None:
                    seg.close()
                    rows = store.read_segment(seg.path, code_bytes(self.bits), seg.count)
                    if col.engine.ntotal == 0 and not info["segments"]:
                        col.report = info["report"] = col.engine.build(rows["code"], rows["key"])
                    else:
                        col.engine.add(rows["code"], rows["key"])
                    del rows
                    info["segments"] = [
                        *info["segments"],
                        {"file": seg.path.name, "count": seg.count, "crc32": seg.crc32},
                    ]
                info["next_key"] = pending.next_key[name]
                if removed is not None:
                    info["tombstones"] += col.engine.remove(removed)
                info["count"] = col.engine.ntotal
                state = col.engine.state()
                info.pop("state", None)  # auto: no tables below its size
                if state is not None:
                    info["state"] = f"engine-{name}-{pending.gen:08d}.bin"
                    write_bytes_durable(self.path / info["state"], state)
                manifest["collections"][name] = info
                self.collections[name] = col
            manifest["fields"] = self._fields_after(pending)
            manifest.update(generation=pending.gen, updated=time.time(), provenance=provenance())
            fsync_dir(self.path)  # the new segment and engine files' names
            db.execute("COMMIT")
            write_json_atomic(self.path / MANIFEST, manifest)
        except BaseException:
            self._pending = None
            for seg in pending.segments.values():
                seg.discard()
            if db.in_transaction:
                db.execute("ROLLBACK")
            old = self.manifest
            self._state = self._load(old) if self.generation else _State(old)
            self._lock.release()
            raise
        self._state = _State(manifest, self._state.collections)
        self._filters.clear()
        self._pending = None
        self._sweep(manifest)
        self._lock.release()
        if self.auto_compact and self._needs_compaction():
            self.compact()

    def _fields_after(self, pending: _Pending) -> dict[str, list[str]]:
        """Per collection, the record fields of every item added up to `pending` (manifest)."""
        out = {}
        for name in COLLECTIONS:
            known = self._own_fields(self.manifest, name) | pending.fields.get(name, set())
            if known:
                out[name] = sorted(known)
        return out

    def _new_info(self) -> dict[str, Any]:
        return {"count": 0, "next_key": 0, "segments": [], "tombstones": 0, "report": {}}

    def _needs_compaction(self) -> bool:
        for info in self.manifest["collections"].values():
            held = info["count"] + info["tombstones"]
            if info["tombstones"] > COMPACT_FRACTION * max(held, 1):
                return True
            if len(info["segments"]) > MAX_SEGMENTS:
                return True
        return False

    def compact(self) -> dict[str, int]:
        """Merge every collection's segments into one and drop tombstones (a new generation).

        Returns the tombstones dropped per collection.
        """
        if self._pending is not None and (self._pending.segments or self._pending.removed):
            raise RshashError(f"{self.path}: commit pending changes before compacting")
        pending = self._begin()
        gen, db = pending.gen, self._db()
        manifest = {**self.manifest, "collections": {}}
        dropped, collections = {}, {}
        written: list[Path] = []
        try:
            db.execute("COMMIT")  # the recovery done by _begin
            for name, info in self.manifest["collections"].items():
                col = self.collections[name]
                packed, keys = col.engine.live()
                seg = store.SegmentWriter(
                    self.path / store.segment_name(name, gen), packed.shape[1]
                )
                written.append(seg.path)
                seg.write(keys, packed)
                seg.close()
                engine = col.engine.compacted(packed, keys)
                state = engine.state()
                new = {
                    **{k: v for k, v in info.items() if k != "state"},
                    "segments": [{"file": seg.path.name, "count": seg.count, "crc32": seg.crc32}],
                    "tombstones": 0,
                    "count": engine.ntotal,
                }
                if state is not None:
                    new["state"] = f"engine-{name}-{gen:08d}.bin"
                    written.append(self.path / new["state"])
                    write_bytes_durable(self.path / new["state"], state)
                dropped[name] = int(info["tombstones"])
                manifest["collections"][name] = new
                collections[name] = Collection(name, engine, col.report)
            manifest.update(generation=gen, compacted=self.generation, updated=time.time())
            fsync_dir(self.path)
            write_json_atomic(self.path / MANIFEST, manifest)
        except BaseException:
            self._pending = None
            for f in written:
                f.unlink(missing_ok=True)
            self._lock.release()
            raise
        self._state = _State(manifest, collections)
        self._filters.clear()
        self._pending = None
        db.execute("BEGIN IMMEDIATE")
        self._drop_compacted(db)
        db.execute("COMMIT")
        self._sweep(manifest)
        self._lock.release()
        return dropped

    # --- searching -------------------------------------------------------------------------

    def _collection(self, state: _State, name: str) -> Collection:
        col = state.collections.get(name)
        if col is None or len(col) == 0:
            have = ", ".join(n for n, c in state.collections.items() if len(c)) or "none"
            raise RshashError(f"{self.path}: index holds no {name} (collections: {have})")
        return col

    def fields(self, collection: str = "images") -> frozenset[str]:
        """The top-level record fields a `where` filter on `collection` may name."""
        return self._known_fields(self._state.manifest, collection)

    def _known_fields(self, manifest: dict[str, Any], collection: str) -> frozenset[str]:
        own = self._own_fields(manifest, collection)
        return own | self.shared_fields.get(collection, frozenset())

    def _own_fields(self, manifest: dict[str, Any], collection: str) -> frozenset[str]:
        """The manifest's field list; for an index written before it had one, read once from
        the records (every row ever added, like the list) and kept in memory."""
        if collection not in manifest["collections"]:
            return frozenset()
        if "fields" in manifest:
            return frozenset(manifest["fields"].get(collection, ()))
        key = (int(manifest["generation"]), collection)
        known = self._fields.get(key)
        if known is None:
            known = self._fields[key] = self.records.fields(collection)
        return known

    def matching_keys(
        self,
        collection: str = "images",
        where: str | None = None,
        bbox: tuple[float, float, float, float] | None = None,
    ) -> np.ndarray:
        """Sorted keys of the live items that match `where` and `bbox` (cached per filter)."""
        return self._allowed(self._state, collection, where, bbox)

    def _allowed(
        self,
        state: _State,
        collection: str,
        where: str | None,
        bbox: tuple[float, float, float, float] | None,
    ) -> np.ndarray:
        box = check_bbox(bbox) if bbox is not None else None
        gen = int(state.manifest["generation"])
        cache_key = (gen, collection, where, box)
        with self._filters_lock:
            hit = self._filters.get(cache_key)
            if hit is not None:
                self._filters.move_to_end(cache_key)
                return hit
        known = frozenset() if where is None else self._known_fields(state.manifest, collection)
        keys = self.records.matching(collection, gen, where, box, known)
        with self._filters_lock:
            self._filters[cache_key] = keys
            while len(self._filters) > FILTER_CACHE:
                self._filters.popitem(last=False)
        return keys

    def search_codes(
        self,
        codes: np.ndarray,
        k: int = 20,
        collection: str = "images",
        radius: int | None = None,
        *,
        where: str | None = None,
        bbox: tuple[float, float, float, float] | None = None,
        allowed: Allowed | None = None,
    ) -> list[list[Hit]]:
        found = self.search_found(
            codes, k, collection, radius, where=where, bbox=bbox, allowed=allowed
        )
        return self.records.hits(collection, found)

    def search_found(
        self,
        codes: np.ndarray,
        k: int = 20,
        collection: str = "images",
        radius: int | None = None,
        *,
        where: str | None = None,
        bbox: tuple[float, float, float, float] | None = None,
        allowed: Allowed | None = None,
    ) -> list[Hits]:
        """`search_codes` without the records: each query's (distances, keys), nearest first."""
        check_query(k, radius, self.bits)
        if radius is None:
            d, keys = self.search_keys(
                codes, k, collection, where=where, bbox=bbox, allowed=allowed
            )
            return [(dr[kr >= 0], kr[kr >= 0]) for dr, kr in zip(d, keys, strict=True)]
        state = self._state
        col = self._collection(state, collection)
        keys_ok = self._keys_allowed(state, collection, where, bbox, allowed)
        return col.engine.range_search(pad_packed(codes, self.bits), radius, keys_ok)

    def resolve_filter(
        self, collection: str, where: str | None, bbox: tuple[float, float, float, float] | None
    ) -> Allowed:
        state = self._state
        keys = self._allowed(state, collection, where, bbox)
        return Allowed(collection, int(state.manifest["generation"]), keys)

    def _keys_allowed(
        self,
        state: _State,
        collection: str,
        where: str | None,
        bbox: tuple[float, float, float, float] | None,
        allowed: Allowed | None,
    ) -> np.ndarray | None:
        """The keys a search may return: `allowed`'s (resolved at this state's generation),
        the filter's, or None for all."""
        if allowed is not None:
            gen = int(state.manifest["generation"])
            if allowed.generation != gen:
                raise StaleFilter(
                    f"{self.path}: filter resolved at generation {allowed.generation}, "
                    f"the index is at {gen}"
                )
            if allowed.collection != collection:
                raise RshashError(f"filter resolved for {allowed.collection}, not {collection}")
            return allowed.keys
        if where is not None or bbox is not None:
            return self._allowed(state, collection, where, bbox)
        return None

    def search_keys(
        self,
        codes: np.ndarray,
        k: int = 20,
        collection: str = "images",
        *,
        where: str | None = None,
        bbox: tuple[float, float, float, float] | None = None,
        allowed: Allowed | None = None,
    ) -> Hits:
        """Top-k (distances, keys) per query without the records: (q, k) arrays, key -1 past
        the matching items."""
        check_query(k, None, self.bits)
        state = self._state
        col = self._collection(state, collection)
        keys = self._keys_allowed(state, collection, where, bbox, allowed)
        return col.engine.search(pad_packed(codes, self.bits), min(k, len(col)), keys)

    def item(self, item_id: str, collection: str = "images") -> dict[str, Any]:
        """The record of the live item with this id (an indexed lookup)."""
        return self.records.item(item_id, collection, self.generation)

    def items(self, collection: str = "images") -> list[dict[str, Any]]:
        """Every live record of a collection, in key order (for tests and small archives)."""
        return self.records.items(collection, self.generation)

    def __len__(self) -> int:
        return len(self.collections["images"]) if "images" in self.collections else 0

    def counts(self) -> dict[str, int]:
        return {name: len(col) for name, col in self.collections.items()}

    def sources(self) -> list[dict[str, Any]]:
        return list(self.manifest.get("sources", []))

    def check(self) -> dict[str, dict[str, int]]:
        from rshash.index.maintenance import check_index

        return check_index(self.path)

    def health(self) -> dict[str, Any]:
        """Nothing beyond the counts: a local index is up when the service is."""
        return {}

    def recover(self) -> None:
        """Undo now what a dead writer left past the manifest (rows, files), as the next change
        would; a sharded index's writer calls it on a shard it rolled back."""
        pending = self._begin()
        if pending.segments or pending.removed:
            raise RshashError(f"{self.path}: commit pending changes before recovering")
        self._pending = None
        self._db().execute("COMMIT")
        self._lock.release()
