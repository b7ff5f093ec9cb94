"""The fast paths of timed work and waits on fake devices keep frontiers and timing exact."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import asyncfront as af
import asyncfront._queue as queue_module
from asyncfront import Frontier
from asyncfront._semaphore import TimelineSemaphore
from asyncfront.testing import FakeDevice, run_virtual

PROPERTY = settings(max_examples=40, deadline=None, database=None)


def _plain_merged(
    base: Frontier,
    source: TimelineSemaphore | None,
    sem: TimelineSemaphore | None,
    frontier: Frontier,
) -> tuple[Frontier, TimelineSemaphore | None]:
    """A merge that never names a source: the queue merges every wait in full."""
    return base.merge(frontier), None


# each step: (queue, waited queues, cost in µs); queues 0..4 on 3 devices
steps_st = st.lists(
    st.tuples(
        st.integers(min_value=0, max_value=4),
        st.lists(st.integers(min_value=0, max_value=4), max_size=3, unique=True),
        st.sampled_from([0, 1, 2]),
    ),
    min_size=1,
    max_size=40,
)


def _run(steps: list[tuple[int, list[int], int]], capacity: int) -> list[object]:
    """Frontiers of every submission and semaphore after running ``steps`` in virtual time."""

    async def main() -> list[object]:
        devices = [FakeDevice(f"d{i}") for i in range(3)]
        async with af.open_runtime(devices, frontier_capacity=capacity) as rt:
            queues = [rt.queue(devices[i % 3]) for i in range(5)]
            sems = [rt.semaphore(name=f"s{i}") for i in range(5)]
            counts = [0] * 5
            subs = []
            for q, waited, cost in steps:
                target = q
                waits = [(sems[w], counts[w]) for w in waited if counts[w]]
                counts[target] += 1
                subs.append(
                    queues[q].submit(
                        waits=waits,
                        signals=[(sems[target], counts[target])],
                        cost=cost * 1e-6 or None,
                    )
                )
            for sub in subs:
                await sub
            return [sub.frontier for sub in subs] + [sem.frontier for sem in sems]

    return run_virtual(main)


@PROPERTY
@given(steps_st, st.sampled_from([2, 3, 64]))
def test_frontiers_equal_those_of_full_merges(
    steps: list[tuple[int, list[int], int]], capacity: int
) -> None:
    """Skipping the merge of a wait on the semaphore that gave the history changes no frontier."""
    fast = _run(steps, capacity)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(queue_module, "_merged", _plain_merged)
        full = _run(steps, capacity)
    assert fast == full


def test_a_semaphore_of_several_producers_gives_their_merged_history() -> None:
    """A queue waiting again on a semaphore that another producer signalled gets both axes."""

    async def main() -> None:
        devices = [FakeDevice("a"), FakeDevice("b"), FakeDevice("c")]
        async with af.open_runtime(devices) as rt:
            qa, qb, qc = (rt.queue(d) for d in devices)
            sem = rt.semaphore(name="s")
            qa.submit(signals=[(sem, 1)], cost=1.0)
            first = qc.submit(waits=[(sem, 1)], cost=1.0)
            qb.submit(signals=[(sem, 2)], cost=3.0)
            second = qc.submit(waits=[(sem, 2)], cost=1.0)
            await second
            assert first.frontier == Frontier({qa.axis: 1, qc.axis: 1})
            assert second.frontier == Frontier({qa.axis: 1, qb.axis: 1, qc.axis: 2})

    run_virtual(main)


def test_timed_work_ending_together_shares_one_loop_timer() -> None:
    """Work of equal cost started together sets one loop timer and finishes in start order."""

    async def main() -> None:
        devices = [FakeDevice(f"d{i}") for i in range(4)]
        async with af.open_runtime(devices) as rt:
            queues = [rt.queue(d) for d in devices]
            order: list[int] = []
            subs = [q.submit(order.append, i, cost=1.0) for i, q in enumerate(queues)]
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            loop = asyncio.get_running_loop()
            due = [h for h in loop._scheduled if not h.cancelled() and h.when() == 1.0]  # type: ignore[attr-defined]
            assert len(due) == 1
            assert rt._trampoline.timers._due == {1.0: queues}
            for sub in subs:
                await sub
            assert order == [0, 1, 2, 3]
            assert [sub.finished_at for sub in subs] == [1.0] * 4
            assert rt._trampoline.timers._due == {}

    run_virtual(main)


def test_timed_work_cut_off_by_a_failing_exit_leaves_no_timer() -> None:
    """Closing on an error fails timed work still running and withdraws it from the timers."""

    async def main() -> None:
        device = FakeDevice("d")
        sub = None
        timers = None
        with pytest.raises(RuntimeError, match="stop"):
            async with af.open_runtime([device]) as rt:
                timers = rt._trampoline.timers
                sub = rt.queue(device).submit(cost=5.0, name="long")
                await asyncio.sleep(1.0)
                raise RuntimeError("stop")
        assert sub is not None and timers is not None
        assert sub.state is af.SubmissionState.FAILED
        assert isinstance(sub.exception(), af.StalledError)
        assert timers._due == {}
        assert device._arbiter.free == 1

    run_virtual(main)


def test_a_slot_freed_goes_to_the_highest_priority_waiter_at_that_instant() -> None:
    """Queues waiting for a busy device's slot start when it frees, highest priority first."""

    async def main() -> None:
        device = FakeDevice("d")
        async with af.open_runtime([device]) as rt:
            blocker = rt.queue(device).submit(cost=1.0)
            low = rt.queue(device, priority=0).submit(cost=1.0)
            high = rt.queue(device, priority=5).submit(cost=1.0)
            await low
            assert blocker.finished_at == 1.0
            assert (high.started_at, low.started_at) == (1.0, 2.0)

    run_virtual(main)


