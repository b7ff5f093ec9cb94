"""Memory liveness: every allocation is served, refused with the numbers, or times out.

Budgets charge what the pool holds, fragmentation is a handled case, requests that can
never fit are refused at once, timeouts are deadlines on the loop clock, foreign frees
and bad arguments are refused without changing anything.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

import asyncfront as af
from asyncfront.memory import BufferPool, InvalidSizeError
from asyncfront.testing import FakeDevice, run_virtual

KiB = af.KiB
MiB = af.MiB


def _waiters(rt: af.Runtime) -> int:
    return sum(ctx.statistics().waiting for ctx in rt.contexts)


# -- point: the budget charges what the pool holds ----------------------------------------


def test_the_budget_charges_block_spans_so_tiny_allocations_cannot_overcommit_the_pool() -> None:
    """256 one-byte blocks fill a 64 KiB pool and its budget; the 257th is refused at once."""

    async def main() -> None:
        async with af.open_runtime([FakeDevice("g", memory=64 * KiB)]) as rt:
            ctx = rt.create_context("llm", device="g", max_memory=64 * KiB)
            pool = ctx.device.memory
            async with rt.session(ctx) as s:
                bufs = [await s.allocate(1) for _ in range(256)]
                assert {b.charged for b in bufs} == {256}
                assert rt.usage(ctx).used == pool.statistics().bytes_in_use == 64 * KiB
                with pytest.raises(
                    af.MemoryBudgetError,
                    match=r"'llm' asked 1 B, budget 64\.0 KiB, 64\.0 KiB in use.*over the "
                    r"context's max_memory \(a block of 256 B with the pool's alignment\)",
                ):
                    await s.allocate(1, timeout=1.0)
                assert rt.now() == 0.0
                assert rt.usage(ctx).used == pool.statistics().bytes_in_use == 64 * KiB
                for buf in bufs:
                    s.free(buf)
                assert rt.usage(ctx).used == pool.statistics().bytes_in_use == 0

    run_virtual(main)


def test_an_unaligned_capacity_is_charged_whole_spans_and_never_overcommitted() -> None:
    """With a capacity that is not a multiple of the alignment, every block is charged a
    whole span: the budget stays equal to what the pool holds and within the capacity."""

    async def main() -> None:
        async with af.open_runtime([FakeDevice("g", memory=1000)]) as rt:
            ctx = rt.create_context("c", device="g", max_memory=1000)
            async with rt.session(ctx) as s:
                bufs = [await s.allocate(250) for _ in range(3)]
                assert [b.charged for b in bufs] == [256, 256, 256]
                with pytest.raises(af.MemoryBudgetError, match="a block of 256 B"):
                    await s.allocate(250)
                assert rt.usage(ctx).used == 768 == ctx.device.memory.statistics().bytes_in_use
                s.free(bufs[0])
                whole = await s.allocate(200)
                assert whole.offset == 0 and whole.charged == 256

    run_virtual(main)


def test_fragmentation_no_free_by_others_can_fix_is_refused_at_once() -> None:
    """Holes between the requester's own blocks: refused at once naming the fragmentation."""

    async def main() -> None:
        async with af.open_runtime([FakeDevice("g", memory=64 * KiB)]) as rt:
            ctx = rt.create_context("llm", device="g", max_memory=64 * KiB)
            pool = ctx.device.memory
            async with rt.session(ctx) as s:
                bufs = [await s.allocate(4 * KiB) for _ in range(16)]
                for buf in bufs[::2]:
                    s.free(buf)
                before = (rt.usage(ctx), pool.statistics().bytes_in_use)
                with pytest.raises(
                    af.MemoryBudgetError,
                    match=r"asked 8\.0 KiB.*pool 'g' is fragmented: 32\.0 KiB are free but the "
                    r"largest free extent is 4\.0 KiB, and the requester's own 8 live blocks "
                    r"leave at most 4\.0 KiB",
                ):
                    await s.allocate(8 * KiB, timeout=1.0)
                assert rt.now() == 0.0
                assert (rt.usage(ctx), pool.statistics().bytes_in_use) == before
                assert _waiters(rt) == 0

    run_virtual(main)


