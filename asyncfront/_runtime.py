"""The runtime: owns devices, queue tasks, the epoch tracker and the trace."""

from __future__ import annotations

import asyncio
import heapq
import logging
import sys
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import structlog

from ._frontier import (
    DEFAULT_FRONTIER_CAPACITY,
    Domain,
    Frontier,
    axis,
    axis_name,
    set_axis_name,
)
from ._queue import DeviceQueue, StalledError
from ._semaphore import TimelineSemaphore
from ._trace import DEFAULT_TRACE_CAPACITY, TraceRecorder
from .devices._base import Device

__all__ = ("Runtime", "RuntimeStatistics", "open_runtime")

_MAX_DEVICES = 256
_QUEUES_PER_INCARNATION = 256


@dataclass(frozen=True)
class RuntimeStatistics:
    """A snapshot of a runtime: devices, queues and completed epochs."""

    devices: int
    queues: int
    busy_queues: int
    completed_entries: int
    trace_records: int


def _default_logger() -> Any:
    """structlog's configured logger, or a quiet one (warnings to stderr) if unconfigured."""
    if structlog.is_configured():
        return structlog.get_logger("asyncfront").bind()
    return structlog.wrap_logger(
        structlog.PrintLogger(sys.stderr),
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            structlog.dev.ConsoleRenderer(colors=False),
        ],
    ).bind()


def _enabled(log: Any, level: int) -> bool:
    check = getattr(log, "is_enabled_for", None)
    return True if check is None else bool(check(level))


