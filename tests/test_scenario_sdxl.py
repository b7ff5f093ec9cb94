"""Scenario B2: SDXL under memory pressure on the two-GPU workstation."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import structlog

from asyncfront import Frontier, GiB, QoS
from asyncfront.memory import Reuse
from asyncfront.scenarios import SdxlPressureReport
from asyncfront.scenarios.sdxl_pressure import (
    IMAGE_BYTES,
    PCIE_BYTES_PER_SECOND,
    RESIDENT_MODELS,
    SDXL,
    simulate,
)
from asyncfront.testing import run_virtual

ROOT = Path(__file__).resolve().parents[1]


def _simulate(**kwargs: Any) -> SdxlPressureReport:
    async def main() -> SdxlPressureReport:
        report, _ = await simulate(**kwargs)
        return report

    return run_virtual(main)


_run = functools.cache(_simulate)  # the reports are only read: share them between tests


def _frontier(report: SdxlPressureReport, epochs: dict[str, int]) -> Frontier:
    return Frontier({report.axis(queue): epoch for queue, epoch in epochs.items()})


def test_placement_chooses_the_gpu_whose_weights_can_be_dropped() -> None:
    """Neither GPU has 6 GiB free; only GPU 1 can make room by dropping Bark, so SDXL goes there."""
    report = _run()
    samples = {s.device: s for s in report.samples if s.time == 0.0}
    assert {gpu: s.capacity - s.committed for gpu, s in samples.items()} == {
        "gpu0": 1 * GiB,
        "gpu1": 3 * GiB,
    }
    assert report.offers == {"gpu0": 1 * GiB, "gpu1": 7 * GiB}
    assert report.sdxl_device == "gpu1"
    assert SDXL.max_memory == 6 * GiB


def test_bark_is_dropped_by_the_eviction_policy_while_its_speech_is_in_flight() -> None:
    """SDXL's allocation evicts Bark via on_evict, mid-speech, freeing with a death frontier."""
    with structlog.testing.capture_logs() as logs:
        report = _simulate()
    drop = report.drop_of("bark")
    speech = report.voice[0].speech
    assert drop.mechanism == "on_evict"
    assert drop.time == report.image.requested_at == 1.2
    assert report.contexts["bark"].statistics().evictions == 1
    assert report.contexts["bark"].qos is QoS.BEST_EFFORT
    # Bark's compute was still in flight: one chunk running, the rest queued.
    assert any(c.started_at is not None and c.started_at <= drop.time for c in speech)
    assert all(c.finished_at is not None and c.finished_at > drop.time for c in speech)
    # The death frontier is Bark's queue tail; only Bark's own axis was still pending.
    assert drop.death.get(report.axis("bark")) == speech[-1].epoch == 3
    assert drop.pending == _frontier(report, {"bark": 3})
    assert drop.offset == report.bark_offset
    evicts = [e for e in logs if e["event"] == "evict"]
    assert [(e["context"], e["for_context"]) for e in evicts] == [("bark", "sdxl")]


def test_dropping_weights_writes_nothing_back() -> None:
    """No storage write and no device-to-host copy of weights: every weight transfer is a load."""
    report = _run()
    moved = {
        device: [r.name for r in report.trace if r.device == device]
        for device in ("nvme", "pcie0", "pcie1")
    }
    assert moved == {
        "nvme": ["read sdxl weights"],
        "pcie0": [],
        "pcie1": ["h2d sdxl weights", "d2h sdxl image", "h2d bark weights"],
    }
    download = next(r for r in report.trace if r.name == "d2h sdxl image")
    # the image (3 MiB), not weights: its copy lasts microseconds (looptime's resolution)
    assert download.duration == pytest.approx(IMAGE_BYTES / PCIE_BYTES_PER_SECOND, abs=1e-6)
    assert [d.model for d in report.drops] == ["bark", "sdxl"]


def test_sdxl_weights_land_in_barks_block_only_after_barks_last_compute() -> None:
    """SDXL's allocation waits for Bark's death frontier, then gets the very block Bark held."""
    report = _run()
    load = report.load_of("sdxl")
    drop = report.drop_of("bark")
    last_bark = report.voice[0].speech[-1]
    assert load.read is not None and load.copy.started_at is not None
    assert last_bark.finished_at is not None
    # asked at the drop, while Bark still ran; granted exactly when its last chunk ended
    assert load.requested_at == drop.time < last_bark.finished_at
    assert load.granted_at == last_bark.finished_at
    assert load.copy.started_at >= last_bark.finished_at
    # the NVMe read into host memory touches no GPU memory, so it did not wait
    assert load.read.started_at == report.image.requested_at
    # the requester did not dominate the death frontier: reuse came from completion
    assert load.requester is not None and not load.requester.dominates(drop.death)
    assert load.reuse is Reuse.COMPLETED
    # the very block Bark held, extended into the free space above it
    assert load.offset == drop.offset == report.bark_offset
    assert report.pools["gpu1"].waits >= 1 and report.pools["gpu1"].reuses_completed == 2
    assert report.image.encode.started_at == load.copy.finished_at


