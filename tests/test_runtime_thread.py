"""RuntimeThread and session_sync: synchronous callers always get an answer."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

import asyncfront as af
from asyncfront.testing import FakeDevice

MiB = af.MiB


def _thread(**options: Any) -> af.RuntimeThread:
    return af.start_runtime_thread([FakeDevice("gpu", memory=64 * MiB)], **options)


def test_call_times_out_and_cancels_the_coroutine() -> None:
    """call(timeout=) raises TimeoutError naming the call, and the coroutine is cancelled."""
    cancelled = threading.Event()

    async def wait_forever() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    with _thread() as thread:
        with pytest.raises(
            TimeoutError, match=r"call to '.*wait_forever' did not finish within 0\.2 s"
        ):
            thread.call(wait_forever, timeout=0.2)
        assert cancelled.wait(5)
        assert thread.call(asyncio.sleep, 0, "still serving", timeout=5) == "still serving"


def test_call_soon_times_out_while_the_loop_is_busy() -> None:
    """call_soon(timeout=) gives up on a loop that does not answer in time."""
    with _thread() as thread:
        with pytest.raises(TimeoutError, match=r"call to 'sleep' did not finish within 0\.1 s"):
            thread.call_soon(time.sleep, 0.5, timeout=0.1)
        assert thread.call_soon(sum, [1, 2], timeout=5) == 3


@pytest.mark.parametrize("timeout", [-1, "1", True])
def test_a_bad_timeout_is_refused_before_anything_runs(timeout: Any) -> None:
    """A timeout that is not seconds >= 0 raises ValueError naming it; the call never runs."""
    ran: list[int] = []
    with _thread() as thread:
        with pytest.raises(
            ValueError, match=rf"timeout must be None or seconds >= 0, got {timeout!r}"
        ):
            thread.call_soon(ran.append, 1, timeout=timeout)
        thread.call_soon(lambda: None)  # the loop took every earlier call by now
        assert ran == []


class _BrokenEpochs(dict[int, int]):
    """A record of completed epochs that refuses every write: a defect of the queue itself."""

    def __setitem__(self, axis: int, epoch: int) -> None:
        raise RuntimeError("trace store is broken")


def _crash_the_queue_task(thread: af.RuntimeThread) -> None:
    """Make the next finished submission crash its queue task (its completion record raises)."""
    state = thread.runtime._state
    thread.call_soon(setattr, state, "completed_epochs", _BrokenEpochs(state.completed_epochs))


def test_a_crash_reaches_every_blocked_caller() -> None:
    """Callers blocked in call() and session_sync raise RuntimeCrashedError naming the crash."""
    thread = _thread()
    rt = thread.runtime
    ctx = thread.call_soon(rt.create_context, "llm", device="gpu", max_memory=MiB)
    never = thread.call_soon(rt.semaphore, name="never")
    errors: list[BaseException] = []
    waiting: list[int] = []

    async def wait_forever() -> None:
        waiting.append(1)
        await asyncio.Event().wait()

    def blocked_call() -> None:
        try:
            thread.call(wait_forever)
        except BaseException as exc:
            errors.append(exc)

    def blocked_session() -> None:
        try:
            with rt.session_sync(ctx) as s:
                s.run(None, waits=[(never, 1)])
        except BaseException as exc:
            errors.append(exc)

    callers = [threading.Thread(target=blocked_call) for _ in range(3)]
    callers.append(threading.Thread(target=blocked_session))
    for caller in callers:
        caller.start()
    deadline = time.monotonic() + 10
    while len(waiting) < 3 or thread.call_soon(lambda: never.statistics().waiters) < 1:
        assert time.monotonic() < deadline, "the callers did not block"
        time.sleep(0.01)  # until all four are blocked on the runtime
    _crash_the_queue_task(thread)
    thread.call_soon(lambda: rt.queue("gpu").submit())
    for caller in callers:
        caller.join(10)
    assert not any(c.is_alive() for c in callers)
    assert len(errors) == 4
    for error in errors:
        assert isinstance(error, af.RuntimeCrashedError)
        assert "crashed" in str(error) and "an asyncfront queue task crashed" in str(error)
        assert isinstance(error.__cause__, RuntimeError)
        assert isinstance(error.__cause__.__cause__, RuntimeError)
        assert str(error.__cause__.__cause__) == "trace store is broken"
    with pytest.raises(af.RuntimeCrashedError, match="the runtime's thread crashed"):
        thread.call_soon(print)
    with pytest.raises(RuntimeError, match="the runtime thread failed"):
        thread.close()
    thread.close()  # reported once


def test_session_sync_calls_time_out() -> None:
    """session_sync(timeout=) bounds each blocking call; a call's own timeout overrides it."""
    with _thread(stall_timeout=0.05) as thread:
        rt = thread.runtime
        ctx = thread.call_soon(rt.create_context, "llm", device="gpu", max_memory=MiB)
        never = thread.call_soon(rt.semaphore, name="never")
        with rt.session_sync(ctx, timeout=0.2) as s:
            with pytest.raises(
                TimeoutError,
                match=r"run of a barrier on context 'llm' did not finish within 0\.2 s",
            ):
                s.run(None, waits=[(never, 1)])
            with pytest.raises(TimeoutError, match=r"within 0\.05 s"):
                s.run(None, waits=[(never, 1)], timeout=0.05)
        # The timed-out barriers stay queued on 'llm'; another context still answers.
        other = thread.call_soon(rt.create_context, "other", device="gpu", max_memory=MiB)
        with rt.session_sync(other, timeout=5) as s:
            assert s.run(sum, [1, 2, 3]) == 6
        with pytest.raises(ValueError, match=r"session_sync on context 'llm': timeout must be"):
            rt.session_sync(ctx, timeout=-1)


def test_runtime_thread_keeps_its_plain_api() -> None:
    """start/call/call_soon/close work as before, the loop runs asyncio, reentry is refused."""
    thread = af.RuntimeThread([FakeDevice("gpu")])
    assert "stopped" in repr(thread)
    with thread:
        assert "running" in repr(thread)
        loop = thread.call_soon(asyncio.get_running_loop)
        assert isinstance(loop, asyncio.AbstractEventLoop)
        assert thread.call(asyncio.sleep, 0, 42) == 42

        def reenter() -> None:
            thread.call_soon(print)

        with pytest.raises(RuntimeError, match="would deadlock"):
            thread.call_soon(reenter)
        with pytest.raises(RuntimeError, match="already started"):
            thread.start()
    with pytest.raises(RuntimeError, match="not running"):
        thread.call_soon(print)


def test_a_runtime_that_cannot_open_reports_why() -> None:
    """start() raises RuntimeError from the error that kept the runtime from opening."""
    gpu = FakeDevice("gpu")
    with pytest.raises(RuntimeError, match="the runtime failed to open") as info:
        af.start_runtime_thread([gpu, FakeDevice("gpu")])
    assert "two devices are named 'gpu'" in str(info.value.__cause__)
