"""Placement: the rules of place(), ties, the model registry and the runtime's view of it."""

from __future__ import annotations

import asyncio
import math

import pytest
import structlog

import asyncfront as af
from asyncfront import PlacementCandidate, PlacementReason, StageNeeds, place
from asyncfront.testing import FakeDevice, run_virtual

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
    with pytest.raises(ValueError, match="already declared"):
        registry.register("llm", GiB)
    with pytest.raises(ValueError, match="size must be >= 0"):
        registry.register("neg", -1)
    with pytest.raises(KeyError, match="no device named 'tpu'"):
        registry.register("x", GiB, resident_on=["tpu"])
    with pytest.raises(KeyError, match="model 'nope' is not declared"):
        registry.load_time("nope", "gpu")


# -- the runtime -------------------------------------------------------------------------


def test_backlog_counts_queued_and_remaining_work_over_speed() -> None:
    """A fake device's backlog is its unfinished work's cost / speed, the running one pro rata."""

    async def main() -> None:
        async with af.open_runtime([FakeDevice("gpu", speed=2.0)]) as rt:
            gate = af.TimelineSemaphore(name="gate")
            q1, q2 = rt.queue("gpu"), rt.queue("gpu")
            q1.submit(cost=4.0)  # 2 s at speed 2
            q1.submit(cost=2.0)
            q2.submit(waits=[(gate, 1)], cost=6.0)  # blocked on a wait: still queued work
            assert rt.backlog("gpu") == 6.0
            await asyncio.sleep(0.5)
            assert rt.backlog("gpu") == pytest.approx(5.5)
            gate.signal(1)

    run_virtual(main)


