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


# -- options for simulating a serving system's weight manager ------------------------


def test_a_host_copy_survives_a_drop_so_the_reload_skips_the_read() -> None:
    """The first load through a copy engine reads to host memory; a reload only copies."""

    async def main() -> None:
        async with af.open_runtime(_devices(memory=8 * GiB)) as rt:
            rt.residency.copy_engines["gpu1"] = "pcie1"
            rt.create_context("sdxl", device="gpu1", max_memory=6 * GiB)
            weights = rt.weights("sdxl", size=5 * GiB)
            assert not weights.in_host_memory
            await rt.ensure_resident("sdxl", "gpu1")
            assert weights.in_host_memory
            rt.residency.drop("sdxl", "gpu1")
            assert weights.in_host_memory  # the drop freed the device's copy only
            await rt.ensure_resident("sdxl", "gpu1")
            assert [(r.device, r.name) for r in rt.trace.records] == [
                ("nvme", "read sdxl weights"),
                ("pcie1", "h2d sdxl weights"),
                ("pcie1", "h2d sdxl weights"),
            ]
            warm = rt.weights("bark", size=GiB, in_host_memory=True)
            rt.create_context("bark", device="gpu1", max_memory=GiB)
            await rt.ensure_resident(warm, "gpu1")
            assert [r.name for r in rt.trace.records][-1] == "h2d bark weights"  # no read

    run_virtual(main)


def test_options_that_need_accounting_only_weights_are_refused_for_real_ones() -> None:
    """in_host_memory and drop_while_queued on weights with bytes are a ValueError naming them."""

    async def main() -> None:
        async with af.open_runtime(_devices()) as rt:
            for option in ("in_host_memory", "drop_while_queued"):
                with pytest.raises(ValueError, match="for accounting-only weights"):
                    rt.weights("real", {"w": object()}, **{option: True})  # type: ignore[arg-type]
            assert not rt.residency.knows("real")

    run_virtual(main)


def test_drop_while_queued_frees_with_the_death_frontier_of_the_queued_work() -> None:
    """Queued work does not pin such weights: a drop frees them, reuse waits for that work."""

    async def main() -> None:
        async with af.open_runtime(_devices(memory=GiB)) as rt:
            ctx = rt.create_context("bark", device="gpu0", max_memory=GiB, qos="burstable")
            other = rt.create_context("other", device="gpu0", max_memory=GiB, qos="best_effort")
            rt.weights("bark", size=GiB, drop_while_queued=True)
            async with rt.using("bark", "gpu0") as bark:
                speech = ctx.queue.submit(name="speech", cost=1.0, waits=[bark.ready])
            assert not bark.pinned and not speech.done()
            changes: list[af.memory.ResidencyChange] = []
            rt.residency.on_change(changes.append)
            dropped_at = rt.now()
            assert rt.residency.drop("bark", "gpu0")
            (drop,) = changes
            assert drop.action == "drop" and drop.reason == "by hand" and drop.time == dropped_at
            assert drop.pending == af.Frontier({ctx.queue.axis: speech.epoch})
            async with rt.session(other) as s:
                await s.allocate(GiB)  # the freed block, once the speech is done
                assert speech.finished_at is not None and rt.now() == speech.finished_at
            # weights registered without the option stay pinned by their context's work
            pinned = rt.weights("pinned", size=GiB // 2)
            rt.create_context("pinned", device="gpu1", max_memory=GiB)
            resident = await rt.ensure_resident(pinned, "gpu1")
            rt.context("pinned").queue.submit(name="work", cost=1.0)
            assert resident.pinned
            with pytest.raises(RuntimeError, match="pinned"):
                rt.residency.drop(pinned, "gpu1")

    run_virtual(main)


def test_evict_with_context_lets_the_tier_policy_drop_adopted_weights() -> None:
    """Adopted weights of a BestEffort context are dropped by a Burstable allocation's eviction."""

    async def main() -> None:
        async with af.open_runtime(_devices(memory=4 * GiB)) as rt:
            bark = rt.create_context("bark", device="gpu0", max_memory=3 * GiB, qos="best_effort")
            sdxl = rt.create_context(
                "sdxl", device="gpu0", max_memory=3 * GiB, base_memory=0, qos="burstable"
            )
            rt.weights("bark", size=3 * GiB, evict_with_context=True, drop_while_queued=True)
            async with rt.session(bark) as s:
                block = await s.allocate(3 * GiB)
                resident = rt.residency.adopt("bark", "gpu0", block)
                assert rt.is_resident("bark", "gpu0") and resident.ready[0].value == 1
                with pytest.raises(ValueError, match="already resident"):
                    rt.residency.adopt("bark", "gpu0", block)
                changes: list[af.memory.ResidencyChange] = []
                rt.residency.on_change(changes.append)
                async with rt.session(sdxl) as job:
                    await job.allocate(2 * GiB)
                assert [(c.action, c.weights, c.reason) for c in changes] == [
                    ("drop", "bark", "on_evict")
                ]
                assert changes[0].offset == block.offset and block.freed
                assert bark.statistics().evictions == 1
                assert not rt.is_resident("bark", "gpu0")

    run_virtual(main)


def test_load_queues_put_every_load_on_one_axis_and_report_each_load() -> None:
    """Loads through a named queue share its axis in order; on_change reports their transfers."""

    async def main() -> None:
        async with af.open_runtime(_devices(memory=8 * GiB)) as rt:
            rt.residency.copy_engines["gpu1"] = "pcie1"
            dma = rt.queue("pcie1", name="pcie1")
            rt.residency.load_queues["pcie1"] = dma
            changes: list[af.memory.ResidencyChange] = []
            rt.residency.on_change(changes.append)
            for name in ("a", "b"):
                rt.create_context(name, device="gpu1", max_memory=GiB)
                rt.weights(name, size=GiB // 2, in_host_memory=True)
            await rt.ensure_resident("a", "gpu1")
            await rt.ensure_resident("b", "gpu1")
            assert [(c.action, c.weights) for c in changes] == [("load", "a"), ("load", "b")]
            first, second = changes
            assert first.read is None and first.copy is not None and second.copy is not None
            assert (first.copy.queue, second.copy.queue) == (dma, dma)
            assert (first.copy.epoch, second.copy.epoch) == (1, 2)
            assert first.requested_at == 0.0 and first.nbytes == GiB // 2

    run_virtual(main)
