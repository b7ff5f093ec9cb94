"""Chained execution on a CpuDevice's workers: work whose waits are met by work of the same
device runs on the worker without a round trip through the loop, and every guarantee of
the loop path holds on it (FIFO, priorities, failures, frontiers, memory, closing)."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from typing import Any

import pytest

import asyncfront as af
from asyncfront.devices import CpuDevice
from asyncfront.devices._workers import AHEAD_LIMIT


def chain(
    rt: af.Runtime, qa: af.DeviceQueue, qb: af.DeviceQueue, rounds: int, work: Any
) -> list[af.Submission]:
    """``rounds`` pairs a1 b1 a2 b2 ..., each link waiting for the one before it."""
    ab, ba = rt.semaphore(name="ab"), rt.semaphore(name="ba")
    subs = []
    for i in range(1, rounds + 1):
        subs.append(qa.submit(work, f"a{i}", waits=[(ba, i - 1)], signals=[(ab, i)], name=f"a{i}"))
        subs.append(qb.submit(work, f"b{i}", waits=[(ab, i)], signals=[(ba, i)], name=f"b{i}"))
    return subs


async def test_a_dependent_chain_runs_in_order_on_the_workers_with_merged_frontiers() -> None:
    """Each link runs after the one it waits for, and its frontier covers that link's."""
    device = CpuDevice("cpu", workers=2)
    order: list[str] = []
    async with af.open_runtime([device]) as rt:
        qa, qb = rt.queue("cpu", name="qa"), rt.queue("cpu", name="qb")
        subs = chain(rt, qa, qb, 200, lambda label: order.append(label) or label)
        results = [await sub for sub in subs]
    assert results == [f"{x}{i}" for i in range(1, 201) for x in "ab"]
    assert order == results
    for before, after in itertools.pairwise(subs):
        assert after.frontier is not None and before.frontier is not None
        assert after.frontier.dominates(before.frontier)
        assert after.frontier.get(before.queue.axis) == before.epoch
    assert device.statistics().chained > 0  # links ran without the loop handing them over


async def test_each_queue_runs_its_work_one_at_a_time_in_fifo_order() -> None:
    """Two workers never run two submissions of one queue at once, nor out of order."""
    device = CpuDevice("cpu", workers=2)
    lock = threading.Lock()
    running: dict[str, int] = {}
    overlap: list[str] = []
    seen: dict[str, list[int]] = {"q0": [], "q1": [], "q2": []}

    def work(queue: str, index: int) -> None:
        with lock:
            running[queue] = running.get(queue, 0) + 1
            if running[queue] > 1:
                overlap.append(queue)
            seen[queue].append(index)
        for _ in range(200):  # a little work, so the two workers interleave
            pass
        with lock:
            running[queue] -= 1

    async with af.open_runtime([device]) as rt:
        queues = {name: rt.queue("cpu", name=name) for name in seen}
        subs = [queues[name].submit(work, name, i) for i in range(300) for name in seen]
        for sub in subs:
            await sub
    assert overlap == []
    assert all(indexes == list(range(300)) for indexes in seen.values())


async def test_higher_priority_ready_work_runs_before_the_next_chained_link() -> None:
    """With one worker, a high-priority queue's ready work passes a low-priority chain."""
    device = CpuDevice("cpu", workers=1)
    order: list[str] = []
    running, go = threading.Event(), threading.Event()

    def first(label: str) -> None:
        running.set()
        go.wait(10)
        order.append(label)

    async with af.open_runtime([device]) as rt:
        high = rt.queue("cpu", priority=10, name="high")
        qa, qb = rt.queue("cpu", name="qa"), rt.queue("cpu", name="qb")
        gate = rt.semaphore(name="gate")
        urgent = high.submit(order.append, "urgent", waits=[(gate, 1)])
        ab, ba = rt.semaphore(name="ab"), rt.semaphore(name="ba")
        qa.submit(first, "a1", signals=[(ab, 1)])
        qb.submit(order.append, "b1", waits=[(ab, 1)], signals=[(ba, 1)])
        last = qa.submit(order.append, "a2", waits=[(ba, 1)])
        await asyncio.to_thread(running.wait, 10)  # a1 holds the only worker
        while not high.statistics().blocked:  # noqa: ASYNC110 (a state, not an event)
            await asyncio.sleep(0)
        gate.signal(1)  # urgent is ready while a1 runs; a1's consumer b1 will be too
        go.set()
        await last
        await urgent
    assert order == ["a1", "urgent", "b1", "a2"]


