"""The trace: records of plain values, a ring bounded by memory, exports that count drops."""

from __future__ import annotations

import gc
import json
import tracemalloc
import weakref
from pathlib import Path
from typing import Any

import pytest

import asyncfront as af
from asyncfront._timeline import read_trace, render_html
from asyncfront.testing import FakeDevice, run_virtual


class _Payload:
    """A 1 MiB argument that the test can watch through a weak reference."""

    def __init__(self) -> None:
        self.data = bytearray(1 << 20)


def _nothing() -> None:
    """Work that does nothing."""


def _rejected(payload: _Payload) -> None:
    raise ValueError(f"request of {len(payload.data)} bytes rejected")


def test_failed_submissions_do_not_pin_their_arguments() -> None:
    """100 failed submissions with 1 MiB arguments leave none alive once the caller drops them."""

    async def body() -> tuple[int, int]:
        alive: weakref.WeakSet[_Payload] = weakref.WeakSet()
        async with af.open_runtime([FakeDevice("gpu")], trace=True) as rt:
            q = rt.queue("gpu")
            for _ in range(100):
                payload = _Payload()
                alive.add(payload)
                sub = q.submit(_rejected, payload)
                del payload
                with pytest.raises(ValueError, match="rejected"):
                    await sub
                del sub
            gc.collect()
            return len(alive), len(rt.trace)

    still_alive, records = run_virtual(body)
    assert records == 100
    assert still_alive == 0


