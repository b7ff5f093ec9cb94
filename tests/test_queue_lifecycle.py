"""Closing queues and contexts: nothing kept per closed queue, axes unique forever."""

from __future__ import annotations

import asyncio

import pytest

import asyncfront as af
from asyncfront._frontier import _AXIS_NAMES
from asyncfront._runtime import _QueueSlots
from asyncfront.testing import FakeDevice, run_virtual


def test_context_churn_leaves_no_queue_task_slot_or_name_behind() -> None:
    """20,000 create/close cycles on one device keep no queue, task, epoch, axis or name."""

    async def body() -> None:
        async with af.open_runtime([FakeDevice("gpu", memory=af.GiB)]) as rt:
            names = len(_AXIS_NAMES)
            tasks = len(asyncio.all_tasks())
            seen: set[int] = set()
            for i in range(20_000):
                ctx = rt.create_context(f"c{i}", device="gpu", max_memory=af.MiB)
                seen.add(ctx.queue.axis)
                rt.close_context(ctx)
            assert len(seen) == 20_000  # every axis value is new
            assert rt.queues == () and rt.contexts == ()
            assert len(asyncio.all_tasks()) == tasks
            assert len(rt._known_axes) == 0 and len(rt.completed) == 0
            assert len(_AXIS_NAMES) <= names  # (a reused value's older name goes too)
            slots = rt._queue_slots[rt.device("gpu").index]
            assert len(slots.live) == 0 and len(slots.last) <= 1 and len(slots.free) <= 1
            assert rt.statistics().queues == 0

    run_virtual(body)


def test_contexts_that_ran_work_retire_once_drained() -> None:
    """Contexts that allocated and ran work retire: queues, tasks and epochs do not grow."""

    async def body() -> None:
        async with af.open_runtime([FakeDevice("gpu", memory=af.GiB)]) as rt:
            tasks = len(asyncio.all_tasks())
            for i in range(300):  # past one slot's 256 incarnations
                ctx = rt.create_context(f"w{i}", device="gpu", max_memory=af.MiB)
                async with rt.session(ctx) as s:
                    await s.allocate(4096)
                    await s.run(cost=1e-6)
                rt.close_context(ctx)
            await asyncio.sleep(0)  # the last queue's task sees it closed and ends
            assert rt.queues == ()
            assert len(asyncio.all_tasks()) == tasks
            assert len(rt._completed_epochs) == 0 and len(rt._known_axes) == 0
            assert len(rt._completion_waiters) == 0
            slots = rt._queue_slots[rt.device("gpu").index]
            assert slots.fresh == 2 and len(slots.live) == 0

    run_virtual(body)


def test_a_slot_is_reused_with_a_new_incarnation() -> None:
    """A closed queue's slot goes to the next queue with the next incarnation."""

    async def body() -> None:
        async with af.open_runtime([FakeDevice("gpu")]) as rt:
            first = rt.queue("gpu")
            rt.queue("gpu")
            first.close()
            third = rt.queue("gpu")
            assert af.axis_fields(first.axis)[:2] == (0, 0)
            assert (af.axis_fields(third.axis).incarnation, af.axis_fields(third.axis).queue) == (
                1,
                0,
            )
            assert third.axis != first.axis and third.name == "gpu.q0#1"

    run_virtual(body)


def test_queue_slots_never_run_out_and_never_repeat_an_axis() -> None:
    """10^5 open/close cycles take unique (slot, incarnation) pairs; all earlier ones retired."""
    slots = _QueueSlots()
    held = slots.take("gpu")  # one queue stays open throughout
    seen = {held}
    for _ in range(100_000):
        pair = slots.take("gpu")
        assert pair not in seen
        seen.add(pair)
        slots.release(pair[0])
    assert all(slots.retired(s, i) for s, i in seen if (s, i) != held)
    assert not slots.retired(*held)
    assert not slots.retired(slots.fresh, 0)  # never used
    assert slots.fresh == 1 + 100_000 // 256 + 1
    assert len(slots.last) == 1 and len(slots.live) == 1


