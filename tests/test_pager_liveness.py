"""The pager's liveness: resumes through a small host tier make progress or fail promptly."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import asyncfront as af
from asyncfront.memory import Page, Pager, PagerStallError, PagerWait, Tier
from asyncfront.testing import FakeCopyEngine, FakeDevice, FakeStorageDevice, run_virtual

torch = pytest.importorskip("torch")

PAGE = 64 * 1024
READ = 0.010  # seconds to read one page from the file
COPY = 0.002  # seconds to copy one page between host and device


@dataclass
class World:
    rt: af.Runtime
    pager: Pager
    kv: af.ExecutionContext
    host: af.ExecutionContext

    async def page(self, value: int, name: str | None = None) -> Page:
        label = f"p{value}" if name is None else name
        page = await self.pager.allocate(self.kv, (PAGE,), "uint8", name=label)
        await self.write(page, value)
        return page

    async def write(self, page: Page, value: int) -> None:
        async with self.pager.use(page) as use:
            sub = self.kv.queue.submit(
                use.tensor.fill_, value, waits=[use.wait], signals=[use.signal], name="fill"
            )
        await sub

    async def read(self, page: Page) -> int:
        """One use of the page: its first byte (every byte holds the same value)."""
        async with self.pager.use(page) as use:
            sub = self.kv.queue.submit(
                lambda t: (int(t.min()), int(t.max())),
                use.tensor,
                waits=[use.wait],
                signals=[use.signal],
            )
        low, high = await sub
        assert low == high
        return int(low)

    def used(self) -> tuple[int, int]:
        return self.rt.usage(self.kv).used, self.rt.usage(self.host).used


@asynccontextmanager
async def world(
    tmp_path: Path, *, device_pages: int, host_pages: int, **pager: Any
) -> AsyncIterator[World]:
    devices = [
        FakeDevice("gpu0", memory=device_pages * PAGE),
        FakeDevice("host", kind="cpu", memory=host_pages * PAGE),
        FakeCopyEngine("pcie", bandwidth=PAGE / COPY),
        FakeStorageDevice(tmp_path, bandwidth=PAGE / READ),
    ]
    async with af.open_runtime(devices) as rt:
        kv = rt.create_context("kv", device="gpu0", max_memory=device_pages * PAGE)
        host = rt.create_context("host", device="host", max_memory=host_pages * PAGE)
        copy = rt.queue("pcie", name="copy")
        nvme = rt.queue("nvme", name="nvme.pages")
        async with Pager(rt, host=host, copy=copy, storage=nvme, **pager) as p:
            yield World(rt, p, kv, host)


def virtual(tmp_path: Path, body: Callable[[World], Awaitable[None]], **options: Any) -> None:
    async def main() -> None:
        async with world(tmp_path, **options) as w:
            await body(w)

    run_virtual(main)


# -- progress where progress is possible ---------------------------------------------------


def test_a_resume_from_a_full_host_tier_spills_on_to_the_file(tmp_path: Path) -> None:
    """Device and host full, spill=HOST: resuming a host page pushes it on to the file."""

    async def body(w: World) -> None:
        a = await w.page(1)
        b = await w.page(2)  # a spills to the host: both tiers are full now
        assert (a.tier, b.tier) == (Tier.HOST, Tier.DEVICE)
        assert await asyncio.wait_for(w.read(a), 10) == 1
        assert a.tier is Tier.DEVICE
        assert await asyncio.wait_for(w.read(b), 10) == 2

    virtual(tmp_path, body, device_pages=1, host_pages=1, spill=Tier.HOST)


def test_concurrent_resumes_through_a_full_host_tier_all_finish(tmp_path: Path) -> None:
    """Host pages all resuming at once, each waiting for device room: every resume ends."""

    async def body(w: World) -> None:
        pages = [await w.page(v) for v in range(1, 5)]  # 2 on the device, 2 on the host
        assert [p.tier for p in pages] == [Tier.HOST] * 2 + [Tier.DEVICE] * 2
        firsts = await asyncio.wait_for(asyncio.gather(*(w.read(p) for p in pages[:2])), 10)
        assert firsts == [1, 2]
        assert await asyncio.wait_for(asyncio.gather(*(w.read(p) for p in pages)), 10) == [
            1,
            2,
            3,
            4,
        ]

    virtual(tmp_path, body, device_pages=2, host_pages=2, spill=Tier.HOST)


def test_concurrent_resumes_move_host_copies_on_and_keep_every_budget(tmp_path: Path) -> None:
    """Six host pages resume at once through two device pages: bytes intact, budgets kept."""

    async def body(w: World) -> None:
        pages = [await w.page(v) for v in range(1, 9)]  # 2 device, 2 host, 4 file
        peak = [0, 0]

        async def watch() -> None:
            while True:
                kv, host = w.used()
                peak[0], peak[1] = max(peak[0], kv), max(peak[1], host)
                await asyncio.sleep(COPY / 4)

        watcher = asyncio.create_task(watch())
        firsts = await asyncio.wait_for(asyncio.gather(*(w.read(p) for p in pages)), 30)
        watcher.cancel()
        assert firsts == list(range(1, 9))
        assert peak[0] <= 2 * PAGE and peak[1] <= 2 * PAGE
        s = w.pager.statistics()
        assert s.demotions > 0 and s.stalls == 0 and s.waiting == 0
        assert w.pager.waits() == ()
        assert all(not p.pins and not p.in_transit for p in pages)

    virtual(tmp_path, body, device_pages=2, host_pages=2, spill=Tier.HOST)


def test_an_allocation_waits_for_a_running_use_to_drop_its_pin(tmp_path: Path) -> None:
    """The only device page is pinned by a running use: a resume waits for it, then runs."""

    async def body(w: World) -> None:
        a = await w.page(1)
        b = await w.page(2)  # a goes to the file
        order: list[str] = []

        async def hold() -> None:
            async with w.pager.use(b) as use:
                order.append("b pinned")
                await asyncio.sleep(1.0)
                sub = w.kv.queue.submit(lambda: None, waits=[use.wait], signals=[use.signal])
                order.append("b unpinned")
            await sub

        holder = asyncio.create_task(hold())
        await asyncio.sleep(0.1)
        resume = asyncio.create_task(w.read(a))
        await asyncio.sleep(0.5)
        assert w.pager.waits() == (
            PagerWait("p1", "page-in", Tier.DEVICE, "kv", PAGE, pytest.approx(0.1 + COPY * 6)),
        )
        assert w.pager.statistics().waiting == 1
        assert not resume.done()
        assert await asyncio.wait_for(resume, 10) == 1
        await holder
        assert order == ["b pinned", "b unpinned"]
        assert w.pager.waits() == () and w.pager.statistics().stalls == 0

    virtual(tmp_path, body, device_pages=1, host_pages=1)


# -- a prompt, specific error where no progress is possible -------------------------------


def test_nested_uses_beyond_the_device_budget_fail_at_once(tmp_path: Path) -> None:
    """A task pinning two pages asks a third of a two-page device: PagerStallError at once."""

    async def body(w: World) -> None:
        a, b, c = [await w.page(v) for v in (1, 2, 3)]  # a went to the file
        assert a.tier is Tier.FILE
        before = w.used()
        async with w.pager.use(b) as ub, w.pager.use(c) as uc:
            subs = [
                w.kv.queue.submit(lambda: None, waits=[u.wait], signals=[u.signal])
                for u in (ub, uc)
            ]
            started = w.rt.now()
            with pytest.raises(PagerStallError) as caught:
                async with w.pager.use(a):
                    pytest.fail("the third page got device memory it could not have")
            assert w.rt.now() == started  # no wait: it fails as it asks
        await asyncio.gather(*subs)
        err = caught.value
        assert isinstance(err, af.MemoryBudgetError)
        assert (err.tier, err.page, err.context, err.requested) == (Tier.DEVICE, "p1", "kv", PAGE)
        assert err.limit == 2 * PAGE and err.needed == PAGE
        assert set(err.held) == {"p2", "p3"}
        message = str(err)
        for part in ("device tier", "'p1'", "'kv'", "128.0 KiB", "64.0 KiB", "'p2'", "'p3'"):
            assert part in message, (part, message)
        # Nothing stays behind: charges, pins, waits; the page is still in its file.
        assert w.used() == before
        assert a.tier is Tier.FILE and not a.pins and not a.in_transit
        assert w.pager.waits() == () and w.pager.statistics().stalls == 1
        assert await w.read(a) == 1  # with the pins gone, the same use succeeds

    virtual(tmp_path, body, device_pages=2, host_pages=2)


def test_two_uses_that_wait_on_each_others_pins_fail_one_and_finish_the_other(
    tmp_path: Path,
) -> None:
    """Each task pins one of two device pages and asks another: one fails, the other runs."""

    async def body(w: World) -> None:
        pages = [await w.page(v) for v in (1, 2, 3, 4)]  # 1, 2 in the file; 3, 4 on device
        both = asyncio.Barrier(2)

        async def task(pinned: Page, wanted: Page) -> int:
            async with w.pager.use(pinned) as use:
                sub = w.kv.queue.submit(lambda: None, waits=[use.wait], signals=[use.signal])
                await both.wait()
                value = await w.read(wanted)
            await sub
            return value

        outcomes = await asyncio.wait_for(
            asyncio.gather(
                task(pages[2], pages[0]), task(pages[3], pages[1]), return_exceptions=True
            ),
            10,
        )
        errors = [o for o in outcomes if isinstance(o, BaseException)]
        assert len(errors) == 1 and isinstance(errors[0], PagerStallError), outcomes
        assert sorted(o for o in outcomes if isinstance(o, int)) in ([1], [2])
        assert w.pager.waits() == () and all(not p.pins for p in pages)
        assert w.used()[0] == 2 * PAGE and w.used()[1] == 0
        assert [await w.read(p) for p in pages] == [1, 2, 3, 4]

    virtual(tmp_path, body, device_pages=2, host_pages=2)


def test_a_full_page_file_fails_the_page_out_naming_the_file_tier(tmp_path: Path) -> None:
    """One extent of file space, already used: the next page-out's allocation fails at once."""

    async def body(w: World) -> None:
        a = await w.page(1)
        b = await w.page(2)  # a takes the file's only extent
        assert a.tier is Tier.FILE
        before = w.used()
        started = w.rt.now()
        with pytest.raises(PagerStallError) as caught:
            await w.pager.allocate(w.kv, (PAGE,), "uint8", name="p3")
        assert w.rt.now() - started < READ  # the copy may have run; nothing waited
        err = caught.value
        assert (err.tier, err.page, err.requested, err.limit) == (Tier.FILE, "p2", PAGE, PAGE)
        assert err.held == ("p1",) and "file tier" in str(err) and "pages.bin" in str(err)
        # The victim kept its device copy; nothing stays charged or moving.
        assert w.used() == before and b.tier is Tier.DEVICE and not b.in_transit
        assert w.pager.waits() == ()
        assert await w.read(b) == 2
        # Swapping them needs a second extent (a keeps its own until its data is back).
        with pytest.raises(PagerStallError) as again:
            await w.read(a)
        assert again.value.tier is Tier.FILE and again.value.held == ("p1",)
        assert a.tier is Tier.FILE and b.tier is Tier.DEVICE and w.used() == before
        await w.pager.release(b)
        assert await w.read(a) == 1

    virtual(tmp_path, body, device_pages=1, host_pages=1, file_capacity=PAGE)


