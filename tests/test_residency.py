"""Weight residency: loads through storage and copy queues, shared loads, pins, drops by cost."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import re
import struct
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
    WeightsFormatError,
    choose_evictions,
    parse_safetensors_header,
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
        assert rt.usage(ctx).used == ctx.device.memory.footprint(weights.nbytes)
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
        assert rt.usage(ctx).used == ctx.device.memory.footprint(resident.nbytes)


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
        def _read_sync(
            self,
            out: object,
            file: str | os.PathLike[str],
            offset: int,
            checksum: int | None = None,
        ) -> int:
            inside.wait()  # passes only when the other load is reading too
            return super()._read_sync(out, file, offset, checksum)

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
    """A file cut short after registering fails the load mid-way; the usage is as before."""
    path = tmp_path / "cut.safetensors"
    _save(path, 7)
    async with af.open_runtime(_devices(tmp_path)) as rt:
        ctx = rt.create_context("cut", device="gpu0", max_memory=64 * KiB)
        rt.weights("other", {"w": torch.ones(16)})
        await rt.ensure_resident("other", "gpu0", context=ctx)
        before = rt.usage(ctx)
        assert before.used > 0
        rt.weights("cut", path)
        path.write_bytes(path.read_bytes()[:-100])  # the file changes after registering
        with pytest.raises(ShortReadError):
            await rt.ensure_resident("cut", "gpu0")
        assert rt.usage(ctx) == before
        assert [r.weights.name for r in rt.residency.resident()] == ["other"]


async def test_context_defaults_to_the_weights_name(tmp_path: Path) -> None:
    """Without context=, the context named like the weights holds them, else a clear error."""
    async with af.open_runtime(_devices(tmp_path)) as rt:
        rt.weights("orphan", {"w": torch.ones(4)})
        with pytest.raises(LookupError, match="create a context named 'orphan'"):
            await rt.ensure_resident("orphan", "gpu0")
        other = rt.create_context("shared", device="gpu0", max_memory=64 * KiB)
        resident = await rt.ensure_resident("orphan", "gpu0", context=other)
        assert resident.context is other
        assert rt.usage(other).used == other.device.memory.footprint(resident.nbytes)
        with pytest.raises(ValueError, match="size=3 bytes given"):
            rt.weights("sized", {"w": torch.ones(4)}, size=3)


# -- the header is checked whole when weights are registered -------------------------------


def _file(path: Path, header: object, data: bytes = b"", *, length: int | None = None) -> Path:
    """A safetensors-framed file: the 8-byte length, ``header`` (JSON unless bytes), data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


F32_8 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}

BAD_HEADERS: list[tuple[str, object, int | None, str, str | None]] = [
    # id, header, header length (None: the real one), what the message says, the entry
    ("huge-length", {"w": F32_8}, 2**50, "header length 1,125,899,906,842,624 exceeds", None),
    ("not-json", b"{not json", None, "not JSON", None),
    ("a-list", [{"w": F32_8}], None, "must be a JSON object, got a JSON array", None),
    ("no-dtype", {"w": {"shape": [2], "data_offsets": [0, 8]}}, None, "has no dtype", "w"),
    ("unknown-dtype", {"w": {**F32_8, "dtype": "F17"}}, None, "unknown dtype 'F17'", "w"),
    ("entry-not-object", {"w": [0, 8]}, None, "must be an object", "w"),
    ("negative-dim", {"w": {**F32_8, "shape": [-2]}}, None, "non-negative integers", "w"),
    ("float-dim", {"w": {**F32_8, "shape": [2.0]}}, None, "non-negative integers", "w"),
    ("one-offset", {"w": {**F32_8, "data_offsets": [8]}}, None, "two integers", "w"),
    ("reversed", {"w": {**F32_8, "data_offsets": [8, 0]}}, None, "begin <= end", "w"),
    ("past-data", {"w": {**F32_8, "data_offsets": [8, 16]}}, None, "reach past", "w"),
    (
        "shape-vs-offsets",
        {"w": {"dtype": "F32", "shape": [100], "data_offsets": [0, 8]}},
        None,
        "shape [100] of F32 takes 400 bytes but data_offsets [0, 8] hold 8",
        "w",
    ),
    (
        "overlap",
        {"a": F32_8, "b": {"dtype": "U8", "shape": [4], "data_offsets": [4, 8]}},
        None,
        "overlap entry 'a'",
        "b",
    ),
    ("metadata-values", {"__metadata__": {"n": 1}, "w": F32_8}, None, "must be a string", None),
]


