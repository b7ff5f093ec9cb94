"""The Multi-LLM Scheduler Guide's API, implemented on asyncfront.

Programs written against that guide run here with only their imports changed::

    from asyncfront.compat.pygpukit import create_context, context_session, initialize, GB
    import asyncfront.compat.pygpukit as rust  # the guide's low-level (Rust) API

How the names map:

- :func:`initialize` opens an asyncfront runtime on a background thread's loop
  (:func:`asyncfront.start_runtime_thread`) with one device standing for GPU
  ``device_id``. **No GPU is used**: the default device is an
  :class:`asyncfront.devices.CpuDevice` standing in for it, whose ``memory`` (8 GiB by
  default) is pure accounting; pass ``device=`` to use any other asyncfront device. The
  first call that needs the scheduler initializes it with the defaults (so each of the
  guide's examples runs on its own); :func:`shutdown` drains and closes it.
- :func:`create_context` is :meth:`asyncfront.Runtime.create_context` and returns the
  :class:`asyncfront.ExecutionContext` itself; ``QoSPolicy`` *is* :class:`asyncfront.QoS`.
- :func:`context_session` is a session on the context: ``with`` gives a
  :class:`SyncContextSession` (an :class:`asyncfront.SyncSession` underneath) and
  ``async with`` an :class:`AsyncContextSession` that works from any event loop, the
  runtime's being on its own thread. :func:`current_context` tells code inside which
  context it runs on.
- :func:`get_stream` is the context's :class:`asyncfront.DeviceQueue`;
  :func:`record_event` queues a barrier that signals a value of the context's
  :class:`asyncfront.TimelineSemaphore`, and :func:`wait_event` makes the next work
  queued on another context wait for that value: the context's queue waits, not the
  calling thread, and nothing polls.
- :func:`on_memory_pressure` registers a handler with the runtime's pressure policy.
  asyncfront never overcommits: a handler's True means "I may have freed memory, retry"
  and the allocation is granted only if it then fits (else it waits for memory or raises
  :class:`asyncfront.MemoryBudgetError`); False refuses the allocation at once.
- :class:`MemoryPool` caches freed blocks for reuse under a byte quota, evicting the
  least recently used live blocks when allowed; :class:`QosPolicyEvaluator` and
  :class:`PartitionManager` admit tasks and partitions against memory, bandwidth and
  compute through :class:`asyncfront.MemoryLedger`.

``GB`` and ``MB`` are binary units (``GB == 1024**3``), as the guide's own arithmetic uses.
"""

from __future__ import annotations

import asyncio
import atexit
import contextvars
import dataclasses
import itertools
import threading
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from concurrent.futures import Future as ConcurrentFuture
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

from .._budget import (
    AdmissionError,
    Charge,
    GiB,
    MemoryBudgetError,
    MemoryLedger,
    MiB,
    QoS,
    format_bytes,
)
from .._context import Buffer, ExecutionContext, Session, SyncSession
from .._frontier import Frontier
from .._queue import Submission
from .._runtime import Runtime, RuntimeThread, start_runtime_thread
from .._semaphore import TimelineSemaphore
from ..devices import CpuDevice, Device
from ..memory import Block, BufferPool

__all__ = (
    "GB",
    "MB",
    "AsyncContextSession",
    "ContextSession",
    "ContextVramUsage",
    "Event",
    "MemoryBlock",
    "MemoryPool",
    "MemoryPoolStats",
    "PartitionConfig",
    "PartitionInfo",
    "PartitionLimits",
    "PartitionManager",
    "PressureHandler",
    "QoSPolicy",
    "QosEvaluation",
    "QosPolicyEvaluator",
    "QosTaskMeta",
    "QuotaExceededError",
    "Stream",
    "SyncContextSession",
    "context_session",
    "create_context",
    "current_context",
    "current_session",
    "get_available_vram",
    "get_context_usage",
    "get_stream",
    "initialize",
    "on_memory_pressure",
    "record_event",
    "shutdown",
    "wait_event",
)

T = TypeVar("T")

GB = GiB
"""1024**3 bytes."""
MB = MiB
"""1024**2 bytes."""

QoSPolicy = QoS
"""The guide's tiers are asyncfront's: ``GUARANTEED``, ``BURSTABLE``, ``BEST_EFFORT``."""

DEFAULT_MEMORY = 8 * GB
"""Memory budget of the default device when :func:`initialize` is not told otherwise."""

PressureHandler = Callable[[ExecutionContext, int, int], bool]
"""``handler(context, requested, available) -> bool``: True retries, False refuses."""


# -- the scheduler: a runtime on its own thread ----------------------------------------


