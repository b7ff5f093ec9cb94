"""Scenario C2 in virtual time: a two-node pipeline over fake links of several speeds."""

from __future__ import annotations

import pytest

from asyncfront import axis_fields
from asyncfront.scenarios import get_scenario
from asyncfront.scenarios.cross_node_pipeline import (
    ACTIVATION_BYTES,
    BANDWIDTHS_GBPS,
    LATENCIES_US,
    STAGE_SECONDS,
    FakeLinkDevice,
    run_pipeline,
)
from asyncfront.testing import run_virtual


def _message_seconds(gbps: float, latency_us: float) -> float:
    return latency_us * 1e-6 + ACTIVATION_BYTES * 8 / (gbps * 1e9)


def test_fast_link_hides_behind_compute() -> None:
    """At 400 Gb/s the pipeline takes (m + 1) stage steps plus one message."""
    run, _ = run_virtual(lambda: run_pipeline(micro_batches=8))
    expected = 9 * STAGE_SECONDS + _message_seconds(400.0, 2.0)
    assert run.seconds == pytest.approx(expected, abs=50e-6)  # looptime ticks in us
    assert run.bubble == pytest.approx(1 - 16 * STAGE_SECONDS / (2 * expected), abs=1e-3)


def test_slow_link_bounds_the_pipeline() -> None:
    """At 10 Gb/s a message outlasts a stage, so the link sets the pace."""
    run, _ = run_virtual(lambda: run_pipeline(gbps=10.0, latency_us=50.0, micro_batches=8))
    expected = 2 * STAGE_SECONDS + 8 * _message_seconds(10.0, 50.0)
    assert run.seconds == pytest.approx(expected, abs=50e-6)  # looptime ticks in us


def test_final_frontier_names_both_nodes_compute_and_nic_axes() -> None:
    """The last micro-batch's frontier has a GPU and a NIC axis on each node, all at m."""
    run, _ = run_virtual(lambda: run_pipeline(micro_batches=4))
    entries = {(axis_fields(a).node, axis_fields(a).device): e for a, e in run.frontier}
    assert entries == {(0, 0): 4, (0, 1): 4, (1, 0): 4, (1, 1): 4}


def test_scenario_sweeps_every_link_setting() -> None:
    """The registered scenario reports bubble and throughput for each bandwidth and latency."""
    scenario = get_scenario("cross_node_pipeline")
    report, timeline = run_virtual(lambda: scenario.simulate(micro_batches=4))
    assert [(r.gbps, r.latency_us) for r in report.runs] == [
        (g, lat) for g in BANDWIDTHS_GBPS for lat in LATENCIES_US
    ]
    throughputs = [report.run(g, 2.0).throughput for g in BANDWIDTHS_GBPS]
    assert throughputs == sorted(throughputs, reverse=True)
    text = report.describe()
    assert "10 Gb/s" in text and "bubble" in text
    assert "node1.nic" in timeline


def test_fake_link_rejects_bad_settings() -> None:
    """A link needs a positive bandwidth and a non-negative latency."""
    with pytest.raises(ValueError, match="bandwidth must be > 0 Gb/s, got 0"):
        FakeLinkDevice("nic", gbps=0)
    with pytest.raises(ValueError, match="latency must be >= 0 us, got -1"):
        FakeLinkDevice("nic", latency_us=-1)