async def _interleaved(rt: af.Runtime, ctx: af.ExecutionContext) -> tuple[af.Session, af.Session]:
    """Two sessions of ``ctx`` holding alternate 4 KiB blocks of a 64 KiB pool; the first
    then frees its own, leaving 4 KiB holes between the second's blocks."""
    first, second = rt.session(ctx), rt.session(ctx)
    await first.__aenter__()
    await second.__aenter__()
    mine = []
    for _ in range(8):
        mine.append(await first.allocate(4 * KiB))
        await second.allocate(4 * KiB)
    for buf in mine:
        first.free(buf)
    return first, second


def test_a_fragmented_allocation_waits_for_a_free_that_opens_an_extent() -> None:
    """Others' blocks split the holes: it waits, and a free that coalesces one serves it."""

    async def main() -> None:
        async with af.open_runtime([FakeDevice("g", memory=64 * KiB)]) as rt:
            ctx = rt.create_context("llm", device="g", max_memory=64 * KiB)
            first, second = await _interleaved(rt, ctx)
            pending = asyncio.ensure_future(first.allocate(8 * KiB, timeout=5.0))
            await asyncio.sleep(1.0)
            assert not pending.done() and ctx.statistics().waiting == 1
            victim = sorted(second._buffers, key=lambda b: b.offset)[0]  # offset 4 KiB
            second.free(victim)
            buf = await pending
            assert rt.now() == 1.0
            assert buf.offset == 0 and buf.charged == 8 * KiB
            assert ctx.statistics().waiting == 0
            first.close()
            second.close()

    run_virtual(main)


def test_a_fragmented_allocation_times_out_at_its_deadline() -> None:
    """Nobody frees: the fragmented wait ends at its timeout with the reason, no entry left."""

    async def main() -> None:
        async with af.open_runtime([FakeDevice("g", memory=64 * KiB)]) as rt:
            ctx = rt.create_context("llm", device="g", max_memory=64 * KiB)
            first, second = await _interleaved(rt, ctx)
            before = rt.usage(ctx)
            with pytest.raises(
                af.MemoryBudgetError, match=r"no memory was freed within 0\.5 s \(fragmented\)"
            ):
                await first.allocate(8 * KiB, timeout=0.5)
            assert rt.now() == 0.5
            assert rt.usage(ctx) == before and _waiters(rt) == 0
            first.close()
            second.close()

    run_virtual(main)


def test_a_fragmented_allocation_is_served_by_evicting_a_best_effort_context() -> None:
    """BestEffort blocks split the free space: eviction frees them and the request fits."""

    async def main() -> None:
        async with af.open_runtime([FakeDevice("g", memory=64 * KiB)]) as rt:
            llm = rt.create_context("llm", device="g", max_memory=32 * KiB)
            cache = rt.create_context("cache", device="g", max_memory=32 * KiB, qos="best_effort")
            async with rt.session(llm) as s, rt.session(cache) as c:
                mine = []
                for _ in range(8):
                    mine.append(await s.allocate(4 * KiB))
                    await c.allocate(4 * KiB)
                for buf in mine:
                    s.free(buf)
                evicted: list[int] = []

                @cache.on_evict
                def drop(wanted: int) -> int:
                    evicted.append(wanted)
                    freed = 0
                    for buf in list(c._buffers):
                        c.free(buf)
                        freed += buf.charged
                    return freed

                buf = await s.allocate(16 * KiB, timeout=1.0)
                assert rt.now() == 0.0 and evicted == [16 * KiB]
                assert buf.charged == 16 * KiB and rt.usage(cache).used == 0

    run_virtual(main)


# -- point: a request that can never fit is refused ---------------------------------------


def test_a_request_above_what_could_ever_be_spare_is_refused_at_once() -> None:
    """3 MiB where reservations leave 2 MiB is refused at once; 1 MiB behind it is served."""

    async def main() -> None:
        async with af.open_runtime([FakeDevice("g", memory=8 * MiB)]) as rt:
            rt.create_context("llm", device="g", max_memory=6 * MiB)
            b = rt.create_context(
                "b", device="g", max_memory=4 * MiB, base_memory=0, qos="burstable"
            )
            x = rt.create_context("x", device="g", max_memory=1 * MiB, qos="best_effort")
            y = rt.create_context("y", device="g", max_memory=1 * MiB, qos="best_effort")
            async with rt.session(x) as sx, rt.session(b) as sb, rt.session(y) as sy:
                held = await sx.allocate(1 * MiB)
                with pytest.raises(
                    af.MemoryBudgetError,
                    match=r"'b' asked 3\.0 MiB.*it can never fit: 8\.0 MiB on the device less "
                    r"6\.0 MiB reserved by other contexts leaves at most 2\.0 MiB for it",
                ):
                    await sb.allocate(3 * MiB)
                assert rt.now() == 0.0 and rt.usage(b).used == 0 and _waiters(rt) == 0
                sx.free(held)
                buf = await sy.allocate(1 * MiB, timeout=1.0)
                assert buf.nbytes == 1 * MiB and rt.now() == 0.0

    run_virtual(main)


