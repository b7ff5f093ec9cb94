"""The pager: device → host → file tiers, one LRU, exact round trips, failures lose nothing."""

from __future__ import annotations

import asyncio
import hashlib
import os
import resource
import signal
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import asyncfront as af
from asyncfront.devices import CpuDevice, StorageDevice, StorageReadError, StorageWriteError
from asyncfront.memory import Page, Pager, Tier, choose_page_outs

torch = pytest.importorskip("torch")

KiB = af.KiB
BLOCK = (4, 8, 64)  # float16: 4 KiB per page


def _random(shape: tuple[int, ...], dtype: Any, seed: int) -> Any:
    gen = torch.Generator().manual_seed(seed)
    n = 1
    for d in shape:
        n *= d
    nbytes = n * torch.empty((), dtype=dtype).element_size()
    return (
        torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=gen)
        .view(dtype)
        .reshape(shape)
    )


def _digest(tensor: Any) -> str:
    return hashlib.sha256(tensor.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


@dataclass
class World:
    rt: af.Runtime
    pager: Pager
    host: af.ExecutionContext
    storage: StorageDevice

    def context(
        self, name: str, pages: int, qos: af.QoS = af.QoS.GUARANTEED
    ) -> af.ExecutionContext:
        return self.rt.create_context(name, device="gpu0", max_memory=pages * 4 * KiB, qos=qos)

    async def fill(self, page: Page, value: Any) -> af.Submission:
        """One use that writes ``value`` into the page on its context's queue."""
        async with self.pager.use(page) as use:
            tensor = use.tensor
            return page.context.queue.submit(
                tensor.copy_, value, waits=[use.wait], signals=[use.signal], name="fill"
            )


@asynccontextmanager
async def world(
    tmp_path: Path,
    *,
    device_pages: int = 8,
    host_pages: int = 8,
    storage: StorageDevice | None = None,
    spill: Tier = Tier.FILE,
    direct: bool = False,
    verify: bool = True,
) -> AsyncIterator[World]:
    storage = storage if storage is not None else StorageDevice(tmp_path)
    devices = [
        CpuDevice("gpu0", memory=device_pages * 4 * KiB),
        CpuDevice("host", memory=host_pages * 4 * KiB),
        storage,
    ]
    async with af.open_runtime(devices) as rt:
        host = rt.create_context("host", device="host", max_memory=host_pages * 4 * KiB)
        copy = rt.queue("host", name="copy")
        nvme = storage.queue(name="nvme.pages")
        pager = Pager(
            rt, host=host, copy=copy, storage=nvme, spill=spill, direct=direct, verify=verify
        )
        async with pager:
            yield World(rt, pager, host, storage)


class Flaky(StorageDevice):
    """Fails the next ``fail_writes`` writes and ``fail_reads`` reads, then behaves."""

    fail_writes = 0
    fail_reads = 0

    def _write_sync(
        self, data: object, file: str | os.PathLike[str], offset: int, checksum: bool = False
    ) -> int:
        if self.fail_writes:
            self.fail_writes -= 1
            raise StorageWriteError(self.resolve(file), offset, 4096, 0, "injected")
        return super()._write_sync(data, file, offset, checksum)

    def _read_sync(
        self, out: object, file: str | os.PathLike[str], offset: int, checksum: int | None = None
    ) -> int:
        if self.fail_reads:
            self.fail_reads -= 1
            raise StorageReadError(self.resolve(file), offset, 4096, 0, "injected")
        return super()._read_sync(out, file, offset, checksum)


# -- the decision ------------------------------------------------------------------------


def test_page_outs_follow_one_lru_and_skip_pinned_and_moving_pages() -> None:
    """The least recently used movable pages go first, across contexts."""
    sem = af.TimelineSemaphore()

    def page(name: str, ctx: str, **state: Any) -> Page:
        p = Page(name, None, SimpleNamespace(name=ctx), (1,), "uint8", 100, sem)  # type: ignore[arg-type]
        for key, value in state.items():
            setattr(p, key, value)
        return p

    lru = [
        page("pinned", "a", pins=1),
        page("moving", "b", _transit=object()),
        page("on-host", "a", tier=Tier.HOST),
        page("oldest", "b"),
        page("older", "a"),
        page("newest", "b"),
    ]
    assert choose_page_outs(lru, 150).victims == (lru[3], lru[4])
    assert choose_page_outs(lru, 100, tier=Tier.HOST).victims == (lru[2],)
    assert choose_page_outs(lru, 100, {"a": float("inf")}).victims == (lru[4],)
    assert choose_page_outs(lru, 400).victims == ()


# -- moving pages ------------------------------------------------------------------------


async def test_pages_round_trip_through_the_file_bit_for_bit(tmp_path: Path) -> None:
    """Random pages of several dtypes come back from the file with identical bytes."""
    async with world(tmp_path) as w:
        ctx = w.context("llama", pages=8)
        dtypes = [torch.float16, torch.bfloat16, torch.float32, torch.int8]
        pages, digests = [], []
        for i, dtype in enumerate(dtypes):
            page = await w.pager.allocate(ctx, (16, 16), dtype, owner=f"session-{i}")
            data = _random((16, 16), dtype, seed=i)
            await w.fill(page, data)
            pages.append(page)
            digests.append(_digest(data))
        await asyncio.gather(*(w.pager.page_out(p) for p in pages))
        assert [p.tier for p in pages] == [Tier.FILE] * 4
        assert w.rt.usage(ctx).used == 0 and w.rt.usage(w.host).used == 0
        for page, digest in zip(pages, digests, strict=True):
            async with w.pager.use(page) as use:
                sub = ctx.queue.submit(_digest, use.tensor, waits=[use.wait], signals=[use.signal])
            assert await sub == digest
        stats = w.pager.statistics()
        assert (stats.page_outs, stats.page_ins, stats.device_pages) == (4, 4, 4)
        assert stats.bytes_out == stats.bytes_in == sum(p.nbytes for p in pages)


async def test_resumed_work_waits_on_the_page_semaphore_and_carries_the_storage_axis(
    tmp_path: Path,
) -> None:
    """The page-in read waits for the value the page-out signalled; the next use inherits it."""
    async with world(tmp_path) as w:
        ctx = w.context("llama", pages=2)
        page = await w.pager.allocate(ctx, BLOCK, torch.float16, owner="session-3")
        decode = await w.fill(page, _random(BLOCK, torch.float16, 3))
        await decode
        await w.pager.page_out(page)
        paged_value = page.semaphore.value
        assert page.frontier.get(w.pager.storage_axis) == 1  # the write
        assert page.frontier.get(ctx.queue.axis) == decode.epoch  # after the last decode
        async with w.pager.use(page) as use:
            assert use.wait == (page.semaphore, paged_value + 2)  # read, then copy
            resumed = ctx.queue.submit(lambda: None, waits=[use.wait], signals=[use.signal])
        await resumed
        assert resumed.frontier is not None
        assert resumed.frontier.get(w.pager.storage_axis) == 2  # the write, then the read
        assert resumed.frontier.get(w.pager.copy.axis) == 2  # copy out, copy in


async def test_direct_paging_skips_the_host_tier(tmp_path: Path) -> None:
    """With direct=True, storage reads and writes device memory: no staging, no copy axis."""
    async with world(tmp_path, host_pages=1, direct=True) as w:
        ctx = w.context("llama", pages=4)
        pages = [await w.pager.allocate(ctx, BLOCK, torch.float16) for _ in range(3)]
        data = [_random(BLOCK, torch.float16, 40 + i) for i in range(3)]
        for page, values in zip(pages, data, strict=True):
            await w.fill(page, values)
        await asyncio.gather(*(w.pager.page_out(p) for p in pages))
        assert w.rt.usage(w.host).used == 0
        for page, values in zip(pages, data, strict=True):
            async with w.pager.use(page) as use:
                assert use.wait == (page.semaphore, 3)  # fill, write, read
                sub = ctx.queue.submit(_digest, use.tensor, waits=[use.wait], signals=[use.signal])
            assert await sub == _digest(values)
            assert sub.frontier is not None
            assert sub.frontier.get(w.pager.storage_axis) > 0
            assert sub.frontier.get(w.pager.copy.axis) == 0
        assert w.host.statistics().allocations == 0


async def test_pages_rest_on_the_host_tier_within_the_host_budget(tmp_path: Path) -> None:
    """page_out(HOST) keeps a host copy charged to the host context, then pages back in."""
    async with world(tmp_path) as w:
        ctx = w.context("llama", pages=2)
        page = await w.pager.allocate(ctx, BLOCK, torch.float16)
        data = _random(BLOCK, torch.float16, 4)
        await w.fill(page, data)
        await w.pager.page_out(page, Tier.HOST)
        assert page.tier is Tier.HOST
        assert w.rt.usage(w.host).used == page.nbytes and w.rt.usage(ctx).used == 0
        async with w.pager.use(page) as use:
            sub = ctx.queue.submit(_digest, use.tensor, waits=[use.wait], signals=[use.signal])
        assert await sub == _digest(data)
        assert w.rt.usage(w.host).used == 0 and page.tier is Tier.DEVICE


async def test_host_pressure_flushes_host_pages_to_the_file(tmp_path: Path) -> None:
    """With spill=HOST, a full host tier sends its least recent pages on to the file."""
    async with world(tmp_path, host_pages=2, spill=Tier.HOST) as w:
        ctx = w.context("llama", pages=2)
        pages = [await w.pager.allocate(ctx, BLOCK, torch.float16) for _ in range(2)]
        for i, page in enumerate(pages):
            await w.fill(page, _random(BLOCK, torch.float16, 10 + i))
        extra = await w.pager.allocate(ctx, BLOCK, torch.float16)  # pages[0] -> host
        assert pages[0].tier is Tier.HOST
        await w.fill(extra, _random(BLOCK, torch.float16, 20))
        await w.pager.allocate(ctx, BLOCK, torch.float16)  # pages[1] -> host (host now full)
        await w.pager.allocate(ctx, BLOCK, torch.float16)  # host full: pages[0] -> file
        assert [p.tier for p in pages] == [Tier.FILE, Tier.HOST]
        assert w.rt.usage(w.host).used == 2 * pages[0].nbytes


async def test_device_copy_is_freed_only_after_the_write_is_signalled(tmp_path: Path) -> None:
    """While the page file is written, the device buffer is still allocated and charged."""
    seen: list[tuple[bool, int]] = []
    target: list[Page] = []

    class Watching(StorageDevice):
        def _write_sync(
            self, data: object, file: str | os.PathLike[str], offset: int, checksum: bool = False
        ) -> int:
            page = target[0]
            seen.append((page._device is not None and not page._device.freed, page.semaphore.value))
            return super()._write_sync(data, file, offset, checksum)

    async with world(tmp_path, storage=Watching(tmp_path)) as w:
        ctx = w.context("llama", pages=2)
        page = await w.pager.allocate(ctx, BLOCK, torch.float16)
        target.append(page)
        await (await w.fill(page, _random(BLOCK, torch.float16, 5)))
        value = page.semaphore.value
        await w.pager.page_out(page)
        assert seen == [(True, value)]  # during the write: resident, nothing signalled yet
        assert page._device is None and w.rt.usage(ctx).used == 0
        assert page.semaphore.value == value + 1


async def test_page_out_waits_for_the_last_use(tmp_path: Path) -> None:
    """A page-out started while a use is queued copies the data that use wrote."""
    async with world(tmp_path) as w:
        ctx = w.context("llama", pages=2)
        page = await w.pager.allocate(ctx, BLOCK, torch.float16)
        gate = af.TimelineSemaphore(name="gate")
        final = _random(BLOCK, torch.float16, 6)
        async with w.pager.use(page) as use:
            tensor = use.tensor
            late = ctx.queue.submit(
                tensor.copy_, final, waits=[(gate, 1), use.wait], signals=[use.signal]
            )
        paging = asyncio.ensure_future(w.pager.page_out(page))
        await asyncio.sleep(0.05)
        assert not paging.done() and page.in_transit
        gate.signal(1)
        await paging
        await late
        assert page.frontier.get(ctx.queue.axis) == late.epoch
        async with w.pager.use(page) as use:
            sub = ctx.queue.submit(_digest, use.tensor, waits=[use.wait], signals=[use.signal])
        assert await sub == _digest(final)


@pytest.mark.parametrize("direct", [False, True], ids=["staged", "direct"])
async def test_a_failed_page_out_write_loses_nothing(tmp_path: Path, direct: bool) -> None:
    """A storage write failing mid page-out leaves the page resident, intact and usable."""
    flaky = Flaky(tmp_path)
    async with world(tmp_path, storage=flaky, direct=direct) as w:
        ctx = w.context("llama", pages=2)
        page = await w.pager.allocate(ctx, BLOCK, torch.float16)
        data = _random(BLOCK, torch.float16, 7)
        await w.fill(page, data)
        used = w.rt.usage(ctx).used
        flaky.fail_writes = 1
        with pytest.raises(StorageWriteError, match="injected"):
            await w.pager.page_out(page)
        assert page.tier is Tier.DEVICE and not page.in_transit
        assert w.rt.usage(ctx).used == used  # the device copy is still held
        assert w.rt.usage(w.host).used == 0  # the staging buffer was given back
        assert w.pager._file_space.live_blocks() == ()  # and the file extent
        assert page.semaphore.failure is None
        assert w.pager.statistics().failures == 1
        async with w.pager.use(page) as use:  # still usable
            sub = ctx.queue.submit(_digest, use.tensor, waits=[use.wait], signals=[use.signal])
        assert await sub == _digest(data)
        await w.pager.page_out(page)  # and a later page-out works
        async with w.pager.use(page) as use:
            sub = ctx.queue.submit(_digest, use.tensor, waits=[use.wait], signals=[use.signal])
        assert await sub == _digest(data)


@pytest.mark.parametrize("direct", [False, True], ids=["staged", "direct"])
async def test_a_failed_page_in_leaves_the_page_in_its_file(tmp_path: Path, direct: bool) -> None:
    """A read failing mid page-in raises, frees what it took, and a retry succeeds."""
    flaky = Flaky(tmp_path)
    async with world(tmp_path, storage=flaky, direct=direct) as w:
        ctx = w.context("llama", pages=2)
        page = await w.pager.allocate(ctx, BLOCK, torch.float16)
        data = _random(BLOCK, torch.float16, 8)
        await w.fill(page, data)
        await w.pager.page_out(page)
        flaky.fail_reads = 1
        with pytest.raises(StorageReadError, match="injected"):
            async with w.pager.use(page):
                pass
        assert page.tier is Tier.FILE and page.file_offset is not None
        assert w.rt.usage(ctx).used == 0 and w.rt.usage(w.host).used == 0
        assert page.semaphore.failure is None  # a fresh timeline at the same value
        async with w.pager.use(page) as use:
            sub = ctx.queue.submit(_digest, use.tensor, waits=[use.wait], signals=[use.signal])
        assert await sub == _digest(data)
        assert sub.frontier is not None and sub.frontier.get(w.pager.storage_axis) >= 2


# -- policy ------------------------------------------------------------------------------


async def test_pressure_pages_out_the_least_recent_page_across_models(tmp_path: Path) -> None:
    """Another context short of device memory takes the globally least recent page's memory."""
    async with world(tmp_path, device_pages=4) as w:
        best = af.QoS.BEST_EFFORT
        llama, mistral = w.context("llama", 4, best), w.context("mistral", 4, best)
        a1 = await w.pager.allocate(llama, BLOCK, torch.float16, owner="llama/s1")
        m1 = await w.pager.allocate(mistral, BLOCK, torch.float16, owner="mistral/s1")
        a2 = await w.pager.allocate(llama, BLOCK, torch.float16, owner="llama/s2")
        m2 = await w.pager.allocate(mistral, BLOCK, torch.float16, owner="mistral/s2")
        for page in (a1, m2, a2, m1):  # a1 used first: the least recent across both models
            await (await w.fill(page, _random(BLOCK, torch.float16, 9)))
        assert w.pager.lru()[0] is a1
        image = w.context("image", 1, best)
        async with w.rt.session(image) as s:
            await s.allocate(4 * KiB)
        assert [p.tier for p in (a1, m1, a2, m2)] == [
            Tier.FILE,
            Tier.DEVICE,
            Tier.DEVICE,
            Tier.DEVICE,
        ]


async def test_a_context_over_its_budget_pages_out_its_own_least_recent_page(
    tmp_path: Path,
) -> None:
    """Allocating past a context's own max_memory pages out that context's LRU page first."""
    async with world(tmp_path) as w:
        ctx = w.context("llama", pages=2)
        other = w.context("bert", pages=2)
        old = await w.pager.allocate(other, BLOCK, torch.float16)  # globally oldest, not ours
        first = await w.pager.allocate(ctx, BLOCK, torch.float16)
        second = await w.pager.allocate(ctx, BLOCK, torch.float16)
        await (await w.fill(second, _random(BLOCK, torch.float16, 1)))
        third = await w.pager.allocate(ctx, BLOCK, torch.float16)
        assert (old.tier, first.tier, second.tier, third.tier) == (
            Tier.DEVICE,
            Tier.FILE,
            Tier.DEVICE,
            Tier.DEVICE,
        )


async def test_a_pinned_page_is_never_paged_out(tmp_path: Path) -> None:
    """Inside use(), page_out refuses and pressure picks another page."""
    async with world(tmp_path) as w:
        ctx = w.context("llama", pages=2)
        held = await w.pager.allocate(ctx, BLOCK, torch.float16)
        other = await w.pager.allocate(ctx, BLOCK, torch.float16)
        await (await w.fill(other, _random(BLOCK, torch.float16, 2)))
        async with w.pager.use(held) as use:
            with pytest.raises(RuntimeError, match="pinned"):
                await w.pager.page_out(held)
            await w.pager.allocate(ctx, BLOCK, torch.float16)  # over budget: someone goes
            assert (held.tier, other.tier) == (Tier.DEVICE, Tier.FILE)
            ctx.queue.submit(None, waits=[use.wait], signals=[use.signal])


async def test_release_frees_every_tier(tmp_path: Path) -> None:
    """Releasing pages in each tier returns device, host and file space."""
    async with world(tmp_path) as w:
        ctx = w.context("llama", pages=4)
        pages = [await w.pager.allocate(ctx, BLOCK, torch.float16) for _ in range(3)]
        await w.pager.page_out(pages[1], Tier.HOST)
        await w.pager.page_out(pages[2], Tier.FILE)
        for page in pages:
            await w.pager.release(page)
        assert w.rt.usage(ctx).used == 0 and w.rt.usage(w.host).used == 0
        assert w.pager._file_space.live_blocks() == ()
        assert w.pager.lru() == () and pages[0].released
        with pytest.raises(RuntimeError, match="released"):
            async with w.pager.use(pages[0]):
                pass


async def test_concurrent_page_outs_wait_for_staging_memory(tmp_path: Path) -> None:
    """More concurrent page-outs than the host budget can stage all finish, exact."""
    async with world(tmp_path, host_pages=1) as w:
        ctx = w.context("llama", pages=6)
        pages = [await w.pager.allocate(ctx, BLOCK, torch.float16) for _ in range(6)]
        data = [_random(BLOCK, torch.float16, 30 + i) for i in range(6)]
        for page, values in zip(pages, data, strict=True):
            await w.fill(page, values)
        await asyncio.gather(*(w.pager.page_out(p) for p in pages))
        assert [p.tier for p in pages] == [Tier.FILE] * 6
        await asyncio.gather(*(w.pager.page_in(p) for p in pages))
        for page, values in zip(pages, data, strict=True):
            async with w.pager.use(page) as use:
                sub = ctx.queue.submit(_digest, use.tensor, waits=[use.wait], signals=[use.signal])
            assert await sub == _digest(values)
        assert w.rt.usage(w.host).used == 0


async def test_an_idle_session_resumes_bit_for_bit_unwritten_tokens_included(
    tmp_path: Path,
) -> None:
    """The KV walk-through of the docs: session 3 goes to the file while 1 and 2 write.

    A new page is uninitialised: the tokens a session has not written yet hold whatever
    bits the memory held, NaN patterns among them. Those bits come back too, so the
    check is on bytes; float values never match where there is a NaN (NaN != NaN).
    """
    async with world(tmp_path, device_pages=3, host_pages=1) as w:
        ctx = w.context("llama", pages=3)
        sessions = [await w.pager.allocate(ctx, BLOCK, torch.float16, owner=n) for n in (1, 2, 3)]
        # What the memory held before: random bits, NaNs included. The mirrors follow
        # every write, so they are what each page must hold.
        mirrors = [_random(BLOCK, torch.float16, 60 + i) for i in range(3)]
        for page, mirror in zip(sessions, mirrors, strict=True):
            await w.fill(page, mirror.clone())

        async def decode(page: Page, token: int) -> None:
            async with w.pager.use(page) as use:
                step = ctx.queue.submit(
                    use.tensor[:, token].fill_, float(token), waits=[use.wait], signals=[use.signal]
                )
            await step
            mirrors[sessions.index(page)][:, token] = float(token)

        for token in range(4):
            for page in sessions:
                await decode(page, token)
        idle = sessions[2]
        async with w.pager.use(idle) as use:
            snapshot = ctx.queue.submit(use.tensor.clone, waits=[use.wait], signals=[use.signal])
        before = await snapshot
        assert before.isnan().any()
        for token in range(4, 8):  # sessions 1 and 2 keep writing
            for page in sessions[:2]:
                await decode(page, token)

        grown = await w.pager.allocate(ctx, BLOCK, torch.float16, owner=1)  # budget full
        assert (idle.tier, grown.tier) == (Tier.FILE, Tier.DEVICE)
        await w.fill(grown, torch.zeros(BLOCK, dtype=torch.float16))

        async with w.pager.use(idle) as use:  # paged back in: session 1's block goes out
            resumed = ctx.queue.submit(use.tensor.clone, waits=[use.wait], signals=[use.signal])
        after = await resumed
        assert sessions[0].tier is Tier.FILE
        assert _digest(after) == _digest(before) == _digest(mirrors[2])
        assert not torch.equal(after, before)  # same bits, but NaN != NaN

        for page, mirror in zip(sessions, mirrors, strict=True):  # every session is intact
            async with w.pager.use(page) as use:
                sub = ctx.queue.submit(_digest, use.tensor, waits=[use.wait], signals=[use.signal])
            assert await sub == _digest(mirror)
        async with w.pager.use(grown) as use:
            sub = ctx.queue.submit(_digest, use.tensor, waits=[use.wait], signals=[use.signal])
        assert await sub == _digest(torch.zeros(BLOCK, dtype=torch.float16))


# -- a full disk -------------------------------------------------------------------------

MiB = af.MiB
BIG = (2 * MiB,)  # uint8 pages of 2 MiB: a page file past 1 MiB is what a full disk refuses


@contextmanager
def disk_full(limit: int = MiB) -> Iterator[Callable[[], None]]:
    """Files of this process cannot grow past ``limit`` bytes (RLIMIT_FSIZE) until recovered.

    Yields ``recover()``, which lifts the limit; leaving the block always does. The limit
    leaves room for pytest's small capture files, and SIGXFSZ is ignored so that a write
    past it fails with EFBIG, as on a full disk it fails with ENOSPC.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    def recover() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))

    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield recover
    finally:
        recover()
        signal.signal(signal.SIGXFSZ, handler)


@asynccontextmanager
async def big_pages(tmp_path: Path, count: int = 3) -> AsyncIterator[tuple[World, list[Any]]]:
    """A context whose budget holds ``count`` 2 MiB pages, all allocated and filled."""
    devices = [
        CpuDevice("gpu0", memory=(count + 1) * 2 * MiB),
        CpuDevice("host", memory=4 * MiB),
        StorageDevice(tmp_path),
    ]
    async with af.open_runtime(devices) as rt:
        host = rt.create_context("host", device="host", max_memory=4 * MiB)
        pager = Pager(rt, host=host, copy=rt.queue("host", name="copy"), storage=rt.queue("nvme"))
        async with pager:
            w = World(rt, pager, host, pager._storage_device)
            ctx = rt.create_context("llama", device="gpu0", max_memory=count * 2 * MiB)
            pages, data = [], []
            for i in range(count):
                page = await pager.allocate(ctx, BIG, torch.uint8, owner=i)
                data.append(_random(BIG, torch.uint8, 60 + i))
                await (await w.fill(page, data[-1]))
                pages.append(page)
            yield w, [(page, _digest(values)) for page, values in zip(pages, data, strict=True)]


async def _digest_of(w: World, page: Page) -> str:
    async with w.pager.use(page) as use:
        sub = page.context.queue.submit(_digest, use.tensor, waits=[use.wait], signals=[use.signal])
    return str(await sub)


async def test_an_allocation_needing_a_page_out_fails_with_the_disk_full_error(
    tmp_path: Path,
) -> None:
    """Over budget with the disk full, allocate raises the write's error; pages stay intact."""
    async with big_pages(tmp_path) as (w, pages):
        ctx = pages[0][0].context
        used = w.rt.usage(ctx)
        with disk_full(), pytest.raises(StorageWriteError, match="EFBIG") as caught:
            await asyncio.wait_for(w.pager.allocate(ctx, BIG, torch.uint8), 30)
        assert caught.value.path == os.fspath(tmp_path / "pages.bin")
        assert w.rt.usage(ctx) == used and w.rt.usage(w.host).used == 0
        assert w.pager._file_space.live_blocks() == ()
        stats = w.pager.statistics()
        assert (stats.pages, stats.device_pages, stats.page_outs) == (3, 3, 0)
        assert stats.failures >= 1
        for page, digest in pages:  # nothing lost: resident, intact, usable
            assert page.tier is Tier.DEVICE and page.semaphore.failure is None
            assert await _digest_of(w, page) == digest
        # Once the disk has room again, the same allocation pages out the LRU page.
        grown = await w.pager.allocate(ctx, BIG, torch.uint8)
        assert grown.tier is Tier.DEVICE
        assert pages[0][0].tier is Tier.FILE
        assert await _digest_of(w, pages[0][0]) == pages[0][1]


async def test_an_allocation_with_a_timeout_succeeds_once_the_disk_recovers(
    tmp_path: Path,
) -> None:
    """With timeout=, failed page-outs are retried; the allocation completes after recovery."""
    async with big_pages(tmp_path) as (w, pages):
        ctx = pages[0][0].context
        with disk_full() as recover:
            task = asyncio.ensure_future(w.pager.allocate(ctx, BIG, torch.uint8, timeout=60))
            while w.pager.statistics().failures < 2:  # noqa: ASYNC110 (no event marks a retry)
                await asyncio.sleep(0.01)
            assert not task.done()
            recover()
            grown = await asyncio.wait_for(task, 30)
        assert grown.tier is Tier.DEVICE and grown in w.pager.lru()
        victim, digest = pages[0]
        assert victim.tier is Tier.FILE
        assert await _digest_of(w, victim) == digest


async def test_an_allocation_with_a_timeout_fails_with_the_storage_error_when_it_expires(
    tmp_path: Path,
) -> None:
    """A disk that stays full fails a timed allocation with the write's error; nothing changes."""
    async with big_pages(tmp_path) as (w, pages):
        ctx = pages[0][0].context
        used = w.rt.usage(ctx)
        with disk_full(), pytest.raises(StorageWriteError, match="EFBIG"):
            # 1 s: retries start 10 ms apart and double, so even a loaded machine fits several
            await asyncio.wait_for(w.pager.allocate(ctx, BIG, torch.uint8, timeout=1.0), 30)
        assert w.pager.statistics().failures >= 2  # retried within the timeout
        assert w.rt.usage(ctx) == used and len(w.pager.lru()) == 3
        assert all(page.tier is Tier.DEVICE for page, _ in pages)


# -- bad arguments -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "dtype", "timeout", "error", "message"),
    [
        (BLOCK, "float17", None, ValueError, "unknown dtype 'float17'; accepted: .*float16"),
        (BLOCK, 3, None, TypeError, "dtype must be a torch.dtype or its name"),
        ((4, -1), torch.float16, None, ValueError, r"dimensions must be >= 0, got \(4, -1\)"),
        ((4, 2.5), torch.float16, None, TypeError, "shape must hold ints, got float 2.5"),
        ("abc", torch.float16, None, TypeError, "shape must be a sequence of ints"),
        ((0, 8), torch.float16, None, ValueError, "at least one byte"),
        (BLOCK, torch.float16, -1, ValueError, "timeout must be None or seconds >= 0, got -1"),
        (BLOCK, torch.float16, float("nan"), ValueError, "timeout must be None or seconds"),
    ],
    ids=[
        "dtype-name",
        "dtype-type",
        "negative-dim",
        "float-dim",
        "str-shape",
        "empty",
        "timeout",
        "nan-timeout",
    ],
)
async def test_bad_allocate_arguments_raise_a_specific_error_and_change_nothing(
    tmp_path: Path, shape: Any, dtype: Any, timeout: Any, error: type[Exception], message: str
) -> None:
    """A bad shape, dtype or timeout raises TypeError/ValueError saying what is accepted."""
    async with world(tmp_path) as w:
        ctx = w.context("llama", pages=2)
        with pytest.raises(error, match=message):
            await w.pager.allocate(ctx, shape, dtype, timeout=timeout)
        assert w.pager.lru() == () and w.rt.usage(ctx).used == 0
        page = await w.pager.allocate(ctx, BLOCK, "float16")  # names work
        assert page.dtype == "float16" and page.nbytes == 4 * KiB