class _Scheduler:
    """The runtime thread and what the guide's calls keep between them."""

    def __init__(self, thread: RuntimeThread, device: Device, device_id: int) -> None:
        self.thread = thread
        self.runtime: Runtime = thread.runtime
        self.device = device
        self.device_id = device_id
        self.loop: asyncio.AbstractEventLoop = thread.call_soon(asyncio.get_running_loop)
        self.loop_thread: int = thread.call_soon(threading.get_ident)
        self.handlers: list[PressureHandler] = []
        # Touched on the runtime's loop only:
        self.events: dict[ExecutionContext, TimelineSemaphore] = {}
        self.recorded: dict[ExecutionContext, int] = {}
        self.pending: dict[ExecutionContext, list[tuple[TimelineSemaphore, int]]] = {}
        self.call_soon(self.runtime.on_memory_pressure, self._ask_handlers)

    @classmethod
    def start(
        cls, device_id: int, memory: int | None, device: Device | None, workers: int
    ) -> _Scheduler:
        if device is None:
            device = CpuDevice(
                f"gpu{device_id}",
                workers=workers,
                memory=DEFAULT_MEMORY if memory is None else memory,
            )
        elif memory is not None:
            raise ValueError("give either memory= (for the default device) or device=, not both")
        if not device.memory_capacity:
            raise ValueError(
                f"device {device.name!r} tracks no memory: give it a memory budget so "
                "contexts have VRAM to share"
            )
        return cls(start_runtime_thread([device]), device, device_id)

    # -- crossing threads ------------------------------------------------------------

    def on_loop(self) -> bool:
        """Whether the caller runs on the runtime's loop thread."""
        return threading.get_ident() == self.loop_thread

    def call_soon(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args)`` on the runtime's loop thread (directly when already there)."""
        if self.on_loop():
            return fn(*args, **kwargs)
        return self.thread.call_soon(fn, *args, **kwargs)

    async def bridge(self, coro: Coroutine[Any, Any, T]) -> T:
        """Await ``coro`` on the runtime's loop from whatever loop the caller runs."""
        if self.on_loop():
            return await coro
        return await asyncio.wrap_future(self.schedule(coro))

    def schedule(self, coro: Coroutine[Any, Any, T]) -> ConcurrentFuture[T]:
        """Start ``coro`` on the runtime's loop; its outcome lands in the returned future."""
        try:
            return asyncio.run_coroutine_threadsafe(coro, self.loop)
        except BaseException:
            coro.close()
            raise

    # -- work on a context's queue (on the loop) -------------------------------------

    def take_waits(self, ctx: ExecutionContext) -> list[tuple[TimelineSemaphore, int]]:
        return self.pending.pop(ctx, [])

    def submit_now(
        self, session: Session | SyncSession, fn: Any, args: tuple[Any, ...], kw: dict[str, Any]
    ) -> Submission:
        """Queue work on the session's context, after the events it was told to wait for."""
        waits = [*self.take_waits(session.context), *kw.pop("waits", ())]
        return session.submit(fn, *args, waits=waits, **kw)

    async def run_now(
        self, session: Session | SyncSession, fn: Any, args: tuple[Any, ...], kw: dict[str, Any]
    ) -> Any:
        return await self.submit_now(session, fn, args, kw)

    def record_now(self, ctx: ExecutionContext) -> Event:
        sem = self.events.get(ctx)
        if sem is None:
            sem = self.events[ctx] = self.runtime.semaphore(name=f"{ctx.name}.events")
        value = self.recorded[ctx] = self.recorded.get(ctx, 0) + 1
        ctx.queue.submit(
            None, waits=self.take_waits(ctx), signals=[(sem, value)], name="record_event"
        )
        return Event(ctx, sem, value)

    def add_wait(self, ctx: ExecutionContext, event: Event) -> None:
        self.pending.setdefault(ctx, []).append((event.semaphore, event.value))

    # -- memory pressure (on the loop) -----------------------------------------------

    def _ask_handlers(self, ctx: ExecutionContext, requested: int, available: int) -> bool:
        handlers = list(self.handlers)
        if not handlers:
            return False  # asyncfront's own policy goes on: wait for memory, or raise
        for handler in handlers:
            if not handler(ctx, requested, available):
                used, _, limit = self.runtime.usage(ctx)
                name = getattr(handler, "__qualname__", repr(handler))
                raise MemoryBudgetError(
                    ctx.name,
                    requested,
                    limit,
                    used,
                    self.runtime.available_memory(ctx.device),
                    f"refused by the memory-pressure handler {name}",
                )
        return True


_state: _Scheduler | None = None
_state_lock = threading.Lock()


def _scheduler() -> _Scheduler:
    """The running scheduler, initialized with the defaults on first use."""
    global _state
    state = _state
    if state is not None:
        return state
    with _state_lock:
        if _state is None:
            _state = _Scheduler.start(0, None, None, 4)
        return _state


def _scheduler_of(ctx: ExecutionContext) -> _Scheduler:
    """The running scheduler, which must be the one ``ctx`` was created by."""
    state = _state
    if state is None or ctx.runtime is not state.runtime:
        raise ValueError(
            f"context {ctx.name!r} belongs to a scheduler that was shut down; create it again"
        )
    return state


