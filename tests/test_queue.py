"""Device queues: FIFO order, atomic submission, failure propagation, priorities."""

from __future__ import annotations

import asyncio
import contextlib
import itertools

import pytest

import asyncfront as af
from asyncfront.testing import FakeDevice, FakeDeviceError, run_virtual


def test_fifo_order_within_a_queue() -> None:
    """Submissions on one queue run in submission order with increasing epochs."""

    async def main() -> list[int]:
        seen: list[int] = []
        async with af.open_runtime([FakeDevice("gpu", concurrency=4)]) as rt:
            q = rt.queue("gpu")
            subs = [q.submit(seen.append, i, cost=0.1 * (5 - i)) for i in range(5)]
            for sub in subs:
                await sub
            assert [s.epoch for s in subs] == [1, 2, 3, 4, 5]
            assert all(
                a.finished_at is not None and b.started_at is not None
                and a.finished_at <= b.started_at
                for a, b in itertools.pairwise(subs)
            )  # fmt: skip
        return seen

    assert run_virtual(main) == [0, 1, 2, 3, 4]


def test_submit_returns_at_once_and_last_stage_first_pipeline_runs() -> None:
    """A pipeline submitted last stage first runs in dependency order; submit never waits."""

    async def main() -> None:
        devices = [FakeDevice("a"), FakeDevice("b"), FakeDevice("c")]
        async with af.open_runtime(devices) as rt:
            qa, qb, qc = rt.queue("a"), rt.queue("b"), rt.queue("c")
            s1, s2 = af.TimelineSemaphore(name="s1"), af.TimelineSemaphore(name="s2")
            before = rt.now()
            third = qc.submit(lambda x: x + 1, 41, waits=[(s2, 1)], cost=1.0, name="third")
            second = qb.submit(waits=[(s1, 1)], signals=[(s2, 1)], cost=1.0, name="second")
            first = qa.submit(signals=[(s1, 1)], cost=1.0, name="first")
            assert rt.now() == before  # submitting took no time and waited for nothing
            assert third.state is af.SubmissionState.PENDING
            assert await third == 42
            assert first.finished_at == 1.0 and second.finished_at == 2.0
            assert third.started_at == 2.0 and third.finished_at == 3.0
            assert third.frontier == af.Frontier({qa.axis: 1, qb.axis: 1, qc.axis: 1})

    run_virtual(main)


def test_failure_propagates_downstream_and_queues_keep_serving() -> None:
    """A failing stage fails every downstream semaphore and submission with its cause."""

    async def main() -> None:
        devices = [FakeDevice("a"), FakeDevice("b"), FakeDevice("c")]
        async with af.open_runtime(devices) as rt:
            qa, qb, qc = rt.queue("a"), rt.queue("b"), rt.queue("c")
            s1, s2 = af.TimelineSemaphore(name="s1"), af.TimelineSemaphore(name="s2")
            boom = ValueError("model exploded")

            def explode() -> None:
                raise boom

            first = qa.submit(explode, signals=[(s1, 1)], cost=1.0)
            second = qb.submit(waits=[(s1, 1)], signals=[(s2, 1)], cost=1.0)
            third = qc.submit(waits=[(s2, 1)], cost=1.0)
            with pytest.raises(ValueError, match="model exploded"):
                await first
            with pytest.raises(af.SemaphoreFailedError) as second_err:
                await second
            assert second_err.value.__cause__ is boom
            with pytest.raises(af.SemaphoreFailedError) as third_err:
                await third
            assert third_err.value.__cause__ is boom
            assert s1.failure is boom and s2.failure is boom
            # the queues go on with later work
            assert await qa.submit(lambda: "a ok", cost=1.0) == "a ok"
            assert await qb.submit(lambda: "b ok") == "b ok"
            assert await qc.submit(lambda: "c ok") == "c ok"
            assert third.state is af.SubmissionState.FAILED

    run_virtual(main)


def test_injected_device_fault_fails_submission() -> None:
    """A fault injected on a fake device fails exactly the matching submission."""

    async def main() -> None:
        gpu = FakeDevice("gpu")
        gpu.fail_next(name="decode")
        async with af.open_runtime([gpu]) as rt:
            q = rt.queue("gpu")
            ok = q.submit(lambda: 1, name="prefill", cost=0.1)
            bad = q.submit(lambda: 2, name="decode", cost=0.1)
            after = q.submit(lambda: 3, name="decode", cost=0.1)
            assert await ok == 1
            with pytest.raises(FakeDeviceError):
                await bad
            assert await after == 3

    run_virtual(main)


def test_wrong_signal_value_is_refused_at_submit() -> None:
    """Submitting a signal at or below the semaphore's value raises and queues nothing."""

    async def main() -> None:
        async with af.open_runtime([FakeDevice("gpu")]) as rt:
            q = rt.queue("gpu")
            sem = af.TimelineSemaphore(3, name="kv")
            with pytest.raises(ValueError, match=r"signal value 2 .*'kv'.* current value 3"):
                q.submit(signals=[(sem, 2)])
            with pytest.raises(TypeError, match="pairs"):
                q.submit(waits=[sem])  # type: ignore[list-item]
            assert q.submitted_epoch == 0

    run_virtual(main)


