"""The paged KV cache: a transformers cache in pager pages, exact across page-out and page-in."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import asyncfront as af
from asyncfront.devices import CpuDevice, StorageDevice, StorageWriteError
from asyncfront.memory import Pager, Tier
from asyncfront.models import (
    KVCacheGrowthError,
    KVCacheNotPinnedError,
    KVCachePagedOutError,
    PagedKVCache,
)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PROMPT = [5, 17, 42, 99, 3]
STEPS = 32
PAGE_TOKENS = 8
# One page: (K/V, batch 1, 4 heads, 8 tokens, head dim 16) float32.
PAGE_BYTES = 2 * 4 * PAGE_TOKENS * 16 * 4


@pytest.fixture(scope="module")
def model() -> Any:
    """A 2-layer GPT-2 from a config under a fixed seed; its greedy tokens vary."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2,
        n_embd=64,
        n_head=4,
        vocab_size=256,
        n_positions=128,
        initializer_range=0.3,
        bos_token_id=0,
        eos_token_id=None,
        pad_token_id=0,
    )
    return transformers.GPT2LMHeadModel(config).eval()


def _prompt() -> Any:
    return torch.tensor([PROMPT])


def _step(model: Any, cache: Any, ids: Any) -> tuple[Any, Any]:
    """One greedy step: the last position's logits and the chosen token."""
    with torch.no_grad():
        logits = model(ids, cache=cache, use_cache=True).logits[:, -1]
    return logits, logits.argmax(-1, keepdim=True)


@pytest.fixture(scope="module")
def reference(model: Any) -> tuple[list[int], list[Any]]:
    """Greedy decoding of 32 tokens on transformers' DynamicCache, uninterrupted."""
    cache = transformers.DynamicCache()
    ids, tokens, logits = _prompt(), [], []
    for _ in range(STEPS):
        step_logits, ids = _step(model, cache, ids)
        tokens.append(int(ids))
        logits.append(step_logits)
    return tokens, logits


@dataclass
class World:
    rt: af.Runtime
    pager: Pager
    llm: af.ExecutionContext
    storage: af.DeviceQueue


class FailingWrites(StorageDevice):
    """Fails the next ``failures`` writes, then behaves."""

    failures = 0

    def _write_sync(self, data: object, file: Any, offset: int, checksum: bool = False) -> int:
        if self.failures:
            self.failures -= 1
            raise StorageWriteError(self.resolve(file), offset, 0, 0, "injected")
        return super()._write_sync(data, file, offset, checksum)


@asynccontextmanager
async def world(
    tmp_path: Path, *, device_pages: int = 64, storage: StorageDevice | None = None
) -> AsyncIterator[World]:
    storage = storage if storage is not None else StorageDevice(tmp_path, name="nvme")
    devices = [
        CpuDevice("gpu0", memory=device_pages * PAGE_BYTES),
        CpuDevice("host", memory=64 * PAGE_BYTES),
        storage,
    ]
    async with af.open_runtime(devices) as rt:
        llm = rt.create_context("llm", device="gpu0", max_memory=device_pages * PAGE_BYTES)
        host = rt.create_context("host", device="host", max_memory=64 * PAGE_BYTES)
        nvme = storage.queue(name="nvme.kv")
        pager = Pager(rt, host=host, copy=rt.queue("host", name="copy"), storage=nvme)
        async with pager:
            yield World(rt, pager, llm, nvme)


def _cache(w: World, model: Any, name: str = "kv") -> PagedKVCache:
    return PagedKVCache.for_model(model, w.pager, w.llm, page_tokens=PAGE_TOKENS, name=name)


async def test_greedy_decode_across_a_page_out_matches_dynamic_cache(
    tmp_path: Path, model: Any, reference: tuple[list[int], list[Any]]
) -> None:
    """32 greedy tokens with a page-out to the file and back at step 16 equal DynamicCache's."""
    tokens, logits = reference
    async with world(tmp_path) as w:
        cache = _cache(w, model)
        assert isinstance(cache, transformers.Cache)
        resumed = w.rt.semaphore(name="resumed")
        ids, got = _prompt(), []
        for i in range(STEPS):
            signals = []
            if i == STEPS // 2:
                await cache.page_out(Tier.FILE)
                assert cache.tier is Tier.FILE
                assert w.pager.statistics().file_pages == len(cache.pages())
                assert w.rt.usage(w.llm).used == 0  # the device memory went back
                signals = [(resumed, 1)]
            step_logits, ids = await cache.run(
                w.llm.queue, _step, model, cache, ids, signals=signals
            )
            assert torch.equal(step_logits, logits[i]), f"step {i}"
            got.append(int(ids))
        assert got == tokens
        assert len(set(tokens)) > 8  # the model's choices vary: the comparison means something
        # The resumed step waited for the page-in: its frontier carries the storage axis.
        assert resumed.frontier.get(w.storage.axis) > 0
        assert cache.tokens == len(PROMPT) + STEPS - 1
        assert cache.tier is Tier.DEVICE
        await cache.aclose()


