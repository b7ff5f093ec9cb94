"""Scenario: work stealing on a satellite torus, an irregular seeded workload."""

from __future__ import annotations

import pytest

from asyncfront import Stealing
from asyncfront.scenarios.work_stealing import (
    DEFAULT_SEED,
    WorkStealingReport,
    irregular_workload,
    satellite_topology,
    simulate,
)
from asyncfront.testing import run_virtual


@pytest.fixture(scope="module")
def report() -> WorkStealingReport:
    async def main() -> WorkStealingReport:
        result, _ = await simulate(jobs=24, seed=DEFAULT_SEED)
        return result

    return run_virtual(main)


def test_workload_is_seeded_and_irregular() -> None:
    """The same seed gives the same jobs; arrivals are uneven and costs heavy-tailed."""
    a, b = irregular_workload(24, 3), irregular_workload(24, 3)
    assert a == b and a != irregular_workload(24, 4)
    counts: dict[str, int] = {}
    for job in a.jobs:
        counts[job.satellite] = counts.get(job.satellite, 0) + 1
    assert max(counts.values()) >= 2 * len(a.jobs) / 16  # twice a fair share
    costs = sorted(c for job in a.jobs for c in job.tasks)
    assert costs[-1] > 5 * costs[len(costs) // 2]
    with pytest.raises(ValueError, match="at least one job"):
        irregular_workload(0)


def test_stealing_lowers_makespan_against_none(report: WorkStealingReport) -> None:
    """Neighbour-only and global stealing both finish the same arrivals sooner."""
    none = report.runs[Stealing.NONE]
    assert none.stolen == 0
    for mode in (Stealing.NEIGHBOURS, Stealing.GLOBAL):
        run = report.runs[mode]
        assert run.stolen > 0
        assert run.makespan < none.makespan
        assert run.mean_latency < none.mean_latency


def test_neighbour_only_steals_only_from_neighbours(report: WorkStealingReport) -> None:
    """Every stage stolen under neighbour-only stealing ran one link from its home."""
    topology = satellite_topology()
    stolen = [s for s in report.runs[Stealing.NEIGHBOURS].stages if s.device != s.home]
    assert stolen
    for s in stolen:
        assert s.device in topology.neighbours(s.home) and s.hops == 1
    far = [s for s in report.runs[Stealing.GLOBAL].stages if s.hops > 1]
    assert far  # global stealing does reach further
    assert all(s.device == s.home for s in report.runs[Stealing.NONE].stages)


def test_frontiers_name_the_device_that_ran_each_stage(report: WorkStealingReport) -> None:
    """Each stage's frontier carries its epoch on a queue of the device it ran on."""
    for run in report.runs.values():
        for s in run.stages:
            assert s.frontier_epoch == s.epoch > 0
            assert s.queue.startswith(f"{s.device}.bound.")
        axes = {s.axis for s in run.stages}
        assert all(a in axes for f in run.frontiers for a, _ in f)


def test_every_stage_runs_once_in_every_mode(report: WorkStealingReport) -> None:
    """No stage is lost or run twice: bound counts equal the workload's stages."""
    for run in report.runs.values():
        assert len(run.stages) == report.workload.stages
        assert sum(run.ran.values()) == report.workload.stages
    assert "neighbours" in report.describe()
