"""Weight residency: loads through storage and copy queues, shared loads, pins, drops by cost."""

from __future__ import annotations

import asyncio
import gc
import os
import threading
import weakref
from pathlib import Path
from typing import Any

import pytest

import asyncfront as af
from asyncfront.devices import CpuDevice, ShortReadError, StorageDevice
from asyncfront.memory import (
    EvictionCandidate,
    RequestRate,
    choose_evictions,
    plan_reclaim,
    read_safetensors_layout,
)
from asyncfront.memory._reclaim import Reclaim

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")

KiB = af.KiB


def _bytes(tensor: Any) -> bytes:
    return bytes(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())


def _candidate(key: str, **kw: Any) -> EvictionCandidate:
    fields: dict[str, Any] = {
        "context": key,
        "nbytes": 100,
        "reload_seconds": 1.0,
        "request_rate": 1.0,
        "priority": 0,
    }
    fields.update(kw)
    return EvictionCandidate(key=key, **fields)


# -- the decision, without a loop --------------------------------------------------------


def test_lower_priority_goes_first_even_when_dearer_to_reload() -> None:
    """Priority dominates: low-priority weights are dropped before cheaper high-priority ones."""
    plan = choose_evictions(
        [
            _candidate("llm", priority=20, reload_seconds=0.1, request_rate=0.01),
            _candidate("tts", priority=0, reload_seconds=5.0, request_rate=2.0),
        ],
        needed=100,
    )
    assert plan.victims == ("tts",) and plan.sufficient


def test_within_a_priority_the_lowest_expected_reload_cost_goes_first() -> None:
    """Cost is reload seconds times request rate; recency plays no part."""
    plan = choose_evictions(
        [
            _candidate("hot-small", reload_seconds=0.5, request_rate=4.0),  # 2.0 s/s
            _candidate("cold-big", reload_seconds=8.0, request_rate=0.05),  # 0.4 s/s
            _candidate("warm", reload_seconds=1.0, request_rate=1.0),  # 1.0 s/s
        ],
        needed=150,
    )
    assert plan.victims == ("cold-big", "warm")


def test_pinned_weights_are_never_chosen() -> None:
    """A pinned candidate is skipped however cheap it is."""
    plan = choose_evictions(
        [_candidate("busy", request_rate=0.0, pinned=True), _candidate("idle", request_rate=3.0)],
        needed=100,
    )
    assert plan.victims == ("idle",)


def test_nothing_is_dropped_when_dropping_everything_would_not_suffice() -> None:
    """An eviction that cannot make room drops nothing (reloads would buy nothing)."""
    plan = choose_evictions([_candidate("a"), _candidate("b", pinned=True)], needed=150)
    assert plan.victims == () and not plan.sufficient


def test_unneeded_small_victims_are_pruned() -> None:
    """A cheap small pick made unnecessary by a larger later one is not dropped."""
    plan = choose_evictions(
        [
            _candidate("tiny", nbytes=10, request_rate=0.0),
            _candidate("big", nbytes=200, request_rate=0.5),
        ],
        needed=150,
    )
    assert plan.victims == ("big",) and plan.counted == 200


def test_only_bytes_above_a_reservation_count_for_another_context() -> None:
    """Freeing reserved memory of another context does not help: it is capped per context."""
    candidates = [Reclaim("g1", "guaranteed", 100), Reclaim("b1", "burst", 100)]
    plan = plan_reclaim(candidates, 100, {"guaranteed": 0, "burst": 60, "me": float("inf")})
    assert plan.victims == () and not plan.sufficient
    plan = plan_reclaim([*candidates, Reclaim("b2", "burst", 100)], 50, {"burst": 60})
    assert plan.victims == ("b1",) and plan.counted == 60


def test_request_rate_settles_at_the_arrival_rate_and_decays() -> None:
    """Steady arrivals of 2/s read about 2/s; with no arrivals the rate halves each half-life."""
    rate = RequestRate(half_life=10.0)
    for i in range(2000):
        rate.record(i * 0.5)
    now = 1999 * 0.5
    assert rate.rate(now) == pytest.approx(2.0, rel=0.05)
    assert rate.rate(now + 10.0) == pytest.approx(rate.rate(now) / 2)


