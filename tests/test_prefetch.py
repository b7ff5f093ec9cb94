"""Foresight prefetch: pages expected by a hint or an arrival model come in ahead of use."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import asyncfront as af
from asyncfront.devices import StorageReadError
from asyncfront.memory import (
    Page,
    PageCorruptedError,
    Pager,
    PageReleasedError,
    ReuseIntervals,
    Tier,
    UnknownPageError,
)
from asyncfront.scenarios import get_scenario, kv_prefetch, moe_prefetch
from asyncfront.scenarios.kv_prefetch import KvPrefetchReport
from asyncfront.scenarios.moe_prefetch import MoePrefetchReport
from asyncfront.testing import FakeCopyEngine, FakeDevice, FakeStorageDevice, run_virtual

torch = pytest.importorskip("torch")

PAGE = 64 * 1024
READ = 0.010  # seconds to read one page from the file
COPY = 0.002  # seconds to copy one page between host and device


class FlakyStorage(FakeStorageDevice):
    """Fails the next ``fail_reads`` reads, then behaves."""

    fail_reads = 0

    def _read_sync(self, out: object, file: Any, offset: int, checksum: int | None = None) -> int:
        if self.fail_reads:
            self.fail_reads -= 1
            raise StorageReadError(self.resolve(file), offset, PAGE, 0, "injected")
        return super()._read_sync(out, file, offset, checksum)


@dataclass
class World:
    rt: af.Runtime
    pager: Pager
    kv: af.ExecutionContext
    host: af.ExecutionContext
    storage: FlakyStorage

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

    async def resume(self, page: Page) -> tuple[float, int, af.Frontier]:
        """Use the page once: seconds until the use was granted, its first byte, frontier."""
        started = self.rt.now()
        async with self.pager.use(page) as use:
            waited = self.rt.now() - started
            sub = self.kv.queue.submit(
                lambda t: int(t[0]), use.tensor, waits=[use.wait], signals=[use.signal]
            )
        first = await sub
        assert sub.frontier is not None
        return waited, first, sub.frontier

    async def measured(self, page: Page) -> None:
        """One page-out to the file and back, so the pager knows its read and copy times."""
        await self.pager.page_out(page, Tier.FILE)
        await self.resume(page)

    def peak_ok(self) -> bool:
        return all(self.rt.usage(c).used <= self.rt.usage(c).limit for c in (self.kv, self.host))


@asynccontextmanager
async def world(
    tmp_path: Path, *, device_pages: int = 4, host_pages: int = 4, **pager: Any
) -> AsyncIterator[World]:
    storage = FlakyStorage(tmp_path, bandwidth=PAGE / READ)
    devices = [
        FakeDevice("gpu0", memory=device_pages * PAGE),
        FakeDevice("host", kind="cpu", memory=host_pages * PAGE),
        FakeCopyEngine("pcie", bandwidth=PAGE / COPY),
        storage,
    ]
    async with af.open_runtime(devices) as rt:
        kv = rt.create_context("kv", device="gpu0", max_memory=device_pages * PAGE)
        host = rt.create_context("host", device="host", max_memory=host_pages * PAGE)
        copy = rt.queue("pcie", name="copy")
        nvme = rt.queue("nvme", name="nvme.pages")
        async with Pager(rt, host=host, copy=copy, storage=nvme, **pager) as p:
            yield World(rt, p, kv, host, storage)


def virtual(tmp_path: Path, body: Callable[[World], Awaitable[None]], **options: Any) -> None:
    async def main() -> None:
        async with world(tmp_path, **options) as w:
            await body(w)

    run_virtual(main)


def test_an_expected_page_is_on_the_device_before_its_use(tmp_path: Path) -> None:
    """expect(at=T): read and copy finish before T, the use waits 0 s and sees the bytes."""

    async def body(w: World) -> None:
        page = await w.page(7)
        await w.measured(page)
        await w.pager.page_out(page, Tier.FILE)
        at = w.rt.now() + 1.0
        assert w.pager.expect(page, at=at) == at
        assert page.expected_at == at
        await asyncio.sleep(at - w.rt.now())
        assert page.tier is Tier.DEVICE and page.prefetched
        waited, first, frontier = await w.resume(page)
        assert waited == 0.0 and first == 7
        assert frontier.get(w.pager.storage_axis) > 0  # the prefetch's read is in its history
        s = w.pager.statistics()
        assert (s.prefetches, s.prefetch_hits, s.prefetch_wasted) == (1, 1, 0)
        assert not page.prefetched and page.file_offset is None  # the extent was given back

    virtual(tmp_path, body)


def test_prefetch_starts_as_late_as_its_measured_times_allow(tmp_path: Path) -> None:
    """The read starts no earlier than margin x (two reads + two copies) before the use."""

    async def body(w: World) -> None:
        page = await w.page(1)
        await w.measured(page)
        await w.pager.page_out(page, Tier.FILE)
        at = w.rt.now() + 5.0
        w.pager.expect(page, at=at)
        await asyncio.sleep(at - 0.1 - w.rt.now())
        assert page.tier is Tier.FILE  # nothing moved 100 ms ahead of a use 5 s away
        await asyncio.sleep(0.1)
        assert page.tier is Tier.DEVICE

    virtual(tmp_path, body, prefetch_margin=2.0)


def test_prefetch_strictly_lowers_resume_latency_against_on_demand(tmp_path: Path) -> None:
    """The same resume waits read + copy on demand and nothing with a correct hint."""

    async def body(w: World) -> None:
        hinted, cold = await w.page(1), await w.page(2)
        await w.measured(hinted)
        for page in (hinted, cold):
            await w.pager.page_out(page, Tier.FILE)
        w.pager.expect(hinted, after=1.0)
        await asyncio.sleep(1.0)
        on_demand, first_cold, _ = await w.resume(cold)
        foresight, first_hinted, _ = await w.resume(hinted)
        assert (first_cold, first_hinted) == (2, 1)
        assert foresight < on_demand
        assert on_demand == pytest.approx(READ + COPY)

    virtual(tmp_path, body)


def test_a_full_device_pushes_out_only_pages_nobody_expects_sooner(tmp_path: Path) -> None:
    """prefetch_evicts: the least recent unexpected page goes, never one expected sooner."""

    async def body(w: World) -> None:
        pages = [await w.page(i) for i in range(1, 5)]  # the device holds 4: full
        await w.measured(pages[0])
        late = await w.page(9)  # pushes out pages[1], the least recent
        assert pages[1].tier is not Tier.DEVICE
        await w.pager.page_out(late, Tier.FILE)
        await w.page(10)  # full again: pages[2], pages[3], pages[0], p10, least recent first
        w.pager.expect(pages[2], after=0.5)  # the least recent, but expected sooner
        w.pager.expect(late, after=1.0)
        await asyncio.sleep(1.0)
        assert late.tier is Tier.DEVICE and pages[2].tier is Tier.DEVICE
        assert pages[3].tier is not Tier.DEVICE  # the unexpected one went
        assert w.peak_ok()

    virtual(tmp_path, body, prefetch_evicts=True)


def test_by_default_a_prefetch_takes_only_free_device_memory(tmp_path: Path) -> None:
    """A full device: the prefetch stops in host memory; the use pays only the copy."""

    async def body(w: World) -> None:
        pages = [await w.page(i) for i in range(1, 5)]  # the device holds 4: full
        await w.measured(pages[0])
        late = await w.page(9)
        assert pages[1].tier is not Tier.DEVICE
        await w.pager.page_out(pages[1], Tier.FILE)
        w.pager.expect(pages[1], after=1.0)
        await asyncio.sleep(1.0)
        assert pages[1].tier is Tier.HOST and pages[1].prefetched
        assert all(p.tier is Tier.DEVICE for p in (pages[0], pages[2], pages[3], late))
        outs = w.pager.statistics().page_outs
        waited, first, _ = await w.resume(pages[1])
        # The victim's page-out (copy, write) and the copy in; no read, unlike on demand.
        assert first == 2 and waited == pytest.approx(COPY + READ + COPY)
        assert waited < COPY + READ + READ + COPY
        assert w.pager.statistics().page_outs == outs + 1

    virtual(tmp_path, body)


def test_a_wrong_prediction_is_evicted_first_and_writes_nothing(tmp_path: Path) -> None:
    """An unused prefetched copy is the first victim of pressure, dropped without a write."""

    async def body(w: World) -> None:
        pages = [await w.page(i) for i in range(1, 4)]
        await w.measured(pages[0])
        await w.pager.page_out(pages[1], Tier.FILE)
        w.pager.expect(pages[1], after=0.5)  # prefetched, then never used
        await asyncio.sleep(0.5)
        assert pages[1].tier is Tier.DEVICE and pages[1].prefetched
        written = w.pager.statistics().bytes_out
        await w.page(8)
        await w.page(9)  # the device is full: one page must go
        assert pages[1].tier is Tier.FILE  # the wrong guess went, not pages[0] (older)
        assert pages[0].tier is Tier.DEVICE
        s = w.pager.statistics()
        assert s.bytes_out == written and s.prefetch_wasted == 1
        _, first, _ = await w.resume(pages[1])  # still the page's data, from its extent
        assert first == 2

    virtual(tmp_path, body)


def test_a_prefetch_storage_error_leaves_the_page_in_its_file(tmp_path: Path) -> None:
    """A failed prefetch read is counted, the page stays in the file, the use pages it in."""

    async def body(w: World) -> None:
        page = await w.page(5)
        await w.measured(page)
        await w.pager.page_out(page, Tier.FILE)
        w.storage.fail_reads = 1
        w.pager.expect(page, after=1.0)
        await asyncio.sleep(1.0)
        assert page.tier is Tier.FILE and not page.in_transit
        assert w.pager.statistics().prefetch_failures == 1
        waited, first, _ = await w.resume(page)
        assert first == 5 and waited == pytest.approx(READ + COPY)
        assert w.rt.usage(w.host).used == 0  # the failed prefetch's staging came back

    virtual(tmp_path, body)


def _flip(path: Path, offset: int) -> None:
    """Invert one byte of the page file."""
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0xFF]))


def test_a_corrupted_page_fails_its_prefetch_and_then_its_use(tmp_path: Path) -> None:
    """Changed bytes in the file: the prefetch is refused, the use raises PageCorruptedError."""

    async def body(w: World) -> None:
        page = await w.page(3)
        await w.measured(page)
        await w.pager.page_out(page, Tier.FILE)
        offset = page.file_offset
        assert offset is not None
        _flip(w.storage.resolve(w.pager.file), offset + 10)
        w.pager.expect(page, after=1.0)
        await asyncio.sleep(1.0)
        assert page.tier is Tier.FILE and w.pager.statistics().prefetch_failures == 1
        with pytest.raises(PageCorruptedError):
            await w.resume(page)
        assert page.tier is Tier.FILE and page.file_offset == offset

    virtual(tmp_path, body)


def test_a_prefetch_takes_host_memory_only_within_the_host_budget(tmp_path: Path) -> None:
    """With the host budget full of pinned pages' staging nothing is overcommitted."""

    async def body(w: World) -> None:
        page = await w.page(4)
        await w.measured(page)
        await w.pager.page_out(page, Tier.FILE)
        async with w.rt.session(w.host) as session:
            held = [await session.allocate(PAGE) for _ in range(4)]  # the host budget, all
            w.pager.expect(page, after=1.0)
            await asyncio.sleep(1.0)
            assert page.tier is Tier.FILE and w.pager.statistics().prefetch_failures == 1
            assert w.peak_ok()
            for buffer in held:
                session.free(buffer)
        _, first, _ = await w.resume(page)
        assert first == 4

    virtual(tmp_path, body)


