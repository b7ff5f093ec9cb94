"""Scenario C3: MoE expert routing with hot experts on GPUs and cold ones on NVMe."""

from __future__ import annotations

import pytest

from asyncfront import Frontier
from asyncfront.scenarios import get_scenario
from asyncfront.scenarios.moe_routing import (
    COPY_BYTES_PER_SECOND,
    EXPERT_BYTES,
    NVME_BYTES_PER_SECOND,
    MoeReport,
    simulate,
)
from asyncfront.testing import run_virtual


def _run(**options: int) -> MoeReport:
    async def main() -> MoeReport:
        result, _ = await simulate(**options)
        return result

    return run_virtual(main)


@pytest.fixture(scope="module")
def report() -> MoeReport:
    return _run()


@pytest.fixture(scope="module")
def busy() -> MoeReport:
    """Batches of four tokens, so batches often need several experts and both cold ones."""
    return _run(batches=8, tokens=4, seed=33)


def test_default_routing_loads_each_cold_expert_once(report: MoeReport) -> None:
    """Seed 171: batch 2 loads expert 7, batch 3 loads expert 6, batches 4-5 reuse them."""
    assert [b.chosen for b in report.batches] == [
        (3, 5),
        (0, 7),
        (3, 6),
        (1, 6),
        (2, 7),
        (0, 1),
    ]
    assert [b.loaded for b in report.batches] == [(), (7,), (6,), (), (), ()]


def test_combine_waits_for_every_chosen_expert(report: MoeReport, busy: MoeReport) -> None:
    """The combine starts when the last chosen expert finishes; its frontier is their merge."""
    for b in report.batches + busy.batches:
        ends = [run.ffn.finished_at or 0.0 for run in b.experts]
        assert b.combine.started_at == max(ends)
        merged = b.router.frontier or Frontier()
        for run in b.experts:
            assert run.ffn.frontier is not None
            merged = merged | run.ffn.frontier
        assert b.frontier == merged.with_epoch(b.combine.queue.axis, b.combine.epoch)


def test_combine_frontier_carries_the_expert_gpus_axes(report: MoeReport, busy: MoeReport) -> None:
    """Every chosen expert's GPU queue appears in the combine at that batch's epoch."""
    for b in report.batches + busy.batches:
        latest: dict[int, int] = {}
        for run in b.experts:
            axis = run.ffn.queue.axis
            latest[axis] = max(latest.get(axis, 0), run.ffn.epoch)
        for axis, epoch in latest.items():
            assert b.frontier.get(axis) == epoch


def test_storage_axis_advances_exactly_when_a_cold_expert_is_loaded(
    report: MoeReport, busy: MoeReport
) -> None:
    """The combine's NVMe entry is absent before any load and moves only in loading batches."""
    for r in (report, busy):
        nvme = r.axes["nvme.p0"]
        previous = 0
        for b in r.batches:
            now = b.frontier.get(nvme)
            reads = [run.read for run in b.experts if run.read is not None]
            if reads:
                assert now == max(read.epoch for read in reads) > previous
            else:
                assert now == previous
            if previous == 0 and not reads:
                assert nvme not in b.frontier
            previous = now
    assert any(len(b.loaded) == 2 for b in busy.batches)  # both cold experts in one batch


def test_cold_expert_load_costs_size_over_bandwidth(report: MoeReport, busy: MoeReport) -> None:
    """An NVMe read takes size / 14 GB/s and the copy size / 50 GB/s; the FFN waits for both."""
    loads = [run for r in (report, busy) for b in r.batches for run in b.experts if run.loaded]
    assert loads
    for run in loads:
        assert run.read is not None and run.copy is not None
        read = (run.read.finished_at or 0.0) - (run.read.started_at or 0.0)
        copy = (run.copy.finished_at or 0.0) - (run.copy.started_at or 0.0)
        assert read == pytest.approx(EXPERT_BYTES / NVME_BYTES_PER_SECOND, abs=1e-6)
        assert copy == pytest.approx(EXPERT_BYTES / COPY_BYTES_PER_SECOND, abs=1e-6)
        assert run.copy.started_at == run.read.finished_at
        assert run.ffn.started_at is not None and run.ffn.started_at >= (run.copy.finished_at or 0)
        assert run.placement is not None and run.placement.device == run.device


def test_loaded_expert_is_resident_for_the_next_use(report: MoeReport, busy: MoeReport) -> None:
    """A second use of a loaded expert needs no load, runs on the same GPU, and starts at once."""
    for r in (report, busy):
        home: dict[int, str] = {}
        for b in r.batches:
            for run in b.experts:
                if run.expert in home:
                    assert not run.loaded and run.device == home[run.expert]
                if run.loaded:
                    assert run.expert not in home
                    home[run.expert] = run.device
        assert home == {6: home[6], 7: home[7]}
    # batch 4 reuses expert 6 and batch 5 expert 7: each starts as its router ends
    for b in report.batches[3:5]:
        for run in b.experts:
            assert not run.loaded
        first = min(run.ffn.started_at or 0.0 for run in b.experts)
        assert first == b.router.finished_at


def test_registered_with_batches_tokens_and_seed() -> None:
    """The registry runs C3 with --batches, --tokens and --seed."""
    scenario = get_scenario("moe_routing")
    assert scenario.section == "C3"
    assert dict(scenario.options) == {"batches": 6, "tokens": 1, "seed": 171}

    async def main() -> MoeReport:
        result, _ = await scenario.simulate(batches=2, tokens=1, seed=171)
        assert isinstance(result, MoeReport)
        return result

    assert [b.loaded for b in run_virtual(main).batches] == [(), (7,)]
