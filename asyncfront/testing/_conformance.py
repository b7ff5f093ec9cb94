"""The device conformance suite: what every device, real or fake, must do.

Each check opens a runtime on fresh devices from a factory, drives queues and asserts
orderings, results, failures and memory accounting, never durations. A device that runs
work on the event loop in virtual time (:class:`~asyncfront.testing.FakeDevice`) is
checked with ``virtual=True``; a device that runs plain functions on its own threads in
real time (:class:`~asyncfront.devices.CpuDevice`, ``TorchDevice``) with
``virtual=False``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import threading
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol

import structlog

from .._budget import MemoryBudgetError, QoS
from .._frontier import Frontier
from .._queue import Submission, SubmissionState
from .._runtime import Runtime, open_runtime
from .._semaphore import SemaphoreFailedError
from ..devices._base import Device
from ._virtual import run_virtual

__all__ = ("CONFORMANCE_CHECKS", "DeviceFactory", "check_device_conformance")

_MEMORY = 1 << 20  # bytes of memory the memory check asks a device for
# The failure check fails work on purpose: only errors are worth printing.
_QUIET = structlog.wrap_logger(
    structlog.PrintLogger(sys.stderr),
    wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR),
)


class DeviceFactory(Protocol):
    """Makes a fresh, unstarted device with ``concurrency`` slots and ``memory`` bytes.

    ``memory`` None means untracked; a device that cannot track memory may ignore it
    (the memory check is then skipped).
    """

    def __call__(self, *, concurrency: int, memory: int | None) -> Device:
        """A new device."""
        ...


class _Gate:
    """Work that holds its slot until opened: on the loop (virtual) or in a thread."""

    def __init__(self, virtual: bool, timeout: float) -> None:
        self._timeout = timeout
        self._virtual = virtual
        self._async = asyncio.Event()
        self._thread = threading.Event()

    def work(self, label: str, seen: list[str]) -> Callable[[], Any]:
        """A function that waits for the gate, then records ``label`` in ``seen``."""
        if self._virtual:

            async def hold() -> None:
                await self._async.wait()
                seen.append(label)

            return hold

        def block() -> None:
            if not self._thread.wait(self._timeout):
                raise AssertionError(f"the gate of {label!r} never opened")
            seen.append(label)

        return block

    def open(self) -> None:
        self._async.set()
        self._thread.set()


class _Check:
    """One scenario's tools: the factory, the clock-independent waits, the gates."""

    def __init__(self, make_device: DeviceFactory, virtual: bool, timeout: float) -> None:
        self.make_device = make_device
        self.virtual = virtual
        self.timeout = timeout

    def device(self, concurrency: int = 1, memory: int | None = None) -> Device:
        dev = self.make_device(concurrency=concurrency, memory=memory)
        if dev.concurrency != concurrency:
            raise AssertionError(
                f"the factory made {dev!r} with {dev.concurrency} slots, asked for {concurrency}"
            )
        return dev

    def runtime(self, device: Device) -> contextlib.AbstractAsyncContextManager[Runtime]:
        return open_runtime([device], logger=_QUIET)

    def gate(self) -> _Gate:
        return _Gate(self.virtual, self.timeout)

    async def until(self, what: str, condition: Callable[[], bool]) -> None:
        """Let the loop run until ``condition()`` holds (an ordering, not a duration)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        while not condition():
            if loop.time() > deadline:
                raise AssertionError(f"timed out waiting until {what}")
            await asyncio.sleep(0.001)  # free under virtual time


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


def _record(seen: list[str], label: str) -> str:
    seen.append(label)
    return label


def _combine(x: int, y: int, *, scale: int = 1) -> int:
    return (x + y) * scale


def _raise(error: BaseException) -> None:
    raise error


async def _await_all(subs: Iterable[Submission]) -> None:
    for sub in subs:
        await sub


# -- the checks --------------------------------------------------------------------


async def _fifo(c: _Check) -> None:
    """Each queue runs its submissions in order, even on a device with several slots."""
    async with c.runtime(c.device(concurrency=4)) as rt:
        dev = next(iter(rt.devices.values()))
        a, b = rt.queue(dev, name="a"), rt.queue(dev, name="b")
        seen_a: list[str] = []
        seen_b: list[str] = []
        subs = []
        for i in range(12):
            subs.append(a.submit(_record, seen_a, f"a{i}"))
            subs.append(b.submit(_record, seen_b, f"b{i}"))
        await _await_all(subs)
        _expect(seen_a == [f"a{i}" for i in range(12)], f"queue 'a' ran out of order: {seen_a}")
        _expect(seen_b == [f"b{i}" for i in range(12)], f"queue 'b' ran out of order: {seen_b}")
        epochs = [s.epoch for s in subs if s.queue is a]
        _expect(epochs == list(range(1, 13)), f"queue 'a' epochs are {epochs}, not 1..12")
        for earlier, later in zip(subs[::2], subs[2::2], strict=False):
            _expect(
                earlier.finished_at is not None
                and later.started_at is not None
                and earlier.finished_at <= later.started_at,
                f"{later!r} started before {earlier!r} finished",
            )


async def _results(c: _Check) -> None:
    """Awaiting a submission gives its work's result; frontiers follow the waits."""
    async with c.runtime(c.device(concurrency=2)) as rt:
        dev = next(iter(rt.devices.values()))
        producer, consumer = rt.queue(dev, name="producer"), rt.queue(dev, name="consumer")
        ready = rt.semaphore(name="ready")
        # last stage first: submit() must not wait for dependencies
        second = consumer.submit(_combine, 2, 3, scale=10, waits=[(ready, 1)])
        first = producer.submit(_combine, 20, 1, signals=[(ready, 1)])
        barrier = consumer.submit()
        _expect(await first == 21, f"the producer returned {first.result()!r}, not 21")
        _expect(await second == 50, f"the consumer returned {second.result()!r}, not 50")
        _expect(await barrier is None, "a barrier's result is not None")
        expected = Frontier({producer.axis: 1, consumer.axis: 1})
        _expect(
            second.frontier == expected,
            f"the consumer's frontier is {second.frontier!r}, expected {expected!r}",
        )
        _expect(ready.value == 1, f"the producer left 'ready' at {ready.value}, not 1")
        _expect(
            rt.completed.dominates(expected),
            f"rt.completed {rt.completed!r} does not cover {expected!r}",
        )