def test_runtime_place_weighs_residency_and_backlog() -> None:
    """rt.place picks the resident device, and the idle one when nothing is resident."""

    async def main() -> None:
        devices = [FakeDevice("cpu", kind="cpu", speed=0.1), FakeDevice("gpu0"), FakeDevice("gpu1")]
        async with af.open_runtime(devices) as rt:
            rt.declare_model("bge", GiB // 2, resident_on=["gpu1"])
            rt.declare_model("clip", GiB)
            rt.queue("gpu0").submit(cost=3.0)
            assert rt.is_resident("bge", "gpu1") and not rt.is_resident("bge", "gpu0")
            assert rt.place("bge", cost=0.1).device == "gpu1"
            clip = rt.place("clip", cost=0.1)
            assert (clip.device, clip.reason) == ("gpu1", PlacementReason.CHEAPEST)
            assert clip.estimates["gpu0"] == pytest.approx(3.0 + 0.25 + 0.1)
            rt.declare_resident("bge", "gpu1", resident=False)
            assert not rt.is_resident("bge", "gpu1")

    run_virtual(main)


def test_copy_and_storage_devices_are_not_candidates() -> None:
    """Placement looks only at compute devices: copy engines and storage never run stages."""

    async def main() -> None:
        devices = [
            FakeDevice("dma", kind="copy"),
            FakeDevice("nvme", kind="storage"),
            FakeDevice("gpu"),
        ]
        async with af.open_runtime(devices) as rt:
            decision = rt.place(cost=1.0)
            assert [c.device for c in decision.candidates] == ["gpu"]

    run_virtual(main)


def test_a_replacement_residency_is_consulted() -> None:
    """rt.placement_residency can be any object with is_resident and load_time."""

    class Everywhere:
        def is_resident(self, model: str, device: str) -> bool:
            return device == "gpu1"

        def load_time(self, model: str, device: str) -> float:
            return 0.0 if device == "gpu1" else 9.0

    async def main() -> None:
        async with af.open_runtime([FakeDevice("gpu0"), FakeDevice("gpu1")]) as rt:
            rt.placement_residency = Everywhere()
            assert isinstance(rt.placement_residency, af.PlacementResidency)
            assert rt.place("anything", cost=1.0).device == "gpu1"
            assert rt.load_time("anything", "gpu0") == 9.0

    run_virtual(main)


def test_graph_placement_is_logged_and_traced() -> None:
    """A placed stage logs a 'placement' event and carries the decision into the Perfetto args."""

    async def main() -> af.Runtime:
        devices = [FakeDevice("cpu", kind="cpu"), FakeDevice("gpu0"), FakeDevice("gpu1")]
        async with af.open_runtime(devices) as rt:
            rt.declare_model("reranker", GiB, resident_on=["gpu1"])
            g = rt.graph("rag")
            g.stage("rerank", lambda: "ranked", model="reranker", cost=0.2)
            run = await g.submit()
            assert await run.results() == {"rerank": "ranked"}
            assert run.placements["rerank"].device == "gpu1"
            assert run["rerank"].queue.device.name == "gpu1"
        return rt

    with structlog.testing.capture_logs() as logs:
        rt = run_virtual(main)
    event = next(e for e in logs if e["event"] == "placement")
    assert event["stage"] == "rerank" and event["device"] == "gpu1"
    assert event["reason"] == "resident" and set(event["estimates"]) == {"cpu", "gpu0", "gpu1"}
    (slice_,) = [e for e in rt.trace.to_perfetto()["traceEvents"] if e.get("name") == "rerank"]
    assert slice_["args"]["placement"]["reason"] == "resident"
    assert slice_["args"]["graph"] == "rag" and slice_["args"]["stage"] == "rerank"
    (record,) = rt.trace.records
    assert record.annotations["placement"]["device"] == "gpu1"


def test_graph_placement_counts_earlier_stages_of_the_same_run() -> None:
    """Independent stages of one run spread over idle devices: each sees the ones placed before."""

    async def main() -> None:
        async with af.open_runtime([FakeDevice("gpu0"), FakeDevice("gpu1")]) as rt:
            g = rt.graph("fanout")
            for i in range(4):
                g.stage(f"s{i}", cost=1.0)
            run = await g.submit()
            await run.results()
            devices = [run.placements[f"s{i}"].device for i in range(4)]
            assert devices == ["gpu0", "gpu1", "gpu0", "gpu1"]
            assert rt.now() == 2.0

    run_virtual(main)


def test_graph_stage_loads_or_moves_to_the_cpu_by_deadline() -> None:
    """Scenario B3: weights dropped; load them if that meets the target, else use the CPU."""

    async def main() -> None:
        devices = [FakeDevice("cpu", kind="cpu", speed=0.1), FakeDevice("gpu0"), FakeDevice("gpu1")]
        async with af.open_runtime(devices) as rt:
            rt.declare_model("reranker", GiB, load_time=3.0)
            rt.queue("gpu0").submit(cost=10.0)  # an SDXL job keeps gpu0 busy
            g = rt.graph("rag")
            g.stage("rerank", model="reranker", cost=0.5, deadline=4.0)
            g.stage("rerank_urgent", model="reranker", cost=0.5, deadline=2.0)
            run = await g.submit()
            loaded = run.placements["rerank"]
            assert (loaded.device, loaded.reason) == ("gpu1", PlacementReason.CHEAPEST)
            assert loaded.estimates == {"cpu": 8.0, "gpu0": 13.5, "gpu1": 3.5}
            urgent = run.placements["rerank_urgent"]
            assert (urgent.device, urgent.reason) == ("cpu", PlacementReason.CPU_FALLBACK)
            assert urgent.estimates["gpu1"] == 4.0  # the first rerank is queued ahead there
            await run.results()

    run_virtual(main)


def test_placement_error_leaves_nothing_queued() -> None:
    """A stage that cannot be placed makes submit raise before any stage is queued."""

    async def main() -> None:
        async with af.open_runtime([FakeDevice("gpu", memory=GiB)]) as rt:
            rt.declare_model("huge", 4 * GiB)
            g = rt.graph("g")
            first = g.stage("first", device="gpu", cost=1.0)
            g.stage("second", model="huge", after=[first])
            with pytest.raises(af.PlacementError, match="huge"):
                await g.submit()
            assert all(q.submitted_epoch == 0 for q in rt.queues)

    run_virtual(main)
