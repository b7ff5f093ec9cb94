"""Timeline semaphores: signalling, sticky failure, waiters, threads, wait_all and wait_any."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
import types
from concurrent.futures import Future as ConcurrentFuture

import pytest

import asyncfront as af
from asyncfront import (
    Frontier,
    SemaphoreFailedError,
    TimelineSemaphore,
    _semaphore,
    wait_all,
    wait_any,
)

A = af.axis(device=0)
B = af.axis(device=1)
C = af.axis(device=2)


async def parked(sem: TimelineSemaphore, value: int) -> asyncio.Task[Frontier]:
    """A task waiting on ``sem`` for ``value``, run until it is parked in the semaphore."""
    task = asyncio.create_task(sem.wait(value))
    await asyncio.sleep(0)
    assert not task.done()
    return task


# -- signalling --------------------------------------------------------------------------


@pytest.mark.parametrize("value", [3, 2, 0])
def test_signal_must_exceed_the_current_value(value: int) -> None:
    """A signal not above the current value raises ValueError naming both, and changes nothing."""
    sem = TimelineSemaphore(3, name="s")
    with pytest.raises(ValueError, match=rf"signal value {value} must exceed current value 3"):
        sem.signal(value, Frontier({A: 1}))
    assert sem.value == 3
    assert sem.frontier == Frontier()


def test_signal_advances_value_and_query() -> None:
    """signal sets the value, which value and query report."""
    sem = TimelineSemaphore(name="s")
    assert sem.query() == 0
    sem.signal(5)
    sem.signal(9)
    assert sem.value == 9
    assert sem.query() == 9


def test_negative_initial_value_raises() -> None:
    """A semaphore cannot start below 0."""
    with pytest.raises(ValueError, match="got -1"):
        TimelineSemaphore(-1)


def test_signalling_a_failed_semaphore_raises() -> None:
    """signal and query on a failed semaphore raise SemaphoreFailedError caused by the failure."""
    sem = TimelineSemaphore(name="s")
    boom = OSError("disk gone")
    sem.fail(boom)
    with pytest.raises(SemaphoreFailedError) as info:
        sem.signal(1)
    assert info.value.__cause__ is boom
    assert info.value.root_cause is boom
    assert info.value.semaphore is sem
    assert "disk gone" in str(info.value)
    with pytest.raises(SemaphoreFailedError):
        sem.query()
    assert sem.value == 0


# -- failure -----------------------------------------------------------------------------


async def test_failure_reaches_current_and_future_waiters() -> None:
    """fail() raises SemaphoreFailedError, caused by the original error, in every waiter."""
    sem = TimelineSemaphore(2, name="s")
    waiters = [await parked(sem, 3), await parked(sem, 10)]
    boom = RuntimeError("kernel crashed")
    assert sem.fail(boom) is True
    for task in waiters:
        with pytest.raises(SemaphoreFailedError) as info:
            await task
        assert info.value.__cause__ is boom
    # Future waiters fail too, even for a value the semaphore had already reached.
    for value in (1, 3):
        with pytest.raises(SemaphoreFailedError) as info:
            await sem.wait(value)
        assert info.value.__cause__ is boom
    assert sem.statistics().waiters == 0


def test_first_failure_wins() -> None:
    """A second fail() is refused and the first error stays the cause."""
    sem = TimelineSemaphore(name="s")
    first, second = ValueError("first"), ValueError("second")
    assert sem.fail(first) is True
    assert sem.fail(second) is False
    assert sem.failure is first
    with pytest.raises(SemaphoreFailedError) as info:
        sem.query()
    assert info.value.__cause__ is first


# -- waiters -----------------------------------------------------------------------------


async def test_signal_wakes_exactly_the_satisfied_waiters() -> None:
    """A signal completes the waits it reaches and leaves the higher ones waiting."""
    sem = TimelineSemaphore(name="s")
    tasks = {value: await parked(sem, value) for value in (5, 1, 3, 2)}
    assert sem.statistics().waiters == 4
    sem.signal(2, Frontier({A: 2}))
    assert await asyncio.gather(tasks[1], tasks[2]) == [Frontier({A: 2})] * 2
    await asyncio.sleep(0)
    assert not tasks[3].done()
    assert not tasks[5].done()
    assert sem.statistics().waiters == 2
    sem.signal(4)
    assert await tasks[3] == Frontier({A: 2})
    assert not tasks[5].done()
    sem.signal(5)
    await tasks[5]
    assert sem.statistics().waiters == 0


async def test_cancelled_waiter_is_removed_and_others_still_wake() -> None:
    """Cancelling a waiter drops it from the count; a later signal wakes the rest."""
    sem = TimelineSemaphore(name="s")
    doomed = await parked(sem, 2)
    kept = await parked(sem, 2)
    later = await parked(sem, 3)
    doomed.cancel()
    with pytest.raises(asyncio.CancelledError):
        await doomed
    assert sem.statistics().waiters == 2
    sem.signal(2, Frontier({A: 1}))
    assert await kept == Frontier({A: 1})
    assert sem.statistics().waiters == 1
    later.cancel()
    with pytest.raises(asyncio.CancelledError):
        await later
    assert sem.statistics().waiters == 0


async def test_waiter_count_survives_a_burst_of_cancellations() -> None:
    """After many waiters are cancelled at once, the count is the live waiters, exactly."""
    sem = TimelineSemaphore(name="s")
    live = [await parked(sem, 100) for _ in range(3)]
    doomed = [await parked(sem, 100) for _ in range(6)]
    for task in doomed:
        task.cancel()
    await asyncio.gather(*doomed, return_exceptions=True)
    assert sem.statistics().waiters == 3
    sem.signal(100)
    await asyncio.gather(*live)
    assert sem.statistics().waiters == 0


async def test_waiter_cancelled_while_a_signal_passes_is_counted_once() -> None:
    """A waiter cancelled just before a signal that would wake it leaves the count right."""
    sem = TimelineSemaphore(name="s")
    doomed = await parked(sem, 1)
    other = await parked(sem, 2)
    doomed.cancel()
    sem.signal(1)
    with pytest.raises(asyncio.CancelledError):
        await doomed
    assert sem.statistics().waiters == 1
    sem.signal(2)
    await other
    assert sem.statistics().waiters == 0


async def test_waiter_cancelled_after_failure_leaves_no_count() -> None:
    """Waiters cancelled around a failure leave the count at 0."""
    sem = TimelineSemaphore(name="s")
    doomed = await parked(sem, 1)
    doomed.cancel()
    sem.fail(RuntimeError("boom"))
    with pytest.raises(asyncio.CancelledError):
        await doomed
    assert sem.statistics().waiters == 0


async def test_reached_value_returns_without_a_loop_round_trip() -> None:
    """Waiting for a reached value does not yield to other ready callbacks."""
    sem = TimelineSemaphore(3, name="s")
    sem.signal(4, Frontier({A: 4}))
    ran: list[bool] = []
    asyncio.get_running_loop().call_soon(ran.append, True)
    assert await sem.wait(4) == Frontier({A: 4})
    assert await sem.wait(0) == Frontier({A: 4})
    assert not ran
    await asyncio.sleep(0)
    assert ran == [True]


async def test_waiting_for_an_unreached_value_yields() -> None:
    """A wait that parks lets other ready callbacks run before it completes."""
    sem = TimelineSemaphore(name="s")
    loop = asyncio.get_running_loop()
    order: list[str] = []
    loop.call_soon(order.append, "other")
    loop.call_soon(sem.signal, 1)
    await sem.wait(1)
    order.append("woken")
    assert order == ["other", "woken"]


async def test_wait_returns_the_merged_frontier_of_signals() -> None:
    """wait returns, and frontier holds, the merge of every signal's frontier so far."""
    sem = TimelineSemaphore(name="s")
    task = await parked(sem, 3)
    sem.signal(1, Frontier({A: 1, B: 5}))
    sem.signal(2)
    sem.signal(3, Frontier({A: 3, C: 1}))
    expected = Frontier({A: 3, B: 5, C: 1})
    assert await task == expected
    assert sem.frontier == expected
    assert await sem.wait(2) == expected
    sem.signal(4, Frontier({B: 2}))
    assert sem.frontier == expected


