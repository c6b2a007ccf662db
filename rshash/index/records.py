"""The item records of one index directory (`records.db`, see `store`): the SQL that reads,
filters, adds and removes them, and a cache of decoded records.

`Index` keeps its codes and generations and hands every record question here; a sharded
index's driver reads the records of its hits here too, from the shard directories, so shards
send back only keys and distances.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from rshash.errors import RshashError
from rshash.index import store
from rshash.index.base import Hit
from rshash.index.engines import Hits
from rshash.index.filters import compile_bbox, compile_where
from rshash.index.store import KEY, coll_code, in_collection, live_sql

# Decoded records kept per index: a committed key's record never changes (keys are never reused,
# compaction keeps them), and decoding 20 records' JSON was most of a search's CPU.
RECORD_CACHE = 65_536
FILTER_SECONDS = 10.0  # longest a filter's SQL query may run before it is an error
PROGRESS_STEPS = 1_000_000  # SQLite steps between looks at the clock (each takes the GIL)

BBox = tuple[float, float, float, float]


def record_fields(db: sqlite3.Connection, collection: str) -> frozenset[str]:
    """The top-level fields of every record of `collection` in `db` (captions apart)."""
    rows = db.execute(
        "SELECT DISTINCT field.key FROM items, json_each(items.record) AS field"
        f" WHERE {in_collection(coll_code(collection))}"
    )
    return frozenset(r[0] for r in rows)


def copy_record(record: dict[str, Any]) -> dict[str, Any]:
    """A copy of a decoded record whose lists and dicts are copies too (one level down, where
    records keep captions, windows and bounds)."""
    return {k: v.copy() if isinstance(v, list | dict) else v for k, v in record.items()}


class Records:
    """Reads and writes the records of one index through `connect()`, the caller's connection
    for the current thread (a writer's inside its transaction)."""

    def __init__(self, connect: Callable[[], sqlite3.Connection], name: str) -> None:
        self._connect = connect
        self.name = name  # the index directory, for errors
        self._cache: OrderedDict[int, dict[str, Any]] = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def reading(cls, path: Path) -> Records:
        """Read-only records of the index directory `path`, one connection per thread."""
        local = threading.local()

        def connect() -> sqlite3.Connection:
            db = getattr(local, "db", None)
            if db is None:
                db = local.db = store.connect(path, write=False)
            return db

        return cls(connect, str(path))

    # --- reading ---------------------------------------------------------------------------

    def by_keys(self, collection: str, keys: Iterable[int]) -> dict[int, dict[str, Any]]:
        """Decoded records by key (shared with the cache: copy before changing one), from the
        cache or in one query per 900 keys; keys without a row are left out."""
        c = coll_code(collection)
        wanted = sorted({int(k) for k in keys if k >= 0})
        found: dict[int, dict[str, Any]] = {}
        with self._lock:
            for key in wanted:
                rec = self._cache.get(store.rid(c, key))
                if rec is not None:
                    self._cache.move_to_end(store.rid(c, key))
                    found[key] = rec
        missing = [store.rid(c, key) for key in wanted if key not in found]
        for part in store.chunks(missing):
            marks = ", ".join("?" * len(part))
            rows = self._connect().execute(
                f"SELECT rid, captions, record FROM items WHERE rid IN ({marks})", part
            )
            fetched = {rid: store.record_of(caps, rec) for rid, caps, rec in rows}
            found.update({rid & store.KEY_MASK: rec for rid, rec in fetched.items()})
            with self._lock:
                self._cache.update(fetched)
                while len(self._cache) > RECORD_CACHE:
                    self._cache.popitem(last=False)
        return found

    def hits(self, collection: str, found: list[Hits]) -> list[list[Hit]]:
        """(distances, keys) per query as hits with their records, each its own copy (a caller
        may change it without changing the cache's)."""
        records = self.by_keys(collection, (k for _, keys in found for k in keys.tolist()))
        return [
            [
                Hit(key, int(d), copy_record(records[key]))
                for d, key in zip(dists.tolist(), keys.tolist(), strict=True)
                if key in records
            ]
            for dists, keys in found
        ]

    def item(self, item_id: str, collection: str, generation: int) -> dict[str, Any]:
        """The record of the item with this id alive at `generation` (an indexed lookup)."""
        row = (
            self._connect()
            .execute(
                f"SELECT captions, record FROM items WHERE id = ? AND "
                f"{in_collection(coll_code(collection))} AND {live_sql(generation)}",
                (item_id,),
            )
            .fetchone()
        )
        if row is None:
            raise RshashError(f"{self.name}: no {collection[:-1]} with id {item_id!r}")
        return store.record_of(*row)

    def items(self, collection: str, generation: int) -> list[dict[str, Any]]:
        """Every record of a collection alive at `generation`, in key order."""
        rows = self._connect().execute(
            f"SELECT captions, record FROM items WHERE {in_collection(coll_code(collection))}"
            f" AND {live_sql(generation)} ORDER BY rid"
        )
        return [store.record_of(*r) for r in rows]

    def fields(self, collection: str) -> frozenset[str]:
        return record_fields(self._connect(), collection)

    def tombstones(self, collection: str, compacted: int, generation: int) -> np.ndarray:
        """Sorted keys removed after generation `compacted` and up to `generation`."""
        rows = self._connect().execute(
            f"SELECT {KEY} FROM items WHERE gen_removed > ? AND gen_removed <= ?"
            f" AND {in_collection(coll_code(collection))}",
            (compacted, generation),
        )
        return np.sort(np.fromiter((r[0] for r in rows), np.int64))

    def removed_in(self, collection: str, generation: int) -> np.ndarray:
        """Keys removed by generation `generation` itself."""
        rows = self._connect().execute(
            f"SELECT {KEY} FROM items WHERE gen_removed = ? AND "
            f"{in_collection(coll_code(collection))}",
            (generation,),
        )
        return np.sort(np.fromiter((r[0] for r in rows), np.int64))

    def matching(
        self,
        collection: str,
        generation: int,
        where: str | None,
        box: BBox | None,
        known: frozenset[str],
    ) -> np.ndarray:
        """Sorted keys of the items alive at `generation` that match `where` (over the `known`
        fields) and `box`; a query running past FILTER_SECONDS is an error."""
        sql = f"SELECT {KEY} FROM items WHERE {in_collection(coll_code(collection))}"
        sql += f" AND {live_sql(generation)}"
        params: list[Any] = []
        if where is not None:
            cond, params = compile_where(where, known)
            sql += f" AND {cond}"
        if box is not None:
            cond, box_params = compile_bbox(box)
            sql += f" AND {cond}"
            params += box_params
        db, deadline = self._connect(), time.monotonic() + FILTER_SECONDS
        db.set_progress_handler(lambda: time.monotonic() > deadline, PROGRESS_STEPS)
        try:
            rows = db.execute(sql, params)
            return np.sort(np.fromiter((r[0] for r in rows), np.int64))
        except sqlite3.Error as exc:
            if time.monotonic() > deadline:
                raise RshashError(f"where: took longer than {FILTER_SECONDS:g} s") from None
            raise RshashError(f"where: {exc}") from None
        finally:
            db.set_progress_handler(None, 0)

    # --- writing (inside the caller's transaction) -----------------------------------------

    def check_new_ids(self, collection: str, items: list[dict[str, Any]]) -> None:
        """RshashError if an item's id is given twice or is live in the index already."""
        ids = [str(it["id"]) for it in items]
        if len(set(ids)) != len(ids):
            twice = next(i for i, n in Counter(ids).items() if n > 1)
            raise RshashError(f"{collection}: item id {twice!r} appears twice")
        c = coll_code(collection)
        for part in store.chunks(ids):
            marks = ", ".join("?" * len(part))
            row = (
                self._connect()
                .execute(
                    f"SELECT id FROM items WHERE id IN ({marks}) AND {in_collection(c)}"
                    " AND gen_removed IS NULL LIMIT 1",
                    part,
                )
                .fetchone()
            )
            if row is not None:
                raise RshashError(f"{collection}: item id {row[0]!r} is already in the index")

    def insert(
        self, collection: str, keys: np.ndarray, items: list[dict[str, Any]], generation: int
    ) -> None:
        """Rows (and bounds) of new items under `keys`, added by `generation`."""
        c, db = coll_code(collection), self._connect()
        pairs = list(zip(keys.tolist(), items, strict=True))
        store.insert_rows(db, (store.row_of(c, k, it, generation) for k, it in pairs))
        for k, it in pairs:
            if it.get("bounds_wgs84") is not None:
                store.insert_bounds(db, store.rid(c, k), it)

    def mark_removed(self, ids: list[str], generation: int) -> int:
        """Mark images (and their captions) or single captions by id as removed by
        `generation`; returns the images removed."""
        db, removed = self._connect(), 0
        for part in store.chunks(ids, store.BATCH // 2):
            marks = ", ".join("?" * len(part))
            cur = db.execute(
                f"UPDATE items SET gen_removed = ? WHERE id IN ({marks}) AND {in_collection(0)}"
                " AND gen_removed IS NULL",
                (generation, *part),
            )
            removed += cur.rowcount
            db.execute(
                f"UPDATE items SET gen_removed = ? WHERE {in_collection(1)}"
                f" AND gen_removed IS NULL AND (id IN ({marks}) OR image IN ({marks}))",
                (generation, *part, *part),
            )
        return removed
