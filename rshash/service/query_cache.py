"""An LRU of text query → packed code, so a repeated query skips the text encoder.

Keys are the normalised query (whitespace runs collapsed, ends stripped) together with the model
fingerprint and the backend, and a miss encodes that same normalised text: a hit returns exactly
the code an uncached encode of the query gives.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence

import numpy as np

MAX_QUERY_CACHE = 1_000_000  # entries (each ≤ max_query_chars of text and one code)


def normalise(text: str) -> str:
    return " ".join(text.split())


class QueryCache:
    """Thread-safe LRU of `capacity` codes; `capacity` 0 caches nothing."""

    def __init__(
        self,
        capacity: int,
        scope: tuple[str, ...] = (),
        on_lookup: Callable[[int, int], None] | None = None,
    ) -> None:
        self.capacity = capacity
        self.scope = scope  # model fingerprint and backend the codes belong to
        self.on_lookup = on_lookup  # (hits, misses) of each lookup, for metrics
        self._codes: OrderedDict[tuple[str, ...], np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._codes)

    def encode(self, texts: Sequence[str], encode: Callable[[list[str]], np.ndarray]) -> np.ndarray:
        """Packed codes of `texts`: cached ones from the cache, the rest from one `encode` call
        on their normalised, de-duplicated texts."""
        keys = [(*self.scope, normalise(t)) for t in texts]
        found: dict[tuple[str, ...], np.ndarray] = {}
        with self._lock:
            for key in keys:
                code = self._codes.get(key)
                if code is not None:
                    self._codes.move_to_end(key)
                    found[key] = code
        missing = list(dict.fromkeys(k for k in keys if k not in found))
        if missing:
            codes = encode([k[-1] for k in missing])
            fresh = dict(zip(missing, codes, strict=True))
            found.update(fresh)
            self._store(fresh)
        if self.on_lookup is not None:
            missed = set(missing)
            misses = sum(k in missed for k in keys)
            self.on_lookup(len(keys) - misses, misses)
        return np.stack([found[k] for k in keys])

    def _store(self, codes: dict[tuple[str, ...], np.ndarray]) -> None:
        if self.capacity <= 0:
            return
        with self._lock:
            for key, code in codes.items():
                self._codes[key] = code.copy()
                self._codes.move_to_end(key)
            while len(self._codes) > self.capacity:
                self._codes.popitem(last=False)
