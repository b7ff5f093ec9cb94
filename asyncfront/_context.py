"""Execution contexts with QoS tiers, memory budgets, sessions and memory pressure.

A context is one model's (or tenant's) share of a device: its own queue, whose
priority follows its tier, and a memory budget in the device's :class:`MemoryLedger`.
Sessions run work on the context's queue and allocate through its budget: one
synchronous decision charges the block's span and places it in the pool together.
An allocation that no amount of freeing by others could serve (over its limit, above
what the other contexts' reservations leave, or larger than any extent the requester's
own blocks leave in a fragmented pool) raises :class:`MemoryBudgetError` at once.
Otherwise, when it does not fit, the pressure policy runs in order: evict BestEffort
contexts' memory, ask the ``on_memory_pressure`` handlers, then wait, until a free or
a change of holders lets it fit, makes it impossible, or its deadline passes.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import enum
import inspect
import itertools
import threading
import weakref
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from ._blocking import RuntimeCrashedError, check_timeout, valid_timeout, wait_blocking
from ._budget import Charge, ContextUsage, MemoryBudgetError, MemoryLedger, QoS, format_bytes
from ._frontier import Frontier
from ._queue import DeviceQueue, Submission
from .memory._pool import Block, BufferPool, Wait, WouldWaitError
from .memory._tensors import resolve_dtype

if TYPE_CHECKING:
    from ._runtime import Runtime
    from .devices._base import Device

__all__ = (
    "Buffer",
    "ContextStatistics",
    "ExecutionContext",
    "ForeignBufferError",
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


class ForeignBufferError(ValueError):
    """A buffer (or context) was handed to a runtime, context or session it is not of.

    Freeing it there would corrupt two budgets at once, so the call is refused and
    nothing changes.
    """


class Buffer:
    """Device memory held by a context, charged to its budget until freed."""

    __slots__ = ("_block", "_charge", "context", "freed", "nbytes", "owner")

    def __init__(
        self,
        context: ExecutionContext,
        nbytes: int,
        block: Any,
        owner: object = None,
        *,
        charge: int | None = None,
    ) -> None:
        self.context = context
        self.nbytes = nbytes
        self._block = block
        self._charge = nbytes if charge is None else charge
        self.owner = owner  # the session that allocated it, if any
        self.freed = False

    @property
    def charged(self) -> int:
        """The bytes charged to the context's budget: the pool block's span, when pooled.

        At least ``nbytes``: the pool rounds every block up to its alignment, and the
        budget counts what the pool really holds.
        """
        return self._charge

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

        With no ``dtype``, the raw bytes; with ``dtype`` (a ``torch.dtype`` or its name,
        ``"float32"`` or ``"torch.float32"``) and no ``shape``, as many elements as fit,
        flat. Valid until the buffer is freed.

        Raises:
            TypeError: the device only accounts for memory (no addressable buffers), or
                ``dtype`` is neither a torch dtype nor the name of one.
            ValueError: the buffer was freed.
        """
        if self.freed:
            raise ValueError(f"{self!r} was freed")
        if self._block is None:
            raise TypeError(f"device {self.device!r} keeps no pool: {self!r} has no memory")
        if dtype is not None:
            dtype = resolve_dtype(dtype)
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
    """A snapshot of one context.

    ``waits`` counts the times its requests queued for memory; ``waiting`` is how many
    of them are queued now.
    """

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
    waiting: int = 0


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
        # Not owning: the runtime owns its contexts (no cycle keeps a closed one alive).
        self._runtime_ref = weakref.ref(runtime)
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
    def runtime(self) -> Runtime:
        """The runtime the context belongs to.

        Raises:
            RuntimeError: that runtime was closed and no longer exists.
        """
        runtime = self._runtime_ref()
        if runtime is None:
            raise RuntimeError(f"context {self.name!r}: its runtime was closed and freed")
        return runtime

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
            waiting=self.runtime._memory.waiting(self),
        )

    def __repr__(self) -> str:
        if self._runtime_ref() is None:
            return f"<ExecutionContext {self.name!r} {self.qos.value} of a freed runtime>"
        used, reserved, limit = self.usage()
        return (
            f"<ExecutionContext {self.name!r} {self.qos.value} on {self.device.name!r} "
            f"used {format_bytes(used)} reserved {format_bytes(reserved)} "
            f"limit {format_bytes(limit)}>"
        )


class _Status(enum.Enum):
    """Where one attempt to serve a request left it."""

    GRANTED = "granted"  # charged (and placed): the request is served
    REFUSED = "refused"  # it can never be served as things stand: ``error`` says why
    OVER_LIMIT = "over_limit"  # over its context's max_memory: the context's other owners
    NO_SPACE = "no_space"  # the device is committed: others' frees or evictions help
    FRAGMENTED = "fragmented"  # the budget fits but no free extent does: others' frees help
    EPOCHS = "epochs"  # a block fits once ``pending``'s epochs complete
    WORKING = "working_share"  # the device's working-memory share is taken: other work's ends


