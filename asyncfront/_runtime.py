"""The runtime: owns devices, queue tasks, the epoch tracker and the trace."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import os
import sys
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar, overload

import structlog

from ._budget import ContextUsage, QoS
from ._collective import CollectiveChannel, _distributed
from ._context import (
    ExecutionContext,
    MemoryManager,
    MemoryPressureHandler,
    Session,
    SyncSession,
)
from ._frontier import (
    DEFAULT_FRONTIER_CAPACITY,
    Domain,
    Frontier,
    axis,
    axis_name,
    set_axis_name,
)
from ._graph import Graph
from ._placement import (
    ModelInfo,
    ModelRegistry,
    PlacementDecision,
    PlacementResidency,
    StageNeeds,
    device_backlog,
    place,
    runtime_candidates,
)
from ._queue import DeviceQueue, StalledError
from ._semaphore import TimelineSemaphore
from ._trace import DEFAULT_TRACE_CAPACITY, TraceRecorder
from .devices._base import Device
from .memory import BufferPool
from .memory._residency import Residency, ResidentWeights, Weights

if TYPE_CHECKING:
    from ._queue import Submission
    from .models._model import Model, ResidentModel

__all__ = (
    "Runtime",
    "RuntimeStatistics",
    "RuntimeThread",
    "open_runtime",
    "start_runtime_thread",
)

T = TypeVar("T")

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
        self._log_info = _enabled(self._log, logging.INFO)
        self._log_warning = _enabled(self._log, logging.WARNING)
        self._memory = MemoryManager(self)
        self._residency: Residency | None = None  # created on first use
        # Called with each new submission once models are registered (pins what it uses).
        self._submit_hook: Callable[[Submission], None] | None = None
        self._owned_pools: list[Device] = []
        self._queues: list[DeviceQueue] = []
        self._queue_slots: dict[str, int] = {}
        self._completed_epochs: dict[int, int] = {}
        self._completed_cache: Frontier | None = None  # reset by queues on completion
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
        self._default_queues: dict[tuple[str, int], DeviceQueue] = {}
        self._channels: list[CollectiveChannel] = []
        # Placement asks rt.placement_residency about weights; anything with is_resident and
        # load_time may replace the default, a plain registry of models and where they live.
        self.models = ModelRegistry(self.devices)
        self.placement_residency: PlacementResidency = self.models

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

    # -- pipelines, placement, collectives ----------------------------------------

    def default_queue(self, device: str | Device, priority: int = 0) -> DeviceQueue:
        """The runtime's shared queue for ``device`` at ``priority``, created on first use.

        Graph stages pinned to a device, or placed on one, run here, so repeated runs
        add no axes.
        """
        dev = self.device(device) if isinstance(device, str) else device
        key = (dev.name, priority)
        q = self._default_queues.get(key)
        if q is None or q._closed:
            q = self.queue(dev, priority=priority, name=f"{dev.name}.p{priority}")
            self._default_queues[key] = q
        return q

    def graph(self, name: str = "graph", *, qos: QoS | None = None) -> Graph:
        """A new, empty pipeline; ``qos`` sets its stages' default queue priority."""
        return Graph(self, name, qos=qos)

    def collective(
        self,
        queues: Iterable[DeviceQueue],
        *,
        name: str | None = None,
        process_group: Any = None,
        backend: str | None = None,
    ) -> CollectiveChannel:
        """A collective channel over ``queues``: one axis (domain COLLECTIVE) for the group.

        With ``process_group`` (a ``torch.distributed`` group) or ``backend`` (the
        default group, which must be initialized with that backend), ``all_reduce``
        also reduces across the processes of the group.
        """
        loop = self._require_loop()
        index = len(self._channels)
        channel_axis = axis(node=self.node, domain=Domain.COLLECTIVE, ordinal=index)
        cname = name if name is not None else f"collective{index}"
        if backend is not None or process_group is not None:
            dist = _distributed()
            if process_group is None:
                if not dist.is_initialized():
                    raise RuntimeError(
                        f"collective {cname!r}: backend={backend!r} uses the default process "
                        "group; call torch.distributed.init_process_group first"
                    )
                process_group = dist.group.WORLD
            if backend is not None and dist.get_backend(process_group) != backend:
                raise ValueError(
                    f"collective {cname!r}: the process group's backend is "
                    f"{dist.get_backend(process_group)!r}, not {backend!r}"
                )
        channel = CollectiveChannel(self, list(queues), cname, channel_axis, process_group)
        set_axis_name(channel_axis, cname)
        self._known_axes.add(channel_axis)
        self._channels.append(channel)
        task = loop.create_task(channel._run(), name=f"asyncfront:{cname}")
        channel._task = task
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return channel

    def register_model(
        self,
        name: str,
        size: int,
        *,
        resident_on: Iterable[str] = (),
        load_time: float | dict[str, float] | None = None,
    ) -> ModelInfo:
        """Record a model of ``size`` bytes and the devices its weights are resident on.

        ``load_time`` (seconds, for every device or per device) overrides the estimate
        ``size / load bandwidth``.
        """
        return self.models.register(name, size, resident_on=resident_on, load_time=load_time)

    def mark_resident(self, model: str, device: str | Device, resident: bool = True) -> None:
        """Record that ``model``'s weights are now (False: no longer) resident on ``device``."""
        name = device if isinstance(device, str) else device.name
        self.models.mark_resident(model, name, resident)

    def is_resident(self, model: str, device: str | Device) -> bool:
        """Whether ``model``'s weights are resident on ``device`` (per ``placement_residency``)."""
        return self.placement_residency.is_resident(
            model, device if isinstance(device, str) else device.name
        )

    def load_time(self, model: str, device: str | Device) -> float:
        """Seconds to make ``model`` resident on ``device`` (``inf``: it cannot hold it)."""
        return self.placement_residency.load_time(
            model, device if isinstance(device, str) else device.name
        )

    def backlog(self, device: str | Device) -> float:
        """Seconds of queued work on ``device``: unfinished submissions' cost / speed."""
        dev = self.device(device) if isinstance(device, str) else device
        return device_backlog(dev, self._queues, self._require_loop().time())

    def place(
        self,
        model: str | None = None,
        *,
        cost: float | None = None,
        deadline: float | None = None,
        devices: Iterable[str] | None = None,
    ) -> PlacementDecision:
        """Where work needing ``model`` would run now (see :func:`asyncfront.place`)."""
        loop = self._require_loop()
        needs = StageNeeds(model=model, cost=cost, deadline=deadline)
        candidates = runtime_candidates(
            self.devices, self.placement_residency, self._queues, needs, loop.time(), devices
        )
        return place(needs, candidates)

    # -- contexts and memory -------------------------------------------------------

    def create_context(
        self,
        name: str,
        device: str | Device | None = None,
        max_memory: int = 0,
        base_memory: int | None = None,
        qos: QoS = QoS.GUARANTEED,
    ) -> ExecutionContext:
        """Admit a context: a queue on ``device`` at the tier's priority and a memory budget.

        Guaranteed reserves ``max_memory`` now; Burstable reserves ``base_memory`` and
        may grow to ``max_memory`` from spare memory; BestEffort reserves nothing.
        ``device`` may be omitted when the runtime has a single device.

        Raises:
            AdmissionError: the reservation does not fit what the device has left.
        """
        if not self._open:
            raise RuntimeError("the runtime is not open (use 'async with open_runtime(...)')")
        if device is None:
            if len(self.devices) != 1:
                raise ValueError(
                    f"context {name!r}: name a device, this runtime has {sorted(self.devices)}"
                )
            dev = next(iter(self.devices.values()))
        else:
            dev = self.device(device) if isinstance(device, str) else device
        return self._memory.create_context(name, dev, max_memory, base_memory, qos)

    def context(self, name: str) -> ExecutionContext:
        """The context called ``name``."""
        return self._memory.context(name)

    @property
    def contexts(self) -> tuple[ExecutionContext, ...]:
        """Every open context."""
        return self._memory.contexts

    def close_context(self, ctx: ExecutionContext) -> None:
        """Free the context's buffers and give its reservation back to the device."""
        self._memory.close_context(ctx)

    def session(self, ctx: ExecutionContext) -> Session:
        """``async with rt.session(ctx) as s``: run work and allocate on ``ctx``."""
        return Session(self, ctx)

    def session_sync(self, ctx: ExecutionContext) -> SyncSession:
        """``with rt.session_sync(ctx) as s``: the same, for code on another thread."""
        return SyncSession(self, ctx)

    def usage(self, ctx: ExecutionContext) -> ContextUsage:
        """``(used, reserved, limit)`` bytes of ``ctx``."""
        return self._memory.usage(ctx)

    def available_memory(self, device: str | Device) -> int:
        """Bytes of ``device`` that no context has reserved or is using."""
        dev = self.device(device) if isinstance(device, str) else device
        return self._memory.available(dev)

    def on_memory_pressure(self, handler: MemoryPressureHandler) -> MemoryPressureHandler:
        """Register ``handler(ctx, requested, available)``, asked when memory runs short.

        It may free memory (drop weights, page out caches) and returns truthy to have
        the allocation retried. An exception it raises refuses the allocation: the
        allocation raises it and nothing is charged. Usable as a decorator.
        """
        return self._memory.on_memory_pressure(handler)

    # -- weights ---------------------------------------------------------------------

    @property
    def residency(self) -> Residency:
        """The residency of immutable weights (loads, pins, drops by cost)."""
        if self._residency is None:
            self._residency = Residency(self)
        return self._residency

    def weights(
        self,
        name: str,
        source: str | os.PathLike[str] | Mapping[str, Any],
        *,
        size: int | None = None,
        priority: int | None = None,
        request_rate: float | None = None,
        storage: str | Device | None = None,
    ) -> Weights:
        """Register immutable weights: a safetensors file or a dict of host tensors.

        See :meth:`asyncfront.memory.Residency.register`.
        """
        return self.residency.register(
            name,
            source,
            size=size,
            priority=priority,
            request_rate=request_rate,
            storage=storage,
        )

    async def ensure_resident(
        self,
        weights: Weights | str,
        device: str | Device,
        *,
        context: ExecutionContext | None = None,
    ) -> ResidentWeights:
        """Load the weights on ``device`` unless they are there (one shared load).

        Charged to ``context``, by default the context named like the weights.
        """
        return await self.residency.ensure_resident(weights, device, context=context)

    def model(
        self,
        name: str,
        build: Callable[[], Any],
        weights: str | os.PathLike[str] | Mapping[str, Any],
        *,
        device: str | Device,
        context: ExecutionContext | None = None,
        priority: int | None = None,
        train: bool = False,
    ) -> Model:
        """Register a PyTorch model whose weights live in ``device``'s memory.

        ``build()`` constructs the ``torch.nn.Module`` with its parameters on ``meta``
        (it allocates nothing); ``weights`` is a safetensors file or directory, or a
        state dict. The module is in eval mode with ``requires_grad=False`` unless
        ``train=True``. ``context`` holds the weights in its budget (default: the
        context named like the model). See :mod:`asyncfront.models`.
        """
        return self.residency.register_model(
            name,
            build,
            weights,
            device=device,
            context=context,
            priority=priority,
            train=train,
        )

    @overload
    def using(
        self,
        weights: Model,
        device: str | Device,
        *,
        context: ExecutionContext | None = None,
    ) -> AbstractAsyncContextManager[ResidentModel]: ...

    @overload
    def using(
        self,
        weights: Weights,
        device: str | Device,
        *,
        context: ExecutionContext | None = None,
    ) -> AbstractAsyncContextManager[ResidentWeights]: ...

    @overload
    def using(
        self,
        weights: str,
        device: str | Device,
        *,
        context: ExecutionContext | None = None,
    ) -> AbstractAsyncContextManager[Any]: ...

    def using(
        self,
        weights: Weights | Model | str,
        device: str | Device,
        *,
        context: ExecutionContext | None = None,
    ) -> AbstractAsyncContextManager[Any]:
        """``async with rt.using(w, device) as r``: load if needed, pinned for the block.

        Weights yield their :class:`~asyncfront.memory.ResidentWeights`, a model (or a
        model's name) its :class:`~asyncfront.models.ResidentModel`; a model resident on
        another device moves.
        """
        return self.residency.using(weights, device, context=context)

    def _require_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None or not self._open:
            raise RuntimeError("the runtime is not open")
        return self._loop

    # -- time and progress ---------------------------------------------------------

    def now(self) -> float:
        """Seconds on the runtime's clock (the loop's, virtual under fake time)."""
        loop = self._loop or asyncio.get_running_loop()
        return loop.time() - self.trace.origin

    @property
    def completed(self) -> Frontier:
        """The frontier of completed epochs on every queue axis (the epoch tracker)."""
        cached = self._completed_cache
        if cached is None:
            cached = self._completed_cache = Frontier(self._completed_epochs)
        return cached

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
            heap = self._completion_waiters.setdefault(ax, [])
            heapq.heappush(heap, (epoch, self._completion_seq, fut))
            try:
                await fut
            except asyncio.CancelledError:
                # Cancelled waits (pools cancel them when a free comes first) would sit in
                # the heap until their epoch completes: compact once they dominate it.
                if len(heap) > 32 and sum(1 for e in heap if e[2].done()) * 2 > len(heap):
                    heap[:] = [e for e in heap if not e[2].done()]
                    heapq.heapify(heap)
                raise

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
        for device in self.devices.values():
            if device.memory is None and device.memory_capacity:
                device.memory = BufferPool(
                    device.memory_capacity,
                    completed=self,
                    frontier_capacity=self.frontier_capacity,
                    name=device.name,
                )
                self._owned_pools.append(device)
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
            busy: list[DeviceQueue | CollectiveChannel] = [q for q in self._queues if q._busy()]
            busy += [c for c in self._channels if c._busy()]
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
        for device in self._owned_pools:
            device.memory = None
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


