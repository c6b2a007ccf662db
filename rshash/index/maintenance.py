"""Index upkeep: the consistency check and repair, and the upgrade of older indexes and runs."""

from __future__ import annotations

import json
import shutil
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rshash.errors import RshashError
from rshash.fileio import fsync_dir, write_json_atomic
from rshash.index import integrity, store
from rshash.index.engines import make_engine
from rshash.index.index import Index
from rshash.index.integrity import REPAIR
from rshash.index.packing import code_bytes
from rshash.index.store import (
    COLLECTIONS,
    DAMAGED,
    KEY,
    MANIFEST,
    OLD_FORMAT,
    coll_code,
    in_collection,
    live_sql,
)
from rshash.models.model_file import convert_legacy_model, model_fingerprint


@dataclass
class CheckReport:
    """What `inspect_index` found: counts per collection and findings, one line each.

    `damage` cannot be repaired here (restore or rebuild); `fixable` makes the index
    inconsistent and `--repair` fixes it; `leftovers` are harmless remains of dead writers or
    older versions that `--repair` removes or completes; `repaired` says what a repair did.
    """

    collections: dict[str, dict[str, int]] = field(default_factory=dict)
    damage: list[str] = field(default_factory=list)
    fixable: list[str] = field(default_factory=list)
    leftovers: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        """Nothing left that makes the index wrong (leftovers do not)."""
        return not self.damage and not self.fixable


def check_index(path: str | Path) -> dict[str, dict[str, int]]:
    """Per collection the counts checked; raises RshashError naming the first problem.

    Rows a dead writer left past the manifest are counted (`pending_rollback`), not errors:
    the next writer deletes them.
    """
    report = inspect_index(path)
    problems = report.damage + report.fixable
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise RshashError(problems[0] + more)
    return report.collections


def inspect_index(path: str | Path, repair: bool = False) -> CheckReport:
    """Check everything an index needs, reading it as a reader would (it writes nothing).

    Segments are checksummed and their keys checked for order; every live code must have a
    record and vice versa, and counts match the manifest. With `repair`, fixes what needs no
    lost data under the writer lock, then checks again.
    """
    path = Path(path)
    report = _inspect(path)
    if repair and (report.fixable or report.leftovers):
        done = _repair(path, report)
        report = _inspect(path)
        report.repaired = done
    return report


def _inspect(path: Path) -> CheckReport:
    report = CheckReport()
    try:
        manifest = store.read_manifest(path)
    except RshashError as exc:
        report.damage.append(str(exc))
        return report
    try:
        integrity.check_model(path)
        integrity.load_model(path)
    except RshashError as exc:
        report.damage.append(str(exc))
    segments_ok = _check_segments(path, manifest, report)
    _check_leftover_files(path, manifest, report)
    try:
        integrity.check_records(path)
    except RshashError as exc:
        report.damage.append(str(exc))
        return report
    db = store.connect(path, write=False)
    try:
        _check_records(path, db, manifest, report, segments_ok)
    except sqlite3.DatabaseError as exc:
        report.damage.append(f"{path / store.RECORDS}: unreadable ({exc}; {DAMAGED})")
    finally:
        db.close()
    return report


def _check_segments(path: Path, manifest: dict[str, Any], report: CheckReport) -> bool:
    """Sizes, checksums and key order of every segment; whether all of them are sound."""
    ok, width = True, int(manifest["code_bytes"])
    for name, info in manifest["collections"].items():
        try:
            for seg in info["segments"]:
                integrity.check_segment_size(path, seg, width)
            if info.get("state") and not (path / info["state"]).is_file():
                report.damage.append(f"{path / info['state']}: missing ({DAMAGED})")
                ok = False
            integrity.verify_segments(path, manifest, name)
            if info.get("state") and (path / info["state"]).is_file():
                _check_state(path, manifest, info)
        except RshashError as exc:
            report.damage.append(str(exc))
            ok = False
            continue
        for seg in info["segments"]:
            if "crc32" not in seg:
                report.leftovers.append(
                    f"{path / seg['file']}: no checksum (an older index); {REPAIR} to record it"
                )
    return ok


