"""The batcher's queue bound by predicted wait (`max_queue_ms`), on a batch function of known
cost: a fixed cost per batch plus a cost per item, like an encoder's forward pass."""

from __future__ import annotations

import asyncio
import time

import pytest

from rshash.service.batcher import BatchConfig, BatchCost, Batcher, QueueFull

FIXED, PER_ITEM = 0.02, 0.001  # seconds: a batch of n takes 20 ms + 1 ms per item


def slow_echo(items: list[int]) -> list[int]:
    time.sleep(FIXED + PER_ITEM * len(items))
    return items


def test_batch_cost_recovers_fixed_and_per_item_seconds():
    """Guards against a cost model that cannot tell a batch's fixed cost from its per-item
    cost (then a queue of lone-request costs looks far longer than one batch of it)."""
    cost = BatchCost()
    for n in (1, 1, 50, 8, 1, 64, 30):
        cost.observe(n, FIXED + PER_ITEM * n)
    fixed, per_item = cost.coefficients()
    assert fixed == pytest.approx(FIXED, rel=1e-6)
    assert per_item == pytest.approx(PER_ITEM, rel=1e-6)
    assert cost(100) == pytest.approx(FIXED + 100 * PER_ITEM)


def test_batch_cost_with_one_batch_size_counts_its_time_as_fixed():
    cost = BatchCost()
    for _ in range(3):
        cost.observe(1, 0.021)
    assert cost.coefficients() == (pytest.approx(0.021), 0.0)


async def _burst(batcher: Batcher[int, int], n: int) -> list[int | str]:
    async def one(i: int) -> int | str:
        try:
            return await batcher.submit(i)
        except QueueFull:
            return "shed"

    return await asyncio.gather(*(one(i) for i in range(n)))


def test_a_burst_one_batch_serves_is_not_shed_after_lone_requests():
    """Guards against the bug the load benchmark found: with the wait predicted as queue length
    times the per-item time of recent lone requests (21 ms each here), a burst of 50 clients
    looked like a second of work and was refused, batches stayed lone, and the service shed
    nearly everything; one batch of 50 takes 70 ms."""

    async def scenario() -> list[int | str]:
        batcher = Batcher(slow_echo, BatchConfig(max_batch=64, max_wait_ms=5, max_queue_ms=250))
        for i in range(3):  # lone requests teach the batcher a 21 ms batch of one
            assert await batcher.submit(i) == i
        got = await _burst(batcher, 50)
        await batcher.close()
        return got

    assert asyncio.run(scenario()) == list(range(50))


def test_overload_is_shed_by_predicted_wait():
    """Guards against the bound doing nothing: 2000 requests at once need about 32 batches of
    84 ms, far past 250 ms, so most are refused at once while the first ones are served."""

    async def scenario() -> list[int | str]:
        batcher = Batcher(
            slow_echo, BatchConfig(max_batch=64, max_wait_ms=5, max_queue=10_000, max_queue_ms=250)
        )
        await _burst(batcher, 64)  # the model sees full batches
        got = await _burst(batcher, 2000)
        await batcher.close()
        return got

    got = asyncio.run(scenario())
    served = [g for g in got if g != "shed"]
    assert 64 <= len(served) < 500
    assert served == sorted(served)  # the earliest submitted are the ones served