def test_expect_refuses_bad_input_and_changes_nothing(tmp_path: Path) -> None:
    """Released or foreign pages and malformed times raise specific errors; nothing moves."""

    async def body(w: World) -> None:
        page = await w.page(1)
        await w.pager.page_out(page, Tier.FILE)
        bad: list[tuple[dict[str, Any], type[Exception], str]] = [
            ({}, TypeError, "exactly one"),
            ({"at": 1.0, "after": 1.0}, TypeError, "exactly one"),
            ({"at": "soon"}, TypeError, "str"),
            ({"after": True}, TypeError, "bool"),
            ({"at": math.nan}, ValueError, "finite"),
            ({"after": math.inf}, ValueError, "finite"),
            ({"after": -1.0}, ValueError, ">= 0"),
        ]
        for kwargs, error, words in bad:
            with pytest.raises(error, match=words):
                w.pager.expect(page, **kwargs)
        assert page.expected_at is None and not w.pager._prefetching
        released = await w.page(2)
        await w.pager.release(released)
        with pytest.raises(PageReleasedError, match="was released"):
            w.pager.expect(released, after=1.0)
        other = Pager(
            w.rt, host=w.host, copy=w.pager.copy, storage=w.pager.storage, file="other.bin"
        )
        foreign = await other.allocate(w.kv, (PAGE,), "uint8")
        with pytest.raises(UnknownPageError, match="not a page of pager"):
            w.pager.expect(foreign, after=1.0)
        await other.aclose()
        await asyncio.sleep(2.0)
        assert page.tier is Tier.FILE and w.pager.statistics().prefetches == 0

    virtual(tmp_path, body)


