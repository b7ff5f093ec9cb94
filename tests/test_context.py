"""Contexts, QoS tiers, budgets, admission and memory pressure."""

from __future__ import annotations

import asyncio

import pytest
import structlog

import asyncfront as af
from asyncfront.testing import FakeDevice, run_virtual

GiB = af.GiB


def gpu(capacity: int = 8 * GiB) -> FakeDevice:
    return FakeDevice("gpu0", memory=capacity)


def test_guaranteed_admission_refused_when_guarantees_exceed_capacity() -> None:
    """A Guaranteed context whose reservation does not fit is refused with the numbers."""

    async def main() -> None:
        async with af.open_runtime([gpu()]) as rt:
            rt.create_context("llm", device="gpu0", max_memory=5 * GiB)
            with pytest.raises(af.AdmissionError, match=r"4\.0 GiB reserved .* leaves 3\.0 GiB"):
                rt.create_context("vision", device="gpu0", max_memory=4 * GiB)
            rt.create_context("tts", device="gpu0", max_memory=3 * GiB)
            assert rt.available_memory("gpu0") == 0

    run_virtual(main)


def test_budget_enforced_on_every_allocation() -> None:
    """An allocation beyond max_memory raises MemoryBudgetError with the numbers."""

    async def main() -> None:
        async with af.open_runtime([gpu()]) as rt:
            ctx = rt.create_context("llm", device="gpu0", max_memory=4 * GiB)
            async with rt.session(ctx) as s:
                buf = await s.allocate(3 * GiB)
                assert buf.nbytes == 3 * GiB and buf.device == "gpu0"
                with pytest.raises(
                    af.MemoryBudgetError,
                    match=r"'llm' asked 2\.0 GiB, budget 4\.0 GiB, 3\.0 GiB in use",
                ):
                    await s.allocate(2 * GiB)
                assert rt.usage(ctx) == (3 * GiB, 4 * GiB, 4 * GiB)

    run_virtual(main)


def test_two_contexts_never_exceed_the_device_together() -> None:
    """Concurrent allocations of two contexts never commit more than the device holds."""

    async def main() -> None:
        async with af.open_runtime([gpu(4 * GiB)]) as rt:
            a = rt.create_context("a", device="gpu0", max_memory=4 * GiB, qos=af.QoS.BEST_EFFORT)
            b = rt.create_context("b", device="gpu0", max_memory=4 * GiB, qos=af.QoS.BEST_EFFORT)
            peak = 0

            async def grab(ctx: af.ExecutionContext, n: int) -> None:
                nonlocal peak
                async with rt.session(ctx) as s:
                    for _ in range(n):
                        buf = await s.allocate(1 * GiB, timeout=5.0)
                        used = rt.usage(a).used + rt.usage(b).used
                        peak = max(peak, used)
                        assert used <= 4 * GiB
                        await asyncio.sleep(0.5)
                        s.free(buf)

            await asyncio.gather(grab(a, 6), grab(b, 6), grab(a, 6), grab(b, 6), grab(a, 6))
            assert peak == 4 * GiB

    run_virtual(main)


def test_burstable_grows_from_base_only_into_spare_memory() -> None:
    """Burstable reserves its base and bursts to max only while spare memory exists."""

    async def main() -> None:
        async with af.open_runtime([gpu(8 * GiB)]) as rt:
            llm = rt.create_context("llm", device="gpu0", max_memory=5 * GiB)
            tts = rt.create_context(
                "tts", device="gpu0", max_memory=4 * GiB, base_memory=1 * GiB,
                qos=af.QoS.BURSTABLE,
            )  # fmt: skip
            assert rt.usage(tts) == (0, 1 * GiB, 4 * GiB)
            assert rt.available_memory("gpu0") == 2 * GiB
            async with rt.session(tts) as s:
                await s.allocate(1 * GiB)  # within its base
                await s.allocate(2 * GiB)  # bursts into the 2 GiB spare
                assert rt.available_memory("gpu0") == 0
                with pytest.raises(
                    af.MemoryBudgetError,
                    match=r"can never fit: 8\.0 GiB on the device less 5\.0 GiB reserved by "
                    r"other contexts leaves at most 0 B for it beside the 3\.0 GiB",
                ):
                    await s.allocate(1 * GiB)
            # the Guaranteed reservation was never touched
            async with rt.session(llm) as s:
                await s.allocate(5 * GiB)

    run_virtual(main)


