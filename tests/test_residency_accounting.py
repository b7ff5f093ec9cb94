"""Accounting-only weights: the core residency on fake devices, in virtual time, no bytes."""

from __future__ import annotations

import pytest

import asyncfront as af
from asyncfront import GiB, MiB, PlacementReason
from asyncfront.testing import FakeDevice, run_virtual

NVME = 2e9  # bytes per second
PCIE = 50e9


def _devices(memory: int = 4 * GiB) -> list[FakeDevice]:
    return [
        FakeDevice("gpu0", kind="gpu", memory=memory),
        FakeDevice("gpu1", kind="gpu", memory=memory),
        FakeDevice("pcie1", kind="copy", speed=PCIE),
        FakeDevice("nvme", kind="storage", speed=NVME),
    ]


def test_a_load_takes_size_over_bandwidth_charges_the_budget_and_moves_no_bytes() -> None:
    """An accounting-only load lasts size / storage bandwidth, holds its bytes, has no tensors."""

    async def main() -> None:
        async with af.open_runtime(_devices()) as rt:
            ctx = rt.create_context("llm", device="gpu0", max_memory=2 * GiB)
            weights = rt.weights("llm", size=GiB)
            assert weights.accounting and "accounting only" in repr(weights)
            resident = await rt.ensure_resident(weights, "gpu0")
            assert rt.now() == pytest.approx(GiB / NVME, abs=1e-6)
            assert resident.tensors == {}
            assert rt.usage(ctx).used == rt._memory.charge_for(ctx, GiB)
            nvme = next(q for q in rt.queues if q.device.name == "nvme")
            assert resident.frontier == af.Frontier({nvme.axis: 1})
            assert rt.is_resident("llm", "gpu0") and not rt.is_resident("llm", "gpu1")
            assert rt.load_time("llm", "gpu0") == 0.0
            assert rt.place(weights).reason is PlacementReason.RESIDENT
            assert rt.residency.drop(weights, "gpu0")
            assert rt.usage(ctx).used == 0
            assert rt.load_time("llm", "gpu0") == pytest.approx(GiB / NVME, abs=1e-6)
            assert rt.residency.statistics().loads == 1

    run_virtual(main)


def test_with_a_copy_engine_the_read_comes_first_then_the_copy() -> None:
    """Onto a device with a copy engine: the storage read, then the copy; the frontier has both."""

    async def main() -> None:
        async with af.open_runtime(_devices(memory=8 * GiB)) as rt:
            rt.residency.copy_engines["gpu1"] = "pcie1"
            rt.create_context("sdxl", device="gpu1", max_memory=6 * GiB)
            rt.weights("sdxl", size=5 * GiB)
            resident = await rt.ensure_resident("sdxl", "gpu1")
            read, copy = rt.trace.records
            assert (read.device, read.name) == ("nvme", "read sdxl weights")
            assert (copy.device, copy.name) == ("pcie1", "h2d sdxl weights")
            assert copy.started_at == pytest.approx(read.finished_at, abs=1e-6)
            assert rt.now() == pytest.approx(5 * GiB / NVME + 5 * GiB / PCIE, abs=2e-5)  # two steps
            axes = {q.device.name: q.axis for q in rt.queues}
            assert resident.frontier == af.Frontier({axes["nvme"]: 1, axes["pcie1"]: 1})

    run_virtual(main)


def test_pressure_drops_idle_accounting_weights_by_cost() -> None:
    """A load short of memory evicts the idle weights and their budget gets its bytes back."""

    async def main() -> None:
        async with af.open_runtime(_devices(memory=3 * GiB)) as rt:
            best = af.QoS.BEST_EFFORT
            bark = rt.create_context("bark", device="gpu0", max_memory=2 * GiB, qos=best)
            rt.create_context("sdxl", device="gpu0", max_memory=2 * GiB, qos=best)
            rt.weights("bark", size=2 * GiB, request_rate=0.1)
            rt.weights("sdxl", size=2 * GiB, request_rate=1.0)
            async with rt.using("bark", "gpu0") as w:
                speech = bark.queue.submit(cost=1.0, waits=[w.ready])
            loaded_at = rt.now()
            await speech  # idle again: droppable
            await rt.ensure_resident("sdxl", "gpu0")
            assert [r.weights.name for r in rt.residency.resident("gpu0")] == ["sdxl"]
            assert rt.residency.statistics().evictions == 1
            assert speech.finished_at == pytest.approx(loaded_at + 1.0, abs=1e-6)
            assert rt.usage(bark).used == 0

    run_virtual(main)


def test_accounting_weights_need_a_positive_size() -> None:
    """Weights without a source and without a size are refused, naming them; nothing registered."""

    async def main() -> None:
        async with af.open_runtime(_devices()) as rt:
            with pytest.raises(ValueError, match=r"weights 'x': accounting-only .* got None"):
                rt.weights("x")
            with pytest.raises(ValueError, match="got 0"):
                rt.weights("x", size=0)
            assert rt.residency.statistics().registered == 0
            rt.weights("x", size=MiB)  # the name is still free

    run_virtual(main)
