"""Device queues: one task per queue consuming a FIFO of submissions.

For each submission the queue awaits its waits, merges their frontiers, advances its
own axis, runs the work on the device, then signals every semaphore in ``signals`` with
the resulting frontier. Submitting never waits, so a whole pipeline can be queued
before any of it runs.
"""

from __future__ import annotations

import asyncio
import enum
import inspect
import itertools
import math
import time
import weakref
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Final, SupportsFloat, SupportsIndex

from mypy_extensions import mypyc_attr

from ._frontier import Frontier, _shared_axes, axis_name
from ._record import RecordRing
from ._semaphore import MAX_VALUE, AnyWaiter, SemaphoreFailedError, TimelineSemaphore, Waiter
from .devices._base import LATER, Device, SlotArbiter, SlotGrant

if TYPE_CHECKING:
    from ._context import ExecutionContext, WorkingMemory
    from ._policy import _StagePlan
    from ._runtime import Runtime

__all__ = (
    "CancelledWorkError",
    "DeviceQueue",
    "Outcome",
    "QueueStatistics",
    "StalledError",
    "Submission",
    "SubmissionState",
)

SemaphoreValue = tuple[TimelineSemaphore, int]
Waiting = tuple[TimelineSemaphore, int, AnyWaiter]


@mypyc_attr(native_class=False)
class CancelledWorkError(RuntimeError):
    """The work raised ``CancelledError`` itself (it awaited a task someone cancelled).

    It fails that submission and its signals like any error, and the queue goes on; only
    the runtime's own cancellation closes queues. ``__cause__`` is the ``CancelledError``.
    """


@mypyc_attr(native_class=False)
class StalledError(RuntimeError):
    """Work could never run: it waits on a semaphore that nothing left will signal."""


class SubmissionState(enum.Enum):
    """Where a submission is in its life."""

    PENDING = "pending"  # queued behind earlier submissions
    WAITING = "waiting"  # at the head of its queue, waiting on semaphores
    READY = "ready"  # waits satisfied, waiting for a device slot
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"


_COMPLETED: Final = SubmissionState.COMPLETED
_READY: Final = SubmissionState.READY
_DONE: Final = (SubmissionState.COMPLETED, SubmissionState.FAILED)
# the builtin, held here: the compiled core reads it without a lookup in builtins
_callable: Final = callable
_NO_KWARGS: Final[dict[str, Any]] = {}  # shared and never mutated: saves a live dict per submission

_tokens: Final = itertools.count(1)
_PLAIN_SIGNAL: Final = TimelineSemaphore.signal
_PLAIN_RELEASE: Final = Device.release

# Where a queue's head is (DeviceQueue._stage); the first two are re-entered on a wake.
_FRESH: Final = 0  # taken from the FIFO, waits not looked at
_BLOCKED: Final = 1  # waits on semaphores (DeviceQueue._blocked)
_SLOT: Final = 2  # waits for a device slot (DeviceQueue._slot)
_TIMED: Final = 3  # runs on the runtime's timer wheel (DeviceQueue._timer)
_TASK: Final = 4  # the queue's task carries it (DeviceQueue._handed)

# What the queue's task does for a head handed to it.
_CARRY_ACQUIRE: Final = 0  # reserve working memory, acquire a slot, execute
_CARRY_EXECUTE: Final = 1  # holding a slot: await device.execute
_CARRY_AWAIT: Final = 2  # holding a slot: await the awaitable the work returned


@mypyc_attr(allow_interpreted_subclasses=True)
class Outcome:
    """Work that finishes once, with a result or an error; awaitable for the result.

    The shared core of :class:`Submission` and of a collective channel's steps.
    """

    __slots__ = ("_exception", "_futures", "_result", "name", "state")

    _kind: ClassVar[str] = "work"

    name: str
    state: SubmissionState
    _result: Any
    _exception: BaseException | None
    _futures: list[asyncio.Future[None]] | None

    def _event_loop(self) -> asyncio.AbstractEventLoop:
        raise NotImplementedError

    def done(self) -> bool:
        """Whether it completed or failed."""
        return self.state in _DONE

    def result(self) -> Any:
        """The result; raises the error, or ``InvalidStateError`` if not done."""
        if self.state is SubmissionState.COMPLETED:
            return self._result
        if self.state is SubmissionState.FAILED:
            assert self._exception is not None
            raise self._exception
        raise asyncio.InvalidStateError(f"{self._kind} {self.name!r} is {self.state.value}")

    def exception(self) -> BaseException | None:
        """The error it failed with, or None."""
        return self._exception

    def __await__(self) -> Generator[Any, None, Any]:
        if self.state not in _DONE:
            fut: asyncio.Future[None] = self._event_loop().create_future()
            if self._futures is None:
                self._futures = [fut]
            else:
                self._futures.append(fut)
            yield from fut.__await__()
        return self.result()

    async def _until_done(self) -> None:
        """Wait until it completed or failed, without raising its error.

        Raising the stored error would give it a traceback holding the waiting frames
        (and whatever they refer to, such as a graph run and its results) for as long
        as anyone keeps the error.
        """
        if self.state not in _DONE:
            fut: asyncio.Future[None] = self._event_loop().create_future()
            if self._futures is None:
                self._futures = [fut]
            else:
                self._futures.append(fut)
            await fut

    def _wake(self) -> None:
        futures = self._futures
        if futures is not None:
            self._futures = None
            for fut in futures:
                if not fut.done():
                    fut.set_result(None)

    def _finish(self, result: Any) -> None:
        self._result = result
        self.state = SubmissionState.COMPLETED
        if self._futures is not None:
            self._wake()

    def _fail(self, exc: BaseException) -> None:
        self._exception = exc
        self.state = SubmissionState.FAILED
        if self._futures is not None:
            self._wake()


