"""Scenario: DiT serving with parallelism re-placed between denoising steps."""

from __future__ import annotations

import pytest

from asyncfront.scenarios.dit_serving import (
    ALPHA,
    DYNAMIC,
    FIXED,
    DitReport,
    arrivals,
    simulate,
    step_seconds,
)
from asyncfront.testing import run_virtual


@pytest.fixture(scope="module", params=[40, 120], ids=["load40", "load120"])
def report(request: pytest.FixtureRequest) -> DitReport:
    async def main() -> DitReport:
        result, _ = await simulate(requests=24, load=request.param)
        return result

    return run_virtual(main)


def test_step_time_falls_sublinearly_with_gpus() -> None:
    """More GPUs make a step faster, each extra GPU by less (communication)."""
    times = [step_seconds(1.0, k) for k in (1, 2, 4, 8)]
    assert times == sorted(times, reverse=True)
    assert step_seconds(1.0, 8) == pytest.approx((1 + 7 * ALPHA) / 8)
    assert step_seconds(1.0, 1) / step_seconds(1.0, 8) < 8


def test_arrivals_are_seeded_and_checked() -> None:
    """The same seed gives the same arrivals; bad counts or loads raise."""
    assert arrivals(10, 1, 80) == arrivals(10, 1, 80) != arrivals(10, 2, 80)
    with pytest.raises(ValueError, match="at least one request"):
        arrivals(0, 1, 80)
    with pytest.raises(ValueError, match="load"):
        arrivals(5, 1, 0)


def test_dynamic_parallelism_lowers_mean_latency_against_every_fixed_k(
    report: DitReport,
) -> None:
    """On the same arrivals, re-placing GPUs between steps beats each fixed k on latency."""
    dynamic = report.dynamic
    for k in FIXED:
        assert dynamic.mean_latency < report.runs[k].mean_latency


def test_dynamic_parallelism_keeps_throughput(report: DitReport) -> None:
    """Dynamic parallelism finishes the arrivals at least as fast as any fixed k (within 1 %)."""
    best = report.best_fixed("throughput")
    assert report.dynamic.throughput >= 0.99 * best.throughput


def test_resizes_grow_and_shrink_and_keep_the_frontier_chain(report: DitReport) -> None:
    """Each resized channel's first step's frontier dominates the previous channel's last step."""
    resizes = report.dynamic.resizes
    assert any(r.after > r.before for r in resizes)  # grown when GPUs idled
    assert any(r.after < r.before for r in resizes)  # shrunk when a request arrived
    for r in resizes:
        assert r.first_frontier.dominates(r.last_frontier)
        assert r.first_frontier != r.last_frontier
    for k in FIXED:
        run = report.runs[k]
        assert not run.resizes and set(run.gpu_steps) == {k}


def test_every_request_runs_all_its_steps(report: DitReport) -> None:
    """Each policy finishes every request with all of its denoising steps."""
    steps = sum(r.steps for r in report.requests)
    for run in report.runs.values():
        assert len(run.latencies) == len(report.requests)
        assert len(run.gpu_steps) == steps
    assert DYNAMIC in report.runs and "dynamic vs the best fixed" in report.describe()
