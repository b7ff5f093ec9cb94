"""Working memory (``memory=``): reserved in the context's budget while the work runs."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import asyncfront as af
from asyncfront.testing import FakeDevice, run_virtual

GiB = af.GiB
BEST = af.QoS.BEST_EFFORT


def test_reserved_from_waits_met_to_finish_and_not_passed_to_the_work() -> None:
    """The bytes count in the context's usage only while the work runs; fn never sees them."""

    async def main() -> None:
        async with af.open_runtime([FakeDevice("gpu0", memory=8 * GiB)]) as rt:
            ctx = rt.create_context("llm", device="gpu0", max_memory=4 * GiB, qos=BEST)
            gate = rt.semaphore(name="gate")
            seen: list[int] = []

            def work() -> str:  # takes no keyword: memory= must not reach it
                seen.append(rt.usage(ctx).used)
                return "done"

            sub = ctx.queue.submit(work, waits=[(gate, 1)], memory=GiB, cost=1.0)
            await asyncio.sleep(5)
            assert rt.usage(ctx).used == 0  # waiting on the gate reserves nothing
            gate.signal(1)
            assert await sub == "done"
            assert seen == [GiB]
            assert rt.usage(ctx).used == 0
            assert sub.memory == GiB and sub.annotations == {"memory": GiB}

    run_virtual(main)


def test_a_memory_wait_holds_no_device_slot() -> None:
    """Work waiting for working memory leaves the device to other queues' ready work."""

    async def main() -> None:
        device = FakeDevice("gpu0", memory=4 * GiB, concurrency=1)
        async with af.open_runtime([device]) as rt:
            holder = rt.create_context("holder", device="gpu0", max_memory=4 * GiB, qos=BEST)
            big = rt.create_context("big", device="gpu0", max_memory=4 * GiB, qos=BEST)
            small = rt.create_context("small", device="gpu0", max_memory=GiB, qos=BEST)
            async with rt.session(holder) as s:
                held = await s.allocate(3 * GiB)
                x = big.queue.submit(None, memory=2 * GiB, cost=1.0, name="x")
                await asyncio.sleep(0.5)
                y = small.queue.submit(None, cost=1.0, name="y")  # submitted after x
                await y
                assert x.state is af.SubmissionState.READY  # still waiting for memory
                await asyncio.sleep(3)
                s.free(held)
            await x
            assert y.finished_at is not None and x.started_at is not None
            assert y.finished_at <= x.started_at
            assert x.started_at >= 4.5

    run_virtual(main)


def test_over_the_budget_fails_the_submission_and_the_queue_goes_on() -> None:
    """A reservation over max_memory fails its work with MemoryBudgetError; the next runs."""

    async def main() -> None:
        async with af.open_runtime([FakeDevice("gpu0", memory=8 * GiB)]) as rt:
            ctx = rt.create_context("llm", device="gpu0", max_memory=GiB, qos=BEST)
            done = rt.semaphore(name="done")
            ran: list[str] = []
            bad = ctx.queue.submit(
                lambda: ran.append("bad"), memory=2 * GiB, signals=[(done, 1)], name="bad"
            )
            good = ctx.queue.submit(lambda: ran.append("good"), memory=GiB // 2)
            with pytest.raises(af.MemoryBudgetError, match=r"'llm' asked 2\.0 GiB, budget 1\.0"):
                await bad
            await good
            assert ran == ["good"]
            assert done.failure is not None
            assert rt.usage(ctx).used == 0

    run_virtual(main)


def test_working_memory_and_pool_blocks_share_one_device() -> None:
    """Reserved working memory keeps allocations of other contexts from overcommitting."""

    async def main() -> None:
        async with af.open_runtime([FakeDevice("gpu0", memory=4 * GiB)]) as rt:
            work = rt.create_context("work", device="gpu0", max_memory=4 * GiB, qos=BEST)
            alloc = rt.create_context("alloc", device="gpu0", max_memory=4 * GiB, qos=BEST)
            running = work.queue.submit(None, memory=3 * GiB, cost=10.0)
            await asyncio.sleep(1)
            async with rt.session(alloc) as s:
                with pytest.raises(af.MemoryBudgetError, match="within 2"):
                    await s.allocate(2 * GiB, timeout=2)
                await running
                buf = await s.allocate(2 * GiB)  # the reservation went with the work
                assert buf.nbytes == 2 * GiB

    run_virtual(main)


def test_a_reservation_evicts_like_an_allocation() -> None:
    """Working memory of a Burstable context makes a BestEffort context give memory back."""

    async def main() -> None:
        async with af.open_runtime([FakeDevice("gpu0", memory=4 * GiB)]) as rt:
            low = rt.create_context("low", device="gpu0", max_memory=4 * GiB, qos=BEST)
            high = rt.create_context(
                "high", device="gpu0", max_memory=2 * GiB, qos=af.QoS.BURSTABLE
            )
            session = rt.session(low)
            await session.__aenter__()
            cached = await session.allocate(3 * GiB)
            freed: list[int] = []

            @low.on_evict
            def give_back(nbytes: int) -> int:
                freed.append(nbytes)
                session.free(cached)
                return cached.nbytes

            await high.queue.submit(None, memory=2 * GiB, cost=1.0)
            assert freed == [2 * GiB]
            assert rt.usage(low).used == 0 and rt.usage(high).used == 0
            session.close()

    run_virtual(main)


def test_session_run_and_submit_take_memory() -> None:
    """s.run(fn, memory=) and s.submit(fn, memory=) reserve on the session's context."""

    async def main() -> None:
        async with af.open_runtime([FakeDevice("gpu0", memory=8 * GiB)]) as rt:
            ctx = rt.create_context("llm", device="gpu0", max_memory=4 * GiB, qos=BEST)
            async with rt.session(ctx) as s:
                assert await s.run(lambda: rt.usage(ctx).used, memory=GiB) == GiB
                sub = s.submit(lambda: rt.usage(ctx).used, memory=2 * GiB)
                assert await sub == 2 * GiB

    run_virtual(main)


@pytest.mark.parametrize(
    ("memory", "error", "pattern"),
    [
        (GiB, TypeError, "belongs to no context"),
        (0, ValueError, "int > 0"),
        (1.5, ValueError, "int > 0"),
        (True, ValueError, "int > 0"),
    ],
)
def test_bad_memory_arguments_are_refused_and_queue_nothing(
    memory: Any, error: type[Exception], pattern: str
) -> None:
    """memory= without a context is a TypeError, a non-positive or non-int a ValueError."""

    async def main() -> None:
        async with af.open_runtime([FakeDevice("gpu0", memory=8 * GiB)]) as rt:
            ctx = rt.create_context("llm", device="gpu0", max_memory=4 * GiB)
            queue = rt.queue("gpu0") if error is TypeError else ctx.queue
            with pytest.raises(error, match=pattern):
                queue.submit(None, memory=memory)
            assert queue.statistics().submitted_epoch == 0

    run_virtual(main)
