"""The virtual-time loop: the clock jumps once nothing is ready, with one idle I/O poll."""

from __future__ import annotations

import asyncio
import time

import pytest

import asyncfront as af
from asyncfront.testing import FakeDevice, new_virtual_loop, run_virtual


def test_a_timeout_around_a_shorter_sleep_lets_the_sleep_finish() -> None:
    """A 2 s timeout around a 1 s sleep ends with the sleep, at virtual time 1 s."""

    async def main() -> float:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(2):
            await asyncio.sleep(1)
        return loop.time()

    assert run_virtual(main) == pytest.approx(1.0)


def test_a_sequential_chain_of_timers_runs_in_order_in_virtual_time() -> None:
    """A chain of dependent fake-device steps finishes at the sum of their costs, in order."""

    async def main() -> tuple[float, list[int]]:
        order: list[int] = []
        async with af.open_runtime([FakeDevice("a"), FakeDevice("b")]) as rt:
            qa, qb = rt.queue("a"), rt.queue("b")
            sem = rt.semaphore(name="s")
            last = None
            for i in range(1, 51):
                queue = qa if i % 2 else qb
                last = queue.submit(
                    order.append, i, waits=[(sem, i - 1)], signals=[(sem, i)], cost=0.5
                )
            assert last is not None
            await last
            return asyncio.get_running_loop().time(), order

    now, order = run_virtual(main)
    assert order == list(range(1, 51))
    assert now == pytest.approx(25.0)


def test_noop_cycles_may_be_raised_for_threads() -> None:
    """A loop with looptime's 42 idle polls still runs timers in virtual time."""

    async def main() -> float:
        await asyncio.sleep(3)
        return asyncio.get_running_loop().time()

    assert run_virtual(main, noop_cycles=42) == pytest.approx(3.0)


@pytest.mark.parametrize("bad", [-1, 1.5, True, "1"])
def test_a_bad_noop_cycles_is_refused(bad: object) -> None:
    """A negative or non-int ``noop_cycles`` raises ValueError naming the value."""
    with pytest.raises(ValueError, match="noop_cycles must be an int >= 0"):
        new_virtual_loop(noop_cycles=bad)  # type: ignore[arg-type]


def test_a_thread_awaited_through_the_executor_holds_the_clock_until_it_ends() -> None:
    """While an executor thread runs, a later timer does not make the clock jump past it."""

    async def main() -> float:
        loop = asyncio.get_running_loop()
        sleeper = asyncio.ensure_future(asyncio.sleep(10))
        await loop.run_in_executor(None, time.sleep, 0.05)
        arrived = loop.time()
        await sleeper
        return arrived

    assert run_virtual(main) < 10.0