def _check_leftover_files(path: Path, manifest: dict[str, Any], report: CheckReport) -> None:
    for f in _orphans(path, manifest):
        report.leftovers.append(f"{f}: not part of the index (left by a writer that died)")


def _orphans(path: Path, manifest: dict[str, Any]) -> list[Path]:
    """Segment, engine and temporary files that `manifest` does not name."""
    keep = {s["file"] for _, s in integrity.segments(manifest)}
    keep |= {i["state"] for i in manifest["collections"].values() if i.get("state")}
    found = [*path.glob("seg-*"), *path.glob("engine-*"), *path.glob(f".{MANIFEST}.*.tmp")]
    found += [*path.glob(".model.tmp")]
    return sorted(f for f in found if f.name not in keep)


def _check_records(
    path: Path, db: sqlite3.Connection, manifest: dict[str, Any], report: CheckReport, ok: bool
) -> None:
    """Records against codes and the manifest's counts; rows of dead writers past it."""
    (quick,) = db.execute("PRAGMA quick_check(1)").fetchone()
    if quick != "ok":
        report.damage.append(f"{path / store.RECORDS}: corrupt ({quick}; {DAMAGED})")
        return
    gen, done = manifest["generation"], manifest.get("compacted", 0)
    width = int(manifest["code_bytes"])
    for name, info in manifest["collections"].items():
        c = coll_code(name)
        (pending,) = db.execute(
            f"SELECT count(*) FROM items WHERE {in_collection(c)} AND gen_added > {gen}"
        ).fetchone()
        dead = _keys(
            db,
            f"SELECT {KEY} FROM items WHERE {in_collection(c)}"
            f" AND gen_removed > {done} AND gen_removed <= {gen}",
        )
        live = _keys(db, f"SELECT {KEY} FROM items WHERE {in_collection(c)} AND {live_sql(gen)}")
        report.collections[name] = {
            "items": len(live),
            "tombstones": len(dead),
            "segments": len(info["segments"]),
            "pending_rollback": int(pending),
        }
        if pending:
            report.leftovers.append(
                f"{path / store.RECORDS}: {name}: {pending} rows of a writer that died after"
                f" generation {gen} (the next writer deletes them)"
            )
        if ok:
            _match_codes(path, name, info, width, live, dead, report)
    (unremoved,) = db.execute(
        f"SELECT count(*) FROM items WHERE gen_removed > {gen} OR gen_removed <= {done}"
    ).fetchone()
    if unremoved:
        report.leftovers.append(
            f"{path / store.RECORDS}: {unremoved} removals that a dead writer left unfinished"
        )


def _match_codes(
    path: Path,
    name: str,
    info: dict[str, Any],
    width: int,
    live: np.ndarray,
    dead: np.ndarray,
    report: CheckReport,
) -> None:
    parts = [
        np.array(store.read_segment(path / s["file"], width, s["count"])["key"])
        for s in info["segments"]
    ]
    held = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    codes = np.setdiff1d(held, dead)
    where = f"{path}: {name}"
    if not np.isin(dead, held).all():
        report.damage.append(f"{where}: a tombstone names a key that has no code ({DAMAGED})")
        return
    orphans = np.setdiff1d(codes, live)
    if len(orphans):
        report.damage.append(f"{where}: code of key {orphans[0]} has no record ({DAMAGED})")
        return
    missing = np.setdiff1d(live, codes)
    if len(missing):
        report.damage.append(f"{where}: record of key {missing[0]} has no code ({DAMAGED})")
        return
    if len(live) != info["count"] or len(dead) != info["tombstones"]:
        report.fixable.append(
            f"{path / MANIFEST}: {name}: {len(live)} live items and {len(dead)} tombstones, but"
            f" the manifest says {info['count']} and {info['tombstones']}; {REPAIR}"
        )