class Submission(Outcome):
    """One unit of work on a queue; awaitable for its result.

    Attributes:
        queue: the queue it was submitted to.
        name: a label for traces and logs.
        epoch: its epoch on the queue's axis (assigned at submission, exact by FIFO).
        waits / signals: ``(semaphore, value)`` pairs.
        cost: the work's cost for fake devices (seconds at speed 1.0), or None.
        memory: bytes of working memory reserved in its context's budget while it runs,
            or None.
        deadline_at: when it should finish, on the runtime clock (from ``deadline=`` or
            ``deadline_at=``, or its graph's), or None; what deadline-aware policies weigh.
        annotations: extra facts for traces (graph, stage, placement, collective step),
            shown in the Perfetto event's arguments; None when there are none.
        frontier: the causal history it ran with (set once its waits are met).
        submitted_at / started_at / finished_at: runtime clock readings.
    """

    __slots__ = (
        "_base",
        "_frontier",
        "_plan",
        "annotations",
        "args",
        "cost",
        "deadline_at",
        "epoch",
        "finished_at",
        "fn",
        "kwargs",
        "memory",
        "queue",
        "signals",
        "started_at",
        "submitted_at",
        "waits",
    )

    def __init__(
        self,
        queue: DeviceQueue,
        fn: Callable[..., Any] | None,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        waits: tuple[SemaphoreValue, ...],
        signals: tuple[SemaphoreValue, ...],
        name: str,
        cost: float | None,
        epoch: int,
        submitted_at: float,
    ) -> None:
        self.queue = queue
        self.fn = fn
        self.args = args
        self.kwargs = kwargs if kwargs else _NO_KWARGS
        self.waits = waits
        self.signals = signals
        self.name = name
        self.cost = cost
        self.memory: int | None = None
        self.deadline_at: float | None = None
        self._plan: _StagePlan | None = None  # a graph stage's workflow record
        self.epoch = epoch
        self.submitted_at = submitted_at
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self._base: Frontier | None = None
        self._frontier: Frontier | None = None
        self.state = SubmissionState.PENDING
        self._result: Any = None
        self._exception: BaseException | None = None
        self._futures: list[asyncio.Future[None]] | None = None
        self.annotations: dict[str, Any] | None = None

    def annotate(self, **facts: Any) -> None:
        """Attach facts (JSON-friendly values) that the trace shows with this submission."""
        if self.annotations is None:
            self.annotations = facts
        else:
            self.annotations.update(facts)

    @property
    def frontier(self) -> Frontier | None:
        """The causal history the work ran with: its waits' frontiers and its own epoch.

        None until the submission's waits are met.
        """
        frontier = self._frontier
        if frontier is None:
            base = self._base
            if base is None:
                return None
            frontier = self._frontier = self.queue._materialize(base, self.epoch)
        return frontier

    _kind: ClassVar[str] = "submission"

    def _event_loop(self) -> asyncio.AbstractEventLoop:
        return self.queue._loop

    def __repr__(self) -> str:
        return (
            f"<Submission {self.name!r} on {self.queue.name!r} epoch={self.epoch} "
            f"{self.state.value}>"
        )


class RuntimeState:
    """What every submission reads of its runtime, in one record of the compiled core.

    The runtime's attributes of these names (``_open``, ``_log_debug``, ``trace``...) read
    and write this record, which its queues hold, so the dispatch path reads plain
    fields instead of looking attributes up on the runtime. It refers to nothing that
    refers back to the runtime, so a closed runtime is still freed by reference counting.
    """

    __slots__ = (
        "completed_cache",
        "completed_epochs",
        "completion_waiters",
        "draining",
        "log_debug",
        "log_warning",
        "open",
        "stall_timer",
        "submit_hook",
        "trace",
    )

    def __init__(self, trace: RecordRing) -> None:
        self.open = False
        self.draining = False
        self.log_debug = False
        self.log_warning = True
        # Called with each new submission (what the models it uses pin), or None.
        self.submit_hook: Callable[[Submission], None] | None = None
        self.completed_epochs: dict[int, int] = {}  # axis -> its latest finished epoch
        self.completed_cache: Frontier | None = None  # reset by queues on completion
        # axis -> heap of (epoch, sequence, future) for wait_completed
        self.completion_waiters: dict[int, list[tuple[int, int, asyncio.Future[None]]]] = {}
        self.stall_timer: asyncio.TimerHandle | None = None  # armed while a queue is blocked
        self.trace = trace


