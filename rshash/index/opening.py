"""Open any index by its path: a directory with `index.json` (`Index`) or with `shards.json`
(`ShardedIndex`), as one `CodeIndex`, so that no caller asks which kind it is."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rshash.features.backends import AUTO
from rshash.index.base import CodeIndex
from rshash.index.cluster import SHARDS
from rshash.index.index import Index
from rshash.index.store import LOCK_TIMEOUT_S


@dataclass(frozen=True)
class OpenConfig:
    """How to open an index; the `ray_address`, `shard_*` and `replicas` settings apply to a
    sharded index only."""

    device: str = "auto"
    backend: str = AUTO
    lock_timeout_s: float = LOCK_TIMEOUT_S
    ray_address: str | None = None  # None: a local Ray, started at the first search
    shard_timeout_s: float = 30.0  # longest wait for a shard's answer
    shard_cpus: float = 0.5  # CPUs each shard replica reserves
    replicas: int = 1  # actors per shard, on different nodes


def is_sharded(path: str | Path) -> bool:
    return (Path(path) / SHARDS).is_file()


def open_index(path: str | Path, cfg: OpenConfig | None = None) -> CodeIndex:
    """The index at `path`, local or sharded (its shards' actors start at the first search)."""
    cfg = cfg or OpenConfig()
    if is_sharded(path):
        from rshash.index.sharded import ShardedIndex

        return ShardedIndex(
            path,
            cfg.ray_address,
            cfg.shard_timeout_s,
            cfg.shard_cpus,
            cfg.backend,
            cfg.device,
            cfg.replicas,
            cfg.lock_timeout_s,
        )
    return Index.open(
        path, device=cfg.device, lock_timeout_s=cfg.lock_timeout_s, backend=cfg.backend
    )
