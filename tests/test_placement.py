"""Placement: the rules of place(), ties and the model registry."""

from __future__ import annotations

import math

import pytest

import asyncfront as af
from asyncfront import PlacementCandidate, PlacementReason, StageNeeds, place
from asyncfront.testing import FakeDevice

GiB = af.GiB


def cand(
    device: str,
    *,
    kind: str = "gpu",
    resident: bool = False,
    load: float = 0.0,
    backlog: float = 0.0,
    compute: float = 1.0,
) -> PlacementCandidate:
    return PlacementCandidate(device, kind, resident, load, backlog, compute)


# -- the rules ---------------------------------------------------------------------------


def test_resident_device_wins_over_a_cheaper_one_without_deadline() -> None:
    """Where the weights are resident beats a device that would be faster after loading."""
    decision = place(
        StageNeeds(model="rerank", cost=1.0),
        [cand("gpu0", load=0.1, compute=0.5), cand("gpu1", resident=True, backlog=3.0)],
    )
    assert decision.device == "gpu1"
    assert decision.reason is PlacementReason.RESIDENT
    assert decision.estimates == {"gpu0": 0.6, "gpu1": 4.0}


def test_resident_device_that_meets_the_deadline_is_kept() -> None:
    """A resident device within the deadline is chosen even when another is cheaper."""
    decision = place(
        StageNeeds(model="m", deadline=4.0),
        [cand("gpu0", compute=0.5), cand("gpu1", resident=True, backlog=3.0)],
    )
    assert (decision.device, decision.reason) == ("gpu1", PlacementReason.RESIDENT)
    assert decision.meets_deadline


def test_fastest_of_several_resident_devices() -> None:
    """With the weights resident on several devices, the least loaded one is chosen."""
    decision = place(
        StageNeeds(model="m"),
        [
            cand("gpu0", resident=True, backlog=2.0),
            cand("gpu1", resident=True, backlog=0.5),
            cand("gpu2", resident=True, backlog=1.0),
        ],
    )
    assert (decision.device, decision.reason) == ("gpu1", PlacementReason.RESIDENT)


def test_resident_device_missing_the_deadline_gives_way_to_the_cheapest() -> None:
    """When the resident device would miss the deadline, load + backlog + compute decides."""
    decision = place(
        StageNeeds(model="m", deadline=2.0),
        [
            cand("gpu0", resident=True, backlog=5.0),
            cand("gpu1", load=0.5, backlog=0.2),
            cand("gpu2", load=0.2, backlog=0.1),
        ],
    )
    assert (decision.device, decision.reason) == ("gpu2", PlacementReason.CHEAPEST)
    assert decision.estimate == pytest.approx(1.3)


def test_cheapest_counts_the_load_time() -> None:
    """Nothing resident: the load time is part of the estimate that is compared."""
    decision = place(
        StageNeeds(model="m"),
        [cand("gpu0", load=3.0), cand("gpu1", load=0.5, backlog=1.0)],
    )
    assert (decision.device, decision.reason) == ("gpu1", PlacementReason.CHEAPEST)
    assert decision.estimates == {"gpu0": 4.0, "gpu1": 2.5}


def test_cheapest_may_be_the_cpu() -> None:
    """A CPU that meets the deadline more cheaply than any accelerator is chosen."""
    decision = place(
        StageNeeds(model="m", deadline=10.0),
        [cand("gpu0", load=2.0, backlog=4.0), cand("cpu", kind="cpu", compute=3.0)],
    )
    assert (decision.device, decision.reason) == ("cpu", PlacementReason.CHEAPEST)


def test_cpu_fallback_when_nothing_meets_the_deadline() -> None:
    """No device meets the deadline: the CPU takes the stage, though an accelerator is faster."""
    decision = place(
        StageNeeds(model="m", deadline=1.0),
        [
            cand("gpu0", resident=True, backlog=2.0),
            cand("gpu1", load=1.5),
            cand("cpu", kind="cpu", compute=8.0),
        ],
    )
    assert (decision.device, decision.reason) == ("cpu", PlacementReason.CPU_FALLBACK)
    assert not decision.meets_deadline


def test_cpu_when_no_accelerator_can_hold_the_model() -> None:
    """Accelerators too small for the model (infinite load time) leave it to the CPU."""
    decision = place(
        StageNeeds(model="huge", deadline=1.0),
        [cand("gpu0", load=math.inf), cand("gpu1", load=math.inf), cand("cpu", kind="cpu")],
    )
    assert (decision.device, decision.reason) == ("cpu", PlacementReason.NO_ACCELERATOR)
    assert decision.estimates["gpu0"] == math.inf


def test_best_effort_without_a_cpu() -> None:
    """Nothing meets the deadline and no CPU is a candidate: the cheapest device anyway."""
    decision = place(
        StageNeeds(model="m", deadline=0.5),
        [cand("gpu0", backlog=3.0), cand("gpu1", backlog=1.0), cand("gpu2", load=math.inf)],
    )
    assert (decision.device, decision.reason) == ("gpu1", PlacementReason.BEST_EFFORT)