_WAITING_FOR_DEVICE = (_Status.NO_SPACE, _Status.FRAGMENTED)


class _Request:
    """One allocation (or reservation) being served: what it asks and where it stands."""

    __slots__ = (
        "block",
        "charge",
        "ctx",
        "error",
        "future",
        "key",
        "nbytes",
        "owner",
        "pending",
        "place",
        "priority",
        "requester",
        "seq",
        "status",
    )

    def __init__(
        self,
        ctx: ExecutionContext,
        nbytes: int,
        charge: int,
        owner: object,
        requester: Frontier | None,
        place: bool,
    ) -> None:
        self.ctx = ctx
        self.nbytes = nbytes
        self.charge = charge  # what the budget is charged: the block's span when placed
        self.owner = owner
        self.requester = requester
        self.place = place
        self.priority = ctx.queue.priority
        # arrival order among waiters, taken when it first waits and kept across retries
        self.seq: int | None = None
        self.status: _Status | None = None
        self.block: Block | None = None
        self.pending: Wait | None = None
        self.error: Exception | None = None  # why it was refused
        self.future: asyncio.Future[None] | None = None
        self.key = (ctx.name, owner)  # the holder it charges: its owner within its context


class _DeviceMemory:
    """Budgets, the pool and the memory waiters of one device."""

    def __init__(self, device: Device, ledger: MemoryLedger) -> None:
        self.device = device
        self.ledger = ledger
        # requests waiting for memory, most urgent first, then in arrival order
        self.waiters: list[_Request] = []
        # bytes charged per holder: (context name, owner), the owner being a session or
        # whatever else allocates (the context itself for owner-less calls)
        self.held: dict[tuple[str, object], int] = {}
        # bumped on every change that may let a waiter through (frees, closes, admissions)
        self.version = 0
        # the share of the device only working memory may use (its pool holds the rest),
        # and the working memory reserved in it now
        self.working_capacity: int | None = device.working_capacity
        self.working = 0
        # blocks a decision granted whose buffer is not made yet, with their holder: the
        # holder keeps them as it keeps its live buffers' blocks
        self.unclaimed: dict[Block, tuple[str, object]] = {}

    def hold(self, key: tuple[str, object], nbytes: int) -> None:
        """Record bytes charged on behalf of a holder (negative to release)."""
        held = self.held.get(key, 0) + nbytes
        if held:
            self.held[key] = held
        else:
            self.held.pop(key, None)

    def enqueue(self, request: _Request) -> None:
        """Queue a waiting request in urgency order (higher priority, then older, first)."""
        bisect.insort(self.waiters, request, key=_urgency)

    def dequeue(self, request: _Request) -> None:
        """Remove a request that stopped waiting (served, refused, timed out, cancelled)."""
        with contextlib.suppress(ValueError):
            self.waiters.remove(request)


def _urgency(request: _Request) -> tuple[int, int]:
    assert request.seq is not None
    return (-request.priority, request.seq)


