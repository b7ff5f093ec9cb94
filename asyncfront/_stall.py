"""Stall analysis: which blocked waits can still be satisfied by work that is queued.

A pure, synchronous decision over a snapshot of the runtime's queues and collective
channels. A wait is *reachable* when the semaphore already holds the value, or some
queued work that can itself run signals at least that value. Work can run when each of
its waits is reachable; work queued behind a stalled head counts (the head fails and the
queue goes on), but work never satisfies a wait of a submission ahead of it on its own
queue: the queue runs that submission first. The analysis iterates to a fixpoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._collective import CollectiveChannel
    from ._queue import DeviceQueue, Submission
    from ._semaphore import AnyWaiter, TimelineSemaphore

__all__ = ("StallAnalysis", "StalledWait")


@dataclass(frozen=True)
class StalledWait:
    """One wait of a blocked head, as the stall report names it (plain values only)."""

    queue: str
    submission: str
    semaphore: str
    value: int
    current: int
    doomed: bool  # nothing queued can satisfy or fail it
    reason: str

    def describe(self) -> str:
        """One line for logs and errors."""
        return (
            f"queue {self.queue!r}: submission {self.submission!r} waits for semaphore "
            f"{self.semaphore!r} to reach {self.value} (value {self.current}); {self.reason}"
        )


class _Item:
    """A queued unit of work: a submission (with its queue position) or a collective step."""

    __slots__ = ("name", "parts", "position", "queue", "runnable", "signals", "waits")

    def __init__(
        self,
        name: str,
        queue: DeviceQueue | None,
        position: int,
        waits: Sequence[tuple[TimelineSemaphore, int]],
        signals: Sequence[tuple[TimelineSemaphore, int]],
        parts: tuple[Submission, ...] = (),
    ) -> None:
        self.name = name
        self.queue = queue
        self.position = position
        self.waits = waits
        self.signals = signals
        self.parts = parts
        self.runnable = False


class StallAnalysis:
    """The fixpoint of reachable semaphore values over the queued work of a runtime."""

    def __init__(
        self, queues: Sequence[DeviceQueue], channels: Sequence[CollectiveChannel] = ()
    ) -> None:
        items: list[_Item] = []
        by_submission: dict[int, _Item] = {}
        for q in queues:
            queued: list[Submission] = []
            if q._current is not None:
                queued.append(q._current)
            queued.extend(q._fifo)
            for position, sub in enumerate(queued):
                item = _Item(sub.name, q, position, sub.waits, sub.signals)
                items.append(item)
                by_submission[id(sub)] = item
        steps: list[_Item] = []
        for channel in channels:
            for queued_step in channel._steps:
                steps.append(
                    _Item(queued_step.name, None, 0, (), queued_step.signals, queued_step.parts)
                )
        self._items = items
        # semaphore -> items that signal it and can run, with the value they signal
        self._signallers: dict[TimelineSemaphore, list[tuple[int, _Item]]] = {}
        self._all_signallers: dict[TimelineSemaphore, list[tuple[int, _Item]]] = {}
        for item in (*items, *steps):
            for sem, value in item.signals:
                self._all_signallers.setdefault(sem, []).append((value, item))
        changed = True
        while changed:
            changed = False
            for item in items:
                if not item.runnable and all(self._reachable(item, s, v) for s, v in item.waits):
                    self._mark(item)
                    changed = True
            for step in steps:
                if not step.runnable and all(
                    (part_item := by_submission.get(id(part))) is None or part_item.runnable
                    for part in step.parts
                ):
                    self._mark(step)
                    changed = True

    def _mark(self, item: _Item) -> None:
        item.runnable = True
        for sem, value in item.signals:
            self._signallers.setdefault(sem, []).append((value, item))

    def _reachable(self, waiter: _Item, sem: TimelineSemaphore, value: int) -> bool:
        if sem._failure is not None or sem._value >= value:
            return True  # it ends at once: satisfied, or failed
        for signalled, item in self._signallers.get(sem, ()):
            if signalled >= value and not _behind(item, waiter):
                return True
        return False

    def explain(self, queue: DeviceQueue, sem: TimelineSemaphore, value: int) -> tuple[bool, str]:
        """Whether the head of ``queue`` waits in vain for ``sem`` to reach ``value``, and why.

        A wait is in vain when queued work can neither satisfy it nor fail it: work that
        cannot run fails in turn (its wait is aborted, or fails from upstream), and its
        failure fails the semaphores it signals, which ends this wait with the root cause.
        """
        head = next((i for i in self._items if i.queue is queue and i.position == 0), None)
        if head is None or self._reachable(head, sem, value):
            return False, "queued work can still signal it"
        signallers = self._all_signallers.get(sem, ())
        ahead = [(v, i) for v, i in signallers if not _behind(i, head)]
        if any(not i.runnable for _, i in ahead):
            names = ", ".join(repr(i.name) for _, i in ahead if not i.runnable)
            return False, f"it ends when {names}, stalled in turn, fails"
        if not signallers:
            return True, "nothing queued signals it"
        if not ahead:
            names = ", ".join(repr(i.name) for _, i in signallers)
            return True, f"only {names}, queued behind it on the same queue, signals it"
        top = max(v for v, _ in ahead)
        return True, f"queued work signals it only up to {top}"

    def reason(self, queue: DeviceQueue, sem: TimelineSemaphore, value: int) -> str | None:
        """Why the head of ``queue`` waits in vain for ``sem`` to reach ``value``; else None."""
        doomed, why = self.explain(queue, sem, value)
        return why if doomed else None

    def stalled_waits(
        self, queues: Sequence[DeviceQueue], *, ended_from_outside: bool = False
    ) -> list[StalledWait]:
        """Every unmet wait of the blocked heads of ``queues``, with its reason.

        With ``ended_from_outside``, waits that an error from outside the runtime (a
        virtual-time idle timeout) has just ended count as unmet too.
        """
        found: list[StalledWait] = []
        for q in queues:
            blocked = q._blocked
            sub = q._current
            if blocked is None or sub is None:
                continue
            for sem, value, fut in blocked:
                if fut.done() and not (ended_from_outside and _ended_from_outside(fut)):
                    continue
                doomed, why = self.explain(q, sem, value)
                found.append(
                    StalledWait(
                        queue=q.name,
                        submission=sub.name,
                        semaphore=sem.name,
                        value=value,
                        current=sem.value,
                        doomed=doomed,
                        reason=why,
                    )
                )
        return found


def _ended_from_outside(fut: AnyWaiter) -> bool:
    from ._queue import StalledError
    from ._semaphore import SemaphoreFailedError

    if fut.cancelled():
        return False
    exc = fut.exception()
    return exc is not None and not isinstance(exc, SemaphoreFailedError | StalledError)


def _behind(item: _Item, waiter: _Item) -> bool:
    """Whether ``item`` runs only after ``waiter`` finishes (same queue, not ahead of it)."""
    return (
        item.queue is not None and item.queue is waiter.queue and item.position >= waiter.position
    )
