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
import math
import weakref
from collections import deque
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ._frontier import Frontier, axis_name
from ._semaphore import MAX_VALUE, SemaphoreFailedError, TimelineSemaphore, join_waiters
from .devices._base import LATER, Device

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
Waiting = tuple[TimelineSemaphore, int, "asyncio.Future[Frontier]"]


class CancelledWorkError(RuntimeError):
    """The work raised ``CancelledError`` itself (it awaited a task someone cancelled).

    It fails that submission and its signals like any error, and the queue goes on; only
    the runtime's own cancellation closes queues. ``__cause__`` is the ``CancelledError``.
    """


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


_COMPLETED = SubmissionState.COMPLETED
_DONE = (SubmissionState.COMPLETED, SubmissionState.FAILED)
_NO_KWARGS: dict[str, Any] = {}  # shared and never mutated: saves a live dict per submission


class Outcome:
    """Work that finishes once, with a result or an error; awaitable for the result.

    The shared core of :class:`Submission` and of a collective channel's steps.
    """

    __slots__ = ("_exception", "_futures", "_result", "name", "state")

    _kind = "work"

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

    _kind = "submission"

    def _event_loop(self) -> asyncio.AbstractEventLoop:
        return self.queue._loop

    def __repr__(self) -> str:
        return (
            f"<Submission {self.name!r} on {self.queue.name!r} epoch={self.epoch} "
            f"{self.state.value}>"
        )


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
        self.device = device
        self.axis = axis
        self.priority = priority
        self.name = name
        self._capacity = frontier_capacity
        # What every trace record of this queue names: plain values, shared by the records.
        self._trace_info = (name, axis, device.name, priority)
        self._loop = asyncio.get_running_loop()
        self._fifo: deque[Submission] = deque()
        self._wakeup: asyncio.Future[None] | None = None
        self._next_epoch = 1
        self._completed_epoch = 0
        self._base = Frontier()  # merge of every wait so far: the queue's causal history
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
        frontier = base.with_epoch(self.axis, epoch)
        if len(frontier._axes) > self._capacity:
            frontier = frontier.truncated(self._capacity, keep=self.axis)
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
        memory: int | None = None,
        deadline: float | None = None,
        deadline_at: float | None = None,
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
        if fn is not None and not callable(fn):
            raise TypeError(
                f"queue {self.name!r}: work must be callable (or None for a barrier), "
                f"got {fn!r} ({type(fn).__name__})"
            )
        waits_t = tuple(waits) if waits else ()
        signals_t = tuple(signals) if signals else ()
        if waits_t:
            _check_pairs("waits", waits_t)
        if signals_t:
            _check_pairs("signals", signals_t)
            for sem, value in signals_t:
                if value <= sem._value:
                    raise ValueError(
                        f"queue {self.name!r}: signal value {value} for semaphore "
                        f"{sem.name!r} must exceed its current value {sem._value}"
                    )
        if cost is not None and cost < 0:
            raise ValueError(f"cost must be >= 0, got {cost}")
        if memory is not None:
            _check_memory(self, memory)
        if deadline is not None or deadline_at is not None:
            deadline_at = _deadline_at(self.name, deadline, deadline_at, self._loop.time())
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
            self._loop.time(),
        )
        if memory is not None:
            sub.memory = memory
            sub.annotate(memory=memory)
        if deadline_at is not None:
            sub.deadline_at = deadline_at
        self._fifo.append(sub)
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
        hook = self.runtime._submit_hook
        if hook is not None:
            hook(sub)
        wakeup = self._wakeup
        if wakeup is not None:
            self._wakeup = None
            wakeup.set_result(None)
        elif self._task is None:
            self.runtime._start_queue(self)
        runtime = self.runtime
        if runtime._log_debug:
            runtime._log.debug(
                "submit", queue=self.name, submission=name, epoch=epoch, waits=len(waits_t)
            )
        return sub

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

    async def _run(self) -> None:
        fifo = self._fifo
        loop = self._loop
        runtime = self.runtime
        completed = runtime._completed_epochs
        tracer = runtime.trace
        axis = self.axis
        device = self.device
        claims = device.claims_waits
        capacity = self._capacity
        arbiter = device._arbiter
        plain_acquire = type(device).acquire is Device.acquire
        try:
            while True:
                if not fifo:
                    if self._closed:
                        return  # closed and drained: the task ends, the queue retires
                    runtime._queue_settled()
                    wakeup = self._wakeup = loop.create_future()
                    await wakeup
                    continue
                sub = fifo.popleft()
                self._current = sub
                try:
                    base = self._base
                    if sub.waits:
                        sub.state = SubmissionState.WAITING
                        blocked: list[Waiting] | None = None
                        for sem, value in sub.waits:
                            failure = sem._failure
                            if failure is not None:
                                if blocked is not None:
                                    _drop_waiters(blocked)
                                raise SemaphoreFailedError(sem, failure)
                            if sem._value >= value:
                                base = base.merge(sem._frontier)
                                continue
                            fut = sem._add_waiter(value)
                            if blocked is None:
                                blocked = [(sem, value, fut)]
                            else:
                                blocked.append((sem, value, fut))
                            if claims:
                                device.claim_wait(sub, sem, value, fut)
                        if blocked is not None:
                            self._blocked = blocked
                            if runtime._stall_timer is None or runtime._draining:
                                runtime._queue_blocked()
                            try:
                                if len(blocked) == 1:
                                    await blocked[0][2]
                                else:
                                    # Fail as soon as any wait fails, even while an
                                    # earlier one is still pending.
                                    await join_waiters([w[2] for w in blocked])
                            except BaseException as exc:
                                _drop_waiters(blocked)
                                if not isinstance(exc, _WAIT_ENDINGS):
                                    runtime._note_stall()  # an outside error ended the wait
                                raise
                            finally:
                                self._blocked = None
                            for _, _, fut in blocked:
                                base = base.merge(fut.result())
                        if len(base._axes) > capacity:
                            base = base.truncated(capacity, keep=axis)
                        self._base = base
                    # The frontier is base | {axis: epoch}, built only when someone needs it.
                    sub._base = base
                    self._last_epoch = sub.epoch
                    if sub.fn is None and sub.cost is None:
                        sub.started_at = sub.finished_at = loop.time()
                        result = None
                    else:
                        sub.state = SubmissionState.READY
                        # Working memory first: a memory wait holds no device slot.
                        working = None if sub.memory is None else await self._reserve(sub)
                        try:
                            # A slot free with nobody ahead is taken without a coroutine;
                            # the arbiter decides exactly as acquire() would.
                            if plain_acquire:
                                if not arbiter.try_acquire():
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
                        sub.finished_at = loop.time()
                    if sub.signals:
                        frontier = sub.frontier
                        for sem, value in sub.signals:
                            sem.signal(value, frontier)
                            if runtime._log_debug:
                                runtime._log.debug(
                                    "signal", queue=self.name, semaphore=sem.name, value=value
                                )
                    sub._result = result
                    sub.state = _COMPLETED
                    if sub._futures is not None:
                        sub._wake()
                except asyncio.CancelledError as exc:
                    task = asyncio.current_task()
                    if task is None or task.cancelling():
                        # The runtime itself is closing the queue.
                        closing = StalledError(f"runtime closed before {sub.name!r} finished")
                        self._fail(sub, closing)
                        raise
                    # The work raised CancelledError itself (it awaited something that
                    # someone else cancelled): an error of this submission only.
                    error = CancelledWorkError(
                        f"work {sub.name!r} on queue {self.name!r} raised CancelledError "
                        "(it awaited something that was cancelled)"
                    )
                    error.__cause__ = exc
                    self._fail(sub, error)
                except Exception as exc:
                    self._fail(sub, exc)
                finally:
                    self._current = None
                    if sub.signals:
                        signalled = self._signalled
                        for sem, value in sub.signals:
                            # the record is this one's unless later work signals higher
                            if signalled.get(sem) == value:
                                del signalled[sem]
                    if sub.waits and self._unmet:
                        self._unindex(sub)
                    if sub._plan is not None:
                        sub._plan.finished(
                            sub.started_at,
                            loop.time(),
                            sub.state is not _COMPLETED,
                        )
                self._completed_epoch = sub.epoch
                completed[axis] = sub.epoch
                runtime._completed_cache = None
                if runtime._completion_waiters:
                    runtime._axis_completed(axis, sub.epoch)
                if tracer.enabled:
                    tracer._add(sub)
                # Let go of the finished work before idling: an idle queue task must not
                # keep its last submission (arguments, traceback) or result alive.
                del sub
                result = None
        finally:
            self._closed = True
            self._fail_pending()

    async def _reserve(self, sub: Submission) -> WorkingMemory:
        """Reserve ``sub``'s working memory from the queue's context (see ``submit``)."""
        assert self.context is not None and sub.memory is not None
        return await self.runtime._memory.reserve_working(self.context, sub.memory, sub.name)

    def _unreserve(self, working: WorkingMemory | None) -> None:
        if working is not None:
            self.runtime._memory.release_working(working)

    def _fail_pending(self) -> None:
        """Fail every submission still in the FIFO: the queue is closing."""
        self._unmet.clear()
        self._signalled.clear()
        fifo = self._fifo
        if fifo:
            closing = StalledError(f"queue {self.name!r} closed before this work ran")
            while fifo:
                self._fail(fifo.popleft(), closing)

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


# what ends a queue's wait from inside the runtime; anything else came from outside
_WAIT_ENDINGS = (SemaphoreFailedError, StalledError, asyncio.CancelledError)


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


def _check_memory(queue: DeviceQueue, memory: object) -> None:
    if queue.context is None:
        raise TypeError(
            f"queue {queue.name!r} belongs to no context, so memory={memory!r} has no budget "
            "to reserve from: submit on a context's queue (ctx.queue or a session)"
        )
    if type(memory) is not int or memory <= 0:
        raise ValueError(
            f"queue {queue.name!r}: memory= is working memory in bytes, an int > 0; got {memory!r}"
        )


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