async def _failure(c: _Check) -> None:
    """A raising work fails its submission and downstream semaphores; queues go on."""
    async with c.runtime(c.device(concurrency=2)) as rt:
        dev = next(iter(rt.devices.values()))
        a, b = rt.queue(dev, name="a"), rt.queue(dev, name="b")
        s1, s2 = rt.semaphore(name="s1"), rt.semaphore(name="s2")
        boom = ValueError("conformance: injected failure")
        first = a.submit(_raise, boom, signals=[(s1, 1)])
        second = b.submit(_combine, 1, 1, waits=[(s1, 1)], signals=[(s2, 1)])
        try:
            await first
        except ValueError as exc:
            _expect(exc is boom, f"the failed work raised {exc!r}, not the original error")
        else:
            raise AssertionError("a raising work's submission completed")
        try:
            await second
        except SemaphoreFailedError as exc:
            _expect(exc.__cause__ is boom, f"the downstream error's cause is {exc.__cause__!r}")
        else:
            raise AssertionError("work waiting on a failed semaphore completed")
        _expect(s1.failure is boom, f"the signalled semaphore failed with {s1.failure!r}")
        _expect(s2.failure is boom, f"the downstream semaphore failed with {s2.failure!r}")
        _expect(
            first.state is SubmissionState.FAILED and second.state is SubmissionState.FAILED,
            f"states after failure: {first.state}, {second.state}",
        )
        _expect(await a.submit(_combine, 1, 2) == 3, "the failed queue did not serve new work")
        _expect(await b.submit(_combine, 2, 2) == 4, "the downstream queue did not go on")


async def _concurrency(c: _Check) -> None:
    """A device with two slots runs two queues' work at once."""
    async with c.runtime(c.device(concurrency=2)) as rt:
        dev = next(iter(rt.devices.values()))
        gate = c.gate()
        seen: list[str] = []
        subs = [rt.queue(dev).submit(gate.work(f"w{i}", seen)) for i in range(2)]
        await c.until(
            "both slots are busy",
            lambda: all(s.state is SubmissionState.RUNNING for s in subs),
        )
        _expect(dev.statistics().busy_slots == 2, f"{dev!r} reports {dev.statistics()}")
        gate.open()
        await _await_all(subs)
        _expect(sorted(seen) == ["w0", "w1"], f"the works recorded {seen}")
        _expect(dev.statistics().busy_slots == 0, f"slots still busy: {dev.statistics()}")


async def _priority(c: _Check) -> None:
    """With one slot, all ready higher-priority work runs before lower-priority work."""
    async with c.runtime(c.device(concurrency=1)) as rt:
        dev = next(iter(rt.devices.values()))
        low = rt.queue(dev, priority=0, name="low")
        high = rt.queue(dev, priority=10, name="high")
        gate = c.gate()
        seen: list[str] = []
        blocker = high.submit(gate.work("blocker", seen))
        await c.until(
            "the blocker holds the slot", lambda: blocker.state is SubmissionState.RUNNING
        )
        subs = [low.submit(_record, seen, f"low{i}") for i in range(3)]
        subs += [high.submit(_record, seen, f"high{i}") for i in range(3)]
        # The high queue is still inside the blocker; only the low one waits for the
        # slot. The slot is granted on the loop turn after the blocker ends, when the
        # high queue presents its next submission too.
        await c.until(
            "the low queue waits for the slot",
            lambda: subs[0].state is SubmissionState.READY and dev.statistics().waiting_queues == 1,
        )
        gate.open()
        await _await_all([blocker, *subs])
        expected = ["blocker", "high0", "high1", "high2", "low0", "low1", "low2"]
        _expect(seen == expected, f"ran {seen}, expected {expected}")


