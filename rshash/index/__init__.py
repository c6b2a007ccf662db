"""Archive index: packed codes, search engines, index directories, sharded search."""

from rshash.index.engines import ENGINES, Engine, ExactEngine, make_engine
from rshash.index.index import Hit, Index
from rshash.index.packing import pack_codes, unpack_codes

__all__ = [
    "ENGINES",
    "Engine",
    "ExactEngine",
    "Hit",
    "Index",
    "make_engine",
    "pack_codes",
    "unpack_codes",
]
