"""An index directory: packed codes, item records and the model that made them.

Layout of INDEX/:

- `index.json`: manifest (format, bits, engine, model fingerprint, collections, generation);
- `model/`: a copy of the run (`model.pt`, `config.json`, `split.json`), so queries are always
  encoded by the model that encoded the archive;
- per collection (`images`, and `captions` when the archive has them), per generation `g`:
  `NAME.codes.g.npy` (n, K/8) uint8, `NAME.keys.g.npy` int64, `NAME.items.g.jsonl`, and for
  trained engines `NAME.engine.g.bin`.

A commit writes the next generation's files, then atomically replaces `index.json`, then deletes
the previous generation: a crash at any point leaves a readable index, old or new.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from rshash.errors import RshashError
from rshash.fileio import atomic_path, write_json_atomic
from rshash.index.encoder import CodeEncoder, decode_image
from rshash.index.engines import Engine, Hits, make_engine
from rshash.reproducibility import provenance
from rshash.training.run import MODEL, HashRun

FORMAT = "rshash-index/1"
MANIFEST = "index.json"
COLLECTIONS = ("images", "captions")
MAX_K = 10_000


def model_fingerprint(run_dir: Path) -> str:
    return hashlib.sha256((run_dir / MODEL).read_bytes()).hexdigest()


@dataclass(frozen=True)
class Hit:
    """One search result: the item's record and its Hamming distance to the query."""

    key: int
    distance: int
    item: dict[str, Any]

    @property
    def id(self) -> str:
        return str(self.item["id"])

    def to_dict(self) -> dict[str, Any]:
        return {"distance": self.distance, **self.item}