def test_best_effort_waits_and_is_admitted_when_memory_frees() -> None:
    """A blocked BestEffort allocation proceeds once another context frees memory."""

    async def main() -> None:
        async with af.open_runtime([gpu(4 * GiB)]) as rt:
            llm = rt.create_context(
                "llm", device="gpu0", max_memory=4 * GiB, base_memory=0, qos=af.QoS.BURSTABLE
            )
            bg = rt.create_context("bg", device="gpu0", max_memory=2 * GiB, qos=af.QoS.BEST_EFFORT)
            async with rt.session(llm) as s_llm, rt.session(bg) as s_bg:
                held = await s_llm.allocate(4 * GiB)
                waiting = asyncio.ensure_future(s_bg.allocate(2 * GiB))
                await asyncio.sleep(1.0)
                assert not waiting.done()
                assert bg.statistics().waits == 1
                s_llm.free(held)
                buf = await waiting
                assert buf.nbytes == 2 * GiB and rt.usage(bg).used == 2 * GiB

    run_virtual(main)


def test_sessions_of_one_context_wait_for_each_other_within_its_limit() -> None:
    """Over its own limit, a session waits for the context's other sessions to free."""

    async def main() -> None:
        async with af.open_runtime([gpu()]) as rt:
            ctx = rt.create_context("llm", device="gpu0", max_memory=4 * GiB)
            order: list[str] = []

            async def request(name: str) -> None:
                async with rt.session(ctx) as s:
                    buf = await s.allocate(3 * GiB)
                    order.append(f"{name}+")
                    assert rt.usage(ctx).used <= 4 * GiB
                    await asyncio.sleep(1)
                    order.append(f"{name}-")
                    s.free(buf)

            await asyncio.gather(request("a"), request("b"), request("c"))
            assert order == ["a+", "a-", "b+", "b-", "c+", "c-"]
            assert ctx.statistics().waits == 2

    run_virtual(main)


def test_waiting_on_its_own_limit_holds_back_no_other_context() -> None:
    """A Guaranteed waiter over its own limit does not make a BestEffort allocation queue."""

    async def main() -> None:
        async with af.open_runtime([gpu()]) as rt:
            llm = rt.create_context("llm", device="gpu0", max_memory=4 * GiB)
            embed = rt.create_context(
                "embed", device="gpu0", max_memory=2 * GiB, qos=af.QoS.BEST_EFFORT
            )
            async with rt.session(llm) as first, rt.session(llm) as second:
                buf = await first.allocate(3 * GiB)
                waiting = asyncio.ensure_future(second.allocate(3 * GiB))
                await asyncio.sleep(0)
                async with rt.session(embed) as s:
                    await asyncio.wait_for(s.allocate(2 * GiB), timeout=0.1)
                    assert embed.statistics().waits == 0
                assert not waiting.done()
                first.free(buf)
                assert (await waiting).nbytes == 3 * GiB

    run_virtual(main)


def test_over_its_limit_alone_is_refused_at_once() -> None:
    """With no other session of the context holding memory, over the limit raises at once."""

    async def main() -> None:
        async with af.open_runtime([gpu()]) as rt:
            ctx = rt.create_context("llm", device="gpu0", max_memory=4 * GiB)
            async with rt.session(ctx) as s:
                with pytest.raises(af.MemoryBudgetError, match="over the context's max_memory"):
                    await s.allocate(5 * GiB)
                assert ctx.statistics().waits == 0

    run_virtual(main)