def test_safetensors_layout_matches_the_library(tmp_path: Path) -> None:
    """The header parser finds every tensor's dtype, shape and bytes as safetensors wrote them."""
    tensors = {
        "b": torch.arange(6, dtype=torch.float16).reshape(2, 3),
        "a": torch.ones(5, dtype=torch.bfloat16),
        "c": torch.zeros((), dtype=torch.int64),
    }
    path = tmp_path / "w.safetensors"
    safetensors_torch.save_file(tensors, path)
    data_offset, layouts = read_safetensors_layout(path)
    raw = path.read_bytes()
    by_name = {t.name: t for t in layouts}
    assert set(by_name) == set(tensors)
    for name, tensor in tensors.items():
        layout = by_name[name]
        assert layout.dtype == str(tensor.dtype).removeprefix("torch.")
        assert layout.shape == tuple(tensor.shape)
        start = data_offset + layout.offset
        assert raw[start : start + layout.nbytes] == _bytes(tensor)


# -- loading, sharing, pinning, dropping ---------------------------------------------------


def _save(path: Path, seed: int, n: int = 4) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(seed)
    tensors = {
        f"layer{i}.weight": torch.randn(32, 16, generator=gen).to(torch.bfloat16) for i in range(n)
    }
    tensors["norm"] = torch.randn(16, generator=gen)
    safetensors_torch.save_file(tensors, path)
    return tensors


def _devices(tmp_path: Path, memory: int = 1 << 20, **storage: Any) -> list[Any]:
    return [CpuDevice("gpu0", memory=memory), StorageDevice(tmp_path, **storage)]


async def test_safetensors_load_bit_for_bit_through_the_storage_queue(tmp_path: Path) -> None:
    """Loaded tensors equal the file's; the load frontier carries the model's storage axis."""
    expected = _save(tmp_path / "llama.safetensors", 1)
    async with af.open_runtime(_devices(tmp_path)) as rt:
        ctx = rt.create_context("llama", device="gpu0", max_memory=64 * KiB)
        weights = rt.weights("llama", tmp_path / "llama.safetensors")
        resident = await rt.ensure_resident(weights, "gpu0")
        for name, tensor in expected.items():
            assert torch.equal(resident.tensors[name].view(torch.uint8), tensor.view(torch.uint8))
        load_queue = next(q for q in rt.queues if q.name == "nvme.load.llama")
        assert resident.frontier.get(load_queue.axis) == 1
        assert rt.usage(ctx).used == weights.nbytes
        assert resident.ready[0].value == resident.ready[1]


async def test_dict_weights_load_through_a_copy_queue(tmp_path: Path) -> None:
    """Host tensors are copied into device memory on the device's load queue."""
    host = {"w": torch.randn(8, 8), "b": torch.arange(3, dtype=torch.int16)}
    async with af.open_runtime(_devices(tmp_path)) as rt:
        ctx = rt.create_context("bert", device="gpu0", max_memory=64 * KiB)
        resident = await rt.ensure_resident(rt.weights("bert", host), "gpu0")
        assert torch.equal(resident.tensors["w"], host["w"])
        assert torch.equal(resident.tensors["b"], host["b"])
        assert resident.tensors["w"].data_ptr() != host["w"].data_ptr()
        copy_queue = next(q for q in rt.queues if q.name == "gpu0.load.bert")
        assert resident.frontier.get(copy_queue.axis) == 1
        assert rt.usage(ctx).used == resident.nbytes


async def test_concurrent_requests_for_one_model_share_one_load(tmp_path: Path) -> None:
    """Five concurrent ensure_resident calls read the file once and get the same handle."""
    _save(tmp_path / "m.safetensors", 2)
    async with af.open_runtime(_devices(tmp_path)) as rt:
        rt.create_context("m", device="gpu0", max_memory=64 * KiB)
        rt.weights("m", tmp_path / "m.safetensors")
        handles = await asyncio.gather(*(rt.ensure_resident("m", "gpu0") for _ in range(5)))
        assert all(h is handles[0] for h in handles)
        storage = rt.device("nvme")
        assert isinstance(storage, StorageDevice)
        assert storage.statistics().reads == 1
        stats = rt.residency.statistics()
        assert stats.loads == 1 and stats.shared_loads == 4 and stats.resident == 1