def initialize(
    device_id: int = 0,
    *,
    memory: int | None = None,
    device: Device | None = None,
    workers: int = 4,
) -> RuntimeThread:
    """Start the scheduler: an asyncfront runtime on a background thread, one device.

    Without ``device`` the device is a :class:`asyncfront.devices.CpuDevice` named
    ``gpu<device_id>`` with ``workers`` threads and ``memory`` bytes to budget (8 GiB by
    default): a stand-in for the GPU, since none is used here. Any asyncfront
    :class:`~asyncfront.devices.Device` that tracks memory may be passed instead.

    Returns the :class:`asyncfront.RuntimeThread`, for reaching the runtime underneath.

    Raises:
        RuntimeError: the scheduler is already running (call :func:`shutdown` first);
            calling the API before :func:`initialize` starts one with the defaults.
        ValueError: both ``memory`` and ``device`` given, or a device without memory.
    """
    global _state
    with _state_lock:
        if _state is not None:
            raise RuntimeError(
                f"the scheduler is already running on device {_state.device.name!r} "
                "(the first API call starts one with the defaults); call shutdown() first"
            )
        _state = _Scheduler.start(device_id, memory, device, workers)
        return _state.thread


def shutdown() -> None:
    """Drain the scheduler's queued work and close it; a later call starts afresh.

    Contexts, streams and events of the closed scheduler cannot be used again.
    """
    global _state
    with _state_lock:
        state, _state = _state, None
    if state is not None:
        state.thread.close()


atexit.register(shutdown)


# -- contexts --------------------------------------------------------------------------


@dataclass(frozen=True)
class ContextVramUsage:
    """Memory of one context: ``used`` of its ``max``, ``reserved`` held for it."""

    name: str
    qos: QoS
    used: int
    reserved: int
    max: int


def create_context(
    name: str,
    max_vram: int,
    base_vram: int | None = None,
    qos: QoS = QoS.GUARANTEED,
) -> ExecutionContext:
    """Admit a context with a memory budget of ``max_vram`` bytes on the device.

    Guaranteed (the default) reserves ``max_vram`` now; Burstable reserves ``base_vram``
    and grows into spare memory; BestEffort reserves nothing.

    Raises:
        asyncfront.AdmissionError: the reservation does not fit what is left.
    """
    sched = _scheduler()
    return sched.call_soon(
        sched.runtime.create_context, name, max_memory=max_vram, base_memory=base_vram, qos=qos
    )


def get_available_vram() -> int:
    """Bytes of the device that no context has reserved or is using."""
    sched = _scheduler()
    return sched.call_soon(sched.runtime.available_memory, sched.device)


def get_context_usage(ctx: ExecutionContext) -> ContextVramUsage:
    """How much of its budget ``ctx`` uses, and what it holds reserved."""
    sched = _scheduler_of(ctx)
    used, reserved, limit = sched.call_soon(sched.runtime.usage, ctx)
    return ContextVramUsage(ctx.name, ctx.qos, used, reserved, limit)


def on_memory_pressure(handler: PressureHandler) -> PressureHandler:
    """Ask ``handler(ctx, requested, available)`` when an allocation does not fit.

    Handlers run on the runtime's thread, in registration order, after BestEffort
    contexts have been asked to evict. True from every handler retries the allocation,
    which is granted only if it now fits: free memory in the handler (a session's
    ``free`` works there) to make room. The first False refuses the allocation with
    :class:`asyncfront.MemoryBudgetError`. Usable as a decorator.
    """
    _scheduler().handlers.append(handler)
    return handler


# -- sessions --------------------------------------------------------------------------

_current: contextvars.ContextVar[SyncContextSession | AsyncContextSession | None] = (
    contextvars.ContextVar("asyncfront_compat_session", default=None)
)


def current_session() -> SyncContextSession | AsyncContextSession:
    """The innermost session open in this thread or task.

    Raises:
        RuntimeError: no session is open here.
    """
    session = _current.get()
    if session is None:
        raise RuntimeError(
            "no context session is open here: use 'with context_session(ctx)' "
            "or 'async with context_session(ctx)'"
        )
    return session


def current_context() -> ExecutionContext:
    """The context of the innermost session open in this thread or task.

    Raises:
        RuntimeError: no session is open here.
    """
    return current_session().context


class SyncContextSession:
    """What ``with context_session(ctx) as s`` gives: blocking calls on the context."""

    def __init__(self, scheduler: _Scheduler, session: SyncSession) -> None:
        self._scheduler = scheduler
        self._session = session

    @property
    def context(self) -> ExecutionContext:
        """The session's context."""
        return self._session.context

    def run(self, fn: Callable[..., Any] | None = None, *args: Any, **kwargs: Any) -> Any:
        """Run ``fn(*args, **kwargs)`` on the context's queue and block for its result."""
        sched = self._scheduler
        return sched.thread.call(sched.run_now, self._session, fn, args, kwargs)

    def submit(
        self, fn: Callable[..., Any] | None = None, *args: Any, **kwargs: Any
    ) -> ConcurrentFuture[Any]:
        """Queue ``fn`` on the context's queue; returns at once with a future of its result."""
        sched = self._scheduler
        sub = sched.call_soon(sched.submit_now, self._session, fn, args, kwargs)
        return sched.schedule(_outcome(sub))

    def allocate(self, nbytes: int, *, timeout: float | None = None) -> Buffer:
        """Allocate through the context's budget, blocking while the pressure policy waits."""
        return self._session.allocate(nbytes, timeout=timeout)

    def free(self, buffer: Buffer) -> None:
        """Give a buffer back (works inside a memory-pressure handler too)."""
        self._session.free(buffer)

    def __repr__(self) -> str:
        return f"<SyncContextSession on {self.context.name!r}>"