def test_slots_freed_together_are_granted_in_one_turn_by_priority() -> None:
    """Slots that timed work frees at one instant are granted together, highest priority first."""

    async def main() -> None:
        devices = [FakeDevice(f"d{i}") for i in range(3)]
        async with af.open_runtime(devices) as rt:
            timers = rt._trampoline.timers
            blockers = [rt.queue(d).submit(cost=1.0) for d in devices]
            lows = [rt.queue(d, priority=0).submit(cost=1.0) for d in devices]
            highs = [rt.queue(d, priority=5).submit(cost=1.0) for d in devices]
            loop = asyncio.get_running_loop()
            scheduled: list[str] = []
            call_soon = loop.call_soon

            def counting(callback: Any, *args: Any, **kwargs: Any) -> asyncio.Handle:
                scheduled.append(getattr(callback, "__name__", ""))
                return call_soon(callback, *args, **kwargs)

            loop.call_soon = counting  # type: ignore[method-assign,assignment]
            try:
                for sub in lows:
                    await sub
            finally:
                del loop.call_soon
            # slots free at 1.0 (blockers) and 2.0 (highs), three at a time: one grant each
            assert scheduled.count("_grant") == 2
            assert timers._grants == []
            assert [b.finished_at for b in blockers] == [1.0] * 3
            assert [h.started_at for h in highs] == [1.0] * 3
            assert [low.started_at for low in lows] == [2.0] * 3

    run_virtual(main)


def test_a_deadline_grants_its_freed_slots_as_one_device_would_on_every_device() -> None:
    """Slots freed together go to the work already waiting, before work their signals readied."""

    async def main() -> None:
        devices = [FakeDevice(f"d{i}") for i in range(3)]
        async with af.open_runtime(devices) as rt:
            done = [rt.semaphore(name=f"done{i}") for i in range(3)]
            for d, sem in zip(devices, done, strict=True):
                rt.queue(d).submit(signals=[(sem, 1)], cost=1.0)
            waiting = [rt.queue(d, priority=0).submit(cost=1.0) for d in devices]
            readied = [
                rt.queue(d, priority=5).submit(waits=[(sem, 1)], cost=1.0)
                for d, sem in zip(devices, done, strict=True)
            ]
            for sub in waiting + readied:
                await sub
            # the same on every device: the grant is decided on the turn after the release,
            # before the trampoline advances the queues the released work's signals readied
            assert [sub.started_at for sub in waiting] == [1.0] * 3
            assert [sub.started_at for sub in readied] == [2.0] * 3

    run_virtual(main)
