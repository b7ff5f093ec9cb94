"""Placement reads the real residency: weights and models loaded, moved and dropped."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import asyncfront as af
from asyncfront import GiB, PlacementReason
from asyncfront.testing import FakeDevice, run_virtual

MiB = af.MiB


def test_declared_models_answer_placement_by_hand() -> None:
    """A declared model is resident where rt.declare_resident says, with its declared load time."""

    async def main() -> None:
        async with af.open_runtime([FakeDevice("gpu0"), FakeDevice("gpu1")]) as rt:
            info = rt.declare_model("clip", GiB, resident_on=["gpu0"], load_time=2.0)
            assert rt.declared_models.model("clip") is info
            assert rt.place("clip", cost=0.1).device == "gpu0"
            rt.declare_resident("clip", "gpu0", resident=False)
            rt.declare_resident("clip", "gpu1")
            decision = rt.place("clip", cost=0.1)
            assert (decision.device, decision.reason) == ("gpu1", PlacementReason.RESIDENT)
            assert rt.load_time("clip", "gpu0") == 2.0

    run_virtual(main)


def test_the_old_registry_names_warn_and_still_declare() -> None:
    """rt.register_model, rt.mark_resident and rt.models are deprecated aliases that still work."""

    async def main() -> None:
        async with af.open_runtime([FakeDevice("gpu0"), FakeDevice("gpu1")]) as rt:
            with pytest.warns(DeprecationWarning, match="rt.declare_model"):
                rt.register_model("clip", GiB, resident_on=["gpu1"])
            with pytest.warns(DeprecationWarning, match="rt.declare_resident"):
                rt.mark_resident("clip", "gpu0")
            with pytest.warns(DeprecationWarning, match="rt.declared_models"):
                registry = rt.models
            assert registry is rt.declared_models
            assert rt.is_resident("clip", "gpu0") and rt.is_resident("clip", "gpu1")

    run_virtual(main)


def test_an_unknown_model_is_a_key_error_naming_it() -> None:
    """Placement for a model nobody registered or declared fails, naming it and rt.declare_model."""

    async def main() -> None:
        async with af.open_runtime([FakeDevice("gpu0")]) as rt:
            assert not rt.is_resident("ghost", "gpu0")
            with pytest.raises(KeyError, match=r"'ghost' is not declared \(use rt.declare_model\)"):
                rt.place("ghost", cost=1.0)

    run_virtual(main)


# -- real weights and models -----------------------------------------------------------

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")

from asyncfront.devices import CpuDevice, StorageDevice  # noqa: E402


class Tiny(torch.nn.Module):  # type: ignore[misc]
    """A bias-free Linear after an Embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.proj = torch.nn.Linear(4, 4, bias=False)

    def forward(self, ids: Any) -> Any:
        return self.proj(self.embed(ids))


def _save_tiny(path: Path) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(0)
    state = {
        "embed.weight": torch.randn(10, 4, generator=gen),
        "proj.weight": torch.randn(4, 4, generator=gen),
    }
    safetensors_torch.save_file(state, path)
    return state


def _devices(tmp_path: Path, second_memory: int = 16 * MiB) -> list[Any]:
    return [
        CpuDevice("cpu0", memory=16 * MiB),
        CpuDevice("cpu1", memory=second_memory),
        StorageDevice(tmp_path),
    ]


