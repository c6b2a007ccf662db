"""Background threads for work that must not delay the batches (body sizes: `body_limit`)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from rshash.service.batcher import QueueFull

T = TypeVar("T")


class BackgroundThreads:
    """Worker threads for work that must not delay the batches (resolving filters): `threads`
    of them at a lower CPU priority (Linux: each thread's own nice value, +`nice`), and at most
    `max_waiting` calls waiting for one (QueueFull beyond, which the service answers 503)."""

    def __init__(self, threads: int, max_waiting: int, nice: int = 10) -> None:
        self.max_waiting = max_waiting
        self.nice = nice
        self._pool = ThreadPoolExecutor(threads, "rshash-background", initializer=self._lower)
        self._calls = 0
        self._threads = threads

    def _lower(self) -> None:
        """+`nice` on this thread's own nice value (an absolute value would raise the priority
        of a service that runs niced)."""
        with contextlib.suppress(OSError, AttributeError):  # not Linux, or not allowed
            tid = threading.get_native_id()
            lower = min(os.getpriority(os.PRIO_PROCESS, tid) + self.nice, 19)
            os.setpriority(os.PRIO_PROCESS, tid, lower)

    @property
    def waiting(self) -> int:
        return max(self._calls - self._threads, 0)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        if self.waiting >= self.max_waiting:
            raise QueueFull(f"{self.waiting} filters waiting")
        self._calls += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        finally:
            self._calls -= 1

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
