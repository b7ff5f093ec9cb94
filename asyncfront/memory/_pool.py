"""BufferPool: memory reuse gated by death frontiers.

A freed block carries a *death frontier*, the frontier after which nobody uses it. The
pool hands a free block to a requester only when every entry of that frontier is
either known to the requester (its frontier dominates the entry) or already complete;
otherwise the allocation waits for exactly the missing epochs. Memory is never handed
out early.

The decision (which block, split, coalesce, what to wait for) is plain synchronous code
in :meth:`BufferPool.try_allocate` and :meth:`BufferPool.free`; :meth:`BufferPool.allocate`
only carries a decision out, awaiting the completion source when the answer is
:class:`Wait`. The pool manages offsets in one address space of ``capacity`` bytes and
nothing else: where the bytes come from (accounting here, device tensors later) is
kept out of the decision logic.
"""

from __future__ import annotations

import asyncio
import bisect
import enum
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Protocol, TypeAlias

from .._frontier import DEFAULT_FRONTIER_CAPACITY, EMPTY, Frontier

__all__ = (
    "DEFAULT_ALIGNMENT",
    "Block",
    "BufferPool",
    "CompletedSource",
    "DoubleFreeError",
    "ForeignBlockError",
    "FreeBlock",
    "InvalidFreeError",
    "InvalidSizeError",
    "PoolError",
    "PoolExhaustedError",
    "PoolStatistics",
    "Reuse",
    "SupportsCompleted",
    "Wait",
    "WaitCompleted",
    "WaitForFree",
    "WouldWaitError",
)

DEFAULT_ALIGNMENT = 256
"""Default alignment, in bytes, of every block's offset and span."""


class SupportsCompleted(Protocol):
    """Anything with a ``completed`` frontier, such as :class:`asyncfront.Runtime`."""

    @property
    def completed(self) -> Frontier:
        """The frontier of completed epochs."""
        ...


CompletedSource: TypeAlias = Callable[[], Frontier] | SupportsCompleted
"""Where a pool reads the completed frontier: a callable or an object with ``completed``."""

WaitCompleted: TypeAlias = Callable[[Frontier], Awaitable[None]]
"""A coroutine function that returns once every epoch of a frontier has completed."""


# -- errors ------------------------------------------------------------------------


class PoolError(Exception):
    """Base class of every error a :class:`BufferPool` raises."""


class PoolExhaustedError(PoolError, MemoryError):
    """The request can never be served: it asks for more bytes than the pool holds."""

    def __init__(self, pool: str, nbytes: int, capacity: int) -> None:
        super().__init__(
            f"pool {pool!r} asked {nbytes:,} bytes, capacity {capacity:,} bytes: "
            f"no amount of freeing or waiting can serve it"
        )
        self.pool = pool
        self.nbytes = nbytes
        self.capacity = capacity


class InvalidSizeError(PoolError, ValueError):
    """An allocation asked for zero or a negative number of bytes."""


class InvalidFreeError(PoolError, ValueError):
    """A block passed to :meth:`BufferPool.free` cannot be freed there."""


class DoubleFreeError(InvalidFreeError):
    """The block was already freed."""


class ForeignBlockError(InvalidFreeError):
    """The block belongs to another pool."""


class WouldWaitError(PoolError):
    """The allocation cannot be served without waiting.

    Raised by :meth:`BufferPool.allocate_nowait`, and by :meth:`BufferPool.allocate` when
    it would have to wait for epochs but the pool has no way to wait for completion.

    Attributes:
        decision: the :class:`Wait` or :class:`WaitForFree` that says what is missing.
    """

    def __init__(self, message: str, decision: Wait | WaitForFree) -> None:
        super().__init__(message)
        self.decision = decision


# -- values ------------------------------------------------------------------------


class Reuse(enum.Enum):
    """How a block's memory was found reusable when it was handed out."""

    FRESH = "fresh"
    """Never-used space: nobody ever used it, nothing to check."""
    DOMINATED = "dominated"
    """The requester's frontier dominates the death frontier: reuse without any wait."""
    COMPLETED = "completed"
    """Every death entry the requester does not cover has completed (try before fence)."""


