"""Runtime: devices, CPU threads, structlog events, trace export, visible state."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

import pytest
import structlog

import asyncfront as af
from asyncfront.devices import CpuDevice
from asyncfront.testing import FakeDevice, run_virtual


async def test_cpu_device_runs_work_in_threads_in_order() -> None:
    """CpuDevice runs sync work off the loop thread and keeps each queue in order."""
    loop_thread = threading.get_ident()
    async with af.open_runtime([CpuDevice("cpu", workers=2)]) as rt:
        q = rt.queue("cpu")
        seen: list[tuple[int, int]] = []
        subs = [q.submit(lambda i=i: seen.append((i, threading.get_ident()))) for i in range(20)]
        await subs[-1]
        assert [i for i, _ in seen] == list(range(20))
        assert all(tid != loop_thread for _, tid in seen)


async def test_cpu_device_runs_two_queues_in_parallel() -> None:
    """Two queues on a two-worker CPU device overlap their blocking work."""
    barrier = threading.Barrier(2, timeout=5)
    async with af.open_runtime([CpuDevice("cpu", workers=2)]) as rt:
        a, b = rt.queue("cpu"), rt.queue("cpu")
        # each waits for the other inside its thread: only parallel execution finishes
        ra, rb = a.submit(barrier.wait), b.submit(barrier.wait)
        assert sorted([await ra, await rb]) == [0, 1]


async def test_cpu_device_awaits_coroutine_functions() -> None:
    """Coroutine functions submitted to a CPU queue run on the loop and return their value."""

    async def work(x: int) -> int:
        await asyncio.sleep(0)
        return x * 2

    async with af.open_runtime([CpuDevice()]) as rt:
        assert await rt.queue("cpu").submit(work, 21) == 42


async def test_signal_threadsafe_from_worker_wakes_queue() -> None:
    """Work in a CPU thread can signal a semaphore that unblocks another queue."""
    async with af.open_runtime([CpuDevice("cpu", workers=2), FakeDevice("gpu")]) as rt:
        cpu, gpu = rt.queue("cpu"), rt.queue("gpu")
        sem = rt.semaphore(name="from-thread")
        consumer = gpu.submit(lambda: "woke", waits=[(sem, 1)])
        done = cpu.submit(lambda: sem.signal_threadsafe(1).result(timeout=5))
        await done
        assert await consumer == "woke"


def test_unknown_device_and_closed_runtime_errors() -> None:
    """Naming an unknown device lists the known ones; a closed runtime refuses queues."""

    async def main() -> None:
        async with af.open_runtime([FakeDevice("gpu0")]) as rt:
            with pytest.raises(KeyError, match="gpu0"):
                rt.queue("gpu9")
            q = rt.queue("gpu0")
        with pytest.raises(RuntimeError, match="not open"):
            rt.queue("gpu0")
        with pytest.raises(RuntimeError, match="closed"):
            q.submit()

    run_virtual(main)


def test_duplicate_device_names_rejected() -> None:
    """Two devices with one name are refused."""
    with pytest.raises(ValueError, match="two devices"):
        af.Runtime([FakeDevice("x"), FakeDevice("x")])


def test_structlog_events_for_submit_start_signal_fail() -> None:
    """The runtime logs submit, start, signal and fail through structlog."""

    async def main() -> None:
        async with af.open_runtime([FakeDevice("gpu")]) as rt:
            q = rt.queue("gpu", name="llm")
            sem = af.TimelineSemaphore(name="done")

            def broken() -> None:
                raise RuntimeError("no weights")

            await q.submit(lambda: None, signals=[(sem, 1)], cost=1.0, name="decode")
            with pytest.raises(RuntimeError):
                await q.submit(broken, cost=1.0)

    with structlog.testing.capture_logs() as logs:
        run_virtual(main)
    events = [(e["event"], e.get("submission")) for e in logs]
    assert ("submit", "decode") in events
    assert ("start", "decode") in events
    assert ("fail", "broken") in events
    signal = next(e for e in logs if e["event"] == "signal")
    assert signal["semaphore"] == "done" and signal["value"] == 1
    fail = next(e for e in logs if e["event"] == "fail")
    assert fail["log_level"] == "warning" and "no weights" in fail["error"]


def test_quiet_by_default_when_structlog_is_unconfigured() -> None:
    """Without structlog configuration the runtime's hot-path debug events are off."""
    structlog.reset_defaults()
    rt = af.Runtime([FakeDevice("gpu")])
    assert rt._log_debug is False and rt._log_warning is True