async def test_loads_of_different_models_run_at_once(tmp_path: Path) -> None:
    """Two models' loads are both inside the storage device at the same time."""
    _save(tmp_path / "a.safetensors", 3)
    _save(tmp_path / "b.safetensors", 4)
    inside = threading.Barrier(2, timeout=10)

    class Gated(StorageDevice):
        def _read_sync(self, out: object, file: str | os.PathLike[str], offset: int) -> int:
            inside.wait()  # passes only when the other load is reading too
            return super()._read_sync(out, file, offset)

    async with af.open_runtime([CpuDevice("gpu0", memory=1 << 20), Gated(tmp_path)]) as rt:
        for name in ("a", "b"):
            rt.create_context(name, device="gpu0", max_memory=64 * KiB)
            rt.weights(name, tmp_path / f"{name}.safetensors")
        a, b = await asyncio.gather(
            rt.ensure_resident("a", "gpu0"), rt.ensure_resident("b", "gpu0")
        )
        assert not inside.broken
        assert a.frontier.axes != b.frontier.axes  # each model loads on its own axis


async def test_work_inside_using_is_pinned_and_inherits_the_load(tmp_path: Path) -> None:
    """Work submitted in a using block waits on the load and the weights cannot be dropped."""
    expected = _save(tmp_path / "llama.safetensors", 5)
    async with af.open_runtime(_devices(tmp_path)) as rt:
        ctx = rt.create_context("llama", device="gpu0", max_memory=64 * KiB)
        rt.weights("llama", tmp_path / "llama.safetensors")
        async with rt.using("llama", "gpu0") as w:
            assert w.pins == 1 and w.pinned
            with pytest.raises(RuntimeError, match="pinned"):
                rt.residency.drop("llama", "gpu0")
            assert rt.residency.reclaim(ctx, 10 * KiB) == 0
            norm = w.tensors["norm"]
            sub = ctx.queue.submit(lambda: float(norm.sum()), waits=[w.ready])
            assert await sub == pytest.approx(float(expected["norm"].sum()))
        assert sub.frontier is not None and sub.frontier >= w.frontier
        assert w.pins == 0
        assert rt.residency.drop("llama", "gpu0")


async def test_weights_with_queued_work_count_as_pinned(tmp_path: Path) -> None:
    """While the weights' context has work queued, eviction treats them as pinned."""
    host = {"w": torch.ones(16)}
    async with af.open_runtime(_devices(tmp_path)) as rt:
        ctx = rt.create_context("tiny", device="gpu0", max_memory=64 * KiB)
        resident = await rt.ensure_resident(rt.weights("tiny", host), "gpu0")
        gate = af.TimelineSemaphore(name="gate")
        queued = ctx.queue.submit(lambda: None, waits=[(gate, 1)])
        assert resident.pinned
        assert [c.pinned for c in rt.residency.candidates(rt.device("gpu0"))] == [True]
        gate.signal(1)
        await queued
        assert not resident.pinned


async def test_drop_frees_with_a_death_frontier_writes_nothing_and_returns_memory(
    tmp_path: Path,
) -> None:
    """Dropping releases budget, pool block and tensors; the file is untouched."""
    path = tmp_path / "llama.safetensors"
    _save(path, 6)
    before = path.read_bytes()
    async with af.open_runtime(_devices(tmp_path)) as rt:
        ctx = rt.create_context("llama", device="gpu0", max_memory=64 * KiB)
        rt.weights("llama", path)
        resident = await rt.ensure_resident("llama", "gpu0")
        sub = ctx.queue.submit(lambda: None, waits=[resident.ready])
        await sub
        tensor_ref = weakref.ref(resident.tensors["norm"])
        pool = rt.device("gpu0").memory
        in_use = pool.statistics().bytes_in_use
        assert rt.residency.drop("llama", "gpu0")
        gc.collect()
        assert tensor_ref() is None and resident.dropped and resident.tensors == {}
        assert rt.usage(ctx).used == 0
        assert pool.statistics().bytes_in_use < in_use
        (freed,) = pool.free_blocks()
        assert freed.death == ctx.death_frontier().merge(resident.frontier)
        storage = rt.device("nvme")
        assert isinstance(storage, StorageDevice)
        assert storage.statistics().writes == 0
        assert not rt.residency.drop("llama", "gpu0")  # already gone
    assert path.read_bytes() == before