async def test_placement_follows_a_real_model_through_load_move_and_drop(tmp_path: Path) -> None:
    """rt.place and graph stages see where rt.model is resident after a load, a move and a drop."""
    _save_tiny(tmp_path / "tiny.safetensors")
    ids = torch.tensor([[1, 2, 3]])
    async with af.open_runtime(_devices(tmp_path)) as rt:
        rt.create_context("tiny", device="cpu0", max_memory=MiB)
        there = rt.create_context("tiny-1", device="cpu1", max_memory=MiB)
        model = rt.model("tiny", Tiny, tmp_path / "tiny.safetensors", device="cpu0")
        bandwidth = rt.residency.bandwidth
        # never loaded: nowhere resident, load time from size and bandwidth
        assert not rt.is_resident(model, "cpu0") and not rt.is_resident("tiny", "cpu1")
        assert rt.load_time(model, "cpu1") == pytest.approx(model.nbytes / bandwidth)
        before = rt.place(model)
        assert before.reason is PlacementReason.CHEAPEST and not before.chosen.resident

        async with rt.using(model, "cpu1", context=there) as m:
            expected = m.module(ids)
        assert rt.is_resident(model, "cpu1") and not rt.is_resident(model, "cpu0")
        assert rt.load_time(model, "cpu1") == 0.0
        decision = rt.place(model)
        assert (decision.device, decision.reason) == ("cpu1", PlacementReason.RESIDENT)
        g = rt.graph("embed")
        g.stage("embed", model.module, ids, model="tiny")
        run = await g.submit()
        assert run.placements["embed"].device == "cpu1"
        assert run["embed"].queue.device.name == "cpu1"
        assert torch.equal((await run.results())["embed"], expected)

        # moved: placement follows it to cpu0
        async with rt.using(model, "cpu0"):
            pass
        assert rt.place(model).device == "cpu0" and not rt.is_resident(model, "cpu1")
        assert rt.place(model).reason is PlacementReason.RESIDENT

        # dropped by hand: resident nowhere, and the load times are the measured ones
        assert rt.residency.drop(model, "cpu0")
        assert not rt.is_resident(model, "cpu0") and not rt.is_resident(model, "cpu1")
        for device in ("cpu0", "cpu1"):
            measured = model.weights.load_times[device]
            assert measured > 0 and rt.load_time(model, device) == measured
        after = rt.place(model)
        assert after.reason is PlacementReason.CHEAPEST and not after.chosen.resident


async def test_a_device_too_small_for_the_weights_cannot_hold_them(tmp_path: Path) -> None:
    """A device whose memory is smaller than the weights has an infinite load time: never chosen."""
    state = _save_tiny(tmp_path / "tiny.safetensors")
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    async with af.open_runtime(_devices(tmp_path, second_memory=nbytes // 2)) as rt:
        rt.weights("tiny", tmp_path / "tiny.safetensors")
        assert rt.load_time("tiny", "cpu1") == float("inf")
        decision = rt.place("tiny", devices=["cpu1", "cpu0"])
        assert decision.device == "cpu0"
        assert decision.estimates["cpu1"] == float("inf")


async def test_weights_loaded_with_ensure_resident_are_seen_by_placement(tmp_path: Path) -> None:
    """rt.weights weights are resident for placement once loaded, and not after a drop."""
    _save_tiny(tmp_path / "tiny.safetensors")
    async with af.open_runtime(_devices(tmp_path)) as rt:
        ctx = rt.create_context("w", device="cpu1", max_memory=MiB)
        weights = rt.weights("w", tmp_path / "tiny.safetensors")
        await rt.ensure_resident(weights, "cpu1", context=ctx)
        assert rt.place(weights).device == "cpu1"
        assert rt.place("w", devices=["cpu0", "cpu1"]).reason is PlacementReason.RESIDENT
        rt.residency.drop(weights, "cpu1")
        assert not rt.is_resident(weights, "cpu1")


async def test_declaring_a_name_the_residency_holds_is_refused(tmp_path: Path) -> None:
    """rt.declare_model refuses a name registered with rt.weights/rt.model and declares nothing."""
    _save_tiny(tmp_path / "tiny.safetensors")
    async with af.open_runtime(_devices(tmp_path)) as rt:
        rt.model("tiny", Tiny, tmp_path / "tiny.safetensors", device="cpu0")
        with pytest.raises(ValueError, match="'tiny' names weights registered with the residency"):
            rt.declare_model("tiny", GiB, resident_on=["cpu1"])
        assert rt.declared_models.models == ()
        assert not rt.is_resident("tiny", "cpu1")