def test_a_waiter_is_refused_when_an_admission_makes_it_impossible() -> None:
    """A waiting 7 MiB request is refused the moment a new reservation leaves it 6 MiB."""

    async def main() -> None:
        async with af.open_runtime([FakeDevice("g", memory=8 * MiB)]) as rt:
            b = rt.create_context(
                "b", device="g", max_memory=8 * MiB, base_memory=0, qos="burstable"
            )
            x = rt.create_context("x", device="g", max_memory=2 * MiB, qos="best_effort")
            async with rt.session(x) as sx, rt.session(b) as sb:
                await sx.allocate(2 * MiB)
                pending = asyncio.ensure_future(sb.allocate(7 * MiB))
                await asyncio.sleep(1.0)
                assert not pending.done() and b.statistics().waiting == 1
                rt.create_context("llm", device="g", max_memory=2 * MiB)
                with pytest.raises(af.MemoryBudgetError, match=r"leaves at most 6\.0 MiB for it"):
                    await pending
                assert rt.now() == 1.0 and rt.usage(b).used == 0 and _waiters(rt) == 0

    run_virtual(main)


def test_no_overtaking_holds_among_waiters_that_can_fit() -> None:
    """A waiting Burstable request that can fit keeps a BestEffort newcomer behind it."""

    async def main() -> None:
        async with af.open_runtime([FakeDevice("g", memory=8 * MiB)]) as rt:
            b = rt.create_context(
                "b", device="g", max_memory=8 * MiB, base_memory=0, qos="burstable"
            )
            x = rt.create_context("x", device="g", max_memory=6 * MiB, qos="best_effort")
            y = rt.create_context("y", device="g", max_memory=1 * MiB, qos="best_effort")
            served: list[str] = []

            async def grab(s: af.Session, n: int, who: str) -> None:
                await s.allocate(n, timeout=10.0)
                served.append(who)

            async with rt.session(x) as sx, rt.session(b) as sb, rt.session(y) as sy:
                held = await sx.allocate(6 * MiB)
                big = asyncio.ensure_future(grab(sb, 4 * MiB, "b"))
                await asyncio.sleep(0.1)
                small = asyncio.ensure_future(grab(sy, 1 * MiB, "y"))  # 2 MiB are free
                await asyncio.sleep(1.0)
                assert served == [] and y.statistics().waiting == 1
                sx.free(held)
                await asyncio.gather(big, small)
                assert served == ["b", "y"]

    run_virtual(main)


# -- point: timeouts are deadlines on the loop clock --------------------------------------


def test_a_timed_allocation_ends_at_its_deadline_in_virtual_time() -> None:
    """allocate(timeout=0.1) called at t=0.2 raises at t=0.3 and leaves no waiter entry."""

    async def main() -> None:
        async with af.open_runtime([FakeDevice("gpu", memory=MiB)]) as rt:
            a = rt.create_context("a", device="gpu", max_memory=MiB, qos="best_effort")
            b = rt.create_context("b", device="gpu", max_memory=MiB, qos="best_effort")
            async with rt.session(a) as sa, rt.session(b) as sb:
                held = await sa.allocate(MiB)
                await asyncio.sleep(0.2)
                with pytest.raises(
                    af.MemoryBudgetError, match=r"no memory was freed within 0\.1 s \(no_space\)"
                ):
                    await sb.allocate(MiB, timeout=0.1)
                assert rt.now() == pytest.approx(0.3, abs=1e-9)
                assert b.statistics().waiting == 0 and b.statistics().waits == 1
                assert rt.usage(b).used == 0
                sa.free(held)

    run_virtual(main)