class AsyncContextSession:
    """What ``async with context_session(ctx) as s`` gives: awaitable calls on the context.

    Usable from any event loop: each call crosses to the runtime's loop and back.
    """

    def __init__(self, scheduler: _Scheduler, session: Session) -> None:
        self._scheduler = scheduler
        self._session = session

    @property
    def context(self) -> ExecutionContext:
        """The session's context."""
        return self._session.context

    async def run(self, fn: Callable[..., Any] | None = None, *args: Any, **kwargs: Any) -> Any:
        """Run ``fn(*args, **kwargs)`` on the context's queue; returns its result."""
        sched = self._scheduler
        return await sched.bridge(sched.run_now(self._session, fn, args, kwargs))

    def submit(
        self, fn: Callable[..., Any] | None = None, *args: Any, **kwargs: Any
    ) -> asyncio.Future[Any]:
        """Queue ``fn`` on the context's queue; returns a future of its result at once.

        Work is queued in the order of the calls.
        """
        sched = self._scheduler
        return asyncio.wrap_future(sched.schedule(sched.run_now(self._session, fn, args, kwargs)))

    async def allocate(self, nbytes: int, *, timeout: float | None = None) -> Buffer:
        """Allocate through the context's budget, waiting while the pressure policy waits."""
        return await self._scheduler.bridge(self._session.allocate(nbytes, timeout=timeout))

    def free(self, buffer: Buffer) -> None:
        """Give a buffer back; it never waits for memory or work."""
        self._scheduler.call_soon(self._session.free, buffer)

    def __repr__(self) -> str:
        return f"<AsyncContextSession on {self.context.name!r}>"


class ContextSession:
    """A session on one context, entered with ``with`` or with ``async with``.

    Inside, :func:`current_context` names the context, and the session's allocations are
    charged to its budget. Buffers still held when it ends are freed.
    """

    def __init__(self, ctx: ExecutionContext) -> None:
        self.context = ctx
        self._scheduler: _Scheduler | None = None
        self._sync: SyncSession | None = None
        self._async: Session | None = None
        self._token: contextvars.Token[SyncContextSession | AsyncContextSession | None] | None
        self._token = None

    def _claim(self) -> _Scheduler:
        if self._scheduler is not None:
            raise RuntimeError(f"this session on {self.context.name!r} was already entered")
        self._scheduler = _scheduler_of(self.context)
        return self._scheduler

    def __enter__(self) -> SyncContextSession:
        sched = self._claim()
        session = sched.runtime.session_sync(self.context)
        session.__enter__()
        self._sync = session
        handle = SyncContextSession(sched, session)
        self._token = _current.set(handle)
        return handle

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._sync is not None and self._token is not None
        _current.reset(self._token)
        self._sync.__exit__(exc_type, exc, tb)

    async def __aenter__(self) -> AsyncContextSession:
        sched = self._claim()
        session = sched.runtime.session(self.context)
        await sched.bridge(session.__aenter__())
        self._async = session
        handle = AsyncContextSession(sched, session)
        self._token = _current.set(handle)
        return handle

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._scheduler is not None and self._async is not None
        assert self._token is not None
        _current.reset(self._token)
        await self._scheduler.bridge(self._async.__aexit__(exc_type, exc, tb))

    def __repr__(self) -> str:
        return f"<ContextSession on {self.context.name!r}>"


def context_session(ctx: ExecutionContext) -> ContextSession:
    """A session on ``ctx``: ``with context_session(ctx) as s`` or ``async with ...``."""
    return ContextSession(ctx)


async def _outcome(sub: Submission) -> Any:
    return await sub


# -- streams and events ----------------------------------------------------------------


class Stream:
    """A context's queue, seen as the guide's stream."""

    def __init__(self, scheduler: _Scheduler, ctx: ExecutionContext) -> None:
        self._scheduler = scheduler
        self.context = ctx

    @property
    def id(self) -> int:
        """The queue's axis: unique to this context's timeline."""
        return self.context.queue.axis

    @property
    def name(self) -> str:
        """The queue's name (the context's)."""
        return self.context.queue.name

    def synchronize(self, timeout: float | None = None) -> None:
        """Block until every piece of work queued on the context so far has finished.

        Raises:
            TimeoutError: not finished within ``timeout`` seconds.
        """
        self._scheduler.thread.call(self._drained, timeout)

    def query(self) -> bool:
        """Whether every piece of work queued so far has finished."""
        rt = self._scheduler.runtime
        return self._scheduler.call_soon(lambda: rt.is_complete(self.context.death_frontier()))

    async def _drained(self, timeout: float | None) -> None:
        # The frontier the queue reaches once its queued work has run, read on the loop.
        frontier = self.context.death_frontier()
        await asyncio.wait_for(self._scheduler.runtime.wait_completed(frontier), timeout)

    def __repr__(self) -> str:
        return f"<Stream {self.name!r} id={self.id:#x}>"


