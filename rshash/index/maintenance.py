"""Index upkeep: the consistency check and the upgrade of `rshash-index/1` directories."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from rshash.errors import RshashError
from rshash.index import store
from rshash.index.index import Index
from rshash.index.packing import code_bytes
from rshash.index.store import (
    COLLECTIONS,
    KEY,
    MANIFEST,
    OLD_FORMAT,
    coll_code,
    in_collection,
    live_sql,
)


def check_index(path: str | Path) -> dict[str, dict[str, int]]:
    """Check that every live code has a record and vice versa, and counts match the manifest.

    Reads the manifest's generation, as a reader would; rows a dead writer left past it are
    counted (`pending_rollback`), not errors: the next writer deletes them. Raises RshashError
    naming the first inconsistency; returns per collection the counts it checked.
    """
    path = Path(path)
    manifest = store.read_manifest(path)
    gen, done = manifest["generation"], manifest.get("compacted", 0)
    width = code_bytes(manifest["bits"])
    db = store.connect(path)
    report = {}
    try:
        for name, info in manifest["collections"].items():
            c = coll_code(name)
            parts = [
                np.array(store.read_segment(path / s["file"], width, s["count"])["key"])
                for s in info["segments"]
            ]
            held = np.concatenate(parts) if parts else np.zeros(0, np.int64)
            if len(held) and (np.diff(held) <= 0).any():
                raise RshashError(f"{path}: {name} segments hold keys out of order or twice")
            dead = _keys(
                db,
                f"SELECT {KEY} FROM items WHERE {in_collection(c)}"
                f" AND gen_removed > {done} AND gen_removed <= {gen}",
            )
            live = _keys(
                db, f"SELECT {KEY} FROM items WHERE {in_collection(c)} AND {live_sql(gen)}"
            )
            codes = np.setdiff1d(held, dead)
            if not np.isin(dead, held).all():
                raise RshashError(f"{path}: {name}: a tombstone names a key that has no code")
            orphans = np.setdiff1d(codes, live)
            if len(orphans):
                raise RshashError(f"{path}: {name}: code of key {orphans[0]} has no record")
            missing = np.setdiff1d(live, codes)
            if len(missing):
                raise RshashError(f"{path}: {name}: record of key {missing[0]} has no code")
            if len(live) != info["count"] or len(dead) != info["tombstones"]:
                raise RshashError(
                    f"{path}: {name}: {len(live)} live items and {len(dead)} tombstones, manifest "
                    f"says {info['count']} and {info['tombstones']}"
                )
            if len(held) and held[-1] >= info["next_key"]:
                raise RshashError(f"{path}: {name}: key {held[-1]} is not below next_key")
            (pending,) = db.execute(
                f"SELECT count(*) FROM items WHERE {in_collection(c)} AND gen_added > {gen}"
            ).fetchone()
            report[name] = {
                "items": len(live),
                "tombstones": len(dead),
                "segments": len(info["segments"]),
                "pending_rollback": int(pending),
            }
    finally:
        db.close()
    return report


def _keys(db: Any, sql: str) -> np.ndarray:
    return np.sort(np.fromiter((r[0] for r in db.execute(sql)), np.int64))


def upgrade_index(path: str | Path, progress: bool = True) -> Index:
    """Convert an `rshash-index/1` directory in place (keys, records and engine kept).

    The new index is written beside it and swapped in by renames, so a failure leaves the old
    one as it was.
    """
    from tqdm import tqdm

    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise RshashError(f"{path}: not an rshash index (no {MANIFEST})")
    old = json.loads(manifest_path.read_text())
    if old.get("format") != OLD_FORMAT:
        raise RshashError(f"{path}: format {old.get('format')!r}; only {OLD_FORMAT} is upgraded")
    gen, spec = old["generation"], old["engine"]
    tmp = path.with_name(path.name + ".upgrade")
    shutil.rmtree(tmp, ignore_errors=True)
    new = Index.create(tmp, path / "model", spec["name"], spec["params"])
    new.manifest["model"] = old["model"]
    for name in COLLECTIONS:
        if name not in old["collections"]:
            continue
        codes = np.load(path / f"{name}.codes.{gen}.npy", mmap_mode="r")
        keys = np.load(path / f"{name}.keys.{gen}.npy")
        with open(path / f"{name}.items.{gen}.jsonl", encoding="utf-8") as f:
            batch: list[dict[str, Any]] = []
            at = 0
            for line in tqdm(f, total=len(keys), desc=f"upgrade {name}", disable=not progress):
                batch.append(json.loads(line))
                if len(batch) == 10_000:
                    new.add_keyed(
                        name, codes[at : at + len(batch)], batch, keys[at : at + len(batch)]
                    )
                    at += len(batch)
                    batch = []
            if batch:
                new.add_keyed(name, codes[at:], batch, keys[at:])
        new.reserve_keys(name, int(old["collections"][name]["next_key"]))
    new.manifest["sources"] = old.get("sources", [])
    new.commit({"upgraded_from": OLD_FORMAT})
    new.close()
    backup = path.with_name(path.name + ".v1")
    path.rename(backup)
    tmp.rename(path)
    shutil.rmtree(backup)
    return Index.open(path)