class Collection:
    """The items of one kind (images or captions): records, keys, and an engine over codes."""

    def __init__(self, name: str, engine: Engine) -> None:
        self.name = name
        self.engine = engine
        self.codes = np.zeros((0, engine.bits // 8), np.uint8)
        self.keys = np.zeros(0, np.int64)
        self.items: list[dict[str, Any]] = []
        self.next_key = 0
        self.report: dict[str, Any] = {}

    def __len__(self) -> int:
        return len(self.keys)

    def record(self, key: int) -> dict[str, Any]:
        return self.items[int(np.searchsorted(self.keys, key))]

    def add(
        self, codes: np.ndarray, items: list[dict[str, Any]], first_key: int | None = None
    ) -> np.ndarray:
        if first_key is not None and first_key < self.next_key:
            raise RshashError(f"{self.name}: first key {first_key} is below {self.next_key}")
        if first_key is not None:
            self.next_key = first_key
        if len(codes) != len(items):
            raise RshashError(f"{len(codes)} codes but {len(items)} item records")
        held = {str(it["id"]) for it in self.items}
        clash = next((str(it["id"]) for it in items if str(it["id"]) in held), None)
        if clash is not None:
            raise RshashError(f"{self.name}: item id {clash!r} is already in the index")
        keys = np.arange(self.next_key, self.next_key + len(items), dtype=np.int64)
        if len(self) == 0 and self.engine.ntotal == 0:
            self.report = self.engine.build(codes, keys)
        else:
            self.engine.add(codes, keys)
        self.codes = np.concatenate([self.codes, codes])
        self.keys = np.concatenate([self.keys, keys])
        self.items.extend(items)
        self.next_key += len(items)
        return keys

    def remove(self, drop: np.ndarray) -> int:
        """Remove items where the boolean mask `drop` is set."""
        if not drop.any():
            return 0
        self.engine.remove(self.keys[drop])
        keep = ~drop
        self.codes, self.keys = self.codes[keep], self.keys[keep]
        self.items = [it for it, k in zip(self.items, keep, strict=True) if k]
        return int(drop.sum())

    def hits(self, found: Hits) -> list[Hit]:
        return [
            Hit(int(key), int(d), self.record(int(key)))
            for d, key in zip(*found, strict=True)
            if key >= 0
        ]


class Searcher(ABC):
    """Text and image queries on top of `search_codes`; shared by single and sharded indexes."""

    encoder: CodeEncoder

    @abstractmethod
    def search_codes(
        self, codes: np.ndarray, k: int = 20, collection: str = "images", radius: int | None = None
    ) -> list[list[Hit]]:
        """Nearest items to each packed query code: top-k, or all within `radius` if given."""

    def search_text(
        self, query: str, k: int = 20, collection: str = "images", radius: int | None = None
    ) -> list[Hit]:
        if not query.strip():
            raise RshashError("empty text query")
        return self.search_codes(self.encoder.encode_texts([query]), k, collection, radius)[0]

    def search_image(
        self,
        image: str | Path | bytes | Image.Image,
        k: int = 20,
        collection: str = "images",
        radius: int | None = None,
    ) -> list[Hit]:
        if isinstance(image, str | Path):
            path = Path(image)
            if not path.is_file():
                raise RshashError(f"{path}: query image not found")
            image = decode_image(path.read_bytes(), str(path))
        elif isinstance(image, bytes):
            image = decode_image(image)
        return self.search_codes(self.encoder.encode_images([image]), k, collection, radius)[0]


def check_query(k: int, radius: int | None) -> None:
    if radius is not None and radius < 0:
        raise RshashError(f"radius must be ≥ 0, got {radius}")
    if radius is None and not 1 <= k <= MAX_K:
        raise RshashError(f"k must be between 1 and {MAX_K}, got {k}")


class Index(Searcher):
    """A searchable archive. `Index.open(path).search_text("a river", k=20)`."""

    def __init__(
        self, path: Path, manifest: dict[str, Any], run: HashRun, device: str = "auto"
    ) -> None:
        self.path = path
        self.manifest = manifest
        self.run = run
        self.encoder = CodeEncoder(run, device)
        self.collections: dict[str, Collection] = {}
        self.model_source: Path | None = None

    @property
    def bits(self) -> int:
        return int(self.manifest["bits"])

    @property
    def fingerprint(self) -> str:
        return str(self.manifest["model"]["fingerprint"])

    # --- creating and opening -------------------------------------------------------------

    @classmethod
    def create(
        cls,
        path: str | Path,
        run_dir: str | Path,
        engine: str = "exact",
        engine_params: dict[str, Any] | None = None,
        device: str = "auto",
    ) -> Index:
        """A new, empty index in memory for `run_dir`'s model; `commit()` writes it."""
        path, run_dir = Path(path), Path(run_dir)
        if (path / MANIFEST).exists():
            raise RshashError(f"{path}: an index already exists here (use `rshash index add`)")
        run = HashRun.open(run_dir)
        make_engine(engine, run.bits, engine_params)  # validate the name and parameters now
        manifest = {
            "format": FORMAT,
            "generation": 0,
            "bits": run.bits,
            "engine": {"name": engine, "params": engine_params or {}},
            "model": {
                "fingerprint": model_fingerprint(run_dir),
                "source_run": str(run_dir.resolve()),
                "method": run.config.method,
                "image_encoder": run.info["image_encoder"],
                "text_encoder": run.info["text_encoder"],
            },
            "collections": {},
            "sources": [],
        }
        index = cls(path, manifest, run, device)
        index.model_source = run_dir
        return index

    @classmethod
    def open(
        cls, path: str | Path, expect_model: str | Path | None = None, device: str = "auto"
    ) -> Index:
        """Open an index; with `expect_model` (a run directory), refuse one built by another."""
        path = Path(path)
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            raise RshashError(f"{path}: not an rshash index (no {MANIFEST})")
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as exc:
            raise RshashError(f"{manifest_path}: not valid JSON ({exc})") from None
        if manifest.get("format") != FORMAT:
            raise RshashError(f"{manifest_path}: format {manifest.get('format')!r}, not {FORMAT}")
        if expect_model is not None:
            other = model_fingerprint(Path(expect_model))
            if other != manifest["model"]["fingerprint"]:
                raise RshashError(
                    f"{path}: index was built with the model of {manifest['model']['source_run']}"
                    f", not with {expect_model}; rebuild it or use that model"
                )
        index = cls(path, manifest, HashRun.open(path / "model"), device)
        index.collections = index._load_collections(manifest)
        return index

    def _load_collections(self, manifest: dict[str, Any]) -> dict[str, Collection]:
        """The collections of `manifest`'s generation, read from this index's files."""
        gen = manifest["generation"]
        collections = {}
        for name, info in manifest["collections"].items():
            col = Collection(name, self._engine())
            col.codes = np.load(self.path / f"{name}.codes.{gen}.npy")
            col.keys = np.load(self.path / f"{name}.keys.{gen}.npy")
            with open(self.path / f"{name}.items.{gen}.jsonl", encoding="utf-8") as f:
                col.items = [json.loads(line) for line in f]
            col.next_key, col.report = info["next_key"], info.get("report", {})
            state_file = self.path / f"{name}.engine.{gen}.bin"
            state = state_file.read_bytes() if state_file.exists() else None
            col.engine.restore(state, col.codes, col.keys)
            collections[name] = col
        return collections

    @property
    def generation(self) -> int:
        return int(self.manifest["generation"])

    def refresh(self) -> bool:
        """Switch to a generation another process committed since; True if it switched.

        The new collections are loaded aside and swapped in with one assignment, so a search
        in flight finishes on the old ones. A commit racing this read is caught up next call.
        """
        try:
            manifest = json.loads((self.path / MANIFEST).read_text())
        except (OSError, json.JSONDecodeError):
            return False
        if manifest.get("generation") == self.generation:
            return False
        try:
            collections = self._load_collections(manifest)
        except OSError:  # a newer commit already deleted this generation's files
            return False
        self.collections = collections
        self.manifest = manifest
        return True

    def _engine(self) -> Engine:
        spec = self.manifest["engine"]
        return make_engine(spec["name"], self.bits, spec["params"])

    # --- changing --------------------------------------------------------------------------

    def add(
        self,
        collection: str,
        codes: np.ndarray,
        items: list[dict[str, Any]],
        first_key: int | None = None,
    ) -> np.ndarray:
        """Add packed codes with their records (each with a unique "id"); returns their keys.

        Keys count up from `first_key` (default: after the last key); shards of one archive use
        it to keep keys global, which is also the order ties are broken in.
        """
        if collection not in COLLECTIONS:
            raise RshashError(f"unknown collection {collection!r}; expected one of {COLLECTIONS}")
        if codes.ndim != 2 or codes.shape[1] * 8 != self.bits:
            raise RshashError(f"codes must be (n, {self.bits // 8}) packed bytes")
        col = self.collections.get(collection)
        if col is None:
            col = self.collections[collection] = Collection(collection, self._engine())
        return col.add(np.ascontiguousarray(codes, np.uint8), items, first_key)

    def remove(self, ids: list[str]) -> int:
        """Remove images (and their captions) or single captions by id; returns images removed."""
        wanted = set(ids)
        removed = 0
        for col in self.collections.values():
            drop = np.array(
                [it["id"] in wanted or it.get("image") in wanted for it in col.items], bool
            )
            n = col.remove(drop)
            removed += n if col.name == "images" else 0
        return removed

    def commit(self, source: dict[str, Any] | None = None) -> None:
        """Write the next generation, switch the manifest to it, delete the previous one."""
        self.path.mkdir(parents=True, exist_ok=True)
        old = self.manifest["generation"]
        gen = old + 1
        model_dir = self.path / "model"
        if not (model_dir / MODEL).exists():
            source_run = self.model_source
            if source_run is None:
                raise RshashError(f"{self.path}: model copy is missing")
            tmp = self.path / ".model.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            for name in (MODEL, "config.json", "split.json"):
                shutil.copy2(Path(source_run) / name, tmp / name)
            tmp.rename(model_dir)
        collections = {}
        for name, col in self.collections.items():
            with (
                atomic_path(self.path / f"{name}.codes.{gen}.npy") as tmp_file,
                open(tmp_file, "wb") as f,
            ):
                np.save(f, col.codes)
            with (
                atomic_path(self.path / f"{name}.keys.{gen}.npy") as tmp_file,
                open(tmp_file, "wb") as f,
            ):
                np.save(f, col.keys)
            with (
                atomic_path(self.path / f"{name}.items.{gen}.jsonl") as tmp_file,
                open(tmp_file, "w", encoding="utf-8") as f,
            ):
                for it in col.items:
                    f.write(json.dumps(it, ensure_ascii=False) + "\n")
            state = col.engine.state()
            if state is not None:
                with atomic_path(self.path / f"{name}.engine.{gen}.bin") as tmp_file:
                    tmp_file.write_bytes(state)
            collections[name] = {"count": len(col), "next_key": col.next_key, "report": col.report}
        self.manifest.update(generation=gen, collections=collections, updated=time.time())
        if source is not None:
            self.manifest["sources"].append(source)
        self.manifest["provenance"] = provenance()
        write_json_atomic(self.path / MANIFEST, self.manifest)
        for stale in self.path.glob(f"*.{old}.*"):
            stale.unlink()

    # --- searching -------------------------------------------------------------------------

    def _collection(self, name: str) -> Collection:
        col = self.collections.get(name)
        if col is None or len(col) == 0:
            have = ", ".join(n for n, c in self.collections.items() if len(c)) or "none"
            raise RshashError(f"{self.path}: index holds no {name} (collections: {have})")
        return col

    def search_codes(
        self, codes: np.ndarray, k: int = 20, collection: str = "images", radius: int | None = None
    ) -> list[list[Hit]]:
        check_query(k, radius)
        col = self._collection(collection)
        if radius is not None:
            return [col.hits(found) for found in col.engine.range_search(codes, radius)]
        dist, keys = col.engine.search(codes, min(k, len(col)))
        return [col.hits((d, key)) for d, key in zip(dist, keys, strict=True)]

    def item(self, item_id: str, collection: str = "images") -> dict[str, Any]:
        col = self.collections.get(collection)
        for it in col.items if col else []:
            if it["id"] == item_id:
                return it
        raise RshashError(f"{self.path}: no {collection[:-1]} with id {item_id!r}")

    def __len__(self) -> int:
        return len(self.collections["images"]) if "images" in self.collections else 0
