"""Execution contexts with QoS tiers, memory budgets, sessions and memory pressure.

A context is one model's (or tenant's) share of a device: its own queue, whose
priority follows its tier, and a memory budget in the device's :class:`MemoryLedger`.
Sessions run work on the context's queue and allocate through its budget. When an
allocation does not fit, the pressure policy runs in order: evict BestEffort
contexts' memory, ask the ``on_memory_pressure`` handlers, then wait for memory to be
freed, or raise :class:`MemoryBudgetError` when waiting cannot help.
"""

from __future__ import annotations

import asyncio
import heapq
import inspect
import itertools
import threading
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from ._budget import Charge, ContextUsage, MemoryBudgetError, MemoryLedger, QoS, format_bytes
from ._frontier import Frontier
from ._queue import DeviceQueue, Submission

if TYPE_CHECKING:
    from ._runtime import Runtime
    from .devices._base import Device

__all__ = (
    "Buffer",
    "ContextStatistics",
    "ExecutionContext",
    "MemoryPressureHandler",
    "Session",
    "SyncSession",
    "WorkingMemory",
)

T = TypeVar("T")

_NOTHING_TO_FREE = "the device's memory is reserved or in use and nothing pending can free it"

MemoryPressureHandler = Callable[["ExecutionContext", int, int], "bool | Awaitable[bool]"]
"""``handler(context, requested, available)``: free memory if you can; truthy means retry."""

EvictionHandler = Callable[[int], "int | Awaitable[int]"]
"""``handler(nbytes_wanted)``: release some of this context's memory; returns bytes freed."""


class Buffer:
    """Device memory held by a context, charged to its budget until freed."""

    __slots__ = ("_block", "context", "freed", "nbytes", "owner")

    def __init__(
        self, context: ExecutionContext, nbytes: int, block: Any, owner: object = None
    ) -> None:
        self.context = context
        self.nbytes = nbytes
        self._block = block
        self.owner = owner  # the session that allocated it, if any
        self.freed = False

    @property
    def device(self) -> str:
        """The name of the device the buffer lives on."""
        return self.context.device.name

    @property
    def block(self) -> Any:
        """The pool block backing the buffer (None on devices without a pool)."""
        return self._block

    @property
    def offset(self) -> int | None:
        """Offset in the device pool, when pooled."""
        return getattr(self._block, "offset", None)

    def tensor(self, dtype: Any = None, shape: Any = None) -> Any:
        """The buffer's memory as the device's array type (a ``torch.Tensor`` view).

        With no ``dtype``, the raw bytes; with ``dtype`` and no ``shape``, as many
        elements as fit, flat. Valid until the buffer is freed.

        Raises:
            TypeError: the device only accounts for memory (no addressable buffers).
            ValueError: the buffer was freed.
        """
        if self.freed:
            raise ValueError(f"{self!r} was freed")
        if self._block is None:
            raise TypeError(f"device {self.device!r} keeps no pool: {self!r} has no memory")
        return self.context.device.view(self._block, dtype, shape)

    def __repr__(self) -> str:
        state = "freed" if self.freed else "live"
        return (
            f"<Buffer {format_bytes(self.nbytes)} on {self.device!r} of context "
            f"{self.context.name!r} offset={self.offset} {state}>"
        )


class WorkingMemory:
    """Working memory reserved in a context's budget for one piece of work.

    Made by ``submit(..., memory=nbytes)`` (through
    :meth:`MemoryManager.reserve_working`): the bytes count in the context's usage and
    the device's commitment from when the work's waits are met until it finishes. The
    work allocates the memory itself (PyTorch's allocator); the reservation is what the
    budget promises it, so pool blocks and working memory together never exceed what
    the device holds.
    """

    __slots__ = ("context", "name", "nbytes", "released")

    def __init__(self, context: ExecutionContext, nbytes: int, name: str) -> None:
        self.context = context
        self.nbytes = nbytes
        self.name = name
        self.released = False

    def __repr__(self) -> str:
        state = "released" if self.released else "held"
        return (
            f"<WorkingMemory {format_bytes(self.nbytes)} for {self.name!r} of context "
            f"{self.context.name!r} {state}>"
        )