class MemoryManager:
    """Admission, budgets and pressure handling for every device of a runtime.

    Every request for memory, a pool block (:meth:`allocate`) or bytes of budget alone
    (:meth:`reserve`), goes through one synchronous decision, :meth:`_attempt`, that
    either serves it, refuses it when no amount of freeing by others could (the numbers
    in a :class:`MemoryBudgetError`), or says what it waits for. Waiting requests are
    decided again, most urgent first, whenever memory frees or holders change.
    """

    def __init__(self, runtime: Runtime) -> None:
        # Not owning: the runtime owns its memory manager (no cycle keeps either alive).
        self._runtime_ref = weakref.ref(runtime)
        self._devices: dict[str, _DeviceMemory] = {}
        self._contexts: dict[str, ExecutionContext] = {}
        self._handlers: list[MemoryPressureHandler] = []
        self._seq = itertools.count()

    @property
    def runtime(self) -> Runtime:
        """The runtime whose memory this manages.

        Raises:
            RuntimeError: that runtime was closed and no longer exists.
        """
        runtime = self._runtime_ref()
        if runtime is None:
            raise RuntimeError("the memory manager's runtime was closed and freed")
        return runtime

    # -- admission -----------------------------------------------------------------

    def _memory(self, device: Device) -> _DeviceMemory:
        memory = self._devices.get(device.name)
        if memory is None:
            memory = self._devices[device.name] = self._new_memory(device)
        return memory

    @staticmethod
    def _new_memory(device: Device) -> _DeviceMemory:
        capacity = device.memory_capacity or 0
        return _DeviceMemory(device, MemoryLedger(device.name, capacity))

    def create_context(
        self,
        name: str,
        device: Device,
        max_memory: int,
        base_memory: int | None,
        qos: QoS | str,
    ) -> ExecutionContext:
        # Everything is checked before anything changes: a refused context leaves no
        # account, queue or name behind.
        if not isinstance(name, str):
            raise TypeError(f"a context name must be a str, got {name!r} ({type(name).__name__})")
        if not name:
            raise ValueError("a context name must not be empty")
        tier = QoS.coerce(qos)
        if name in self._contexts:
            raise ValueError(f"a context named {name!r} already exists")
        memory = self._devices.get(device.name) or self._new_memory(device)
        memory.ledger.check_admission(name, tier, max_memory, base_memory)
        queue = self.runtime.queue(device, priority=tier.priority, name=name)
        reserved = memory.ledger.admit(name, tier, max_memory, base_memory)
        self._devices.setdefault(device.name, memory)
        ctx = ExecutionContext(
            self.runtime, name, device, tier, max_memory, base_memory, reserved, queue
        )
        queue.context = ctx
        self._contexts[name] = ctx
        self._log("context_admitted", ctx, reserved=reserved, limit=max_memory)
        if reserved:
            self._wake(memory)  # a new reservation may leave some waiters no way to fit
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
        """Free the context's buffers, return its reservation and close its queue.

        Closing a closed context does nothing.

        Raises:
            ValueError: ``ctx`` is not a context of this runtime.
        """
        if ctx.closed:
            return
        if self._contexts.get(ctx.name) is not ctx:
            raise ValueError(
                f"context {ctx.name!r} does not belong to this runtime; its contexts are "
                f"{sorted(self._contexts)}"
            )
        for buf in list(ctx._buffers):
            self.free(buf)
        self._memory(ctx.device).ledger.close(ctx.name)
        del self._contexts[ctx.name]
        ctx.closed = True
        ctx.queue.close()
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
        """Charge ``ctx`` for a block of ``nbytes`` and place it, as one decision.

        The budget is charged what the pool really holds (the block's span, alignment
        included). ``owner`` (a session) marks the buffer: waiting only makes sense for
        what somebody other than the owner could free. ``requester`` is the frontier of
        the work that will first touch the memory; by default the context queue's, right
        for work submitted there later. Memory written by other queues must say so
        (``Frontier()`` when unknown: reuse then waits for completion).

        Raises:
            TypeError: ``nbytes`` is not an ``int``.
            ValueError: ``nbytes`` is not positive, or ``timeout`` is negative.
            MemoryBudgetError: it can never be served as things stand (over the
                context's ``max_memory``, more than the device could ever spare for it,
                or a pool too fragmented for any free by others to help), or not within
                ``timeout`` seconds.
        """
        request = self._request(ctx, nbytes, timeout, owner, requester, place=True)
        await self._acquire(request, timeout)
        if request.block is not None:
            self._memory(ctx.device).unclaimed.pop(request.block, None)
        buf = Buffer(ctx, nbytes, request.block, request.owner, charge=request.charge)
        ctx._buffers[buf] = None
        ctx._allocations += 1
        return buf

    async def reserve(
        self,
        ctx: ExecutionContext,
        nbytes: int,
        *,
        timeout: float | None = None,
        owner: object = None,
    ) -> None:
        """Charge ``nbytes`` to ``ctx``'s budget without taking a pool block.

        For memory the budget must count but the pool does not place (a submission's
        working memory). It waits, evicts, asks the pressure handlers and fails exactly
        like :meth:`allocate`; :meth:`unreserve` with the same ``owner`` gives it back.

        Raises:
            TypeError: ``nbytes`` is not an ``int``.
            ValueError: ``nbytes`` is not positive, or ``timeout`` is negative.
            MemoryBudgetError: as for :meth:`allocate`.
        """
        request = self._request(ctx, nbytes, timeout, owner, None, place=False)
        await self._acquire(request, timeout)

    def unreserve(self, ctx: ExecutionContext, nbytes: int, *, owner: object = None) -> None:
        """Give back ``nbytes`` that :meth:`reserve` charged to ``ctx`` for ``owner``.

        Raises:
            ValueError: ``owner`` holds fewer bytes of ``ctx``'s budget.
        """
        memory = self._memory(ctx.device)
        key = (ctx.name, ctx if owner is None else owner)
        held = memory.held.get(key, 0)
        if not 0 < nbytes <= held:
            raise ValueError(
                f"context {ctx.name!r}: cannot give back {nbytes!r} bytes, the owner holds {held:,}"
            )
        self._release(memory, ctx, nbytes, key)

    def charge_for(self, ctx: ExecutionContext, nbytes: int) -> int:
        """The bytes an allocation of ``nbytes`` on ``ctx`` is charged: its block's span."""
        pool: BufferPool | None = ctx.device.memory
        if pool is None or not 0 < nbytes <= pool.capacity:
            return nbytes
        return pool.footprint(nbytes)

    def waiting(self, ctx: ExecutionContext) -> int:
        """How many of ``ctx``'s requests are queued for memory now."""
        memory = self._devices.get(ctx.device.name)
        return 0 if memory is None else sum(1 for r in memory.waiters if r.ctx is ctx)

    def placement_shortfall(self, ctx: ExecutionContext, nbytes: int) -> int:
        """Bytes to free beside a free extent before ``ctx``'s pool can place ``nbytes``.

        Zero when a free extent fits it now (or the device keeps no pool). Memory that
        frees elsewhere in a fragmented pool does not help, so whoever frees memory for
        the request (a pager, weight residency) must free at least this much.
        """
        pool: BufferPool | None = ctx.device.memory
        if pool is None or not 0 < nbytes <= pool.capacity:
            return 0
        return max(0, nbytes - pool.largest_free_extent())

    def _request(
        self,
        ctx: ExecutionContext,
        nbytes: int,
        timeout: float | None,
        owner: object,
        requester: Frontier | None,
        *,
        place: bool,
    ) -> _Request:
        """Check a request's arguments and say what it charges; changes nothing."""
        if self._contexts.get(ctx.name) is not ctx:
            if ctx.closed:
                raise RuntimeError(f"context {ctx.name!r} is closed")
            raise ForeignBufferError(
                f"context {ctx.name!r} belongs to another runtime than this one"
            )
        if type(nbytes) is not int and (not isinstance(nbytes, int) or isinstance(nbytes, bool)):
            raise TypeError(
                f"context {ctx.name!r}: allocation size must be an int number of bytes, "
                f"got {nbytes!r} ({type(nbytes).__name__})"
            )
        if nbytes <= 0:
            raise ValueError(f"context {ctx.name!r}: allocation size must be > 0, got {nbytes!r}")
        if timeout is not None and not timeout >= 0:
            raise ValueError(f"context {ctx.name!r}: timeout must be >= 0 seconds, got {timeout}")
        charge = nbytes
        pool: BufferPool | None = ctx.device.memory if place else None
        if pool is not None and nbytes <= pool.capacity:
            charge = min(pool._aligned(nbytes), pool.capacity)  # pool.footprint, checked
        return _Request(ctx, nbytes, charge, ctx if owner is None else owner, requester, place)

    async def reserve_working(
        self,
        ctx: ExecutionContext,
        nbytes: int,
        name: str = "work",
        *,
        timeout: float | None = None,
    ) -> WorkingMemory:
        """Charge ``nbytes`` of working memory to ``ctx`` without placing a block.

        The charge waits, evicts and is refused exactly like :meth:`allocate`'s (it is a
        :meth:`reserve` owned by the returned record); nothing is taken from the pool
        (the work's own allocator provides the memory).

        Raises:
            TypeError / ValueError: ``nbytes`` is not a positive int.
            MemoryBudgetError: the budget cannot hold it (nothing is charged).
        """
        working = WorkingMemory(ctx, nbytes, name)
        await self.reserve(ctx, nbytes, timeout=timeout, owner=working)
        return working

    def release_working(self, working: WorkingMemory) -> None:
        """Return a reservation made by :meth:`reserve_working`."""
        if working.released:
            raise ValueError(f"{working!r} was already released")
        working.released = True
        self.unreserve(working.context, working.nbytes, owner=working)

    def free(self, buf: Buffer, death: Frontier | None = None) -> None:
        """Return a buffer; the pool reuses it once ``death`` (default: queue tail) is safe.

        Raises:
            TypeError: ``buf`` is not a :class:`Buffer`.
            ForeignBufferError: the buffer belongs to another runtime.
            ValueError: it was already freed, or is not its context's.
        """
        if not isinstance(buf, Buffer):
            raise TypeError(f"free() takes a Buffer, got {buf!r} ({type(buf).__name__})")
        ctx = buf.context
        if ctx.runtime is not self.runtime:
            raise ForeignBufferError(
                f"{buf!r} belongs to another runtime; free it through a session of that one"
            )
        if buf.freed:
            raise ValueError(f"{buf!r} was already freed")
        if buf not in ctx._buffers:
            raise ValueError(f"{buf!r} does not belong to context {ctx.name!r}")
        if death is None:
            death = ctx.death_frontier()
        pool = ctx.device.memory
        if pool is not None and buf._block is not None:
            pool.free(buf._block, death)
        buf.freed = True
        del ctx._buffers[buf]
        self._release(self._memory(ctx.device), ctx, buf._charge, (ctx.name, buf.owner))

    def _release(
        self, memory: _DeviceMemory, ctx: ExecutionContext, nbytes: int, key: tuple[str, object]
    ) -> None:
        memory.ledger.release(ctx.name, nbytes)
        if memory.working_capacity is not None and isinstance(key[1], WorkingMemory):
            memory.working -= nbytes
        memory.hold(key, -nbytes)
        self._wake(memory)

    # -- the decision --------------------------------------------------------------

    def _attempt(self, memory: _DeviceMemory, request: _Request, *, newcomer: bool) -> _Status:
        """Serve ``request`` now if possible, else say why not; synchronous and loop-free.

        A granted request is charged (and holds its block); any other outcome changes
        nothing but the request's own fields. A ``newcomer`` (not yet queued) queues
        behind more urgent requests waiting for the device: no overtaking.
        """
        ledger = memory.ledger
        ctx = request.ctx
        if self._contexts.get(ctx.name) is not ctx:
            request.error = RuntimeError(
                f"context {ctx.name!r} was closed while its allocation of "
                f"{format_bytes(request.nbytes)} waited"
            )
            return _Status.REFUSED
        key = request.key
        if newcomer and memory.waiters and self._ahead_of(memory, request):
            charge = Charge.NO_SPACE  # queue behind more urgent waiters: no overtaking
        else:
            charge = ledger.try_charge(ctx.name, request.charge)
        pool = ctx.device.memory if request.place else None
        if charge is not Charge.GRANTED:
            # Only a request the budget cannot take now may be one it can never take:
            # above its ceiling, or larger than any extent its holder's blocks leave.
            kept = memory.held.get(key, 0)
            if request.charge > ledger.ceiling(ctx.name, kept):
                request.error = self._impossible(memory, request, kept)
                return _Status.REFUSED
            error = None if pool is None else self._fragmentation(memory, request, pool)
            if error is not None:
                request.error = error
                return _Status.REFUSED
            return _Status.OVER_LIMIT if charge is Charge.OVER_LIMIT else _Status.NO_SPACE
        if pool is None:
            share = memory.working_capacity
            if share is not None and isinstance(request.owner, WorkingMemory):
                if memory.working + request.charge > share:
                    ledger.release(ctx.name, request.charge)
                    if request.charge > share:
                        request.error = self._over_share(memory, request)
                        return _Status.REFUSED
                    return _Status.WORKING
                memory.working += request.charge
            memory.hold(key, request.charge)
            return _Status.GRANTED
        requester = ctx.queue.frontier if request.requester is None else request.requester
        decision = pool.try_allocate(request.nbytes, requester)
        if type(decision) is Block:
            if decision._span < request.charge:
                # The block at the end of a capacity that is not a multiple of the
                # alignment holds less than a full span: charge what it holds.
                ledger.release(ctx.name, request.charge - decision._span)
                request.charge = decision._span
            memory.hold(key, request.charge)
            request.block = decision
            memory.unclaimed[decision] = key
            return _Status.GRANTED
        ledger.release(ctx.name, request.charge)  # nothing placed: charge nothing
        if isinstance(decision, Wait):
            request.pending = decision
            return _Status.EPOCHS
        error = self._fragmentation(memory, request, pool)
        if error is not None:
            request.error = error
            return _Status.REFUSED
        return _Status.FRAGMENTED

    def _over_share(self, memory: _DeviceMemory, request: _Request) -> MemoryBudgetError:
        """The refusal of working memory larger than the device leaves to working memory."""
        share = memory.working_capacity
        assert share is not None
        pool = request.ctx.device.memory
        segment = 0 if pool is None else pool.capacity
        return _refusal(
            request.ctx,
            memory.ledger,
            request.nbytes,
            f"working memory can never fit: device {memory.device.name!r} leaves "
            f"{format_bytes(share)} of its {format_bytes(memory.ledger.capacity)} to working "
            f"memory (its pool's segment holds the other {format_bytes(segment)})",
        )

    def _fragmentation(
        self, memory: _DeviceMemory, request: _Request, pool: BufferPool
    ) -> MemoryBudgetError | None:
        """The refusal of a request no free by others could give a fitting extent, or None.

        The requester's own live blocks stay where they are while it waits; every other
        block could be freed.
        """
        ctx = request.ctx
        kept_blocks = [
            buf._block
            for buf in ctx._buffers
            if buf.owner is request.owner and buf._block is not None
        ]
        # Blocks just granted to the same holder, whose buffers are not made yet.
        kept_blocks += [block for block, key in memory.unclaimed.items() if key == request.key]
        largest = pool.largest_extent(kept_blocks)
        if request.nbytes <= largest:
            return None
        stats = pool.statistics()
        return _refusal(
            ctx,
            memory.ledger,
            request.nbytes,
            f"the pool {pool.name!r} is fragmented: "
            f"{format_bytes(stats.bytes_cached + stats.bytes_fresh)} are free but the largest "
            f"free extent is {format_bytes(pool.largest_free_extent())}, and the requester's "
            f"own {len(kept_blocks)} live blocks leave at most {format_bytes(largest)} "
            f"contiguous however much others free",
        )

    def _check_possible(self, memory: _DeviceMemory, request: _Request) -> Exception | None:
        """Why ``request`` can never be served as things stand, or None if it can be."""
        if self._contexts.get(request.ctx.name) is not request.ctx:
            return RuntimeError(f"context {request.ctx.name!r} was closed")
        kept = memory.held.get(request.key, 0)
        if request.charge > memory.ledger.ceiling(request.ctx.name, kept):
            return self._impossible(memory, request, kept)
        pool = request.ctx.device.memory if request.place else None
        return None if pool is None else self._fragmentation(memory, request, pool)

    def _refuse_impossible(self, memory: _DeviceMemory, keys: set[tuple[str, object]]) -> None:
        """Refuse the waiting requests of ``keys`` that their holders' grants made impossible.

        A holder's own grant raises what it keeps, so its other waiting requests may no
        longer fit however much others free.
        """
        for request in list(memory.waiters):
            future = request.future
            if request.key in keys and future is not None and not future.done():
                error = self._check_possible(memory, request)
                if error is not None:
                    request.error = error
                    request.status = _Status.REFUSED
                    future.set_result(None)

    def _impossible(self, memory: _DeviceMemory, request: _Request, kept: int) -> MemoryBudgetError:
        """The refusal of a request above its ceiling, saying which bound it exceeds."""
        ledger = memory.ledger
        ctx = request.ctx
        limit = ledger.usage(ctx.name).limit
        charged = (
            ""
            if request.charge == request.nbytes
            else f" (a block of {format_bytes(request.charge)} with the pool's alignment)"
        )
        if kept + request.charge > limit:
            held = f", {format_bytes(kept)} of it held by the requester" if kept else ""
            reason = f"over the context's max_memory{charged}{held}"
        else:
            others = ledger.reserved_by_others(ctx.name)
            reason = (
                f"it can never fit{charged}: {format_bytes(ledger.capacity)} on the device "
                f"less {format_bytes(others)} reserved by other contexts leaves at most "
                f"{format_bytes(ledger.ceiling(ctx.name, kept))} for it"
                + (f" beside the {format_bytes(kept)} the requester holds" if kept else "")
            )
        return _refusal(ctx, ledger, request.nbytes, reason)

    def _ahead_of(self, memory: _DeviceMemory, request: _Request) -> bool:
        """Whether a more urgent request waits for the device (not for its own limit)."""
        priority = request.priority
        return any(
            other.priority > priority
            and other.status in _WAITING_FOR_DEVICE
            and other.future is not None
            and not other.future.done()
            for other in memory.waiters
        )

    def _wake(self, memory: _DeviceMemory) -> None:
        """Decide every waiting request again, most urgent first, oldest first.

        Those that now fit are served, those that can no longer fit ever are refused,
        and those whose block now only waits for epochs go to wait for them. A request
        blocked for the device holds back the less urgent ones (no overtaking), but only
        while it can fit.
        """
        memory.version += 1
        waiters = memory.waiters
        if not waiters:
            return
        blocked: int | None = None
        granted: set[tuple[str, object]] = set()
        for request in list(waiters):
            future = request.future
            if future is None or future.done():
                continue
            if blocked is not None and request.priority < blocked:
                error = self._check_possible(memory, request)
                if error is not None:
                    request.error = error
                    request.status = _Status.REFUSED
                    future.set_result(None)
                continue
            status = self._attempt(memory, request, newcomer=False)
            previous, request.status = request.status, status
            if status in (_Status.GRANTED, _Status.REFUSED) or (
                status is _Status.EPOCHS and previous is not _Status.EPOCHS
            ):
                future.set_result(None)
                if status is _Status.GRANTED:
                    granted.add(request.key)
            elif status in _WAITING_FOR_DEVICE and blocked is None:
                blocked = request.priority
        if granted:
            self._refuse_impossible(memory, granted)

    # -- acting on the decision ----------------------------------------------------

    async def _acquire(self, request: _Request, timeout: float | None) -> None:
        """Serve ``request``: evict, ask the pressure handlers, wait, or raise."""
        ctx = request.ctx
        memory = self._memory(ctx.device)
        loop = asyncio.get_running_loop()
        # A deadline on the loop clock: a remaining time recomputed by subtraction can
        # shrink to a few ulps that never expire on a virtual clock.
        deadline = None if timeout is None else loop.time() + timeout
        asked: int | None = None  # memory.version when the handlers were last asked
        while True:
            status = request.status = self._attempt(memory, request, newcomer=True)
            if status is _Status.GRANTED:
                if memory.waiters:
                    self._refuse_impossible(memory, {request.key})
                return
            if status is _Status.REFUSED:
                assert request.error is not None
                raise request.error
            if status in _WAITING_FOR_DEVICE:
                self._log(
                    "memory_pressure",
                    ctx,
                    requested=request.nbytes,
                    available=memory.ledger.available_to(ctx.name),
                    fragmented=status is _Status.FRAGMENTED,
                )
                if await self._evict_for(ctx, memory, request.charge):
                    continue
                if self._handlers and asked != memory.version:
                    # Asked again only once memory changed since: a handler that answers
                    # "retry" without freeing anything cannot make this loop spin.
                    asked = memory.version
                    available = memory.ledger.available_to(ctx.name)
                    if await self._ask_handlers(ctx, request.nbytes, available):
                        continue
                if status is _Status.NO_SPACE and not self._others_hold(memory, request):
                    raise _refusal(ctx, memory.ledger, request.nbytes, _NOTHING_TO_FREE)
            self._log("memory_wait", ctx, requested=request.nbytes, reason=status.value)
            ctx._waits += 1
            if await self._wait(memory, request, deadline, timeout):
                return

    async def _wait(
        self,
        memory: _DeviceMemory,
        request: _Request,
        deadline: float | None,
        timeout: float | None,
    ) -> bool:
        """Queue ``request`` until a decision serves it (True) or calls for a retry (False).

        Raises:
            MemoryBudgetError: a decision refused it, or ``deadline`` passed first.
            Exception: the completion source's error when waiting for epochs.
        """
        loop = asyncio.get_running_loop()
        future = request.future = loop.create_future()
        if request.seq is None:
            request.seq = next(self._seq)
        memory.enqueue(request)
        completion: asyncio.Future[None] | None = None
        pending = request.pending if request.status is _Status.EPOCHS else None
        if pending is not None:
            pool = request.ctx.device.memory
            assert pool is not None
            wait_completed = pool._wait_completed
            if wait_completed is None:
                memory.dequeue(request)
                raise WouldWaitError(
                    pool._describe_wait(pending)
                    + " and the pool has no completion source to wait with",
                    pending,
                )
            completion = asyncio.ensure_future(wait_completed(pending.frontier))
        try:
            async with asyncio.timeout_at(deadline):
                if completion is None:
                    await future
                else:
                    await asyncio.wait((future, completion), return_when=asyncio.FIRST_COMPLETED)
        except TimeoutError:
            if request.status is _Status.GRANTED and future.done():
                return True  # served as the deadline fired
            if request.status is _Status.REFUSED and future.done():
                assert request.error is not None
                raise request.error from None
            raise _refusal(
                request.ctx,
                memory.ledger,
                request.nbytes,
                f"no memory was freed within {timeout} s "
                f"({request.status.value if request.status else 'waiting'})",
            ) from None
        except asyncio.CancelledError:
            if request.status is _Status.GRANTED and future.done():
                self._undo(memory, request)  # served, but nobody will use it
            raise
        finally:
            memory.dequeue(request)
            if not future.done():
                future.cancel()
            if request.status in _WAITING_FOR_DEVICE and memory.waiters:
                self._wake(memory)  # it may have held back less urgent requests
            if completion is not None and not completion.done():
                completion.cancel()
                completion.add_done_callback(_consume_result)
        # Only a decision (in _wake) sets these while the request waits.
        if request.status is _Status.GRANTED:
            return True
        if request.status is _Status.REFUSED:
            assert request.error is not None
            raise request.error
        if completion is not None and completion.done() and not completion.cancelled():
            completion.result()  # the completion source's error, if it raised
        return False

    def _undo(self, memory: _DeviceMemory, request: _Request) -> None:
        """Give back what a decision granted to a request that was cancelled meanwhile."""
        ctx = request.ctx
        block, request.block = request.block, None
        if block is not None:
            memory.unclaimed.pop(block, None)
            pool = ctx.device.memory
            assert pool is not None
            # Never used: it dies where it was born, with what its death was known as.
            pool.free(block, block.requester)
        self._release(memory, ctx, request.charge, request.key)

    def _others_hold(self, memory: _DeviceMemory, request: _Request) -> bool:
        """Whether any holder but the request's own holds memory on the device."""
        key = request.key
        return any(holder != key for holder in memory.held)

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
        """Allocate through the context's budget (see the pressure policy in the module doc).

        The budget is charged the block's span (``buf.charged``). ``timeout`` bounds any
        wait, as a deadline on the loop's clock; ``0`` answers now.

        Raises:
            TypeError: ``nbytes`` is not an ``int``.
            ValueError: ``nbytes`` is not positive, or ``timeout`` is negative.
            MemoryBudgetError: it can never be served as things stand, or was not
                within ``timeout`` seconds; the message has the numbers and the reason.
        """
        self._check()
        buf = await self.runtime._memory.allocate(self.context, nbytes, timeout=timeout, owner=self)
        self._buffers[buf] = None
        return buf

    def free(self, buf: Buffer, death: Frontier | None = None) -> None:
        """Free a buffer; its death frontier is the context queue's frontier by default.

        Any session of the buffer's context may free it.

        Raises:
            ForeignBufferError: the buffer belongs to another context or runtime.
            ValueError: it was already freed.
        """
        if isinstance(buf, Buffer) and buf.context is not self.context:
            raise ForeignBufferError(
                f"session on context {self.context.name!r} cannot free {buf!r}: it belongs "
                f"to context {buf.context.name!r}"
                + ("" if buf.context.runtime is self.runtime else " of another runtime")
            )
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
    work runs on the runtime's loop. Every blocking call ends: with its result, with
    :class:`TimeoutError` after ``timeout`` seconds (the session's default, or the
    call's own), or with :class:`asyncfront.RuntimeCrashedError` when the runtime's
    thread (a :class:`asyncfront.RuntimeThread`) crashes or closes first.
    """

    def __init__(
        self, runtime: Runtime, context: ExecutionContext, *, timeout: float | None = None
    ) -> None:
        self._session = Session(runtime, context)
        self._loop = runtime._require_loop()
        check_timeout(timeout, f"session_sync on context {context.name!r}")
        self._runtime = runtime
        self.timeout = timeout
        if _on_thread_of(self._loop):
            raise RuntimeError(
                "session_sync() blocks its thread and cannot run on the runtime's own loop "
                "thread; use 'async with rt.session(ctx)'"
            )

    def _call(self, coro: Coroutine[Any, Any, T], what: str, timeout: float | None = None) -> T:
        if _on_thread_of(self._loop):
            # Blocking the loop thread on work scheduled onto that same loop never ends.
            coro.close()
            raise RuntimeError(
                f"session on context {self.context.name!r}: this call blocks until the "
                "runtime's loop answers, so it cannot run on that loop's thread (inside a "
                "memory-pressure or eviction handler); only free() and submit() can"
            )
        wait = self.timeout if timeout is None else timeout
        label = f"{what} on context {self.context.name!r}"
        if not valid_timeout(wait):
            coro.close()
            check_timeout(wait, label)
        try:
            future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        except RuntimeError:  # the loop is closed: nothing will ever answer
            coro.close()
            ended = self._runtime._host_ended
            crash = ended.exception() if ended is not None and ended.done() else None
            if crash is not None:
                raise RuntimeCrashedError(
                    f"session on context {self.context.name!r}: the runtime's thread crashed "
                    f"before {what}: {type(crash).__name__}: {crash}"
                ) from crash
            raise RuntimeCrashedError(
                f"session on context {self.context.name!r}: the runtime's loop is closed"
            ) from None
        try:
            return wait_blocking(future, label, wait, self._runtime._host_ended)
        except RuntimeCrashedError:
            if inspect.getcoroutinestate(coro) == inspect.CORO_CREATED:
                coro.close()  # the loop ended before it ran: nothing else will close it
            raise

    def __enter__(self) -> SyncSession:
        self._call(self._session.__aenter__(), "opening the session")
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self._call(self._session.__aexit__(exc_type, exc, tb), "closing the session")
        except RuntimeCrashedError:
            if exc is None:
                raise
            # The error leaving the block (often the crash itself) is the one to report;
            # a runtime that can no longer close the session adds nothing to it.

    @property
    def context(self) -> ExecutionContext:
        """The session's context."""
        return self._session.context

    def run(
        self,
        fn: Callable[..., Any] | None = None,
        *args: Any,
        cost: float | None = None,
        timeout: float | None = None,
        **kw: Any,
    ) -> Any:
        """Run work on the context's queue and block until its result.

        Raises:
            TimeoutError: no result within ``timeout`` seconds (default: the session's).
                The wait is cancelled; the submission, already queued, still runs.
        """
        return self._call(
            self._session.run(fn, *args, cost=cost, **kw), f"run of {_work_name(fn)}", timeout
        )

    def submit(
        self,
        fn: Callable[..., Any] | None = None,
        *args: Any,
        cost: float | None = None,
        timeout: float | None = None,
        **kw: Any,
    ) -> Submission:
        """Queue work and return its submission (await it from the loop, or call ``run``).

        Works on the runtime's loop thread too, for example inside a memory-pressure handler.

        Raises:
            TimeoutError: the loop did not take the submission within ``timeout`` seconds.
        """
        if _on_thread_of(self._loop):
            return self._session.submit(fn, *args, cost=cost, **kw)

        async def submit() -> Submission:
            return self._session.submit(fn, *args, cost=cost, **kw)

        return self._call(submit(), f"submit of {_work_name(fn)}", timeout)

    def allocate(self, nbytes: int, *, timeout: float | None = None) -> Buffer:
        """Allocate through the context's budget, blocking while the policy waits.

        ``timeout`` bounds the allocation's wait (as :meth:`Session.allocate`); the
        blocking call itself gives up at most one second later should the loop not
        answer. Without it, the session's default bounds the blocking call.
        """
        wait = self.timeout if timeout is None or not valid_timeout(timeout) else timeout + 1.0
        return self._call(
            self._session.allocate(nbytes, timeout=timeout),
            f"allocation of {format_bytes(nbytes)}",
            wait,
        )

    def free(
        self, buf: Buffer, death: Frontier | None = None, *, timeout: float | None = None
    ) -> None:
        """Free a buffer.

        Works on the runtime's loop thread too: memory-pressure and eviction handlers run
        there and are where memory is most often given back.
        """
        if _on_thread_of(self._loop):
            self._session.free(buf, death)
            return

        async def free() -> None:
            self._session.free(buf, death)

        self._call(free(), "free", timeout)


def _work_name(fn: Callable[..., Any] | None) -> str:
    return repr(getattr(fn, "__name__", "work")) if fn is not None else "a barrier"


def _refusal(
    ctx: ExecutionContext, ledger: MemoryLedger, nbytes: int, reason: str
) -> MemoryBudgetError:
    """The error for a refused allocation, with the context's numbers as they stand."""
    used, _, limit = ledger.usage(ctx.name)
    return MemoryBudgetError(ctx.name, nbytes, limit, used, ledger.available, reason)


def _consume_result(task: asyncio.Future[None]) -> None:
    """Retrieve a cancelled completion wait's outcome so no error goes unreported."""
    if not task.cancelled():
        task.exception()


def _on_thread_of(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return getattr(loop, "_thread_id", None) == threading.get_ident()