async def test_generate_runs_on_the_paged_cache_and_grows_through_the_budget(
    tmp_path: Path, model: Any
) -> None:
    """model.generate on a worker thread takes a page per layer per 8 tokens; output as usual."""
    expected = model.generate(_prompt(), max_new_tokens=STEPS, do_sample=False)
    async with world(tmp_path) as w:
        cache = _cache(w, model)
        out = await cache.run(
            w.llm.queue,
            model.generate,
            _prompt(),
            cache=cache,
            max_new_tokens=STEPS,
            do_sample=False,
        )
        assert torch.equal(out, expected)
        length = len(PROMPT) + STEPS - 1
        assert cache.tokens == length
        pages_per_layer = -(-length // PAGE_TOKENS)
        assert [len(layer.pages) for layer in cache.paged_layers] == [pages_per_layer] * 2
        assert w.rt.usage(w.llm).used == 2 * pages_per_layer * PAGE_BYTES
        await cache.aclose()
        assert w.rt.usage(w.llm).used == 0


async def test_a_use_outside_run_or_pinned_raises(tmp_path: Path, model: Any) -> None:
    """A bare forward raises KVCacheNotPinnedError, or KVCachePagedOutError once paged out."""
    async with world(tmp_path) as w:
        cache = _cache(w, model)
        await cache.run(w.llm.queue, _step, model, cache, _prompt())
        with pytest.raises(KVCacheNotPinnedError, match="'kv' layer 0 used outside"):
            _step(model, cache, torch.tensor([[1]]))
        await cache.page_out()
        with pytest.raises(KVCachePagedOutError, match=r"'kv/L0/p0' is in the file tier"):
            _step(model, cache, torch.tensor([[1]]))
        assert cache.tokens == len(PROMPT)  # nothing was written
        assert cache.tier is Tier.FILE
        await cache.aclose()


async def test_pinned_decode_on_the_loop_needs_room_reserved(
    tmp_path: Path, model: Any, reference: tuple[list[int], list[Any]]
) -> None:
    """Inline on the event loop a full page raises KVCacheGrowthError; reserve() makes room."""
    tokens, _ = reference
    async with world(tmp_path) as w:
        cache = _cache(w, model)
        async with cache.pinned():
            with pytest.raises(KVCacheGrowthError, match=r"reserve\(5\)"):
                _step(model, cache, _prompt())
        assert cache.tokens == 0 and not cache.pages()
        ids, got = _prompt(), []
        for i in range(STEPS):
            if i == 10:
                await cache.page_out(Tier.HOST)
                assert cache.tier is Tier.HOST
            await cache.reserve(ids.shape[-1])
            async with cache.pinned():
                _, ids = _step(model, cache, ids)
            got.append(int(ids))
        assert got == tokens
        await cache.aclose()


async def test_views_are_narrowed_pages_rebound_after_a_page_in(tmp_path: Path, model: Any) -> None:
    """Within one page a layer's keys are a view of the page; after a page-in, of its new memory."""
    async with world(tmp_path) as w:
        cache = _cache(w, model)
        await cache.run(w.llm.queue, _step, model, cache, _prompt())
        layer = cache.paged_layers[0]

        async with cache.pinned():
            page = layer._tensors[0]
            assert layer.keys.shape == (1, 4, len(PROMPT), 16)
            assert layer.keys.data_ptr() == page[0].data_ptr()  # a view, not a copy
            before = layer.keys.clone()
            old = page.data_ptr()
        assert layer.keys is None  # views are valid only while pinned
        await cache.page_out()
        # Take the memory the page left, so the page-in lands somewhere else.
        filler = await w.pager.allocate(w.llm, (PAGE_BYTES,), torch.uint8, name="filler")
        await cache.page_in()
        async with cache.pinned():
            moved = layer._tensors[0]
            assert moved.data_ptr() != old
            assert layer.keys.data_ptr() == moved[0].data_ptr()
            assert torch.equal(layer.keys, before)
        await w.pager.release(filler)
        await cache.aclose()


async def test_an_idle_session_pages_out_when_another_grows(
    tmp_path: Path, model: Any, reference: tuple[list[int], list[Any]]
) -> None:
    """Two sessions share 10 pages: one's growth pages the idle one out; it resumes exactly."""
    tokens, _ = reference
    async with world(tmp_path, device_pages=10) as w:
        idle, busy = _cache(w, model, "idle"), _cache(w, model, "busy")
        ids, got = _prompt(), []
        for _ in range(8):  # 12 positions: 2 pages per layer
            _, ids = await idle.run(w.llm.queue, _step, model, idle, ids)
            got.append(int(ids))
        assert idle.tier is Tier.DEVICE and len(idle.pages()) == 4
        other = _prompt()
        for _ in range(24):  # 28 positions: 4 pages per layer, over the budget with idle's 4
            _, other = await busy.run(w.llm.queue, _step, model, busy, other)
        assert len(busy.pages()) == 8
        assert any(page.tier is not Tier.DEVICE for page in idle.pages())
        for _ in range(8, STEPS):  # the idle user comes back
            _, ids = await idle.run(w.llm.queue, _step, model, idle, ids)
            got.append(int(ids))
        assert got == tokens
        assert w.rt.usage(w.llm).used <= 10 * PAGE_BYTES
        await idle.aclose()
        await busy.aclose()


async def test_bad_shapes_and_sizes_are_refused(tmp_path: Path, model: Any) -> None:
    """Sizes below 1 and keys that do not fit the pages raise ValueError naming the numbers."""
    async with world(tmp_path) as w:
        with pytest.raises(ValueError, match="page_tokens >= 1, got 0"):
            PagedKVCache(w.pager, w.llm, layers=2, heads=4, head_dim=16, page_tokens=0)
        wrong = PagedKVCache(w.pager, w.llm, layers=2, heads=2, head_dim=16, page_tokens=8)
        with pytest.raises(ValueError, match=r"\(1, 4, 5, 16\) do not fit pages .* \(1, 2, 16\)"):
            await wrong.run(w.llm.queue, _step, model, wrong, _prompt())
        with pytest.raises(ValueError, match="tokens >= 0, got -1"):
            await wrong.reserve(-1)
        await wrong.aclose()


async def test_growth_past_the_budget_fails_with_the_budget_error(
    tmp_path: Path, model: Any
) -> None:
    """A pinned cache outgrowing its context's budget raises MemoryBudgetError; close frees all."""
    async with world(tmp_path, device_pages=2) as w:
        cache = _cache(w, model)
        with pytest.raises(af.MemoryBudgetError, match=r"'kv' is in use with 8\.0 KiB in 2 pinned"):
            await cache.run(w.llm.queue, model.generate, _prompt(), cache=cache, max_new_tokens=8)
        assert len(cache.pages()) == 2  # one page per layer, the budget's worth
        await cache.aclose()
        assert w.rt.usage(w.llm).used == 0


async def test_a_failed_page_out_leaves_the_cache_resident_and_exact(
    tmp_path: Path, model: Any, reference: tuple[list[int], list[Any]]
) -> None:
    """A page-out whose write fails raises StorageWriteError; decoding goes on, exactly."""
    tokens, _ = reference
    storage = FailingWrites(tmp_path, name="nvme")
    async with world(tmp_path, storage=storage) as w:
        cache = _cache(w, model)
        ids, got = _prompt(), []
        for i in range(STEPS):
            if i == 8:
                storage.failures = 1
                with pytest.raises(StorageWriteError, match="injected"):
                    await cache.page_out(Tier.FILE)
                assert any(page.tier is Tier.DEVICE for page in cache.pages())
            if i == 9:
                await cache.page_out(Tier.FILE)  # the storage behaves again
                assert cache.tier is Tier.FILE
            _, ids = await cache.run(w.llm.queue, _step, model, cache, ids)
            got.append(int(ids))
        assert got == tokens
        await cache.aclose()
        assert w.rt.usage(w.llm).used == 0