def test_waiting_times_out_with_memory_budget_error() -> None:
    """An allocation that waits longer than its timeout raises MemoryBudgetError."""

    async def main() -> None:
        async with af.open_runtime([gpu(2 * GiB)]) as rt:
            a = rt.create_context("a", device="gpu0", max_memory=2 * GiB, qos=af.QoS.BEST_EFFORT)
            b = rt.create_context("b", device="gpu0", max_memory=2 * GiB, qos=af.QoS.BEST_EFFORT)
            async with rt.session(a) as sa, rt.session(b) as sb:
                await sa.allocate(2 * GiB)
                with pytest.raises(af.MemoryBudgetError, match=r"within 3\.0 s"):
                    await sb.allocate(1 * GiB, timeout=3.0)
                assert rt.now() == pytest.approx(3.0)

    run_virtual(main)


def test_reused_cached_blocks_count_against_budgets() -> None:
    """Memory handed out from the pool's freed blocks is charged like fresh memory."""

    async def main() -> None:
        async with af.open_runtime([gpu(4 * GiB)]) as rt:
            a = rt.create_context("a", device="gpu0", max_memory=2 * GiB)
            b = rt.create_context("b", device="gpu0", max_memory=2 * GiB)
            async with rt.session(a) as sa, rt.session(b) as sb:
                first = await sa.allocate(1 * GiB)
                offset = first.offset
                sa.free(first)  # the pool caches the block
                again = await sb.allocate(1 * GiB)
                assert again.offset == offset  # the same memory, reused
                assert rt.usage(b).used == 1 * GiB and rt.usage(a).used == 0
                pool = rt.device("gpu0").memory
                assert pool.statistics().bytes_in_use == 1 * GiB

    run_virtual(main)


def test_free_uses_the_queue_frontier_as_death_frontier() -> None:
    """Freed memory is not reused by a stranger until the freeing context's work completes."""

    async def main() -> None:
        async with af.open_runtime([gpu(1 * GiB)]) as rt:
            a = rt.create_context("a", device="gpu0", max_memory=1 * GiB, qos=af.QoS.BEST_EFFORT)
            b = rt.create_context("b", device="gpu0", max_memory=1 * GiB, qos=af.QoS.BEST_EFFORT)
            async with rt.session(a) as sa, rt.session(b) as sb:
                buf = await sa.allocate(1 * GiB)
                work = sa.submit(cost=5.0)  # still uses the buffer
                sa.free(buf)
                reused = await sb.allocate(1 * GiB)
                assert work.done() and rt.now() == 5.0
                assert reused.offset == buf.offset

    run_virtual(main)


def test_tier_sets_queue_priority() -> None:
    """Guaranteed > Burstable > BestEffort queue priority on the device."""

    async def main() -> None:
        async with af.open_runtime([gpu()]) as rt:
            g = rt.create_context("g", device="gpu0", max_memory=1 * GiB)
            b = rt.create_context("b", device="gpu0", max_memory=1 * GiB, qos=af.QoS.BURSTABLE)
            e = rt.create_context("e", device="gpu0", max_memory=1 * GiB, qos=af.QoS.BEST_EFFORT)
            assert g.priority > b.priority > e.priority
            assert g.queue.priority == af.QoS.GUARANTEED.priority

    run_virtual(main)


def test_best_effort_fills_gaps_and_yields_at_submission_boundaries() -> None:
    """BestEffort work runs while Guaranteed waits, and yields at its next boundary."""

    async def main() -> None:
        async with af.open_runtime([gpu(), FakeDevice("cpu", kind="cpu")]) as rt:
            chat = rt.create_context("chat", device="gpu0", max_memory=1 * GiB)
            index = rt.create_context("index", device="gpu0", qos=af.QoS.BEST_EFFORT)
            prompt = af.TimelineSemaphore(name="prompt")
            async with rt.session(chat) as s_chat, rt.session(index) as s_index:
                background = [s_index.submit(cost=1.0, name=f"embed{i}") for i in range(8)]
                answer = s_chat.submit(cost=2.0, waits=[(prompt, 1)], name="answer")
                rt.queue("cpu").submit(signals=[(prompt, 1)], cost=2.5)
                await background[-1]
                # embed0..embed2 filled the gap; the answer took the boundary at t=3
                assert [b.started_at for b in background[:3]] == [0.0, 1.0, 2.0]
                assert answer.started_at == 3.0 and answer.finished_at == 5.0
                assert background[3].started_at == 5.0

    run_virtual(main)