async def test_ready_work_the_worker_cannot_run_holds_back_a_lower_priority_chain() -> None:
    """A ready high-priority coroutine (it runs on the loop) still goes before the chain."""
    device = CpuDevice("cpu", workers=1)
    order: list[str] = []
    running, go = threading.Event(), threading.Event()

    def first(label: str) -> None:
        running.set()
        go.wait(10)
        order.append(label)

    async def on_loop(label: str) -> None:
        order.append(label)

    async with af.open_runtime([device]) as rt:
        high = rt.queue("cpu", priority=10, name="high")
        qa, qb = rt.queue("cpu", name="qa"), rt.queue("cpu", name="qb")
        gate = rt.semaphore(name="gate")
        urgent = high.submit(on_loop, "urgent", waits=[(gate, 1)])
        ab, ba = rt.semaphore(name="ab"), rt.semaphore(name="ba")
        qa.submit(first, "a1", signals=[(ab, 1)])
        qb.submit(order.append, "b1", waits=[(ab, 1)], signals=[(ba, 1)])
        last = qa.submit(order.append, "a2", waits=[(ba, 1)])
        await asyncio.to_thread(running.wait, 10)  # a1 holds the only worker
        while not high.statistics().blocked:  # noqa: ASYNC110 (a state, not an event)
            await asyncio.sleep(0)
        gate.signal(1)
        go.set()
        await last
        await urgent
    assert order == ["a1", "urgent", "b1", "a2"]


async def test_a_failed_link_fails_its_chained_consumers_and_the_queues_go_on() -> None:
    """A producer that raises on the worker fails every later link; later work still runs."""
    device = CpuDevice("cpu", workers=2)
    ran: list[str] = []

    def work(label: str) -> str:
        if label == "a3":
            raise ValueError("a3 broke")
        ran.append(label)
        return label

    async with af.open_runtime([device]) as rt:
        qa, qb = rt.queue("cpu", name="qa"), rt.queue("cpu", name="qb")
        subs = chain(rt, qa, qb, 6, work)
        after = [qa.submit(work, "after-a"), qb.submit(work, "after-b")]
        outcomes = []
        for sub in subs:
            try:
                outcomes.append(await sub)
            except Exception as exc:
                outcomes.append(exc)
        assert [await sub for sub in after] == ["after-a", "after-b"]
    assert outcomes[:4] == ["a1", "b1", "a2", "b2"]
    assert isinstance(outcomes[4], ValueError)
    for failed in outcomes[5:]:
        assert isinstance(failed, af.SemaphoreFailedError)
        assert isinstance(failed.root_cause, ValueError)
    assert ran[:4] == ["a1", "b1", "a2", "b2"]  # no consumer of a3 ever ran
    assert sorted(ran[4:]) == ["after-a", "after-b"]  # two queues: either order


async def test_working_memory_is_reserved_while_a_chained_link_runs() -> None:
    """A link with memory= runs only with its bytes reserved, between its neighbours."""
    device = CpuDevice("cpu", workers=2, memory=1 << 30)
    seen: list[tuple[str, int]] = []
    async with af.open_runtime([device]) as rt:
        ctx = rt.create_context("ctx", device="cpu", max_memory=1 << 20, qos=af.QoS.BEST_EFFORT)
        qa = rt.queue("cpu", name="qa")
        ab, ba = rt.semaphore(name="ab"), rt.semaphore(name="ba")

        def work(label: str) -> None:
            seen.append((label, rt.usage(ctx).used))

        qa.submit(work, "a1", signals=[(ab, 1)])
        ctx.queue.submit(work, "m1", waits=[(ab, 1)], signals=[(ba, 1)], memory=4096)
        last = qa.submit(work, "a2", waits=[(ba, 1)])
        await last
        assert rt.usage(ctx).used == 0
    assert seen == [("a1", 0), ("m1", 4096), ("a2", 0)]