def test_forget_calls_off_a_pending_prefetch(tmp_path: Path) -> None:
    """forget() before the prefetch starts: nothing is read, the page stays in its file."""

    async def body(w: World) -> None:
        page = await w.page(1)
        await w.measured(page)
        await w.pager.page_out(page, Tier.FILE)
        w.pager.expect(page, after=1.0)
        w.pager.forget(page)
        await asyncio.sleep(2.0)
        assert page.tier is Tier.FILE and page.expected_at is None
        assert w.pager.statistics().prefetches == 0

    virtual(tmp_path, body)


def test_a_later_expect_replaces_the_earlier_one(tmp_path: Path) -> None:
    """Expecting again moves the prefetch to the new time."""

    async def body(w: World) -> None:
        page = await w.page(1)
        await w.measured(page)
        await w.pager.page_out(page, Tier.FILE)
        w.pager.expect(page, after=0.5)
        w.pager.expect(page, after=3.0)
        await asyncio.sleep(1.0)
        assert page.tier is Tier.FILE
        await asyncio.sleep(2.0)
        assert page.tier is Tier.DEVICE

    virtual(tmp_path, body)


def test_an_expected_resident_page_paged_out_comes_back_in_time(tmp_path: Path) -> None:
    """An expectation on a device page holds: paged out later, it is prefetched for then."""

    async def body(w: World) -> None:
        page = await w.page(6)
        await w.measured(page)
        w.pager.expect(page, after=2.0)
        await asyncio.sleep(0.5)
        await w.pager.page_out(page, Tier.FILE)
        await asyncio.sleep(1.5)
        assert page.tier is Tier.DEVICE
        waited, first, _ = await w.resume(page)
        assert waited == 0.0 and first == 6

    virtual(tmp_path, body)


