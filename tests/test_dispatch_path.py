"""The dispatch path: barriers inside submit, one trampoline for chains, waits as call-backs."""

from __future__ import annotations

import asyncio

import pytest

import asyncfront as af
from asyncfront.testing import FakeDevice, FakeDeviceError, run_virtual


def test_a_barrier_with_nothing_ahead_finishes_inside_submit() -> None:
    """A barrier whose waits are met, on an idle queue, is done when submit returns."""

    async def main() -> None:
        async with af.open_runtime([FakeDevice("gpu")]) as rt:
            q = rt.queue("gpu")
            ready, done = rt.semaphore(1, name="ready"), rt.semaphore(name="done")
            sub = q.submit(waits=[(ready, 1)], signals=[(done, 1)])
            assert sub.done() and sub.result() is None
            assert done.value == 1 and done.frontier.get(q.axis) == 1
            assert q.completed_epoch == 1 and len(rt.trace) == 1

    run_virtual(main)


def test_a_barrier_behind_work_or_on_an_unmet_wait_keeps_its_turn() -> None:
    """A barrier with work ahead of it, or an unmet wait, does not finish in submit."""

    async def main() -> None:
        async with af.open_runtime([FakeDevice("gpu")]) as rt:
            q = rt.queue("gpu")
            gate = rt.semaphore(name="gate")
            work = q.submit(cost=1.0)
            behind = q.submit()
            assert not behind.done()
            await behind
            assert work.finished_at is not None and behind.finished_at is not None
            assert work.finished_at <= behind.finished_at and behind.epoch == work.epoch + 1
            waiting = q.submit(waits=[(gate, 1)])
            assert not waiting.done()
            await asyncio.sleep(0)
            assert not waiting.done() and q.statistics().blocked
            gate.signal(1)
            await waiting
            assert rt.now() == 1.0

    run_virtual(main)


def test_a_chain_of_dependent_hops_runs_in_one_loop_callback() -> None:
    """200 dependent no-op hops between two queues all finish within one loop turn."""

    def noop() -> None:
        pass

    async def main() -> None:
        async with af.open_runtime([FakeDevice("a"), FakeDevice("b")]) as rt:
            qa, qb = rt.queue("a"), rt.queue("b")
            ab, ba = rt.semaphore(name="ab"), rt.semaphore(name="ba")
            last = None
            for i in range(1, 101):
                qa.submit(noop, waits=[(ba, i - 1)], signals=[(ab, i)])
                last = qb.submit(noop, waits=[(ab, i)], signals=[(ba, i)])
            assert last is not None and not last.done()
            await asyncio.sleep(0)  # one loop turn: the trampoline's callback runs first
            assert last.done()
            assert last.frontier is not None
            assert last.frontier.get(qa.axis) == 100 and last.frontier.get(qb.axis) == 100

    run_virtual(main)


def test_a_semaphore_signalled_from_two_queues_carries_both_histories() -> None:
    """Signals from two queues merge: a later one from the first keeps the second's axis."""

    async def main() -> None:
        async with af.open_runtime([FakeDevice("a"), FakeDevice("b")]) as rt:
            qa, qb = rt.queue("a"), rt.queue("b")
            sem = rt.semaphore(name="shared")
            await qa.submit(signals=[(sem, 1)])
            await qa.submit(signals=[(sem, 2)])
            assert sem.frontier.as_dict() == {qa.axis: 2}
            await qb.submit(signals=[(sem, 3)])
            assert sem.frontier.as_dict() == {qa.axis: 2, qb.axis: 1}
            await qa.submit(signals=[(sem, 4)])
            assert sem.frontier.as_dict() == {qa.axis: 3, qb.axis: 1}
            sem.signal(5, af.Frontier({7: 9}))
            await qa.submit(signals=[(sem, 6)])
            assert sem.frontier.as_dict() == {7: 9, qa.axis: 4, qb.axis: 1}

    run_virtual(main)


def test_a_multi_wait_fails_as_soon_as_one_semaphore_fails() -> None:
    """A head waiting on two semaphores fails when the second fails, the first still unmet."""

    async def main() -> None:
        async with af.open_runtime([FakeDevice("gpu")]) as rt:
            q = rt.queue("gpu")
            first, second = rt.semaphore(name="first"), rt.semaphore(name="second")
            sub = q.submit(lambda: None, waits=[(first, 1), (second, 1)])
            await asyncio.sleep(0)
            assert q.statistics().blocked
            second.fail(FakeDeviceError("upstream broke"))
            with pytest.raises(af.SemaphoreFailedError, match="second"):
                await sub
            assert not q.statistics().blocked and first.statistics().waiters == 0
            first.signal(1)  # nothing left waits on it
            assert (await q.submit(lambda: 7)) == 7

    run_virtual(main)