def test_cpu_only_candidates_follow_the_ordinary_rules() -> None:
    """Without accelerators the CPUs compete on estimate, and fall back when all miss."""
    cpus = [cand("cpu0", kind="cpu", backlog=2.0), cand("cpu1", kind="cpu", backlog=1.0)]
    assert place(StageNeeds(deadline=3.0), cpus).reason is PlacementReason.CHEAPEST
    late = place(StageNeeds(deadline=0.5), cpus)
    assert (late.device, late.reason) == ("cpu1", PlacementReason.CPU_FALLBACK)


def test_no_candidates_or_no_holder_raise() -> None:
    """An empty candidate list, or one where nothing can hold the model, is an error."""
    with pytest.raises(af.PlacementError, match="no candidate devices"):
        place(StageNeeds(model="m"), [])
    with pytest.raises(af.PlacementError, match="can hold model 'm'"):
        place(StageNeeds(model="m"), [cand("gpu0", load=math.inf)])


# -- ties --------------------------------------------------------------------------------


def test_tie_between_equal_candidates_goes_to_the_first() -> None:
    """Equal estimates: the earlier candidate (the runtime's device order) wins."""
    decision = place(StageNeeds(), [cand("gpu0"), cand("gpu1"), cand("gpu2")])
    assert decision.device == "gpu0"
    reversed_order = place(StageNeeds(), [cand("gpu2"), cand("gpu1"), cand("gpu0")])
    assert reversed_order.device == "gpu2"


def test_tie_between_resident_devices_goes_to_the_first() -> None:
    """Two resident devices with equal estimates: the earlier one."""
    decision = place(
        StageNeeds(model="m"),
        [cand("gpu0"), cand("gpu1", resident=True), cand("gpu2", resident=True)],
    )
    assert decision.device == "gpu1"


def test_tie_prefers_resident_weights() -> None:
    """A resident device ties with a non-resident one at the same estimate: resident wins."""
    decision = place(
        StageNeeds(model="m", deadline=0.5),
        [cand("gpu0", backlog=1.0), cand("gpu1", resident=True, backlog=1.0)],
    )
    assert (decision.device, decision.reason) == ("gpu1", PlacementReason.BEST_EFFORT)


def test_deadline_is_inclusive() -> None:
    """An estimate exactly at the deadline meets it."""
    decision = place(
        StageNeeds(model="m", deadline=2.0), [cand("gpu0", resident=True, backlog=1.0)]
    )
    assert decision.reason is PlacementReason.RESIDENT and decision.meets_deadline


def test_decision_summary_lists_every_candidate() -> None:
    """as_dict names the device, the rule and each candidate's estimate (inf as text)."""
    decision = place(StageNeeds(model="m"), [cand("gpu0", load=math.inf), cand("cpu", kind="cpu")])
    summary = decision.as_dict()
    assert summary["device"] == "cpu" and summary["reason"] == "no_accelerator"
    assert summary["estimates"] == {"gpu0": "inf", "cpu": 1.0}


# -- the registry ------------------------------------------------------------------------


def test_registry_load_times() -> None:
    """Load time: 0 where resident, size / bandwidth, overrides, inf where it cannot fit."""
    fast = FakeDevice("fast", memory=8 * GiB)
    fast.load_bandwidth = 8 * GiB  # type: ignore[attr-defined]
    devices = {
        d.name: d
        for d in (FakeDevice("gpu", memory=8 * GiB), fast, FakeDevice("small", memory=GiB))
    }
    registry = af.ModelRegistry(devices, default_bandwidth=2 * GiB)
    registry.register("llm", 4 * GiB, resident_on=["gpu"])
    registry.register("stt", 2 * GiB, load_time={"gpu": 0.25})
    assert registry.load_time("llm", "gpu") == 0.0
    assert registry.load_time("llm", "fast") == 0.5
    assert registry.load_time("llm", "small") == math.inf
    assert registry.load_time("stt", "gpu") == 0.25
    assert registry.load_time("stt", "fast") == 0.25  # 2 GiB at 8 GiB/s
    registry.mark_resident("stt", "small", True)
    assert registry.is_resident("stt", "small") and registry.load_time("stt", "small") == 0.0
    registry.mark_resident("stt", "small", False)
    assert not registry.is_resident("stt", "small")
    assert not registry.is_resident("unknown", "gpu")


def test_registry_errors_are_specific() -> None:
    """Unknown models and devices, duplicates and negative sizes raise with the names."""
    registry = af.ModelRegistry({"gpu": FakeDevice("gpu")})
    registry.register("llm", GiB)
    with pytest.raises(ValueError, match="already registered"):
        registry.register("llm", GiB)
    with pytest.raises(ValueError, match="size must be >= 0"):
        registry.register("neg", -1)
    with pytest.raises(KeyError, match="no device named 'tpu'"):
        registry.register("x", GiB, resident_on=["tpu"])
    with pytest.raises(KeyError, match="model 'nope' is not registered"):
        registry.load_time("nope", "gpu")
