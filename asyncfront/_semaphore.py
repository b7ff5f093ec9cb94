"""Timeline semaphores: monotonically increasing values whose signals carry frontiers."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future as ConcurrentFuture
from dataclasses import dataclass
from typing import Any, Final, SupportsIndex, TypeAlias

from mypy_extensions import mypyc_attr

from ._frontier import EMPTY, Frontier

__all__ = (
    "SemaphoreFailedError",
    "SemaphoreStatistics",
    "TimelineSemaphore",
    "wait_all",
    "wait_any",
)

_names: Final = itertools.count()
MAX_VALUE: Final = (1 << 64) - 1
"""The largest value a timeline semaphore holds: its counter is an unsigned 64-bit integer."""
_condition_lock: Final = threading.Lock()  # creates each semaphore's condition exactly once


class Waiter:
    """A wait resolved in place, whose owner is called back at once: no future, no loop turn.

    Queues wait with these, so a signal readies the waiting queue within the signalling
    call instead of waking a task on a later loop iteration. It answers the part of the
    future API the semaphore, the stall analysis and the queues use (``done``,
    ``cancelled``, ``result``, ``exception``, ``set_result``, ``set_exception``,
    ``cancel``); ``cancel`` does not call back, since only the owner cancels.
    """

    __slots__ = ("_callback", "_exception", "_result", "_state")

    # _state: 0 pending, 1 done, 2 failed, 3 cancelled

    def __init__(self, callback: Callable[[], None]) -> None:
        self._callback: Callable[[], None] | None = callback
        self._state = 0
        self._result: Frontier | None = None
        self._exception: BaseException | None = None

    def done(self) -> bool:
        """Whether it was resolved, failed or cancelled."""
        return self._state != 0

    def cancelled(self) -> bool:
        """Whether its owner withdrew it."""
        return self._state == 3

    def result(self) -> Frontier:
        """The frontier it was resolved with; raises its error otherwise."""
        state = self._state
        if state == 1:
            assert self._result is not None
            return self._result
        if state == 2:
            assert self._exception is not None
            raise self._exception
        if state == 3:
            raise asyncio.CancelledError()
        raise asyncio.InvalidStateError("the wait is still pending")

    def exception(self) -> BaseException | None:
        """The error it failed with (None when resolved); raises while pending or cancelled."""
        state = self._state
        if state == 3:
            raise asyncio.CancelledError()
        if state == 0:
            raise asyncio.InvalidStateError("the wait is still pending")
        return self._exception

    def set_result(self, frontier: Frontier) -> None:
        """Resolve it with ``frontier`` and call the owner back."""
        if self._state:
            raise asyncio.InvalidStateError("the wait is already done")
        self._result = frontier
        self._state = 1
        callback, self._callback = self._callback, None
        if callback is not None:
            callback()

    def set_exception(self, exc: BaseException) -> None:
        """Fail it with ``exc`` and call the owner back."""
        if self._state:
            raise asyncio.InvalidStateError("the wait is already done")
        self._exception = exc
        self._state = 2
        callback, self._callback = self._callback, None
        if callback is not None:
            callback()

    def cancel(self) -> bool:
        """Withdraw it (no call back); False once it is done."""
        if self._state:
            return False
        self._state = 3
        self._callback = None
        return True

    def __repr__(self) -> str:
        state = ("pending", "done", "failed", "cancelled")[self._state]
        return f"<Waiter {state}>"


AnyWaiter: TypeAlias = "asyncio.Future[Frontier] | Waiter"
"""What a semaphore's waiter heap holds: futures of ``wait()`` and queues' waiters."""


@mypyc_attr(native_class=False)
class SemaphoreFailedError(RuntimeError):
    """A wait or signal met a semaphore that was failed; ``__cause__`` is the original error."""

    def __init__(self, semaphore: TimelineSemaphore, cause: BaseException) -> None:
        super().__init__(
            f"semaphore {semaphore.name!r} failed at value {semaphore.value}: "
            f"{type(cause).__name__}: {cause}"
        )
        self.semaphore = semaphore
        self.__cause__ = cause

    @property
    def root_cause(self) -> BaseException:
        """The original error that failed the first semaphore in the chain."""
        cause = self.__cause__
        assert cause is not None
        return cause


@dataclass(frozen=True)
class SemaphoreStatistics:
    """A snapshot of a semaphore's state."""

    name: str
    value: int
    waiters: int
    frontier_entries: int
    failed: bool