def get_stream(ctx: ExecutionContext) -> Stream:
    """The stream of ``ctx``: its own asyncfront queue, at its tier's priority."""
    sched = _scheduler_of(ctx)
    return Stream(sched, ctx)


@dataclass(frozen=True)
class Event:
    """A point in a context's queue: ``semaphore`` reaches ``value`` once work before it ran."""

    context: ExecutionContext
    semaphore: TimelineSemaphore
    value: int

    def query(self) -> bool:
        """Whether the work before the event has finished."""
        return self.semaphore.value >= self.value

    def synchronize(self, timeout: float | None = None) -> None:
        """Block the calling thread until the work before the event has finished."""
        self.semaphore.wait_sync(self.value, timeout)


def record_event(ctx: ExecutionContext) -> Event:
    """Mark the end of the work queued on ``ctx`` so far; other contexts may wait for it."""
    sched = _scheduler_of(ctx)
    return sched.call_soon(sched.record_now, ctx)


def wait_event(ctx: ExecutionContext, event: Event) -> None:
    """Make the next work queued on ``ctx`` start only after ``event``.

    Like a stream waiting for an event, this holds the context's queue, not the calling
    thread: use :meth:`Event.synchronize` to block the caller.
    """
    sched = _scheduler_of(ctx)
    _scheduler_of(event.context)
    sched.call_soon(sched.add_wait, ctx, event)


# -- the low-level API: memory pool ----------------------------------------------------


class QuotaExceededError(MemoryError):
    """A :class:`MemoryPool` cannot fit a block under its quota, with the numbers."""


@dataclass(frozen=True)
class MemoryPoolStats:
    """A snapshot of a :class:`MemoryPool`.

    Attributes:
        quota: bytes the pool may hold, live and cached together.
        allocated_bytes: bytes asked for by live, resident blocks.
        cached_bytes: bytes of freed blocks kept for reuse.
        active_blocks: live, resident blocks.
        free_blocks: freed blocks kept for reuse.
        evicted_blocks: live blocks evicted to make room.
        allocations / reuses / cache_drops / evictions / rehydrations: counters.
    """

    quota: int
    allocated_bytes: int
    cached_bytes: int
    active_blocks: int
    free_blocks: int
    evicted_blocks: int
    allocations: int
    reuses: int
    cache_drops: int
    evictions: int
    rehydrations: int


class MemoryBlock:
    """A block handed out by a :class:`MemoryPool`."""

    __slots__ = ("_pool", "_region", "freed", "id", "size")

    def __init__(self, pool: MemoryPool, block_id: int, size: int) -> None:
        self._pool = pool
        self.id = block_id
        self.size = size
        self._region: Block | None = None
        self.freed = False

    @property
    def evicted(self) -> bool:
        """Whether the block was evicted to make room (touch it to bring it back)."""
        return self._region is None and not self.freed

    @property
    def offset(self) -> int | None:
        """Where the block lies in the pool's quota, None while evicted or freed."""
        return None if self._region is None else self._region.offset

    def __repr__(self) -> str:
        state = "freed" if self.freed else "evicted" if self.evicted else f"at {self.offset}"
        return f"<MemoryBlock {self.id} {self.size} bytes {state}>"


