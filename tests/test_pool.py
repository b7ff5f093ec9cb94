"""BufferPool: death-frontier reuse decisions, split/coalesce, taint, waits and safety."""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    precondition,
    rule,
)

import asyncfront as af
import asyncfront.memory
from asyncfront import Frontier
from asyncfront.memory import (
    Block,
    BufferPool,
    DoubleFreeError,
    ForeignBlockError,
    InvalidSizeError,
    PoolError,
    PoolExhaustedError,
    Reuse,
    Wait,
    WaitForFree,
    WouldWaitError,
)
from asyncfront.testing import FakeDevice, new_virtual_loop

A = af.axis(device=0, queue=0)
B = af.axis(device=0, queue=1)
C = af.axis(device=1, queue=0)
D = af.axis(device=1, queue=1)
EMPTY = Frontier()


def f(**entries: int) -> Frontier:
    """A frontier over the test axes A-D by keyword, e.g. ``f(A=3, B=1)``."""
    names = {"A": A, "B": B, "C": C, "D": D}
    return Frontier({names[key]: epoch for key, epoch in entries.items()})


class Completed:
    """A hand-made completion source: the test advances it explicitly."""

    def __init__(self) -> None:
        self.frontier = EMPTY

    def __call__(self) -> Frontier:
        return self.frontier

    def advance(self, frontier: Frontier) -> None:
        self.frontier = self.frontier | frontier


def pool_with(capacity: int = 1024, **kwargs: Any) -> tuple[BufferPool, Completed]:
    """A pool with alignment 1 (exact offsets) reading a hand-made completed frontier."""
    completed = Completed()
    pool = BufferPool(capacity, alignment=1, completed=completed, **kwargs)
    return pool, completed