@mypyc_attr(allow_interpreted_subclasses=True)
class TimelineSemaphore:
    """A monotonically increasing 64-bit counter whose signals carry frontiers.

    ``wait(v)`` completes once the value reaches ``v`` and returns the merged frontier of
    every signal so far. ``fail(exc)`` is sticky: it makes every current and future wait
    raise :class:`SemaphoreFailedError`. The semaphore binds to the event loop of its
    first async use; :meth:`signal_threadsafe` and :meth:`wait_sync` serve other threads.
    """

    __slots__ = (
        "__weakref__",
        "_cond",
        "_failure",
        "_frontier",
        "_live",
        "_loop",
        "_seq",
        "_source",
        "_value",
        "_waiters",
        "name",
    )

    def __init__(self, initial: SupportsIndex = 0, name: str | None = None) -> None:
        label = f"semaphore {name!r}" if name is not None else "semaphore"
        start = check_value(f"{label} initial value", initial)
        self.name = name if name is not None else f"sem{next(_names)}"
        self._value = start
        self._frontier = EMPTY
        # The token of the queue whose frontiers alone the semaphore's frontier merges.
        self._source: int | None = None
        self._failure: BaseException | None = None
        # heap of (target value, sequence, future): O(log n) insert, ordered wake-ups
        self._waiters: list[tuple[int, int, AnyWaiter]] = []
        self._seq = 0
        # Waiters still inside wait(): counted out when woken, failed, abandoned, or when a
        # cancelled waiter handles its cancellation. Done futures may linger in the heap;
        # they are skipped on wake-up and compacted away once they are the majority.
        self._live = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._cond: threading.Condition | None = None

    # -- state ---------------------------------------------------------------------

    @property
    def value(self) -> int:
        """The current value."""
        return self._value

    @property
    def frontier(self) -> Frontier:
        """The merge of every signal's frontier so far."""
        return self._frontier

    @property
    def failure(self) -> BaseException | None:
        """The error the semaphore was failed with, or None."""
        return self._failure

    def query(self) -> int:
        """The current value; raises :class:`SemaphoreFailedError` if the semaphore failed."""
        if self._failure is not None:
            raise SemaphoreFailedError(self, self._failure)
        return self._value

    def statistics(self) -> SemaphoreStatistics:
        """A frozen snapshot: value, live waiters, frontier size, failure."""
        return SemaphoreStatistics(
            name=self.name,
            value=self._value,
            waiters=self._live,
            frontier_entries=len(self._frontier),
            failed=self._failure is not None,
        )

    def __repr__(self) -> str:
        state = "failed" if self._failure is not None else f"value={self._value}"
        return (
            f"<TimelineSemaphore {self.name!r} {state} "
            f"waiters={self._live} frontier={self._frontier!r}>"
        )

    # -- signalling ----------------------------------------------------------------

    def signal(
        self, value: SupportsIndex, frontier: Frontier | Mapping[int, int] | None = None
    ) -> None:
        """Advance the value to ``value`` and merge ``frontier``; wakes satisfied waiters.

        ``frontier`` may be a :class:`Frontier` or a mapping ``{axis: epoch}``.

        Raises:
            TypeError: ``value`` is not an int, or ``frontier`` is neither a Frontier nor
                a mapping of ints to ints.
            ValueError: ``value`` is not greater than the current value, or above
                ``2**64 - 1``.
            SemaphoreFailedError: the semaphore has failed.
        """
        # Checked here, before anything is typed: ``value`` and ``frontier`` are what the
        # caller passed, whatever it is (the compiled core would otherwise coerce them).
        if type(value) is int and value <= MAX_VALUE:
            checked = value
        else:
            checked = check_value(f"semaphore {self.name!r}: signal value", value)
        if frontier is None or type(frontier) is Frontier:
            self._signal_from(None, checked, frontier)
        else:
            self._signal_from(None, checked, _as_frontier(self, frontier))

    def _signal_from(self, source: int | None, value: int, frontier: Frontier | None) -> None:
        """:meth:`signal`, by ``source`` (a queue's token) whose every frontier dominates its last.

        While every signal so far came from that one source, the semaphore's frontier is
        the source's last one, so the new frontier replaces it without a merge.
        """
        if type(value) is not int or value > MAX_VALUE:
            value = check_value(f"semaphore {self.name!r}: signal value", value)
        if frontier is not None and type(frontier) is not Frontier:
            frontier = _as_frontier(self, frontier)
        if self._failure is not None:
            raise SemaphoreFailedError(self, self._failure)
        if value <= self._value:
            raise ValueError(
                f"semaphore {self.name!r}: signal value {value} must exceed "
                f"current value {self._value}"
            )
        self._value = value
        if frontier is not None and frontier._axes:
            if source is not None and self._source is source:
                self._frontier = frontier
            else:
                merged = self._frontier = self._frontier.merge(frontier)
                self._source = source if merged is frontier else None
        waiters = self._waiters
        if waiters and waiters[0][0] <= value:
            current = self._frontier
            heappop = heapq.heappop
            woken = 0
            while waiters and waiters[0][0] <= value:
                fut = heappop(waiters)[2]
                if not fut.done():
                    fut.set_result(current)
                    woken += 1
            self._live -= woken
        if self._cond is not None:
            with self._cond:
                self._cond.notify_all()

    def fail(self, exc: BaseException) -> bool:
        """Fail the semaphore with ``exc`` (first failure wins); returns whether it took."""
        if self._failure is not None:
            return False
        self._failure = exc
        waiters, self._waiters = self._waiters, []
        self._live = 0
        for _, _, fut in waiters:
            if not fut.done():
                fut.set_exception(SemaphoreFailedError(self, exc))
        if self._cond is not None:
            with self._cond:
                self._cond.notify_all()
        return True

    def signal_threadsafe(
        self, value: SupportsIndex, frontier: Frontier | Mapping[int, int] | None = None
    ) -> ConcurrentFuture[None]:
        """Signal from any thread; the signal runs on the semaphore's loop.

        Returns a :class:`concurrent.futures.Future` that holds the outcome (a wrong
        value's ``ValueError`` included). Before the semaphore is bound to a loop, or
        on the loop's own thread, the signal happens at once.
        """
        result: ConcurrentFuture[None] = ConcurrentFuture()
        loop = self._loop
        if loop is None or loop.is_closed() or _on_loop_thread(loop):
            self._signal_into(result, value, frontier)
        else:
            loop.call_soon_threadsafe(self._signal_into, result, value, frontier)
        return result

    def _signal_into(
        self,
        result: ConcurrentFuture[None],
        value: SupportsIndex,
        frontier: Frontier | Mapping[int, int] | None,
    ) -> None:
        try:
            self.signal(value, frontier)
        except BaseException as exc:
            result.set_exception(exc)
        else:
            result.set_result(None)

    # -- waiting -------------------------------------------------------------------

    async def wait(self, value: int) -> Frontier:
        """Wait until the value reaches ``value``; returns the semaphore's frontier.

        Returns at once, without a loop round trip, when the value is already reached.

        Raises:
            TypeError / ValueError: ``value`` is not an int in ``0..2**64 - 1``.
            SemaphoreFailedError: the semaphore failed (now or later).
        """
        if type(value) is not int or value > MAX_VALUE or value < 0:
            value = check_value(f"semaphore {self.name!r}: wait value", value)
        if self._failure is not None:
            raise SemaphoreFailedError(self, self._failure)
        if self._value >= value:
            return self._frontier
        fut = self._add_waiter(value)
        try:
            return await fut
        except asyncio.CancelledError:
            fut.cancel()  # no-op once done; a pending future must never be woken later
            if fut.cancelled():
                self._forget_cancelled()
            raise

    def _add_waiter(self, value: int) -> asyncio.Future[Frontier]:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        fut: asyncio.Future[Frontier] = loop.create_future()
        self._seq += 1
        heapq.heappush(self._waiters, (value, self._seq, fut))
        self._live += 1
        return fut

    def _add_callback_waiter(
        self, value: int, callback: Callable[[], None], loop: asyncio.AbstractEventLoop
    ) -> Waiter:
        """A :class:`Waiter` for ``value`` that calls ``callback`` once it is resolved."""
        if self._loop is None:
            self._loop = loop
        waiter = Waiter(callback)
        self._seq += 1
        heapq.heappush(self._waiters, (value, self._seq, waiter))
        self._live += 1
        return waiter

    def _forget_cancelled(self) -> None:
        """Count out a waiter whose future was cancelled, once, from its own cancellation.

        A signal may already have popped the cancelled future, or a compaction dropped it,
        so the count cannot be kept by the heap; a failure already counted every waiter out.
        """
        if self._failure is not None:
            return
        self._live -= 1
        self._compact()

    def _compact(self) -> None:
        """Drop finished futures from the heap once they outnumber the live ones."""
        if self._live * 2 < len(self._waiters):
            self._waiters = [w for w in self._waiters if not w[2].done()]
            heapq.heapify(self._waiters)

    def _satisfy(self, fut: AnyWaiter, frontier: Frontier) -> None:
        """Resolve one waiter early with ``frontier`` (left in the heap as stale).

        For a device that orders the waiter's work after the signalling work itself
        (a CUDA stream waiting on an event) before the semaphore is signalled.
        """
        if not fut.done():
            fut.set_result(frontier)
            self._live -= 1
            self._compact()

    def _abandon(self, fut: AnyWaiter, exc: BaseException) -> None:
        """Fail one waiter's future (left in the heap as stale) without failing the semaphore."""
        if not fut.done():
            fut.set_exception(exc)
            self._live -= 1
            self._compact()

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Bind to ``loop`` (done automatically on first async use)."""
        if self._loop is not None and self._loop is not loop:
            raise RuntimeError(f"semaphore {self.name!r} is bound to another event loop")
        self._loop = loop

    def wait_sync(self, value: int, timeout: float | None = None) -> Frontier:
        """Block the calling thread until the value reaches ``value``.

        Raises:
            TimeoutError: not reached within ``timeout`` seconds.
            SemaphoreFailedError: the semaphore failed.
            RuntimeError: called on the thread running the semaphore's loop (it would
                deadlock).
        """
        value = check_value(f"semaphore {self.name!r}: wait value", value)
        if self._loop is not None and _on_loop_thread(self._loop):
            raise RuntimeError(
                f"wait_sync on semaphore {self.name!r} from its own event loop thread "
                "would deadlock; use 'await wait()'"
            )
        cond = self._cond
        if cond is None:
            # Two threads may arrive here together: both must wait on the one condition
            # that signal() notifies.
            with _condition_lock:
                if self._cond is None:
                    self._cond = threading.Condition()
                cond = self._cond
        deadline = None if timeout is None else time.monotonic() + timeout
        with cond:
            while True:
                if self._failure is not None:
                    raise SemaphoreFailedError(self, self._failure)
                if self._value >= value:
                    return self._frontier
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(
                        f"semaphore {self.name!r} did not reach {value} within "
                        f"{timeout} s (value {self._value})"
                    )
                cond.wait(remaining)


def check_value(label: str, value: Any) -> int:
    """``value`` if it is an int in ``0..2**64 - 1``; else a TypeError or ValueError."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{label} must be an int, got {value!r} ({type(value).__name__})")
    if value < 0:
        raise ValueError(f"{label} must be >= 0, got {value}")
    if value > MAX_VALUE:
        raise ValueError(f"{label} must be at most 2**64 - 1 (the counter is 64-bit), got {value}")
    return int(value)


