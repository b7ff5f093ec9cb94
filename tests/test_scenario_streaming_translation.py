"""Scenario B4: streaming translation with decoder and TTS skip edges."""

from __future__ import annotations

import functools
import itertools
import subprocess
import sys
from pathlib import Path

import pytest

from asyncfront.scenarios.streaming_translation import (
    GPU_STAGES,
    STAGES,
    TICK,
    TICKS,
    TranslationReport,
    simulate,
)
from asyncfront.testing import run_virtual

ROOT = Path(__file__).resolve().parents[1]
CHAIN_THROUGH = TICKS["vad"] + TICKS["encode"] + TICKS["decode"]


def _run(gpus: int, depth: int = 8) -> TranslationReport:
    async def main() -> TranslationReport:
        report, _ = await simulate(gpus=gpus, depth=depth)
        return report

    return run_virtual(main)


@pytest.fixture(scope="module")
def two_gpus() -> TranslationReport:
    return _run(gpus=2)


@pytest.fixture(scope="module")
def one_gpu() -> TranslationReport:
    return _run(gpus=1)


def test_every_chunk_is_translated_in_order(two_gpus: TranslationReport) -> None:
    """Eight chunks come out of playback in order, each through all five processing stages."""
    assert two_gpus.heard == [f"wav(tgt(src(z(chunk{k}))))" for k in range(8)]


def test_two_gpus_finish_a_chunk_every_chain_through_interval(two_gpus: TranslationReport) -> None:
    """With 2 GPUs, chunks start and finish every VAD + encode + decode = 5 ticks."""
    starts = [start for start, _ in two_gpus.times("vad")]
    assert [b - a for a, b in itertools.pairwise(starts)] == pytest.approx([5 * TICK] * 7)
    assert two_gpus.intervals() == pytest.approx([CHAIN_THROUGH * TICK] * 7)


def test_two_gpus_encode_the_next_chunk_while_translating(two_gpus: TranslationReport) -> None:
    """gpu1 encodes chunk N+1 while gpu0 translates chunk N."""
    encode, translate = two_gpus.times("encode"), two_gpus.times("translate")
    for k in range(7):
        assert encode[k + 1][0] < translate[k][1] and translate[k][0] < encode[k + 1][1]


def test_one_gpu_serialises_the_gpu_stages(one_gpu: TranslationReport) -> None:
    """With 1 GPU no two GPU stages overlap and a chunk finishes every 9 ticks of GPU work."""
    spans = sorted(span for stage in GPU_STAGES for span in one_gpu.times(stage))
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert start >= end - 1e-9
    gpu_ticks = sum(TICKS[s] for s in GPU_STAGES)
    assert one_gpu.intervals()[:-1] == pytest.approx([gpu_ticks * TICK] * 6)
    assert one_gpu.times("playback")[-1][1] > _run(gpus=2).times("playback")[-1][1]


def test_skip_edges_carry_state_across_chunks(two_gpus: TranslationReport) -> None:
    """decode[k+1] and tts[k+1] wait directly for their previous chunk: frontiers dominate."""
    run = two_gpus.run
    for k in range(7):
        for stage in ("decode", "tts"):
            assert run.graph[f"{stage}[{k}]"] in run.graph[f"{stage}[{k + 1}]"].after
            assert two_gpus.frontier(stage, k + 1) > two_gpus.frontier(stage, k)
    # translate has no skip edge: it reaches its previous chunk only through the chain
    assert run.graph["translate[0]"] not in run.graph["translate[1]"].after


def test_playback_frontier_carries_every_stage_axis(two_gpus: TranslationReport) -> None:
    """The last playback's frontier names the axis of every stage, at the last chunk."""
    final = two_gpus.final_frontier
    assert {final.get(two_gpus.axes[stage]) for stage in STAGES} == {8}
    assert len(final) == len(STAGES)


@pytest.mark.parametrize("depth", [1, 2, 8])
def test_depth_sets_the_number_of_chunks(depth: int) -> None:
    """--depth streams that many chunks (up to 8)."""
    report = _run(gpus=2, depth=depth)
    assert len(report.heard) == depth


def test_depth_beyond_eight_is_refused() -> None:
    """A depth over 8 chunks raises ValueError naming the limit."""
    with pytest.raises(ValueError, match="between 1 and 8"):
        run_virtual(functools.partial(simulate, depth=9))


def test_example_program_runs() -> None:
    """examples/scenarios/streaming_translation.py runs on one GPU and prints the intervals."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "scenarios" / "streaming_translation.py"),
         "--gpus", "1", "--depth", "3"],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    assert "ticks between finished chunks: [9, 7]" in out.stdout