class MemoryPool:
    """Blocks under a byte quota; freed blocks are cached for reuse, eviction is LRU.

    The quota is the capacity of an :class:`asyncfront.memory.BufferPool`, which places
    every block (alignment, offsets, coalescing of what is given back). Above it sits an
    LRU cache layer, because what this pool promises is not what the BufferPool tracks:
    a freed block stays whole and charged to the quota until it is reused by a request
    of the same span or dropped (least recently freed first) to make room, while the
    BufferPool merges what it is given back into anonymous free ranges; and live blocks
    are kept in recency order (allocate and :meth:`touch` refresh it) so that, with
    ``enable_eviction``, the least recently used one is evicted first. Cached and live
    blocks share the one address space, so their bytes never exceed the quota. As in
    the guide, nothing is defragmented: a request may fail when free space is scattered.

    Thread-safe.
    """

    def __init__(self, quota: int, enable_eviction: bool = False, *, alignment: int = 256) -> None:
        self.quota = quota
        self.enable_eviction = enable_eviction
        self._space = BufferPool(quota, alignment=alignment, name="MemoryPool")
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._live: OrderedDict[int, MemoryBlock] = OrderedDict()  # least recent first
        self._cached: OrderedDict[int, Block] = OrderedDict()  # least recently freed first
        self._evicted: dict[int, MemoryBlock] = {}
        self._allocations = 0
        self._reuses = 0
        self._cache_drops = 0
        self._evictions = 0
        self._rehydrations = 0

    def allocate(self, size: int) -> MemoryBlock:
        """A block of ``size`` bytes: a cached one of the same span, else fresh space.

        Raises:
            QuotaExceededError: it does not fit even after dropping every cached block
                (and evicting every other live block, when eviction is enabled).
            ValueError: ``size`` is not positive.
        """
        if size <= 0:
            raise ValueError(f"MemoryPool: block size must be > 0 bytes, got {size}")
        with self._lock:
            block = MemoryBlock(self, next(self._ids), size)
            self._place(block)
            self._live[block.id] = block
            self._allocations += 1
            return block

    def free(self, block: MemoryBlock) -> None:
        """Give a block back; its memory stays cached for reuse, counted in the quota."""
        with self._lock:
            self._check(block)
            block.freed = True
            if block.id in self._evicted:
                del self._evicted[block.id]
                return
            del self._live[block.id]
            region, block._region = block._region, None
            assert region is not None
            self._cached[block.id] = region

    def touch(self, block: MemoryBlock) -> None:
        """Mark ``block`` as just used; an evicted block is brought back first.

        Raises:
            QuotaExceededError: an evicted block no longer fits.
        """
        with self._lock:
            self._check(block)
            if block.id in self._evicted:
                self._place(block)
                del self._evicted[block.id]
                self._live[block.id] = block
                self._rehydrations += 1
            else:
                self._live.move_to_end(block.id)

    def drop_cached(self) -> int:
        """Drop every cached block; returns the bytes given back to the quota."""
        with self._lock:
            dropped = 0
            while self._cached:
                dropped += self._drop_oldest()
            return dropped

    def stats(self) -> MemoryPoolStats:
        """A frozen snapshot of the pool."""
        with self._lock:
            return MemoryPoolStats(
                quota=self.quota,
                allocated_bytes=sum(block.size for block in self._live.values()),
                cached_bytes=sum(region.span for region in self._cached.values()),
                active_blocks=len(self._live),
                free_blocks=len(self._cached),
                evicted_blocks=len(self._evicted),
                allocations=self._allocations,
                reuses=self._reuses,
                cache_drops=self._cache_drops,
                evictions=self._evictions,
                rehydrations=self._rehydrations,
            )

    def __repr__(self) -> str:
        s = self.stats()
        return (
            f"<MemoryPool quota={s.quota:,} allocated={s.allocated_bytes:,} "
            f"cached={s.cached_bytes:,} blocks={s.active_blocks} free_blocks={s.free_blocks} "
            f"evicted={s.evicted_blocks} eviction={'on' if self.enable_eviction else 'off'}>"
        )

    # -- under the lock ----------------------------------------------------------------

    def _check(self, block: MemoryBlock) -> None:
        if block._pool is not self:
            raise ValueError(f"{block!r} belongs to another MemoryPool")
        if block.freed:
            raise ValueError(f"{block!r} was already freed")

    def _place(self, block: MemoryBlock) -> None:
        """Give ``block`` memory: reuse, fresh space, dropping cached blocks, evicting."""
        mask = self._space.alignment - 1
        span = (block.size + mask) & ~mask
        for block_id in reversed(self._cached):  # the most recently freed is warmest
            if block.size <= self._cached[block_id].span <= span:
                block._region = self._cached.pop(block_id)
                self._reuses += 1
                return
        while True:
            placed = self._space.try_allocate(block.size)
            if isinstance(placed, Block):
                block._region = placed
                return
            if self._cached:
                self._drop_oldest()
            elif self.enable_eviction and self._live:
                self._evict_oldest()
            else:
                allocated = sum(b.size for b in self._live.values())
                raise QuotaExceededError(
                    f"MemoryPool asked {block.size:,} bytes: quota {self.quota:,}, "
                    f"{allocated:,} allocated, no cached block left to drop and "
                    + ("no other live block to evict" if self.enable_eviction else "eviction off")
                )

    def _drop_oldest(self) -> int:
        _, region = self._cached.popitem(last=False)
        self._space.free(region, _NOTHING_PENDING)
        self._cache_drops += 1
        return region.span

    def _evict_oldest(self) -> None:
        _, victim = self._live.popitem(last=False)
        region, victim._region = victim._region, None
        assert region is not None
        self._space.free(region, _NOTHING_PENDING)
        self._evicted[victim.id] = victim
        self._evictions += 1


# -- the low-level API: admission of tasks and partitions ------------------------------

_NOTHING_PENDING = Frontier()
"""Blocks go back to the address space with nothing in flight: reusable at once."""

_SHARE_UNITS = 1_000_000
"""Fractional shares are booked in millionths: sums of 0.5 + 0.5 are exact."""