@dataclass(frozen=True)
class Wait:
    """The answer of :meth:`BufferPool.try_allocate` when memory fits but is still in use.

    Once every epoch in ``frontier`` has completed, the block at ``offset`` becomes
    reusable for this requester, so retrying then succeeds unless someone else took it.

    Attributes:
        nbytes: the bytes asked for.
        frontier: the missing entries of the block's death frontier, each with the death
            frontier's epoch: neither covered by the requester nor complete (for a
            tainted block, every entry not complete).
        offset: where the block the allocation would wait for starts.
        tainted: whether that block is tainted (reused only once fully complete).
    """

    nbytes: int
    frontier: Frontier
    offset: int
    tainted: bool = False


@dataclass(frozen=True)
class WaitForFree:
    """The answer of :meth:`BufferPool.try_allocate` when no free space fits: wait for a free.

    Attributes:
        nbytes: the bytes asked for.
        bytes_free: free bytes in all (cached and fresh), possibly fragmented.
        largest_free: the largest contiguous free extent.
    """

    nbytes: int
    bytes_free: int
    largest_free: int


@dataclass(frozen=True)
class FreeBlock:
    """A snapshot of one cached (freed, not yet reused) block of a pool.

    Attributes:
        offset: where it starts.
        nbytes: its length.
        death: the merged death frontier of everything freed into it.
        tainted: the death frontier outgrew the pool's frontier capacity; it is reused
            only once the completed frontier dominates it.
    """

    offset: int
    nbytes: int
    death: Frontier
    tainted: bool


@dataclass(frozen=True)
class PoolStatistics:
    """A snapshot of a pool's memory and of how its allocations were served.

    Attributes:
        name: the pool's name.
        capacity: bytes in the address space.
        bytes_in_use: bytes held by live blocks (spans, alignment included).
        bytes_cached: bytes freed and not yet reused.
        bytes_fresh: bytes never handed out.
        blocks: live blocks.
        free_blocks: cached blocks (after coalescing).
        tainted_blocks: cached blocks whose death frontier outgrew the frontier capacity.
        allocations: blocks handed out.
        frees: blocks freed.
        fresh_allocations: blocks carved from never-used space.
        reuses_dominated: blocks reused because the requester dominated the death frontier.
        reuses_completed: blocks reused because the missing entries had completed.
        waits: allocation attempts answered with :class:`Wait`.
        waits_for_free: allocation attempts answered with :class:`WaitForFree`.
        splits: cached blocks split to serve a smaller request.
        coalesces: adjacent cached blocks merged on free.
    """

    name: str
    capacity: int
    bytes_in_use: int
    bytes_cached: int
    bytes_fresh: int
    blocks: int
    free_blocks: int
    tainted_blocks: int
    allocations: int
    frees: int
    fresh_allocations: int
    reuses_dominated: int
    reuses_completed: int
    waits: int
    waits_for_free: int
    splits: int
    coalesces: int


class Block:
    """A range of a pool's address space handed to a requester.

    Attributes are read-only. ``nbytes`` is what was asked for; ``span`` is what the
    block occupies (rounded up to the pool's alignment). ``death`` is None while the
    block is live and the death frontier it was freed with afterwards.
    """

    __slots__ = ("_death", "_nbytes", "_offset", "_owner", "_requester", "_reuse", "_span")

    def __init__(
        self,
        owner: BufferPool,
        offset: int,
        nbytes: int,
        span: int,
        requester: Frontier,
        reuse: Reuse,
    ) -> None:
        self._owner = owner
        self._offset = offset
        self._nbytes = nbytes
        self._span = span
        self._requester = requester
        self._reuse = reuse
        self._death: Frontier | None = None

    @property
    def pool(self) -> str:
        """The name of the pool (the device) the block lives in."""
        return self._owner.name

    @property
    def offset(self) -> int:
        """Where the block starts in the pool's address space."""
        return self._offset

    @property
    def nbytes(self) -> int:
        """The bytes the allocation asked for."""
        return self._nbytes

    @property
    def span(self) -> int:
        """The bytes the block occupies: ``nbytes`` rounded up to the pool's alignment."""
        return self._span

    @property
    def end(self) -> int:
        """The offset just past the block's span."""
        return self._offset + self._span

    @property
    def requester(self) -> Frontier:
        """The frontier of the requester the block was handed to."""
        return self._requester

    @property
    def reuse(self) -> Reuse:
        """How the memory was found safe to hand out."""
        return self._reuse

    @property
    def death(self) -> Frontier | None:
        """None while live; the death frontier it was freed with afterwards."""
        return self._death

    def __repr__(self) -> str:
        if self._death is None:
            state = f"live requester={self._requester!r}"
        else:
            state = f"freed death={self._death!r}"
        return (
            f"<Block {self.pool!r} offset={self._offset} nbytes={self._nbytes} "
            f"span={self._span} reuse={self._reuse.value} {state}>"
        )


