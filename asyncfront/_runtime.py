"""The runtime: owns devices, queue tasks, the epoch tracker and the trace."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import heapq
import itertools
import logging
import math
import os
import sys
import threading
import traceback
import warnings
import weakref
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast, overload

import anyio
import structlog
from anyio.from_thread import BlockingPortal

from ._blocking import RuntimeCrashedError, check_timeout, wait_blocking
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
    _QUEUE_MASK,
    DEFAULT_FRONTIER_CAPACITY,
    Domain,
    Frontier,
    _forget_axis_name,
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
    RuntimeResidency,
    StageNeeds,
    device_backlog,
    place,
    runtime_candidates,
)
from ._policy import Policy, SLOStatistics
from ._queue import DeviceQueue, RuntimeState, StalledError, Trampoline
from ._semaphore import TimelineSemaphore
from ._stall import StallAnalysis, StalledWait
from ._stealing import StageBinder
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

# loop -> (loop time, runtime ids, lines): the stalls seen when an outside error (a
# virtual-time idle timeout) ended waits, for the runner that reports the error
_StallNote = tuple[float, set[int], list[str]]
_stall_notes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _StallNote]
_stall_notes = weakref.WeakKeyDictionary()


def stall_note(loop: asyncio.AbstractEventLoop) -> list[str]:
    """The stalled waits recorded on ``loop`` when an outside error last ended waits."""
    note = _stall_notes.get(loop)
    return list(note[2]) if note is not None else []


def _check_options(
    node: object, frontier_capacity: object, trace_capacity: object, stall_timeout: object
) -> None:
    """Refuse bad runtime options before anything is built, naming the argument."""
    if not isinstance(node, int) or isinstance(node, bool) or not 0 <= node <= 255:
        raise ValueError(f"node must be an int in 0..255, got {node!r}")
    if (
        not isinstance(frontier_capacity, int)
        or isinstance(frontier_capacity, bool)
        or frontier_capacity < 1
    ):
        raise ValueError(f"frontier_capacity must be an int >= 1, got {frontier_capacity!r}")
    if (
        not isinstance(trace_capacity, int)
        or isinstance(trace_capacity, bool)
        or trace_capacity < 0
    ):
        raise ValueError(f"trace_capacity must be an int >= 0, got {trace_capacity!r}")
    if (
        not isinstance(stall_timeout, int | float)
        or isinstance(stall_timeout, bool)
        or not math.isfinite(stall_timeout)
        or stall_timeout <= 0
    ):
        raise ValueError(
            f"stall_timeout must be a finite number of seconds > 0, got {stall_timeout!r}"
        )


_MAX_DEVICES = 256
_LAST_INCARNATION = 255


class _QueueSlots:
    """The queue slots of one device: which are live, which are free for a next incarnation.

    A closed queue's slot is reused with the next incarnation, so its axis value is never
    reused; a slot whose 256 incarnations are spent is retired for good and forgotten. The
    state is bounded by the most queues ever open at once, not by how many have closed, and
    it alone tells whether an axis belongs to a queue that has retired.
    """

    __slots__ = ("free", "fresh", "last", "live")

    def __init__(self) -> None:
        self.fresh = 0  # the lowest slot never used
        self.live: dict[int, int] = {}  # slot -> incarnation of its open queue
        self.last: dict[int, int] = {}  # free slot -> incarnation of its last queue
        self.free: list[int] = []  # heap of the free slots

    def take(self, device: str) -> tuple[int, int]:
        """A slot and incarnation for a new queue: the lowest free slot, else a fresh one."""
        if self.free:
            slot = heapq.heappop(self.free)
            incarnation = self.last.pop(slot) + 1
        else:
            slot = self.fresh
            if slot > _QUEUE_MASK:
                raise RuntimeError(
                    f"device {device!r} ran out of queue axes: {_QUEUE_MASK + 1:,} queues "
                    "are open at once"
                )
            self.fresh = slot + 1
            incarnation = 0
        self.live[slot] = incarnation
        return slot, incarnation

    def release(self, slot: int) -> None:
        """The queue in ``slot`` retired: free the slot for its next incarnation, if any."""
        incarnation = self.live.pop(slot)
        if incarnation < _LAST_INCARNATION:
            self.last[slot] = incarnation
            heapq.heappush(self.free, slot)

    def retired(self, slot: int, incarnation: int) -> bool:
        """Whether the queue ``(slot, incarnation)`` existed here and has retired."""
        if slot >= self.fresh:
            return False
        live = self.live.get(slot)
        if live is not None:
            return incarnation < live
        last = self.last.get(slot)
        if last is not None:
            return incarnation <= last
        return True  # every incarnation of this slot has come and gone


# axis -> heap of (epoch, sequence, future) for wait_completed
_CompletionWaiters = dict[int, list[tuple[int, int, asyncio.Future[None]]]]


class _StateField(Generic[T]):
    """A runtime attribute that reads and writes a field of its :class:`RuntimeState`."""

    def __init__(self, field: str) -> None:
        self._field = field

    @overload
    def __get__(self, runtime: None, owner: type[Runtime]) -> _StateField[T]: ...
    @overload
    def __get__(self, runtime: Runtime, owner: type[Runtime]) -> T: ...
    def __get__(self, runtime: Runtime | None, owner: type[Runtime]) -> T | _StateField[T]:
        if runtime is None:
            return self
        return cast(T, getattr(runtime._state, self._field))

    def __set__(self, runtime: Runtime, value: T) -> None:
        setattr(runtime._state, self._field, value)


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
        policy: Policy | None = None,
    ) -> None:
        _check_options(node, frontier_capacity, trace_capacity, stall_timeout)
        if policy is not None and not isinstance(policy, Policy):
            raise TypeError(
                f"policy must be an asyncfront.Policy (or None), got {policy!r} "
                f"({type(policy).__name__})"
            )
        devices = list(devices)
        names: set[str] = set()
        for device in devices:
            if not isinstance(device, Device):
                raise TypeError(f"devices must be Device instances, got {device!r}")
            if device.name in names:
                raise ValueError(f"two devices are named {device.name!r}")
            names.add(device.name)
        if len(devices) > _MAX_DEVICES:
            raise ValueError(f"a runtime holds at most {_MAX_DEVICES} devices, got {len(devices)}")
        self.node = node
        self.frontier_capacity = frontier_capacity
        self.stall_timeout = float(stall_timeout)
        self.devices: dict[str, Device] = {}
        for device in devices:
            device.index = len(self.devices)
            self.devices[device.name] = device
        # What the dispatch path reads: the attributes below of the same names view it.
        self._trace = TraceRecorder(
            trace_capacity, enabled=trace, frontier_capacity=frontier_capacity
        )
        self._state = RuntimeState(self._trace._ring)
        self._log = logger if logger is not None else _default_logger()
        self._log_debug = _enabled(self._log, logging.DEBUG)
        self._log_info = _enabled(self._log, logging.INFO)
        self._log_warning = _enabled(self._log, logging.WARNING)
        self._memory = MemoryManager(self)
        self._residency: Residency | None = None  # created on first use
        # Called with each new submission once models are registered (pins what it uses).
        self._submit_hook = None
        self._owned_pools: list[Device] = []
        self._queues: list[DeviceQueue] = []
        self._queue_slots: dict[int, _QueueSlots] = {}  # by device index
        self._known_axes: set[int] = set()
        self._completion_seq = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._crash: BaseException | None = None
        self._crashed: asyncio.Future[None] | None = None  # see _crash_signal
        # Set by a RuntimeThread hosting this runtime: resolves when its thread ends.
        self._host_ended: concurrent.futures.Future[None] | None = None
        self._draining = False
        # Queues whose waits ended, advanced together in one loop callback. Not owning
        # the runtime: a closed runtime is freed by reference counting.
        self._trampoline = Trampoline(_crash_reporter(weakref.ref(self)))
        self._settled: asyncio.Future[None] | None = None
        self._stall_timer = None  # armed while a queue is blocked
        self._stall_mark = -1  # progress when the timer was armed
        self._stall_reported: tuple[StalledWait, ...] = ()
        self._open = False
        self._default_queues: dict[tuple[str, int], DeviceQueue] = {}
        self._channels: list[CollectiveChannel] = []  # live ones: a closed one leaves drained
        self._channel_ordinals = itertools.count()  # never reused, as axes never are
        self._binder: StageBinder | None = None  # created on first use
        self._slo: dict[str, list[int]] = {}  # graph name -> [runs with a deadline, met]
        # Placement asks rt.placement_residency about weights; anything with is_resident and
        # load_time may replace the default, which asks the residency about the weights and
        # models it holds and the declared models' registry about the rest.
        self.declared_models = ModelRegistry(self.devices)
        self.placement_residency: PlacementResidency = RuntimeResidency(self)
        # The devices whose policy this runtime set (devices without one of their own);
        # closing gives them back their default.
        self._policy_devices: list[Device] = []
        if policy is not None:
            for device in self.devices.values():
                if device._arbiter._policy is None:
                    device.policy = policy
                    self._policy_devices.append(device)

    # -- the facts every submission reads, kept in the core's RuntimeState ---------

    @property
    def trace(self) -> TraceRecorder:
        """The trace: a record of every finished submission (see :class:`TraceRecorder`)."""
        return self._trace

    @trace.setter
    def trace(self, recorder: TraceRecorder) -> None:
        if not isinstance(recorder, TraceRecorder):
            raise TypeError(f"trace must be a TraceRecorder, got {recorder!r}")
        self._trace = recorder
        self._state.trace = recorder._ring

    _open: _StateField[bool] = _StateField("open")
    _draining: _StateField[bool] = _StateField("draining")
    _log_debug: _StateField[bool] = _StateField("log_debug")
    _log_warning: _StateField[bool] = _StateField("log_warning")
    _submit_hook: _StateField[Callable[[Submission], None] | None] = _StateField("submit_hook")
    _completed_epochs: _StateField[dict[int, int]] = _StateField("completed_epochs")
    _completed_cache: _StateField[Frontier | None] = _StateField("completed_cache")
    _completion_waiters: _StateField[dict[int, list[tuple[int, int, asyncio.Future[None]]]]] = (
        _StateField("completion_waiters")
    )
    _stall_timer: _StateField[asyncio.TimerHandle | None] = _StateField("stall_timer")

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
        slots = self._queue_slots.get(dev.index)
        if slots is None:
            slots = self._queue_slots[dev.index] = _QueueSlots()
        slot, incarnation = slots.take(dev.name)
        queue_axis = axis(
            node=self.node,
            domain=Domain.QUEUE,
            device=dev.index,
            queue=slot,
            incarnation=incarnation,
        )
        if name is not None:
            qname = name
        elif incarnation:
            qname = f"{dev.name}.q{slot}#{incarnation}"
        else:
            qname = f"{dev.name}.q{slot}"
        set_axis_name(queue_axis, qname)
        self._known_axes.add(queue_axis)
        q = DeviceQueue(self, dev, queue_axis, priority, qname, self.frontier_capacity)
        self._queues.append(q)
        return q

    def _start_queue(self, q: DeviceQueue) -> None:
        """Start the consumer task of ``q`` (on its first submission: idle queues cost none)."""
        task = q._loop.create_task(q._run(), name=f"asyncfront:{q.name}")
        q._task = task
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        task.add_done_callback(q._task_ended)

    def _retire(self, q: DeviceQueue) -> None:
        """A closed queue drained and its task ended: forget it, free its slot.

        From here its axis reads as complete (:meth:`axis_retired`), with no state kept
        for it: not its completed epoch, its name, its queue object or its task.
        """
        ax = q.axis
        if ax not in self._known_axes:
            return
        self._queues.remove(q)
        self._known_axes.discard(ax)
        if self._completed_epochs.pop(ax, None) is not None:
            self._completed_cache = None
        heap = self._completion_waiters.pop(ax, None)
        for _, _, fut in heap or ():
            if not fut.done():
                fut.set_result(None)
        for key, default in list(self._default_queues.items()):
            if default is q:
                del self._default_queues[key]
        _forget_axis_name(ax, q.name)
        self._queue_slots[q.device.index].release(ax & _QUEUE_MASK)
        if self._log_info:
            self._log.info("queue_retired", queue=q.name, epoch=q.completed_epoch)

    def axis_retired(self, ax: int) -> bool:
        """Whether ``ax`` names a queue of this runtime that closed and drained.

        Such an axis reads as complete forever (every epoch it will ever have has
        completed) although the runtime keeps nothing for it: death frontiers and
        :meth:`wait_completed` never wait on it.
        """
        if ax in self._completed_epochs:
            return False
        if (ax >> 48) & 0xFF != self.node or (ax >> 40) & 0xFF != Domain.QUEUE:
            return False
        slots = self._queue_slots.get((ax >> 32) & 0xFF)
        return slots is not None and slots.retired(ax & _QUEUE_MASK, ax >> 56)

    def semaphore(self, initial: int = 0, name: str | None = None) -> TimelineSemaphore:
        """A new timeline semaphore bound to the runtime's loop."""
        sem = TimelineSemaphore(initial, name=name)
        if self._loop is not None:
            sem.bind(self._loop)
        return sem

    @property
    def queues(self) -> tuple[DeviceQueue, ...]:
        """Every live queue: a closed queue leaves once its queued work has run."""
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

    @property
    def binder(self) -> StageBinder:
        """The backlogs of stages bound when they become ready (``bind="ready"``).

        Configure work stealing here: ``rt.binder.configure(stealing=Stealing.NEIGHBOURS,
        topology=Topology.ring([...]))``.

        Raises:
            RuntimeError: the runtime is not open.
        """
        binder = self._binder
        if binder is None:
            binder = self._binder = StageBinder(self)
        return binder

    def graph(
        self, name: str = "graph", *, qos: QoS | None = None, deadline: float | None = None
    ) -> Graph:
        """A new, empty pipeline; ``qos`` sets its stages' default queue priority.

        ``deadline`` (seconds from each run's submission) is every run's SLO unless
        :meth:`Graph.submit` says otherwise.
        """
        return Graph(self, name, qos=qos, deadline=deadline)

    def slo_statistics(self) -> dict[str, SLOStatistics]:
        """``{graph name: SLO attainment}`` of the finished graph runs that had a deadline."""
        return {
            name: SLOStatistics(workflow=name, runs=runs, met=met, missed=runs - met)
            for name, (runs, met) in self._slo.items()
        }

    def _slo_entry(self, workflow: str) -> list[int]:
        """The ``[runs, met]`` counters of a workflow (graph name)."""
        entry = self._slo.get(workflow)
        if entry is None:
            entry = self._slo[workflow] = [0, 0]
        return entry

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
        index = next(self._channel_ordinals)
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

    def declare_model(
        self,
        name: str,
        size: int,
        *,
        resident_on: Iterable[str] = (),
        load_time: float | dict[str, float] | None = None,
    ) -> ModelInfo:
        """Declare by hand a model of ``size`` bytes and the devices it is resident on.

        For simulations: nothing loads or drops a declared model, and placement believes
        what :meth:`declare_resident` says about it. Real weights and models are
        registered with :meth:`weights` and :meth:`model`, whose residency placement
        reads directly. ``load_time`` (seconds, for every device or per device)
        overrides the estimate ``size / load bandwidth``.

        Raises:
            ValueError: the name is declared already, or names weights or a model of
                the residency; a negative size or load time.
            KeyError: an unknown device.
        """
        if self._residency is not None and self._residency.knows(name):
            raise ValueError(
                f"{name!r} names weights registered with the residency (rt.weights or "
                f"rt.model); placement reads their residency, do not declare them"
            )
        return self.declared_models.register(
            name, size, resident_on=resident_on, load_time=load_time
        )

    def declare_resident(self, model: str, device: str | Device, resident: bool = True) -> None:
        """Declare that a declared ``model`` is now (False: no longer) resident on ``device``.

        Raises:
            KeyError: the model was never declared, or the device is unknown.
        """
        name = device if isinstance(device, str) else device.name
        self.declared_models.mark_resident(model, name, resident)

    @property
    def models(self) -> ModelRegistry:
        """Deprecated: the declared models' registry, now :attr:`declared_models`."""
        warnings.warn(
            "rt.models is deprecated: use rt.declared_models",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.declared_models

    def register_model(
        self,
        name: str,
        size: int,
        *,
        resident_on: Iterable[str] = (),
        load_time: float | dict[str, float] | None = None,
    ) -> ModelInfo:
        """Deprecated alias of :meth:`declare_model`."""
        warnings.warn(
            "rt.register_model is deprecated: use rt.declare_model (declared by hand) or "
            "rt.model (a real model)",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.declare_model(name, size, resident_on=resident_on, load_time=load_time)

    def mark_resident(self, model: str, device: str | Device, resident: bool = True) -> None:
        """Deprecated alias of :meth:`declare_resident`."""
        warnings.warn(
            "rt.mark_resident is deprecated: use rt.declare_resident",
            DeprecationWarning,
            stacklevel=2,
        )
        self.declare_resident(model, device, resident)

    def is_resident(self, model: str | Weights | Model, device: str | Device) -> bool:
        """Whether ``model``'s weights are resident on ``device`` (per ``placement_residency``)."""
        return self.placement_residency.is_resident(
            model if isinstance(model, str) else model.name,
            device if isinstance(device, str) else device.name,
        )

    def load_time(self, model: str | Weights | Model, device: str | Device) -> float:
        """Seconds to make ``model`` resident on ``device`` (``inf``: it cannot hold it)."""
        return self.placement_residency.load_time(
            model if isinstance(model, str) else model.name,
            device if isinstance(device, str) else device.name,
        )

    def backlog(self, device: str | Device) -> float:
        """Seconds of queued work on ``device``: unfinished submissions' cost / speed."""
        dev = self.device(device) if isinstance(device, str) else device
        return device_backlog(dev, self._queues, self._require_loop().time())

    def place(
        self,
        model: str | Weights | Model | None = None,
        *,
        cost: float | None = None,
        deadline: float | None = None,
        devices: Iterable[str] | None = None,
    ) -> PlacementDecision:
        """Where work needing ``model`` would run now (see :func:`asyncfront.place`).

        ``model`` is a name, or weights or a model registered with :meth:`weights` or
        :meth:`model`, whose residency placement reads (see :class:`RuntimeResidency`).
        """
        loop = self._require_loop()
        name = model if model is None or isinstance(model, str) else model.name
        needs = StageNeeds(model=name, cost=cost, deadline=deadline)
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
        qos: QoS | str = QoS.GUARANTEED,
    ) -> ExecutionContext:
        """Admit a context: a queue on ``device`` at the tier's priority and a memory budget.

        Guaranteed reserves ``max_memory`` now; Burstable reserves ``base_memory`` and
        may grow to ``max_memory`` from spare memory; BestEffort reserves nothing.
        ``device`` may be omitted when the runtime has a single device. ``qos`` may be
        a tier's name (``"guaranteed"``, ``"burstable"``, ``"best_effort"``; see
        :meth:`QoS.coerce`). Everything is checked before anything is created: a refused
        call leaves no account, queue or name behind.

        Raises:
            AdmissionError: the reservation does not fit what the device has left.
            TypeError: a size is not an ``int``, or ``qos`` is neither a QoS nor a str.
            ValueError: the name is taken or empty, sizes are inconsistent, or ``qos``
                names no tier.
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
        """Free the context's buffers, give its reservation back and close its queue.

        Work already on the context's queue still runs; then the queue retires, its
        task ends and its slot is free for another queue (with a new incarnation, so
        the axis value is never reused), and its axis reads as complete. Closing a
        context twice is harmless: the second call does nothing.

        Raises:
            ValueError: ``ctx`` belongs to another runtime.
        """
        self._memory.close_context(ctx)

    def session(self, ctx: ExecutionContext) -> Session:
        """``async with rt.session(ctx) as s``: run work and allocate on ``ctx``."""
        return Session(self, ctx)

    def session_sync(self, ctx: ExecutionContext, *, timeout: float | None = None) -> SyncSession:
        """``with rt.session_sync(ctx) as s``: the same, for code on another thread.

        ``timeout`` (seconds) bounds each blocking call of the session unless the call
        passes its own; a call that runs out raises :class:`TimeoutError`.
        """
        return SyncSession(self, ctx, timeout=timeout)

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
        source: str | os.PathLike[str] | Mapping[str, Any] | None = None,
        *,
        size: int | None = None,
        priority: int | None = None,
        request_rate: float | None = None,
        storage: str | Device | None = None,
        in_host_memory: bool = False,
        drop_while_queued: bool = False,
        evict_with_context: bool = False,
    ) -> Weights:
        """Register immutable weights: a safetensors file or a dict of host tensors.

        Without a ``source``, weights of ``size`` bytes are accounting-only, for fake
        devices: loads charge the budget and take the storage's time in virtual time,
        and move no bytes. See :meth:`asyncfront.memory.Residency.register` (and
        :class:`asyncfront.memory.Weights` for the three options).
        """
        return self.residency.register(
            name,
            source,
            size=size,
            priority=priority,
            request_rate=request_rate,
            storage=storage,
            in_host_memory=in_host_memory,
            drop_while_queued=drop_while_queued,
            evict_with_context=evict_with_context,
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
        """The frontier of completed epochs on every live queue axis (the epoch tracker).

        Retired queues (closed and drained) leave it: their axes read as complete through
        :meth:`is_complete`, :meth:`wait_completed` and :meth:`axis_retired`.
        """
        cached = self._completed_cache
        if cached is None:
            cached = self._completed_cache = Frontier(self._completed_epochs)
        return cached

    def is_complete(self, frontier: Frontier) -> bool:
        """Whether every epoch named by ``frontier`` has completed.

        An axis of a retired queue (closed and drained) reads as complete.
        """
        done = self._completed_epochs
        return all(done.get(ax, 0) >= epoch or self.axis_retired(ax) for ax, epoch in frontier)

    async def wait_completed(self, frontier: Frontier) -> None:
        """Wait until every epoch named by ``frontier`` has completed on its axis.

        An axis of a retired queue (closed and drained) reads as complete at once.

        Raises:
            ValueError: an axis of ``frontier`` belongs to no queue of this runtime
                (nothing could ever complete it).
            StalledError: the runtime closed first.
        """
        done = self._completed_epochs
        for ax, epoch in frontier:
            if done.get(ax, 0) >= epoch or self.axis_retired(ax):
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
        self._trampoline.bind(self._loop)
        self.trace.origin = self._loop.time()
        for device in self.devices.values():
            if device.memory is None and device.memory_capacity:
                device.memory = BufferPool(
                    device.memory_capacity - (device.working_capacity or 0),
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
        if task.cancelled():
            _clear_cancelled_frames(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            assert exc is not None
            self._crashed_by(exc)

    def _crashed_by(self, exc: BaseException) -> None:
        """A queue or channel crashed (a defect, not a work error): report it on close."""
        if self._crash is None:
            self._crash = exc
            signal = self._crashed
            if signal is not None and not signal.done():
                signal.set_result(None)

    def _crash_signal(self) -> asyncio.Future[None]:
        """A future that resolves when a queue or channel task crashes (at once if one did)."""
        signal = self._crashed
        if signal is None:
            signal = self._crashed = (self._loop or asyncio.get_running_loop()).create_future()
            if self._crash is not None:
                signal.set_result(None)
        return signal

    def _queue_settled(self) -> None:
        """A queue went idle or blocked: wake the drain, if one is waiting."""
        settled = self._settled
        if settled is not None and not settled.done():
            settled.set_result(None)

    def _queue_blocked(self) -> None:
        """A queue's head waits on semaphores: wake the drain, or arm the stall watch."""
        if self._draining:
            self._queue_settled()
        elif self._stall_timer is None and self._open:
            self._arm_stall_timer()

    def _arm_stall_timer(self) -> None:
        loop = self._loop
        if loop is None:
            return
        self._stall_mark = self._progress_mark()
        self._stall_timer = loop.call_later(self.stall_timeout, self._check_stall)

    def _progress_mark(self) -> int:
        return sum(self._completed_epochs.values())

    def _busy_units(self) -> list[DeviceQueue | CollectiveChannel]:
        busy: list[DeviceQueue | CollectiveChannel] = [q for q in self._queues if q._busy()]
        busy += [c for c in self._channels if c._busy()]
        return busy

    def _stalled_waits(self, *, ended_from_outside: bool = False) -> list[StalledWait]:
        """The blocked waits, with why each can never be satisfied (None: it still can)."""
        blocked = [q for q in self._queues if q._blocked is not None]
        if not blocked:
            return []
        analysis = StallAnalysis([q for q in self._queues if q._busy()], self._channels)
        return analysis.stalled_waits(blocked, ended_from_outside=ended_from_outside)

    def _check_stall(self) -> None:
        """While open: report (never fail) a runtime in which nothing can make progress."""
        self._stall_timer = None
        if not self._open or self._draining:
            return
        busy = self._busy_units()
        if not any(isinstance(u, DeviceQueue) and u._blocked is not None for u in busy):
            return  # nothing waits: the next blocked queue arms the watch again
        mark = self._progress_mark()
        if mark != self._stall_mark or not all(u._blocked is not None for u in busy):
            self._arm_stall_timer()  # work moved or is running: look again later
            return
        waits = tuple(self._stalled_waits())
        if waits and waits != self._stall_reported:
            self._stall_reported = waits
            if self._log_warning:
                self._log.warning(
                    "stall",
                    seconds=self.stall_timeout,
                    waits=[w.describe() for w in waits],
                    message=(
                        f"nothing in the runtime made progress for {self.stall_timeout} s: "
                        + "; ".join(w.describe() for w in waits)
                    ),
                )

    def _note_stall(self) -> None:
        """Record the stalled waits for whoever reports the outside error that ended them."""
        loop = self._loop
        if loop is None or not self._open:
            return
        now = loop.time()
        note = _stall_notes.get(loop)
        if note is not None and note[0] == now:
            if id(self) in note[1]:
                return
            ids, lines = note[1], note[2]
        else:
            ids, lines = set(), []
        lines.extend(w.describe() for w in self._stalled_waits(ended_from_outside=True))
        ids.add(id(self))
        _stall_notes[loop] = (now, ids, lines)

    def _abort_stalled(self, busy: list[DeviceQueue | CollectiveChannel]) -> int:
        """Fail exactly the blocked waits that nothing queued can satisfy; returns how many."""
        queues = [u for u in busy if isinstance(u, DeviceQueue)]
        analysis = StallAnalysis(queues, self._channels)
        aborted = 0
        for q in queues:
            if q._abort_blocked(functools.partial(analysis.reason, q)):
                aborted += 1
        if not aborted:
            # Every wait is reachable on its own, yet nothing moves: the queues' order
            # forms a cycle (a head waits on work queued behind another stalled head that
            # waits on it). Break it by failing every blocked wait.
            for q in queues:
                if q._abort_blocked(lambda sem, value: "it is part of a cycle of stalled queues"):
                    aborted += 1
        return aborted

    async def _drain(self) -> None:
        """Wait for every queue to finish; fail work that waits on what nothing will signal."""
        loop = asyncio.get_running_loop()
        self._draining = True
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None
        while True:
            busy = self._busy_units()
            if not busy or self._crash is not None:
                return
            settled = self._settled = loop.create_future()
            if all(u._blocked is not None for u in busy):
                # Nothing runs and everything waits: give outside signallers (threads,
                # timers, host tasks passing a failure on) stall_timeout seconds before
                # calling it a stall.
                try:
                    await asyncio.wait_for(asyncio.shield(settled), self.stall_timeout)
                except TimeoutError:
                    pass
                else:
                    self._settled = None
                    continue
                busy = self._busy_units()
                stalled = bool(busy) and all(u._blocked is not None for u in busy)
                if stalled and not self._abort_stalled(busy):
                    await asyncio.sleep(0)  # the blocked waits are ending already
                    self._settled = None
                    continue
            await settled
            self._settled = None

    async def _close(self) -> None:
        self._open = False
        if self._binder is not None:
            self._binder.close()  # nothing will bind what is still unbound
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None
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
            # An ended task keeps its CancelledError, whose traceback holds the task's
            # frame (this runtime, its queue): let go of it, so no cycle outlives closing.
            q._task = None
        self._tasks.clear()
        waiters, self._completion_waiters = self._completion_waiters, {}
        for heap in waiters.values():
            for _, _, fut in heap:
                if not fut.done():
                    fut.set_exception(
                        StalledError("the runtime closed before these epochs completed")
                    )
        for device in reversed(list(self.devices.values())):
            await device.aclose()
        for device in self._policy_devices:
            device.policy = None
        self._policy_devices.clear()
        if self._crash is not None:
            raise RuntimeError("an asyncfront queue task crashed") from self._crash


def _crash_reporter(runtime: weakref.ref[Runtime]) -> Callable[[BaseException], None]:
    """Report a crash to the runtime while it lives; afterwards there is no one to tell."""

    def report(exc: BaseException) -> None:
        rt = runtime()
        if rt is not None:
            rt._crashed_by(exc)

    return report


def _clear_cancelled_frames(task: asyncio.Task[Any]) -> None:
    """Drop the locals of the frames in the error a cancelled task keeps.

    A queue task cancelled mid-wait keeps its ``CancelledError``, whose traceback holds
    the task's frame, whose locals (the task, the waiter futures) hold the error again:
    a cycle through the runtime that only the collector could free.
    """
    try:
        task.exception()  # raises the task's CancelledError, chained to the original
    except asyncio.CancelledError as exc:
        seen: set[int] = set()
        error: BaseException | None = exc
        while error is not None and id(error) not in seen:
            seen.add(id(error))
            traceback.clear_frames(error.__traceback__)
            error = error.__context__


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
    policy: Policy | None = None,
) -> AsyncIterator[Runtime]:
    """Open a runtime on the running loop; leaving drains the queues, then closes.

    On a normal exit every queued submission finishes first. When nothing can make
    progress for ``stall_timeout`` seconds, exactly the waits that nothing left (counting
    work queued behind a stalled head, on any queue) can satisfy fail with
    :class:`StalledError`, naming the queue, submission, semaphore and value; the rest
    go on. While the runtime is open a stall is only reported: a ``stall`` warning on
    the logger names each stalled wait. On an exception the queues are cancelled and
    their pending work fails.

    Args:
        devices: the devices the runtime schedules on (names must be unique).
        node: the node field of every axis this runtime creates.
        frontier_capacity: the most entries an operation's frontier keeps.
        trace: record every finished submission.
        trace_capacity: the most trace records kept; beyond it the oldest are dropped and
            counted (default :data:`asyncfront.DEFAULT_TRACE_CAPACITY`, about 35 MB).
        stall_timeout: seconds with nothing able to make progress before a stall is
            reported (while open) or its unsatisfiable waits fail (when leaving).
        policy: how every device without a policy of its own chooses among ready work of
            one priority (:class:`PriorityPolicy`, first come first served, when None);
            closing restores those devices' default.

    Raises:
        ValueError: an option out of range (the message names it): ``node`` outside
            0..255, ``frontier_capacity`` < 1, ``trace_capacity`` < 0, ``stall_timeout``
            not a finite number > 0; or two devices with one name.
        TypeError: an item of ``devices`` is not a :class:`Device`, or ``policy`` is
            not a :class:`Policy`.
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
        policy=policy,
    )
    await rt._start()
    try:
        yield rt
        await rt._drain()
    except TimeoutError:
        rt._note_stall()  # a virtual-time idle timeout: keep what was stalled for its report
        raise
    finally:
        await rt._close()


class RuntimeThread:
    """A runtime on its own event loop in a background thread, for synchronous programs.

    ``with start_runtime_thread(devices) as thread:`` opens the runtime; ``thread.call``
    runs a coroutine function on its loop and ``thread.call_soon`` a plain function,
    each blocking the caller until the result is ready, ``timeout`` seconds pass (the
    work is cancelled, :class:`TimeoutError`), or the thread ends first
    (:class:`RuntimeCrashedError` naming the crash). Leaving drains and closes.

    The thread runs an anyio :class:`~anyio.from_thread.BlockingPortal` on asyncio: the
    portal carries the calls from other threads, their cancellation and the shutdown;
    the runtime's queues run on plain asyncio inside it.
    """

    def __init__(self, devices: Iterable[Device] = (), **options: Any) -> None:
        self._devices = list(devices)
        self._options = options
        self._thread: threading.Thread | None = None
        self._portal: BlockingPortal | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runtime: Runtime | None = None
        self._stop: asyncio.Event | None = None
        # Resolves once the runtime is open (or with the error that kept it from opening).
        self._opened: concurrent.futures.Future[None] = concurrent.futures.Future()
        # Resolves when the thread's loop has ended: with its crash, if it crashed.
        self._ended: concurrent.futures.Future[None] = concurrent.futures.Future()

    @property
    def runtime(self) -> Runtime:
        """The runtime (only touch it on its loop: use :meth:`call` or :meth:`call_soon`)."""
        if self._runtime is None:
            raise RuntimeError("the runtime thread is not running")
        return self._runtime

    def start(self, timeout: float = 30.0) -> RuntimeThread:
        """Start the thread and wait until the runtime is open.

        Raises:
            RuntimeError: already started, or the runtime failed to open (``__cause__``).
            TimeoutError: the runtime did not open within ``timeout`` seconds (the thread
                is stopped).
        """
        if self._thread is not None:
            raise RuntimeError("the runtime thread was already started")
        self._thread = threading.Thread(target=self._main, name="asyncfront-runtime", daemon=True)
        self._thread.start()
        concurrent.futures.wait(
            [self._opened, self._ended], timeout, return_when=concurrent.futures.FIRST_COMPLETED
        )
        if self._opened.done():
            error = self._opened.exception()
            if error is None:
                return self
        elif self._ended.done():
            error = self._ended.exception()
        else:
            self._request_stop()
            raise TimeoutError(f"the runtime did not open within {timeout} s")
        self._thread.join()
        self._thread = None
        raise RuntimeError("the runtime failed to open") from error

    def _main(self) -> None:
        try:
            anyio.run(self._host, backend="asyncio")
        except BaseException as exc:  # every blocked caller learns of it through _ended
            crash = _leaf(exc)
            if not self._opened.done():
                self._opened.set_exception(crash)
            if not self._ended.done():
                self._ended.set_exception(crash)
        else:
            if not self._opened.done():
                self._opened.set_exception(RuntimeError("the runtime thread stopped first"))
            if not self._ended.done():
                self._ended.set_result(None)

    async def _host(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with BlockingPortal() as portal:
            try:
                async with open_runtime(self._devices, **self._options) as rt:
                    self._runtime = rt
                    self._portal = portal
                    rt._host_ended = self._ended
                    self._opened.set_result(None)
                    stop = asyncio.ensure_future(self._stop.wait())
                    crash = rt._crash_signal()
                    try:
                        # A crashed queue task ends the runtime: closing it raises the crash.
                        await asyncio.wait((stop, crash), return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        stop.cancel()
            except BaseException as exc:
                # Tell blocked callers why before the portal cancels their calls.
                if not self._ended.done():
                    self._ended.set_exception(exc)
                raise
            finally:
                self._portal = None
                self._runtime = None
                await portal.stop(cancel_remaining=True)

    def call(
        self,
        fn: Callable[..., Coroutine[Any, Any, T]],
        *args: Any,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> T:
        """Run ``await fn(*args, **kwargs)`` on the runtime's loop; block for its result.

        Raises:
            TimeoutError: not done within ``timeout`` seconds; the coroutine is cancelled.
            RuntimeCrashedError: the runtime's thread crashed or closed first.
            RuntimeError: the thread is not running, or this is its own loop's thread.
        """
        check_timeout(timeout, f"call to {_label(fn)}")
        portal = self._running_portal()
        work: Callable[[], Coroutine[Any, Any, T]] = functools.partial(fn, *args, **kwargs)
        future: concurrent.futures.Future[T] = portal.start_task_soon(work)
        return wait_blocking(future, f"call to {_label(fn)}", timeout, self._ended)

    def call_soon(
        self, fn: Callable[..., T], *args: Any, timeout: float | None = None, **kwargs: Any
    ) -> T:
        """Run ``fn(*args, **kwargs)`` on the runtime's loop thread; block for its result.

        Raises:
            TimeoutError: not done within ``timeout`` seconds (if it had not started, it
                never runs).
            RuntimeCrashedError: the runtime's thread crashed or closed first.
            RuntimeError: the thread is not running, or this is its own loop's thread.
        """

        async def run() -> T:
            return fn(*args, **kwargs)

        check_timeout(timeout, f"call to {_label(fn)}")
        portal = self._running_portal()
        return wait_blocking(
            portal.start_task_soon(run), f"call to {_label(fn)}", timeout, self._ended
        )

    def _wait(self, future: concurrent.futures.Future[T], what: str, timeout: float | None) -> T:
        """Block for ``future`` (from this thread's loop) as :meth:`call` does."""
        return wait_blocking(future, what, timeout, self._ended)

    def _running_portal(self) -> BlockingPortal:
        if self._ended.done():
            crash = None if self._ended.cancelled() else self._ended.exception()
            if crash is not None:
                raise RuntimeCrashedError(
                    f"the runtime's thread crashed: {type(crash).__name__}: {crash}"
                ) from crash
        portal = self._portal
        if portal is None or self._runtime is None:
            raise RuntimeError("the runtime thread is not running")
        if self._thread is not None and threading.get_ident() == self._thread.ident:
            raise RuntimeError("RuntimeThread.call from the runtime's own loop would deadlock")
        return portal

    def _request_stop(self) -> None:
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop may have just ended
                loop.call_soon_threadsafe(stop.set)

    def close(self, timeout: float | None = 60.0) -> None:
        """Drain and close the runtime, then join the thread.

        Raises:
            TimeoutError: the thread did not end within ``timeout`` seconds.
            RuntimeError: the runtime's thread failed (``__cause__``: its error).
        """
        thread = self._thread
        if thread is None:
            return
        self._request_stop()
        thread.join(timeout)
        if thread.is_alive():
            raise TimeoutError(f"the runtime thread did not close within {timeout} s")
        self._thread = None
        error = self._ended.exception() if self._ended.done() else None
        if error is not None:
            # Reported once: a second close() returns quietly.
            self._ended = concurrent.futures.Future()
            self._ended.set_result(None)
            raise RuntimeError("the runtime thread failed") from error

    def __enter__(self) -> RuntimeThread:
        return self.start() if self._thread is None else self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "running" if self._runtime is not None else "stopped"
        return f"<RuntimeThread {state} devices={[d.name for d in self._devices]}>"


def _leaf(exc: BaseException) -> BaseException:
    """The one exception inside (nested) single-member exception groups, else ``exc``."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def _label(fn: Callable[..., Any]) -> str:
    """A readable name of a callable for messages."""
    return repr(getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or fn)


def start_runtime_thread(devices: Iterable[Device] = (), **options: Any) -> RuntimeThread:
    """Open a runtime on a background thread's loop (see :class:`RuntimeThread`)."""
    return RuntimeThread(devices, **options).start()