def run_in_virtual_time(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run ``main()`` on a fresh virtual-time loop, leaving the thread's current loop alone."""
    loop = new_virtual_loop()
    try:
        loop.run_until_complete(main())
        loop.run_until_complete(loop.shutdown_asyncgens())
    finally:
        loop.close()


def block(decision: Block | Wait | WaitForFree) -> Block:
    """The decision, asserted to be a handed-out block."""
    assert isinstance(decision, Block), decision
    return decision


def cached_block_at(pool: BufferPool, offset: int, nbytes: int, death: Frontier) -> Block:
    """Allocate fresh space at ``offset`` (must be the next fresh byte) and free it."""
    b = block(pool.try_allocate(nbytes))
    assert b.offset == offset
    pool.free(b, death)
    return b


# -- exports -----------------------------------------------------------------------


def test_memory_exports_are_documented() -> None:
    """Every name in asyncfront.memory.__all__ exists; its classes have docstrings."""
    assert isinstance(asyncfront.memory.__all__, tuple)
    for name in asyncfront.memory.__all__:
        obj = getattr(asyncfront.memory, name)
        if inspect.isclass(obj) and not hasattr(obj, "__origin__"):  # type aliases aside
            assert obj.__doc__, name
            assert obj.__module__.startswith("asyncfront.memory._"), name


# -- fresh space and alignment -----------------------------------------------------


def test_fresh_allocations_are_aligned_and_disjoint() -> None:
    """Fresh blocks start at multiples of the alignment and spans round nbytes up."""
    pool = BufferPool(4096, alignment=256)
    first = block(pool.try_allocate(100))
    second = block(pool.try_allocate(300))
    assert (first.offset, first.nbytes, first.span) == (0, 100, 256)
    assert (second.offset, second.nbytes, second.span) == (256, 300, 512)
    assert first.reuse is second.reuse is Reuse.FRESH
    stats = pool.statistics()
    assert stats.bytes_in_use == 768
    assert stats.bytes_fresh == 4096 - 768
    assert stats.fresh_allocations == 2


def test_last_block_is_clipped_to_a_capacity_that_is_not_aligned() -> None:
    """A capacity that is no multiple of the alignment is still usable to its last byte."""
    pool = BufferPool(1000, alignment=256)
    block(pool.try_allocate(768))
    last = block(pool.try_allocate(200))
    assert (last.offset, last.span, last.end) == (768, 232, 1000)
    assert pool.statistics().bytes_fresh == 0


# -- the three reuse rules ---------------------------------------------------------


def test_requester_dominating_death_reuses_without_wait() -> None:
    """Rule 1: a requester whose frontier dominates the death frontier gets the block."""
    pool, _ = pool_with(256)
    cached_block_at(pool, 0, 256, f(A=3, B=2))
    reused = block(pool.try_allocate(256, f(A=4, B=2, C=1)))
    assert reused.offset == 0
    assert reused.reuse is Reuse.DOMINATED
    assert reused.requester == f(A=4, B=2, C=1)
    assert pool.statistics().reuses_dominated == 1


def test_completed_frontier_allows_reuse_before_any_fence() -> None:
    """Rule 2: once the completed frontier dominates the death, any requester reuses it."""
    pool, completed = pool_with(256)
    cached_block_at(pool, 0, 256, f(A=3, B=2))
    completed.advance(f(A=3, B=5))
    reused = block(pool.try_allocate(256, EMPTY))
    assert reused.reuse is Reuse.COMPLETED
    assert pool.statistics().reuses_completed == 1


def test_requester_and_completed_together_cover_the_death() -> None:
    """Each death entry may be covered by the requester or by completion, independently."""
    pool, completed = pool_with(256)
    cached_block_at(pool, 0, 256, f(A=3, B=2))
    completed.advance(f(B=2))
    reused = block(pool.try_allocate(256, f(A=3)))
    assert reused.reuse is Reuse.COMPLETED


def test_wait_frontier_is_exactly_the_missing_entries() -> None:
    """Rule 3: Wait names the death entries neither the requester nor completion covers."""
    pool, completed = pool_with(256)
    cached_block_at(pool, 0, 256, f(A=3, B=2, C=7, D=1))
    completed.advance(f(B=2, C=4))
    decision = pool.try_allocate(100, f(A=5, D=1))
    assert decision == Wait(nbytes=100, frontier=f(C=7), offset=0, tainted=False)
    assert pool.statistics().waits == 1
    assert pool.statistics().bytes_in_use == 0


def test_wait_is_sufficient_once_the_missing_epochs_complete() -> None:
    """After exactly the Wait frontier completes, the same request is served."""
    pool, completed = pool_with(256)
    cached_block_at(pool, 0, 256, f(A=3, B=2))
    decision = pool.try_allocate(256, f(A=1))
    assert isinstance(decision, Wait)
    completed.advance(decision.frontier)
    assert block(pool.try_allocate(256, f(A=1))).reuse is Reuse.COMPLETED


def test_memory_is_never_handed_out_while_an_epoch_is_missing() -> None:
    """A completed frontier one epoch short still answers Wait on that one entry."""
    pool, completed = pool_with(256)
    cached_block_at(pool, 0, 256, f(A=3))
    completed.advance(f(A=2))
    assert pool.try_allocate(256, f(A=2)) == Wait(256, f(A=3), 0)


# -- preferences -------------------------------------------------------------------


def test_reusable_block_is_preferred_over_fresh_space() -> None:
    """A block reusable without waiting wins over never-used space."""
    pool, _ = pool_with(1024)
    cached_block_at(pool, 0, 256, f(A=1))
    reused = block(pool.try_allocate(128, f(A=1)))
    assert (reused.offset, reused.reuse) == (0, Reuse.DOMINATED)


def test_fresh_space_is_preferred_over_waiting() -> None:
    """Never-used space wins over a cached block that would need a wait."""
    pool, _ = pool_with(1024)
    cached_block_at(pool, 0, 256, f(A=1))
    fresh = block(pool.try_allocate(128, EMPTY))
    assert (fresh.offset, fresh.reuse) == (256, Reuse.FRESH)


def test_first_reusable_block_by_address_is_chosen() -> None:
    """Among blocks reusable without waiting, the lowest address is handed out."""
    pool, completed = pool_with(1024)
    a = block(pool.try_allocate(100))
    block(pool.try_allocate(100))  # keeps the two freed blocks apart
    b = block(pool.try_allocate(100))
    block(pool.try_allocate(724))
    pool.free(b, f(A=1))
    pool.free(a, f(B=1))
    completed.advance(f(B=1))
    chosen = block(pool.try_allocate(50, f(A=1)))
    assert (chosen.offset, chosen.reuse) == (0, Reuse.COMPLETED)


def test_wait_prefers_the_block_with_fewest_missing_axes() -> None:
    """With only waits left, the block missing the fewest axes is chosen."""
    pool, _ = pool_with(768)
    a = block(pool.try_allocate(256))
    block(pool.try_allocate(256))
    b = block(pool.try_allocate(256))
    pool.free(a, f(A=1, B=1))
    pool.free(b, f(C=9))
    assert pool.try_allocate(200, EMPTY) == Wait(200, f(C=9), 512)


def test_wait_prefers_the_block_with_fewest_outstanding_epochs() -> None:
    """Among waits on equally many axes, the one closest to completion is chosen."""
    pool, completed = pool_with(768)
    a = block(pool.try_allocate(256))
    block(pool.try_allocate(256))
    b = block(pool.try_allocate(256))
    pool.free(a, f(A=5))
    pool.free(b, f(B=9))
    completed.advance(f(A=1, B=8))
    assert pool.try_allocate(200, EMPTY) == Wait(200, f(B=9), 512)


# -- split and coalesce ------------------------------------------------------------


def test_split_remainder_stays_free_with_the_same_death() -> None:
    """A smaller request takes the start of a cached block; the rest keeps its death."""
    pool, _ = pool_with(1024)
    cached_block_at(pool, 0, 512, f(A=2, B=1))
    block(pool.try_allocate(1024 - 512))  # use up fresh space
    taken = block(pool.try_allocate(200, f(A=2, B=1)))
    assert (taken.offset, taken.span) == (0, 200)
    (rest,) = pool.free_blocks()
    assert (rest.offset, rest.nbytes, rest.death, rest.tainted) == (200, 312, f(A=2, B=1), False)
    assert pool.statistics().splits == 1


def test_adjacent_frees_coalesce_and_merge_death_frontiers() -> None:
    """Freeing between two cached blocks leaves one block whose death merges all three."""
    pool, _ = pool_with(768)
    left, middle, right = (block(pool.try_allocate(256)) for _ in range(3))
    pool.free(left, f(A=4, B=1))
    pool.free(right, f(B=3))
    assert len(pool.free_blocks()) == 2
    pool.free(middle, f(C=2))
    (merged,) = pool.free_blocks()
    assert (merged.offset, merged.nbytes) == (0, 768)
    assert merged.death == f(A=4, B=3, C=2)
    stats = pool.statistics()
    assert (stats.coalesces, stats.free_blocks, stats.bytes_cached) == (2, 1, 768)


def test_coalesced_block_serves_a_request_larger_than_either_part() -> None:
    """After coalescing, a request spanning both parts needs the merged death covered."""
    pool, _ = pool_with(512)
    left, right = block(pool.try_allocate(256)), block(pool.try_allocate(256))
    pool.free(left, f(A=1))
    pool.free(right, f(B=1))
    assert pool.try_allocate(400, f(A=1)) == Wait(400, f(B=1), 0)
    assert block(pool.try_allocate(400, f(A=1, B=1))).reuse is Reuse.DOMINATED


def test_freed_block_does_not_spread_its_death_onto_fresh_space() -> None:
    """A cached block next to never-used space stays apart: fresh space needs no wait."""
    pool, _ = pool_with(1024)
    cached_block_at(pool, 0, 256, f(A=9))
    fresh = block(pool.try_allocate(768, EMPTY))
    assert (fresh.offset, fresh.reuse) == (256, Reuse.FRESH)


def test_request_may_extend_the_top_cached_block_into_fresh_space() -> None:
    """A request larger than any part uses the top cached block plus the fresh space above."""
    pool, _ = pool_with(1024)
    cached_block_at(pool, 0, 600, f(A=2))
    assert pool.try_allocate(1000, EMPTY) == Wait(1000, f(A=2), 0)
    whole = block(pool.try_allocate(1000, f(A=2)))
    assert (whole.offset, whole.span, whole.reuse) == (0, 1000, Reuse.DOMINATED)
    assert pool.statistics().bytes_fresh == 24
    assert pool.free_blocks() == ()


# -- taint -------------------------------------------------------------------------


def test_merged_death_over_capacity_taints_the_block_without_truncating() -> None:
    """A coalesced death frontier beyond frontier_capacity keeps every entry and is tainted."""
    pool, _ = pool_with(512, frontier_capacity=2)
    left, right = block(pool.try_allocate(256)), block(pool.try_allocate(256))
    pool.free(left, f(A=1, B=1))
    pool.free(right, f(C=1, D=1))
    (merged,) = pool.free_blocks()
    assert merged.death == f(A=1, B=1, C=1, D=1)
    assert merged.tainted
    assert pool.statistics().tainted_blocks == 1


def test_tainted_block_is_reused_only_once_complete() -> None:
    """Even a dominating requester waits for a tainted block's whole death to complete."""
    pool, completed = pool_with(512, frontier_capacity=2)
    left, right = block(pool.try_allocate(256)), block(pool.try_allocate(256))
    pool.free(left, f(A=1, B=1))
    pool.free(right, f(C=1, D=1))
    everything = f(A=1, B=1, C=1, D=1)
    completed.advance(f(A=1))
    decision = pool.try_allocate(512, everything)
    assert decision == Wait(512, f(B=1, C=1, D=1), 0, tainted=True)
    completed.advance(everything)
    reused = block(pool.try_allocate(512, everything))
    assert reused.reuse is Reuse.COMPLETED
    assert pool.statistics().tainted_blocks == 0


def test_free_with_an_oversized_death_taints_at_once() -> None:
    """A death frontier larger than frontier_capacity taints the block when freed."""
    pool, _ = pool_with(256, frontier_capacity=1)
    cached_block_at(pool, 0, 256, f(A=1, B=1))
    (cached,) = pool.free_blocks()
    assert cached.tainted and cached.death == f(A=1, B=1)


def test_split_of_a_tainted_block_keeps_the_taint() -> None:
    """The remainder of a split tainted block is still tainted."""
    pool, completed = pool_with(256, frontier_capacity=1)
    cached_block_at(pool, 0, 256, f(A=1, B=1))
    completed.advance(f(A=1, B=1))
    block(pool.try_allocate(100))
    (rest,) = pool.free_blocks()
    assert (rest.offset, rest.tainted) == (100, True)


# -- waiting for free space --------------------------------------------------------


def test_wait_for_free_when_nothing_fits() -> None:
    """With fragments too small, the answer is WaitForFree with the free-space numbers."""
    pool, _ = pool_with(768)
    a = block(pool.try_allocate(256))
    block(pool.try_allocate(256))
    c = block(pool.try_allocate(256))
    pool.free(a, EMPTY)
    pool.free(c, EMPTY)
    assert pool.try_allocate(300) == WaitForFree(300, bytes_free=512, largest_free=256)
    assert pool.statistics().waits_for_free == 1


# -- errors ------------------------------------------------------------------------


@pytest.mark.parametrize("nbytes", [0, -5])
def test_nonpositive_size_is_rejected(nbytes: int) -> None:
    """Zero or negative sizes raise InvalidSizeError (a ValueError) naming the size."""
    pool = BufferPool(1024)
    with pytest.raises(InvalidSizeError, match=rf"got {nbytes}\b"):
        pool.try_allocate(nbytes)
    with pytest.raises(ValueError):
        pool.allocate_nowait(nbytes)


def test_request_beyond_capacity_raises_pool_exhausted() -> None:
    """A request beyond capacity raises PoolExhaustedError (a MemoryError) with both numbers."""
    pool = BufferPool(4096, name="gpu0")
    with pytest.raises(
        PoolExhaustedError, match=r"'gpu0' asked 5,000 bytes, capacity 4,096"
    ) as info:
        pool.try_allocate(5000)
    assert isinstance(info.value, MemoryError) and isinstance(info.value, PoolError)
    assert (info.value.nbytes, info.value.capacity) == (5000, 4096)


def test_double_free_raises() -> None:
    """Freeing a block twice raises DoubleFreeError naming its offset and size."""
    pool = BufferPool(1024)
    b = pool.allocate_nowait(100)
    pool.free(b, f(A=1))
    with pytest.raises(DoubleFreeError, match=r"offset 0 \(100 bytes\)"):
        pool.free(b, f(A=2))
    assert pool.statistics().frees == 1


def test_freeing_a_foreign_block_raises() -> None:
    """A block of another pool raises ForeignBlockError and leaves both pools alone."""
    mine, theirs = BufferPool(1024, name="mine"), BufferPool(1024, name="theirs")
    b = theirs.allocate_nowait(100)
    with pytest.raises(ForeignBlockError, match=r"'mine' cannot free a block of pool 'theirs'"):
        mine.free(b, EMPTY)
    assert theirs.statistics().blocks == 1 and mine.statistics().frees == 0


def test_allocate_nowait_raises_would_wait_with_the_decision() -> None:
    """allocate_nowait raises WouldWaitError carrying the Wait it would need."""
    pool, _ = pool_with(256)
    cached_block_at(pool, 0, 256, f(A=3))
    with pytest.raises(WouldWaitError, match=r"offset 0") as info:
        pool.allocate_nowait(128, EMPTY)
    assert info.value.decision == Wait(128, f(A=3), 0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"capacity": 0}, "capacity must be > 0"),
        ({"capacity": 64, "alignment": 3}, "power of two, got 3"),
        ({"capacity": 64, "frontier_capacity": 0}, "frontier capacity must be >= 1, got 0"),
    ],
)
def test_bad_pool_arguments_are_rejected(kwargs: dict[str, Any], message: str) -> None:
    """Invalid constructor arguments raise ValueError naming the value."""
    with pytest.raises(ValueError, match=message):
        BufferPool(**kwargs)