# -- threads -----------------------------------------------------------------------------


async def test_signal_threadsafe_from_a_worker_wakes_loop_waiters() -> None:
    """signal_threadsafe from a thread wakes waiters on the loop with the signal's frontier."""
    sem = TimelineSemaphore(name="s")
    task = await parked(sem, 1)
    outcome = await asyncio.to_thread(sem.signal_threadsafe, 1, Frontier({A: 7}))
    assert await asyncio.wrap_future(outcome) is None
    assert await task == Frontier({A: 7})
    assert sem.value == 1


async def test_signal_threadsafe_reports_a_bad_value_in_its_future() -> None:
    """A wrong value from a thread comes back as the returned future's ValueError."""
    sem = TimelineSemaphore(1, name="s")
    task = await parked(sem, 2)
    outcome = await asyncio.to_thread(sem.signal_threadsafe, 1)
    assert isinstance(outcome, ConcurrentFuture)
    with pytest.raises(ValueError, match="signal value 1 must exceed current value 1"):
        await asyncio.wrap_future(outcome)
    assert not task.done()
    sem.signal(2)
    await task


def test_signal_threadsafe_before_binding_signals_at_once() -> None:
    """With no loop bound yet, signal_threadsafe signals in the caller and resolves at once."""
    sem = TimelineSemaphore(name="s")
    assert sem.signal_threadsafe(2).result(timeout=0) is None
    assert sem.value == 2
    bad = sem.signal_threadsafe(2)
    assert isinstance(bad.exception(timeout=0), ValueError)