class _Segment:
    """A cached range of address space (mutable, private to the pool)."""

    __slots__ = ("death", "nbytes", "offset", "tainted")

    def __init__(self, offset: int, nbytes: int, death: Frontier, tainted: bool) -> None:
        self.offset = offset
        self.nbytes = nbytes
        self.death = death
        self.tainted = tainted


def _consume_result(task: asyncio.Future[None]) -> None:
    """Retrieve a cancelled completion wait's outcome so no error goes unreported."""
    if not task.cancelled():
        task.exception()


class BufferPool:
    """Sub-allocates one address space, reusing freed blocks by their death frontiers.

    A free block is handed to a requester when (1) the requester's frontier dominates
    its death frontier, or (2) every entry the requester does not cover has completed
    (read from ``completed``), or else (3) the allocation waits for those missing
    epochs first. An allocation prefers a block reusable without waiting (lowest address
    first), then never-used space, then waiting on the block with the fewest and least
    outstanding missing epochs; when nothing fits it waits for a free.

    Blocks split (the remainder keeps its death frontier) and coalesce on free (the
    merged death frontier is the merge of both). A death frontier is never truncated:
    one with more than ``frontier_capacity`` entries makes its block *tainted*, reused
    only once the completed frontier dominates it.

    The pool belongs to one event loop and is not thread-safe.

    Args:
        capacity: bytes in the address space.
        alignment: every offset is a multiple of it and every span is rounded up to it
            (a power of two).
        completed: where to read the completed frontier: a callable or an object with a
            ``completed`` property such as :class:`asyncfront.Runtime`. None: nothing is
            ever known complete.
        wait_completed: a coroutine function returning once a frontier has completed;
            by default ``completed.wait_completed`` when ``completed`` has one.
        frontier_capacity: the most entries a death frontier may have before its block
            is tainted.
        name: the pool's name (usually its device's) for reprs and errors.
    """

    def __init__(
        self,
        capacity: int,
        *,
        alignment: int = DEFAULT_ALIGNMENT,
        completed: CompletedSource | None = None,
        wait_completed: WaitCompleted | None = None,
        frontier_capacity: int = DEFAULT_FRONTIER_CAPACITY,
        name: str = "pool",
    ) -> None:
        if capacity <= 0:
            raise ValueError(f"pool capacity must be > 0 bytes, got {capacity}")
        if alignment <= 0 or alignment & (alignment - 1):
            raise ValueError(f"pool alignment must be a power of two, got {alignment}")
        if frontier_capacity < 1:
            raise ValueError(f"frontier capacity must be >= 1, got {frontier_capacity}")
        self.capacity = capacity
        self.alignment = alignment
        self.frontier_capacity = frontier_capacity
        self.name = name
        self._read_completed = _completed_reader(completed)
        if wait_completed is None and completed is not None and not callable(completed):
            wait_completed = getattr(completed, "wait_completed", None)
        self._wait_completed = wait_completed
        # An axis the source calls retired (a closed, drained queue) is complete for good
        # although the completed frontier no longer lists it.
        self._axis_retired: Callable[[int], bool] | None = (
            getattr(completed, "axis_retired", None)
            if completed is not None and not callable(completed)
            else None
        )
        # Cached segments, by start and by end (for O(1) coalescing), and their starts
        # in address order (for first-fit scans).
        self._free: dict[int, _Segment] = {}
        self._free_by_end: dict[int, _Segment] = {}
        self._offsets: list[int] = []
        # Never-used space is [_top, capacity): it is kept apart from cached blocks so
        # a death frontier never spreads onto memory nobody used.
        self._top = 0
        self._live: dict[int, Block] = {}
        self._waiters: dict[asyncio.Future[None], None] = {}
        self._bytes_in_use = 0
        self._bytes_cached = 0
        self._tainted = 0
        self._allocations = 0
        self._frees = 0
        self._fresh_allocations = 0
        self._reuses_dominated = 0
        self._reuses_completed = 0
        self._waits = 0
        self._waits_for_free = 0
        self._splits = 0
        self._coalesces = 0

    # -- the decision ----------------------------------------------------------------

    @property
    def completed(self) -> Frontier:
        """The completed frontier as the pool sees it now."""
        return self._read_completed()

    def try_allocate(self, nbytes: int, requester: Frontier = EMPTY) -> Block | Wait | WaitForFree:
        """Hand out a block now if that is safe, else say what the allocation waits for.

        Synchronous and loop-free: this is the whole reuse decision. A returned
        :class:`Block` is live; :class:`Wait` names the missing epochs of the best block
        to wait for; :class:`WaitForFree` means no free space fits.

        Args:
            nbytes: bytes wanted (> 0).
            requester: the frontier of the work that will use the block.

        Raises:
            TypeError: ``nbytes`` is not an ``int``.
            InvalidSizeError: ``nbytes`` is zero or negative.
            PoolExhaustedError: ``nbytes`` exceeds the capacity (it can never fit).
        """
        self._check_size(nbytes)
        free = self._free
        knowledge = _Knowledge(requester, self._read_completed, self._axis_retired)
        blocked: list[_Segment] = []
        for offset in self._offsets:
            seg = free[offset]
            if seg.nbytes < nbytes:
                continue
            reuse = knowledge.reuse(seg)
            if reuse is not None:
                return self._take(seg, nbytes, requester, reuse)
            blocked.append(seg)
        fresh = self.capacity - self._top
        if fresh >= nbytes:
            return self._take_fresh(nbytes, requester)
        top = self._free_by_end.get(self._top)
        if top is not None and top.nbytes < nbytes <= top.nbytes + fresh:
            # The cached block just below the never-used space, extended into it.
            reuse = knowledge.reuse(top)
            if reuse is not None:
                return self._take(top, nbytes, requester, reuse)
            blocked.append(top)
        if blocked:
            self._waits += 1
            return knowledge.best_wait(nbytes, blocked)
        self._waits_for_free += 1
        return WaitForFree(nbytes, self._bytes_cached + fresh, self._largest_free())

    def _check_size(self, nbytes: int) -> None:
        if type(nbytes) is not int and (not isinstance(nbytes, int) or isinstance(nbytes, bool)):
            raise TypeError(
                f"pool {self.name!r}: allocation size must be an int number of bytes, got "
                f"{nbytes!r} ({type(nbytes).__name__})"
            )
        if nbytes <= 0:
            raise InvalidSizeError(
                f"pool {self.name!r}: allocation size must be > 0 bytes, got {nbytes}"
            )
        if nbytes > self.capacity:
            raise PoolExhaustedError(self.name, nbytes, self.capacity)

    def _take(self, seg: _Segment, nbytes: int, requester: Frontier, reuse: Reuse) -> Block:
        """Hand out the start of a cached segment (extended into fresh space at the top)."""
        offset = seg.offset
        span = self._aligned(nbytes)
        if span < seg.nbytes:
            # Split: the remainder is the same segment, starting later, same death.
            self._splits += 1
            self._move_start(seg, offset + span)
        else:
            self._remove(seg)
            if offset + seg.nbytes == self._top:
                span = min(span, self.capacity - offset)
                self._top = offset + span
            else:
                span = seg.nbytes  # boundaries below the top are aligned: an exact fit
        if reuse is Reuse.DOMINATED:
            self._reuses_dominated += 1
        else:
            self._reuses_completed += 1
        return self._hand_out(offset, nbytes, span, requester, reuse)

    def _take_fresh(self, nbytes: int, requester: Frontier) -> Block:
        offset = self._top
        span = min(self._aligned(nbytes), self.capacity - offset)
        self._top = offset + span
        self._fresh_allocations += 1
        return self._hand_out(offset, nbytes, span, requester, Reuse.FRESH)

    def _hand_out(
        self, offset: int, nbytes: int, span: int, requester: Frontier, reuse: Reuse
    ) -> Block:
        block = Block(self, offset, nbytes, span, requester, reuse)
        self._live[offset] = block
        self._bytes_in_use += span
        self._allocations += 1
        return block

    def _aligned(self, nbytes: int) -> int:
        mask = self.alignment - 1
        return (nbytes + mask) & ~mask

    def footprint(self, nbytes: int) -> int:
        """The bytes a block of ``nbytes`` occupies: rounded up to the alignment.

        Budgets charge this, not ``nbytes``: it is what the pool really holds. (The one
        block that ends at a capacity that is not a multiple of the alignment holds less;
        its :attr:`Block.span` says exactly.)

        Raises:
            TypeError: ``nbytes`` is not an ``int``.
            InvalidSizeError: ``nbytes`` is zero or negative.
            PoolExhaustedError: ``nbytes`` exceeds the capacity.
        """
        self._check_size(nbytes)
        return min(self._aligned(nbytes), self.capacity)

    def largest_extent(self, kept: Iterable[Block] = ()) -> int:
        """The largest contiguous range that ``kept`` blocks leave, were all others freed.

        A request larger than this can never be placed while those blocks stay live,
        however long it waits: fragmentation, not a lack of free bytes, is what stops
        it. Blocks not of this pool, or no longer live, are ignored.

        Args:
            kept: live blocks that stay where they are (the requester's own).
        """
        starts = sorted(
            (block._offset, block._offset + block._span)
            for block in kept
            if block._owner is self and self._live.get(block._offset) is block
        )
        largest = 0
        cursor = 0
        for start, end in starts:
            largest = max(largest, start - cursor)
            cursor = end
        return max(largest, self.capacity - cursor)

    def largest_free_extent(self) -> int:
        """The largest contiguous free range now (cached or never used), in bytes."""
        return self._largest_free()

    def _largest_free(self) -> int:
        fresh = self.capacity - self._top
        largest = max((seg.nbytes for seg in self._free.values()), default=0)
        top = self._free_by_end.get(self._top)
        return max(largest, fresh + (top.nbytes if top is not None else 0))

    # -- free ------------------------------------------------------------------------

    def free(self, block: Block, death: Frontier) -> None:
        """Return a block; nobody may use it after ``death``.

        The block joins the cached blocks, merging with free neighbours (their death
        frontiers merge too), and every waiting allocation retries.

        Args:
            block: a live block of this pool.
            death: the frontier after which nobody uses the block: typically the
                submitted frontier of every queue that touched it.

        Raises:
            ForeignBlockError: the block belongs to another pool.
            DoubleFreeError: the block was already freed.
        """
        if block._owner is not self:
            raise ForeignBlockError(
                f"pool {self.name!r} cannot free a block of pool {block.pool!r} "
                f"(offset {block.offset}, {block.nbytes} bytes)"
            )
        if block._death is not None or self._live.get(block._offset) is not block:
            raise DoubleFreeError(
                f"pool {self.name!r}: block at offset {block.offset} ({block.nbytes} bytes) "
                f"was already freed with death {block._death!r}"
            )
        del self._live[block._offset]
        block._death = death
        span = block._span
        self._bytes_in_use -= span
        self._frees += 1
        offset = block._offset
        end = offset + span
        tainted = len(death) > self.frontier_capacity
        left = self._free_by_end.get(offset)
        right = self._free.get(end)
        # Coalesce by growing a neighbour in place: no list insertion on the common path.
        if left is not None:
            self._absorb(left, death, tainted)
            if right is not None:
                self._remove(right)
                self._absorb(left, right.death, right.tainted)
                end += right.nbytes
            self._move_end(left, end)
        elif right is not None:
            self._absorb(right, death, tainted)
            self._move_start(right, offset)
        else:
            self._insert(_Segment(offset, span, death, tainted))
        if self._waiters:
            waiters, self._waiters = self._waiters, {}
            for fut in waiters:
                if not fut.done():
                    fut.set_result(None)

    def _absorb(self, seg: _Segment, death: Frontier, tainted: bool) -> None:
        """Merge an adjacent block's death into ``seg``: never truncated, tainted if too big."""
        self._coalesces += 1
        merged = seg.death.merge(death)
        seg.death = merged
        if not seg.tainted and (tainted or len(merged) > self.frontier_capacity):
            seg.tainted = True
            self._tainted += 1

    def _move_start(self, seg: _Segment, offset: int) -> None:
        """Move a segment's start, keeping its end (address order is unchanged)."""
        offsets = self._offsets
        offsets[bisect.bisect_left(offsets, seg.offset)] = offset
        del self._free[seg.offset]
        self._free[offset] = seg
        self._bytes_cached += seg.offset - offset
        seg.nbytes += seg.offset - offset
        seg.offset = offset

    def _move_end(self, seg: _Segment, end: int) -> None:
        """Move a segment's end, keeping its start."""
        old_end = seg.offset + seg.nbytes
        del self._free_by_end[old_end]
        self._free_by_end[end] = seg
        self._bytes_cached += end - old_end
        seg.nbytes += end - old_end

    def _insert(self, seg: _Segment) -> None:
        self._free[seg.offset] = seg
        self._free_by_end[seg.offset + seg.nbytes] = seg
        bisect.insort(self._offsets, seg.offset)
        self._bytes_cached += seg.nbytes
        if seg.tainted:
            self._tainted += 1

    def _remove(self, seg: _Segment) -> None:
        del self._free[seg.offset]
        del self._free_by_end[seg.offset + seg.nbytes]
        offsets = self._offsets
        del offsets[bisect.bisect_left(offsets, seg.offset)]
        self._bytes_cached -= seg.nbytes
        if seg.tainted:
            self._tainted -= 1

    # -- acting on the decision ------------------------------------------------------

    def allocate_nowait(self, nbytes: int, requester: Frontier = EMPTY) -> Block:
        """A block now, or :class:`WouldWaitError` saying what it would wait for.

        Raises:
            WouldWaitError: serving it needs a wait (``.decision`` says which).
            TypeError: ``nbytes`` is not an ``int``.
            InvalidSizeError: ``nbytes`` is zero or negative.
            PoolExhaustedError: ``nbytes`` exceeds the capacity.
        """
        decision = self.try_allocate(nbytes, requester)
        if isinstance(decision, Block):
            return decision
        raise WouldWaitError(self._describe_wait(decision), decision)

    async def allocate(self, nbytes: int, requester: Frontier = EMPTY) -> Block:
        """A block for ``requester``, waiting for missing epochs or for a free if needed.

        Each wait ends when the awaited epochs complete or when a block is freed,
        whichever comes first; then the decision is taken again. Memory is handed out
        only once it is safe for ``requester``.

        Args:
            nbytes: bytes wanted (> 0).
            requester: the frontier of the work that will use the block.

        Raises:
            TypeError: ``nbytes`` is not an ``int``.
            InvalidSizeError: ``nbytes`` is zero or negative.
            PoolExhaustedError: ``nbytes`` exceeds the capacity.
            WouldWaitError: it must wait for epochs but the pool has no
                ``wait_completed`` to wait with.
            Exception: whatever the completion source raises (for a runtime,
                :class:`asyncfront.StalledError` when it closes first).
        """
        while True:
            decision = self.try_allocate(nbytes, requester)
            if isinstance(decision, Block):
                return decision
            if isinstance(decision, WaitForFree):
                await self._wait_for(None)
                continue
            if self._wait_completed is None:
                raise WouldWaitError(
                    self._describe_wait(decision)
                    + " and the pool has no completion source to wait with "
                    "(pass completed=<runtime> or wait_completed=...)",
                    decision,
                )
            await self._wait_for(self._wait_completed(decision.frontier))

    async def _wait_for(self, completion: Awaitable[None] | None) -> None:
        """Wait until ``completion`` finishes (if given) or any block is freed."""
        changed = asyncio.get_running_loop().create_future()
        self._waiters[changed] = None
        try:
            if completion is None:
                await changed
                return
            task = asyncio.ensure_future(completion)
            try:
                await asyncio.wait((changed, task), return_when=asyncio.FIRST_COMPLETED)
            finally:
                if not task.done():
                    task.cancel()
                    task.add_done_callback(_consume_result)
            if task.done():
                task.result()  # the completion source's error, if it raised
        finally:
            self._waiters.pop(changed, None)

    def _describe_wait(self, decision: Wait | WaitForFree) -> str:
        if isinstance(decision, Wait):
            kind = "tainted block" if decision.tainted else "block"
            return (
                f"pool {self.name!r}: {decision.nbytes:,} bytes fit only in the {kind} at "
                f"offset {decision.offset}, which is reusable once {decision.frontier!r} "
                f"completes"
            )
        return (
            f"pool {self.name!r}: {decision.nbytes:,} bytes do not fit: "
            f"{decision.bytes_free:,} bytes free, the largest free extent "
            f"{decision.largest_free:,} bytes, {self._bytes_in_use:,} bytes in use"
        )

    # -- visible state ---------------------------------------------------------------

    def free_blocks(self) -> tuple[FreeBlock, ...]:
        """The cached blocks in address order."""
        free = self._free
        return tuple(
            FreeBlock(seg.offset, seg.nbytes, seg.death, seg.tainted)
            for seg in (free[offset] for offset in self._offsets)
        )

    def live_blocks(self) -> tuple[Block, ...]:
        """The live blocks in address order."""
        return tuple(sorted(self._live.values(), key=lambda block: block.offset))

    def statistics(self) -> PoolStatistics:
        """A frozen snapshot of memory use and of how allocations were served."""
        return PoolStatistics(
            name=self.name,
            capacity=self.capacity,
            bytes_in_use=self._bytes_in_use,
            bytes_cached=self._bytes_cached,
            bytes_fresh=self.capacity - self._top,
            blocks=len(self._live),
            free_blocks=len(self._free),
            tainted_blocks=self._tainted,
            allocations=self._allocations,
            frees=self._frees,
            fresh_allocations=self._fresh_allocations,
            reuses_dominated=self._reuses_dominated,
            reuses_completed=self._reuses_completed,
            waits=self._waits,
            waits_for_free=self._waits_for_free,
            splits=self._splits,
            coalesces=self._coalesces,
        )

    def __repr__(self) -> str:
        return (
            f"<BufferPool {self.name!r} capacity={self.capacity:,} "
            f"in_use={self._bytes_in_use:,} cached={self._bytes_cached:,} "
            f"fresh={self.capacity - self._top:,} blocks={len(self._live)} "
            f"free_blocks={len(self._free)} tainted={self._tainted} "
            f"waiting={len(self._waiters)}>"
        )