def test_a_timed_allocation_ends_at_its_deadline_on_a_real_loop() -> None:
    """The same timed wait on asyncio.run ends after its timeout with the same error."""

    async def main() -> float:
        async with af.open_runtime([FakeDevice("gpu", memory=MiB)]) as rt:
            a = rt.create_context("a", device="gpu", max_memory=MiB, qos="best_effort")
            b = rt.create_context("b", device="gpu", max_memory=MiB, qos="best_effort")
            async with rt.session(a) as sa, rt.session(b) as sb:
                await sa.allocate(MiB)
                start = asyncio.get_running_loop().time()
                with pytest.raises(af.MemoryBudgetError, match=r"within 0\.05 s"):
                    await sb.allocate(MiB, timeout=0.05)
                return asyncio.get_running_loop().time() - start

    assert asyncio.run(main()) >= 0.05


def test_a_zero_timeout_refuses_at_once_without_queueing() -> None:
    """timeout=0 answers now: served if it fits, else refused, never left queued."""

    async def main() -> None:
        async with af.open_runtime([FakeDevice("gpu", memory=MiB)]) as rt:
            a = rt.create_context("a", device="gpu", max_memory=MiB, qos="best_effort")
            async with rt.session(a) as sa, rt.session(a) as sb:
                held = await sa.allocate(MiB, timeout=0)
                with pytest.raises(af.MemoryBudgetError, match="within 0 s"):
                    await sb.allocate(MiB, timeout=0)
                assert rt.now() == 0.0 and a.statistics().waiting == 0
                with pytest.raises(ValueError, match=r"timeout must be >= 0 seconds, got -1"):
                    await sb.allocate(MiB, timeout=-1)
                sa.free(held)

    run_virtual(main)


def test_an_allocation_waiting_for_a_death_frontier_ends_at_its_timeout() -> None:
    """A block that is free but still in use by queued work is not handed out before its
    death frontier completes; the wait for it ends at the timeout."""

    async def main() -> None:
        async with af.open_runtime([FakeDevice("g", memory=64 * KiB)]) as rt:
            a = rt.create_context("a", device="g", max_memory=64 * KiB, qos="best_effort")
            b = rt.create_context("b", device="g", max_memory=64 * KiB, qos="best_effort")
            async with rt.session(a) as sa, rt.session(b) as sb:
                buf = await sa.allocate(64 * KiB)
                work = sa.submit(cost=10.0, name="long")
                sa.free(buf)  # its death frontier is the end of "long"
                with pytest.raises(af.MemoryBudgetError, match=r"within 1\.0 s \(epochs\)"):
                    await sb.allocate(64 * KiB, timeout=1.0)
                assert rt.now() == 1.0 and rt.usage(b).used == 0 and _waiters(rt) == 0
                late = await sb.allocate(64 * KiB, timeout=20.0)
                assert rt.now() == 10.0 and work.done()
                sb.free(late)

    run_virtual(main)


def test_a_cancelled_waiter_leaves_no_entry_and_no_charge() -> None:
    """Cancelling a waiting allocation removes its entry and charges nothing."""

    async def main() -> None:
        async with af.open_runtime([FakeDevice("g", memory=MiB)]) as rt:
            a = rt.create_context("a", device="g", max_memory=MiB, qos="best_effort")
            b = rt.create_context("b", device="g", max_memory=MiB, qos="best_effort")
            async with rt.session(a) as sa, rt.session(b) as sb:
                held = await sa.allocate(MiB)
                pending = asyncio.ensure_future(sb.allocate(MiB))
                await asyncio.sleep(1.0)
                assert b.statistics().waiting == 1
                pending.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await pending
                assert b.statistics().waiting == 0 and rt.usage(b).used == 0
                sa.free(held)
                assert rt.usage(b).used == 0 and rt.available_memory("g") == MiB

    run_virtual(main)


# -- point: a buffer is freed only where it belongs ---------------------------------------