class _Book:
    """One resource's admissions in a :class:`asyncfront.MemoryLedger`.

    Bytes are booked as they are; fractional shares (compute, bandwidth) in millionths,
    so sums of shares are compared exactly up to that tolerance.
    """

    def __init__(self, resource: str, total: float, *, share: bool) -> None:
        if total < 0:
            raise ValueError(f"total {resource} must be >= 0, got {total}")
        self.resource = resource
        self.scale = _SHARE_UNITS if share else 1
        self.ledger = MemoryLedger(resource, self.units(total))

    def units(self, amount: float) -> int:
        return round(amount * self.scale)

    def show(self, units: int) -> str:
        return format_bytes(units) if self.scale == 1 else f"{units / self.scale:g}"

    @property
    def available(self) -> int:
        """Units nobody has reserved or is using."""
        return self.ledger.available

    def take(self, key: str, qos: QoS, amount: float, base: float | None = None) -> str | None:
        """Admit ``key`` at ``qos`` and charge ``amount``; None, or why it does not fit."""
        need = self.units(amount)
        try:
            self.ledger.admit(key, qos, need, None if base is None else self.units(base))
        except AdmissionError:
            return self._refusal(need)
        if self.ledger.try_charge(key, need) is not Charge.GRANTED:
            self.ledger.close(key)
            return self._refusal(need)
        return None

    def give_back(self, key: str) -> None:
        used = self.ledger.usage(key).used
        if used:
            self.ledger.release(key, used)
        self.ledger.close(key)

    def _refusal(self, need: int) -> str:
        return (
            f"needs {self.show(need)} of {self.resource}, {self.show(self.available)} of "
            f"{self.show(self.ledger.capacity)} left"
        )


@dataclass(frozen=True)
class QosTaskMeta:
    """A task asking for admission: its tier, memory and bandwidth share.

    Build one with :meth:`guaranteed`, :meth:`burstable` or :meth:`best_effort`.
    """

    id: str
    name: str
    qos: QoS
    memory: int
    base_memory: int | None = None
    bandwidth: float = 0.0

    @classmethod
    def guaranteed(cls, id: str, name: str, memory: int, *, bandwidth: float = 0.0) -> QosTaskMeta:
        """A task whose ``memory`` (and ``bandwidth``) is reserved for it alone."""
        return cls(id, name, QoS.GUARANTEED, memory, None, bandwidth)

    @classmethod
    def burstable(
        cls, id: str, name: str, memory: int, base_memory: int, *, bandwidth: float = 0.0
    ) -> QosTaskMeta:
        """A task reserving ``base_memory`` and borrowing the rest of ``memory`` from spare."""
        return cls(id, name, QoS.BURSTABLE, memory, base_memory, bandwidth)

    @classmethod
    def best_effort(
        cls, id: str, name: str, memory: int = 0, *, bandwidth: float = 0.0
    ) -> QosTaskMeta:
        """A task running on spare memory and bandwidth only."""
        return cls(id, name, QoS.BEST_EFFORT, memory, None, bandwidth)


@dataclass(frozen=True)
class QosEvaluation:
    """The answer to a task's admission: ``admitted``, its ``priority`` and the ``reason``."""

    task_id: str
    qos: QoS
    admitted: bool
    priority: int
    reason: str


class QosPolicyEvaluator:
    """Admits tasks by tier against total memory and bandwidth, until they are released.

    Guaranteed tasks reserve what they ask; Burstable tasks reserve their base and borrow
    the rest from spare capacity; BestEffort tasks only borrow spare capacity. A task is
    admitted when that fits now, whatever else has been admitted before, and everything
    it held returns on :meth:`release`. Thread-safe.
    """

    def __init__(self, total_memory: int, total_bandwidth: float = 1.0) -> None:
        self._memory = _Book("memory", total_memory, share=False)
        self._bandwidth = _Book("bandwidth", total_bandwidth, share=True)
        self._admitted: dict[str, QosTaskMeta] = {}
        self._lock = threading.Lock()

    def evaluate(self, task: QosTaskMeta) -> QosEvaluation:
        """Admit ``task`` if its tier's share fits now; the result says why or why not.

        Raises:
            ValueError: a task with this id is already admitted.
        """
        with self._lock:
            if task.id in self._admitted:
                raise ValueError(f"task {task.id!r} is already admitted; release it first")
            why = self._memory.take(task.id, task.qos, task.memory, task.base_memory)
            if why is None:
                why = self._bandwidth.take(task.id, task.qos, task.bandwidth)
                if why is not None:
                    self._memory.give_back(task.id)
            tier = task.qos.value
            if why is not None:
                reason = f"{tier} task {task.id!r} ({task.name}) not admitted: {why}"
                return QosEvaluation(task.id, task.qos, False, task.qos.priority, reason)
            self._admitted[task.id] = task
            reason = (
                f"{tier} task {task.id!r} ({task.name}) admitted with "
                f"{format_bytes(task.memory)} and bandwidth {task.bandwidth:g}"
            )
            return QosEvaluation(task.id, task.qos, True, task.qos.priority, reason)

    def release(self, task_id: str) -> None:
        """Return everything an admitted task holds.

        Raises:
            KeyError: no admitted task has this id.
        """
        with self._lock:
            if self._admitted.pop(task_id, None) is None:
                raise KeyError(f"no admitted task {task_id!r}; admitted: {sorted(self._admitted)}")
            self._memory.give_back(task_id)
            self._bandwidth.give_back(task_id)

    @property
    def admitted(self) -> tuple[str, ...]:
        """Ids of the admitted tasks, in admission order."""
        with self._lock:
            return tuple(self._admitted)

    @property
    def available_memory(self) -> int:
        """Bytes neither reserved nor borrowed by an admitted task."""
        return self._memory.available

    @property
    def available_bandwidth(self) -> float:
        """Bandwidth share neither reserved nor borrowed by an admitted task."""
        return self._bandwidth.available / _SHARE_UNITS

    def __repr__(self) -> str:
        return (
            f"<QosPolicyEvaluator admitted={len(self._admitted)} "
            f"memory left {format_bytes(self.available_memory)} "
            f"bandwidth left {self.available_bandwidth:g}>"
        )