async def test_closing_by_cancellation_stops_chained_work_and_fails_the_rest() -> None:
    """A runtime cancelled mid-chain runs no further link and every submission ends."""
    device = CpuDevice("cpu", workers=2)
    calls: list[str] = []
    started = threading.Event()
    hold = threading.Event()

    def work(label: str) -> None:
        calls.append(label)
        if label == "a20":
            started.set()
            hold.wait(10)

    subs: list[af.Submission] = []
    with pytest.raises(RuntimeError, match="stop here"):
        async with af.open_runtime([device]) as rt:
            qa, qb = rt.queue("cpu", name="qa"), rt.queue("cpu", name="qb")
            subs = chain(rt, qa, qb, 500, work)
            await asyncio.to_thread(started.wait, 10)
            threading.Timer(0.2, hold.set).start()  # a20 returns while the runtime closes
            raise RuntimeError("stop here")
    assert calls == [f"{x}{i}" for i in range(1, 21) for x in "ab"][:-1]  # up to a20
    assert all(sub.done() for sub in subs)
    states = [sub.state for sub in subs]
    completed = states.count(af.SubmissionState.COMPLETED)
    assert states[:completed] == [af.SubmissionState.COMPLETED] * completed
    for sub in subs[completed:]:
        assert isinstance(sub.exception(), (af.StalledError, af.SemaphoreFailedError))
    assert len(calls) - completed <= AHEAD_LIMIT  # work run but not reported is bounded
    assert not [t for t in threading.enumerate() if t.name.startswith("asyncfront-cpu")]


async def test_a_chained_wait_that_nothing_signals_is_reported_as_a_stall() -> None:
    """A link whose wait no work will meet fails at close, naming the semaphore and value."""
    device = CpuDevice("cpu", workers=2)
    async with af.open_runtime([device], stall_timeout=0.2) as rt:
        qa, qb = rt.queue("cpu", name="qa"), rt.queue("cpu", name="qb")
        ab, never = rt.semaphore(name="ab"), rt.semaphore(name="never")
        first = qa.submit(lambda: "a", signals=[(ab, 1)])
        stuck = qb.submit(lambda: "b", waits=[(ab, 1), (never, 1)])
    assert await first == "a"
    error = stuck.exception()
    assert isinstance(error, af.StalledError)
    assert "'never'" in str(error) and "reach 1" in str(error)


async def test_a_failure_to_choose_chained_work_falls_back_to_the_loop_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Should picking chained work ever raise, the workers stop chaining and all work runs."""
    from asyncfront.devices import _workers

    def broken(self: Any) -> None:
        raise LookupError("broken choice")

    monkeypatch.setattr(_workers.WorkerPool, "_choose", broken)
    device = CpuDevice("cpu", workers=2)
    order: list[str] = []
    async with af.open_runtime([device]) as rt:
        qa, qb = rt.queue("cpu", name="qa"), rt.queue("cpu", name="qb")
        subs = chain(rt, qa, qb, 20, lambda label: order.append(label) or label)
        results = [await sub for sub in subs]
    assert results == order == [f"{x}{i}" for i in range(1, 21) for x in "ab"]
    assert device._workers.chains is False and device.statistics().chained == 0


async def test_a_failure_to_read_a_waiting_queue_falls_back_to_the_loop_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Should reading a blocked queue's work ever raise, its wait and all work still end."""
    from asyncfront.devices import _workers

    def broken(self: Any, queue: Any) -> None:
        raise LookupError("broken mirror")

    monkeypatch.setattr(_workers.WorkerPool, "_mirror", broken)
    device = CpuDevice("cpu", workers=2)
    order: list[str] = []
    async with af.open_runtime([device]) as rt:
        qa, qb = rt.queue("cpu", name="qa"), rt.queue("cpu", name="qb")
        subs = chain(rt, qa, qb, 20, lambda label: order.append(label) or label)
        results = [await sub for sub in subs]
    assert results == order == [f"{x}{i}" for i in range(1, 21) for x in "ab"]
    assert device._workers.chains is False and device.statistics().chained == 0