# -- a corrupted page file ---------------------------------------------------------------


def _write_at(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _flip(path: Path, offset: int, nbytes: int) -> None:
    """One bit of one byte inside the page changes."""
    with open(path, "r+b") as f:
        f.seek(offset + nbytes // 3)
        byte = f.read(1)[0]
        f.seek(offset + nbytes // 3)
        f.write(bytes([byte ^ 0x10]))


def _zero(path: Path, offset: int, nbytes: int) -> None:
    """A run of the page's bytes becomes zeros (a lost write, a bad sector read as 0)."""
    with open(path, "r+b") as f:
        f.seek(offset + 512)
        f.write(b"\0" * 1024)


def _truncate_and_extend(path: Path, offset: int, nbytes: int) -> None:
    """The file is cut inside the page, then grown back to its size: its tail reads as 0."""
    size = path.stat().st_size
    os.truncate(path, offset + nbytes // 2)
    os.truncate(path, size)


def _truncate(path: Path, offset: int, nbytes: int) -> None:
    """The file ends inside the page."""
    os.truncate(path, offset + nbytes // 2)


@pytest.mark.parametrize("direct", [False, True], ids=["staged", "direct"])
@pytest.mark.parametrize(
    "damage",
    [_flip, _zero, _truncate_and_extend, _truncate],
    ids=["flipped", "zeroed", "truncated-then-extended", "truncated"],
)
async def test_a_corrupted_page_raises_and_stays_in_its_file(
    tmp_path: Path, damage: Callable[[Path, int, int], None], direct: bool
) -> None:
    """Changed bytes in the page file raise PageCorruptedError naming page, file and offset."""
    async with world(tmp_path, direct=direct) as w:
        ctx = w.context("llama", pages=2)
        page = await w.pager.allocate(ctx, BLOCK, torch.float16, name="kv-3")
        data = _random(BLOCK, torch.float16, 11)
        await w.fill(page, data)
        neighbour = await w.pager.allocate(ctx, BLOCK, torch.float16, name="kv-4")
        await w.fill(neighbour, _random(BLOCK, torch.float16, 12))
        await w.pager.page_out(neighbour)  # the page lies after another in the file
        await w.pager.page_out(page)
        path, offset = tmp_path / "pages.bin", page.file_offset
        assert offset is not None and offset > 0
        good = path.read_bytes()[offset : offset + page.nbytes]
        value, stats = page.semaphore.value, w.pager.statistics()
        damage(path, offset, page.nbytes)
        with pytest.raises(af.PageCorruptedError) as caught:
            async with w.pager.use(page):
                pass
        error = caught.value
        assert isinstance(error, StorageReadError)
        assert (error.page, error.path, error.offset) == ("kv-3", os.fspath(path), offset)
        assert f"page 'kv-3' is corrupted in its file: 4,096 bytes at offset {offset:,}" in str(
            error
        )
        assert repr(os.fspath(path)) in str(error)
        if damage is _truncate:
            assert error.actual_checksum is None and "the file ends" in str(error)
        else:
            assert error.actual_checksum is not None
            assert error.actual_checksum != error.expected_checksum
        # It stays where it was: in the file, same extent, same timeline value, nothing held.
        assert page.tier is Tier.FILE and page.file_offset == offset and not page.in_transit
        assert page.semaphore.value == value and page.semaphore.failure is None
        assert w.rt.usage(ctx).used == 0 and w.rt.usage(w.host).used == 0
        after = w.pager.statistics()
        assert (after.file_pages, after.page_ins, after.failures) == (2, 0, stats.failures + 1)
        # Repaired, the same page pages in bit for bit: the record was kept.
        _write_at(path, offset, good)
        assert await _digest_of(w, page) == _digest(data)


async def test_host_pages_flushed_to_the_file_are_verified_too(tmp_path: Path) -> None:
    """A page that went device → host → file is checked on page-in like any other."""
    async with world(tmp_path) as w:
        ctx = w.context("llama", pages=2)
        page = await w.pager.allocate(ctx, BLOCK, torch.float16, name="kv")
        data = _random(BLOCK, torch.float16, 13)
        await w.fill(page, data)
        await w.pager.page_out(page, Tier.HOST)
        await w.pager.page_out(page, Tier.FILE)
        offset = page.file_offset
        assert offset is not None
        _flip(tmp_path / "pages.bin", offset, page.nbytes)
        with pytest.raises(af.PageCorruptedError, match="page 'kv' is corrupted"):
            await w.pager.page_in(page)
        assert page.tier is Tier.FILE
        await w.pager.release(page)  # a corrupted page can still be released
        assert w.pager.lru() == () and w.pager._file_space.live_blocks() == ()


async def test_without_verify_the_file_tier_is_not_checked(tmp_path: Path) -> None:
    """Pager(verify=False) keeps no checksum: a changed byte comes back as data."""
    async with world(tmp_path, verify=False) as w:
        ctx = w.context("llama", pages=2)
        page = await w.pager.allocate(ctx, BLOCK, torch.uint8)
        await w.fill(page, torch.zeros(BLOCK, dtype=torch.uint8))
        await w.pager.page_out(page)
        assert page.file_offset is not None
        _write_at(tmp_path / "pages.bin", page.file_offset + 7, b"\x01")
        async with w.pager.use(page) as use:
            total = ctx.queue.submit(
                lambda t: int(t.sum()), use.tensor, waits=[use.wait], signals=[use.signal]
            )
        assert await total == 1