# -- visible state -----------------------------------------------------------------


def test_reprs_and_statistics_are_informative_and_frozen() -> None:
    """Pool and block reprs show their state; statistics() is a frozen snapshot."""
    pool = BufferPool(4096, name="gpu0")
    b = pool.allocate_nowait(100, f(A=1))
    assert repr(pool) == (
        "<BufferPool 'gpu0' capacity=4,096 in_use=256 cached=0 fresh=3,840 blocks=1 "
        "free_blocks=0 tainted=0 waiting=0>"
    )
    assert repr(b) == (
        f"<Block 'gpu0' offset=0 nbytes=100 span=256 reuse=fresh live requester={f(A=1)!r}>"
    )
    pool.free(b, f(A=2))
    assert repr(b).endswith(f"freed death={f(A=2)!r}>")
    assert b.death == f(A=2)
    stats = pool.statistics()
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.blocks = 3  # type: ignore[misc]
    assert (stats.bytes_in_use, stats.bytes_cached, stats.blocks, stats.free_blocks) == (
        0,
        256,
        0,
        1,
    )


def test_pool_reads_completed_from_a_runtime_like_object() -> None:
    """completed= accepts an object with a .completed property, such as a Runtime."""

    class Tracker:
        completed = f(A=5)

    pool = BufferPool(256, alignment=1, completed=Tracker())
    cached_block_at(pool, 0, 256, f(A=5))
    assert pool.completed == f(A=5)
    assert block(pool.try_allocate(10)).reuse is Reuse.COMPLETED