def test_pressure_policy_evicts_best_effort_then_asks_handlers_and_logs() -> None:
    """Under pressure: BestEffort evicts first, then handlers are asked; each step is logged."""

    async def main() -> list[str]:
        steps: list[str] = []
        async with af.open_runtime([gpu(4 * GiB)]) as rt:
            llm = rt.create_context(
                "llm", device="gpu0", max_memory=4 * GiB, base_memory=1 * GiB, qos=af.QoS.BURSTABLE
            )
            bg = rt.create_context("bg", device="gpu0", max_memory=3 * GiB, qos=af.QoS.BEST_EFFORT)
            async with rt.session(llm) as s_llm, rt.session(bg) as s_bg:
                cache = [await s_bg.allocate(1 * GiB) for _ in range(3)]

                @bg.on_evict
                def drop_cache(wanted: int) -> int:
                    steps.append("evict")
                    buf = cache.pop()
                    s_bg.free(buf)
                    return buf.nbytes

                @rt.on_memory_pressure
                def handler(ctx: af.ExecutionContext, requested: int, available: int) -> bool:
                    steps.append(f"handler {ctx.name} {requested // GiB} {available // GiB}")
                    return False

                await s_llm.allocate(2 * GiB)  # 1 GiB spare: one eviction makes room
                assert steps == ["evict"]
                with pytest.raises(af.MemoryBudgetError):
                    await s_llm.allocate(4 * GiB)  # over its max: no policy can help
                await s_llm.allocate(1 * GiB)  # one more eviction
                assert steps == ["evict", "evict"]
        return steps

    with structlog.testing.capture_logs() as logs:
        run_virtual(main)
    events = [e["event"] for e in logs]
    assert "memory_pressure" in events and "evict" in events


def test_memory_pressure_handler_can_free_and_retry() -> None:
    """A pressure handler that frees memory lets the allocation succeed on retry."""

    async def main() -> None:
        async with af.open_runtime([gpu(2 * GiB)]) as rt:
            a = rt.create_context("a", device="gpu0", max_memory=2 * GiB, qos=af.QoS.BEST_EFFORT)
            b = rt.create_context("b", device="gpu0", max_memory=2 * GiB, qos=af.QoS.BEST_EFFORT)
            async with rt.session(a) as sa, rt.session(b) as sb:
                weights = await sa.allocate(2 * GiB)
                calls = []

                async def drop_weights(ctx: af.ExecutionContext, req: int, avail: int) -> bool:
                    calls.append((ctx.name, req, avail))
                    sa.free(weights)
                    return True

                rt.on_memory_pressure(drop_weights)
                buf = await sb.allocate(1 * GiB)
                assert calls == [("b", 1 * GiB, 0)]
                assert buf.nbytes == 1 * GiB

    run_virtual(main)


def test_session_frees_leftover_buffers_and_reports_state() -> None:
    """Leaving a session frees what it still holds; statistics and repr show the context."""

    async def main() -> None:
        async with af.open_runtime([gpu()]) as rt:
            ctx = rt.create_context("llm", device="gpu0", max_memory=2 * GiB)
            async with rt.session(ctx) as s:
                await s.allocate(1 * GiB)
                assert await s.run(lambda: 7, cost=0.1) == 7
                stats = ctx.statistics()
                assert stats.used == 1 * GiB and stats.live_buffers == 1
            assert rt.usage(ctx).used == 0
            assert "llm" in repr(ctx) and "guaranteed" in repr(ctx)
            with pytest.raises(RuntimeError, match="not open"):
                s.submit(lambda: None)

    run_virtual(main)