async def _gap_filling(c: _Check) -> None:
    """Low-priority work uses the slot while high-priority work waits on a semaphore."""
    async with c.runtime(c.device(concurrency=1)) as rt:
        dev = next(iter(rt.devices.values()))
        high = rt.queue(dev, priority=10, name="high")
        low = rt.queue(dev, priority=0, name="low")
        ready = rt.semaphore(name="ready")
        gate = c.gate()
        seen: list[str] = []
        gated = high.submit(_record, seen, "gated", waits=[(ready, 1)])
        fill = [low.submit(gate.work("fill0", seen))]
        fill += [low.submit(_record, seen, f"fill{i}") for i in (1, 2)]
        await c.until("fill0 runs", lambda: fill[0].state is SubmissionState.RUNNING)
        _expect(
            gated.state is SubmissionState.WAITING,
            f"the blocked high-priority work is {gated.state.value}, not waiting",
        )
        ready.signal(1)
        await c.until(
            "the high-priority work waits for the slot",
            lambda: gated.state is SubmissionState.READY,
        )
        gate.open()
        await _await_all([gated, *fill])
        expected = ["fill0", "gated", "fill1", "fill2"]
        _expect(seen == expected, f"ran {seen}, expected {expected}")


async def _memory(c: _Check) -> None:
    """Contexts allocate and free through budgets; usage returns to zero."""
    dev = c.device(concurrency=1, memory=_MEMORY)
    capacity = dev.memory_capacity
    if capacity is None:
        return  # the device does not track memory: nothing to check
    async with c.runtime(dev) as rt:
        _expect(dev.memory is not None, f"{dev!r} has memory_capacity but no pool")
        llm = rt.create_context("llm", device=dev, max_memory=capacity // 2)
        bg = rt.create_context("bg", device=dev, max_memory=capacity // 4, qos=QoS.BEST_EFFORT)
        _expect(
            llm.queue.priority > bg.queue.priority,
            f"tier priorities: guaranteed {llm.queue.priority}, best effort {bg.queue.priority}",
        )
        quarter = capacity // 4
        async with rt.session(llm) as s, rt.session(bg) as t:
            buf = await s.allocate(quarter)
            _expect(rt.usage(llm).used == quarter, f"usage after allocate: {rt.usage(llm)}")
            _expect(buf.block is not None, "a device with a pool handed out no block")
            _expect(await s.run(_combine, 1, 2) == 3, "work on a context queue failed")
            try:
                await s.allocate(quarter + 1)
            except MemoryBudgetError:
                pass
            else:
                raise AssertionError("an allocation over max_memory succeeded")
            s.free(buf)
            _expect(rt.usage(llm).used == 0, f"usage after free: {rt.usage(llm)}")
            await s.allocate(quarter)
            await t.allocate(quarter // 2)
            _expect(rt.usage(bg).used == quarter // 2, f"best-effort usage: {rt.usage(bg)}")
        for ctx in (llm, bg):
            _expect(rt.usage(ctx).used == 0, f"{ctx.name!r} holds memory after its session")
        pool = dev.memory
        _expect(
            pool.statistics().bytes_in_use == 0,
            f"the pool still has bytes in use: {pool.statistics()}",
        )


_CHECKS: dict[str, Callable[[_Check], Awaitable[None]]] = {
    "fifo": _fifo,
    "results": _results,
    "failure": _failure,
    "concurrency": _concurrency,
    "priority": _priority,
    "gap_filling": _gap_filling,
    "memory": _memory,
}

CONFORMANCE_CHECKS: tuple[str, ...] = tuple(_CHECKS)
"""The names of the checks :func:`check_device_conformance` runs, in order."""


def check_device_conformance(
    make_device: DeviceFactory,
    *,
    virtual: bool,
    checks: Iterable[str] | None = None,
    timeout: float = 30.0,
) -> None:
    """Run the conformance checks on fresh devices; raise on the first violation.

    Each check runs on its own new event loop (a virtual-time one when ``virtual``),
    so call it from synchronous code. It asserts orderings, never durations.

    Args:
        make_device: ``make_device(concurrency=..., memory=...)`` returns a new device.
        virtual: the device runs work on the loop in virtual time (a fake); otherwise it
            runs plain functions on its own threads in real time.
        checks: names from :data:`CONFORMANCE_CHECKS` (default: all).
        timeout: seconds (virtual or real) any one wait of a check may take.

    Raises:
        AssertionError: the first violation, naming the check and the device.
        ValueError: an unknown check name.
    """
    names = CONFORMANCE_CHECKS if checks is None else tuple(checks)
    unknown = sorted(set(names) - set(_CHECKS))
    if unknown:
        raise ValueError(f"unknown conformance checks {unknown}; known: {list(CONFORMANCE_CHECKS)}")
    for name in names:
        check = _Check(make_device, virtual, timeout)

        async def scenario(check: _Check = check, name: str = name) -> None:
            await _CHECKS[name](check)

        try:
            if virtual:
                run_virtual(scenario)
            else:
                asyncio.run(scenario())
        except AssertionError as exc:
            raise AssertionError(f"device conformance check {name!r} failed: {exc}") from exc