def test_a_use_before_the_prefetch_pages_in_on_demand(tmp_path: Path) -> None:
    """A use that comes before the expected time is served at once; the prefetch is off."""

    async def body(w: World) -> None:
        page = await w.page(2)
        await w.measured(page)
        await w.pager.page_out(page, Tier.FILE)
        w.pager.expect(page, after=10.0)
        waited, first, _ = await w.resume(page)
        assert first == 2 and waited == pytest.approx(READ + COPY)
        assert page.expected_at is None
        await asyncio.sleep(0)
        assert not w.pager._prefetching

    virtual(tmp_path, body)


def test_closing_the_pager_cancels_pending_prefetches(tmp_path: Path) -> None:
    """aclose() with a prefetch far ahead ends it and releases every page."""

    async def main() -> None:
        async with world(tmp_path) as w:
            page = await w.page(1)
            await w.pager.page_out(page, Tier.FILE)
            w.pager.expect(page, after=100.0)
            await w.pager.aclose()
            assert not w.pager._prefetching and page.released
            assert w.rt.now() < 1.0

    run_virtual(main)


def test_reuse_intervals_predicts_the_last_use_plus_the_mean_idle_gap() -> None:
    """Gaps over min_gap are idle periods; the prediction is last use + their weighted mean."""
    model = ReuseIntervals(min_gap=1.0, weight=0.5)
    page: Any = type("P", (), {"name": "s1"})()
    assert model.predict(page, 0.0) is None
    for t in (0.0, 0.2, 10.2, 10.4):  # one idle gap of 10 s inside bursts
        model.observe(page, t)
    assert model.predict(page, 11.0) == pytest.approx(20.4)
    model.observe(page, 16.4)  # a gap of 6 s: mean 10 + 0.5 * (6 - 10) = 8
    assert model.predict(page, 17.0) == pytest.approx(24.4)
    model.forget(page)
    assert model.predict(page, 17.0) is None
    with pytest.raises(ValueError, match="weight"):
        ReuseIntervals(weight=0.0)
    with pytest.raises(ValueError, match="min_gap"):
        ReuseIntervals(min_gap=-1.0)


