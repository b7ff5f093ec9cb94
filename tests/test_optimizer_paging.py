"""Adam moments in pager pages: a fine-tune paged every step equals the unpaged one, bit for bit."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

import asyncfront as af
from asyncfront.devices import StorageDevice, StorageWriteError
from asyncfront.memory import Pager, Tier
from asyncfront.models import (
    OptimizerStateNotPinnedError,
    OptimizerStatePagedOutError,
    PagedOptimizerState,
)
from asyncfront.scenarios.finetune_paging import (
    FinetuneReport,
    finetune_devices,
    run_finetune,
    tiny_gpt2,
)

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

STEPS = 3


def _finetune(directory: Path, paged: bool) -> FinetuneReport:
    async def main() -> FinetuneReport:
        async with af.open_runtime(finetune_devices(directory)) as rt:
            return await run_finetune(rt, paged=paged, steps=STEPS, length=64)

    return asyncio.run(main())


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[FinetuneReport, FinetuneReport]:
    """The same fine-tune, with its Adam moments paged every step and without."""
    directory = tmp_path_factory.mktemp("pages")
    return _finetune(directory, True), _finetune(directory, False)


def test_paged_finetune_is_bit_identical_to_unpaged(
    runs: tuple[FinetuneReport, FinetuneReport],
) -> None:
    """Losses, final weights and final moments equal the unpaged fine-tune's exactly."""
    paged, plain = runs
    assert paged.losses == plain.losses
    assert paged.losses[-1] < paged.losses[0]  # it learns: the comparison means something
    assert paged.weights.keys() == plain.weights.keys()
    for name, weight in paged.weights.items():
        assert torch.equal(weight, plain.weights[name]), name
    for name, moments in paged.moments.items():
        for mine, theirs in zip(moments, plain.moments[name], strict=True):
            assert torch.equal(mine, theirs), name
    assert paged.optimizer_bytes == plain.optimizer_bytes > 0


def test_every_step_pages_the_moments_out_and_in(
    runs: tuple[FinetuneReport, FinetuneReport],
) -> None:
    """Each step copies and writes every moment page out, then reads and copies it back."""
    paged, plain = runs
    pages = len(paged.moments)
    for step in paged.steps:
        assert len(step.page_out) == len(step.page_in) == 2 * pages
        assert {r.queue for r in step.page_out} == {"copy", "nvme.pages"}
    assert all(not s.page_out and not s.page_in for s in plain.steps)


def test_the_page_out_overlaps_the_backward_of_the_same_step(
    runs: tuple[FinetuneReport, FinetuneReport],
) -> None:
    """The page-out starts after the forward and its interval overlaps that step's backward."""
    paged, _ = runs
    for step in paged.steps:
        out = step.page_out_interval
        assert out is not None
        assert out[0] >= step.forward.finished_at
        assert out[0] < step.backward.finished_at and step.backward.started_at < out[1]


def test_the_optimizer_step_follows_backward_and_page_in(
    runs: tuple[FinetuneReport, FinetuneReport],
) -> None:
    """The page-in starts after the page-out; the step after both it and the backward."""
    paged, _ = runs
    previous = 0
    for step in paged.steps:
        out, back = step.page_out_interval, step.page_in_interval
        assert out is not None and back is not None
        assert back[0] >= out[1]
        assert step.optimizer.started_at >= max(back[1], step.backward.finished_at)
        storage = step.optimizer.frontier.get(paged.storage_axis)
        assert storage > previous  # this step's page-in read is in its frontier
        previous = storage


@asynccontextmanager
async def pager_world(tmp_path: Path, budget: int = 4 << 20) -> AsyncIterator[Any]:
    devices = finetune_devices(tmp_path)
    async with af.open_runtime(devices) as rt:
        train = rt.create_context("train", device="gpu0", max_memory=budget)
        host = rt.create_context("host", device="host", max_memory=4 << 20)
        storage = rt.device("nvme")
        assert isinstance(storage, StorageDevice)
        pager = Pager(rt, host=host, copy=rt.queue("host", name="copy"), storage=storage.queue())
        async with pager:
            yield rt, pager, train


