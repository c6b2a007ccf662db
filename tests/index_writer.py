"""A writer process for the index crash and concurrency tests.

`python -m tests.index_writer INDEX ACTION [KILL_AT]`: ACTION is `add:START:COUNT` (COUNT images
with ids img-START.. and random 64-bit codes, added in batches of 50 and committed), or `compact`.
With KILL_AT, the process SIGKILLs itself at that point of the write: `insert` (records of the
second batch half written), `seal` (segment synced, SQLite not committed), `manifest` (segment
and SQLite committed, or for compact the merged segment written; manifest not replaced),
`sweep` (manifest replaced, old files not yet swept), `gc` (compaction's manifest replaced,
dropped rows not yet deleted).
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

import numpy as np

from rshash.index import index as index_module
from rshash.index import store
from rshash.index.index import Index


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _on_call(n: int, real: Any) -> Any:
    """`real`, except that its n-th call kills the process first."""
    calls = []

    def wrapper(*args: Any) -> Any:
        calls.append(1)
        if len(calls) == n:
            _die()
        return real(*args)

    return wrapper


def _arm(point: str) -> None:
    if point == "insert":
        real_insert = store.insert_rows
        calls = []

        def insert(db: Any, rows: Any) -> None:
            calls.append(1)
            if len(calls) == 2:
                real_insert(db, list(rows)[:25])
                _die()
            real_insert(db, rows)

        store.insert_rows = insert
    elif point == "seal":
        store.read_segment = _on_call(1, store.read_segment)
    elif point == "manifest":
        index_module.write_json_atomic = _on_call(1, index_module.write_json_atomic)
    elif point == "sweep":  # the first sweep is the recovery at the start of the write
        Index._sweep = _on_call(2, Index._sweep)  # type: ignore[method-assign]
    elif point == "gc":
        Index._drop_compacted = _on_call(2, Index._drop_compacted)  # type: ignore[method-assign]


def codes_for(start: int, count: int) -> np.ndarray:
    """The codes of images img-START..: a pure function of the ids, so tests can recompute."""
    rng = np.random.default_rng(start)
    return rng.integers(0, 256, size=(count, 8), dtype=np.uint8)


def main(path: str, action: str, kill_at: str | None = None) -> None:
    index = Index.open(path)
    if kill_at:
        _arm(kill_at)
    if action == "compact":
        index.compact()
        return
    _, start, count = action.split(":")
    first, n = int(start), int(count)
    codes = codes_for(first, n)
    for at in range(0, n, 50):
        part = range(first + at, first + min(at + 50, n))
        items = [{"id": f"img-{i}", "path": f"/archive/{i}.tif", "class": "c"} for i in part]
        index.add("images", codes[at : at + len(part)], items)
    index.commit({"writer": action})


if __name__ == "__main__":
    main(*sys.argv[1:])