def test_timed_work_holds_its_slot_for_its_cost_and_faults_still_fire() -> None:
    """Cost-bearing fake work takes its virtual duration on the slot; injected faults fail it."""

    async def main() -> None:
        device = FakeDevice("gpu", speed=2.0)
        async with af.open_runtime([device]) as rt:
            q1, q2 = rt.queue("gpu"), rt.queue("gpu")
            a = q1.submit(lambda: "a", cost=4.0)
            b = q2.submit(lambda: "b", cost=2.0)
            assert (await a, await b) == ("a", "b")
            assert (a.started_at, a.finished_at, b.started_at, b.finished_at) == (
                0.0 + rt.trace.origin,
                2.0 + rt.trace.origin,
                2.0 + rt.trace.origin,
                3.0 + rt.trace.origin,
            )
            device.fail_next(name="broken")
            broken = q1.submit(lambda: None, cost=1.0, name="broken")
            with pytest.raises(FakeDeviceError):
                await broken
            assert device.statistics().busy_slots == 0

    run_virtual(main)


def test_closing_with_a_head_on_a_timer_or_waiting_for_a_slot_gives_everything_back() -> None:
    """A runtime closed mid-work fails its timed, slot-waiting and blocked heads, frees the slot."""
    seen: list[af.Submission] = []
    device = FakeDevice("gpu")

    class Stop(Exception):
        pass

    async def main() -> None:
        async with af.open_runtime([device]) as rt:
            q1, q2, q3 = rt.queue("gpu"), rt.queue("gpu"), rt.queue("gpu")
            never = rt.semaphore(name="never")
            seen.append(q1.submit(cost=10.0, name="running"))
            seen.append(q2.submit(lambda: None, cost=1.0, name="queued"))
            seen.append(q3.submit(lambda: None, waits=[(never, 1)], name="blocked"))
            await asyncio.sleep(1.0)
            assert [s.state.value for s in seen] == ["running", "ready", "waiting"]
            raise Stop  # leave at once: no drain

    with pytest.raises(Stop):
        run_virtual(main)
    for sub in seen:
        assert isinstance(sub.exception(), af.StalledError), sub
        assert "runtime closed" in str(sub.exception())
    assert device.statistics().busy_slots == 0 and device.statistics().waiting_queues == 0


def test_a_queue_signals_a_semaphore_subclass_through_its_own_signal() -> None:
    """A semaphore class that overrides signal() sees every signal a queue gives it."""
    seen: list[int] = []

    class Watched(af.TimelineSemaphore):
        def signal(self, value: int, frontier: af.Frontier | None = None) -> None:
            seen.append(value)
            super().signal(value, frontier)

    async def main() -> None:
        async with af.open_runtime([FakeDevice("gpu")]) as rt:
            q = rt.queue("gpu")
            sem = Watched(name="watched")
            q.submit(signals=[(sem, 1)])
            await q.submit(lambda: None, signals=[(sem, 2)])
            await q.submit(lambda: None, signals=[(sem, 3)], cost=1.0)
            assert sem.value == 3 and sem.frontier.get(q.axis) == 3

    run_virtual(main)
    assert seen == [1, 2, 3]


def test_queues_passing_frontiers_round_share_one_axes_tuple() -> None:
    """Queues that pass equal-axis frontiers on end up sharing one axes tuple.

    A ring of queues, each waiting for the previous one's latest work: once every
    frontier covers every queue, the frontiers the queues signal share one axes tuple
    (the fast path of the comparisons), and their entries stay exact.
    """

    async def main() -> None:
        devices = [FakeDevice(f"d{i}") for i in range(4)]
        async with af.open_runtime(devices) as rt:
            queues = [rt.queue(devices[i % 4]) for i in range(8)]
            sems = [rt.semaphore(name=f"s{i}") for i in range(8)]
            counts = [0] * 8
            last = None
            for n in range(8 * 40):
                q = n % 8
                other = (q + 3) % 8
                waits = [(sems[other], counts[other])] if counts[other] else []
                counts[q] += 1
                last = queues[q].submit(waits=waits, signals=[(sems[q], counts[q])], cost=1e-6)
            assert last is not None
            await last
            frontiers = [s.frontier for s in sems]
            assert all(len(f) == 8 for f in frontiers)
            assert len({id(f._axes) for f in frontiers}) == 1
            for q, f in enumerate(frontiers):  # each reads its own queue's last epoch
                assert f.get(queues[q].axis) == queues[q].completed_epoch

    run_virtual(main)


def test_the_shared_axes_table_is_bounded() -> None:
    """Sharing axes tuples keeps at most its limit of them, and returns equal tuples."""
    from asyncfront import _frontier

    _frontier._AXES.clear()  # a cache: emptying it only costs the fast path
    made = [tuple(range(i, i + 3)) for i in range(_frontier._AXES_LIMIT + 10)]
    for axes in made:
        assert _frontier._shared_axes(axes) is axes  # the first one seen is kept
        assert len(_frontier._AXES) <= _frontier._AXES_LIMIT
    again = tuple(range(_frontier._AXES_LIMIT + 9, _frontier._AXES_LIMIT + 12))
    assert _frontier._shared_axes(again) is made[-1]