def _check_state(path: Path, manifest: dict[str, Any], info: dict[str, Any]) -> None:
    """Load the engine state file over the segments' codes, as opening the index does (mih
    checks that its tables index every code once, in the right bucket)."""
    width, name = code_bytes(manifest["bits"]), info["state"]
    rows = [store.read_segment(path / s["file"], width, s["count"]) for s in info["segments"]]
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


def _repair(path: Path, found: CheckReport) -> list[str]:
    """Fix what loses no data, under the writer lock: dead writers' rows and files, missing
    checksums, stale counts. Damage (missing or corrupt files) is left as it is, and with
    damage the manifest is not rewritten."""
    lock = store.WriteLock(path)
    lock.acquire()
    try:
        manifest = store.read_manifest(path)  # the newest, now that no writer runs
        done = _repair_records(path, manifest)
        for f in _orphans(path, manifest):
            f.unlink(missing_ok=True)
            done.append(f"{f}: deleted (not part of the index)")
        changed = False
        if not found.damage:  # the manifest is rewritten only for an otherwise sound index
            changed = _record_checksums(path, manifest, done)
            changed |= bool(found.fixable) and _recount(path, manifest, done)
        if changed:  # a new generation, so that writers and readers reload it
            manifest["generation"] += 1
            write_json_atomic(path / MANIFEST, manifest)
    finally:
        lock.release()
    return done


def _repair_records(path: Path, manifest: dict[str, Any]) -> list[str]:
    """Undo a dead writer's rows past the manifest, as the next writer would (Index._recover)."""
    if not (path / store.RECORDS).is_file():
        return []
    db = store.connect(path, write=True)
    try:
        db.execute("BEGIN IMMEDIATE")
        deleted, undone = store.roll_back_past(db, manifest)
        dropped = store.drop_compacted(db, manifest.get("compacted", 0))
        db.execute("COMMIT")
    except sqlite3.DatabaseError:
        return []  # a damaged records.db: the check names it
    finally:
        db.close()
    rows = {"dead writer rows deleted": deleted, "unfinished removals undone": undone}
    rows["compacted rows dropped"] = dropped
    return [f"{path / store.RECORDS}: {n} {what}" for what, n in rows.items() if n]


def _record_checksums(path: Path, manifest: dict[str, Any], done: list[str]) -> bool:
    """Add the CRC32 of segments an older version wrote without one (if they look sound)."""
    changed, width = False, int(manifest["code_bytes"])
    for name in manifest["collections"]:
        try:
            scans = integrity.verify_segments(path, manifest, name)
        except (RshashError, OSError):
            continue  # damaged: named by the check, not blessed with a checksum
        for seg, scan in zip(manifest["collections"][name]["segments"], scans, strict=True):
            if "crc32" not in seg and _sized(path, seg, width):
                seg["crc32"] = scan.crc32
                done.append(f"{path / seg['file']}: checksum recorded")
                changed = True
    return changed


def _sized(path: Path, seg: dict[str, Any], width: int) -> bool:
    try:
        integrity.check_segment_size(path, seg, width)
    except RshashError:
        return False
    return True


def _recount(path: Path, manifest: dict[str, Any], done: list[str]) -> bool:
    """Set the manifest's live and tombstone counts from the records (codes and records agree)."""
    gen, compacted = manifest["generation"], manifest.get("compacted", 0)
    db = store.connect(path, write=False)
    changed = False
    try:
        for name, info in manifest["collections"].items():
            c = coll_code(name)
            (live,) = db.execute(
                f"SELECT count(*) FROM items WHERE {in_collection(c)} AND {live_sql(gen)}"
            ).fetchone()
            (dead,) = db.execute(
                f"SELECT count(*) FROM items WHERE {in_collection(c)}"
                f" AND gen_removed > {compacted} AND gen_removed <= {gen}"
            ).fetchone()
            if (live, dead) != (info["count"], info["tombstones"]):
                done.append(
                    f"{path / MANIFEST}: {name}: counts set to {live} items, {dead} tombstones"
                    f" (were {info['count']} and {info['tombstones']})"
                )
                info.update(count=live, tombstones=dead)
                changed = True
    finally:
        db.close()
    return changed


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
