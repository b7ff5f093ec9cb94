"""Scenario A: the laptop voice-to-chat pipeline with background embedding."""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

from asyncfront.scenarios.laptop_voice import STAGE_COSTS, VoiceReport, simulate
from asyncfront.testing import run_virtual

ROOT = Path(__file__).resolve().parents[1]


def _run(**kwargs: object) -> VoiceReport:
    async def main() -> VoiceReport:
        report, _ = await simulate(**kwargs)  # type: ignore[arg-type]
        return report

    return run_virtual(main)


def test_final_frontier_holds_every_pipeline_axis() -> None:
    """The last reply's frontier names the CPU, APU, DMA and dGPU queue axes."""
    report = _run(utterances=2)
    final = report.final_frontier
    for name, ax in report.pipeline_axes.items():
        assert final.get(ax) == 2, name
    assert len(final) == 4


def test_embedding_axes_never_enter_pipeline_frontiers() -> None:
    """No frontier of any chat-pipeline submission mentions a background embedding axis."""
    report = _run(utterances=3)
    embedding = set(report.embedding_axes.values())
    for subs in report.stages.values():
        for sub in subs:
            assert sub.frontier is not None
            assert embedding.isdisjoint(sub.frontier.axes), sub
    # and the background work really ran and carries its own axes
    last_embed = report.embeddings[-1].frontier
    assert last_embed is not None and embedding <= set(last_embed.axes)


def test_stages_run_in_dependency_order_without_round_trips() -> None:
    """Each stage starts exactly when its producer finishes (no application round trip)."""
    report = _run(utterances=2)
    order = list(report.stages)
    for n in range(2):
        for before, after in itertools.pairwise(order):
            producer, consumer = report.stages[before][n], report.stages[after][n]
            assert consumer.started_at == producer.finished_at, (before, after)


def test_voice_input_preempts_background_tokenising_at_a_boundary() -> None:
    """Audio preprocessing waits at most one background batch for the shared CPU."""
    report = _run(utterances=2, interval=1.2)
    second = report.stages["preprocess"][1]
    assert second.started_at is not None
    # the CPU was busy with low-priority tokenising when the utterance arrived ...
    overlapping = [
        t for t in report.tokenizations
        if t.started_at is not None and t.finished_at is not None
        and t.started_at < 1.2 < t.finished_at
    ]  # fmt: skip
    assert len(overlapping) == 1
    # ... and audio took the CPU at that batch's end, ahead of the next batch.
    assert second.started_at == overlapping[0].finished_at
    assert second.started_at - 1.2 <= STAGE_COSTS["tokenize"]
    next_batch = report.tokenizations[report.tokenizations.index(overlapping[0]) + 1]
    assert next_batch.started_at is not None and next_batch.started_at >= second.finished_at


def test_example_program_runs() -> None:
    """examples/voice_pipeline_sim.py runs and prints the final frontier."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "voice_pipeline_sim.py")],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert "final frontier" in out.stdout
    assert "dgpu.phi3=2" in out.stdout


def test_demo_command_runs(tmp_path: Path) -> None:
    """python -m asyncfront demo --simulated prints the timeline and writes a trace."""
    trace = tmp_path / "voice.json"
    out = subprocess.run(
        [sys.executable, "-m", "asyncfront", "demo", "--simulated", "--trace", str(trace)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert "cpu.tokenize" in out.stdout and "final frontier" in out.stdout
    assert trace.stat().st_size > 0
