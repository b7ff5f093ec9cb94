"""Scenario B5: agent workflows with SLOs under priority, EDF and SLO-aware arbitration."""

from __future__ import annotations

import functools
import subprocess
import sys

import pytest

from asyncfront.scenarios import multi_agent as ma
from asyncfront.testing import run_virtual


def run(load: float, policy: str, reservation: str = "predicted") -> ma.PolicyResult:
    """One run of the default workload in virtual time."""
    workload = ma.make_workload()
    return run_virtual(
        functools.partial(
            ma.run_multi_agent, workload, load=load, policy=policy, reservation=reservation
        )
    )


@pytest.fixture(scope="module")
def results() -> dict[tuple[float, str, str], ma.PolicyResult]:
    """The runs the claims below compare, each once."""
    cases = [
        (0.5, "edf", "predicted"),
        (0.5, "slo", "predicted"),
        (1.5, "priority", "predicted"),
        (1.5, "edf", "predicted"),
        (1.5, "slo", "predicted"),
        (1.5, "slo", "max_length"),
    ]
    return {case: run(*case) for case in cases}


def test_slo_policy_beats_edf_by_20_points_at_1_5x_and_never_loses_at_0_5x(
    results: dict[tuple[float, str, str], ma.PolicyResult],
) -> None:
    """At 1.5x capacity SLO >= EDF + 20 points > priority; at 0.5x SLO >= EDF."""
    priority = results[1.5, "priority", "predicted"].attainment
    edf = results[1.5, "edf", "predicted"].attainment
    slo = results[1.5, "slo", "predicted"].attainment
    assert priority < edf
    assert slo >= edf + 0.20
    assert (
        results[0.5, "slo", "predicted"].attainment >= results[0.5, "edf", "predicted"].attainment
    )
    assert results[0.5, "slo", "predicted"].workflows == ma.DEFAULT_WORKFLOWS


def test_predicted_reservation_reserves_less_kv_with_attainment_no_worse(
    results: dict[tuple[float, str, str], ma.PolicyResult],
) -> None:
    """Reserving a quantile of each role's outputs, grown on demand, beats reserving the maximum."""
    predicted = results[1.5, "slo", "predicted"]
    maximum = results[1.5, "slo", "max_length"]
    assert predicted.kv_mean_gib < 0.6 * maximum.kv_mean_gib
    assert predicted.kv_peak_gib < maximum.kv_peak_gib
    assert predicted.attainment >= maximum.attainment
    # every call reserved at least what it produced: the reservations grew where needed
    assert predicted.reserved_tokens >= predicted.used_tokens
    assert maximum.reserved_tokens > predicted.reserved_tokens
    assert predicted.used_tokens == maximum.used_tokens


def test_workload_is_seeded_and_slos_are_1_5_to_3_times_unloaded_latency() -> None:
    """The same seed gives the same workflows; each has 2-6 calls and an SLO in range."""
    a, b = ma.make_workload(50, seed=3), ma.make_workload(50, seed=3)
    assert a == b and a != ma.make_workload(50, seed=4)
    for wf in a:
        assert 2 <= len(wf.calls) <= 6
        assert 1.5 * wf.unloaded_latency <= wf.slo <= 3.0 * wf.unloaded_latency
        assert all(16 <= c.output_tokens <= ma.MAX_OUTPUT_TOKENS for c in wf.calls)


def test_an_unloaded_workflow_finishes_at_its_critical_path() -> None:
    """Alone on the GPUs a workflow meets its SLO, ending exactly at its unloaded latency."""
    workload = ma.make_workload(1, seed=11)
    result = run_virtual(functools.partial(ma.run_multi_agent, workload, load=0.01, policy="slo"))
    assert result.met == 1
    gap = workload[0].gap / (0.01 * ma.capacity_rate(workload))
    assert result.makespan == pytest.approx(gap + workload[0].unloaded_latency)


def test_running_quantile() -> None:
    """The quantile answers only after its minimum, over its last window of observations."""
    q = ma.RunningQuantile(0.5, window=4, minimum=2)
    q.observe(10)
    assert q.value() is None
    for v in (1, 2, 3, 4):
        q.observe(v)
    assert q.value() == 2  # the median of the last four: 1, 2, 3, 4
    with pytest.raises(ValueError, match="quantile must be"):
        ma.RunningQuantile(0.0)


def test_bad_run_arguments_are_refused() -> None:
    """An unknown policy, reservation mode or a load <= 0 is refused before running."""
    workload = ma.make_workload(2)
    for kw, match in (
        ({"policy": "fifo", "load": 1.0}, "no policy named 'fifo'"),
        ({"policy": "edf", "load": 0.0}, "load must be > 0"),
        ({"policy": "edf", "load": 1.0, "reservation": "half"}, "no reservation mode"),
    ):
        with pytest.raises(ValueError, match=match):
            run_virtual(functools.partial(ma.run_multi_agent, workload, **kw))


def test_simulate_multi_agent_from_the_command_line() -> None:
    """python -m asyncfront simulate multi_agent --load runs one load and prints the table."""
    out = subprocess.run(
        [sys.executable, "-m", "asyncfront", "simulate", "multi_agent",
         "--load", "100", "--workflows", "12", "--trace", ""],
        capture_output=True, text=True, check=True, timeout=120,
    )  # fmt: skip
    assert "12 agent workflows (seed 7)" in out.stdout
    assert "1.0x" in out.stdout and "KV reservation" in out.stdout