def test_an_arrival_model_prefetches_a_page_for_its_predicted_return(tmp_path: Path) -> None:
    """With ReuseIntervals, a page used every 10 s is back on the device when it returns."""

    async def body(w: World) -> None:
        page = await w.page(1)
        await w.measured(page)
        await w.pager.page_out(page, Tier.FILE)
        waits = []
        for _ in range(3):
            await asyncio.sleep(10.0 - (w.rt.now() % 10.0))
            waited, _, _ = await w.resume(page)
            waits.append(waited)
            await w.pager.page_out(page, Tier.FILE)  # pressure pushes it out after each turn
        assert waits[0] == pytest.approx(READ + COPY)  # no idle period known yet
        assert waits[1:] == [0.0, 0.0]  # predicted and prefetched
        assert w.pager.statistics().prefetch_hits == 2

    virtual(tmp_path, body, arrivals=ReuseIntervals(min_gap=1.0))


def test_fake_storage_takes_latency_plus_bytes_over_bandwidth(tmp_path: Path) -> None:
    """A FakeStorageDevice read of N bytes takes latency + N / bandwidth of loop time."""

    async def main() -> None:
        storage = FakeStorageDevice(tmp_path, bandwidth=1e6, latency=0.5)
        async with af.open_runtime([storage]) as rt:
            q = rt.queue("nvme")
            data = torch.arange(100, dtype=torch.uint8)
            await storage.write(q, data, "f.bin")
            out = torch.zeros(100, dtype=torch.uint8)
            t = rt.now()
            await storage.read(q, out, "f.bin")
            assert rt.now() - t == pytest.approx(0.5 + 100 / 1e6)
            assert torch.equal(out, data)

    run_virtual(main)
    with pytest.raises(ValueError, match="bandwidth"):
        FakeStorageDevice(tmp_path, bandwidth=0)
    with pytest.raises(ValueError, match="latency"):
        FakeStorageDevice(tmp_path, latency=-1.0)
    with pytest.raises(ValueError, match="bandwidth"):
        FakeCopyEngine("pcie", bandwidth=math.nan)


# -- MoE experts from routing foresight ------------------------------------------------


@pytest.fixture(scope="module")
def moe() -> MoePrefetchReport:
    async def main() -> MoePrefetchReport:
        report, _ = await moe_prefetch.simulate(steps=32)
        return report

    return run_virtual(main)


def test_foresight_at_full_accuracy_strictly_lowers_expert_stall(moe: MoePrefetchReport) -> None:
    """Correct predictions: less total expert-load stall than on demand, no wasted load."""
    base, exact = moe.run(None), moe.run(100)
    assert exact.stall < base.stall
    assert exact.wasted == 0 and exact.loads == base.loads


