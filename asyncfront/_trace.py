"""Trace recording and export: every finished submission, as Perfetto/Chrome JSON or HTML."""

from __future__ import annotations

import json
import os
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ._frontier import Frontier, axis_name

if TYPE_CHECKING:
    from ._queue import DeviceQueue, Submission
    from ._semaphore import TimelineSemaphore

__all__ = ("TraceRecord", "TraceRecorder")

DEFAULT_TRACE_CAPACITY = 1_000_000

# (queue, name, epoch, submitted_at, started_at, finished_at, frontier, waits, signals, error,
#  annotations)
_Raw = tuple[
    "DeviceQueue",
    str,
    int,
    float,
    "float | None",
    "float | None",
    "Frontier | None",
    "tuple[tuple[TimelineSemaphore, int], ...]",
    "tuple[tuple[TimelineSemaphore, int], ...]",
    "BaseException | None",
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
    """Appends a raw record per finished submission; formats only on export.

    Holds at most ``capacity`` records (the oldest are dropped), so long runs stay flat
    in memory. ``enabled=False`` records nothing.
    """

    def __init__(self, capacity: int = DEFAULT_TRACE_CAPACITY, *, enabled: bool = True) -> None:
        self.capacity = capacity
        self.enabled = enabled
        self.origin = 0.0
        self._raw: deque[_Raw] = deque(maxlen=capacity)

    def _add(self, sub: Submission) -> None:
        if self.enabled:
            self._raw.append(
                (
                    sub.queue,
                    sub.name,
                    sub.epoch,
                    sub.submitted_at,
                    sub.started_at,
                    sub.finished_at,
                    sub.frontier,
                    sub.waits,
                    sub.signals,
                    sub._exception,
                    sub.annotations,
                )
            )

    def clear(self) -> None:
        """Forget every record."""
        self._raw.clear()

    def __len__(self) -> int:
        return len(self._raw)

    def __iter__(self) -> Iterator[TraceRecord]:
        origin = self.origin
        for q, name, epoch, sub_at, start, end, frontier, waits, signals, exc, notes in self._raw:
            start_t = (start if start is not None else sub_at) - origin
            end_t = (end if end is not None else start_t + origin) - origin
            yield TraceRecord(
                queue=q.name,
                axis=q.axis,
                device=q.device.name,
                name=name,
                epoch=epoch,
                submitted_at=sub_at - origin,
                started_at=start_t,
                finished_at=end_t,
                frontier=frontier if frontier is not None else Frontier(),
                waits=tuple((s.name, v) for s, v in waits),
                signals=tuple((s.name, v) for s, v in signals),
                error=None if exc is None else f"{type(exc).__name__}: {exc}",
                annotations=dict(notes) if notes else {},
            )

    @property
    def records(self) -> list[TraceRecord]:
        """Every record, oldest first."""
        return list(self)

    def __repr__(self) -> str:
        return f"<TraceRecorder records={len(self._raw)} capacity={self.capacity}>"

    # -- export --------------------------------------------------------------------

    def to_perfetto(self) -> dict[str, Any]:
        """The trace as a Chrome trace-event document that ui.perfetto.dev loads.

        A process per device, a thread per queue, a complete ("X") event per
        submission with its frontier, waits, signals and annotations (graph stage,
        placement, collective step), and flow arrows from the
        submission that signalled a semaphore value to each one that waited on it.
        """
        events: list[dict[str, Any]] = []
        pids: dict[str, int] = {}
        tids: dict[int, int] = {}
        producers: dict[int, list[tuple[int, int, int, float]]] = {}
        origin = self.origin
        raw = list(self._raw)
        for q, *_ in raw:
            if q.device.name not in pids:
                pid = pids[q.device.name] = len(pids) + 1
                events.append(
                    {"name": "process_name", "ph": "M", "pid": pid, "args": {"name": q.device.name}}
                )
            if q.axis not in tids:
                tid = tids[q.axis] = len(tids) + 1
                events.append(
                    {
                        "name": "thread_name",
                        "ph": "M",
                        "pid": pids[q.device.name],
                        "tid": tid,
                        "args": {"name": q.name},
                    }
                )
                events.append(
                    {
                        "name": "thread_sort_index",
                        "ph": "M",
                        "pid": pids[q.device.name],
                        "tid": tid,
                        "args": {"sort_index": -q.priority},
                    }
                )
        timed: list[tuple[_Raw, int, int, float, float]] = []
        for rec in raw:
            q, name, epoch, sub_at, start, end, frontier, waits, signals, exc, notes = rec
            pid, tid = pids[q.device.name], tids[q.axis]
            ts = ((start if start is not None else sub_at) - origin) * 1e6
            dur = max(0.0, ((end if end is not None else sub_at) - origin) * 1e6 - ts)
            timed.append((rec, pid, tid, ts, dur))
            args: dict[str, Any] = {
                "queue": q.name,
                "epoch": epoch,
                "frontier": {axis_name(a): e for a, e in (frontier or Frontier())},
                "waits": [f"{s.name} >= {v}" for s, v in waits],
                "signals": [f"{s.name} = {v}" for s, v in signals],
                "submitted_us": round((sub_at - origin) * 1e6, 3),
            }
            if exc is not None:
                args["error"] = f"{type(exc).__name__}: {exc}"
            if notes:
                args.update(notes)
            events.append(
                {
                    "name": name,
                    "cat": "failed" if exc is not None else "submission",
                    "ph": "X",
                    "ts": round(ts, 3),
                    "dur": round(dur, 3),
                    "pid": pid,
                    "tid": tid,
                    "args": args,
                }
            )
            for sem, value in signals:
                producers.setdefault(id(sem), []).append((value, pid, tid, ts + dur))
        for entries in producers.values():
            entries.sort()
        flow_id = 0
        for (_q, _n, _e, _s, _st, _en, _f, waits, _sig, _x, _a), pid, tid, ts, _dur in timed:
            for sem, value in waits:
                candidates = producers.get(id(sem))
                if not candidates:
                    continue
                producer = next((c for c in candidates if c[0] >= value), None)
                if producer is None:
                    continue
                flow_id += 1
                _, ppid, ptid, pts = producer
                common = {"name": sem.name, "cat": "dependency", "id": flow_id}
                events.append({**common, "ph": "s", "ts": round(pts, 3), "pid": ppid, "tid": ptid})
                events.append(
                    {**common, "ph": "f", "bp": "e", "ts": round(ts, 3), "pid": pid, "tid": tid}
                )
        return {"traceEvents": events, "displayTimeUnit": "ms"}

    def format_timeline(self, width: int = 64) -> str:
        """A text Gantt chart: a row per queue, a cell per ``1/width`` of the run.

        A cell shows the submission that ran most of it, ``#`` and ``=`` alternating
        along a row so that back-to-back submissions stay apart; a digit ``2``-``9``
        (``*`` for ten or more) counts the submissions that started in one cell, where
        they are too short to draw. Zero-length submissions (barriers) show as ``|``,
        failed ones as ``x``. A legend line follows the rows.

        Raises:
            ValueError: ``width`` below 1.
        """
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ValueError(f"format_timeline needs a width of at least 1 cell, got {width!r}")
        records = self.records
        if not records:
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