def _pipeline_trace() -> tuple[af.TraceRecorder, dict[str, int]]:
    async def main() -> tuple[af.TraceRecorder, dict[str, int]]:
        async with af.open_runtime([FakeDevice("cpu", kind="cpu"), FakeDevice("gpu")]) as rt:
            cpu, gpu = rt.queue("cpu", name="pre"), rt.queue("gpu", name="llm")
            sem = af.TimelineSemaphore(name="features")
            gpu.submit(waits=[(sem, 1)], cost=2.0, name="generate")
            cpu.submit(signals=[(sem, 1)], cost=0.5, name="preprocess")
        return rt.trace, {"pre": cpu.axis, "llm": gpu.axis}

    return run_virtual(main)


def test_trace_records_every_submission() -> None:
    """Trace records carry queue, timing, waits, signals and frontier."""
    trace, axes = _pipeline_trace()
    records = {r.name: r for r in trace.records}
    pre, gen = records["preprocess"], records["generate"]
    assert (pre.started_at, pre.finished_at) == (0.0, 0.5)
    assert (gen.started_at, gen.finished_at) == (0.5, 2.5)
    assert gen.waits == (("features", 1),) and pre.signals == (("features", 1),)
    assert gen.frontier == af.Frontier({axes["pre"]: 1, axes["llm"]: 1})
    assert gen.duration == 2.0


def test_perfetto_export_shape(tmp_path: Path) -> None:
    """The exported JSON is a Chrome trace-event document with lanes, slices and flow arrows."""
    trace, _ = _pipeline_trace()
    path = tmp_path / "trace.json"
    trace.export_perfetto(path)
    doc = json.loads(path.read_text())
    assert set(doc) >= {"traceEvents"} and doc["displayTimeUnit"] == "ms"
    events = doc["traceEvents"]
    for ev in events:
        assert isinstance(ev["name"], str) and ev["ph"] in {"M", "X", "s", "f"}
        assert isinstance(ev["pid"], int)
        if ev["ph"] != "M":
            assert isinstance(ev["ts"], (int, float)) and isinstance(ev["tid"], int)
    names = {e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    assert names == {"pre", "llm"}
    slices = {e["name"]: e for e in events if e["ph"] == "X"}
    assert slices["generate"]["ts"] == 500_000 and slices["generate"]["dur"] == 2_000_000
    assert slices["generate"]["args"]["waits"] == ["features >= 1"]
    flows = [e for e in events if e["ph"] in {"s", "f"}]
    assert len(flows) == 2 and flows[0]["id"] == flows[1]["id"]
    start, finish = sorted(flows, key=lambda e: e["ph"] != "s")
    assert start["tid"] == slices["preprocess"]["tid"] and start["ts"] == 500_000
    assert finish["tid"] == slices["generate"]["tid"] and finish["bp"] == "e"


def test_text_timeline_lists_each_queue() -> None:
    """format_timeline draws a row per queue."""
    trace, _ = _pipeline_trace()
    text = trace.format_timeline(width=20)
    assert "pre" in text and "llm" in text and "#" in text


def test_statistics_and_reprs() -> None:
    """Runtime, device, queue and semaphore expose frozen statistics and informative reprs."""

    async def main() -> None:
        gpu = FakeDevice("gpu", concurrency=2)
        async with af.open_runtime([gpu]) as rt:
            q = rt.queue("gpu")
            q.submit(cost=1.0)
            await asyncio.sleep(0.5)
            stats = rt.statistics()
            assert stats.devices == 1 and stats.queues == 1 and stats.busy_queues == 1
            dev = gpu.statistics()
            assert dev.busy_slots == 1 and dev.concurrency == 2
            with pytest.raises(AttributeError):
                dev.busy_slots = 0  # type: ignore[misc]
            assert "gpu" in repr(rt) and "FakeDevice" in repr(gpu)

    run_virtual(main)