def test_double_free_and_foreign_errors() -> None:
    """Freeing twice raises a clear error and loses nothing."""

    async def main() -> None:
        async with af.open_runtime([gpu()]) as rt:
            ctx = rt.create_context("llm", device="gpu0", max_memory=2 * GiB)
            async with rt.session(ctx) as s:
                buf = await s.allocate(1 * GiB)
                s.free(buf)
                with pytest.raises(ValueError, match="already freed"):
                    s.free(buf)
                assert rt.usage(ctx).used == 0
                with pytest.raises(ValueError, match="> 0"):
                    await s.allocate(0)

    run_virtual(main)


def test_session_sync_from_a_thread() -> None:
    """A synchronous caller runs work and allocates through a runtime on a background thread."""
    with af.start_runtime_thread([af.devices.CpuDevice("cpu", memory=1 * GiB)]) as thread:
        ctx = thread.call_soon(thread.runtime.create_context, "sync", max_memory=512 << 20)
        with thread.runtime.session_sync(ctx) as s:
            assert s.run(sum, [1, 2, 3]) == 6
            buf = s.allocate(256 << 20)
            assert buf.nbytes == 256 << 20
            s.free(buf)
        assert thread.call_soon(thread.runtime.usage, ctx).used == 0


async def test_session_sync_refuses_the_loop_thread() -> None:
    """session_sync on the runtime's own loop thread raises instead of deadlocking."""
    async with af.open_runtime([af.devices.CpuDevice("cpu")]) as rt:
        ctx = rt.create_context("c")
        with pytest.raises(RuntimeError, match="own loop"):
            rt.session_sync(ctx)


def test_session_sync_free_inside_a_pressure_handler() -> None:
    """A pressure handler on the loop thread frees a SyncSession's buffer without deadlock."""
    with af.start_runtime_thread([af.devices.CpuDevice("cpu", memory=2 * GiB)]) as thread:
        rt = thread.runtime
        a = thread.call_soon(rt.create_context, "a", max_memory=2 * GiB, qos=af.QoS.BEST_EFFORT)
        b = thread.call_soon(rt.create_context, "b", max_memory=2 * GiB, qos=af.QoS.BEST_EFFORT)
        with rt.session_sync(a) as sa, rt.session_sync(b) as sb:
            weights = sa.allocate(2 * GiB)
            calls: list[str] = []

            def drop_weights(ctx: af.ExecutionContext, requested: int, available: int) -> bool:
                calls.append(ctx.name)
                with pytest.raises(RuntimeError, match="loop's thread"):
                    sa.allocate(1)
                sa.free(weights)
                return True

            thread.call_soon(rt.on_memory_pressure, drop_weights)
            buf = sb.allocate(1 * GiB, timeout=5.0)
            assert calls == ["b"] and buf.nbytes == 1 * GiB
            assert thread.call_soon(rt.usage, a).used == 0


def test_memory_pressure_handler_can_refuse_by_raising() -> None:
    """A pressure handler that raises fails the allocation at once and charges nothing."""

    class Refused(MemoryError):
        pass

    async def main() -> None:
        async with af.open_runtime([gpu(2 * GiB)]) as rt:
            a = rt.create_context("a", device="gpu0", max_memory=2 * GiB, qos=af.QoS.BEST_EFFORT)
            b = rt.create_context("b", device="gpu0", max_memory=2 * GiB, qos=af.QoS.BEST_EFFORT)
            async with rt.session(a) as sa, rt.session(b) as sb:
                await sa.allocate(2 * GiB)  # b would otherwise wait for a to free

                @rt.on_memory_pressure
                def refuse(ctx: af.ExecutionContext, requested: int, available: int) -> bool:
                    raise Refused(f"{ctx.name} may not wait")

                with pytest.raises(Refused, match="b may not wait"):
                    await sb.allocate(1 * GiB)
                assert rt.usage(b).used == 0 and b.statistics().waits == 0
                assert rt.now() == 0.0

    run_virtual(main)
