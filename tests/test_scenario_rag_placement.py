"""Scenario B3: a RAG query placed by weight residency, with a CPU fallback."""

from __future__ import annotations

import pytest

from asyncfront import PlacementReason
from asyncfront.scenarios.rag_placement import SECONDS, RagReport, simulate
from asyncfront.testing import run_virtual


@pytest.fixture(scope="module")
def report() -> RagReport:
    async def main() -> RagReport:
        result, _ = await simulate()
        return result

    return run_virtual(main)


def test_warm_query_bounces_by_residency(report: RagReport) -> None:
    """Warm, the query runs CPU -> GPU 0 -> CPU -> GPU 1 -> GPU 0: each model where it lives."""
    warm = report.queries["warm"]
    assert warm.path == ["cpu", "gpu0", "cpu", "gpu1", "gpu0"]
    assert warm.rerank.reason is PlacementReason.RESIDENT
    assert {d.reason for d in warm.run.placements.values()} == {PlacementReason.RESIDENT}
    assert warm.answer == "frontier? see doc3"


def test_warm_answer_frontier_spans_all_three_compute_devices(report: RagReport) -> None:
    """The warm answer's frontier holds exactly the CPU, GPU 0 and GPU 1 axes."""
    axes = report.axes
    assert set(report.queries["warm"].frontier.axes) == {axes["cpu"], axes["gpu0"], axes["gpu1"]}


def test_dropped_reranker_falls_back_to_the_cpu(report: RagReport) -> None:
    """With the reranker dropped from busy GPU 1 and a tight deadline, it reranks on the CPU."""
    tight = report.queries["tight"]
    assert tight.rerank.reason is PlacementReason.CPU_FALLBACK
    assert tight.path == ["cpu", "gpu0", "cpu", "cpu", "gpu0"]
    rerank = tight.run["rerank"]
    assert rerank.finished_at - rerank.started_at == pytest.approx(10 * SECONDS["rerank"])
    # GPU 1 took no part: its axis stays where the warm query left it, SDXL's is absent
    assert tight.frontier.get(report.axes["gpu1"]) == 1
    assert report.axes["sdxl"] not in tight.frontier.axes
    assert "load_reranker" not in tight.run.submissions


def test_looser_deadline_loads_the_reranker_through_storage(report: RagReport) -> None:
    """A deadline the CPU misses but load + rerank on GPU 0 meets adds the NVMe axis."""
    loose = report.queries["loose"]
    assert loose.rerank.reason is PlacementReason.CHEAPEST and loose.rerank.device == "gpu0"
    assert loose.path == ["cpu", "gpu0", "cpu", "gpu0", "gpu0"]
    load, rerank = loose.run["load_reranker"], loose.run["rerank"]
    assert rerank.started_at >= load.finished_at
    assert loose.frontier.get(report.axes["nvme"]) == 1
    assert report.axes["sdxl"] not in loose.frontier.axes


def test_placement_decisions_travel_into_the_trace(report: RagReport) -> None:
    """The embed and generate submissions carry their placement decision as annotations."""
    warm = report.queries["warm"]
    for stage in ("embed", "generate"):
        assert warm.run[stage].annotations["placement"]["device"] == "gpu0"