class Runtime:
    """Owns the devices, one task per queue, the completed frontier and the trace.

    Open it with :func:`open_runtime`; every queue, semaphore and submission belongs
    to the loop it runs on.
    """

    def __init__(
        self,
        devices: Iterable[Device] = (),
        *,
        node: int = 0,
        frontier_capacity: int = DEFAULT_FRONTIER_CAPACITY,
        trace: bool = True,
        trace_capacity: int = DEFAULT_TRACE_CAPACITY,
        stall_timeout: float = 1.0,
        logger: Any = None,
    ) -> None:
        self.node = node
        self.frontier_capacity = frontier_capacity
        self.stall_timeout = stall_timeout
        self.devices: dict[str, Device] = {}
        for device in devices:
            if device.name in self.devices:
                raise ValueError(f"two devices are named {device.name!r}")
            if len(self.devices) == _MAX_DEVICES:
                raise ValueError(f"a runtime holds at most {_MAX_DEVICES} devices")
            device.index = len(self.devices)
            self.devices[device.name] = device
        self.trace = TraceRecorder(trace_capacity, enabled=trace)
        self._log = logger if logger is not None else _default_logger()
        self._log_debug = _enabled(self._log, logging.DEBUG)
        self._log_warning = _enabled(self._log, logging.WARNING)
        self._queues: list[DeviceQueue] = []
        self._queue_slots: dict[str, int] = {}
        self._completed_epochs: dict[int, int] = {}
        self._known_axes: set[int] = set()
        # axis -> heap of (epoch, sequence, future) for wait_completed
        self._completion_waiters: dict[int, list[tuple[int, int, asyncio.Future[None]]]] = {}
        self._completion_seq = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._crash: BaseException | None = None
        self._draining = False
        self._settled: asyncio.Future[None] | None = None
        self._open = False

    # -- queues and semaphores -----------------------------------------------------

    def device(self, name: str) -> Device:
        """The device called ``name``.

        Raises:
            KeyError: no such device (the message lists the known ones).
        """
        try:
            return self.devices[name]
        except KeyError:
            raise KeyError(
                f"no device named {name!r}; this runtime has {sorted(self.devices)}"
            ) from None

    def queue(
        self, device: str | Device, priority: int = 0, name: str | None = None
    ) -> DeviceQueue:
        """Create a queue (a new axis) on ``device``; higher ``priority`` is more urgent."""
        if not self._open:
            raise RuntimeError("the runtime is not open (use 'async with open_runtime(...)')")
        dev = self.device(device) if isinstance(device, str) else device
        if self.devices.get(dev.name) is not dev:
            raise ValueError(f"device {dev.name!r} does not belong to this runtime")
        slot = self._queue_slots.get(dev.name, 0)
        self._queue_slots[dev.name] = slot + 1
        incarnation, index = divmod(slot, _QUEUES_PER_INCARNATION)
        if incarnation > 255:
            raise RuntimeError(f"device {dev.name!r} ran out of queue axes")
        queue_axis = axis(
            node=self.node,
            domain=Domain.QUEUE,
            device=dev.index,
            queue=index,
            incarnation=incarnation,
        )
        qname = name if name is not None else f"{dev.name}.q{slot}"
        set_axis_name(queue_axis, qname)
        self._known_axes.add(queue_axis)
        q = DeviceQueue(self, dev, queue_axis, priority, qname, self.frontier_capacity)
        self._queues.append(q)
        task = asyncio.get_running_loop().create_task(q._run(), name=f"asyncfront:{qname}")
        q._task = task
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return q

    def semaphore(self, initial: int = 0, name: str | None = None) -> TimelineSemaphore:
        """A new timeline semaphore bound to the runtime's loop."""
        sem = TimelineSemaphore(initial, name=name)
        if self._loop is not None:
            sem.bind(self._loop)
        return sem

    @property
    def queues(self) -> tuple[DeviceQueue, ...]:
        """Every queue created so far."""
        return tuple(self._queues)

    # -- time and progress ---------------------------------------------------------

    def now(self) -> float:
        """Seconds on the runtime's clock (the loop's, virtual under fake time)."""
        loop = self._loop or asyncio.get_running_loop()
        return loop.time() - self.trace.origin

    @property
    def completed(self) -> Frontier:
        """The frontier of completed epochs on every queue axis (the epoch tracker)."""
        return Frontier(self._completed_epochs)

    def is_complete(self, frontier: Frontier) -> bool:
        """Whether every epoch named by ``frontier`` has completed."""
        done = self._completed_epochs
        return all(done.get(ax, 0) >= epoch for ax, epoch in frontier)

    async def wait_completed(self, frontier: Frontier) -> None:
        """Wait until every epoch named by ``frontier`` has completed on its axis.

        Raises:
            ValueError: an axis of ``frontier`` belongs to no queue of this runtime
                (nothing could ever complete it).
            StalledError: the runtime closed first.
        """
        done = self._completed_epochs
        for ax, epoch in frontier:
            if done.get(ax, 0) >= epoch:
                continue
            if ax not in self._known_axes:
                raise ValueError(
                    f"axis {axis_name(ax)} in {frontier!r} belongs to no queue of this runtime"
                )
            loop = self._loop or asyncio.get_running_loop()
            fut: asyncio.Future[None] = loop.create_future()
            self._completion_seq += 1
            heapq.heappush(
                self._completion_waiters.setdefault(ax, []), (epoch, self._completion_seq, fut)
            )
            await fut

    def _axis_completed(self, ax: int, epoch: int) -> None:
        """Called by a queue after recording a completed epoch: wake completion waiters."""
        heap = self._completion_waiters.get(ax)
        if heap:
            while heap and heap[0][0] <= epoch:
                fut = heapq.heappop(heap)[2]
                if not fut.done():
                    fut.set_result(None)
            if not heap:
                del self._completion_waiters[ax]

    def statistics(self) -> RuntimeStatistics:
        """A frozen snapshot of the runtime's size and progress."""
        return RuntimeStatistics(
            devices=len(self.devices),
            queues=len(self._queues),
            busy_queues=sum(1 for q in self._queues if q._busy()),
            completed_entries=len(self._completed_epochs),
            trace_records=len(self.trace),
        )

    def __repr__(self) -> str:
        state = "open" if self._open else "closed"
        return (
            f"<Runtime {state} devices={list(self.devices)} queues={len(self._queues)} "
            f"completed={self.completed!r}>"
        )

    # -- lifecycle -----------------------------------------------------------------

    async def _start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.trace.origin = self._loop.time()
        started: list[Device] = []
        try:
            for device in self.devices.values():
                await device.start(self)
                started.append(device)
        except BaseException:
            for device in reversed(started):
                await device.aclose()
            raise
        self._open = True

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None and self._crash is None:
            self._crash = task.exception()

    def _queue_settled(self) -> None:
        """A queue went idle or blocked: wake the drain, if one is waiting."""
        settled = self._settled
        if settled is not None and not settled.done():
            settled.set_result(None)

    async def _drain(self) -> None:
        """Wait for every queue to finish; fail work that waits on what nothing will signal."""
        loop = asyncio.get_running_loop()
        self._draining = True
        while True:
            busy = [q for q in self._queues if q._busy()]
            if not busy or self._crash is not None:
                return
            stalled = all(q._blocked is not None for q in busy)
            settled = self._settled = loop.create_future()
            if stalled:
                # Nothing runs and everything waits: give outside signallers (threads,
                # timers) stall_timeout seconds before calling it a stall.
                try:
                    await asyncio.wait_for(asyncio.shield(settled), self.stall_timeout)
                except TimeoutError:
                    if all(q._blocked is not None for q in busy):
                        for q in busy:
                            q._abort_blocked()
            else:
                await settled
            self._settled = None

    async def _close(self) -> None:
        self._open = False
        for q in self._queues:
            q._closed = True
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for q in self._queues:  # a queue task cancelled before it ever ran
            q._fail_pending()
        waiters, self._completion_waiters = self._completion_waiters, {}
        for heap in waiters.values():
            for _, _, fut in heap:
                if not fut.done():
                    fut.set_exception(
                        StalledError("the runtime closed before these epochs completed")
                    )
        for device in reversed(list(self.devices.values())):
            await device.aclose()
        if self._crash is not None:
            raise RuntimeError("an asyncfront queue task crashed") from self._crash


@asynccontextmanager
async def open_runtime(
    devices: Iterable[Device] = (),
    *,
    node: int = 0,
    frontier_capacity: int = DEFAULT_FRONTIER_CAPACITY,
    trace: bool = True,
    trace_capacity: int = DEFAULT_TRACE_CAPACITY,
    stall_timeout: float = 1.0,
    logger: Any = None,
) -> AsyncIterator[Runtime]:
    """Open a runtime on the running loop; leaving drains the queues, then closes.

    On a normal exit every queued submission finishes first; work that waits on a
    semaphore nothing left can signal fails with :class:`StalledError` after
    ``stall_timeout`` seconds instead of hanging. On an exception the queues are
    cancelled and their pending work fails.

    Args:
        devices: the devices the runtime schedules on (names must be unique).
        node: the node field of every axis this runtime creates.
        frontier_capacity: the most entries an operation's frontier keeps.
        trace: record every finished submission.
        trace_capacity: the most trace records kept (oldest dropped).
        stall_timeout: seconds a fully blocked drain waits for outside signals.
        logger: a structlog logger; by default the configured one, or a quiet one.
    """
    rt = Runtime(
        devices,
        node=node,
        frontier_capacity=frontier_capacity,
        trace=trace,
        trace_capacity=trace_capacity,
        stall_timeout=stall_timeout,
        logger=logger,
    )
    await rt._start()
    try:
        yield rt
        await rt._drain()
    finally:
        await rt._close()