class Trampoline:
    """One runtime's ready list: queues whose waits ended, advanced in one loop callback.

    A signal readies the queues it unblocks here instead of waking a task each; the
    first one schedules a single callback that advances every ready queue, including
    those readied while it runs, so a chain of dependent hops costs one loop callback,
    not a task wake-up per hop. After ``batch`` queues it yields to the loop, so other
    callbacks and tasks keep their turn.
    """

    __slots__ = ("_crashed", "_loop", "_ready", "_scheduled", "batch", "timers")

    def __init__(self, crashed: Callable[[BaseException], None], batch: int = 1024) -> None:
        self._crashed = crashed
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready: deque[DeviceQueue] = deque()
        self._scheduled = False
        self.batch = batch
        self.timers = TimerWheel(crashed)
        """The runtime's timed work (see :class:`TimerWheel`)."""

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Run on ``loop`` (the runtime's, once it opens)."""
        self._loop = loop
        self.timers.bind(loop)

    def push(self, queue: DeviceQueue) -> None:
        """Advance ``queue`` on the next run (the first push schedules one)."""
        self._ready.append(queue)
        if not self._scheduled:
            self.start()

    def start(self) -> None:
        """Schedule a run on the loop (queues are already on the ready list)."""
        self._scheduled = True
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        loop.call_soon(self._run)

    def _run(self) -> None:
        ready = self._ready
        budget = self.batch
        try:
            while ready and budget:
                budget -= 1
                queue = ready.popleft()
                queue._scheduled = False
                try:
                    queue._advance()
                except Exception as exc:  # a defect of the queue itself: the runtime reports it
                    self._crashed(exc)
        finally:
            if ready:
                assert self._loop is not None
                self._loop.call_soon(self._run)
            else:
                self._scheduled = False


class TimerWheel:
    """One runtime's timed work: one loop timer per distinct deadline, not per submission.

    Work that a device runs as a timer (:meth:`~asyncfront.devices.Device.timed_seconds`)
    ends at ``start + seconds``; every queue whose work ends at the same instant (common
    in simulations, where equal costs start together) is finished by the one loop
    callback of that deadline, in the order the work started, within the loop iteration
    where its own timer would have run.

    The slots that timed work frees are granted together: a device whose slot is
    wanted is granted on the next loop turn, as :meth:`~asyncfront.devices.Device.release`
    would, by one loop callback for every device released in the same turn instead of
    one each.
    """

    __slots__ = ("_crashed", "_due", "_grants", "_loop")

    def __init__(self, crashed: Callable[[BaseException], None]) -> None:
        self._crashed = crashed
        self._loop: asyncio.AbstractEventLoop | None = None
        # deadline -> the queues whose timed work ends then, in the order it started
        self._due: dict[float, list[DeviceQueue]] = {}
        # the arbiters whose freed slots are granted on the next loop turn, in release order
        self._grants: list[SlotArbiter] = []

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Run on ``loop`` (the runtime's, once it opens)."""
        self._loop = loop

    def add(self, when: float, queue: DeviceQueue) -> None:
        """Call ``queue._timer_fired(now)`` at loop time ``when``."""
        due = self._due.get(when)
        if due is None:
            self._due[when] = [queue]
            loop = self._loop
            if loop is None:
                loop = self._loop = asyncio.get_running_loop()
            loop.call_at(when, self._fire, when)
        else:
            due.append(queue)

    def remove(self, when: float, queue: DeviceQueue) -> None:
        """Withdraw ``queue`` from the deadline ``when`` (its work was aborted)."""
        due = self._due.get(when)
        if due is not None:
            for i, waiting in enumerate(due):
                if waiting is queue:
                    del due[i]
                    break
            if not due:
                del self._due[when]  # the loop timer finds nothing and does nothing

    def release(self, device: Device) -> None:
        """Return the slot of timed work that ended: ``device.release()``, grants batched."""
        if type(device).release is not _PLAIN_RELEASE:
            device.release()  # a device's own release runs as such
            return
        device._executed += 1
        arbiter = device._arbiter
        if arbiter.release():
            grants = self._grants
            grants.append(arbiter)
            if len(grants) == 1:
                loop = self._loop
                if loop is None:
                    loop = self._loop = asyncio.get_running_loop()
                loop.call_soon(self._grant)

    def _grant(self) -> None:
        grants, self._grants = self._grants, []
        done = 0
        try:
            for arbiter in grants:
                done += 1
                try:
                    arbiter.grant()
                except Exception as exc:  # a defect of a policy or queue: the runtime reports it
                    self._crashed(exc)
        finally:
            if done < len(grants):  # KeyboardInterrupt or SystemExit: the rest grant next turn
                rest = grants[done:]
                if not self._grants:
                    assert self._loop is not None
                    self._loop.call_soon(self._grant)
                self._grants = rest + self._grants

    def _fire(self, when: float) -> None:
        due = self._due.pop(when, None)
        if due is None:
            return
        assert self._loop is not None
        now = self._loop.time()  # one reading for every queue: the clock stands still here
        done = 0
        try:
            for queue in due:
                done += 1
                try:
                    queue._timer_fired(now)
                except Exception as exc:  # a defect of the queue itself: the runtime reports it
                    self._crashed(exc)
        finally:
            if done < len(due):  # KeyboardInterrupt or SystemExit: the rest fire next turn
                rest = due[done:]
                pending = self._due.get(when)
                self._due[when] = rest if pending is None else rest + pending
                assert self._loop is not None
                self._loop.call_soon(self._fire, when)


@dataclass(frozen=True)
class QueueStatistics:
    """A snapshot of a queue's state."""

    name: str
    device: str
    priority: int
    submitted_epoch: int
    completed_epoch: int
    pending: int
    blocked: bool


class DeviceQueue:
    """An in-order timeline of work on one device, with its own axis.

    Created by :meth:`asyncfront.Runtime.queue`. Higher ``priority`` wins the device's
    slots when several queues have ready work.
    """

    def __init__(
        self,
        runtime: Runtime,
        device: Device,
        axis: int,
        priority: int,
        name: str,
        frontier_capacity: int,
    ) -> None:
        # Not owning: the runtime owns its queues, so a closed runtime (and its trace)
        # is freed by reference counting, with no cycle for the collector to find.
        self._runtime_ref = weakref.ref(runtime)
        self._state: RuntimeState = runtime._state
        self.device = device
        self.axis = axis
        self.priority = priority
        self.name = name
        self._capacity = frontier_capacity
        # What every trace record of this queue names: plain values, shared by the records.
        # Typed as a tuple of any length: the compiled core stores a fixed-length tuple
        # unboxed and would build a new one (for the collector to visit) on every read.
        self._trace_info: tuple[Any, ...] = (name, axis, device.name, priority)
        self._loop = asyncio.get_running_loop()
        # The loop's clock; asyncio's own reads time.monotonic, called here without the
        # method in between (a virtual-time loop keeps its own).
        self._time: Callable[[], float] = (
            time.monotonic
            if type(self._loop).time is asyncio.BaseEventLoop.time
            else self._loop.time
        )
        self._fifo: deque[Submission] = deque()
        # The FIFO's two hot methods, bound once: a call each, without a method lookup.
        self._push: Callable[[Submission], None] = self._fifo.append
        self._pop: Callable[[], Submission] = self._fifo.popleft
        self._wakeup: asyncio.Future[None] | None = None
        self._next_epoch = 1
        self._completed_epoch = 0
        self._base = Frontier()  # merge of every wait so far: the queue's causal history
        # A semaphore that once held a frontier covering the base (the base itself, unless
        # truncated since). A semaphore's frontier only grows (each signal merges into
        # it), so a later one dominates the base: a wait on it replaces the base without
        # a merge.
        self._base_source: TimelineSemaphore | None = None
        # Where the queue's axis sits in the axes tuple last materialized: consecutive
        # frontiers share one axes tuple, so the position is found once.
        self._axis_axes: tuple[int, ...] = ()
        self._axis_index = -1
        # The epoch of the most recently started submission (its base is self._base): an
        # epoch, not the submission, so a finished submission's arguments are not kept.
        self._last_epoch = 0
        self._current: Submission | None = None  # taken from the FIFO and not yet finished
        # the head's unmet waits while it waits on them
        self._blocked: list[Waiting] | None = None
        # semaphore -> (value, submission) for the waits of pending submissions that were
        # unmet at submission, in FIFO order: finds a later signal that an earlier wait needs
        self._unmet: dict[TimelineSemaphore, deque[tuple[int, Submission]]] = {}
        # semaphore -> the highest value pending submissions here signal it to: a wait
        # that work ahead of it signals is no same-queue deadlock
        self._signalled: dict[TimelineSemaphore, int] = {}
        self._closed = False
        self._task: asyncio.Task[None] | None = None
        # The consumer (see _advance): what the head waits for, by stage.
        self._stage = _FRESH
        self._wait_base: Frontier | None = None  # the head's met waits, while others are not
        self._wait_source: TimelineSemaphore | None = None  # what _base_source is of it
        self._slot: SlotGrant | None = None
        self._timer: float | None = None  # the deadline of timed work on the timer wheel
        self._timers = runtime._trampoline.timers
        self._handed: tuple[int, Any] | None = None
        self._scheduled = False  # on the trampoline's ready list
        # Whether every frontier of the queue dominates the one before (true until a
        # truncation drops an entry): lets a semaphore signalled only from here skip merges.
        self._monotone = True
        self._token = next(_tokens)  # names the queue to semaphores without keeping it
        self._trampoline = runtime._trampoline
        self._arbiter = device._arbiter
        self._claims = device.claims_waits
        self._watches = device.watches_waits
        self._plain_acquire = type(device).acquire is Device.acquire
        self._timed = type(device).timed_seconds is not Device.timed_seconds
        # The context whose queue this is, weakly: the context owns its queue.
        self._context_ref: weakref.ref[ExecutionContext] | None = None

    @property
    def context(self) -> ExecutionContext | None:
        """The context whose queue this is (set by ``create_context``), else None."""
        ref = self._context_ref
        return None if ref is None else ref()

    @context.setter
    def context(self, ctx: ExecutionContext | None) -> None:
        self._context_ref = None if ctx is None else weakref.ref(ctx)

    # -- public --------------------------------------------------------------------

    @property
    def runtime(self) -> Runtime:
        """The runtime the queue belongs to.

        Raises:
            RuntimeError: that runtime was closed and no longer exists.
        """
        runtime = self._runtime_ref()
        if runtime is None:
            raise RuntimeError(f"queue {self.name!r}: its runtime was closed and freed")
        return runtime

    @property
    def frontier(self) -> Frontier:
        """The frontier of the most recently started submission."""
        epoch = self._last_epoch
        return self._materialize(self._base, epoch) if epoch else self._base

    def _materialize(self, base: Frontier, epoch: int) -> Frontier:
        """``base | {axis: epoch}``, truncated to the runtime's frontier capacity."""
        axis = self.axis
        axes = base._axes
        if axes is self._axis_axes:
            i = self._axis_index
        else:
            i = bisect_left(axes, axis)  # the axes are sorted
            if i < len(axes) and axes[i] == axis:  # the common case once the queue has run
                if axes == self._axis_axes:
                    # Equal to the last axes but made apart (by another queue): share one
                    # tuple from now on, so the queues that pass these frontiers on meet
                    # the identity above instead of comparing.
                    axes = _shared_axes(axes)
                self._axis_index = i
                self._axis_axes = axes
            else:
                i = -1
        if i >= 0:
            epochs = base._epochs
            if epochs[i] >= epoch:
                return base
            raised = list(epochs)
            raised[i] = epoch
            return Frontier._make(axes, tuple(raised))
        frontier = base.with_epoch(axis, epoch)
        if len(frontier._axes) > self._capacity:
            frontier = frontier.truncated(self._capacity, keep=axis)
            self._monotone = False
        return frontier

    @property
    def submitted_epoch(self) -> int:
        """The epoch of the latest submission: the axis reads this once the queue drains."""
        return self._next_epoch - 1

    @property
    def completed_epoch(self) -> int:
        """The epoch of the latest finished submission."""
        return self._completed_epoch

    def submit(
        self,
        fn: Callable[..., Any] | None = None,
        *args: Any,
        waits: Iterable[SemaphoreValue] = (),
        signals: Iterable[SemaphoreValue] = (),
        name: str | None = None,
        cost: float | None = None,
        memory: SupportsIndex | None = None,
        deadline: SupportsFloat | None = None,
        deadline_at: SupportsFloat | None = None,
        **kwargs: Any,
    ) -> Submission:
        """Queue work and return its :class:`Submission` at once (never waits).

        ``fn`` runs on the device with ``args``/``kwargs`` once every ``(semaphore,
        value)`` in ``waits`` is reached; then every pair in ``signals`` is signalled
        with the submission's frontier. ``fn=None`` is a pure barrier/signal.

        A signal for a value that an earlier, still pending submission on this queue
        waits for is logged as a warning (``same_queue_wait``): the queue runs that
        earlier submission first, so it can only be satisfied from elsewhere.

        ``memory`` (bytes, a context's queue only) is the work's working memory: it is
        reserved from the context's budget once the waits are met and before the work
        takes a device slot, and released when it finishes. The reservation waits,
        evicts and fails like an allocation (``MemoryBudgetError`` fails the
        submission). Like ``name`` and ``cost`` it is not passed to ``fn``.

        Raises:
            RuntimeError: the queue or its runtime is closed.
            TypeError: ``fn`` is not callable (nor None), malformed waits or signals, or
                ``memory`` on a queue without a context.
            ValueError: a value outside ``0..2**64 - 1``, a signal value that the
                semaphore has already reached, a negative cost, ``memory`` not a
                positive int, a negative or non-finite ``deadline``, a non-finite
                ``deadline_at``, or both of them.
        """
        if self._closed:
            raise RuntimeError(f"queue {self.name!r} is closed")
        if fn is not None and not _callable(fn):
            raise TypeError(
                f"queue {self.name!r}: work must be callable (or None for a barrier), "
                f"got {fn!r} ({type(fn).__name__})"
            )
        # Untyped until checked: what the caller passed, whatever it is.
        waits_t: tuple[Any, ...] = tuple(waits) if waits else ()
        signals_t: tuple[Any, ...] = tuple(signals) if signals else ()
        if waits_t:
            for pair in waits_t:
                if not (
                    type(pair) is tuple
                    and len(pair) == 2
                    and type(pair[1]) is int
                    and 0 <= pair[1] <= MAX_VALUE
                    and isinstance(pair[0], TimelineSemaphore)
                ):
                    _check_pairs("waits", waits_t)
        if signals_t:
            for pair in signals_t:
                if not (
                    type(pair) is tuple
                    and len(pair) == 2
                    and type(pair[1]) is int
                    and 0 <= pair[1] <= MAX_VALUE
                    and isinstance(pair[0], TimelineSemaphore)
                ):
                    _check_pairs("signals", signals_t)
                sem, value = pair
                if value <= sem._value:
                    raise ValueError(
                        f"queue {self.name!r}: signal value {value} for semaphore "
                        f"{sem.name!r} must exceed its current value {sem._value}"
                    )
        if cost is not None and cost < 0:
            raise ValueError(f"cost must be >= 0, got {cost}")
        reserve = None if memory is None else _check_memory(self, memory)
        if deadline is not None or deadline_at is not None:
            due: float | None = _deadline_at(self.name, deadline, deadline_at, self._loop.time())
        else:
            due = None
        if name is None:
            name = getattr(fn, "__name__", "work") if fn is not None else "barrier"
        epoch = self._next_epoch
        self._next_epoch = epoch + 1
        sub = Submission(
            self,
            fn,
            args,
            kwargs,
            waits_t,
            signals_t,
            name,
            cost,
            epoch,
            self._time(),
        )
        if due is not None:
            sub.deadline_at = due
        if reserve is not None:
            sub.memory = reserve
            sub.annotate(memory=reserve)
        elif fn is None and cost is None and self._current is None and not self._fifo:
            # A barrier with nothing ahead: finished here when its waits are met, without
            # going through the FIFO (nothing is pending, so no record needs keeping).
            runtime = self._runtime_ref()
            if runtime is not None and self._state.open and self._barrier_now(sub, runtime):
                return sub
        self._push(sub)
        if waits_t:
            unmet = self._unmet
            ahead = self._signalled
            for sem, value in waits_t:
                if sem._value < value:
                    if ahead.get(sem, -1) >= value:
                        continue  # work ahead of it on this queue signals it
                    record = unmet.get(sem)
                    if record is None:
                        record = unmet[sem] = deque()
                    record.append((value, sub))
        if signals_t:
            unmet = self._unmet
            ahead = self._signalled
            for sem, value in signals_t:
                if unmet and sem in unmet:
                    self._warn_same_queue(sub, sem, value)
                if ahead.get(sem, -1) < value:
                    ahead[sem] = value
        runtime = self._runtime_ref()
        if runtime is None:
            raise RuntimeError(f"queue {self.name!r}: its runtime was closed and freed")
        self._announce(sub, runtime)
        if self._current is None and not self._scheduled:
            self._schedule()
        return sub

    def _announce(self, sub: Submission, runtime: Runtime) -> None:
        """Tell the runtime's hook and the debug log about a new submission."""
        state = self._state
        hook = state.submit_hook
        if hook is not None:
            hook(sub)
        if state.log_debug:
            runtime._log.debug(
                "submit", queue=self.name, submission=sub.name, epoch=sub.epoch,
                waits=len(sub.waits),
            )  # fmt: skip

    def _barrier_now(self, sub: Submission, runtime: Runtime) -> bool:
        """Finish a barrier submitted to an idle queue if its waits are met; else False."""
        base = self._base
        source = self._base_source
        for sem, value in sub.waits:
            if sem._failure is not None or sem._value < value:
                return False  # it waits (or fails) in turn, through the FIFO
            base, source = _merged(base, source, sem, sem._frontier)
        self._announce(sub, runtime)
        self._current = sub
        self._settle_base(sub, base, source)
        sub.started_at = sub.finished_at = sub.submitted_at
        try:
            self._complete(sub, None, runtime)
        except Exception as exc:  # a defect of the queue itself, as on the trampoline
            runtime._crashed_by(exc)
        return True

    def _warn_same_queue(self, sub: Submission, sem: TimelineSemaphore, value: int) -> None:
        earlier = self._earlier_waiter(sem, value)
        if earlier is None or earlier[1] is sub:
            return
        waited, first = earlier
        runtime = self.runtime
        if runtime._log_warning:
            runtime._log.warning(
                "same_queue_wait",
                queue=self.name,
                submission=sub.name,
                earlier=first.name,
                semaphore=sem.name,
                value=waited,
                message=(
                    f"submission {sub.name!r} signals semaphore {sem.name!r} to {value}, "
                    f"which the earlier submission {first.name!r} on the same queue "
                    f"{self.name!r} waits for (value {waited}): the queue runs "
                    f"{first.name!r} first, so it waits until something else signals it"
                ),
            )

    @property
    def closed(self) -> bool:
        """Whether the queue refuses new work (closed by :meth:`close` or its runtime)."""
        return self._closed

    def close(self) -> None:
        """Refuse new submissions; the work already queued still runs, in order.

        Once that work has finished the queue's task ends and the queue retires: the
        runtime forgets it and frees its slot, and its axis reads as complete for good
        (:meth:`asyncfront.Runtime.axis_retired`), so death frontiers naming it never
        wait. Closing twice is harmless.
        """
        if self._closed:
            return
        self._closed = True
        wakeup = self._wakeup
        if wakeup is not None:
            self._wakeup = None
            if not wakeup.done():  # cancelled with the task as the runtime closed
                wakeup.set_result(None)  # the idle task wakes, sees the queue closed, and ends
        runtime = self._runtime_ref()
        if runtime is not None and runtime._open and not self._busy():
            runtime._retire(self)

    def _task_ended(self, task: asyncio.Task[None]) -> None:
        """The consumer task ended: a queue closed while its runtime is open retires."""
        runtime = self._runtime_ref()
        if runtime is not None and runtime._open and self._closed and not self._busy():
            runtime._retire(self)

    def statistics(self) -> QueueStatistics:
        """A frozen snapshot of epochs, pending work and whether the head is blocked."""
        return QueueStatistics(
            name=self.name,
            device=self.device.name,
            priority=self.priority,
            submitted_epoch=self._next_epoch - 1,
            completed_epoch=self._completed_epoch,
            pending=len(self._fifo) + (1 if self._current is not None else 0),
            blocked=self._blocked is not None,
        )

    def __repr__(self) -> str:
        return (
            f"<DeviceQueue {self.name!r} axis={axis_name(self.axis)} on {self.device.name!r} "
            f"priority={self.priority} epochs {self._completed_epoch}/{self._next_epoch - 1}>"
        )

    # -- the consumer task ---------------------------------------------------------

    def _busy(self) -> bool:
        return bool(self._fifo) or self._current is not None

    def _schedule(self) -> None:
        """Ready the queue to advance on its runtime's trampoline (a wait of it ended)."""
        if not self._scheduled:
            self._scheduled = True
            trampoline = self._trampoline
            trampoline._ready.append(self)
            if not trampoline._scheduled:
                trampoline.start()

    def _waiter_done(self, waiter: asyncio.Future[Frontier]) -> None:
        self._schedule()

    def _advance(self) -> None:
        """Run the queue's work in FIFO order as far as it goes without awaiting.

        The head's unmet waits register :class:`~asyncfront._semaphore.Waiter` call
        backs (the queue advances again once they end), a busy slot a grant, timed work
        a loop timer; work that must await goes to the queue's task. Barriers, met waits
        and a device's immediate calls (``execute_now``) finish here.
        """
        runtime = self._runtime_ref()
        if runtime is None or not self._state.open:
            return  # closing: the runtime fails what is left
        fifo = self._fifo
        while True:
            sub = self._current
            if sub is None:
                if not fifo:
                    self._went_idle(runtime)
                    return
                sub = self._current = self._pop()
                stage = _FRESH
            else:
                stage = self._stage
                if stage >= _TIMED:
                    return  # a timer or the task carries the head
            try:
                if stage <= _BLOCKED:
                    if sub.waits:
                        if not self._take_waits(sub, runtime):
                            return
                    else:
                        sub._base = self._base
                        self._last_epoch = sub.epoch
                    if sub.fn is None and sub.cost is None:
                        sub.started_at = sub.finished_at = self._time()
                        self._complete(sub, None, runtime)
                        continue
                    sub.state = _READY
                    if sub.memory is not None or not self._plain_acquire:
                        self._hand(_CARRY_ACQUIRE, None, runtime)
                        return
                    # A slot free with nobody ahead is taken at once; the arbiter decides
                    # exactly as acquire() would.
                    if not self._arbiter.try_acquire():
                        self._wait_slot()
                        return
                else:  # _SLOT: the grant ended the wait
                    slot = self._slot
                    if slot is None or not slot.done():
                        return
                    self._slot = None
                if not self._execute_held(sub, runtime):
                    return
            except BaseException as exc:
                self._settle_error(sub, exc, runtime)

    def _take_waits(self, sub: Submission, runtime: Runtime) -> bool:
        """Merge the head's waits into the queue's history; False while some are unmet.

        Raises the error of a failed semaphore or of an ended wait.
        """
        blocked = self._blocked
        if blocked is None:
            sub.state = SubmissionState.WAITING
            base = self._base
            source: TimelineSemaphore | None = self._base_source
            for sem, value in sub.waits:
                failure = sem._failure
                if failure is not None:
                    if blocked is not None:
                        _drop_waiters(blocked)
                    raise SemaphoreFailedError(sem, failure)
                if sem._value >= value:
                    frontier = sem._frontier
                    if source is sem:  # it dominates the base: no merge
                        base = frontier
                    else:
                        base, source = _merged(base, source, sem, frontier)
                    continue
                waiter: AnyWaiter
                if self._claims:
                    # The device may resolve it itself: a future it can watch.
                    future = sem._add_waiter(value)
                    future.add_done_callback(self._waiter_done)
                    self.device.claim_wait(sub, sem, value, future)
                    waiter = future
                else:
                    waiter = sem._add_callback_waiter(value, self._schedule, self._loop)
                if blocked is None:
                    blocked = [(sem, value, waiter)]
                else:
                    blocked.append((sem, value, waiter))
            if blocked is None:
                self._settle_base(sub, base, source)
                return True
            self._blocked = blocked
            self._wait_base = base
            self._wait_source = source
            self._stage = _BLOCKED
            if self._watches:
                self.device.watch_wait(sub)
            state = self._state
            if state.stall_timer is None or state.draining:
                runtime._queue_blocked()
        if len(blocked) == 1:
            waiter = blocked[0][2]
            if type(waiter) is Waiter and waiter._state == 1:  # met: the common wake
                self._blocked = None
                met = self._wait_base
                result = waiter._result
                assert met is not None and result is not None
                self._wait_base = None
                sem = blocked[0][0]
                if self._wait_source is sem:  # it dominates what the base holds: no merge
                    base = result
                    source = sem
                else:
                    base, source = _merged(met, self._wait_source, sem, result)
                self._wait_source = None
                if len(base._axes) > self._capacity:
                    base = base.truncated(self._capacity, keep=self.axis)
                    self._monotone = False
                self._base = sub._base = base
                self._base_source = source
                self._last_epoch = sub.epoch
                return True
        pending = False
        for _, _, waiter in blocked:
            if not waiter.done():
                pending = True
                continue
            if waiter.cancelled():
                continue
            exc = waiter.exception()
            if exc is not None:
                # A multi-wait fails as soon as any wait fails, others still pending.
                _drop_waiters(blocked)
                self._blocked = None
                self._wait_base = None
                self._wait_source = None
                if not isinstance(exc, _WAIT_ENDINGS):
                    runtime._note_stall()  # an outside error ended the wait
                raise exc
        if pending:
            return False
        self._blocked = None
        met = self._wait_base
        assert met is not None
        self._wait_base = None
        base = met
        source = self._wait_source
        self._wait_source = None
        for sem, _, waiter in blocked:
            # A device may resolve a future it claimed with a frontier of its own; only a
            # Waiter holds one that the semaphore had.
            held = sem if type(waiter) is Waiter else None
            base, source = _merged(base, source, held, waiter.result())
        self._settle_base(sub, base, source)
        return True

    def _settle_base(
        self, sub: Submission, base: Frontier, source: TimelineSemaphore | None = None
    ) -> None:
        if len(base._axes) > self._capacity:
            base = base.truncated(self._capacity, keep=self.axis)
            self._monotone = False
        self._base = base
        self._base_source = source
        # The frontier is base | {axis: epoch}, built only when someone needs it.
        sub._base = base
        self._last_epoch = sub.epoch

    def _wait_slot(self) -> None:
        """Queue for the device's slot by priority; the grant advances the queue."""
        slot = SlotGrant(self._slot_granted)
        arbiter = self._arbiter
        sub = self._current
        if arbiter.chooser is None or sub is None:
            arbiter.enqueue(self.priority, slot)
        else:  # a policy other than the default weighs the work's deadline and workflow
            arbiter.enqueue_work(
                self.device._ready_work(sub, self.priority, self._loop.time()), slot
            )
        self._slot = slot
        self._stage = _SLOT

    def _slot_granted(self) -> None:
        """The grant, called back in place by the arbiter (never once withdrawn)."""
        try:
            self._advance()
        except Exception as exc:  # a defect of the queue itself, as on the trampoline
            runtime = self._runtime_ref()
            if runtime is not None:
                runtime._crashed_by(exc)

    def _execute_held(self, sub: Submission, runtime: Runtime) -> bool:
        """Run the head on the slot just taken; True when it finished here."""
        device = self.device
        sub.state = SubmissionState.RUNNING
        sub.started_at = now = self._time()
        if self._state.log_debug:
            runtime._log.debug("start", queue=self.name, submission=sub.name, epoch=sub.epoch)
        try:
            result = device.execute_now(sub)
            if result is LATER:
                seconds = device.timed_seconds(sub) if self._timed else None
                if seconds is None:
                    self._hand(_CARRY_EXECUTE, None, runtime)
                else:
                    self._stage = _TIMED
                    when = self._timer = now + seconds
                    self._timers.add(when, self)
                return False
            if result is not None and inspect.isawaitable(result):
                self._hand(_CARRY_AWAIT, result, runtime)
                return False
        except BaseException:
            device.release()
            raise
        device.release()
        sub.finished_at = self._time()
        self._complete(sub, result, runtime)
        return True

    def _timer_fired(self, now: float) -> None:
        """Timed work's duration elapsed (the loop reads ``now``): finish it, go on."""
        sub = self._current
        runtime = self._runtime_ref()
        if sub is None or runtime is None or not self._state.open:
            return  # closing: the runtime fails the work and takes back its slot
        self._timer = None
        device = self.device
        try:
            try:
                result = device.finish_timed(sub)
            except BaseException:
                device.release()
                raise
            if result is not None and inspect.isawaitable(result):
                self._hand(_CARRY_AWAIT, result, runtime)
                return
            self._timers.release(device)
            sub.finished_at = now
            self._complete(sub, result, runtime)
        except BaseException as exc:
            self._settle_error(sub, exc, runtime)
        self._advance()

    def _hand(self, how: int, awaitable: Any, runtime: Runtime) -> None:
        """Give the head to the queue's task: the rest of its work must await."""
        self._stage = _TASK
        self._handed = (how, awaitable)
        wakeup = self._wakeup
        if wakeup is not None:
            self._wakeup = None
            if not wakeup.done():  # cancelled with the task as the runtime closed
                wakeup.set_result(None)
        elif self._task is None:
            runtime._start_queue(self)

    def _complete(self, sub: Submission, result: Any, runtime: Runtime) -> None:
        """Signal the head's semaphores with its frontier and finish it with ``result``."""
        signals = sub.signals
        if signals:
            frontier = sub._frontier
            if frontier is None:
                base = sub._base
                assert base is not None
                frontier = sub._frontier = self._materialize(base, sub.epoch)
            # While nothing was truncated, each frontier of this queue dominates its last.
            source = self._token if self._monotone else None
            try:
                for sem, value in signals:
                    if type(sem).signal is _PLAIN_SIGNAL:
                        sem._signal_from(source, value, frontier)
                    else:  # a subclass's signal (a cluster's owned semaphore) runs as such
                        sem.signal(value, frontier)
                    if self._state.log_debug:
                        runtime._log.debug(
                            "signal", queue=self.name, semaphore=sem.name, value=value
                        )
            except Exception as exc:
                self._fail(sub, exc)
                self._finished(sub, runtime)
                return
        sub._result = result
        sub.state = _COMPLETED
        if sub._futures is not None:
            sub._wake()
        # _finished, inline: the hot path of every submission
        self._current = None
        if sub._plan is not None:  # what a deadline policy learns of its workflow
            sub._plan.finished(sub.started_at, self._loop.time(), False)
        if signals:
            signalled = self._signalled
            for sem, value in signals:
                if signalled.get(sem) == value:
                    del signalled[sem]
        if sub.waits and self._unmet:
            self._unindex(sub)
        epoch = self._completed_epoch = sub.epoch
        state = self._state
        state.completed_epochs[self.axis] = epoch
        state.completed_cache = None
        if state.completion_waiters:
            runtime._axis_completed(self.axis, epoch)
        tracer = state.trace
        if tracer.enabled:
            tracer._add(sub)

    def _settle_error(self, sub: Submission, exc: BaseException, runtime: Runtime) -> None:
        """The head's work or waits raised ``exc``: fail it (and its signals) and go on."""
        error = exc
        if isinstance(exc, asyncio.CancelledError):
            # The work raised CancelledError itself (it awaited something that someone
            # else cancelled): an error of this submission only.
            error = CancelledWorkError(
                f"work {sub.name!r} on queue {self.name!r} raised CancelledError "
                "(it awaited something that was cancelled)"
            )
            error.__cause__ = exc
        self._fail(sub, error)
        self._finished(sub, runtime)
        if not isinstance(exc, Exception | asyncio.CancelledError):
            raise exc  # KeyboardInterrupt, SystemExit: not the work's error to keep

    def _forget(self, sub: Submission) -> None:
        """The head is done: let go of it and of the records of its signals and waits."""
        self._current = None
        if sub._plan is not None:  # what a deadline policy learns of its workflow
            sub._plan.finished(sub.started_at, self._loop.time(), sub.state is not _COMPLETED)
        if sub.signals:
            signalled = self._signalled
            for sem, value in sub.signals:
                # the record is this one's unless later work signals higher
                if signalled.get(sem) == value:
                    del signalled[sem]
        if sub.waits and self._unmet:
            self._unindex(sub)

    def _finished(self, sub: Submission, runtime: Runtime) -> None:
        """The head finished (completed or failed): advance the axis and trace it."""
        self._forget(sub)
        epoch = sub.epoch
        axis = self.axis
        self._completed_epoch = epoch
        state = self._state
        state.completed_epochs[axis] = epoch
        state.completed_cache = None
        if state.completion_waiters:
            runtime._axis_completed(axis, epoch)
        tracer = state.trace
        if tracer.enabled:
            tracer._add(sub)

    def _went_idle(self, runtime: Runtime) -> None:
        """The FIFO drained: a closed queue retires, an open one waits for submissions."""
        if self._closed:
            wakeup = self._wakeup
            if wakeup is not None:
                self._wakeup = None
                if not wakeup.done():  # the idle task wakes, sees the queue closed, ends
                    wakeup.set_result(None)
            if runtime._open:
                runtime._retire(self)
        runtime._queue_settled()

    async def _run(self) -> None:
        """The queue's task: carries the heads whose work must await (see ``_hand``)."""
        loop = self._loop
        try:
            while True:
                handed = self._handed
                if handed is None:
                    if self._closed and not self._busy():
                        return  # closed and drained: the task ends, the queue retires
                    wakeup = self._wakeup = loop.create_future()
                    try:
                        await wakeup
                    finally:
                        self._wakeup = None
                    continue
                self._handed = None
                sub = self._current
                assert sub is not None
                runtime = self.runtime
                try:
                    result = await self._carry(sub, handed[0], handed[1], runtime)
                except asyncio.CancelledError as exc:
                    task = asyncio.current_task()
                    if task is None or task.cancelling():
                        # The runtime itself is closing the queue.
                        closing = StalledError(f"runtime closed before {sub.name!r} finished")
                        self._fail(sub, closing)
                        self._forget(sub)
                        raise
                    self._settle_error(sub, exc, runtime)
                except Exception as exc:
                    self._settle_error(sub, exc, runtime)
                else:
                    self._complete(sub, result, runtime)
                # Let go of the finished work before idling: an idle queue task must not
                # keep its last submission (arguments, traceback) or result alive.
                del sub, runtime, handed
                result = None
                self._advance()
        finally:
            self._closed = True
            self._fail_pending()

    async def _carry(self, sub: Submission, how: int, awaitable: Any, runtime: Runtime) -> Any:
        """The awaiting part of the head's work; returns its result."""
        device = self.device
        loop = self._loop
        if how == _CARRY_ACQUIRE:
            # Working memory first: a memory wait holds no device slot.
            working = None if sub.memory is None else await self._reserve(sub)
            try:
                if self._plain_acquire:
                    if not self._arbiter.try_acquire():
                        await device.acquire(self.priority, sub)
                else:  # an override keeps the signature it was written for
                    await device.acquire(self.priority)
            except BaseException:
                self._unreserve(working)
                raise
            try:
                sub.state = SubmissionState.RUNNING
                sub.started_at = loop.time()
                if runtime._log_debug:
                    runtime._log.debug(
                        "start", queue=self.name, submission=sub.name, epoch=sub.epoch
                    )
                result = device.execute_now(sub)
                if result is LATER:
                    result = await device.execute(sub)
                elif result is not None and inspect.isawaitable(result):
                    result = await result
            finally:
                device.release()
                self._unreserve(working)
        else:
            try:
                if how == _CARRY_EXECUTE:
                    result = await device.execute(sub)
                else:
                    result = await awaitable
            finally:
                device.release()
        sub.finished_at = loop.time()
        return result

    async def _reserve(self, sub: Submission) -> WorkingMemory:
        """Reserve ``sub``'s working memory from the queue's context (see ``submit``)."""
        assert self.context is not None and sub.memory is not None
        return await self.runtime._memory.reserve_working(self.context, sub.memory, sub.name)

    def _unreserve(self, working: WorkingMemory | None) -> None:
        if working is not None:
            self.runtime._memory.release_working(working)

    def _fail_pending(self) -> None:
        """Fail the head and every submission still in the FIFO: the queue is closing."""
        sub = self._current
        if sub is not None:
            self._abort_head(sub)
        self._unmet.clear()
        self._signalled.clear()
        fifo = self._fifo
        if fifo:
            closing = StalledError(f"queue {self.name!r} closed before this work ran")
            while fifo:
                self._fail(fifo.popleft(), closing)

    def _abort_head(self, sub: Submission) -> None:
        """Withdraw whatever the head waits on, give back a slot it holds, and fail it."""
        held = False
        blocked, self._blocked = self._blocked, None
        self._wait_base = None
        self._wait_source = None
        if blocked is not None:
            _drop_waiters(blocked)
        slot, self._slot = self._slot, None
        if slot is not None and not slot.cancel() and not slot.cancelled():
            held = True  # granted just as the runtime closed: give it back
        timer, self._timer = self._timer, None
        if timer is not None:
            self._timers.remove(timer, self)
            held = True
        handed, self._handed = self._handed, None
        if handed is not None and handed[0] != _CARRY_ACQUIRE:
            held = True
            awaitable = handed[1]
            if inspect.iscoroutine(awaitable):
                awaitable.close()  # never to be awaited
        if held:
            self.device.release()
        self._fail(sub, StalledError(f"runtime closed before {sub.name!r} finished"))
        self._forget(sub)

    def _abort_blocked(self, doomed: Callable[[TimelineSemaphore, int], str | None]) -> bool:
        """Fail the head's waits that ``doomed`` names a reason for with a StalledError.

        ``doomed(semaphore, value)`` returns why nothing left can satisfy the wait, or
        None when something still can. Returns whether a wait was aborted.
        """
        blocked = self._blocked
        if blocked is None:
            return False
        sub = self._current
        label = sub.name if sub is not None else "?"
        aborted = False
        for sem, value, fut in blocked:
            if fut.done():
                continue
            reason = doomed(sem, value)
            if reason is None:
                continue
            sem._abandon(
                fut,
                StalledError(
                    f"submission {label!r} on queue {self.name!r} waits for semaphore "
                    f"{sem.name!r} to reach {value} (value {sem.value}) and {reason}"
                ),
            )
            aborted = True
        return aborted

    def _unindex(self, sub: Submission) -> None:
        """Forget a finished submission's unmet waits (it is the oldest in each record)."""
        unmet = self._unmet
        for sem, _ in sub.waits:
            record = unmet.get(sem)
            while record and record[0][1] is sub:
                record.popleft()
            if record is not None and not record:
                del unmet[sem]

    def _earlier_waiter(self, sem: TimelineSemaphore, value: int) -> tuple[int, Submission] | None:
        """The first pending submission here waiting for ``sem`` at or below ``value``."""
        record = self._unmet.get(sem)
        if record:
            for waited, sub in record:
                if sem._value < waited <= value and sub.state not in _DONE:
                    return waited, sub
        return None

    def _fail(self, sub: Submission, exc: BaseException) -> None:
        root = exc
        while isinstance(root, SemaphoreFailedError):
            root = root.root_cause
        if sub._base is None:
            sub._base = self._base
            self._last_epoch = sub.epoch
        if sub.finished_at is None:
            sub.finished_at = self._loop.time()
        for sem, value in sub.signals:
            if sem._value < value:
                sem.fail(root)
        sub._fail(exc)
        log = self.runtime._log
        if self.runtime._log_warning:
            log.warning(
                "fail",
                queue=self.name,
                submission=sub.name,
                epoch=sub.epoch,
                error=f"{type(root).__name__}: {root}",
            )


def _merged(
    base: Frontier,
    source: TimelineSemaphore | None,
    sem: TimelineSemaphore | None,
    frontier: Frontier,
) -> tuple[Frontier, TimelineSemaphore | None]:
    """``base | frontier`` (a frontier ``sem`` held, if not None) and whose frontier it is.

    ``source`` is a semaphore that once held a frontier covering ``base``, or None: kept when
    ``base`` covers ``frontier`` (the merge is ``base`` itself), ``sem`` when ``frontier``
    covers ``base``, None when the merge is a new frontier.
    """
    merged = base.merge(frontier)
    if merged is base:
        return base, source
    if merged is frontier:
        return frontier, sem
    return merged, None


# what ends a queue's wait from inside the runtime; anything else came from outside
_WAIT_ENDINGS: Final = (SemaphoreFailedError, StalledError, asyncio.CancelledError)


def _drop_waiters(blocked: list[Waiting]) -> None:
    """Withdraw the waits a head no longer needs (it failed or was cancelled)."""
    for sem, _, fut in blocked:
        fut.cancel()  # no-op once done
        if fut.cancelled():
            sem._forget_cancelled()


def _deadline_at(label: str, deadline: object, deadline_at: object, now: float) -> float:
    """The absolute deadline of ``deadline=`` (seconds from ``now``) or ``deadline_at=``."""
    if deadline is not None and deadline_at is not None:
        raise ValueError(
            f"{label!r}: give deadline= (seconds from submission) or deadline_at= (runtime "
            f"clock), not both (got {deadline!r} and {deadline_at!r})"
        )
    value = deadline if deadline is not None else deadline_at
    what = "deadline" if deadline is not None else "deadline_at"
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{label!r}: {what} must be a finite number of seconds, got {value!r}")
    if deadline is not None:
        if value < 0:
            raise ValueError(f"{label!r}: deadline must be >= 0 s from submission, got {value!r}")
        return now + float(value)
    return float(value)


def _check_memory(queue: DeviceQueue, memory: object) -> int:
    """``memory`` if it is working memory this queue can reserve; else the error."""
    if queue.context is None:
        raise TypeError(
            f"queue {queue.name!r} belongs to no context, so memory={memory!r} has no budget "
            "to reserve from: submit on a context's queue (ctx.queue or a session)"
        )
    if type(memory) is not int or memory <= 0:
        raise ValueError(
            f"queue {queue.name!r}: memory= is working memory in bytes, an int > 0; got {memory!r}"
        )
    return memory


def _check_pairs(label: str, pairs: tuple[Any, ...]) -> None:
    for pair in pairs:
        if (
            type(pair) is not tuple
            or len(pair) != 2
            or not isinstance(pair[0], TimelineSemaphore)
            or type(pair[1]) is not int
        ):
            if not isinstance(pair, tuple) or len(pair) != 2 or not isinstance(pair[1], int):
                raise TypeError(f"{label} must be (TimelineSemaphore, int) pairs, got {pair!r}")
            if not isinstance(pair[0], TimelineSemaphore):
                raise TypeError(f"{label} must be (TimelineSemaphore, int) pairs, got {pair!r}")
        if pair[1] < 0:
            raise ValueError(f"{label} value for semaphore {pair[0].name!r} must be >= 0")
        if pair[1] > MAX_VALUE:
            raise ValueError(
                f"{label} value for semaphore {pair[0].name!r} must be at most 2**64 - 1 "
                f"(the counter is 64-bit), got {pair[1]}"
            )