@dataclass(frozen=True)
class PartitionConfig:
    """What a :class:`PartitionManager` divides: memory bytes, compute and bandwidth shares."""

    total_memory: int
    total_compute: float = 1.0
    total_bandwidth: float = 1.0


@dataclass(frozen=True)
class PartitionLimits:
    """A partition's reservations, built with ``PartitionLimits().memory(n).compute(f)``.

    A limit left unset reserves nothing.
    """

    memory_limit: int | None = None
    compute_limit: float | None = None
    bandwidth_limit: float | None = None

    def memory(self, nbytes: int) -> PartitionLimits:
        """These limits with ``nbytes`` of memory reserved."""
        if nbytes < 0:
            raise ValueError(f"a memory limit must be >= 0 bytes, got {nbytes}")
        return dataclasses.replace(self, memory_limit=nbytes)

    def compute(self, share: float) -> PartitionLimits:
        """These limits with a ``share`` of compute reserved."""
        if share < 0:
            raise ValueError(f"a compute share must be >= 0, got {share}")
        return dataclasses.replace(self, compute_limit=share)

    def bandwidth(self, share: float) -> PartitionLimits:
        """These limits with a ``share`` of memory bandwidth reserved."""
        if share < 0:
            raise ValueError(f"a bandwidth share must be >= 0, got {share}")
        return dataclasses.replace(self, bandwidth_limit=share)


@dataclass(frozen=True)
class PartitionInfo:
    """One partition and its limits."""

    id: str
    name: str
    memory_limit: int | None
    compute_limit: float | None
    bandwidth_limit: float | None


class PartitionManager:
    """Divides a device into partitions whose reservations never add up past the totals.

    Each limit is a guaranteed reservation in its resource's
    :class:`asyncfront.MemoryLedger`; compute and bandwidth shares are compared in
    millionths, so ``0.5 + 0.5`` fits a total of ``1.0``. Thread-safe.
    """

    def __init__(self, config: PartitionConfig) -> None:
        self.config = config
        self._memory = _Book("memory", config.total_memory, share=False)
        self._compute = _Book("compute", config.total_compute, share=True)
        self._bandwidth = _Book("bandwidth", config.total_bandwidth, share=True)
        self._partitions: dict[str, PartitionInfo] = {}
        self._lock = threading.Lock()

    def create_partition(
        self, id: str, name: str, limits: PartitionLimits | None = None
    ) -> PartitionInfo:
        """Reserve ``limits`` for a new partition.

        Raises:
            asyncfront.AdmissionError: a reservation does not fit what is left.
            ValueError: the id is taken.
        """
        limits = limits if limits is not None else PartitionLimits()
        with self._lock:
            if id in self._partitions:
                raise ValueError(f"a partition {id!r} already exists")
            taken: list[_Book] = []
            for book, amount in (
                (self._memory, limits.memory_limit),
                (self._compute, limits.compute_limit),
                (self._bandwidth, limits.bandwidth_limit),
            ):
                why = book.take(id, QoS.GUARANTEED, amount or 0)
                if why is not None:
                    for done in taken:
                        done.give_back(id)
                    raise AdmissionError(f"partition {id!r} ({name}) does not fit: {why}")
                taken.append(book)
            info = PartitionInfo(
                id, name, limits.memory_limit, limits.compute_limit, limits.bandwidth_limit
            )
            self._partitions[id] = info
            return info

    def get_partition(self, id: str) -> PartitionInfo:
        """The partition called ``id``.

        Raises:
            KeyError: no such partition (the message lists the known ones).
        """
        try:
            return self._partitions[id]
        except KeyError:
            raise KeyError(f"no partition {id!r}; known: {sorted(self._partitions)}") from None

    def remove_partition(self, id: str) -> None:
        """Delete a partition and return its reservations."""
        with self._lock:
            self.get_partition(id)
            del self._partitions[id]
            for book in (self._memory, self._compute, self._bandwidth):
                book.give_back(id)

    def partitions(self) -> tuple[PartitionInfo, ...]:
        """Every partition, in creation order."""
        return tuple(self._partitions.values())

    @property
    def available_memory(self) -> int:
        """Bytes no partition reserves."""
        return self._memory.available

    @property
    def available_compute(self) -> float:
        """Compute share no partition reserves."""
        return self._compute.available / _SHARE_UNITS

    def __repr__(self) -> str:
        return (
            f"<PartitionManager partitions={len(self._partitions)} memory left "
            f"{format_bytes(self.available_memory)} compute left {self.available_compute:g}>"
        )
