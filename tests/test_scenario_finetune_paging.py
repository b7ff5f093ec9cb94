"""Scenario B2c in virtual time: optimizer-state paging interleaved with compute, per step."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from asyncfront.scenarios import get_scenario
from asyncfront.scenarios.finetune_paging import (
    NVME_BYTES_PER_SECOND,
    OPTIMIZER_BYTES,
    PCIE_BYTES_PER_SECOND,
    SimulationReport,
    page_values,
    simulate,
    train_values,
)
from asyncfront.testing import run_virtual

ROOT = Path(__file__).resolve().parents[1]


def _run(steps: int) -> SimulationReport:
    async def main() -> SimulationReport:
        report, _ = await simulate(steps=steps)
        return report

    return run_virtual(main)


@pytest.fixture(scope="module")
def report() -> SimulationReport:
    return _run(4)


def test_every_step_is_submitted_before_any_runs(report: SimulationReport) -> None:
    """The whole fine-tune is one atomic submission: nothing runs until the last is queued."""
    assert report.submitted_before_start
    assert len(report.steps) == 4
    assert report.train.value == 3 * 4 and report.page.value == 2 * 4


def test_the_page_out_waits_for_the_forward_and_overlaps_the_backward(
    report: SimulationReport,
) -> None:
    """The page-out starts when the forward signals step*3+1 and runs inside the backward pass."""
    for s in report.steps:
        forward_done, _, _ = train_values(s.step)
        assert (report.train, forward_done) in s.copy_out.waits
        start, end = s.page_out
        assert start == s.forward.finished_at == s.backward.started_at
        assert s.backward.finished_at is not None and end < s.backward.finished_at


def test_the_page_in_follows_the_page_out_on_the_page_semaphore(report: SimulationReport) -> None:
    """The read waits for page_sem P, the copy back signals P+1; both take size / bandwidth."""
    for s in report.steps:
        paged_out, paged_in = page_values(s.step)
        assert (report.page, paged_out) in s.write.signals
        assert (report.page, paged_out) in s.read.waits
        assert (report.page, paged_in) in s.copy_in.signals
        assert s.read.started_at == s.write.finished_at
        read = (s.read.finished_at or 0.0) - (s.read.started_at or 0.0)
        copy = (s.copy_in.finished_at or 0.0) - (s.copy_in.started_at or 0.0)
        assert read == pytest.approx(OPTIMIZER_BYTES / NVME_BYTES_PER_SECOND)
        assert copy == pytest.approx(OPTIMIZER_BYTES / PCIE_BYTES_PER_SECOND)


def test_the_optimizer_step_waits_for_backward_and_page_in(report: SimulationReport) -> None:
    """The step waits on step*3+2 and P+1; paging hides in the backward, so it starts at once."""
    for s in report.steps:
        _, backward_done, stepped = train_values(s.step)
        _, paged_in = page_values(s.step)
        waits = s.optimizer.waits
        assert (report.train, backward_done) in waits
        assert (report.page, paged_in) in waits
        assert (report.train, stepped) in s.optimizer.signals
        assert s.optimizer.started_at == s.backward.finished_at
        assert (s.copy_in.finished_at or 0.0) <= (s.optimizer.started_at or 0.0)


def test_the_step_frontier_carries_this_steps_storage_and_copy_epochs(
    report: SimulationReport,
) -> None:
    """The optimizer step's frontier has the step's page-in read on NVMe and its copy on PCIe."""
    nvme, pcie, gpu = report.axes["nvme.p0"], report.axes["pcie0.p0"], report.axes["gpu0.train"]
    for s in report.steps:
        frontier = s.optimizer.frontier
        assert frontier is not None
        assert frontier.get(nvme) == s.read.epoch
        assert frontier.get(pcie) == s.copy_in.epoch
        assert s.write.frontier is not None and s.write.frontier.get(gpu) == s.forward.epoch


def test_the_next_forward_waits_for_the_optimizer_step(report: SimulationReport) -> None:
    """Step k+1's forward waits for train_sem (k+1)*3 and starts when step k's update ends."""
    for before, after in zip(report.steps, report.steps[1:], strict=False):
        assert after.forward.started_at == before.optimizer.finished_at


def test_registered_and_runnable_from_the_example(tmp_path: Path) -> None:
    """finetune_paging is registered as B2c; examples/scenarios/finetune_paging.py prints it."""
    assert get_scenario("finetune_paging").section == "B2c"
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "scenarios" / "finetune_paging.py"),
         "--steps", "2", "--trace", str(tmp_path / "b2c.json")],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    assert "2 steps" in out.stdout and "page-out" in out.stdout
    assert (tmp_path / "b2c.json").exists()
