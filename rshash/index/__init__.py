"""Archive index: packed codes, search engines, index directories, sharded search."""

from rshash.index.base import CodeIndex, Hit, Searcher
from rshash.index.engines import ENGINES, Engine, ExactEngine, make_engine
from rshash.index.index import Index
from rshash.index.opening import OpenConfig, open_index
from rshash.index.packing import pack_codes, unpack_codes

__all__ = [
    "ENGINES",
    "CodeIndex",
    "Engine",
    "ExactEngine",
    "Hit",
    "Index",
    "OpenConfig",
    "Searcher",
    "make_engine",
    "open_index",
    "pack_codes",
    "unpack_codes",
]