def _plain(value: Any, path: str = "record") -> None:
    """Fail unless ``value`` is made only of plain data (and immutable frontiers)."""
    if value is None or isinstance(value, (str, int, float, bool, af.Frontier)):
        return
    if isinstance(value, (tuple, list)):
        for i, item in enumerate(value):
            _plain(item, f"{path}[{i}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            _plain(key, f"{path} key")
            _plain(item, f"{path}[{key!r}]")
        return
    raise AssertionError(f"{path} holds a live {type(value).__name__}: {value!r}")


def test_records_hold_only_plain_values() -> None:
    """Stored records keep names, numbers, strings and frontiers: no queue, semaphore or error."""

    async def body() -> af.TraceRecorder:
        async with af.open_runtime([FakeDevice("gpu"), FakeDevice("cpu")]) as rt:
            a, b = rt.queue("gpu", name="gpu.main"), rt.queue("cpu", name="cpu.main")
            ready = rt.semaphore(name="ready")
            a.submit(name="produce", cost=1.0, signals=[(ready, 1)]).annotate(stage="produce")
            consumer = b.submit(_rejected, _Payload(), waits=[(ready, 1)], name="consume")
            with pytest.raises(ValueError):
                await consumer
        return rt.trace

    trace = run_virtual(body)
    assert len(trace) == 2
    for raw in trace._raw:
        _plain(raw)
    produce, consume = trace.records
    assert produce.signals == (("ready", 1),) and produce.annotations == {"stage": "produce"}
    assert consume.waits == (("ready", 1),)
    assert consume.error == "ValueError: request of 1048576 bytes rejected"


def test_record_frontier_is_the_submission_frontier() -> None:
    """A record's frontier equals the submission's, also when built lazily and truncated."""

    async def body() -> tuple[dict[tuple[str, int], af.Frontier], af.TraceRecorder]:
        devices = [FakeDevice(f"d{i}") for i in range(3)]
        async with af.open_runtime(devices, frontier_capacity=2) as rt:
            queues = [rt.queue(d.name) for d in devices]
            chain = rt.semaphore(name="chain")
            subs: list[af.Submission] = []
            for i in range(1, 10):
                waits = [(chain, i - 1)] if i > 1 else []
                subs.append(queues[i % 3].submit(waits=waits, signals=[(chain, i)], cost=0.5))
            # These signal nothing: the queue never builds their frontier itself.
            subs += [q.submit(waits=[(chain, 9)], cost=0.5) for q in queues]
            for sub in subs:
                await sub
            expected = {(s.queue.name, s.epoch): s.frontier for s in subs}
        return {k: v for k, v in expected.items() if v is not None}, rt.trace

    expected, trace = run_virtual(body)
    recorded = {(r.queue, r.epoch): r.frontier for r in trace.records}
    assert recorded == expected and len(recorded) == 12
    assert all(len(f) <= 2 for f in recorded.values())
    assert any(len(f) == 2 for f in recorded.values())


def _short_trace(capacity: int, n: int) -> af.TraceRecorder:
    async def body() -> af.TraceRecorder:
        async with af.open_runtime([FakeDevice("gpu")], trace_capacity=capacity) as rt:
            q = rt.queue("gpu", name="gpu.main")
            for i in range(n):
                q.submit(name=f"w{i}", cost=1.0)
        return rt.trace

    return run_virtual(body)


def test_ring_drops_the_oldest_and_every_export_says_how_many(tmp_path: Path) -> None:
    """Past its capacity the trace keeps the newest records; JSON, HTML and text count drops."""
    trace = _short_trace(capacity=5, n=8)
    assert len(trace) == 5 and trace.dropped == 3
    assert [r.name for r in trace.records] == ["w3", "w4", "w5", "w6", "w7"]
    assert "dropped=3" in repr(trace)

    doc = trace.to_perfetto()
    assert doc["otherData"] == {"records": 5, "dropped_records": 3, "capacity": 5}
    assert next(e["name"] for e in doc["traceEvents"] if e["ph"] == "X") == "w3"

    assert trace.format_timeline().splitlines()[-1] == (
        "(3 older records dropped: the trace keeps the last 5)"
    )

    notice = "3 older submissions were dropped from the trace; the 5 most recent are shown."
    html_path = tmp_path / "timeline.html"
    trace.export_html(html_path)
    assert notice in html_path.read_text(encoding="utf-8")
    # A timeline drawn later from the saved JSON says it too.
    json_path = tmp_path / "trace.json"
    trace.export_perfetto(json_path)
    assert notice in render_html(read_trace(json_path))

    trace.clear()
    assert trace.dropped == 0 and len(trace) == 0


def test_a_trace_within_capacity_reports_no_drops() -> None:
    """A trace that kept everything shows no dropped notice anywhere."""
    trace = _short_trace(capacity=50, n=8)
    assert trace.dropped == 0
    assert trace.to_perfetto()["otherData"]["dropped_records"] == 0
    assert "dropped" not in trace.format_timeline()
    assert 'id="dropped"' not in render_html(trace.to_perfetto())


@pytest.mark.parametrize(("capacity", "n"), [(0, 7), (1, 1100), (600, 1500), (2000, 1500)])
def test_the_ring_keeps_the_newest_records_in_order_across_chunks(capacity: int, n: int) -> None:
    """At any capacity (none, one, several chunks of records) the newest records stay, in order."""
    trace = _short_trace(capacity=capacity, n=n)
    kept = min(capacity, n)
    assert len(trace) == kept and trace.dropped == n - kept
    assert [r.name for r in trace.records] == [f"w{i}" for i in range(n - kept, n)]
    assert [r.epoch for r in trace.records] == list(range(n - kept + 1, n + 1))


def test_recording_leaves_no_object_for_the_garbage_collector() -> None:
    """A record is stored as plain values: recording allocates nothing the collector tracks."""

    async def body() -> tuple[int, int]:
        async with af.open_runtime([FakeDevice("gpu")]) as rt:
            q = rt.queue("gpu")
            await q.submit()
            gc.collect()
            gc.disable()
            try:
                before = gc.get_count()[0]
                for _ in range(3000):
                    q.submit()  # finished inside submit(): one record each, nothing else kept
                after = gc.get_count()[0]
            finally:
                gc.enable()
            assert len(rt.trace) == 3001
            return before, after

    before, after = run_virtual(body)
    assert after - before < 100


def test_a_trace_given_to_an_open_runtime_records_what_finishes_from_then_on() -> None:
    """Assigning rt.trace switches where the queues record; the old recorder keeps its own."""

    async def body() -> tuple[list[str], list[str]]:
        async with af.open_runtime([FakeDevice("gpu")]) as rt:
            q = rt.queue("gpu")
            await q.submit(name="before")
            old = rt.trace
            rt.trace = af.TraceRecorder()
            await q.submit(name="after")
            return [r.name for r in old.records], [r.name for r in rt.trace.records]

    old, new = run_virtual(body)
    assert old == ["before"] and new == ["after"]


def test_a_runtime_refuses_a_trace_that_is_no_recorder() -> None:
    """rt.trace accepts only a TraceRecorder, and keeps its own after a refusal."""

    async def body() -> None:
        async with af.open_runtime([FakeDevice("gpu")]) as rt:
            kept = rt.trace
            with pytest.raises(TypeError, match="trace must be a TraceRecorder, got \\[\\]"):
                rt.trace = []  # type: ignore[assignment]
            assert rt.trace is kept

    run_virtual(body)


def test_records_of_work_with_waits_and_signals_keep_nothing_for_the_collector() -> None:
    """A record of work that waits and signals keeps no tuple of its own: points lie flat."""

    async def body() -> int:
        async with af.open_runtime([FakeDevice("a"), FakeDevice("b")]) as rt:
            qa, qb = rt.queue("a"), rt.queue("b")
            ab, ba = rt.semaphore(name="ab"), rt.semaphore(name="ba")
            await qa.submit()
            await qb.submit()
            gc.collect()
            gc.disable()
            try:
                before = gc.get_count()[0]
                for i in range(1, 1501):
                    qa.submit(waits=((ba, i - 1),), signals=((ab, i),))
                    await qb.submit(_nothing, waits=((ab, i),), signals=((ba, i),))
                after = gc.get_count()[0]
            finally:
                gc.enable()
            assert len(rt.trace) == 3002
            waits = [r.waits for r in rt.trace.records[-2:]]
            assert waits == [(("ba", 1499),), (("ab", 1500),)]
            return after - before

    # Each record holds the epochs of the frontier its work started from (the frontier
    # another queue's work signalled), and nothing else the collector tracks: 3000
    # records keep about 3000 objects, where tuples for their points kept five times that.
    assert run_virtual(body) < 3600


def test_truthy_and_falsy_trace_switches_work_on_every_core() -> None:
    """trace=0 records nothing and enabled=1 records, whichever core runs (not only bools)."""

    async def body() -> tuple[int, int]:
        async with af.open_runtime([FakeDevice("gpu")], trace=0) as rt:  # type: ignore[arg-type]
            q = rt.queue("gpu")
            await q.submit()
            off = len(rt.trace)
            rt.trace.enabled = 1  # type: ignore[assignment]
            await q.submit()
            return off, len(rt.trace)

    assert run_virtual(body) == (0, 1)


@pytest.mark.parametrize("capacity", [-1, 2.5, "10", True])
def test_a_new_trace_capacity_must_be_a_non_negative_int(capacity: Any) -> None:
    """Setting a bad capacity is refused with ValueError naming it, and keeps the old one."""
    trace = af.TraceRecorder(10)
    with pytest.raises(ValueError, match=rf"trace capacity must be an int >= 0, got {capacity!r}"):
        trace.capacity = capacity
    assert trace.capacity == 10


@pytest.mark.parametrize("capacity", [-1, 2.5, "10"])
def test_trace_capacity_must_be_a_non_negative_int(capacity: Any) -> None:
    """A negative or non-int trace capacity is refused with ValueError naming it."""
    with pytest.raises(ValueError, match=rf"trace capacity must be an int >= 0, got {capacity!r}"):
        af.TraceRecorder(capacity)


def test_default_trace_fits_in_a_few_tens_of_megabytes() -> None:
    """The default capacity times the measured size of a record stays under 64 MiB."""
    per_record = _measured_record_bytes()
    assert per_record > 0
    assert per_record * af.DEFAULT_TRACE_CAPACITY < 64 * 2**20, per_record


def _measured_record_bytes() -> float:
    """Bytes per record that clearing a full ring gives back (one wait, one signal each)."""

    async def body() -> float:
        devices = [FakeDevice(f"d{i}") for i in range(4)]
        tracemalloc.start()
        try:
            async with af.open_runtime(devices, trace_capacity=10_000) as rt:
                queues = [rt.queue(d.name) for d in devices for _ in range(2)]
                sems = [rt.semaphore(name=f"s{i}") for i in range(len(queues))]
                counts = [0] * len(queues)
                last = None
                for n in range(1, 1501):
                    q = n % len(queues)
                    other = (q + 3) % len(queues)
                    waits = [(sems[other], counts[other])] if counts[other] else []
                    counts[q] += 1
                    last = queues[q].submit(waits=waits, signals=[(sems[q], counts[q])], cost=1e-6)
                assert last is not None
                await last
                del last
                gc.collect()
                full = tracemalloc.get_traced_memory()[0]
                records = len(rt.trace)
                rt.trace.clear()
                gc.collect()
                empty = tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()
        return (full - empty) / records

    return run_virtual(body)


def test_same_named_semaphores_keep_their_own_dependency_arrows() -> None:
    """Flow arrows join each wait to the signal of its own semaphore, not a namesake's."""

    async def body() -> dict[str, Any]:
        async with af.open_runtime([FakeDevice("a"), FakeDevice("b")]) as rt:
            qa, qb = rt.queue("a", name="qa"), rt.queue("b", name="qb")
            first, second = rt.semaphore(name="same"), rt.semaphore(name="same")
            qa.submit(name="p1", cost=1.0, signals=[(first, 1)])
            qa.submit(name="p2", cost=1.0, signals=[(second, 1)])
            await qb.submit(name="c2", waits=[(second, 1)], cost=1.0)
        return rt.trace.to_perfetto()

    doc = run_virtual(body)
    spans = {e["name"]: e for e in doc["traceEvents"] if e["ph"] == "X"}
    starts = [e for e in doc["traceEvents"] if e["ph"] == "s"]
    assert len(starts) == 1
    p2 = spans["p2"]
    assert starts[0]["ts"] == pytest.approx(p2["ts"] + p2["dur"])
    json.dumps(doc)  # the whole document is plain JSON
