"""Trace recording and export: every finished submission, as Perfetto/Chrome JSON or HTML.

A record is a flat tuple of plain values (names, numbers, strings, a frontier's axes and
epochs) taken when a submission finishes, so the trace never keeps a submission, its
queue, its semaphores, its work's arguments or an exception's traceback alive. The
recorder is a ring: past its capacity the oldest records go, and every export says how
many were dropped.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, SupportsIndex

from ._frontier import DEFAULT_FRONTIER_CAPACITY, Frontier, axis_name
from ._record import Point, RecordRing

__all__ = ("DEFAULT_TRACE_CAPACITY", "TraceRecord", "TraceRecorder")

DEFAULT_TRACE_CAPACITY = 50_000
"""Default number of records a trace keeps (the oldest are dropped beyond it).

Measured on CPython 3.11 with tracemalloc (the memory a full ring gives back when
cleared): about 0.33 KB per record for work with one wait and one signal on a few axes
(the points lie flat in the ring; the frontier's tuples are the base's, shared with the
queue). A graph stage's annotations and 64-axis frontiers cost more, at most about
1.1 KB a record. The default ring therefore costs about 16 MB, at most about 55 MB.
"""

# Queue facts shared by every record of one queue: (name, axis, device name, priority).
QueueInfo = tuple[str, int, str, int]

_Point = Point

# (queue, name, epoch, submitted_at, started_at, finished_at, axes and epochs of the
#  frontier or its base, waits, signals, error, annotations). The frontier is kept as its
# two tuples of ints, not as the Frontier object: a record of plain values only is one
# the garbage collector stops tracking, so a full trace ring costs collections nothing.
_Raw = tuple[
    QueueInfo,
    str,
    int,
    float,
    "float | None",
    "float | None",
    "tuple[int, ...] | None",
    "tuple[int, ...] | None",
    tuple[_Point, ...],
    tuple[_Point, ...],
    "str | None",
    "dict[str, Any] | None",
]


@dataclass(frozen=True)
class TraceRecord:
    """One finished submission as the trace saw it (times in runtime seconds)."""

    queue: str
    axis: int
    device: str
    name: str
    epoch: int
    submitted_at: float
    started_at: float
    finished_at: float
    frontier: Frontier
    waits: tuple[tuple[str, int], ...]
    signals: tuple[tuple[str, int], ...]
    error: str | None
    annotations: dict[str, Any] = field(default_factory=dict)

    @property
    def duration(self) -> float:
        """Seconds from start to finish."""
        return self.finished_at - self.started_at


class TraceRecorder:
    """Appends a flat record per finished submission; formats only on export.

    Holds at most ``capacity`` records (the oldest are dropped and counted in
    :attr:`dropped`), so long runs stay flat in memory. ``enabled=False`` records
    nothing.

    Args:
        capacity: the most records kept (see :data:`DEFAULT_TRACE_CAPACITY`).
        enabled: whether to record at all.
        frontier_capacity: the runtime's frontier capacity, used to build a record's
            frontier on export exactly as the queue would have.

    Raises:
        ValueError: ``capacity`` is negative or ``frontier_capacity`` below 1.
    """

    def __init__(
        self,
        capacity: SupportsIndex = DEFAULT_TRACE_CAPACITY,
        *,
        enabled: bool = True,
        frontier_capacity: SupportsIndex = DEFAULT_FRONTIER_CAPACITY,
    ) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
            raise ValueError(f"trace capacity must be an int >= 0, got {capacity!r}")
        if (
            isinstance(frontier_capacity, bool)
            or not isinstance(frontier_capacity, int)
            or frontier_capacity < 1
        ):
            raise ValueError(f"frontier capacity must be an int >= 1, got {frontier_capacity!r}")
        # The records themselves, in the compiled core: what queues write as work finishes.
        self._ring = RecordRing(capacity, bool(enabled))
        self.origin = 0.0
        self.frontier_capacity = frontier_capacity

    @property
    def capacity(self) -> int:
        """The most records kept (a new value takes effect at the next :meth:`clear`)."""
        return self._ring.capacity

    @capacity.setter
    def capacity(self, capacity: int) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
            raise ValueError(f"trace capacity must be an int >= 0, got {capacity!r}")
        self._ring.capacity = capacity

    @property
    def enabled(self) -> bool:
        """Whether finished submissions are recorded (settable at any time)."""
        return self._ring.enabled

    @enabled.setter
    def enabled(self, enabled: bool) -> None:
        self._ring.enabled = bool(enabled)

    @property
    def _raw(self) -> list[_Raw]:
        """The kept records as tuples, oldest first."""
        return self._ring._raw_records()

    @property
    def dropped(self) -> int:
        """How many records the ring dropped (oldest first) since the last :meth:`clear`."""
        return self._ring._added - len(self)

    def clear(self) -> None:
        """Forget every record (and the dropped count)."""
        self._ring._clear()

    def __len__(self) -> int:
        return self._ring._count()

    def _frontier(
        self, axes: tuple[int, ...] | None, epochs: tuple[int, ...] | None, axis: int, epoch: int
    ) -> Frontier:
        """A record's frontier: stored whole, or built from its base as the queue builds it."""
        if axes is None or epochs is None:
            return Frontier()
        stored = Frontier._make(axes, epochs)
        if stored.get(axis) >= epoch:
            return stored
        frontier = stored.with_epoch(axis, epoch)
        if len(frontier) > self.frontier_capacity:
            frontier = frontier.truncated(self.frontier_capacity, keep=axis)
        return frontier

    def __iter__(self) -> Iterator[TraceRecord]:
        origin = self.origin
        for (
            info,
            name,
            epoch,
            sub_at,
            start,
            end,
            axes,
            epochs,
            waits,
            signals,
            error,
            notes,
        ) in self._raw:
            start_t = (start if start is not None else sub_at) - origin
            end_t = (end if end is not None else start_t + origin) - origin
            yield TraceRecord(
                queue=info[0],
                axis=info[1],
                device=info[2],
                name=name,
                epoch=epoch,
                submitted_at=sub_at - origin,
                started_at=start_t,
                finished_at=end_t,
                frontier=self._frontier(axes, epochs, info[1], epoch),
                waits=tuple((s, v) for s, v, _ in waits),
                signals=tuple((s, v) for s, v, _ in signals),
                error=error,
                annotations=dict(notes) if notes else {},
            )

    @property
    def records(self) -> list[TraceRecord]:
        """Every record kept, oldest first."""
        return list(self)

    def __repr__(self) -> str:
        return (
            f"<TraceRecorder records={len(self)} capacity={self.capacity} dropped={self.dropped}>"
        )

    # -- export --------------------------------------------------------------------

    def _axis_names(self, raw: list[_Raw]) -> dict[int, str]:
        """Names of the queues the records ran on: they outlive the queues themselves."""
        return {info[1]: info[0] for info, *_ in raw}

    def to_perfetto(self) -> dict[str, Any]:
        """The trace as a Chrome trace-event document that ui.perfetto.dev loads.

        A process per device, a thread per queue, a complete ("X") event per
        submission with its frontier, waits, signals and annotations (graph stage,
        placement, collective step), and flow arrows from the
        submission that signalled a semaphore value to each one that waited on it.
        ``otherData`` (the format's metadata) says how many records were kept and how
        many older ones the ring dropped.
        """
        events: list[dict[str, Any]] = []
        pids: dict[str, int] = {}
        tids: dict[int, int] = {}
        producers: dict[tuple[str, int], list[tuple[int, float, int, int, float]]] = {}
        origin = self.origin
        raw = self._raw
        names = self._axis_names(raw)

        def name_of(ax: int) -> str:
            known = names.get(ax)
            return known if known is not None else axis_name(ax)

        for (qname, qaxis, device, priority), *_ in raw:
            if device not in pids:
                pid = pids[device] = len(pids) + 1
                events.append(
                    {"name": "process_name", "ph": "M", "pid": pid, "args": {"name": device}}
                )
            if qaxis not in tids:
                tid = tids[qaxis] = len(tids) + 1
                events.append(
                    {
                        "name": "thread_name",
                        "ph": "M",
                        "pid": pids[device],
                        "tid": tid,
                        "args": {"name": qname},
                    }
                )
                events.append(
                    {
                        "name": "thread_sort_index",
                        "ph": "M",
                        "pid": pids[device],
                        "tid": tid,
                        "args": {"sort_index": -priority},
                    }
                )
        timed: list[tuple[tuple[_Point, ...], int, int, float]] = []
        for (
            info,
            name,
            epoch,
            sub_at,
            start,
            end,
            axes,
            epochs,
            waits,
            signals,
            error,
            notes,
        ) in raw:
            qname, qaxis, device, _ = info
            pid, tid = pids[device], tids[qaxis]
            ts = ((start if start is not None else sub_at) - origin) * 1e6
            dur = max(0.0, ((end if end is not None else sub_at) - origin) * 1e6 - ts)
            timed.append((waits, pid, tid, ts))
            frontier = self._frontier(axes, epochs, qaxis, epoch)
            args: dict[str, Any] = {
                "queue": qname,
                "epoch": epoch,
                "frontier": {name_of(a): e for a, e in frontier},
                "waits": [f"{s} >= {v}" for s, v, _ in waits],
                "signals": [f"{s} = {v}" for s, v, _ in signals],
                "submitted_us": round((sub_at - origin) * 1e6, 3),
            }
            if error is not None:
                args["error"] = error
            if notes:
                args.update(notes)
            events.append(
                {
                    "name": name,
                    "cat": "failed" if error is not None else "submission",
                    "ph": "X",
                    "ts": round(ts, 3),
                    "dur": round(dur, 3),
                    "pid": pid,
                    "tid": tid,
                    "args": args,
                }
            )
            for sem, value, ident in signals:
                producers.setdefault((sem, ident), []).append((value, ts + dur, pid, tid, ts))
        for entries in producers.values():
            entries.sort()
        flow_id = 0
        for waits, pid, tid, ts in timed:
            for sem, value, ident in waits:
                candidates = producers.get((sem, ident))
                if not candidates:
                    continue
                # The first signal that reached the value and had finished when the waiter
                # started (an identity reused after a semaphore died cannot match later work).
                producer = next((c for c in candidates if c[0] >= value and c[4] <= ts), None)
                if producer is None:
                    continue
                flow_id += 1
                _, pts, ppid, ptid, _ = producer
                common = {"name": sem, "cat": "dependency", "id": flow_id}
                events.append({**common, "ph": "s", "ts": round(pts, 3), "pid": ppid, "tid": ptid})
                events.append(
                    {**common, "ph": "f", "bp": "e", "ts": round(ts, 3), "pid": pid, "tid": tid}
                )
        return {
            "traceEvents": events,
            "displayTimeUnit": "ms",
            "otherData": {
                "records": len(raw),
                "dropped_records": self.dropped,
                "capacity": self.capacity,
            },
        }

    def format_timeline(self, width: int = 64) -> str:
        """A text Gantt chart: a row per queue, a cell per ``1/width`` of the run.

        A cell shows the submission that ran most of it, ``#`` and ``=`` alternating
        along a row so that back-to-back submissions stay apart; a digit ``2``-``9``
        (``*`` for ten or more) counts the submissions that started in one cell, where
        they are too short to draw. Zero-length submissions (barriers) show as ``|``,
        failed ones as ``x``. A legend line follows the rows, and a last line says how
        many older records the ring dropped, when it dropped any.

        Raises:
            ValueError: ``width`` below 1.
        """
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ValueError(f"format_timeline needs a width of at least 1 cell, got {width!r}")
        records = self.records
        if not records:
            if self.dropped:
                return f"(no trace records; {self.dropped:,} older records dropped)"
            return "(no trace records)"
        end = max(r.finished_at for r in records) or 1.0
        cell = end / width
        by_queue: dict[str, list[TraceRecord]] = {}
        for r in records:
            by_queue.setdefault(r.queue, []).append(r)
        rows = {name: _timeline_row(rs, cell, width) for name, rs in by_queue.items()}
        label = max(len(name) for name in rows)
        lines = [f"{'':<{label}}  0 s{'':<{max(0, width - 12)}}{end:>8.3f} s"]
        lines += [f"{name:<{label}} [{row}]" for name, row in rows.items()]
        lines.append(
            f"{'':<{label}}  #,= a submission (alternating)  2-9,* submissions started in "
            "one cell  | zero-length  x failed"
        )
        if self.dropped:
            lines.append(
                f"({self.dropped:,} older records dropped: the trace keeps the last "
                f"{self.capacity:,})"
            )
        return "\n".join(lines)

    def export_perfetto(self, path: str | os.PathLike[str]) -> None:
        """Write :meth:`to_perfetto` as JSON to ``path``."""
        with open(path, "w", encoding="utf-8") as out:
            json.dump(self.to_perfetto(), out)

    def export_html(
        self, path: str | os.PathLike[str], *, title: str = "asyncfront timeline"
    ) -> None:
        """Write a self-contained HTML timeline of :meth:`to_perfetto` to ``path``.

        One file, no network: a lane per queue grouped by device, a bar per submission,
        arrows for semaphore dependencies, frontier and timings on hover, zoom and pan.
        """
        from ._timeline import write_html

        write_html(self.to_perfetto(), path, title=title)