# -- acting on decisions, in virtual time ------------------------------------------


def test_allocation_waits_until_the_missing_epoch_completes_on_a_runtime() -> None:
    """An allocation that must wait is served only after the runtime completes the epoch."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        async with af.open_runtime([FakeDevice("gpu")]) as rt:
            pool = BufferPool(1024, completed=rt, name="gpu")
            queue = rt.queue("gpu")
            held = pool.allocate_nowait(1024, queue.frontier)
            work = queue.submit(cost=5.0, name="uses-block")
            death = Frontier.single(queue.axis, work.epoch)
            pool.free(held, death)
            assert pool.try_allocate(512) == Wait(512, death, 0)
            reused = await pool.allocate(512)
            assert work.done()
            assert rt.is_complete(death)
            assert loop.time() >= 5.0
            assert reused.reuse is Reuse.COMPLETED
            assert pool.statistics().waits == 2

    run_in_virtual_time(main)


def test_waiting_allocation_is_woken_by_a_free_that_serves_it() -> None:
    """A free that offers a reusable block ends a wait before the epochs complete."""

    async def main() -> None:
        started = asyncio.Event()

        async def never_completes(frontier: Frontier) -> None:
            started.set()
            await asyncio.Event().wait()

        pool, _ = pool_with(768, wait_completed=never_completes)
        old = block(pool.try_allocate(256))
        block(pool.try_allocate(256))  # keeps the two freed blocks apart
        other = block(pool.try_allocate(256))
        pool.free(old, f(A=7))
        waiter = asyncio.ensure_future(pool.allocate(256, f(B=1)))
        await started.wait()
        assert not waiter.done()
        pool.free(other, f(B=1))
        got = await waiter
        assert (got.offset, got.reuse) == (512, Reuse.DOMINATED)
        assert repr(pool).endswith("waiting=0>")

    run_in_virtual_time(main)


def test_allocation_waits_for_a_free_when_nothing_fits() -> None:
    """With all memory live, allocate() waits for a free and then takes that memory."""

    async def main() -> None:
        pool, _ = pool_with(256)
        held = block(pool.try_allocate(256))
        waiter = asyncio.ensure_future(pool.allocate(200, f(A=1)))
        await asyncio.sleep(1)
        assert not waiter.done()
        pool.free(held, f(A=1))
        got = await waiter
        assert (got.offset, got.reuse) == (0, Reuse.DOMINATED)

    run_in_virtual_time(main)


def test_allocate_without_a_completion_source_cannot_wait_for_epochs() -> None:
    """allocate() raises WouldWaitError when it must wait but has nothing to wait with."""

    async def main() -> None:
        pool = BufferPool(256, alignment=1)
        cached_block_at(pool, 0, 256, f(A=1))
        with pytest.raises(WouldWaitError, match="no completion source"):
            await pool.allocate(10)

    run_in_virtual_time(main)


def test_cancelled_allocation_leaves_no_waiter_behind() -> None:
    """Cancelling a waiting allocate() removes its waiter and cancels its completion wait."""

    async def main() -> None:
        cancelled = asyncio.Event()

        async def slow(frontier: Frontier) -> None:
            try:
                await asyncio.sleep(100)
            finally:
                cancelled.set()

        pool, _ = pool_with(256, wait_completed=slow)
        cached_block_at(pool, 0, 256, f(A=1))
        waiter = asyncio.ensure_future(pool.allocate(10))
        await asyncio.sleep(1)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        await cancelled.wait()
        assert repr(pool).endswith("waiting=0>")
        assert pool.statistics().blocks == 0

    run_in_virtual_time(main)


# -- stateful safety ---------------------------------------------------------------

ALIGN = 16
UNITS = 32
CAPACITY = ALIGN * UNITS
FRONTIER_CAPACITY = 2
AXES = (A, B, C)

frontiers = st.dictionaries(st.sampled_from(AXES), st.integers(1, 4), max_size=3).map(Frontier)


class PoolMachine(RuleBasedStateMachine):
    """Random allocate/free/complete sequences against a per-unit model of deaths."""

    live = Bundle("live")

    def __init__(self) -> None:
        super().__init__()
        self.completed = EMPTY
        self.pool = BufferPool(
            CAPACITY,
            alignment=ALIGN,
            completed=lambda: self.completed,
            frontier_capacity=FRONTIER_CAPACITY,
        )
        self.owner: list[Block | None] = [None] * UNITS
        self.death: list[Frontier | None] = [None] * UNITS  # None: never used

    def units(self, b: Block) -> range:
        return range(b.offset // ALIGN, b.end // ALIGN)

    def granted(self, b: Block, requester: Frontier) -> Block:
        assert b.offset % ALIGN == 0 and b.span % ALIGN == 0
        assert b.nbytes <= b.span < b.nbytes + ALIGN and b.end <= CAPACITY
        known = requester | self.completed
        for unit in self.units(b):
            assert self.owner[unit] is None, "two live blocks overlap"
            death = self.death[unit]
            if b.reuse is Reuse.FRESH:
                assert death is None, "fresh space was used before"
            # The safety property: every axis of the memory's death frontier is
            # dominated by the requester or complete.
            assert death is None or known.dominates(death), (death, requester, self.completed)
            self.owner[unit] = b
        return b

    def largest_free_run(self) -> int:
        best = run = 0
        for owner in self.owner:
            run = run + 1 if owner is None else 0
            best = max(best, run)
        return best * ALIGN

    @rule(
        target=live,
        nbytes=st.one_of(st.integers(1, 4 * ALIGN), st.integers(1, CAPACITY)),
        requester=frontiers,
    )
    def allocate(self, nbytes: int, requester: Frontier) -> Block | None:
        decision = self.pool.try_allocate(nbytes, requester)
        if isinstance(decision, WaitForFree):
            assert self.largest_free_run() < nbytes
            return None
        if isinstance(decision, Wait):
            assert decision.frontier
            cover = self.completed if decision.tainted else requester | self.completed
            for ax, epoch in decision.frontier:
                assert cover.get(ax) < epoch, "waits for an entry already covered"
            # Waiting is sufficient: once exactly those epochs complete, it is served.
            self.completed = self.completed | decision.frontier
            decision = self.pool.try_allocate(nbytes, requester)
            assert isinstance(decision, Block)
        return self.granted(decision, requester)

    @rule(b=consumes(live), death=frontiers)
    def free(self, b: Block | None, death: Frontier) -> None:
        if b is None:
            return
        self.pool.free(b, death)
        for unit in self.units(b):
            self.owner[unit] = None
            self.death[unit] = death
        with pytest.raises(DoubleFreeError):
            self.pool.free(b, death)

    @rule(ax=st.sampled_from(AXES), epoch=st.integers(1, 5))
    def complete(self, ax: int, epoch: int) -> None:
        self.completed = self.completed | Frontier.single(ax, epoch)

    @precondition(lambda self: any(owner is not None for owner in self.owner))
    @rule(requester=frontiers)
    def huge_request_is_refused(self, requester: Frontier) -> None:
        with pytest.raises(PoolExhaustedError):
            self.pool.try_allocate(CAPACITY + 1, requester)

    @invariant()
    def accounting_adds_up(self) -> None:
        stats = self.pool.statistics()
        live = {id(b): b for b in self.owner if b is not None}
        assert stats.bytes_in_use == sum(b.span for b in live.values())
        assert stats.bytes_in_use + stats.bytes_cached <= CAPACITY
        assert stats.bytes_in_use + stats.bytes_cached + stats.bytes_fresh == CAPACITY
        assert stats.blocks == len(live)

    @invariant()
    def cached_blocks_remember_every_death(self) -> None:
        previous_end = -1
        for cached in self.pool.free_blocks():
            assert cached.offset != previous_end, "adjacent cached blocks were not coalesced"
            previous_end = cached.offset + cached.nbytes
            assert cached.tainted == (len(cached.death) > FRONTIER_CAPACITY)
            for unit in range(cached.offset // ALIGN, previous_end // ALIGN):
                assert self.owner[unit] is None, "a cached block overlaps a live one"
                death = self.death[unit]
                assert death is not None and cached.death.dominates(death)


PoolMachine.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_pool_safety = PoolMachine.TestCase
