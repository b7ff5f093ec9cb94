"""The trace's store: a ring of flat records of plain values, written as work finishes.

This is the part of the trace on the dispatch path (every finished submission is written
here), so it is compiled with the rest of the core; :class:`asyncfront.TraceRecorder`
adds reading and export on top of it.

A record is :data:`FIELDS` plain values (names, numbers, strings, a frontier's axes and
epochs) appended to a chunk of a flat list, so recording allocates nothing that outlives
the call and nothing the garbage collector keeps visiting, and the store never keeps a
submission, its queue, its semaphores, its work's arguments or a traceback alive.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any, Final, final

if TYPE_CHECKING:
    from ._queue import Submission
    from ._semaphore import TimelineSemaphore

__all__ = ("CHUNK_VALUES", "FIELDS", "Point", "RecordRing", "describe_error", "points")

# One sync point in a record: (semaphore name, value, semaphore identity). The identity
# (``id()`` of the semaphore) only tells apart semaphores that share a name when
# exports draw dependency arrows; it never refers back to the object.
Point = tuple[str, int, int]

FIELDS: Final = 12
"""Values per record: queue facts, name, epoch, three times, the frontier's axes and
epochs, waits, signals, error, annotations."""

CHUNK_VALUES: Final = 512 * FIELDS
"""Values per chunk of the flat store (512 records)."""

_CLEARED: Final = (None,) * FIELDS


def points(pairs: tuple[tuple[TimelineSemaphore, int], ...]) -> tuple[Point, ...]:
    """A submission's waits or signals as plain values."""
    if not pairs:
        return ()
    if len(pairs) == 1:
        sem, value = pairs[0]
        return ((sem.name, value, id(sem)),)
    return tuple([(s.name, v, id(s)) for s, v in pairs])


def describe_error(exc: BaseException) -> str:
    """``"TypeName: message"``: how records and logs show an error without keeping it."""
    return f"{type(exc).__name__}: {exc}"


@final
class RecordRing:
    """A ring of at most ``capacity`` flat records; ``enabled=False`` records nothing.

    The records lie in chunks of :data:`CHUNK_VALUES` values. Past the capacity the
    oldest record's values are cleared, and a chunk goes once all its records have.
    """

    capacity: int
    enabled: bool

    def __init__(self, capacity: int, enabled: bool) -> None:
        self.capacity = capacity
        self.enabled = enabled
        self._chunks: deque[list[Any]] = deque()
        self._tail: list[Any] = []  # the chunk being filled, also the last of _chunks
        self._chunks.append(self._tail)
        self._head = 0  # values of the first chunk already dropped
        self._added = 0  # records appended since the last clear (kept + dropped)
        self._limit = capacity  # _added beyond which the oldest record goes

    def _add(self, sub: Submission) -> None:
        """Record a finished submission as plain values (the queue calls this)."""
        waits = sub.waits
        signals = sub.signals
        exc = sub._exception
        frontier = sub._frontier
        if frontier is None:
            frontier = sub._base
        tail = self._tail
        tail.append(sub.queue._trace_info)
        tail.append(sub.name)
        tail.append(sub.epoch)
        tail.append(sub.submitted_at)
        tail.append(sub.started_at)
        tail.append(sub.finished_at)
        if frontier is None:
            tail.append(None)
            tail.append(None)
        else:
            tail.append(frontier._axes)
            tail.append(frontier._epochs)
        tail.append(points(waits) if waits else ())
        tail.append(points(signals) if signals else ())
        tail.append(None if exc is None else describe_error(exc))
        tail.append(sub.annotations)
        added = self._added = self._added + 1
        if len(tail) >= CHUNK_VALUES:
            self._tail = []
            self._chunks.append(self._tail)
        if added > self._limit:
            self._drop_oldest()

    def _drop_oldest(self) -> None:
        """Past the capacity: clear the oldest record's values (and its chunk once empty)."""
        self._limit += 1
        first = self._chunks[0]
        head = self._head
        if head + FIELDS >= len(first) and first is not self._tail:
            self._chunks.popleft()
            self._head = 0
        else:
            first[head : head + FIELDS] = _CLEARED
            self._head = head + FIELDS
            if first is self._tail and self._head == len(first):  # capacity 0
                first.clear()
                self._head = 0

    def _clear(self) -> None:
        """Forget every record (and the dropped count)."""
        self._chunks.clear()
        self._tail = []
        self._chunks.append(self._tail)
        self._head = 0
        self._added = 0
        self._limit = self.capacity

    def _count(self) -> int:
        """How many records are kept."""
        values = 0
        for chunk in self._chunks:
            values += len(chunk)
        return (values - self._head) // FIELDS

    def _raw_records(self) -> list[tuple[Any, ...]]:
        """The kept records as tuples, oldest first."""
        out: list[tuple[Any, ...]] = []
        head = self._head
        for chunk in self._chunks:
            for i in range(head, len(chunk), FIELDS):
                out.append(tuple(chunk[i : i + FIELDS]))
            head = 0
        return out
