"""Index upkeep: the consistency check, and the upgrade of older indexes and runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from rshash.errors import RshashError
from rshash.fileio import fsync_dir, write_json_atomic
from rshash.index import store
from rshash.index.engines import make_engine
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
from rshash.models.model_file import convert_legacy_model, model_fingerprint


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
            rows = [
                store.read_segment(path / s["file"], width, s["count"]) for s in info["segments"]
            ]
            held = np.concatenate([r["key"] for r in rows]) if rows else np.zeros(0, np.int64)
            if info.get("state"):
                _check_state(path, manifest, info["state"], rows)
            del rows
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


def _check_state(path: Path, manifest: dict[str, Any], name: str, rows: list[Any]) -> None:
    """Load the engine state file over the segments' codes, as opening the index does (mih
    checks that its tables index every code once, in the right bucket)."""
    width = code_bytes(manifest["bits"])
    packed = np.concatenate([r["code"] for r in rows]) if rows else np.zeros((0, width), np.uint8)
    keys = np.concatenate([r["key"] for r in rows]) if rows else np.zeros(0, np.int64)
    spec = manifest["engine"]
    try:
        state = (path / name).read_bytes()
        make_engine(spec["name"], manifest["bits"], spec["params"]).restore(state, packed, keys)
    except FileNotFoundError:
        raise RshashError(
            f"{path / name}: engine state file named by the manifest is missing"
        ) from None
    except RshashError as exc:
        raise RshashError(f"{path / name}: {exc}") from None


def _keys(db: Any, sql: str) -> np.ndarray:
    return np.sort(np.fromiter((r[0] for r in db.execute(sql)), np.int64))


def upgrade_index(path: str | Path, progress: bool = True) -> Index | None:
    """Bring an index or a run directory written by an older rshash to the current format.

    - a run directory, or an index whose `model/` holds a pickled `model.pt`: the model is
      rewritten as safetensors + JSON (read with PyTorch's restricted loader, never executed) and
      the index's manifest takes the new model fingerprint;
    - an `rshash-index/1` directory: converted in place (keys, records and engine kept), written
      beside it as `INDEX.upgrade` and swapped in by two renames. A kill between them leaves the
      old index at `INDEX.v1` and the new one complete at `INDEX.upgrade`: running the upgrade
      again (or opening, which says so) finishes the swap.

    Returns the upgraded index, or None for a run directory.
    """
    path = Path(path)
    tmp, backup = _upgrade_paths(path)
    if _finish_swap(path, tmp, backup):
        return Index.open(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        if (path / "config.json").is_file() and convert_legacy_model(path):
            return None
        if (path / "config.json").is_file():
            raise RshashError(f"{path}: the run's model is already in the current format")
        raise RshashError(f"{path}: not an rshash index (no {MANIFEST}) nor a training run")
    try:
        old = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise RshashError(f"{manifest_path}: not valid JSON ({exc})") from None
    converted = convert_legacy_model(path / "model")
    if old.get("format") == store.FORMAT:
        if not converted:
            raise RshashError(f"{path}: already in the current format ({store.FORMAT})")
        old["model"]["fingerprint"] = model_fingerprint(path / "model")
        write_json_atomic(manifest_path, old)
        return Index.open(path)
    if old.get("format") != OLD_FORMAT:
        raise RshashError(f"{path}: format {old.get('format')!r}; only {OLD_FORMAT} is upgraded")
    _rewrite_v1(path, old, tmp, progress)
    path.rename(backup)
    fsync_dir(path.parent)
    _finish_swap(path, tmp, backup)
    return Index.open(path)


def _upgrade_paths(path: Path) -> tuple[Path, Path]:
    """Where an upgrade writes the new index, and where it parks the old one during the swap."""
    return path.with_name(path.name + ".upgrade"), path.with_name(path.name + ".v1")


def _finish_swap(path: Path, tmp: Path, backup: Path) -> bool:
    """Complete a swap that a kill interrupted; True if one was (or had just been) completed."""
    if not path.exists() and backup.is_dir() and (tmp / MANIFEST).is_file():
        tmp.rename(path)
        fsync_dir(path.parent)
    done = path.exists() and backup.is_dir() and (path / MANIFEST).is_file()
    if done and json.loads((path / MANIFEST).read_text()).get("format") == store.FORMAT:
        shutil.rmtree(backup)
        return True
    return False


def _rewrite_v1(path: Path, old: dict[str, Any], tmp: Path, progress: bool) -> None:
    """Write the `rshash-index/1` index at `path` as a new index at `tmp` (committed)."""
    from tqdm import tqdm

    gen, spec = old["generation"], old["engine"]
    shutil.rmtree(tmp, ignore_errors=True)
    new = Index.create(tmp, path / "model", spec["name"], spec["params"])
    new.manifest["model"] = {**old["model"], "fingerprint": model_fingerprint(path / "model")}
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
