"""A writer process for the sharded-index crash test.

`python -m tests.cluster_writer SHARDED START COUNT POINT [ID...]` adds COUNT images with ids
img-START.. and random codes to the sharded index at SHARDED, removes the images ID... (held by
other shards, so that one change touches several), and commits. POINT `flip` makes the process
SIGKILL itself after every shard it changed committed its own generation, before `shards.json`
names them (the cluster manifest's atomic replacement); `-` lets it finish.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

import numpy as np

from rshash.index import cluster
from rshash.index.sharded import ShardedIndex


def _die(*args: Any, **kwargs: Any) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    path, start, count = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    point, remove = sys.argv[4], sys.argv[5:]
    index = ShardedIndex(path)  # no Ray: writing needs only the shard directories
    codes = np.random.default_rng(start).integers(0, 256, (count, index.bits // 8), np.uint8)
    index.add("images", codes, [{"id": f"img-{start + i}"} for i in range(count)])
    if remove:
        index.remove(remove)
    if point == "flip":
        cluster.write_cluster = _die  # type: ignore[assignment]
    index.commit({"added": count})


if __name__ == "__main__":
    main()
