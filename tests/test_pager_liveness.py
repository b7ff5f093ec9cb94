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
from asyncfront.memory import Page, Pager, Tier
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

    async def page(self, value: int) -> Page:
        page = await self.pager.allocate(self.kv, (PAGE,), "uint8", name=f"p{value}")
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