def test_signal_value_overtaken_before_run_fails_cleanly() -> None:
    """A signal that became non-monotonic by run time fails the submission, not the queue."""

    async def main() -> None:
        async with af.open_runtime([FakeDevice("a"), FakeDevice("b")]) as rt:
            qa, qb = rt.queue("a"), rt.queue("b")
            sem = af.TimelineSemaphore(name="sem")
            late = qa.submit(signals=[(sem, 1)], cost=2.0)
            qb.submit(signals=[(sem, 5)], cost=1.0)
            with pytest.raises(ValueError, match="signal value 1"):
                await late
            assert await qa.submit(lambda: "next") == "next"

    run_virtual(main)


def test_stalled_wait_fails_on_exit_instead_of_hanging() -> None:
    """Work waiting on a semaphore nobody signals fails with StalledError on runtime exit."""

    async def main() -> af.Submission:
        async with af.open_runtime([FakeDevice("gpu")], stall_timeout=0.5) as rt:
            q = rt.queue("gpu")
            orphan = af.TimelineSemaphore(name="orphan")
            downstream = af.TimelineSemaphore(name="downstream")
            stuck = q.submit(waits=[(orphan, 1)], signals=[(downstream, 1)], name="stuck")
        assert downstream.failure is not None
        return stuck

    stuck = run_virtual(main)
    assert isinstance(stuck.exception(), af.StalledError)
    assert "orphan" in str(stuck.exception())


def test_exit_drains_pending_work() -> None:
    """Leaving the runtime normally waits for every queued submission to finish."""

    async def main() -> list[af.Submission]:
        async with af.open_runtime([FakeDevice("gpu")]) as rt:
            q = rt.queue("gpu")
            subs = [q.submit(cost=1.0) for _ in range(3)]
        return subs

    subs = run_virtual(main)
    assert [s.state for s in subs] == [af.SubmissionState.COMPLETED] * 3


def test_exception_exit_cancels_pending_work() -> None:
    """An error inside the runtime block fails pending work instead of draining it."""

    async def main() -> af.Submission:
        sub: af.Submission | None = None
        with pytest.raises(KeyError):
            async with af.open_runtime([FakeDevice("gpu")]) as rt:
                sub = rt.queue("gpu").submit(cost=100.0)
                await asyncio.sleep(1.0)
                raise KeyError("user bug")
        assert sub is not None
        return sub

    sub = run_virtual(main)
    assert isinstance(sub.exception(), af.StalledError)


def test_priority_runs_ready_high_work_before_low() -> None:
    """With one slot, all ready higher-priority work runs before lower-priority work."""

    async def main() -> list[str]:
        order: list[str] = []
        async with af.open_runtime([FakeDevice("gpu", concurrency=1)]) as rt:
            low = rt.queue("gpu", priority=0, name="low")
            high = rt.queue("gpu", priority=10, name="high")
            blocker = high.submit(order.append, "blocker", cost=1.0)
            await asyncio.sleep(0.5)  # the device is busy; now both queues get ready work
            for i in range(3):
                low.submit(order.append, f"low{i}", cost=1.0)
            for i in range(3):
                high.submit(order.append, f"high{i}", cost=1.0)
            await blocker
        return order

    assert run_virtual(main) == ["blocker", "high0", "high1", "high2", "low0", "low1", "low2"]


def test_low_priority_fills_gap_while_high_is_blocked() -> None:
    """When the high-priority queue waits on a semaphore, low-priority work uses the device."""

    async def main() -> None:
        devices = [FakeDevice("gpu", concurrency=1), FakeDevice("cpu", kind="cpu")]
        async with af.open_runtime(devices) as rt:
            high = rt.queue("gpu", priority=10, name="high")
            low = rt.queue("gpu", priority=0, name="low")
            producer = rt.queue("cpu", name="producer")
            ready = af.TimelineSemaphore(name="ready")
            gated = high.submit(waits=[(ready, 1)], cost=1.0, name="gated")
            fillers = [low.submit(cost=1.0, name=f"fill{i}") for i in range(6)]
            producer.submit(signals=[(ready, 1)], cost=2.5)
            await fillers[-1]
            # fill0..fill2 ran while 'gated' was blocked (t=0..3); gated took the next
            # submission boundary after the signal at 2.5, preempting the rest.
            assert [f.started_at for f in fillers[:3]] == [0.0, 1.0, 2.0]
            assert gated.started_at == 3.0
            assert fillers[3].started_at == 4.0

    run_virtual(main)