async def test_wait_sync_in_a_thread_is_woken_by_the_loop() -> None:
    """wait_sync blocks a worker thread until the loop signals, and returns the frontier."""
    sem = TimelineSemaphore(name="s")
    sem.bind(asyncio.get_running_loop())
    waiting = asyncio.ensure_future(asyncio.to_thread(sem.wait_sync, 2, 10.0))
    await asyncio.sleep(0.05)
    sem.signal(1, Frontier({A: 1}))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    sem.signal(2, Frontier({B: 2}))
    assert await waiting == Frontier({A: 1, B: 2})


def test_wait_sync_times_out() -> None:
    """wait_sync raises TimeoutError naming the target and current value when time runs out."""
    sem = TimelineSemaphore(1, name="s")
    with pytest.raises(TimeoutError, match=r"did not reach 2 .*\(value 1\)"):
        sem.wait_sync(2, timeout=0.01)
    assert sem.wait_sync(1, timeout=0) == Frontier()


async def test_wait_sync_raises_when_the_semaphore_fails() -> None:
    """A thread blocked in wait_sync raises SemaphoreFailedError when the loop fails it."""
    sem = TimelineSemaphore(name="s")
    sem.bind(asyncio.get_running_loop())
    waiting = asyncio.ensure_future(asyncio.to_thread(sem.wait_sync, 1, 10.0))
    await asyncio.sleep(0.05)
    boom = RuntimeError("boom")
    sem.fail(boom)
    with pytest.raises(SemaphoreFailedError) as info:
        await waiting
    assert info.value.__cause__ is boom


async def test_wait_sync_on_the_loop_thread_raises() -> None:
    """wait_sync on the thread running the semaphore's loop raises instead of deadlocking."""
    sem = TimelineSemaphore(name="s")
    sem.bind(asyncio.get_running_loop())
    with pytest.raises(RuntimeError, match="would deadlock"):
        sem.wait_sync(1, timeout=0.01)


def test_concurrent_first_sync_waiters_are_all_woken(monkeypatch: pytest.MonkeyPatch) -> None:
    """Threads entering wait_sync together on a fresh semaphore are all woken by one signal."""
    real_condition = threading.Condition

    def slow_condition() -> threading.Condition:
        # Widen the window between creating the condition and publishing it.
        time.sleep(0.05)
        return real_condition()

    monkeypatch.setattr(_semaphore, "threading", types.SimpleNamespace(Condition=slow_condition))
    sem = TimelineSemaphore(name="s")
    results: list[Frontier | BaseException] = []

    def waiter() -> None:
        try:
            results.append(sem.wait_sync(1, timeout=3.0))
        except BaseException as exc:
            results.append(exc)

    threads = [threading.Thread(target=waiter, daemon=True) for _ in range(2)]
    for thread in threads:
        thread.start()
    time.sleep(0.2)  # both threads are now blocked in wait_sync
    sem.signal(1, Frontier({A: 1}))
    for thread in threads:
        thread.join(timeout=1.0)
    assert not any(thread.is_alive() for thread in threads), "a waiter missed the signal"
    assert results == [Frontier({A: 1})] * 2


async def test_bind_to_another_loop_raises() -> None:
    """A semaphore bound to one loop refuses to bind to another."""
    sem = TimelineSemaphore(name="s")
    sem.bind(asyncio.get_running_loop())
    sem.bind(asyncio.get_running_loop())
    other = asyncio.new_event_loop()
    try:
        with pytest.raises(RuntimeError, match="another event loop"):
            sem.bind(other)
    finally:
        other.close()


# -- wait_all and wait_any ---------------------------------------------------------------


async def test_wait_all_merges_frontiers() -> None:
    """wait_all waits for every pair and returns the merge of their frontiers."""
    first, second = TimelineSemaphore(name="first"), TimelineSemaphore(name="second")
    task = asyncio.ensure_future(wait_all([(first, 1), (second, 2)]))
    await asyncio.sleep(0)
    second.signal(2, Frontier({A: 1, B: 4}))
    await asyncio.sleep(0)
    assert not task.done()
    first.signal(1, Frontier({A: 3}))
    assert await task == Frontier({A: 3, B: 4})
    assert await wait_all([]) == Frontier()