def test_freeing_a_buffer_of_another_runtime_is_refused_and_changes_nothing() -> None:
    """s2.free(b1) across runtimes raises ForeignBufferError; both ledgers stay right."""

    async def main() -> None:
        async with (
            af.open_runtime([FakeDevice("g", memory=8 * MiB)]) as rt1,
            af.open_runtime([FakeDevice("g", memory=8 * MiB)]) as rt2,
        ):
            c1 = rt1.create_context("m", device="g", max_memory=4 * MiB)
            c2 = rt2.create_context("m", device="g", max_memory=4 * MiB)
            async with rt1.session(c1) as s1, rt2.session(c2) as s2:
                b1 = await s1.allocate(1 * MiB)
                b2 = await s2.allocate(2 * MiB)
                with pytest.raises(
                    af.ForeignBufferError, match=r"belongs to context 'm' of another runtime"
                ):
                    s2.free(b1)
                with pytest.raises(af.ForeignBufferError, match="belongs to another runtime"):
                    rt2._memory.free(b1)
                assert not b1.freed
                assert rt1.usage(c1).used == 1 * MiB and rt2.usage(c2).used == 2 * MiB
                s2.free(b2)
                s1.free(b1)
                assert rt1.usage(c1).used == 0 and rt2.usage(c2).used == 0

    run_virtual(main)


def test_freeing_a_buffer_of_another_context_is_refused_and_changes_nothing() -> None:
    """A session refuses another context's buffer; the owner's session frees it later."""

    async def main() -> None:
        async with af.open_runtime([FakeDevice("g", memory=8 * MiB)]) as rt:
            a = rt.create_context("a", device="g", max_memory=2 * MiB)
            b = rt.create_context("b", device="g", max_memory=2 * MiB)
            async with rt.session(a) as sa, rt.session(b) as sb:
                buf = await sa.allocate(1 * MiB)
                with pytest.raises(
                    af.ForeignBufferError,
                    match=r"session on context 'b' cannot free .* belongs to context 'a'$",
                ):
                    sb.free(buf)
                assert not buf.freed and rt.usage(a).used == 1 * MiB and rt.usage(b).used == 0
                sa.free(buf)
                assert rt.usage(a).used == 0

    run_virtual(main)


# -- point: create_context validates everything first -------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"qos": "gold"}, ValueError, r"qos 'gold' names no tier; use one of 'guaranteed'"),
        ({"qos": 3}, TypeError, r"qos must be a QoS or one of the names .* got 3 \(int\)"),
        ({"max_memory": 1.5 * MiB}, TypeError, r"max_memory must be an int number of bytes"),
        ({"base_memory": "1"}, TypeError, r"base_memory must be an int number of bytes"),
        ({"max_memory": 9 * MiB}, af.AdmissionError, r"asks a budget of 9\.0 MiB"),
        ({"max_memory": -1}, ValueError, r"max_memory must be >= 0, got -1"),
        (
            {"base_memory": 2 * MiB, "qos": "burstable"},
            ValueError,
            r"base_memory 2\.0 MiB must lie between 0 and max_memory 1\.0 MiB",
        ),
    ],
)
def test_a_refused_create_context_leaves_nothing_behind(
    kwargs: dict[str, object], error: type[Exception], match: str
) -> None:
    """A refused create_context raises a specific error, and the corrected call succeeds."""

    async def main() -> None:
        async with af.open_runtime([FakeDevice("g", memory=8 * MiB)]) as rt:
            queues = len(rt.queues)
            with pytest.raises(error, match=match):
                rt.create_context("x", device="g", **{"max_memory": MiB, **kwargs})  # type: ignore[arg-type]
            assert rt.contexts == () and len(rt.queues) == queues
            assert rt.available_memory("g") == 8 * MiB
            ctx = rt.create_context("x", device="g", max_memory=MiB, qos=af.QoS.GUARANTEED)
            assert rt.contexts == (ctx,) and rt.available_memory("g") == 7 * MiB

    run_virtual(main)


@pytest.mark.parametrize(
    ("name", "tier"),
    [
        ("guaranteed", af.QoS.GUARANTEED),
        ("Burstable", af.QoS.BURSTABLE),
        ("best_effort", af.QoS.BEST_EFFORT),
        ("best-effort", af.QoS.BEST_EFFORT),
        ("besteffort", af.QoS.BEST_EFFORT),
        ("BEST_EFFORT", af.QoS.BEST_EFFORT),
    ],
)
def test_create_context_accepts_the_tiers_names(name: str, tier: af.QoS) -> None:
    """A tier's name works wherever a QoS does, in any case, with '-', '_' or neither."""

    async def main() -> None:
        async with af.open_runtime([FakeDevice("g", memory=8 * MiB)]) as rt:
            ctx = rt.create_context("x", device="g", max_memory=MiB, qos=name)
            assert ctx.qos is tier and ctx.priority == tier.priority

    run_virtual(main)
    assert af.QoS(name) is tier and af.QoS.coerce(name) is tier