@pytest.mark.parametrize(
    ("header", "length", "message", "entry"),
    [case[1:] for case in BAD_HEADERS],
    ids=[case[0] for case in BAD_HEADERS],
)
async def test_a_malformed_header_is_refused_at_registration_and_changes_nothing(
    tmp_path: Path, header: object, length: int | None, message: str, entry: str | None
) -> None:
    """Each malformed header raises WeightsFormatError naming file and entry; nothing is kept."""
    bad = _file(tmp_path / "bad.safetensors", header, b"\0" * 8, length=length)
    async with af.open_runtime(_devices(tmp_path)) as rt:
        ctx = rt.create_context("w", device="gpu0", max_memory=64 * KiB)
        with pytest.raises(af.WeightsFormatError, match=re.escape(message)) as caught:
            rt.weights("w", bad)
        error = caught.value
        assert isinstance(error, ValueError)
        assert error.path == os.fspath(bad) and repr(os.fspath(bad)) in str(error)
        if entry is not None and entry != "__metadata__":
            assert error.entry == entry and f"entry {entry!r}" in str(error)
        assert rt.residency.statistics().registered == 0
        assert rt.usage(ctx).used == 0
        good = tmp_path / "good.safetensors"
        _save(good, 3)
        rt.weights("w", good)  # the name was not taken by the refused call
        assert (await rt.ensure_resident("w", "gpu0")).weights.path == good


def test_a_file_shorter_than_its_length_field_is_refused(tmp_path: Path) -> None:
    """Fewer than 8 bytes, or a header cut short, raise WeightsFormatError with the sizes."""
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"\1\0\0")
    with pytest.raises(WeightsFormatError, match="has 3 bytes, fewer than the 8"):
        read_safetensors_layout(short)
    cut = _file(tmp_path / "cut.safetensors", {"w": F32_8}, length=1000)
    with pytest.raises(WeightsFormatError, match="header length 1,000 exceeds the"):
        read_safetensors_layout(cut)


def test_the_header_parser_accepts_metadata_and_works_on_bytes() -> None:
    """parse_safetensors_header checks bytes against a data size; __metadata__ is allowed."""
    header = json.dumps(
        {
            "__metadata__": {"format": "pt"},
            "b": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [8, 16]},
            "a": F32_8,
            "empty": {"dtype": "F16", "shape": [0, 3], "data_offsets": [8, 8]},
        }
    ).encode()
    layouts = parse_safetensors_header(header, 16, source="shard-1.safetensors")
    assert [(t.name, t.dtype, t.shape, t.offset, t.nbytes) for t in layouts] == [
        ("a", "float32", (2,), 0, 8),
        ("empty", "float16", (0, 3), 8, 0),
        ("b", "bfloat16", (2, 2), 8, 8),
    ]
    with pytest.raises(WeightsFormatError, match=r"'shard-1\.safetensors', entry 'b'.*reach past"):
        parse_safetensors_header(header, 12, source="shard-1.safetensors")
    dup = b'{"a": ' + json.dumps(F32_8).encode() + b', "a": ' + json.dumps(F32_8).encode() + b"}"
    with pytest.raises(WeightsFormatError, match="entry 'a': the entry appears twice"):
        parse_safetensors_header(dup, 8)


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