async def test_wait_all_raises_on_a_failed_semaphore() -> None:
    """wait_all raises SemaphoreFailedError when one of its semaphores fails."""
    ok, bad = TimelineSemaphore(1, name="ok"), TimelineSemaphore(name="bad")
    bad.fail(OSError("link down"))
    with pytest.raises(SemaphoreFailedError):
        await wait_all([(ok, 1), (bad, 1)])


async def test_wait_any_returns_the_first_satisfied() -> None:
    """wait_any returns the index and frontier of the pair satisfied first."""
    sems = [TimelineSemaphore(name=f"s{i}") for i in range(3)]
    task = asyncio.ensure_future(wait_any([(sem, 1) for sem in sems]))
    await asyncio.sleep(0)
    sems[2].signal(1, Frontier({C: 1}))
    assert await task == (2, Frontier({C: 1}))
    assert all(sem.statistics().waiters == 0 for sem in sems)


async def test_wait_any_on_reached_values_takes_the_lowest_index() -> None:
    """When pairs are already reached, wait_any returns the first of them at once."""
    low, high = TimelineSemaphore(name="low"), TimelineSemaphore(2, name="high")
    high.signal(3, Frontier({B: 3}))
    assert await wait_any([(low, 1), (high, 3), (high, 2)]) == (1, Frontier({B: 3}))


async def test_wait_any_breaks_ties_by_index() -> None:
    """Pairs satisfied by the same signal resolve to the lowest index."""
    sem = TimelineSemaphore(name="s")
    task = asyncio.ensure_future(wait_any([(sem, 5), (sem, 3)]))
    await asyncio.sleep(0)
    sem.signal(5, Frontier({A: 5}))
    assert await task == (0, Frontier({A: 5}))
    assert sem.statistics().waiters == 0


async def test_wait_any_rejects_empty_input() -> None:
    """wait_any needs at least one pair."""
    with pytest.raises(ValueError, match="at least one"):
        await wait_any([])


async def test_wait_any_raises_when_the_first_to_finish_failed() -> None:
    """wait_any raises SemaphoreFailedError when a failed semaphore finishes first."""
    ok, bad = TimelineSemaphore(name="ok"), TimelineSemaphore(name="bad")
    boom = OSError("link down")
    bad.fail(boom)
    with pytest.raises(SemaphoreFailedError) as info:
        await wait_any([(ok, 1), (bad, 1)])
    assert info.value.__cause__ is boom
    assert ok.statistics().waiters == 0


async def test_wait_any_cleans_up_when_cancelled() -> None:
    """Cancelling wait_any leaves no helper waits behind on any semaphore."""
    sems = [TimelineSemaphore(name=f"s{i}") for i in range(3)]
    task = asyncio.ensure_future(wait_any([(sem, 1) for sem in sems]))
    for _ in range(3):
        await asyncio.sleep(0)
    assert [sem.statistics().waiters for sem in sems] == [1, 1, 1]
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert [sem.statistics().waiters for sem in sems] == [0, 0, 0]


# -- visible state -----------------------------------------------------------------------


async def test_statistics_is_a_frozen_snapshot() -> None:
    """statistics() returns a frozen dataclass of name, value, waiters, frontier size, failure."""
    sem = TimelineSemaphore(1, name="weights")
    sem.signal(2, Frontier({A: 1, B: 1}))
    task = await parked(sem, 5)
    stats = sem.statistics()
    assert dataclasses.is_dataclass(stats)
    assert stats == af.SemaphoreStatistics(
        name="weights", value=2, waiters=1, frontier_entries=2, failed=False
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.value = 3  # type: ignore[misc]
    sem.fail(RuntimeError("boom"))
    assert stats.failed is False
    assert sem.statistics().failed is True
    assert sem.statistics().waiters == 0
    with pytest.raises(SemaphoreFailedError):
        await task


async def test_repr_shows_name_value_waiters_and_frontier() -> None:
    """The repr names the semaphore, its value or failure, its waiters and its frontier."""
    named = af.axis(node=251, incarnation=251)
    af.set_axis_name(named, "gpu0")
    sem = TimelineSemaphore(name="kv")
    sem.signal(3, Frontier({named: 2}))
    task = await parked(sem, 4)
    assert repr(sem) == "<TimelineSemaphore 'kv' value=3 waiters=1 frontier=Frontier({gpu0: 2})>"
    sem.fail(RuntimeError("boom"))
    assert repr(sem) == "<TimelineSemaphore 'kv' failed waiters=0 frontier=Frontier({gpu0: 2})>"
    with pytest.raises(SemaphoreFailedError):
        await task


def test_default_names_are_distinct() -> None:
    """Unnamed semaphores get distinct generated names."""
    assert TimelineSemaphore().name != TimelineSemaphore().name