# -- point: bad sizes and dtypes get specific errors --------------------------------------


@pytest.mark.parametrize(
    ("size", "error", "match"),
    [
        (10.5, TypeError, r"must be an int number of bytes, got 10\.5 \(float\)"),
        (True, TypeError, r"must be an int number of bytes, got True \(bool\)"),
        ("8", TypeError, r"got '8' \(str\)"),
        (0, InvalidSizeError, r"must be > 0 bytes, got 0"),
        (-4, InvalidSizeError, r"must be > 0 bytes, got -4"),
    ],
)
def test_pool_allocations_refuse_sizes_that_are_not_positive_ints(
    size: object, error: type[Exception], match: str
) -> None:
    """allocate_nowait / try_allocate raise a specific error and change nothing."""
    pool = BufferPool(64 * KiB, name="g")
    before = pool.statistics()
    with pytest.raises(error, match=match):
        pool.allocate_nowait(size)  # type: ignore[arg-type]
    with pytest.raises(error, match=match):
        pool.try_allocate(size)  # type: ignore[arg-type]
    assert pool.statistics() == before


@pytest.mark.parametrize(
    ("size", "error", "match"),
    [
        (10.5, TypeError, r"'c': allocation size must be an int number of bytes, got 10\.5"),
        (-1, ValueError, r"'c': allocation size must be > 0, got -1"),
    ],
)
def test_session_allocations_refuse_sizes_that_are_not_positive_ints(
    size: object, error: type[Exception], match: str
) -> None:
    """Session.allocate raises TypeError/ValueError with the value and charges nothing."""

    async def main() -> None:
        async with af.open_runtime([FakeDevice("g", memory=MiB)]) as rt:
            ctx = rt.create_context("c", device="g", max_memory=MiB)
            async with rt.session(ctx) as s:
                with pytest.raises(error, match=match):
                    await s.allocate(size)  # type: ignore[arg-type]
                assert rt.usage(ctx).used == 0 and ctx.statistics().allocations == 0

    run_virtual(main)


async def test_buffer_tensor_accepts_dtype_names_and_says_what_it_accepts() -> None:
    """buf.tensor('float32') is the float32 view; an unknown dtype names the accepted forms."""
    torch = pytest.importorskip("torch")
    from asyncfront.devices import TorchDevice

    async with af.open_runtime([TorchDevice("cpu", memory=64 * KiB)]) as rt:
        ctx = rt.create_context("c", max_memory=64 * KiB)
        async with rt.session(ctx) as s:
            buf = await s.allocate(1 * KiB)
            assert buf.tensor("float32").dtype is torch.float32
            assert buf.tensor("torch.int16", (4, 8)).shape == (4, 8)
            with pytest.raises(ValueError, match=r"unknown dtype 'float17'; accepted: .*float32"):
                buf.tensor("float17")
            with pytest.raises(TypeError, match=r"dtype must be a torch\.dtype .* got int 4"):
                buf.tensor(4)


# -- the budget without a pool block ------------------------------------------------------


def test_a_reservation_charges_the_budget_without_a_block_and_waits_like_an_allocation() -> None:
    """reserve() takes budget but no pool block, waits for frees, and unreserve returns it."""

    async def main() -> None:
        async with af.open_runtime([FakeDevice("g", memory=MiB)]) as rt:
            a = rt.create_context("a", device="g", max_memory=MiB, qos="best_effort")
            b = rt.create_context("b", device="g", max_memory=MiB, qos="best_effort")
            memory = rt._memory
            pool = a.device.memory
            await memory.reserve(a, 100, owner="work")
            assert rt.usage(a).used == 100 and pool.statistics().bytes_in_use == 0
            async with rt.session(b) as sb:
                with pytest.raises(af.MemoryBudgetError, match=r"within 0\.5 s"):
                    await sb.allocate(MiB, timeout=0.5)
                pending = asyncio.ensure_future(sb.allocate(MiB, timeout=5.0))
                await asyncio.sleep(1.0)
                memory.unreserve(a, 100, owner="work")
                buf = await pending
                assert rt.now() == 1.5 and buf.charged == MiB
                with pytest.raises(ValueError, match="the owner holds 0"):
                    memory.unreserve(a, 100, owner="work")
                with pytest.raises(af.MemoryBudgetError, match="over the context's max_memory"):
                    await memory.reserve(a, 2 * MiB, owner="work")

    run_virtual(main)