def _as_frontier(sem: TimelineSemaphore, frontier: object) -> Frontier:
    if isinstance(frontier, Frontier):
        return frontier
    if isinstance(frontier, Mapping):
        try:
            return Frontier(frontier)
        except TypeError:
            pass
    raise TypeError(
        f"semaphore {sem.name!r}: frontier must be a Frontier or a mapping of axis (int) "
        f"to epoch (int), got {frontier!r}"
    )


def _on_loop_thread(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


def join_waiters(futures: Sequence[asyncio.Future[Frontier]]) -> asyncio.Future[None]:
    """A future that completes once every waiter has, or fails with the first that fails.

    A multi-wait fails as soon as any of its semaphores fails, even while an earlier
    one is still pending (IREE's multi-wait semantics).
    """
    joined: asyncio.Future[None] = futures[0].get_loop().create_future()
    remaining = len(futures)

    def on_done(fut: asyncio.Future[Frontier]) -> None:
        nonlocal remaining
        if fut.cancelled():
            if not joined.done():
                joined.cancel()
            return
        exc = fut.exception()  # retrieved even when it comes too late to matter
        if joined.done():
            return
        if exc is not None:
            joined.set_exception(exc)
            return
        remaining -= 1
        if not remaining:
            joined.set_result(None)

    for fut in futures:
        fut.add_done_callback(on_done)
    return joined


def _check_waits(
    label: str, waits: Iterable[tuple[TimelineSemaphore, int]]
) -> list[tuple[TimelineSemaphore, int]]:
    pairs = list(waits)
    for pair in pairs:
        if (
            not isinstance(pair, tuple)
            or len(pair) != 2
            or not isinstance(pair[0], TimelineSemaphore)
        ):
            raise TypeError(f"{label} takes (TimelineSemaphore, int) pairs, got {pair!r}")
        check_value(f"{label}: value for semaphore {pair[0].name!r}", pair[1])
    return pairs


async def wait_all(waits: Iterable[tuple[TimelineSemaphore, int]]) -> Frontier:
    """Wait for every ``(semaphore, value)`` pair; returns their merged frontier.

    Raises:
        TypeError / ValueError: a malformed pair.
        SemaphoreFailedError: any of the semaphores failed, now or while waiting,
            even while others are still pending.
    """
    pairs = _check_waits("wait_all", waits)
    for sem, _ in pairs:
        if sem._failure is not None:
            raise SemaphoreFailedError(sem, sem._failure)
    frontier = EMPTY
    pending: list[tuple[TimelineSemaphore, int]] = []
    for sem, value in pairs:
        if sem._value >= value:
            frontier = frontier.merge(sem._frontier)
        else:
            pending.append((sem, value))
    if not pending:
        return frontier
    if len(pending) == 1:
        sem, value = pending[0]
        return frontier.merge(await sem.wait(value))
    waiters = [(sem, sem._add_waiter(value)) for sem, value in pending]
    try:
        await join_waiters([fut for _, fut in waiters])
    finally:
        for sem, fut in waiters:
            fut.cancel()  # no-op once done
            if fut.cancelled():
                sem._forget_cancelled()
    for _, fut in waiters:
        frontier = frontier.merge(fut.result())
    return frontier


async def wait_any(waits: Sequence[tuple[TimelineSemaphore, int]]) -> tuple[int, Frontier]:
    """Wait for the first satisfied ``(semaphore, value)`` pair; returns its index and frontier.

    Raises:
        ValueError: ``waits`` is empty.
        SemaphoreFailedError: the first pair to finish belongs to a failed semaphore.
    """
    if not waits:
        raise ValueError("wait_any needs at least one (semaphore, value) pair")
    waits = _check_waits("wait_any", waits)
    for index, (sem, value) in enumerate(waits):
        if sem._failure is None and sem._value >= value:
            return index, sem._frontier
    tasks = [asyncio.ensure_future(sem.wait(value)) for sem, value in waits]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        first = min(tasks.index(t) for t in done)
        return first, tasks[first].result()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
