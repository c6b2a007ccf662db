"""A writer process for the index crash and concurrency tests.

`python -m tests.index_writer INDEX ACTION [POINT]`: ACTION is `add:START:COUNT` (COUNT images
with ids img-START.. and random 64-bit codes, added in batches of 50 and committed), `compact`,
or `archive:DATA` (`add_to_index` of the dataset at DATA, its images and captions "encoded" to
random codes without loading the encoders).
POINT makes the process SIGKILL itself at that point of the write: `insert` (records of the
second batch half written), `seal` (segment synced, SQLite not committed), `manifest` (segment
and SQLite committed, or for compact the merged segment written; manifest not replaced),
`rename` (the new manifest written to its temporary file, not renamed into place),
`sweep` (manifest replaced, old files not yet swept), `gc` (compaction's manifest replaced,
dropped rows not yet deleted), `tables` (an mih index: in its table build, the tables filled, not
yet returned), `state` (an mih index: half of the engine state file written).
Or POINT pauses it: `hold-lock:FILE` (add: after the first batch, the writer lock held) or
`hold-encode:FILE` (archive: encoding the first captions, the images encoded); it creates
FILE.held, then waits until FILE exists (exit 3 after 120 s).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from rshash.index import index as index_module
from rshash.index import mih_kernels, store
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
    elif point == "rename":
        real_replace = os.replace

        def replace(src: Any, dst: Any) -> None:
            if Path(src).name.startswith(".index.json."):
                _die()
            real_replace(src, dst)

        os.replace = replace  # type: ignore[assignment]
    elif point == "sweep":  # the first sweep is the recovery at the start of the write
        Index._sweep = _on_call(2, Index._sweep)  # type: ignore[method-assign]
    elif point == "tables":
        real_build = mih_kernels.build

        def build(*args: Any) -> None:
            real_build(*args)
            _die()

        mih_kernels.build = build
    elif point == "state":

        def write_half(target: Any, data: bytes) -> None:
            Path(target).write_bytes(data[: len(data) // 2])
            _die()

        index_module.write_bytes_durable = write_half
    elif point == "gc":
        Index._drop_compacted = _on_call(2, Index._drop_compacted)  # type: ignore[method-assign]


def hold(flag: str) -> None:
    """Say we got here (FLAG.held), then wait until the test creates FLAG."""
    Path(flag + ".held").touch()
    deadline = time.monotonic() + 120
    while not Path(flag).exists():
        if time.monotonic() > deadline:
            sys.exit(3)
        time.sleep(0.02)


def _fake_encoders(hold_flag: str | None) -> None:
    """Encoders that give random codes at once (no model loads); the first text batch holds."""
    from rshash.index.encoder import CodeEncoder

    def images(self: Any, batch: Any) -> np.ndarray:
        return codes_for(len(batch), len(batch))

    def texts(self: Any, batch: Any) -> np.ndarray:
        if hold_flag is not None and not Path(hold_flag + ".held").exists():
            hold(hold_flag)
        return codes_for(len(batch), len(batch))

    CodeEncoder.encode_images = images  # type: ignore[method-assign]
    CodeEncoder.encode_views = images  # type: ignore[method-assign]  # what builds call
    CodeEncoder.encode_texts = texts  # type: ignore[method-assign]


def codes_for(start: int, count: int) -> np.ndarray:
    """The codes of images img-START..: a pure function of the ids, so tests can recompute."""
    rng = np.random.default_rng(start)
    return rng.integers(0, 256, size=(count, 8), dtype=np.uint8)


def main(path: str, action: str, point: str | None = None) -> None:
    how, _, flag = (point or "").partition(":")
    if action.startswith("archive:"):
        from rshash.data import load_dataset
        from rshash.index.build import add_to_index

        _fake_encoders(flag if how == "hold-encode" else None)
        add_to_index(path, load_dataset(action.split(":", 1)[1]), progress=False)
        return
    index = Index.open(path)
    if point and not flag:
        _arm(point)
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
        if how == "hold-lock" and at == 0:
            hold(flag)
    index.commit({"writer": action})


if __name__ == "__main__":
    main(*sys.argv[1:])