def test_retired_axis_reads_as_complete_and_its_memory_is_reused_at_once() -> None:
    """A death frontier naming a closed, drained queue never waits: the block is reused."""

    async def body() -> None:
        async with af.open_runtime([FakeDevice("gpu", memory=64 * af.KiB)]) as rt:
            old = rt.create_context("old", device="gpu", max_memory=32 * af.KiB)
            async with rt.session(old) as s:
                buf = await s.allocate(32 * af.KiB)
                work = s.submit(cost=1.0)
            death = old.death_frontier()
            ax = old.queue.axis
            assert death.get(ax) == 1
            rt.close_context(old)  # its work is still running: not retired yet
            assert not rt.axis_retired(ax)
            await work  # the queue drains and retires as its last work finishes
            assert rt.axis_retired(ax)
            assert ax not in rt.completed and rt.is_complete(death)
            before = rt.now()
            await rt.wait_completed(death)  # returns at once: no virtual time passes
            new = rt.create_context("new", device="gpu", max_memory=64 * af.KiB)
            async with rt.session(new) as s:
                again = await s.allocate(32 * af.KiB)
            assert again.offset == buf.offset and rt.now() == before

    run_virtual(body)


def test_axis_of_another_runtime_or_unknown_slot_is_not_retired() -> None:
    """Only axes this runtime created and retired read as retired."""

    async def body() -> None:
        async with af.open_runtime([FakeDevice("gpu")]) as rt:
            q = rt.queue("gpu")
            assert not rt.axis_retired(q.axis)
            assert not rt.axis_retired(af.axis(device=0, queue=5))
            assert not rt.axis_retired(af.axis(node=1, device=0, queue=0))
            with pytest.raises(ValueError, match="belongs to no queue of this runtime"):
                await rt.wait_completed(af.Frontier({af.axis(device=0, queue=5): 1}))

    run_virtual(body)


def test_closed_queue_runs_what_it_holds_then_refuses_work_and_retires() -> None:
    """close() keeps queued work, refuses new work naming the queue, then retires it."""

    async def body() -> None:
        async with af.open_runtime([FakeDevice("gpu")]) as rt:
            q = rt.queue("gpu", name="gpu.main")
            work = [q.submit(lambda i=i: i, cost=1.0) for i in range(3)]
            q.close()
            q.close()  # twice is harmless
            assert q.closed
            with pytest.raises(RuntimeError, match=r"queue 'gpu\.main' is closed"):
                q.submit(cost=1.0)
            assert q in rt.queues
            assert [await w for w in work] == [0, 1, 2]
            await asyncio.sleep(0)
            assert q not in rt.queues and rt.axis_retired(q.axis)
            assert af.axis_name(q.axis) == "q(n0.d0.q0#0)"

    run_virtual(body)


def test_close_context_twice_does_nothing_the_second_time() -> None:
    """A second close_context is a no-op and leaves a newer context of that name alone."""

    async def body() -> None:
        async with af.open_runtime([FakeDevice("gpu", memory=af.GiB)]) as rt:
            old = rt.create_context("llm", device="gpu", max_memory=af.MiB)
            rt.close_context(old)
            new = rt.create_context("llm", device="gpu", max_memory=af.MiB)
            rt.close_context(old)
            assert rt.context("llm") is new and rt.usage(new).reserved == af.MiB

    run_virtual(body)


def test_close_context_of_another_runtime_is_refused_and_changes_nothing() -> None:
    """Closing a context another runtime owns raises ValueError naming it; both stay open."""

    async def body() -> None:
        async with (
            af.open_runtime([FakeDevice("gpu", memory=af.GiB)]) as a,
            af.open_runtime([FakeDevice("gpu", memory=af.GiB)]) as b,
        ):
            ca = a.create_context("llm", device="gpu", max_memory=af.MiB)
            cb = b.create_context("llm", device="gpu", max_memory=af.MiB)
            with pytest.raises(ValueError, match="context 'llm' does not belong to this runtime"):
                b.close_context(ca)
            assert not ca.closed and not cb.closed
            assert b.context("llm") is cb and a.context("llm") is ca

    run_virtual(body)
