"""Scenario C4: one multimedia request through seven models, submitted atomically."""

from __future__ import annotations

import pytest

from asyncfront import Submission
from asyncfront.scenarios.multimedia_request import MODELS, MultimediaReport, simulate
from asyncfront.testing import run_virtual


@pytest.fixture(scope="module")
def report() -> MultimediaReport:
    async def main() -> MultimediaReport:
        result, _ = await simulate()
        return result

    return run_virtual(main)


def _parts(report: MultimediaReport, stage: str) -> list[Submission]:
    sub = report.run[stage]
    return [sub] if isinstance(sub, Submission) else list(sub.parts)


def _start(report: MultimediaReport, stage: str) -> float:
    return min(p.started_at or 0.0 for p in _parts(report, stage))


def _end(report: MultimediaReport, stage: str) -> float:
    return max(p.finished_at or 0.0 for p in _parts(report, stage))


def test_whole_request_is_queued_before_any_stage_runs(report: MultimediaReport) -> None:
    """Every stage of the seven-model request was submitted at time 0, as one submission."""
    stages = list(report.run.submissions)
    assert set(MODELS) <= set(stages) and len(MODELS) == 7
    for stage in stages:
        assert all(p.submitted_at == 0.0 for p in _parts(report, stage)), stage


def test_understanding_runs_in_parallel_then_llama_waits_for_both(
    report: MultimediaReport,
) -> None:
    """Whisper and CLIP overlap on different GPUs; Llama starts once both are done."""
    assert _start(report, "clip") < _end(report, "whisper")
    assert report.run["whisper"].queue.device.name != report.run["clip"].queue.device.name
    assert _start(report, "llama") == max(_end(report, "whisper"), _end(report, "clip"))


def test_code_and_speech_run_in_parallel(report: MultimediaReport) -> None:
    """Code-Llama (GPUs 6-7) and XTTS both start when Llama finishes, side by side."""
    assert _start(report, "code") == _start(report, "tts") == _end(report, "llama")


def test_final_frontier_carries_every_axis(report: MultimediaReport) -> None:
    """The final frontier holds the CPU, every placed GPU queue and both TP channels."""
    assert set(report.final_frontier.axes) == set(report.axes.values())
    assert report.final_frontier.get(report.axes["llama.tp"]) == 1
    assert report.final_frontier.get(report.axes["code.tp"]) == 1
    # and the response depends on everything upstream
    assert report.run["assemble"].frontier >= report.run["sdxl"].frontier


def test_response_assembles_text_code_and_image(report: MultimediaReport) -> None:
    """The assembled response carries the description, the code and the image."""
    assert set(report.response) == {"text", "code", "image"}
    assert str(report.response["image"]).startswith("image(code[0](description[0]")
