"""The cluster's trace: every node's records merged into one timeline, a process per node."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from .._frontier import axis_name
from ._protocol import decode_frontier

__all__ = ("ClusterTrace",)


class ClusterTrace:
    """Every node's finished submissions, on one clock, as Perfetto JSON or an HTML timeline.

    Each node's runtime clock starts at its own origin; records are placed on the
    earliest origin's timeline (exact on one machine, where the monotonic clock is shared;
    across machines as good as their clocks agree). A process per node, a thread per
    queue, and a flow arrow from each semaphore signal to each wait it satisfied, across
    nodes too.
    """

    def __init__(self, records: Mapping[int, list[dict[str, Any]]]) -> None:
        self._records = {node: list(rs) for node, rs in sorted(records.items())}

    @property
    def nodes(self) -> tuple[int, ...]:
        """The nodes that reported records."""
        return tuple(self._records)

    def records(self, node: int | None = None) -> list[dict[str, Any]]:
        """The plain records of ``node`` (or of every node), oldest first per node."""
        if node is not None:
            return list(self._records.get(node, []))
        return [r for rs in self._records.values() for r in rs]

    def __len__(self) -> int:
        return sum(len(rs) for rs in self._records.values())

    def __repr__(self) -> str:
        return f"<ClusterTrace nodes={list(self._records)} records={len(self)}>"

    def to_perfetto(self) -> dict[str, Any]:
        """A Chrome trace-event document: a process per node, a thread per queue."""
        events: list[dict[str, Any]] = []
        origins = [r["origin"] for rs in self._records.values() for r in rs]
        base = min(origins) if origins else 0.0
        tids: dict[tuple[int, int], int] = {}
        producers: dict[str, list[tuple[int, int, int, float]]] = {}
        timed: list[tuple[dict[str, Any], int, int, float]] = []
        for node, records in self._records.items():
            pid = node + 1
            events.append(
                {"name": "process_name", "ph": "M", "pid": pid, "args": {"name": f"node {node}"}}
            )
            events.append(
                {"name": "process_sort_index", "ph": "M", "pid": pid, "args": {"sort_index": node}}
            )
            for r in records:
                key = (node, r["axis"])
                if key not in tids:
                    tid = tids[key] = len(tids) + 1
                    events.append(
                        {
                            "name": "thread_name",
                            "ph": "M",
                            "pid": pid,
                            "tid": tid,
                            "args": {"name": f"{r['device']}: {r['queue']}"},
                        }
                    )
                tid = tids[key]
                shift = r["origin"] - base
                ts = (r["started_at"] + shift) * 1e6
                dur = max(0.0, (r["finished_at"] - r["started_at"]) * 1e6)
                frontier = decode_frontier(r["frontier"])
                args: dict[str, Any] = {
                    "node": node,
                    "queue": r["queue"],
                    "epoch": r["epoch"],
                    "frontier": {axis_name(a): e for a, e in frontier},
                    "waits": [f"{s} >= {v}" for s, v in r["waits"]],
                    "signals": [f"{s} = {v}" for s, v in r["signals"]],
                    "submitted_us": round((r["submitted_at"] + shift) * 1e6, 3),
                }
                if r["error"] is not None:
                    args["error"] = r["error"]
                events.append(
                    {
                        "name": r["name"],
                        "cat": "failed" if r["error"] is not None else "submission",
                        "ph": "X",
                        "ts": round(ts, 3),
                        "dur": round(dur, 3),
                        "pid": pid,
                        "tid": tid,
                        "args": args,
                    }
                )
                timed.append((r, pid, tid, ts))
                for sem, value in r["signals"]:
                    producers.setdefault(sem, []).append((value, pid, tid, ts + dur))
        for entries in producers.values():
            entries.sort()
        flow = 0
        for r, pid, tid, ts in timed:
            for sem, value in r["waits"]:
                producer = next((p for p in producers.get(sem, ()) if p[0] >= value), None)
                if producer is None:
                    continue
                flow += 1
                _, ppid, ptid, pts = producer
                common = {"name": sem, "cat": "dependency", "id": flow}
                events.append({**common, "ph": "s", "ts": round(pts, 3), "pid": ppid, "tid": ptid})
                events.append(
                    {**common, "ph": "f", "bp": "e", "ts": round(ts, 3), "pid": pid, "tid": tid}
                )
        return {"traceEvents": events, "displayTimeUnit": "ms"}

    def export_perfetto(self, path: str | os.PathLike[str]) -> None:
        """Write :meth:`to_perfetto` as JSON to ``path`` (ui.perfetto.dev loads it)."""
        with open(path, "w", encoding="utf-8") as out:
            json.dump(self.to_perfetto(), out)

    def export_html(
        self, path: str | os.PathLike[str], *, title: str = "asyncfront cluster timeline"
    ) -> None:
        """Write a self-contained HTML timeline of :meth:`to_perfetto` to ``path``."""
        from .._timeline import write_html

        write_html(self.to_perfetto(), path, title=title)