def _unzip(entries: list[tuple[int, int]]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Sorted ``(axis, epoch)`` entries as the two tuples a frontier is made of."""
    return tuple(ax for ax, _ in entries), tuple(e for _, e in entries)


def _completed_reader(source: CompletedSource | None) -> Callable[[], Frontier]:
    if source is None:
        return lambda: EMPTY
    if callable(source):
        return source
    return lambda: source.completed


class _Knowledge:
    """What one allocation may rely on, read lazily: the requester, completion, both."""

    __slots__ = ("_axis_retired", "_completed", "_known", "_read_completed", "requester")

    def __init__(
        self,
        requester: Frontier,
        read_completed: Callable[[], Frontier],
        axis_retired: Callable[[int], bool] | None = None,
    ) -> None:
        self.requester = requester
        self._read_completed = read_completed
        self._axis_retired = axis_retired
        self._completed: Frontier | None = None
        self._known: Frontier | None = None

    @property
    def completed(self) -> Frontier:
        completed = self._completed
        if completed is None:
            completed = self._completed = self._read_completed()
        return completed

    @property
    def known(self) -> Frontier:
        """requester | completed: every epoch this allocation may treat as finished."""
        known = self._known
        if known is None:
            known = self._known = self.requester.merge(self.completed)
        return known

    def reuse(self, seg: _Segment) -> Reuse | None:
        """The rule that makes ``seg`` safe to hand out now, or None."""
        rule = self._rule(seg)
        retired = self._axis_retired
        if rule is None and retired is not None:
            # Entries on retired axes are complete for good: drop them from the death
            # frontier (once) and decide again.
            death = seg.death
            if any(retired(ax) for ax in death.axes):
                seg.death = Frontier._make(*_unzip([(ax, e) for ax, e in death if not retired(ax)]))
                rule = self._rule(seg)
        return rule

    def _rule(self, seg: _Segment) -> Reuse | None:
        death = seg.death
        if seg.tainted:
            return Reuse.COMPLETED if self.completed.dominates(death) else None
        if self.requester.dominates(death):
            return Reuse.DOMINATED
        # Completion alone is the common case and avoids building the merge.
        if self.completed.dominates(death) or self.known.dominates(death):
            return Reuse.COMPLETED
        return None

    def best_wait(self, nbytes: int, blocked: list[_Segment]) -> Wait:
        """Wait on the block missing the fewest epochs, then least outstanding, then lowest."""
        completed = self.completed
        best: tuple[tuple[int, int, int], Wait] | None = None
        for seg in blocked:
            missing = (completed if seg.tainted else self.known).undominated(seg.death)
            outstanding = sum(epoch - completed.get(ax) for ax, epoch in missing)
            key = (len(missing), outstanding, seg.offset)
            if best is None or key < best[0]:
                best = (key, Wait(nbytes, missing, seg.offset, seg.tainted))
        assert best is not None
        return best[1]