def _one_backward(model: Any) -> None:
    ids = torch.arange(16).reshape(1, 16)
    model(ids, labels=ids).loss.backward()


async def test_a_step_outside_step_raises_and_changes_nothing(tmp_path: Path) -> None:
    """optimizer.step() outside PagedOptimizerState.step raises; paged out, it says so."""
    model = tiny_gpt2()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    async with pager_world(tmp_path) as (rt, pager, train):
        state = PagedOptimizerState(optimizer, pager, train)
        await state.allocate()
        assert rt.usage(train).used == state.nbytes
        _one_backward(model)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        with pytest.raises(OptimizerStateNotPinnedError, match="outside PagedOptimizerState"):
            optimizer.step()
        await state.page_out(Tier.FILE)
        assert state.tier is Tier.FILE and rt.usage(train).used == 0
        with pytest.raises(OptimizerStatePagedOutError, match=r"'adam/0' is in the file tier"):
            optimizer.step()
        for n, p in model.named_parameters():
            assert torch.equal(p, before[n]), n
        first = next(iter(model.parameters()))
        assert optimizer.state[first]["exp_avg"].is_meta  # no view of moved memory is left
        await state.step(train.queue)  # pages in on demand
        assert state.tier is Tier.DEVICE and state.statistics().steps == 1
        assert not torch.equal(first, before["transformer.wte.weight"])
        await state.aclose()
        assert rt.usage(train).used == 0


async def test_bad_optimizers_and_budgets_are_refused(tmp_path: Path) -> None:
    """Non-Adam, fused and already-stepped optimizers raise; a short budget takes nothing."""
    model = tiny_gpt2()
    async with pager_world(tmp_path, budget=64 << 10) as (rt, pager, train):
        with pytest.raises(TypeError, match=r"needs torch\.optim\.Adam"):
            PagedOptimizerState(torch.optim.SGD(model.parameters(), lr=0.1), pager, train)
        with pytest.raises(ValueError, match="does not support fused=True"):
            fused = torch.optim.Adam(model.parameters(), lr=0.1, fused=True)
            PagedOptimizerState(fused, pager, train)
        stepped = torch.optim.Adam(model.parameters(), lr=0.1)
        _one_backward(model)
        stepped.step()
        with pytest.raises(ValueError, match="already has state"):
            PagedOptimizerState(stepped, pager, train)
        state = PagedOptimizerState(torch.optim.Adam(model.parameters()), pager, train)
        with pytest.raises(af.MemoryBudgetError):
            await state.allocate()
        assert rt.usage(train).used == 0 and not state.pages()
        assert pager.statistics().pages == 0


class FailingWrites(StorageDevice):
    """Fails every write from the ``fail_from``-th on."""

    fail_from = 1 << 30
    writes = 0

    def _write_sync(self, data: object, file: Any, offset: int, checksum: bool = False) -> int:
        self.writes += 1
        if self.writes >= self.fail_from:
            raise StorageWriteError(self.resolve(file), offset, 0, 0, "injected")
        return super()._write_sync(data, file, offset, checksum)


def test_a_failed_page_out_fails_the_step_with_its_cause(tmp_path: Path) -> None:
    """A write failing in step 1's page-out fails page_sem; the fine-tune raises it, no hang."""
    storage = FailingWrites(tmp_path, name="nvme")
    moments = len(list(tiny_gpt2().parameters()))
    storage.fail_from = moments + 1  # step 0's page-out succeeds, step 1's first write fails

    async def main() -> None:
        devices = [*finetune_devices(tmp_path)[:2], storage]
        async with af.open_runtime(devices) as rt:
            with pytest.raises(af.SemaphoreFailedError) as failed:
                await run_finetune(rt, steps=3, length=32)
            assert isinstance(failed.value.__cause__, StorageWriteError)
            train = rt.context("finetune")
            assert rt.usage(train).used == 0  # the moments' pages were released

    asyncio.run(main())
    assert storage.writes == 2 * moments  # step 1 tried each page once; step 2 never ran