class RuntimeThread:
    """A runtime on its own event loop in a background thread, for synchronous programs.

    ``with start_runtime_thread(devices) as thread:`` opens the runtime; ``thread.call``
    runs a coroutine function on its loop and ``thread.call_soon`` a plain function,
    each blocking the caller until the result is ready. Leaving drains and closes.
    """

    def __init__(self, devices: Iterable[Device] = (), **options: Any) -> None:
        self._devices = list(devices)
        self._options = options
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runtime: Runtime | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def runtime(self) -> Runtime:
        """The runtime (only touch it on its loop: use :meth:`call` or :meth:`call_soon`)."""
        if self._runtime is None:
            raise RuntimeError("the runtime thread is not running")
        return self._runtime

    def start(self, timeout: float = 30.0) -> RuntimeThread:
        """Start the thread and wait until the runtime is open."""
        if self._thread is not None:
            raise RuntimeError("the runtime thread was already started")
        self._thread = threading.Thread(target=self._main, name="asyncfront-runtime", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError(f"the runtime did not open within {timeout} s")
        if self._error is not None:
            raise RuntimeError("the runtime failed to open") from self._error
        return self

    def _main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported to the thread that closes or starts us
            self._error = exc
        finally:
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with open_runtime(self._devices, **self._options) as rt:
            self._runtime = rt
            self._ready.set()
            await self._stop.wait()
        self._runtime = None

    def call(self, fn: Callable[..., Coroutine[Any, Any, T]], *args: Any, **kwargs: Any) -> T:
        """Run ``await fn(*args, **kwargs)`` on the runtime's loop; block for its result."""
        loop = self._running_loop()
        return asyncio.run_coroutine_threadsafe(fn(*args, **kwargs), loop).result()

    def call_soon(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn(*args, **kwargs)`` on the runtime's loop thread; block for its result."""

        async def run() -> T:
            return fn(*args, **kwargs)

        return self.call(run)

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        loop = self._loop
        if loop is None or self._runtime is None:
            raise RuntimeError("the runtime thread is not running")
        if self._thread is not None and threading.get_ident() == self._thread.ident:
            raise RuntimeError("RuntimeThread.call from the runtime's own loop would deadlock")
        return loop

    def close(self, timeout: float | None = 60.0) -> None:
        """Drain and close the runtime, then join the thread."""
        thread, loop, stop = self._thread, self._loop, self._stop
        if thread is None:
            return
        if loop is not None and stop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop may have just ended
                loop.call_soon_threadsafe(stop.set)
        thread.join(timeout)
        self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError("the runtime thread failed") from error

    def __enter__(self) -> RuntimeThread:
        return self.start() if self._thread is None else self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "running" if self._runtime is not None else "stopped"
        return f"<RuntimeThread {state} devices={[d.name for d in self._devices]}>"


def start_runtime_thread(devices: Iterable[Device] = (), **options: Any) -> RuntimeThread:
    """Open a runtime on a background thread's loop (see :class:`RuntimeThread`)."""
    return RuntimeThread(devices, **options).start()