@dataclass(frozen=True)
class ContextStatistics:
    """A snapshot of one context."""

    name: str
    device: str
    qos: QoS
    priority: int
    used: int
    reserved: int
    limit: int
    live_buffers: int
    allocations: int
    waits: int
    evictions: int


class ExecutionContext:
    """A share of one device: a queue at the tier's priority and a memory budget.

    Created by :meth:`asyncfront.Runtime.create_context`.
    """

    def __init__(
        self,
        runtime: Runtime,
        name: str,
        device: Device,
        qos: QoS,
        max_memory: int,
        base_memory: int | None,
        reserved: int,
        queue: DeviceQueue,
    ) -> None:
        self.runtime = runtime
        self.name = name
        self.device = device
        self.qos = qos
        self.max_memory = max_memory
        self.base_memory = base_memory
        self.reserved = reserved
        self.queue = queue
        self._buffers: dict[Buffer, None] = {}
        self._evictors: list[EvictionHandler] = []
        self._allocations = 0
        self._waits = 0
        self._evictions = 0
        self.closed = False

    @property
    def priority(self) -> int:
        """The priority of the context's queue (from its tier)."""
        return self.queue.priority

    def on_evict(self, handler: EvictionHandler) -> EvictionHandler:
        """Register how this context gives memory back under pressure (usable as a decorator).

        Called with the bytes another context needs; it frees what it can (for example
        drops cached activations) and returns the bytes it freed.
        """
        self._evictors.append(handler)
        return handler

    def usage(self) -> ContextUsage:
        """``(used, reserved, limit)`` bytes."""
        return self.runtime.usage(self)

    def death_frontier(self) -> Frontier:
        """The frontier the context's queue reaches once all its submitted work has run."""
        q = self.queue
        epoch = q.submitted_epoch
        return q._materialize(q._base, epoch) if epoch else q._base

    def statistics(self) -> ContextStatistics:
        """A frozen snapshot of the context's budget and activity."""
        used, reserved, limit = self.usage()
        return ContextStatistics(
            name=self.name,
            device=self.device.name,
            qos=self.qos,
            priority=self.priority,
            used=used,
            reserved=reserved,
            limit=limit,
            live_buffers=len(self._buffers),
            allocations=self._allocations,
            waits=self._waits,
            evictions=self._evictions,
        )

    def __repr__(self) -> str:
        used, reserved, limit = self.usage()
        return (
            f"<ExecutionContext {self.name!r} {self.qos.value} on {self.device.name!r} "
            f"used {format_bytes(used)} reserved {format_bytes(reserved)} "
            f"limit {format_bytes(limit)}>"
        )


class _DeviceMemory:
    """Budgets, the pool and the memory waiters of one device."""

    def __init__(self, device: Device, ledger: MemoryLedger) -> None:
        self.device = device
        self.ledger = ledger
        # (-priority, sequence, context, nbytes, owner, future) of allocations waiting
        self.waiters: list[
            tuple[int, int, ExecutionContext, int, object, asyncio.Future[None]]
        ] = []
        # bytes charged per owner (a session, or the context for owner-less calls)
        self.held: dict[object, int] = {}

    def hold(self, owner: object, nbytes: int) -> None:
        """Record bytes charged on behalf of ``owner`` (negative to release)."""
        held = self.held.get(owner, 0) + nbytes
        if held:
            self.held[owner] = held
        else:
            self.held.pop(owner, None)