def test_bark_reload_waits_for_sdxl_and_its_frontier_names_exactly_the_linked_axes() -> None:
    """The next voice reply drops SDXL's idle weights; Bark reloads into them once SDXL is done."""
    report = _run()
    turn = report.voice[1]
    image = report.image
    drop = report.drop_of("sdxl")
    reload = next(load for load in report.loads if load.model == "bark")
    assert drop.mechanism == "on_memory_pressure" and drop.requested_by == "bark"
    assert drop.time == turn.arrival == reload.requested_at
    assert image.decode.finished_at is not None and drop.time < image.decode.finished_at
    assert drop.pending == _frontier(report, {"sdxl": image.decode.epoch})
    # the budget needs SDXL's memory: the reload lands when SDXL's last step has run
    assert reload.granted_at == image.decode.finished_at
    assert reload.copy.started_at is not None and image.download.finished_at is not None
    assert reload.copy.started_at >= image.download.finished_at  # FIFO on GPU 1's DMA queue
    assert reload.read is None  # host memory still held Bark's weights
    assert reload.offset == report.bark_offset  # back where it was
    assert turn.speech[0].started_at == reload.copy.finished_at
    # Whisper, the LLM rounds, the reload copy (after the image download, after the NVMe
    # read) and Bark itself: exactly these axes, and nothing of RAG, CLIP or GPU 0's DMA.
    steps = len(image.steps)
    assert turn.final_frontier == _frontier(
        report,
        {
            "cpu1.audio": 2,
            "whisper": 2,
            "llama-draft": 20,
            "llama": 20,
            "nvme": 1,
            "pcie1": 3,
            "sdxl": 1 + steps + 1,
            "bark": 6,
        },
    )
    # the first reply predates all of it
    assert report.voice[0].final_frontier == _frontier(
        report, {"cpu1.audio": 1, "whisper": 1, "llama-draft": 8, "llama": 8, "bark": 3}
    )


def test_image_frontier_is_independent_of_the_conversation() -> None:
    """The image's causal history is its NVMe read, its copy and its own steps, nothing else."""
    report = _run()
    assert report.image.decode.frontier == _frontier(report, {"nvme": 1, "pcie1": 1, "sdxl": 52})
    assert report.image.steps[0].started_at is not None
    chat_last = report.chat[-1]
    assert chat_last.frontier is not None and report.axis("sdxl") not in chat_last.frontier


def test_budgets_never_exceeded_and_guaranteed_memory_untouched() -> None:
    """At every sample: no device overcommitted, no context over budget, Guaranteed ones intact."""
    report = _run()
    end = max(r.finished_at for r in report.trace)
    times = sorted({s.time for s in report.samples})
    assert times[0] == 0.0 and times[-1] >= end and len(times) > end / 0.02
    guaranteed = [m.name for m in RESIDENT_MODELS if m.qos is QoS.GUARANTEED]
    for s in report.samples:
        used = dict(s.used)
        assert sum(used.values()) <= s.committed <= s.capacity, s
        assert s.pool_in_use + s.pool_cached <= s.capacity, s
        for name, n in used.items():
            assert n <= report.contexts[name].max_memory, (name, s)
        for name in guaranteed:
            if name in used:
                assert used[name] == report.contexts[name].max_memory, (name, s)
    assert {s.committed for s in report.samples if s.device == "gpu0"} == {23 * GiB}
    for name in guaranteed:
        assert report.final_offsets[name] == report.initial_offsets[name], name
        assert None not in report.final_offsets[name], name
        assert report.contexts[name].statistics().evictions == 0
    # GPU 1 ends where it started: Bark back, SDXL's weights and latents gone
    last = next(s for s in reversed(report.samples) if s.device == "gpu1")
    assert dict(last.used)["bark"] == 4 * GiB and dict(last.used)["sdxl"] == 0
    assert last.committed == 21 * GiB


def test_voice_after_the_image_reloads_bark_without_waiting() -> None:
    """When the next voice message comes after SDXL finished, dropping SDXL frees memory at once."""
    report = _run(second_voice_at=9.0)
    drop = report.drop_of("sdxl")
    reload = next(load for load in report.loads if load.model == "bark")
    assert drop.pending == Frontier()
    assert reload.granted_at == reload.requested_at == 9.0
    assert reload.reuse is Reuse.COMPLETED and reload.offset == report.bark_offset


def test_example_program_runs(tmp_path: Path) -> None:
    """examples/scenarios/sdxl_pressure.py prints the drops, memory, frontiers and a trace."""
    trace = tmp_path / "b2.json"
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "scenarios" / "sdxl_pressure.py"),
            "--trace",
            str(trace),
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert "drop bark 4.0 GiB" in out.stdout and "via on_evict" in out.stdout
    assert "load sdxl 5.0 GiB" in out.stdout
    assert "memory over time" in out.stdout and "decisive frontiers" in out.stdout
    assert "pcie1" in out.stdout and "sdxl" in out.stdout  # the timeline rows
    events = json.loads(trace.read_text())["traceEvents"]
    assert any(e.get("name") == "h2d sdxl weights" for e in events)