def test_back_to_back_high_priority_keeps_the_slot() -> None:
    """A finishing high-priority queue's next ready submission beats waiting low work."""

    async def main() -> list[str]:
        order: list[str] = []
        async with af.open_runtime([FakeDevice("gpu")]) as rt:
            high = rt.queue("gpu", priority=5, name="high")
            low = rt.queue("gpu", priority=1, name="low")
            sem = af.TimelineSemaphore(name="chain")
            for i in range(1, 4):
                high.submit(
                    order.append, f"h{i}", cost=1.0, waits=[(sem, i - 1)], signals=[(sem, i)]
                )
            low.submit(order.append, "l", cost=1.0)
        return order

    assert run_virtual(main) == ["h1", "h2", "h3", "l"]


def test_queue_statistics_and_repr() -> None:
    """Queue statistics report epochs and pending work; repr names queue, axis and device."""

    async def main() -> None:
        async with af.open_runtime([FakeDevice("gpu")]) as rt:
            q = rt.queue("gpu", name="llm")
            for _ in range(3):
                q.submit(cost=1.0)
            stats = q.statistics()
            assert stats.submitted_epoch == 3 and stats.completed_epoch == 0
            assert stats.pending == 3
            assert "llm" in repr(q) and "gpu" in repr(q)
            await asyncio.sleep(10)
            stats = q.statistics()
            assert stats.completed_epoch == 3 and stats.pending == 0
            assert rt.completed.get(q.axis) == 3

    run_virtual(main)


def test_frontier_capacity_truncates_to_lower_bound() -> None:
    """A frontier wider than the runtime's capacity keeps its own axis and the newest epochs."""

    async def main() -> None:
        devices = [FakeDevice(f"d{i}") for i in range(6)]
        async with af.open_runtime(devices, frontier_capacity=3) as rt:
            producers = [rt.queue(f"d{i}") for i in range(5)]
            sink = rt.queue("d5", name="sink")
            sems = [af.TimelineSemaphore(name=f"s{i}") for i in range(5)]
            for i, (q, sem) in enumerate(zip(producers, sems, strict=True)):
                for epoch in range(1, i + 2):
                    q.submit(signals=[(sem, epoch)], cost=0.1)
            last = sink.submit(waits=[(s, i + 1) for i, s in enumerate(sems)])
            await last
            assert last.frontier is not None
            assert len(last.frontier) == 3
            assert last.frontier.get(sink.axis) == 1
            assert last.frontier.get(producers[4].axis) == 5
            assert last.frontier.get(producers[3].axis) == 4
            full = af.Frontier({q.axis: i + 1 for i, q in enumerate(producers)} | {sink.axis: 1})
            assert full.dominates(last.frontier)

    run_virtual(main)


def test_wait_completed_blocks_until_epochs_complete() -> None:
    """rt.wait_completed returns once every named epoch is done, and rejects unknown axes."""

    async def main() -> None:
        async with af.open_runtime([FakeDevice("gpu")]) as rt:
            q = rt.queue("gpu")
            q.submit(cost=1.0)
            q.submit(cost=1.0)
            target = af.Frontier({q.axis: 2})
            assert not rt.is_complete(target)
            await rt.wait_completed(target)
            assert rt.now() == 2.0 and rt.is_complete(target)
            with pytest.raises(ValueError, match="belongs to no queue"):
                await rt.wait_completed(af.Frontier({af.axis(node=9): 1}))

    run_virtual(main)


def test_work_submitted_as_the_runtime_fails_is_failed_not_lost() -> None:
    """Submissions whose queue task never started still fail when the runtime closes."""

    async def main() -> af.Submission:
        sub: af.Submission | None = None
        with pytest.raises(KeyError):
            async with af.open_runtime([FakeDevice("gpu")]) as rt:
                sub = rt.queue("gpu").submit(cost=1.0)
                raise KeyError("before any loop turn")
        assert sub is not None
        await asyncio.wait_for(_await_quietly(sub), 1.0)
        return sub

    sub = run_virtual(main)
    assert isinstance(sub.exception(), af.StalledError)


async def _await_quietly(sub: af.Submission) -> None:
    with contextlib.suppress(af.StalledError):
        await sub


def test_run_virtual_keeps_the_threads_current_loop() -> None:
    """run_virtual restores the thread's event loop instead of dropping it unclosed."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        run_virtual(asyncio.sleep, 1.0)
        assert asyncio.get_event_loop_policy().get_event_loop() is loop
    finally:
        asyncio.set_event_loop(None)
        loop.close()


def test_cancelled_completion_waits_do_not_pile_up() -> None:
    """Cancelled wait_completed calls are compacted out of the runtime's waiter heap."""

    async def main() -> None:
        async with af.open_runtime([FakeDevice("gpu")]) as rt:
            q = rt.queue("gpu")
            q.submit(cost=10.0)
            target = af.Frontier({q.axis: 1})
            for _ in range(200):
                task = asyncio.ensure_future(rt.wait_completed(target))
                await asyncio.sleep(0)
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            assert len(rt._completion_waiters[q.axis]) <= 64
            await rt.wait_completed(target)

    run_virtual(main)