async def test_pressure_drops_the_cheapest_weights_not_the_least_recent(tmp_path: Path) -> None:
    """A context short of memory makes the residency drop the low-cost weights, not the oldest."""
    unit = 32 * KiB
    host = {n: {"w": torch.zeros(unit // 4)} for n in ("hot", "cold")}
    async with af.open_runtime(_devices(tmp_path, memory=3 * unit)) as rt:
        best = af.QoS.BEST_EFFORT
        for name in ("hot", "cold"):
            rt.create_context(name, device="gpu0", max_memory=unit, qos=best)
        rt.weights("hot", host["hot"], request_rate=5.0)
        rt.weights("cold", host["cold"], request_rate=0.01)
        await rt.ensure_resident("hot", "gpu0")  # hot is the least recently loaded
        await rt.ensure_resident("cold", "gpu0")
        image = rt.create_context("image", device="gpu0", max_memory=2 * unit, qos=best)
        async with rt.session(image) as s:
            await s.allocate(2 * unit)  # only room for one more unit: something must go
        assert [r.weights.name for r in rt.residency.resident("gpu0")] == ["hot"]
        assert rt.residency.statistics().evictions == 1


async def test_failed_load_frees_what_it_took(tmp_path: Path) -> None:
    """A truncated file raises ShortReadError; nothing stays charged or resident."""
    path = tmp_path / "cut.safetensors"
    _save(path, 7)
    path.write_bytes(path.read_bytes()[:-100])
    async with af.open_runtime(_devices(tmp_path)) as rt:
        ctx = rt.create_context("cut", device="gpu0", max_memory=64 * KiB)
        rt.weights("cut", path)
        with pytest.raises(ShortReadError):
            await rt.ensure_resident("cut", "gpu0")
        assert rt.usage(ctx).used == 0
        assert rt.residency.resident() == ()


async def test_context_defaults_to_the_weights_name(tmp_path: Path) -> None:
    """Without context=, the context named like the weights holds them, else a clear error."""
    async with af.open_runtime(_devices(tmp_path)) as rt:
        rt.weights("orphan", {"w": torch.ones(4)})
        with pytest.raises(LookupError, match="create a context named 'orphan'"):
            await rt.ensure_resident("orphan", "gpu0")
        other = rt.create_context("shared", device="gpu0", max_memory=64 * KiB)
        resident = await rt.ensure_resident("orphan", "gpu0", context=other)
        assert resident.context is other and rt.usage(other).used == resident.nbytes
        with pytest.raises(ValueError, match="size=3 bytes given"):
            rt.weights("sized", {"w": torch.ones(4)}, size=3)


async def test_dropping_gives_the_host_pages_back(tmp_path: Path) -> None:
    """With release_pages, a drop releases a CPU block's whole pages: they read as zeros."""
    host = {"w": torch.ones(64 * KiB)}  # 256 KiB: many whole pages
    async with af.open_runtime(_devices(tmp_path)) as rt:
        rt.residency.release_pages = True
        rt.create_context("big", device="gpu0", max_memory=512 * KiB)
        resident = await rt.ensure_resident(rt.weights("big", host), "gpu0")
        raw = resident._raw
        assert int(raw.count_nonzero()) > 0
        rt.residency.drop("big", "gpu0")
        page = 4096
        start = -(-raw.data_ptr() // page) * page - raw.data_ptr()
        whole = raw[start : start + (raw.numel() - start) // page * page]
        assert whole.numel() > 0 and int(whole.count_nonzero()) == 0