def test_foresight_costs_at_most_its_wasted_loads(moe: MoePrefetchReport) -> None:
    """At 80 and 50 %: stall <= on demand's + the wasted loads' load time, stall rises."""
    base = moe.run(None)
    for accuracy in (80, 50):
        run = moe.run(accuracy)
        assert run.wasted > 0
        assert run.stall <= base.stall + run.wasted * moe_prefetch.LOAD_SECONDS
    assert moe.run(100).stall < moe.run(80).stall < moe.run(50).stall


def test_every_run_keeps_the_expert_budget_and_runs_what_was_routed(
    moe: MoePrefetchReport,
) -> None:
    """No run exceeds the budget or leaves evictions to pressure; each step ran its experts."""
    routes = moe_prefetch.route_steps(moe.steps, moe.seed)
    for run in moe.runs:
        assert run.peak_bytes <= run.budget == moe_prefetch.SLOTS * moe_prefetch.EXPERT_BYTES
        assert run.pressure_evictions == 0
        assert run.ran == routes and len(run.stalls) == moe.steps


def test_predictions_are_exactly_as_accurate_as_asked_and_seeded() -> None:
    """predict() gets exactly accuracy % of the picks right, the same for the same seed."""
    routes = moe_prefetch.route_steps(50, seed=3)
    for accuracy in (100, 80, 50, 0):
        guess = moe_prefetch.predict(routes, accuracy, seed=3)
        right = sum(len(set(g) & set(r)) for g, r in zip(guess, routes, strict=True))
        assert right == round(100 * accuracy / 100)
        assert all(len(set(g)) == 2 for g in guess)
        assert guess == moe_prefetch.predict(routes, accuracy, seed=3)
    with pytest.raises(ValueError, match=r"0\.\.100"):
        moe_prefetch.predict(routes, 101, seed=3)


def test_the_moe_prefetch_scenario_is_registered_with_its_ranges() -> None:
    """simulate moe_prefetch takes --steps, --seed and --accuracy 0..100."""
    scenario = get_scenario("moe_prefetch")
    assert scenario.ranges["accuracy"] == (0, 100)
    with pytest.raises(ValueError, match=r"--accuracy must be 0\.\.100, not 101"):
        scenario.check_options({"accuracy": 101})


# -- sessions resuming, scenario B2d -----------------------------------------------------


@pytest.fixture(scope="module")
def resumes() -> KvPrefetchReport:
    async def main() -> KvPrefetchReport:
        report, _ = await kv_prefetch.simulate()
        return report

    return run_virtual(main)


def test_correct_hints_strictly_lower_resume_latency(resumes: KvPrefetchReport) -> None:
    """Hints right 100 % of the time: less total resume latency than on-demand page-in."""
    base, exact = resumes.run("on demand"), resumes.run("hint 100 %")
    assert exact.total < base.total and exact.hits > 0


def test_wrong_hints_cost_at_most_their_wasted_loads(resumes: KvPrefetchReport) -> None:
    """80 %, 50 %, the model: total latency <= on demand's + a read and copy per wasted one."""
    base = resumes.run("on demand")
    per_load = kv_prefetch.PAGE_BYTES * (
        1 / kv_prefetch.READ_BYTES_PER_SECOND + 1 / kv_prefetch.COPY_BYTES_PER_SECOND
    )
    for label in ("hint 80 %", "hint 50 %", "arrival model"):
        run = resumes.run(label)
        assert run.total <= base.total + run.wasted * per_load, label


def test_no_prediction_breaks_data_or_budgets(resumes: KvPrefetchReport) -> None:
    """Every run ends with every page's bytes exact and never held more than a budget."""
    for run in resumes.runs:
        assert run.intact, run.label
        assert run.peak_device <= run.budget_device and run.peak_host <= run.budget_host
        assert len(run.latencies) == resumes.sessions * resumes.messages
