"""Integrity of an index directory, checked when it is opened and by `rshash index check`.

A damaged index must fail on open with one line naming the file and the fix, never with a
traceback or, worse, wrong answers. `check_manifest` checks the shape of every manifest read;
`check_open` checks the files a manifest names (segments present and of exact size, records.db
present and readable, the model directory) and, with `verify`, each segment's CRC32 and key
order. Nothing here writes: opening an index for reading creates and modifies no file.
"""

from __future__ import annotations

import re
import sqlite3
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rshash.errors import RshashError
from rshash.index import store
from rshash.index.packing import code_bytes
from rshash.index.store import COLLECTIONS, DAMAGED, KEY_MASK, RECORDS, segment_dtype
from rshash.models.run import HashRun

REPAIR = "run `rshash index check --repair`"
MODEL_DIR = "model"
MODEL_FILES = ("config.json", "split.json")
SCAN_CHUNK = 16 << 20  # bytes read at a time when checksumming a segment
OPEN_TRIES = 5  # a writer that compacts may replace the manifest while it is checked
VERIFY_UP_TO = 2_000_000  # codes checksummed on open by default: ≤ ~10 % of the open time


def _fail(where: str, what: str, fix: str = DAMAGED) -> RshashError:
    return RshashError(f"{where}: {what} ({fix})")


# --- manifest shape ------------------------------------------------------------------------


def _int(file: Path, field: str, value: Any, lo: int = 0, hi: int | None = None) -> int:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= lo
    if not ok or (hi is not None and value > hi):
        span = f"between {lo} and {hi}" if hi is not None else f"≥ {lo}"
        raise _fail(f"{file}", f"{field}: expected an integer {span}, got {value!r}")
    return int(value)


def _obj(file: Path, field: str, value: Any, kind: type = dict) -> Any:
    if not isinstance(value, kind):
        raise _fail(f"{file}", f"{field}: expected {kind.__name__}, got {type(value).__name__}")
    return value


def _name(file: Path, field: str, value: Any, prefix: str) -> str:
    """A file name the manifest gives: `prefix`-NNNNNNNN.bin, plain (it cannot leave INDEX/)."""
    if not isinstance(value, str) or not re.fullmatch(rf"{prefix}-\d{{8}}\.bin", value):
        expected = f"expected a file name {prefix}-NNNNNNNN.bin"
        raise _fail(f"{file}", f"{field}: {expected}, got {value!r}")
    return value


def check_manifest(file: Path, manifest: dict[str, Any]) -> None:
    """Raise RshashError naming the first field of `manifest` of the wrong type or range."""
    gen = _int(file, "generation", manifest.get("generation"))
    _int(file, "compacted", manifest.get("compacted", 0), 0, gen)
    bits = _int(file, "bits", manifest.get("bits"), 8, 1024)
    _int(file, "code_bytes", manifest.get("code_bytes"), code_bytes(bits), code_bytes(bits))
    engine = _obj(file, "engine", manifest.get("engine"))
    _obj(file, "engine.name", engine.get("name"), str)
    _obj(file, "engine.params", engine.get("params"), dict)
    model = _obj(file, "model", manifest.get("model"))
    _obj(file, "model.fingerprint", model.get("fingerprint"), str)
    _obj(file, "sources", manifest.get("sources", []), list)
    collections = _obj(file, "collections", manifest.get("collections"))
    for name, info in collections.items():
        if name not in COLLECTIONS:
            raise _fail(f"{file}", f"collections: unknown collection {name!r}")
        _check_collection(
            file, f"collections.{name}", name, _obj(file, f"collections.{name}", info)
        )


def _check_collection(file: Path, where: str, name: str, info: dict[str, Any]) -> None:
    for field in ("count", "tombstones"):
        _int(file, f"{where}.{field}", info.get(field))
    _int(file, f"{where}.next_key", info.get("next_key"), 0, KEY_MASK + 1)
    _obj(file, f"{where}.report", info.get("report", {}))
    if info.get("state") is not None:
        _name(file, f"{where}.state", info["state"], f"engine-{name}")
    for i, seg in enumerate(_obj(file, f"{where}.segments", info.get("segments"), list)):
        at = f"{where}.segments[{i}]"
        _obj(file, at, seg)
        _name(file, f"{at}.file", seg.get("file"), f"seg-{name}")
        _int(file, f"{at}.count", seg.get("count"))
        if "crc32" in seg:
            _int(file, f"{at}.crc32", seg["crc32"], 0, 0xFFFFFFFF)


# --- files ---------------------------------------------------------------------------------