# -- the pager on a fragmented device pool ------------------------------------------------


async def test_pager_allocate_on_a_fragmented_device_pool_pages_out_to_open_an_extent(
    tmp_path: Path,
) -> None:
    """An 8 KiB page among 4 KiB holes: the pager pages a neighbour out and it fits."""
    pytest.importorskip("torch")
    from asyncfront.devices import CpuDevice, StorageDevice
    from asyncfront.memory import Pager, Tier

    devices = [
        CpuDevice("gpu0", memory=32 * KiB),
        CpuDevice("host", memory=32 * KiB),
        StorageDevice(tmp_path),
    ]
    async with af.open_runtime(devices) as rt:
        host = rt.create_context("host", device="host", max_memory=32 * KiB)
        copy = rt.queue("host", name="copy")
        nvme = devices[2].queue(name="nvme.pages")
        async with Pager(rt, host=host, copy=copy, storage=nvme) as pager:
            ctx = rt.create_context("kv", device="gpu0", max_memory=32 * KiB)
            pages = [await pager.allocate(ctx, (4, 8, 64), "float16") for _ in range(8)]
            for page in pages[::2]:
                await pager.release(page)
            assert ctx.device.memory.largest_free_extent() == 4 * KiB
            big = await asyncio.wait_for(pager.allocate(ctx, (8, 8, 64), "float16"), 30)
            assert big.tier is Tier.DEVICE and big.nbytes == 8 * KiB
            assert any(p.tier is not Tier.DEVICE for p in pages[1::2])
            assert rt.usage(ctx).used == ctx.device.memory.statistics().bytes_in_use


def test_closing_a_context_refuses_its_waiting_allocations_at_once() -> None:
    """A request waiting on a context that is closed ends then with the reason."""

    async def main() -> None:
        async with af.open_runtime([FakeDevice("g", memory=MiB)]) as rt:
            a = rt.create_context("a", device="g", max_memory=MiB, qos="best_effort")
            b = rt.create_context("b", device="g", max_memory=MiB, qos="best_effort")
            async with rt.session(a) as sa:
                sb = rt.session(b)
                await sb.__aenter__()
                held = await sa.allocate(MiB)
                pending = asyncio.ensure_future(sb.allocate(MiB, timeout=5.0))
                await asyncio.sleep(1.0)
                rt.close_context(b)
                with pytest.raises(
                    RuntimeError, match=r"context 'b' was closed while its allocation of 1\.0 MiB"
                ):
                    await pending
                assert rt.now() == 1.0
                sa.free(held)
                assert rt.available_memory("g") == MiB

    run_virtual(main)


async def test_pager_over_its_budget_counts_block_spans_for_unaligned_pages(
    tmp_path: Path,
) -> None:
    """1000-byte pages are charged 1024: over budget, the pager pages its own out."""
    pytest.importorskip("torch")
    from asyncfront.devices import CpuDevice, StorageDevice
    from asyncfront.memory import Pager, Tier

    devices = [
        CpuDevice("gpu0", memory=32 * KiB),
        CpuDevice("host", memory=32 * KiB),
        StorageDevice(tmp_path),
    ]
    async with af.open_runtime(devices) as rt:
        host = rt.create_context("host", device="host", max_memory=32 * KiB)
        copy = rt.queue("host", name="copy")
        nvme = devices[2].queue(name="nvme.pages")
        async with Pager(rt, host=host, copy=copy, storage=nvme) as pager:
            ctx = rt.create_context("kv", device="gpu0", max_memory=4090)
            pages = [
                await asyncio.wait_for(pager.allocate(ctx, (1000,), "uint8"), 30) for _ in range(4)
            ]
            assert pages[0].tier is not Tier.DEVICE and pages[3].tier is Tier.DEVICE
            assert rt.usage(ctx).used == 3 * 1024