async def test_completions_reach_the_loop_in_one_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Work that finishes while the loop is busy is delivered by one loop callback."""
    from asyncfront.devices import _workers

    deliveries: list[int] = []
    deliver = _workers.WorkerPool._deliver

    def counting(self: _workers.WorkerPool) -> None:
        deliveries.append(len(self._outbox))
        deliver(self)

    monkeypatch.setattr(_workers.WorkerPool, "_deliver", counting)
    device = CpuDevice("cpu", workers=2)
    all_done = threading.Event()
    finished: list[int] = []

    def work(i: int) -> int:
        finished.append(i)
        if len(finished) == 20:
            all_done.set()
        return i

    async with af.open_runtime([device]):
        futures = [device._in_pool(lambda i=i: work(i)) for i in range(20)]
        all_done.wait(10)  # hold the loop thread until every call has finished
        # ... and until the last worker has put its result in the outbox, which it does
        # just after the call returns
        pool = device._workers
        deadline = time.monotonic() + 10
        while len(pool._outbox) < 20 and time.monotonic() < deadline:
            time.sleep(0.001)  # noqa: ASYNC251 (the loop thread is held on purpose)
        assert await asyncio.gather(*futures) == list(range(20))
    assert deliveries == [20]


async def test_under_a_deadline_policy_the_workers_run_only_what_the_loop_hands_over() -> None:
    """An EDF device takes nothing up ahead, so its policy sees every ready submission."""
    device = CpuDevice("cpu", workers=2)
    async with af.open_runtime([device], policy=af.EDFPolicy()) as rt:
        qa, qb = rt.queue("cpu", name="qa"), rt.queue("cpu", name="qb")
        subs = chain(rt, qa, qb, 50, lambda label: label)
        results = [await sub for sub in subs]
    assert results == [f"{x}{i}" for i in range(1, 51) for x in "ab"]
    assert device.statistics().chained == 0


async def test_chained_results_are_caught_up_by_the_loop_in_one_callback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Links the workers ran ahead reach the loop's bookkeeping in one trampoline run."""
    from asyncfront import _queue

    runs: list[int] = []
    advance = _queue.Trampoline._run

    def counting(self: _queue.Trampoline) -> None:
        runs.append(len(self._ready))
        advance(self)

    device = CpuDevice("cpu", workers=2)
    order: list[str] = []
    running, go = threading.Event(), threading.Event()

    def work(label: str) -> str:
        if label == "a1":
            running.set()
            go.wait(10)
        order.append(label)
        return label

    async with af.open_runtime([device]) as rt:
        qa, qb = rt.queue("cpu", name="qa"), rt.queue("cpu", name="qb")
        subs = chain(rt, qa, qb, 20, work)
        await asyncio.to_thread(running.wait, 10)  # both queues shown, a1 on a worker
        monkeypatch.setattr(_queue.Trampoline, "_run", counting)
        go.set()
        deadline = time.monotonic() + 10
        while len(order) < 40 and time.monotonic() < deadline:
            time.sleep(0.001)  # noqa: ASYNC251 (holds the loop: the workers run the chain)
        assert len(order) == 40
        results = [await sub for sub in subs]
    assert results == order == [f"{x}{i}" for i in range(1, 21) for x in "ab"]
    assert runs[:1] == [1] and len(runs) == 1  # b1 readied, then everything in that run