class MemoryManager:
    """Admission, budgets and pressure handling for every device of a runtime."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self._devices: dict[str, _DeviceMemory] = {}
        self._contexts: dict[str, ExecutionContext] = {}
        self._handlers: list[MemoryPressureHandler] = []
        self._seq = itertools.count()

    # -- admission -----------------------------------------------------------------

    def _memory(self, device: Device) -> _DeviceMemory:
        memory = self._devices.get(device.name)
        if memory is None:
            capacity = device.memory_capacity or 0
            memory = _DeviceMemory(device, MemoryLedger(device.name, capacity))
            self._devices[device.name] = memory
        return memory

    def create_context(
        self,
        name: str,
        device: Device,
        max_memory: int,
        base_memory: int | None,
        qos: QoS,
    ) -> ExecutionContext:
        if name in self._contexts:
            raise ValueError(f"a context named {name!r} already exists")
        memory = self._memory(device)
        reserved = memory.ledger.admit(name, qos, max_memory, base_memory)
        queue = self.runtime.queue(device, priority=qos.priority, name=name)
        ctx = ExecutionContext(
            self.runtime, name, device, qos, max_memory, base_memory, reserved, queue
        )
        queue.context = ctx
        self._contexts[name] = ctx
        self._log("context_admitted", ctx, reserved=reserved, limit=max_memory)
        return ctx

    def context(self, name: str) -> ExecutionContext:
        try:
            return self._contexts[name]
        except KeyError:
            raise KeyError(f"no context named {name!r}; known: {sorted(self._contexts)}") from None

    @property
    def contexts(self) -> tuple[ExecutionContext, ...]:
        return tuple(self._contexts.values())

    def close_context(self, ctx: ExecutionContext) -> None:
        """Free the context's buffers and return its reservation."""
        for buf in list(ctx._buffers):
            self.free(buf)
        self._memory(ctx.device).ledger.close(ctx.name)
        del self._contexts[ctx.name]
        ctx.closed = True
        self._wake(self._memory(ctx.device))

    def usage(self, ctx: ExecutionContext) -> ContextUsage:
        return self._memory(ctx.device).ledger.usage(ctx.name)

    def available(self, device: Device) -> int:
        return self._memory(device).ledger.available

    def on_memory_pressure(self, handler: MemoryPressureHandler) -> MemoryPressureHandler:
        self._handlers.append(handler)
        return handler

    # -- allocation ----------------------------------------------------------------

    async def allocate(
        self,
        ctx: ExecutionContext,
        nbytes: int,
        *,
        timeout: float | None = None,
        owner: object = None,
        requester: Frontier | None = None,
    ) -> Buffer:
        """Charge ``nbytes`` to ``ctx`` (running the pressure policy if needed), then place it.

        ``owner`` (a session) marks the buffer: waiting for memory only makes sense while
        somebody other than the owner holds memory that could be freed. ``requester`` is
        the frontier of the work that will first touch the memory; by default the context
        queue's, right for work submitted there later. Memory written by other queues
        must say so (``Frontier()`` when unknown: reuse then waits for completion).
        """
        if ctx.closed:
            raise RuntimeError(f"context {ctx.name!r} is closed")
        if not isinstance(nbytes, int) or nbytes <= 0:
            raise ValueError(f"context {ctx.name!r}: allocation size must be > 0, got {nbytes!r}")
        memory = self._memory(ctx.device)
        if owner is None:
            owner = ctx
        await self._charge(ctx, memory, nbytes, timeout, owner)
        pool = ctx.device.memory
        block = None
        if pool is not None:
            try:
                block = await pool.allocate(
                    nbytes, ctx.queue.frontier if requester is None else requester
                )
            except BaseException:
                self._release(memory, ctx, nbytes, owner)
                raise
        buf = Buffer(ctx, nbytes, block, owner)
        ctx._buffers[buf] = None
        ctx._allocations += 1
        return buf

    async def reserve_working(
        self,
        ctx: ExecutionContext,
        nbytes: int,
        name: str = "work",
        *,
        timeout: float | None = None,
    ) -> WorkingMemory:
        """Charge ``nbytes`` of working memory to ``ctx`` without placing a block.

        The charge waits, evicts and is refused exactly like :meth:`allocate`'s; nothing
        is taken from the pool (the work's own allocator provides the memory).

        Raises:
            MemoryBudgetError: the budget cannot hold it (nothing is charged).
        """
        if ctx.closed:
            raise RuntimeError(f"context {ctx.name!r} is closed")
        if type(nbytes) is not int or nbytes <= 0:
            raise ValueError(f"context {ctx.name!r}: working memory must be > 0, got {nbytes!r}")
        working = WorkingMemory(ctx, nbytes, name)
        await self._charge(ctx, self._memory(ctx.device), nbytes, timeout, working)
        return working

    def release_working(self, working: WorkingMemory) -> None:
        """Return a reservation made by :meth:`reserve_working`."""
        if working.released:
            raise ValueError(f"{working!r} was already released")
        working.released = True
        ctx = working.context
        self._release(self._memory(ctx.device), ctx, working.nbytes, working)

    def free(self, buf: Buffer, death: Frontier | None = None) -> None:
        """Return a buffer; the pool reuses it once ``death`` (default: queue tail) is safe."""
        if buf.freed:
            raise ValueError(f"{buf!r} was already freed")
        ctx = buf.context
        if buf not in ctx._buffers:
            raise ValueError(f"{buf!r} does not belong to context {ctx.name!r}")
        if death is None:
            death = ctx.death_frontier()
        pool = ctx.device.memory
        if pool is not None and buf._block is not None:
            pool.free(buf._block, death)
        buf.freed = True
        del ctx._buffers[buf]
        self._release(self._memory(ctx.device), ctx, buf.nbytes, buf.owner)

    def _release(
        self, memory: _DeviceMemory, ctx: ExecutionContext, nbytes: int, owner: object
    ) -> None:
        memory.ledger.release(ctx.name, nbytes)
        memory.hold(owner, -nbytes)
        self._wake(memory)

    async def _charge(
        self,
        ctx: ExecutionContext,
        memory: _DeviceMemory,
        nbytes: int,
        timeout: float | None,
        owner: object,
    ) -> None:
        ledger = memory.ledger
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        asked_handlers = False
        while True:
            if memory.waiters and self._ahead_of(memory, ctx):
                charge = Charge.NO_SPACE  # queue behind more urgent waiters: no overtaking
            else:
                charge = ledger.try_charge(ctx.name, nbytes)
            if charge is Charge.GRANTED:
                memory.hold(owner, nbytes)
                return
            if charge is Charge.OVER_LIMIT:
                # Only frees within the context help: other sessions' buffers, once they
                # end, as long as the request fits beside what this owner keeps.
                if not self._context_can_free(memory, ctx, nbytes, owner):
                    raise _refusal(ctx, ledger, nbytes, "over the context's max_memory")
            else:
                self._log(
                    "memory_pressure",
                    ctx,
                    requested=nbytes,
                    available=ledger.available_to(ctx.name),
                )
                if await self._evict_for(ctx, memory, nbytes):
                    continue
                if not asked_handlers and self._handlers:
                    asked_handlers = True
                    if await self._ask_handlers(ctx, nbytes, ledger.available_to(ctx.name)):
                        continue
                if not self._can_free(memory, owner):
                    raise _refusal(ctx, ledger, nbytes, _NOTHING_TO_FREE)
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                raise _refusal(ctx, ledger, nbytes, f"no memory was freed within {timeout} s")
            self._log("memory_wait", ctx, requested=nbytes)
            ctx._waits += 1
            granted = await self._wait_for_memory(memory, ctx, nbytes, owner, remaining)
            if granted:
                return
            asked_handlers = False

    def _ahead_of(self, memory: _DeviceMemory, ctx: ExecutionContext) -> bool:
        """Whether a waiter of higher priority than ``ctx`` is waiting for device memory.

        A waiter held back by its own context's limit is not waiting for the device.
        """
        return any(
            -prio > ctx.priority
            and not fut.done()
            and not _over_limit(memory.ledger, other, nbytes)
            for prio, _, other, nbytes, _, fut in memory.waiters
        )

    def _context_can_free(
        self, memory: _DeviceMemory, ctx: ExecutionContext, nbytes: int, owner: object
    ) -> bool:
        """Whether ``nbytes`` fits ``ctx``'s limit once its other owners free their memory."""
        used, _, limit = memory.ledger.usage(ctx.name)
        own = memory.held.get(owner, 0)
        return used > own and own + nbytes <= limit

    async def _wait_for_memory(
        self,
        memory: _DeviceMemory,
        ctx: ExecutionContext,
        nbytes: int,
        owner: object,
        timeout: float | None,
    ) -> bool:
        """Queue for memory; True when the wake-up already charged it to ``ctx``."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (-ctx.priority, next(self._seq), ctx, nbytes, owner, fut)
        heapq.heappush(memory.waiters, entry)
        try:
            await asyncio.wait_for(asyncio.shield(fut), timeout)
            return True
        except TimeoutError:
            if fut.done() and not fut.cancelled():
                return True  # granted as the timeout fired
            fut.cancel()
            return False
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self._release(memory, ctx, nbytes, owner)  # granted but nobody will use it
            else:
                fut.cancel()
            raise

    def _wake(self, memory: _DeviceMemory) -> None:
        """Charge waiting allocations that now fit, most urgent first, oldest first."""
        waiters = memory.waiters
        if not waiters:
            return
        ledger = memory.ledger
        keep = []
        blocked_priority: int | None = None
        for entry in sorted(waiters, key=lambda e: (e[0], e[1])):
            prio, _, ctx, nbytes, owner, fut = entry
            if fut.done():
                continue
            if blocked_priority is not None and prio > blocked_priority:
                keep.append(entry)  # a more urgent waiter is still blocked: no overtaking
                continue
            charge = ledger.try_charge(ctx.name, nbytes)
            if charge is Charge.GRANTED:
                memory.hold(owner, nbytes)
                fut.set_result(None)
            else:
                keep.append(entry)
                # A waiter over its own context's limit holds back nobody else.
                if charge is Charge.NO_SPACE and blocked_priority is None:
                    blocked_priority = prio
        heapq.heapify(keep)
        memory.waiters = keep

    def _can_free(self, memory: _DeviceMemory, owner: object) -> bool:
        """Whether anyone but ``owner`` holds memory on the device that could be freed."""
        return any(holder is not owner for holder in memory.held)

    async def _evict_for(self, ctx: ExecutionContext, memory: _DeviceMemory, nbytes: int) -> bool:
        """Ask lower-tier contexts (BestEffort first) to give memory back for ``ctx``."""
        if ctx.qos is QoS.BEST_EFFORT:
            return False
        victims = [
            other
            for other in self._contexts.values()
            if other.device is memory.device
            and other is not ctx
            and other._evictors
            and other._buffers
            and (
                other.qos is QoS.BEST_EFFORT
                or (other.qos is QoS.BURSTABLE and ctx.qos is QoS.GUARANTEED)
            )
        ]
        victims.sort(key=lambda c: c.priority)
        freed_any = False
        for victim in victims:
            for evictor in victim._evictors:
                freed = evictor(nbytes)
                if inspect.isawaitable(freed):
                    freed = await freed
                if freed:
                    freed_any = True
                    victim._evictions += 1
                    self._log("evict", victim, requested=nbytes, freed=freed, for_context=ctx.name)
            if freed_any and memory.ledger.available_to(ctx.name) >= nbytes:
                break
        return freed_any

    async def _ask_handlers(self, ctx: ExecutionContext, nbytes: int, available: int) -> bool:
        retry = False
        for handler in self._handlers:
            answer = handler(ctx, nbytes, available)
            if inspect.isawaitable(answer):
                answer = await answer
            self._log("pressure_handler", ctx, requested=nbytes, retry=bool(answer))
            retry = retry or bool(answer)
        return retry

    def _log(self, event: str, ctx: ExecutionContext, **fields: Any) -> None:
        rt = self.runtime
        if rt._log_info:
            rt._log.info(event, context=ctx.name, device=ctx.device.name, **fields)


class Session:
    """Work and memory on one context; ``async with rt.session(ctx) as s``.

    Buffers a session allocated and did not free are freed when it ends, each with the
    context queue's frontier as death frontier.
    """

    def __init__(self, runtime: Runtime, context: ExecutionContext) -> None:
        self.runtime = runtime
        self.context = context
        self._buffers: dict[Buffer, None] = {}
        self._open = False

    async def __aenter__(self) -> Session:
        if self.context.closed:
            raise RuntimeError(f"context {self.context.name!r} is closed")
        self._open = True
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Free what the session still holds; later calls raise."""
        self._open = False
        for buf in list(self._buffers):
            if not buf.freed:
                self.runtime._memory.free(buf)
        self._buffers.clear()

    def _check(self) -> None:
        if not self._open:
            raise RuntimeError(f"session on context {self.context.name!r} is not open")

    def submit(
        self,
        fn: Callable[..., Any] | None = None,
        *args: Any,
        cost: float | None = None,
        **kwargs: Any,
    ) -> Submission:
        """Queue work on the context's queue and return the submission at once.

        Accepts ``waits=``, ``signals=``, ``name=`` and ``memory=`` (working memory
        reserved from the context's budget while it runs) like
        :meth:`DeviceQueue.submit`.
        """
        self._check()
        return self.context.queue.submit(fn, *args, cost=cost, **kwargs)

    async def run(
        self,
        fn: Callable[..., Any] | None = None,
        *args: Any,
        cost: float | None = None,
        **kwargs: Any,
    ) -> Any:
        """Run work on the context's queue and return its result (``memory=`` as in submit)."""
        return await self.submit(fn, *args, cost=cost, **kwargs)

    async def allocate(self, nbytes: int, *, timeout: float | None = None) -> Buffer:
        """Allocate through the context's budget (see the pressure policy in the module doc)."""
        self._check()
        buf = await self.runtime._memory.allocate(self.context, nbytes, timeout=timeout, owner=self)
        self._buffers[buf] = None
        return buf

    def free(self, buf: Buffer, death: Frontier | None = None) -> None:
        """Free a buffer; its death frontier is the context queue's frontier by default."""
        self.runtime._memory.free(buf, death)
        self._buffers.pop(buf, None)

    @property
    def frontier(self) -> Frontier:
        """The frontier of the context's queue (its most recently started work)."""
        return self.context.queue.frontier

    def __repr__(self) -> str:
        state = "open" if self._open else "closed"
        return f"<Session on {self.context.name!r} {state} buffers={len(self._buffers)}>"


