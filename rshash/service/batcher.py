"""Dynamic batching: concurrent requests gathered into one call, with a bounded queue.

Every search endpoint submits its request to one `Batcher`. A single worker task takes what is
waiting (up to `max_batch`), hands the list to the batch function in a worker thread, and gives
each caller its own result or exception. A lone request on an idle service goes straight through;
only while requests arrive concurrently (the previous batch held more than one) does the worker
wait up to `max_wait_ms` for the batch to fill. Past `max_queue` waiting requests, or (with
`max_queue_ms`) when a new request would wait longer than that for its batch to start, `submit`
raises `QueueFull` at once (the service answers 503), so accepted requests keep their latency.
The wait is predicted from a batch-cost model fitted to recent batches (a fixed cost per batch
plus a cost per item): a per-item average taken from lone requests would count the fixed cost
once per queued request and refuse a burst that one batch serves quickly.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class QueueFull(Exception):
    """The batcher's queue is at its bound; the caller should retry later."""


@dataclass(frozen=True)
class BatchConfig:
    max_batch: int = 64
    max_wait_ms: float = 2.0
    max_queue: int = 256
    max_queue_ms: float | None = None


BatchFn = Callable[[list[T]], Sequence[R | BaseException]]


class BatchCost:
    """Seconds a batch of n items takes, `fixed + per_item * n`, fitted by least squares with
    exponential forgetting over recent batches (weight `1 - decay` for the newest)."""

    def __init__(self, decay: float = 0.9) -> None:
        self.decay = decay
        self._sums = [0.0] * 5  # weights, n, t, n*n, n*t

    @property
    def seen(self) -> bool:
        return self._sums[0] > 0

    def observe(self, n: int, seconds: float) -> None:
        new = (1.0, n, seconds, n * n, n * seconds)
        d = self.decay
        self._sums = [d * s + (1 - d) * x for s, x in zip(self._sums, new, strict=True)]

    def coefficients(self) -> tuple[float, float]:
        """(fixed, per_item), both ≥ 0. Seen one batch size only, all its time counts as fixed:
        the optimistic guess keeps a burst after lone requests from being refused (which would
        keep batches lone), and the next, larger batches correct it."""
        w, n, t, nn, nt = self._sums
        mean_n, mean_t = n / w, t / w
        spread = nn / w - mean_n**2
        if spread <= 1e-9 * max(mean_n**2, 1.0):
            return mean_t, 0.0
        per_item = max((nt / w - mean_n * mean_t) / spread, 0.0)
        fixed = max(mean_t - per_item * mean_n, 0.0)
        return fixed, per_item

    def __call__(self, n: int) -> float:
        fixed, per_item = self.coefficients()
        return fixed + per_item * n


class Batcher(Generic[T, R]):
    """Gathers submitted items into batches for `fn(items) -> results` (one per item, in order).

    `fn` runs in a worker thread, one batch at a time; it returns a result or an exception per
    item, so one bad request fails alone. `between` (optional) runs in the same thread before each
    batch: the place for work that must not overlap a batch, such as switching index generation.
    """

    def __init__(
        self,
        fn: BatchFn[T, R],
        config: BatchConfig | None = None,
        between: Callable[[], object] | None = None,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        self.fn = fn
        self.config = config or BatchConfig()
        self.between = between
        self.on_batch = on_batch
        self._queue: list[tuple[T, asyncio.Future[R]]] = []
        self._wake: asyncio.Event | None = None
        self._worker: asyncio.Task[None] | None = None
        self._last_batch = 0
        self._preparing = 0
        self.cost = BatchCost()

    @property
    def depth(self) -> int:
        """Requests waiting for a batch, and those admitted and still being prepared for one."""
        return len(self._queue) + self._preparing

    @property
    def expected_wait(self) -> float:
        """Seconds a request submitted now waits before its batch starts, by the batch-cost
        model: the full batches ahead of it (0 before any batch was timed)."""
        if not self.cost.seen:
            return 0.0
        return self.depth // self.config.max_batch * self.cost(self.config.max_batch)

    def admit(self) -> None:
        """Raise QueueFull if a request arriving now would be refused."""
        cfg = self.config
        if self.depth >= cfg.max_queue:
            raise QueueFull(f"{self.depth} queries waiting")
        if cfg.max_queue_ms is not None and self.expected_wait * 1000 > cfg.max_queue_ms:
            work = f"{self.expected_wait:.2f} s of batches ahead"
            raise QueueFull(f"{self.depth} queries waiting, {work}")

    @contextlib.contextmanager
    def preparing(self) -> Iterator[None]:
        """Admit a request before its costly preparation (decoding an upload), counting it as
        waiting meanwhile, so that load shedding applies before that work is done."""
        self.admit()
        self._preparing += 1
        try:
            yield
        finally:
            self._preparing -= 1

    async def submit(self, item: T) -> R:
        self.admit()
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done():
            self._wake = asyncio.Event()
            self._worker = loop.create_task(self._run())
        future: asyncio.Future[R] = loop.create_future()
        self._queue.append((item, future))
        assert self._wake is not None
        self._wake.set()
        return await future

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker

    async def _gather(self) -> list[tuple[T, asyncio.Future[R]]]:
        """Wait for work, then take up to max_batch (waiting max_wait_ms while under load)."""
        assert self._wake is not None
        while not self._queue:
            self._wake.clear()
            await self._wake.wait()
        cfg = self.config
        if self._last_batch > 1 and len(self._queue) < cfg.max_batch and cfg.max_wait_ms > 0:
            deadline = time.perf_counter() + cfg.max_wait_ms / 1000
            while len(self._queue) < cfg.max_batch:
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), left)
                except TimeoutError:
                    break
        batch, self._queue = self._queue[: cfg.max_batch], self._queue[cfg.max_batch :]
        return [(item, fut) for item, fut in batch if not fut.cancelled()]

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._gather()
            self._last_batch = len(batch)
            if not batch:
                continue
            if self.on_batch is not None:
                self.on_batch(len(batch))
            items = [item for item, _ in batch]
            start = time.perf_counter()
            try:
                results = await loop.run_in_executor(None, self._call, items)
            except Exception as exc:  # the whole batch failed: every caller gets the error
                results = [exc] * len(batch)
            self.cost.observe(len(batch), time.perf_counter() - start)
            for (_, fut), res in zip(batch, results, strict=True):
                if fut.done():
                    continue
                if isinstance(res, BaseException):
                    fut.set_exception(res)
                else:
                    fut.set_result(res)

    def _call(self, items: list[T]) -> Sequence[R | BaseException]:
        if self.between is not None:
            self.between()
        results = self.fn(items)
        if len(results) != len(items):
            raise RuntimeError(f"batch function returned {len(results)} results for {len(items)}")
        return results