def _timeline_row(records: list[TraceRecord], cell: float, width: int) -> str:
    """One queue's cells for :meth:`TraceRecorder.format_timeline`."""
    owner: list[tuple[float, int] | None] = [None] * width  # (overlap, ordinal) ruling a cell
    starts = [0] * width
    failed = [False] * width
    barrier = [False] * width
    ordered = sorted(records, key=lambda r: (r.started_at, r.finished_at))
    for ordinal, r in enumerate(ordered):
        first = min(width - 1, int(r.started_at / cell))
        if r.finished_at <= r.started_at:
            barrier[first] = True
            failed[first] = failed[first] or r.error is not None
            continue
        last = max(first, min(width - 1, int(r.finished_at / cell - 1e-9)))
        starts[first] += 1
        for i in range(first, last + 1):
            overlap = min(r.finished_at, (i + 1) * cell) - max(r.started_at, i * cell)
            current = owner[i]
            if current is None or overlap > current[0]:
                owner[i] = (overlap, ordinal)
            failed[i] = failed[i] or r.error is not None
    out = []
    for i in range(width):
        current = owner[i]
        if failed[i]:
            out.append("x")
        elif starts[i] >= 10:
            out.append("*")
        elif starts[i] >= 2:
            out.append(str(starts[i]))
        elif current is not None:
            out.append("#" if current[1] % 2 == 0 else "=")
        elif barrier[i]:
            out.append("|")
        else:
            out.append(" ")
    return "".join(out)