def segments(manifest: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(collection, segment entry) of every segment `manifest` names, in key order."""
    for name, info in manifest["collections"].items():
        for seg in info["segments"]:
            yield name, seg


def check_segment_size(path: Path, seg: dict[str, Any], width: int) -> None:
    """The segment file exists and holds exactly the manifest's count of records."""
    file = path / seg["file"]
    if not file.is_file():
        raise _fail(f"{file}", "missing")
    size, item = file.stat().st_size, segment_dtype(width).itemsize
    if size != seg["count"] * item:
        raise _fail(
            f"{file}", f"{size} bytes, but the manifest says {seg['count']} codes of {item} bytes"
        )


@dataclass(frozen=True)
class SegmentScan:
    """What reading a whole segment found: its checksum, first and last key, key order."""

    crc32: int
    first: int
    last: int
    ordered: bool


def scan_segment(file: Path, width: int) -> SegmentScan:
    """Read `file` once in chunks: CRC32 of its bytes and whether its keys strictly increase."""
    dtype = segment_dtype(width)
    rows = max(1, SCAN_CHUNK // dtype.itemsize)
    crc, first, last, ordered = 0, -1, -1, True
    with open(file, "rb") as f:
        while chunk := f.read(rows * dtype.itemsize):
            crc = zlib.crc32(chunk, crc)
            keys = np.frombuffer(chunk, dtype, len(chunk) // dtype.itemsize)["key"]
            if not len(keys):
                continue
            if first < 0:
                first = int(keys[0])
            ordered &= bool(keys[0] > last) and not bool((np.diff(keys) <= 0).any())
            last = int(keys[-1])
    return SegmentScan(crc, first, last, ordered)


def verify_segments(path: Path, manifest: dict[str, Any], name: str) -> list[SegmentScan]:
    """Check collection `name`'s segments against their checksums and the key order."""
    info, width = manifest["collections"][name], int(manifest["code_bytes"])
    scans, last = [], -1
    for seg in info["segments"]:
        file = path / seg["file"]
        scan = scan_segment(file, width)
        if "crc32" in seg and scan.crc32 != seg["crc32"]:
            raise _fail(f"{file}", "checksum mismatch: its bytes changed after they were written")
        if not scan.ordered or (seg["count"] and scan.first <= last):
            raise _fail(f"{file}", "keys out of order or repeated")
        if seg["count"] and scan.last >= info["next_key"]:
            raise _fail(f"{file}", f"key {scan.last} is not below next_key {info['next_key']}")
        last = scan.last if seg["count"] else last
        scans.append(scan)
    return scans


def check_records(path: Path) -> None:
    """records.db exists and is an rshash records database (a cheap look at schema and a row)."""
    file = path / RECORDS
    if not file.is_file():
        raise _fail(f"{file}", "missing")
    try:
        db = store.connect(path, write=False)
        try:
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master")}
            if not {"items", "bounds"} <= tables:
                raise _fail(f"{file}", "not an rshash records database (no items table)")
            db.execute("SELECT rid, record FROM items ORDER BY rid LIMIT 1").fetchall()
        finally:
            db.close()
    except sqlite3.DatabaseError as exc:
        raise _fail(f"{file}", f"not a readable SQLite database ({exc})") from None


def check_model(path: Path) -> None:
    """The model directory holds the run's config and split (the weights: `load_model`)."""
    folder = path / MODEL_DIR
    for name in MODEL_FILES:
        if not (folder / name).is_file():
            raise _fail(f"{folder / name}", "missing")


def load_model(path: Path) -> HashRun:
    """The index's model; any failure to load it is one line naming the model directory."""
    folder = path / MODEL_DIR
    try:
        return HashRun.open(folder)
    except RshashError as exc:
        raise RshashError(f"{exc} ({DAMAGED})") from None
    except Exception as exc:  # a damaged file can fail in any of torch's or json's ways
        first = (str(exc).splitlines() or [""])[0][:200]
        raise _fail(
            f"{folder}", f"the model does not load ({type(exc).__name__}: {first})"
        ) from None


def should_verify(manifest: dict[str, Any], verify: bool | None) -> bool:
    """`verify`, or by default whether the index is small enough that verifying is cheap
    (benchmarks/integrity.py: 8 % of the open time at 1e6 codes, 20 % at 1e7)."""
    if verify is not None:
        return verify
    return sum(seg["count"] for _, seg in segments(manifest)) <= VERIFY_UP_TO


def check_files(
    path: Path, manifest: dict[str, Any], verify: bool | None, model: bool = True
) -> None:
    """Raise RshashError naming the first file `manifest` needs (and, with `model`, the model
    copy's) that is missing or damaged."""
    verify = should_verify(manifest, verify)
    if model:
        check_model(path)
    width = int(manifest["code_bytes"])
    for name, info in manifest["collections"].items():
        for seg in info["segments"]:
            check_segment_size(path, seg, width)
        if info.get("state") and not (path / info["state"]).is_file():
            raise _fail(f"{path / info['state']}", "missing")
        if verify:
            verify_segments(path, manifest, name)
    check_records(path)  # last: on damage elsewhere, SQLite never opens (nor makes -shm files)


def open_manifest(path: Path, verify: bool | None, model: bool = True) -> dict[str, Any]:
    """The newest manifest of `path`, after checking the files it names.

    A compaction may replace the manifest and delete its segments while they are checked; a
    problem counts only if the manifest is still the newest.
    """
    manifest = store.read_manifest(path)
    for _ in range(OPEN_TRIES):
        try:
            check_files(path, manifest, verify, model)
            return manifest
        except RshashError:
            newest = store.read_manifest(path)
            if newest["generation"] == manifest["generation"]:
                raise
            manifest = newest
    check_files(path, manifest, verify, model)
    return manifest