def test_a_resume_cancelled_while_its_host_copy_moves_on_leaves_every_page_whole(
    tmp_path: Path,
) -> None:
    """Cancelled mid-move: no charge, pin, wait or transit stays; both pages read back."""

    async def body(w: World) -> None:
        a = await w.page(1)
        b = await w.page(2)  # a on the host, b on the device: both tiers full
        before = w.used()
        resume = asyncio.create_task(w.read(a))
        await asyncio.sleep(READ / 2)  # a's host copy is being written to the file now
        assert w.pager.waits() != ()
        resume.cancel()
        with pytest.raises(asyncio.CancelledError):
            await resume
        await asyncio.sleep(1.0)  # what the cancelled moves left in flight drains
        assert w.pager.waits() == ()
        assert not any(p.pins or p.in_transit for p in (a, b))
        assert w.used() == before
        assert await w.read(a) == 1 and await w.read(b) == 2

    virtual(tmp_path, body, device_pages=1, host_pages=1, spill=Tier.HOST)


@pytest.mark.parametrize("spill", [Tier.HOST, Tier.FILE])
@pytest.mark.parametrize("seed", range(6))
def test_random_concurrent_uses_on_small_tiers_all_finish_with_their_bytes(
    tmp_path: Path, spill: Tier, seed: int
) -> None:
    """Seeded bursts of concurrent uses on 1-3 page tiers: every use ends, no byte is lost."""
    import random

    rng = random.Random(seed)
    device_pages, host_pages = rng.randint(1, 3), rng.randint(1, 3)

    async def body(w: World) -> None:
        pages = [await w.page(0, f"s{i}") for i in range(device_pages + host_pages + 2)]
        counts = [0] * len(pages)

        async def bump(i: int) -> None:
            async with w.pager.use(pages[i]) as use:
                sub = w.kv.queue.submit(
                    use.tensor.add_, 1, waits=[use.wait], signals=[use.signal], name="bump"
                )
            await sub
            counts[i] += 1

        for _ in range(4):
            burst = [rng.randrange(len(pages)) for _ in range(rng.randint(2, 2 * len(pages)))]
            await asyncio.wait_for(asyncio.gather(*(bump(i) for i in burst)), 60)
            kv, host = w.used()
            assert kv <= device_pages * PAGE and host <= host_pages * PAGE
        assert [await w.read(p) for p in pages] == counts
        assert w.pager.waits() == () and w.pager.statistics().stalls == 0

    virtual(tmp_path, body, device_pages=device_pages, host_pages=host_pages, spill=spill)
