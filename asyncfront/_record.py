"""The trace's store: a ring of flat records of plain values, written as work finishes.

This is the part of the trace on the dispatch path (every finished submission is written
here), so it is compiled with the rest of the core; :class:`asyncfront.TraceRecorder`
adds reading and export on top of it.

A record is :data:`FIELDS` plain values (names, numbers, strings, the axes and epochs of
the frontier the work started from) appended to a chunk of a flat list. A wait or signal
on one semaphore is stored as its name, value and identity side by side, not as a tuple,
and the frontier as the tuples of the base the queue already holds, so recording keeps
no new object that the garbage collector has to visit. The store never keeps a
submission, its queue, its semaphores, its work's arguments or a traceback alive.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any, Final, final

if TYPE_CHECKING:
    from ._queue import Submission
    from ._semaphore import TimelineSemaphore

__all__ = ("CHUNK_VALUES", "FIELDS", "Point", "RecordRing", "decode_points", "describe_error")

# One sync point in a record: (semaphore name, value, semaphore identity). The identity
# (``id()`` of the semaphore) only tells apart semaphores that share a name when
# exports draw dependency arrows; it never refers back to the object.
Point = tuple[str, int, int]

FIELDS: Final = 16
"""Values per record: queue facts, name, epoch, three times, the base frontier's axes and
epochs, three for the waits (names, values, identities), three for the signals, error,
annotations."""

CHUNK_VALUES: Final = 512 * FIELDS
"""Values per chunk of the flat store (512 records)."""

_CLEARED: Final = (None,) * FIELDS


def decode_points(names: Any, values: Any, ids: Any) -> tuple[Point, ...]:
    """The points stored flat by :meth:`RecordRing._add`, as ``(name, value, id)`` tuples."""
    if names is None:
        return ()
    if type(names) is str:
        return ((names, values, ids),)
    return tuple(zip(names, values, ids, strict=True))


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
        # The chunk being filled, also the last of _chunks: allocated whole, so writing a
        # record stores into slots instead of growing (and copying) a list.
        self._tail: list[Any] = [None] * CHUNK_VALUES
        self._fill = 0  # values written into the tail
        self._chunks.append(self._tail)
        self._head = 0  # values of the first chunk already dropped
        self._added = 0  # records appended since the last clear (kept + dropped)
        self._limit = capacity  # _added beyond which the oldest record goes

    def _add(self, sub: Submission) -> None:
        """Record a finished submission as plain values (the queue calls this)."""
        waits = sub.waits
        signals = sub.signals
        exc = sub._exception
        # The base, not the frontier built from it: the frontier is the base with the
        # work's own epoch (exports rebuild it exactly so), and keeping the base's tuples,
        # which the queue holds anyway, keeps no tuple alive that only the record needs.
        frontier = sub._base
        tail = self._tail
        i = self._fill
        tail[i] = sub.queue._trace_info
        tail[i + 1] = sub.name
        tail[i + 2] = sub.epoch
        tail[i + 3] = sub.submitted_at
        tail[i + 4] = sub.started_at
        tail[i + 5] = sub.finished_at
        if frontier is not None:  # else the slots hold None already
            tail[i + 6] = frontier._axes
            tail[i + 7] = frontier._epochs
        if waits:
            _store_points(tail, i + 8, waits)
        if signals:
            _store_points(tail, i + 11, signals)
        if exc is not None:
            tail[i + 14] = describe_error(exc)
        tail[i + 15] = sub.annotations
        i += FIELDS
        if i >= CHUNK_VALUES:
            self._tail = [None] * CHUNK_VALUES
            self._chunks.append(self._tail)
            i = 0
        self._fill = i
        added = self._added = self._added + 1
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
            if first is self._tail and self._head == self._fill:  # capacity 0: start over
                self._head = self._fill = 0

    def _clear(self) -> None:
        """Forget every record (and the dropped count)."""
        self._chunks.clear()
        self._tail = [None] * CHUNK_VALUES
        self._fill = 0
        self._chunks.append(self._tail)
        self._head = 0
        self._added = 0
        self._limit = self.capacity

    def _count(self) -> int:
        """How many records are kept."""
        values = self._fill
        for chunk in self._chunks:
            if chunk is not self._tail:
                values += len(chunk)
        return (values - self._head) // FIELDS

    def _raw_records(self) -> list[tuple[Any, ...]]:
        """The kept records as 12-tuples, oldest first, each waits and signals as a
        tuple of ``(name, value, id)`` points."""
        out: list[tuple[Any, ...]] = []
        head = self._head
        for chunk in self._chunks:
            end = self._fill if chunk is self._tail else len(chunk)
            for i in range(head, end, FIELDS):
                out.append(
                    (
                        *chunk[i : i + 8],
                        decode_points(chunk[i + 8], chunk[i + 9], chunk[i + 10]),
                        decode_points(chunk[i + 11], chunk[i + 12], chunk[i + 13]),
                        chunk[i + 14],
                        chunk[i + 15],
                    )
                )
            head = 0
        return out


def _store_points(
    tail: list[Any], i: int, pairs: tuple[tuple[TimelineSemaphore, int], ...]
) -> None:
    """Store waits or signals flat from slot ``i``: one pair as name, value, identity;
    several as three tuples of those (no pairs leave the three slots None)."""
    if len(pairs) == 1:
        sem, value = pairs[0]
        tail[i] = sem.name
        tail[i + 1] = value
        tail[i + 2] = id(sem)
    else:
        tail[i] = tuple([s.name for s, _ in pairs])
        tail[i + 1] = tuple([v for _, v in pairs])
        tail[i + 2] = tuple([id(s) for s, _ in pairs])