class SyncSession:
    """A session for synchronous code on another thread than the runtime's loop.

    ``with rt.session_sync(ctx) as s: s.run(fn)`` blocks the calling thread while the
    work runs on the runtime's loop.
    """

    def __init__(self, runtime: Runtime, context: ExecutionContext) -> None:
        self._session = Session(runtime, context)
        self._loop = runtime._require_loop()
        if _on_thread_of(self._loop):
            raise RuntimeError(
                "session_sync() blocks its thread and cannot run on the runtime's own loop "
                "thread; use 'async with rt.session(ctx)'"
            )

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        if _on_thread_of(self._loop):
            # Blocking the loop thread on work scheduled onto that same loop never ends.
            coro.close()
            raise RuntimeError(
                f"session on context {self.context.name!r}: this call blocks until the "
                "runtime's loop answers, so it cannot run on that loop's thread (inside a "
                "memory-pressure or eviction handler); only free() and submit() can"
            )
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def __enter__(self) -> SyncSession:
        self._call(self._session.__aenter__())
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._call(self._session.__aexit__(exc_type, exc, tb))

    @property
    def context(self) -> ExecutionContext:
        """The session's context."""
        return self._session.context

    def run(
        self, fn: Callable[..., Any] | None = None, *args: Any, cost: float | None = None, **kw: Any
    ) -> Any:
        """Run work on the context's queue and block until its result."""
        return self._call(self._session.run(fn, *args, cost=cost, **kw))

    def submit(
        self, fn: Callable[..., Any] | None = None, *args: Any, cost: float | None = None, **kw: Any
    ) -> Submission:
        """Queue work and return its submission (await it from the loop, or call ``run``).

        Works on the runtime's loop thread too, for example inside a memory-pressure handler.
        """
        if _on_thread_of(self._loop):
            return self._session.submit(fn, *args, cost=cost, **kw)

        async def submit() -> Submission:
            return self._session.submit(fn, *args, cost=cost, **kw)

        return self._call(submit())

    def allocate(self, nbytes: int, *, timeout: float | None = None) -> Buffer:
        """Allocate through the context's budget, blocking while the policy waits."""
        return self._call(self._session.allocate(nbytes, timeout=timeout))

    def free(self, buf: Buffer, death: Frontier | None = None) -> None:
        """Free a buffer.

        Works on the runtime's loop thread too: memory-pressure and eviction handlers run
        there and are where memory is most often given back.
        """
        if _on_thread_of(self._loop):
            self._session.free(buf, death)
            return

        async def free() -> None:
            self._session.free(buf, death)

        self._call(free())


def _refusal(
    ctx: ExecutionContext, ledger: MemoryLedger, nbytes: int, reason: str
) -> MemoryBudgetError:
    """The error for a refused allocation, with the context's numbers as they stand."""
    used, _, limit = ledger.usage(ctx.name)
    return MemoryBudgetError(ctx.name, nbytes, limit, used, ledger.available, reason)


def _over_limit(ledger: MemoryLedger, ctx: ExecutionContext, nbytes: int) -> bool:
    used, _, limit = ledger.usage(ctx.name)
    return used + nbytes > limit


def _on_thread_of(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return getattr(loop, "_thread_id", None) == threading.get_ident()
