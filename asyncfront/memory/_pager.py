"""The pager: mutable blocks (KV cache, optimizer state) that move device → host → file.

A :class:`Page` is a block of mutable memory owned by some model's context. It lives
in one of three tiers: the *device* (its context's memory and budget), the *host* (the
pager's host context) or a *file* (an extent of one file on a storage device). All
pages of all models and sessions share one least-recently-used order; memory pressure
on a device pages out the least recently used pages that help.

Every page has a timeline semaphore, and everything that touches the page is ordered
on it: each use waits for the previous value and signals the next, a page-out's copy
waits for the last use, a page-in's read waits for the value the page-out signalled,
and the next use waits for the page-in's copy. So the work that resumes after a
page-in carries the storage and copy axes in its frontier, and a page-out never reads
memory that a use is still writing.

Page-out copies device → host on the copy queue, then writes host → file on the
storage queue, and frees the device copy only once the write has been signalled. If
any step fails, nothing is lost: the device copy is still there and the page stays
resident and usable; only the host buffer and file extent it took are given back.
Page-in reads file → host and copies host → device, and keeps the file extent until
the data is back, so a failed page-in leaves the page in its file, to be paged in
again. The file tier is verified: each page-out's write returns the CRC32C of the bytes
it wrote, each page-in's read checks it, and bytes that changed in the file (flipped,
zeroed, truncated) raise :class:`PageCorruptedError` with the page, file and offset.
With ``direct=True`` the storage device reads and writes device memory itself
where it can reach it (GPUDirect Storage through KvikIO on CUDA; plain host memory
otherwise), and the host tier is left out of file transfers.

On a machine without a GPU the device and host tiers are both CPU memory, but they are
distinct tiers all the same: different devices, budgets and pools.

Liveness: every wait for memory in the pager ends. A move that waits for memory does
not count as one that will free memory by itself, so waits never wait for each other in
a circle: a host tier full of pages whose page-ins wait for device room moves the host
copies of some of them on to the file (they are read back from there), and a wait that
nothing can end, because every byte that could help is held by pages whose uses or
moves wait themselves, or because the page file is full, raises
:class:`PagerStallError` at once with the tier, the budget and the bytes, leaving no
charge, pin or half-moved page behind. :meth:`Pager.waits` lists the waits in progress.

Foresight: :meth:`Pager.expect` says when a page will be used next (``at=`` on the
runtime clock, or ``after=`` seconds from now), and an :class:`ArrivalModel` may say it
for every page that leaves the device. The pager then reads the page file → host ahead
of time, as late as its measured read and copy times allow (times ``prefetch_margin``),
and copies it host → device just before it is needed when the device has free room
(``prefetch_evicts=True``: paging out device pages nobody expects sooner). The
prefetched copy is *clean*: the page keeps its file extent until its first use, so
evicting a page that was prefetched for nothing writes nothing, and it sits at the least
recently used end, evicted first.
Prefetch reads run on a storage queue one priority below the pager's, so page-ins and
page-outs that a use waits for go first. A prefetch goes through the same budgets,
checksums and errors as a page-in; one that
fails or finds no memory leaves the page where it was, counted in
:attr:`PagerStatistics.prefetch_failures`, and the use pages it in on demand (raising
the error itself if it persists).
"""

from __future__ import annotations

import asyncio
import contextvars
import enum
import math
import os
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, cast

from .._budget import MemoryBudgetError, format_bytes
from .._frontier import Frontier
from .._progress import progress
from .._semaphore import SemaphoreFailedError, TimelineSemaphore
from ..devices.storage import ChecksumError, ShortReadError, StorageReadError
from ._pool import Block, BufferPool, Wait
from ._reclaim import Reclaim, ReclaimPlan, plan_reclaim, shortfall
from ._tensors import buffer_bytes, copy_bytes, import_torch, resolve_dtype

if TYPE_CHECKING:
    from .._context import Buffer, ExecutionContext
    from .._queue import DeviceQueue, Submission
    from .._runtime import Runtime
    from ..devices.storage import StorageDevice

__all__ = (
    "ArrivalModel",
    "PageCorruptedError",
    "Page",
    "PageReleasedError",
    "PageUse",
    "Pager",
    "PagerStallError",
    "PagerStatistics",
    "PagerWait",
    "ReuseIntervals",
    "Tier",
    "UnknownPageError",
    "choose_page_outs",
)

DEFAULT_FILE_CAPACITY = 1 << 40
"""Bytes of file space a pager may address (the file grows only as far as it is used)."""

FILE_ALIGNMENT = 4096
"""Alignment of page extents in the file: the page size direct I/O and GDS want."""

DEFAULT_PREFETCH_MARGIN = 2.0
"""How many times its measured read and copy time a prefetch starts before the use."""

_RETRY_FIRST = 0.01
_RETRY_MAX = 1.0
# Seconds between tries of failed page-outs while an allocation's timeout allows: the
# first retry comes soon (a transient error), later ones back off to once a second.

_HOLDER: contextvars.ContextVar[object | None] = contextvars.ContextVar(
    "asyncfront_pager_holder", default=None
)
# Whom a pager operation acts for: set while an allocation waits, so the page-outs its
# reclaim runs in their own tasks count as the same holder as the pins of its caller.
_NO_TASK = object()


def _holder() -> object:
    """Whom the running pager operation acts for: the task that called it, by default."""
    holder = _HOLDER.get()
    if holder is None:
        holder = asyncio.current_task() or _NO_TASK
    return holder


class Tier(enum.Enum):
    """Where a page's data lives."""

    DEVICE = "device"
    HOST = "host"
    FILE = "file"


class PageCorruptedError(StorageReadError):
    """A page's bytes in the pager's file are not what its page-out wrote there.

    Raised by a page-in whose read found other bytes than the page-out's checksum says
    (flipped or zeroed bytes, a file cut short and grown again), or found the file cut
    short. The page stays where it was: in the file tier, its record intact, so a
    page-in can be tried again (after the file is repaired) or the page released.

    Attributes:
        page: the page's name.
        path / offset / expected: the file, the page's offset in it, its size.
        expected_checksum: the CRC32C the page-out wrote.
        actual_checksum: the CRC32C of the bytes read; None when the file was too short.
    """

    def __init__(
        self,
        page: str,
        path: str | os.PathLike[str],
        offset: int,
        nbytes: int,
        expected_checksum: int,
        actual_checksum: int | None,
        actual: int | None = None,
    ) -> None:
        if actual_checksum is not None:
            found = f"CRC32C {actual_checksum:#010x}, written as {expected_checksum:#010x}"
        else:
            found = f"the file ends {actual or 0:,} bytes into the page"
        super().__init__(path, offset, nbytes, nbytes if actual is None else actual, found)
        self.args = (
            f"page {page!r} is corrupted in its file: {nbytes:,} bytes at offset {offset:,} "
            f"of {os.fspath(path)!r}: {found}; the page stays in the file",
        )
        self.page = page
        self.expected_checksum = expected_checksum
        self.actual_checksum = actual_checksum


class PageReleasedError(RuntimeError):
    """A call named a page that was released: its data and its record are gone."""


class UnknownPageError(ValueError):
    """A call named a page this pager does not hold (another pager's page)."""


class Page:
    """A pageable block of mutable memory (created by :meth:`Pager.allocate`).

    Attributes:
        name: a label for logs and reprs.
        owner: whatever the caller tagged it with (a session id, a model name).
        context: the context whose device budget holds it while on the device.
        shape / dtype: what its tensor looks like (dtype as a torch dtype name).
        nbytes: its size.
        tier: where its data is now.
        semaphore: its timeline; replaced by a fresh one carrying the same value and
            frontier if a page-in failed it.
        pins: how many :meth:`Pager.use` blocks hold it.
    """

    def __init__(
        self,
        name: str,
        owner: object,
        context: ExecutionContext,
        shape: tuple[int, ...],
        dtype: str,
        nbytes: int,
        semaphore: TimelineSemaphore,
    ) -> None:
        self.name = name
        self.owner = owner
        self.context = context
        self.shape = shape
        self.dtype = dtype
        self.nbytes = nbytes
        self.semaphore = semaphore
        self.tier = Tier.DEVICE
        self.pins = 0
        self.released = False
        self._value = 0  # the last value handed out on the page's timeline
        self._transit: asyncio.Future[None] | None = None  # set while paging
        self._device: Buffer | None = None
        self._device_tensor: Any = None
        self._host: Buffer | None = None
        self._host_tensor: Any = None
        self._extent: Block | None = None
        self._checksum: int | None = None  # CRC32C of its bytes in the file tier
        # Foresight: when the next use is expected (runtime clock), the task bringing it
        # in, and whether its device or host copy is a prefetched, unused copy of its
        # file extent (kept until the first use, so evicting it writes nothing).
        self._expected: float | None = None
        self._prefetch: asyncio.Task[None] | None = None
        self._prefetch_moving = False  # its prefetch task is moving it now: let it finish
        self._clean = False
        self._last_use: float | None = None
        # Liveness: who holds its pins (a pin of a holder that waits in the pager stays
        # while it waits), whether its page-in now waits for device memory with its host
        # copy untouched (so the copy may go on to the file), and that move while it runs.
        self._holders: dict[object, int] = {}
        self._demotable = False
        self._demoting: asyncio.Future[None] | None = None

    @property
    def expected_at(self) -> float | None:
        """When its next use is expected (runtime clock), if :meth:`Pager.expect` said so."""
        return self._expected

    @property
    def prefetched(self) -> bool:
        """Whether its data was brought in ahead of a use that has not come yet."""
        return self._clean

    @property
    def in_transit(self) -> bool:
        """Whether a page-out or page-in is moving it now."""
        return self._transit is not None

    @property
    def ready(self) -> tuple[TimelineSemaphore, int]:
        """The ``(semaphore, value)`` after which every use and move so far is done."""
        return self.semaphore, self._value

    @property
    def frontier(self) -> Frontier:
        """The merged frontier of everything signalled on the page's timeline so far."""
        return self.semaphore.frontier

    @property
    def file_offset(self) -> int | None:
        """Where the page lies in the pager's file, while it is in the file tier."""
        return self._extent.offset if self._extent is not None else None

    def __repr__(self) -> str:
        state = "released" if self.released else self.tier.value
        if self.in_transit:
            state += " (moving)"
        return (
            f"<Page {self.name!r} {format_bytes(self.nbytes)} of {self.context.name!r} "
            f"{state} value={self._value} pins={self.pins}>"
        )


@dataclass(frozen=True)
class PageUse:
    """One use of a resident page: its tensor and the timeline values to wait and signal.

    Submit exactly one piece of work per use that waits on ``wait`` and signals
    ``signal`` (``waits=[use.wait], signals=[use.signal]``): that orders it after the
    page's previous uses and moves, and orders later moves after it.
    """

    page: Page
    tensor: Any
    wait: tuple[TimelineSemaphore, int]
    signal: tuple[TimelineSemaphore, int]


@dataclass(frozen=True)
class PagerWait:
    """One wait for memory inside the pager, as a stall report names it (plain values).

    Attributes:
        page: the page the memory is for (the one allocated, paged in, or paged out).
        purpose: ``"allocate"``, ``"page-in"``, ``"page-out"`` (its host staging or
            host copy, or its file extent) or ``"prefetch"``.
        tier: the tier the memory is asked of.
        context: the context whose budget is charged (the page file's name for the file
            tier).
        nbytes: the bytes asked.
        since: when the wait started (runtime clock).
    """

    page: str
    purpose: str
    tier: Tier
    context: str
    nbytes: int
    since: float

    def describe(self) -> str:
        """One line for logs and errors."""
        return (
            f"{self.purpose} of page {self.page!r} waits for {format_bytes(self.nbytes)} of "
            f"the {self.tier.value} tier ({self.context!r}) since t={self.since:.6g}"
        )


class PagerStallError(MemoryBudgetError):
    """Memory the pager waits for that nothing can free: the budgets cannot hold the work.

    Raised, instead of waiting forever, when a tier is short of the bytes a page needs
    and everything that could give them back is held by the pager's own waits: pages
    pinned by uses that themselves wait for memory, host copies of pages whose page-in
    waits, or a page file with no free extent. Nothing of the failed call stays
    charged, pinned or half moved.

    Attributes:
        tier: the tier that is short.
        page: the page the memory was for.
        needed: the bytes the tier lacks for it (beyond what is free now).
        waits: every wait in the pager at the time (plain values).
        held: the names of the pages whose memory stays because their holders wait.
        context / requested / limit / used / available: as for MemoryBudgetError (the
            file's name, size, capacity and bytes in use for the file tier).
    """

    def __init__(
        self,
        pager: str,
        tier: Tier,
        page: str,
        purpose: str,
        context: str,
        requested: int,
        limit: int,
        used: int,
        available: int,
        needed: int,
        held: tuple[str, ...],
        waits: tuple[PagerWait, ...],
    ) -> None:
        super().__init__(context, requested, limit, used, available, "stalled")
        shown = ", ".join(repr(name) for name in held[:8])
        if len(held) > 8:
            shown += f" and {len(held) - 8} more"
        holders = f": the rest is held by pages whose uses or moves wait themselves ({shown})"
        waiting = "; ".join(w.describe() for w in waits[:8])
        if len(waits) > 8:
            waiting += f"; and {len(waits) - 8} more"
        self.args = (
            f"pager {pager!r}: the {purpose} of page {page!r} needs {format_bytes(requested)} "
            f"on the {tier.value} tier ({context!r}: budget {format_bytes(limit)}, "
            f"{format_bytes(used)} in use, {format_bytes(available)} free), "
            f"{format_bytes(needed)} more than is free, and nothing can free them"
            f"{holders if held else ''}; waiting in the pager: {waiting or 'nothing'}",
        )
        self.tier = tier
        self.page = page
        self.needed = needed
        self.held = held
        self.waits = waits


@dataclass(frozen=True)
class PagerStatistics:
    """A snapshot of a pager: pages per tier, bytes moved, failures."""

    pages: int
    device_pages: int
    host_pages: int
    file_pages: int
    pinned: int
    page_outs: int
    page_ins: int
    bytes_out: int
    bytes_in: int
    failures: int
    prefetches: int = 0
    """Pages brought file → host ahead of an expected use."""
    prefetch_hits: int = 0
    """Uses that found their page brought in by a prefetch."""
    prefetch_wasted: int = 0
    """Prefetched pages evicted or released before any use (a wrong prediction)."""
    prefetch_failures: int = 0
    """Prefetches that failed (storage error, checksum, no memory in time)."""
    waiting: int = 0
    """Waits for memory inside the pager now (see :meth:`Pager.waits`)."""
    demotions: int = 0
    """Host copies of waiting page-ins moved on to the file to make host room."""
    stalls: int = 0
    """Waits that failed with :class:`PagerStallError` (nothing could free their memory)."""


def choose_page_outs(
    pages: Sequence[Page],
    needed: int,
    reclaimable: dict[str, float] | None = None,
    *,
    tier: Tier = Tier.DEVICE,
) -> ReclaimPlan[Page]:
    """Which pages to move out of ``tier`` to free ``needed`` bytes, least recent first.

    ``pages`` is in least-recently-used order; pinned pages and pages already moving
    are skipped. Nothing is chosen when all the movable pages would not suffice.
    """
    movable = [
        Reclaim(page, _charged_to(page), page.nbytes)
        for page in pages
        if page.tier is tier and not page.pins and not page.in_transit and not page.released
    ]
    return plan_reclaim(movable, needed, reclaimable)


def _dims(shape: object) -> tuple[int, ...]:
    """``shape`` as a tuple of non-negative ints, or a TypeError / ValueError saying why not."""
    if isinstance(shape, int) and not isinstance(shape, bool):
        shape = (shape,)
    if not isinstance(shape, Sequence) or isinstance(shape, str | bytes):
        raise TypeError(f"shape must be a sequence of ints, got {type(shape).__name__} {shape!r}")
    dims = []
    for dim in shape:
        if not isinstance(dim, int) or isinstance(dim, bool):
            raise TypeError(f"shape must hold ints, got {type(dim).__name__} {dim!r} in {shape!r}")
        if dim < 0:
            raise ValueError(f"shape dimensions must be >= 0, got {tuple(shape)}")
        dims.append(dim)
    return tuple(dims)


def _charged_to(page: Page) -> str:
    """The context whose budget holds the page's memory in its current tier."""
    if page.tier is Tier.HOST and page._host is not None:
        return page._host.context.name
    return page.context.name


def _death(sub: Submission) -> Frontier:
    """The frontier after which nothing but later work on its queue follows ``sub``."""
    return Frontier({sub.queue.axis: sub.epoch})


class ArrivalModel(Protocol):
    """Predicts when pages will be used again, so the pager brings them in ahead of time.

    The pager tells it of every use as it starts (:meth:`observe`) and of every page
    released (:meth:`forget`), and asks it (:meth:`predict`) whenever a page leaves the
    device; a prediction becomes a :meth:`Pager.expect`. It must keep plain values (page
    names, times), not the pages.
    """

    def observe(self, page: Page, now: float) -> None:
        """A use of ``page`` starts at ``now`` (runtime clock)."""

    def predict(self, page: Page, now: float) -> float | None:
        """When ``page`` will next be used (runtime clock), or None for no prediction."""

    def forget(self, page: Page) -> None:
        """``page`` was released: drop what is known of it."""


class ReuseIntervals:
    """An :class:`ArrivalModel`: a page returns after the mean of its past idle gaps.

    A gap between two uses of a page longer than ``min_gap`` seconds is an idle period
    (a user reading, an agent waiting for a tool); shorter gaps are one burst of work.
    The prediction is the last use plus the exponentially weighted mean of the page's
    idle periods (``weight`` for the newest); a page with no idle period yet has none.

    Args:
        min_gap: seconds between uses that count as an idle period.
        weight: the newest idle period's weight in the mean, in (0, 1].
    """

    def __init__(self, *, min_gap: float = 0.5, weight: float = 0.5) -> None:
        if isinstance(min_gap, bool) or not isinstance(min_gap, int | float):
            raise TypeError(f"min_gap must be seconds, got {min_gap!r}")
        if not (min_gap >= 0 and math.isfinite(min_gap)):
            raise ValueError(f"min_gap must be finite and >= 0 seconds, got {min_gap!r}")
        if isinstance(weight, bool) or not isinstance(weight, int | float):
            raise TypeError(f"weight must be a number, got {weight!r}")
        if not 0 < weight <= 1:
            raise ValueError(f"weight must be in (0, 1], got {weight!r}")
        self.min_gap = float(min_gap)
        self.weight = float(weight)
        self._last: dict[str, float] = {}  # page name -> its last use's start
        self._idle: dict[str, float] = {}  # page name -> mean idle period

    def observe(self, page: Page, now: float) -> None:
        """Record a use of ``page`` at ``now``; a long gap since the last one is an idle period."""
        last = self._last.get(page.name)
        if last is not None and now - last > self.min_gap:
            gap = now - last
            mean = self._idle.get(page.name)
            self._idle[page.name] = gap if mean is None else mean + self.weight * (gap - mean)
        self._last[page.name] = now

    def predict(self, page: Page, now: float) -> float | None:
        """The last use plus the mean idle period, or None before any idle period."""
        last, mean = self._last.get(page.name), self._idle.get(page.name)
        if last is None or mean is None:
            return None
        return last + mean

    def forget(self, page: Page) -> None:
        """Drop the page's history."""
        self._last.pop(page.name, None)
        self._idle.pop(page.name, None)

    def __repr__(self) -> str:
        return f"<ReuseIntervals min_gap={self.min_gap} pages={len(self._last)}>"


class _Wait:
    """A wait for memory in progress: who waits, for which page, where and how much."""

    __slots__ = ("context", "holder", "nbytes", "page", "purpose", "since", "tier")

    def __init__(
        self,
        holder: object,
        page: Page,
        purpose: str,
        tier: Tier,
        context: ExecutionContext | None,
        nbytes: int,
        since: float,
    ) -> None:
        self.holder = holder
        self.page = page
        self.purpose = purpose
        self.tier = tier
        self.context = context  # None for the file tier
        self.nbytes = nbytes
        self.since = since

    def record(self, file: str) -> PagerWait:
        name = file if self.context is None else self.context.name
        return PagerWait(self.page.name, self.purpose, self.tier, name, self.nbytes, self.since)


class Pager:
    """Pages mutable blocks between device memory, host memory and a file.

    Args:
        runtime: the runtime whose budgets and queues it uses.
        host: the context whose budget holds host copies and staging buffers; it must
            be on another device than the pages it serves.
        copy: the queue that copies between device and host memory.
        storage: a queue of a :class:`~asyncfront.devices.StorageDevice`: page files
            are written and read there, on its own axis.
        file: the page file's name on the storage device.
        spill: where memory pressure sends pages (``Tier.FILE`` or ``Tier.HOST``).
        direct: move pages between device memory and the file without the host tier
            where the storage device reaches device memory (host memory; CUDA memory
            through KvikIO, that is GPUDirect Storage). False: always device → host
            → file and back, the copy queue moving device ↔ host.
        file_capacity: bytes of file space it may use.
        verify: checksum every page written to the file (CRC32C) and check it when the
            page is read back, so changed bytes raise :class:`PageCorruptedError`
            instead of coming back as data. False leaves that to the filesystem.
        name: a label for logs, queue-free.
        arrivals: predicts when a page that leaves the device is used next; each
            prediction is an :meth:`expect` (see :class:`ReuseIntervals`).
        prefetch_margin: a prefetch starts this many times its measured read and copy
            time before the expected use (>= 1); before anything was measured it starts
            at once.
        prefetch_evicts: whether a prefetch's host → device step may page out device
            pages that nobody expects sooner (least recently used first). False (the
            default): it takes only free device memory, and otherwise leaves the page in
            host memory for the use to copy in; evicting for a guess can push out a page
            an unpredicted use needs next.
    """

    def __init__(
        self,
        runtime: Runtime,
        *,
        host: ExecutionContext,
        copy: DeviceQueue,
        storage: DeviceQueue,
        file: str | os.PathLike[str] = "pages.bin",
        spill: Tier = Tier.FILE,
        direct: bool = False,
        file_capacity: int = DEFAULT_FILE_CAPACITY,
        verify: bool = True,
        name: str = "pager",
        arrivals: ArrivalModel | None = None,
        prefetch_margin: float = DEFAULT_PREFETCH_MARGIN,
        prefetch_evicts: bool = False,
    ) -> None:
        from ..devices.storage import StorageDevice

        if (
            isinstance(prefetch_margin, bool)
            or not isinstance(prefetch_margin, int | float)
            or not (1 <= prefetch_margin < math.inf)
        ):
            raise ValueError(
                f"prefetch_margin must be a finite number >= 1, got {prefetch_margin!r}"
            )

        if not isinstance(storage.device, StorageDevice):
            raise TypeError(f"storage queue {storage.name!r} is not on a StorageDevice")
        if spill is Tier.DEVICE:
            raise ValueError("spill must be Tier.HOST or Tier.FILE")
        self.runtime = runtime
        self.host = host
        self.copy = copy
        self.storage = storage
        self._storage_device: StorageDevice = storage.device
        self.file = file
        self.spill = spill
        self.direct = direct
        self.verify = verify
        self.name = name
        self._file_space = BufferPool(
            file_capacity, alignment=FILE_ALIGNMENT, completed=runtime, name=os.fspath(file)
        )
        self._lru: OrderedDict[Page, None] = OrderedDict()
        self._returned: asyncio.Future[None] | None = None  # set when the pager's state changes
        self._waits: list[_Wait] = []  # waits for memory in progress, oldest first
        self._demotions = self._stalls = 0
        self._count = 0
        self._page_outs = self._page_ins = self._bytes_out = self._bytes_in = 0
        self._failures = 0
        self.arrivals = arrivals
        self.prefetch_margin = float(prefetch_margin)
        self.prefetch_evicts = bool(prefetch_evicts)
        self._prefetching: set[asyncio.Task[None]] = set()
        self._prefetch_reads: DeviceQueue | None = None  # created by the first prefetch
        self._prefetches = self._prefetch_hits = self._prefetch_wasted = 0
        self._prefetch_failures = 0
        # Measured seconds per byte of a file read and of a host <-> device copy.
        self._read_rate: float | None = None
        self._copy_rate: float | None = None
        self._closed = False
        runtime.on_memory_pressure(self._on_memory_pressure)

    # -- pages -----------------------------------------------------------------------

    async def allocate(
        self,
        context: ExecutionContext,
        shape: Sequence[int],
        dtype: Any,
        *,
        owner: object = None,
        name: str | None = None,
        timeout: float | None = None,
    ) -> Page:
        """A new page of ``shape`` and ``dtype`` on ``context``'s device (uninitialised).

        Its memory is charged to ``context``; if that goes over the context's own
        budget, or the device is full, the least recently used pages that help are
        paged out first.

        Args:
            context: the context whose device and budget hold the page.
            shape: the page tensor's shape (non-negative ints, at least one byte).
            dtype: a ``torch.dtype`` or its name (``"float16"``).
            owner: a tag for the caller (a session id, a model name).
            name: a label for logs; default ``"<owner>#<n>"``.
            timeout: seconds the call may wait for memory. Without one, a page-out that
                fails (a full disk) fails the allocation at once with its error; with
                one, the failed page-outs are retried until the timeout, so the
                allocation succeeds if the disk recovers in time.

        Raises:
            StorageError: the page-outs that would make room failed (the last error);
                the pages stay resident and intact.
            PagerStallError: nothing can ever free the memory (every byte that could
                is held by pages whose uses or moves wait themselves, or the page
                file is full); raised at once, with the tier, budget and bytes.
            MemoryBudgetError: the budget cannot hold the page, or no memory was freed
                within ``timeout``.
            ValueError / TypeError: a bad ``shape``, ``dtype`` or ``timeout`` (nothing
                changes).
        """
        self._check_open()
        if timeout is not None and (
            isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout >= 0
        ):  # (not >= 0 refuses NaN too)
            raise ValueError(f"timeout must be None or seconds >= 0, got {timeout!r}")
        if context.device is self.host.device:
            raise ValueError(
                f"context {context.name!r} is on the host tier's device {context.device.name!r}; "
                "pages live on another device than their host copies"
            )
        torch_dtype = resolve_dtype(dtype)
        dims = _dims(shape)
        nbytes = math.prod(dims) * torch_dtype.itemsize
        if nbytes <= 0:
            raise ValueError(f"a page needs at least one byte, got shape {dims}")
        self._count += 1
        label = (
            name if name is not None else f"{owner if owner is not None else 'page'}#{self._count}"
        )
        sem = self.runtime.semaphore(name=f"page:{label}")
        page = Page(
            label, owner, context, dims, str(torch_dtype).removeprefix("torch."), nbytes, sem
        )
        loop = asyncio.get_running_loop()
        page._transit = loop.create_future()
        try:
            deadline = None if timeout is None else loop.time() + timeout
            page._device = await self._allocate(context, page, deadline, purpose="allocate")
        finally:
            self._settle(page)
        page._device_tensor = self._typed(buffer_bytes(page._device), page)
        self._lru[page] = None
        return page

    @asynccontextmanager
    async def use(self, page: Page) -> AsyncIterator[PageUse]:
        """Pin the page on its device for the block, paging it in first if needed.

        Yields the page's tensor and the ``(semaphore, value)`` pairs the one piece of
        work using it waits on and signals. A page-in's read and copy are on the page's
        timeline, so that work's frontier carries the storage and copy axes.

        Raises:
            PageCorruptedError: the page's bytes in the file changed since its page-out;
                it stays in the file, its record intact.
            StorageError: the page-in failed; the page stays in the file, intact.
            PagerStallError: the page-in's memory can never come free (say, the task
                already pins as many pages as the device budget holds); the page stays
                where it was.
        """
        self._check_page(page)
        now = self.runtime.now()
        if self.arrivals is not None:
            self.arrivals.observe(page, now)
        page._expected = None  # the expected use has come
        page._last_use = now
        if page._prefetch is not None and page._transit is None:
            page._prefetch.cancel()  # not moving it: this use pages it in itself
        holder = _holder()
        page.pins += 1
        page._holders[holder] = page._holders.get(holder, 0) + 1
        try:
            while page.tier is not Tier.DEVICE or page._transit is not None:
                if page._transit is not None:
                    await asyncio.wait([page._transit])
                else:
                    await self.page_in(page)
            if page._clean:
                # The first use of a prefetched copy: from now on the device copy is the
                # data, and the file extent it came from is free.
                self._prefetch_hits += 1
                self._drop_clean_extent(page)
            value = page._value
            page._value = value + 1
            self._lru.move_to_end(page)
            yield PageUse(
                page, page._device_tensor, (page.semaphore, value), (page.semaphore, value + 1)
            )
        finally:
            page.pins -= 1
            left = page._holders.pop(holder, 1) - 1
            if left:
                page._holders[holder] = left
            if not page.released:
                self._lru.move_to_end(page)
            self._changed()  # an allocation waiting for this pin may take the page now

    async def release(self, page: Page) -> None:
        """Free the page in every tier once its uses are done; its data is gone."""
        self._check_page(page)
        if page.pins or page._transit is not None:
            raise RuntimeError(f"{page!r} is in use or moving; cannot release it")
        if page._prefetch is not None:
            page._prefetch.cancel()
        page._transit = asyncio.get_running_loop().create_future()
        try:
            sem, value = page.ready
            try:
                await sem.wait(value)  # the last use has run: its frontier is the death frontier
                death = sem.frontier
            except SemaphoreFailedError:  # a use failed: whatever its context queued is done then
                death = sem.frontier.merge(page.context.death_frontier())
        finally:
            self._settle(page)
        page.released = True
        del self._lru[page]
        if page._clean:
            self._prefetch_wasted += 1
            page._clean = False
        page._expected = None
        if self.arrivals is not None:
            self.arrivals.forget(page)
        if page._device is not None:
            self._free(page._device, death)
        if page._host is not None:
            self._free(page._host, death)
        if page._extent is not None:
            self._free_extent(page._extent, death)
        page._device = page._host = page._extent = page._checksum = None
        page._device_tensor = page._host_tensor = None

    # -- moving pages ----------------------------------------------------------------

    async def page_out(self, page: Page, tier: Tier = Tier.FILE) -> None:
        """Move the page out of device memory to ``tier`` (or from the host to the file).

        Returns once the data is safely in ``tier`` and the memory it left is freed.

        Raises:
            RuntimeError: the page is pinned by a use or already moving.
            StorageError / MemoryBudgetError / SemaphoreFailedError: a step failed; the
                page keeps its data where it was, usable, and nothing is leaked
                (:class:`PagerStallError`, a MemoryBudgetError, when the page file is
                full and nothing moving can give an extent back).
        """
        self._check_page(page)
        if tier is Tier.DEVICE:
            raise ValueError("page_out moves pages to Tier.HOST or Tier.FILE")
        if page.pins or page._transit is not None:
            raise RuntimeError(f"{page!r} is pinned or moving; cannot page it out")
        if page.tier is Tier.FILE or page.tier is tier:
            return
        page._transit = asyncio.get_running_loop().create_future()
        was_clean = page._clean
        try:
            if page.tier is Tier.DEVICE:
                await self._out_of_device(page, tier)
            else:
                await self._host_to_file(page)
        except BaseException as exc:
            self._failures += 1
            self._log("page_out_failed", page, error=f"{type(exc).__name__}: {exc}")
            raise
        finally:
            self._settle(page)
        if was_clean and cast(Tier, page.tier) is Tier.FILE:
            # A prefetch for nothing (or too early): forget the prediction rather than
            # bring the page back into the pressure that just pushed it out.
            page._expected = None
            return
        self._foresee_after_page_out(page)

    async def page_in(self, page: Page) -> None:
        """Bring the page back to device memory; returns once its data is there.

        Usually implicit: :meth:`use` pages in what it needs.
        """
        self._check_page(page)
        if page.tier is Tier.DEVICE:
            return
        if page._transit is not None:
            raise RuntimeError(f"{page!r} is moving; wait for it with use()")
        page._transit = asyncio.get_running_loop().create_future()
        try:
            await self._into_device(page)
        except BaseException as exc:
            self._failures += 1
            self._log("page_in_failed", page, error=f"{type(exc).__name__}: {exc}")
            raise
        finally:
            self._settle(page)

    async def _out_of_device(self, page: Page, tier: Tier) -> None:
        if page._clean and tier is Tier.FILE:
            self._evict_clean(page)
            return
        storage = self._storage_device
        value = page._value
        device_bytes = self._raw(page._device_tensor)
        direct = tier is Tier.FILE and self._direct(device_bytes)
        staging: Buffer | None = None
        extent: Block | None = None
        copy: Submission | None = None
        write: Submission | None = None
        out = self.runtime.semaphore(name=f"{page.semaphore.name}.out")
        try:
            after = (page.semaphore, value)  # after the page's last use
            source = device_bytes
            if not direct:
                staging = await self._allocate(self.host, page, purpose="page-out")
                source = buffer_bytes(staging)
                copy = self.copy.submit(
                    copy_bytes,
                    source,
                    device_bytes,
                    waits=[after],
                    signals=[(out, 1)],
                    name=f"page-out copy {page.name}",
                )
                after = (out, 1)
            if tier is Tier.FILE:
                extent = await self._file_extent(page)
                write = storage.write(
                    self.storage,
                    source,
                    self.file,
                    extent.offset,
                    waits=[after],
                    signals=[(out, 2)],
                    name=f"page-out write {page.name}",
                    checksum=self.verify,
                )
            if copy is not None:
                await copy
            written = await write if write is not None else None
            checksum = written if self.verify else None  # else the write returns a count
        except BaseException:
            # The device copy was never touched: the page stays resident and usable.
            if staging is not None:
                self._free(staging, _death(write or copy) if copy is not None else Frontier())
            if extent is not None:
                self._free_extent(extent, _death(write) if write is not None else Frontier())
            raise
        last = write or copy
        assert last is not None and last.frontier is not None
        page.semaphore.signal(value + 1, last.frontier)
        page._value = value + 1
        # Only now, with the data signalled safe in its new tier, free the device copy.
        assert page._device is not None
        self._free(page._device, _death(copy or last))
        page._device = page._device_tensor = None
        if write is not None:
            if staging is not None:
                self._free(staging, _death(write))
            page._extent, page._checksum = extent, checksum
            page.tier = Tier.FILE
        else:
            page._host, page._host_tensor = staging, source
            page.tier = Tier.HOST
        self._page_outs += 1
        self._bytes_out += page.nbytes
        self._log("page_out", page, tier=page.tier.value, frontier=repr(last.frontier))

    async def _host_to_file(self, page: Page) -> None:
        if page._clean:
            self._evict_clean(page)
            return
        value = page._value
        extent = await self._file_extent(page)
        out = self.runtime.semaphore(name=f"{page.semaphore.name}.out")
        write = self._storage_device.write(
            self.storage,
            page._host_tensor,
            self.file,
            extent.offset,
            waits=[(page.semaphore, value)],
            signals=[(out, 1)],
            name=f"page-out write {page.name}",
            checksum=self.verify,
        )
        try:
            written = await write
        except BaseException:
            self._free_extent(extent, _death(write))
            raise
        assert write.frontier is not None
        page.semaphore.signal(value + 1, write.frontier)
        page._value = value + 1
        assert page._host is not None
        self._free(page._host, _death(write))
        page._host = page._host_tensor = None
        page._extent = extent
        page._checksum = written if self.verify else None  # else the write returns a count
        page.tier = Tier.FILE
        self._page_outs += 1
        self._bytes_out += page.nbytes
        self._log("page_out", page, tier="file", frontier=repr(write.frontier))

    async def _into_device(self, page: Page) -> None:
        device: Buffer | None = None
        staging: Buffer | None = None
        read: Submission | None = None
        copy: Submission | None = None
        try:
            # While it waits for device memory, its host copy is untouched: a host tier
            # that fills with such pages moves one on to the file (see _demote_for).
            page._demotable = page.tier is Tier.HOST
            try:
                device = await self._allocate(page.context, page, purpose="page-in")
            finally:
                page._demotable = False
                demoting = page._demoting
                if demoting is not None:
                    await asyncio.wait([demoting])
            sem, value = page.semaphore, page._value  # a move on to the file advanced it
            device_bytes = buffer_bytes(device)
            host_bytes = page._host_tensor
            if page.tier is Tier.FILE:
                assert page._extent is not None
                direct = self._direct(device_bytes)
                if not direct:
                    staging = await self._allocate(self.host, page, purpose="page-in")
                    host_bytes = buffer_bytes(staging)
                read = self._storage_device.read(
                    self.storage,
                    device_bytes if direct else host_bytes,
                    self.file,
                    page._extent.offset,
                    waits=[(sem, value)],  # the value the page-out signalled
                    signals=[(sem, value + 1)],
                    name=f"page-in read {page.name}",
                    checksum=page._checksum,
                )
                value += 1
            if host_bytes is not None:
                copy = self.copy.submit(
                    copy_bytes,
                    device_bytes,
                    host_bytes,
                    waits=[(sem, value)],
                    signals=[(sem, value + 1)],
                    name=f"page-in copy {page.name}",
                )
                value += 1
            if read is not None:
                await read  # its own error, rather than the copy's failed wait
            if copy is not None:
                await copy
        except BaseException as exc:
            # The data is still in its tier: give back what the attempt took, and give
            # the page a fresh timeline if this one failed or ran ahead.
            last = copy or read
            if device is not None:
                self._free(device, _death(last) if last is not None else Frontier())
            if staging is not None:
                self._free(staging, _death(last) if last is not None else Frontier())
            self._rearm(page)
            corrupted = self._corrupted(page, exc)
            if corrupted is not None:
                raise corrupted from exc
            raise
        last = copy or read
        assert last is not None and last.frontier is not None
        page._value = value
        if read is not None:  # from the file: the extent (and any staging) is done
            assert page._extent is not None
            if staging is not None:
                self._free(staging, _death(last))
            self._free_extent(page._extent, _death(read))
            page._extent = page._checksum = None
        else:
            assert page._host is not None
            self._free(page._host, _death(last))
            page._host = page._host_tensor = None
        page._device = device
        page._device_tensor = self._typed(device_bytes, page)
        page.tier = Tier.DEVICE
        self._measure(read, copy, page.nbytes)
        self._page_ins += 1
        self._bytes_in += page.nbytes
        self._log("page_in", page, frontier=repr(last.frontier))

    def _corrupted(self, page: Page, exc: BaseException) -> PageCorruptedError | None:
        """The page-in error for bytes in the file that are not the page's, if ``exc`` is one."""
        if page._checksum is None or page._extent is None:
            return None
        path = self._storage_device.resolve(self.file)
        offset = page._extent.offset
        if isinstance(exc, ChecksumError):
            return PageCorruptedError(
                page.name, path, offset, page.nbytes, page._checksum, exc.actual_checksum
            )
        if isinstance(exc, ShortReadError):
            return PageCorruptedError(
                page.name, path, offset, page.nbytes, page._checksum, None, exc.actual
            )
        return None

    def _rearm(self, page: Page) -> None:
        """After a failed page-in: a fresh semaphore at the page's value and frontier."""
        old = page.semaphore
        if old.failure is None and old.value == page._value:
            return
        fresh = self.runtime.semaphore(name=old.name)
        if page._value:
            fresh.signal(page._value, old.frontier)
        page.semaphore = fresh

    async def _allocate(
        self,
        context: ExecutionContext,
        page: Page,
        deadline: float | None = None,
        *,
        purpose: str,
        demote: bool = True,
    ) -> Buffer:
        """Memory for ``page`` through ``context``'s budget (its device's, or the host's).

        Over the context's own budget, or on a full device, the least recently used
        pages that help go out first (the memory manager would refuse or wait), or,
        when other pages are moving (holding staging buffers they are about to give
        back), the allocation waits for them. When the page-outs that would make room
        fail and nothing else is moving, the allocation fails with their error, unless
        a ``deadline`` (loop time) leaves time to try them again: a full disk may
        recover. Any shortfall left goes to the memory manager, within the deadline.

        Liveness: moves that wait for memory themselves do not count as moving. A host
        tier full of pages whose page-ins wait for device memory moves the host copies
        of some of them on to the file (``demote``). A wait that only pages pinned by
        running uses can end waits for their pins to drop; one that nothing can end
        (every byte that could help is held by the pager's own waits) raises
        :class:`PagerStallError` at once. The wait is listed in :meth:`waits` meanwhile.
        """
        loop = asyncio.get_running_loop()
        tier = Tier.HOST if context.device is self.host.device else Tier.DEVICE
        wait = _Wait(_holder(), page, purpose, tier, context, page.nbytes, self.runtime.now())
        token = _HOLDER.set(wait.holder)
        self._waits.append(wait)
        self._changed()  # another wait may see now that nothing can end it
        try:
            retry_delay = _RETRY_FIRST
            while True:
                charge = self.runtime._memory.charge_for(context, page.nbytes)
                if charge > context.usage().limit:
                    break  # no amount of paging helps: let the memory manager say why
                needed, _ = shortfall(self.runtime, context, page.nbytes)
                if needed <= 0:
                    break
                freed, failures = await self._reclaim(context, page.nbytes)
                if freed:
                    retry_delay = _RETRY_FIRST
                    continue
                moving = self._moving(page, itself=True)
                if not moving and demote and tier is Tier.HOST:
                    freed, errors = await self._demote_for(context, page.nbytes)
                    if freed:
                        retry_delay = _RETRY_FIRST
                        continue
                    failures += errors
                    moving = self._moving(page, itself=True)
                remaining = None if deadline is None else deadline - loop.time()
                if failures and not moving:
                    if remaining is None or remaining <= 0:
                        raise failures[-1]
                    # Nothing will free memory by itself: try the page-outs again later.
                    await asyncio.sleep(min(retry_delay, remaining))
                    retry_delay = min(retry_delay * 2, _RETRY_MAX)
                    continue
                if not moving:
                    stall, pinned = self._prospect(wait)
                    if stall is not None:
                        self._stalls += 1
                        self._log("page_stall", page, error=str(stall))
                        raise stall
                    if not pinned:
                        break  # only other owners' memory can help: the memory manager waits
                if remaining is not None and remaining <= 0:
                    break
                # Something moving, or a use's pin, will change what can be freed.
                if self._returned is None:
                    self._returned = loop.create_future()
                await asyncio.wait([self._returned], timeout=remaining)
            remaining = None if deadline is None else max(0.0, deadline - loop.time())
            # The copy and storage queues write this memory, not the context's queue: the
            # pool must not take the context queue's history as proof the old data is dead.
            return await self.runtime._memory.allocate(
                context, page.nbytes, owner=page, requester=Frontier(), timeout=remaining
            )
        finally:
            self._waits.remove(wait)
            _HOLDER.reset(token)
            self._changed()

    def _moving(self, page: Page, *, itself: bool = False) -> bool:
        """Whether another page's move is in flight and will end by itself.

        A move waiting for memory in the pager (its page is in :meth:`waits`) does not
        count: it ends only when memory comes back, so waiting for it could wait for
        oneself. A host copy going on to the file does count, ``page``'s own too when
        ``itself`` (its page-in waits beside that move, which frees host memory for it).
        """
        waiting = {w.page for w in self._waits}
        return any(
            (p is not page and p._transit is not None and p not in waiting)
            or (p._demoting is not None and (itself or p is not page))
            for p in self._lru
        )

    def _prospect(self, target: _Wait) -> tuple[PagerStallError | None, bool]:
        """Whether anything may ever end ``target``; called when nothing is moving.

        Returns the error to raise when nothing can (else None), and whether pages
        pinned by running uses (holders not waiting in the pager) or moving could help,
        so the wait must wait for the pager's own events rather than for other owners'
        frees (the memory manager's wait).

        A fixpoint over the waits in the pager: every wait starts stuck; a wait whose
        shortfall the bytes not held by stuck waits could cover (idle pages, pages
        pinned by running holders, other owners' buffers; another context's only above
        its reservation) is not, and its holder's pins and its page's memory then count
        as freeable for the others. What stays stuck at the end never ends by itself.
        """
        waits = [w for w in self._waits if w.context is not None]
        stuck = set(self._waits)  # a wait for file space ends only by a move or a release
        changed = True
        while changed:
            changed = False
            for w in waits:
                if w in stuck and self._coverable(w, stuck)[0]:
                    stuck.discard(w)
                    changed = True
        coverable, pinned, held = self._coverable(target, stuck)
        if coverable or target not in stuck:
            return None, pinned
        context = target.context
        assert context is not None
        ledger = self.runtime._memory._memory(context.device).ledger
        used, _, limit = ledger.usage(context.name)
        needed, _ = shortfall(self.runtime, context, target.nbytes)
        error = PagerStallError(
            self.name,
            target.tier,
            target.page.name,
            target.purpose,
            context.name,
            target.nbytes,
            limit,
            used,
            ledger.available_to(context.name),
            needed,
            held,
            tuple(w.record(os.fspath(self.file)) for w in self._waits),
        )
        return error, pinned

    def _coverable(self, wait: _Wait, stuck: set[_Wait]) -> tuple[bool, bool, tuple[str, ...]]:
        """Whether memory not held by ``stuck`` waits could cover ``wait``'s shortfall.

        Also says whether pages pinned by running holders count among it, and names the
        pages whose memory the stuck waits hold on the wait's device.
        """
        context = wait.context
        assert context is not None
        needed, reclaimable = shortfall(self.runtime, context, wait.nbytes)
        if needed <= 0:
            return True, False, ()
        holders = {w.holder for w in stuck}
        pages = {w.page for w in stuck}
        candidates: list[Reclaim[object]] = []
        held: list[str] = []
        pinned = False
        for ctx in self.runtime._memory.contexts:
            if ctx.device is not context.device:
                continue
            for buf in ctx._buffers:
                owner = buf.owner
                if isinstance(owner, Page):
                    # A waiting page-in's host copy can go on to the file (_demote_for).
                    movable_on = owner._demotable and owner._demoting is None and buf is owner._host
                    if not movable_on and (
                        owner in pages or (owner.pins and holders.issuperset(owner._holders))
                    ):
                        held.append(owner.name)
                        continue  # stays while its move or its holders wait
                    # A pin dropping or a move ending wakes the pager, not the manager.
                    pinned = pinned or owner.pins > 0 or owner._transit is not None
                candidates.append(Reclaim(buf, ctx.name, buf._charge))
        plan = plan_reclaim(candidates, needed, reclaimable)
        return plan.sufficient, pinned, tuple(dict.fromkeys(held))

    async def _demote_for(
        self, context: ExecutionContext, nbytes: int
    ) -> tuple[int, list[Exception]]:
        """Move host copies of page-ins waiting for device memory on to the file.

        The last of this pager's host pages to start waiting go first (the earlier ones
        keep their place). Returns the bytes freed and the errors of moves that failed
        (those pages keep their host copies).
        """
        needed, reclaimable = shortfall(self.runtime, context, nbytes)
        if needed <= 0:
            return 0, []
        order = [
            w.page
            for w in reversed(self._waits)
            if w.page._demotable
            and w.page._demoting is None
            and w.page.tier is Tier.HOST
            and w.page._host is not None
        ]
        order = list(dict.fromkeys(order))
        plan = plan_reclaim(
            [Reclaim(p, _charged_to(p), p.nbytes) for p in order], needed, reclaimable
        )
        if not plan.victims:
            return 0, []
        outcomes = await asyncio.gather(
            *(self._demote(p) for p in plan.victims), return_exceptions=True
        )
        freed = 0
        failures: list[Exception] = []
        for page, outcome in zip(plan.victims, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                if not isinstance(outcome, Exception):
                    raise outcome
                failures.append(outcome)
                continue
            freed += page.nbytes
        return freed, failures

    async def _demote(self, page: Page) -> None:
        """Write a waiting page-in's host copy to the file and free it; the page-in reads it."""
        done = page._demoting = asyncio.get_running_loop().create_future()
        page._demotable = False
        try:
            await self._host_to_file(page)
        except BaseException as exc:
            self._failures += 1
            self._log("page_out_failed", page, error=f"{type(exc).__name__}: {exc}")
            raise
        finally:
            page._demoting = None
            done.set_result(None)
            self._changed()
        self._demotions += 1
        self._log("page_demoted", page, tier="file")

    async def _file_extent(self, page: Page) -> Block:
        """An extent of the page file for ``page``, or PagerStallError when none can free.

        A full file waits while other moves are in flight (a page-in from the file gives
        its extent back); with nothing moving, only a release could free one, so it
        fails at once, naming the file, its capacity and the bytes asked.
        """
        space = self._file_space
        name = os.fspath(self.file)
        wait = _Wait(_holder(), page, "page-out", Tier.FILE, None, page.nbytes, self.runtime.now())
        registered = False
        try:
            while True:
                requester = self._storage_requester()
                decision = space.try_allocate(page.nbytes, requester)
                if isinstance(decision, Block):
                    return decision
                if isinstance(decision, Wait):  # a freed extent whose last write is in flight
                    await self.runtime.wait_completed(decision.frontier)
                    continue
                if not self._moving(page):
                    stats = space.statistics()
                    free = stats.bytes_cached + stats.bytes_fresh
                    self._stalls += 1
                    self._log("page_stall", page, tier="file", requested=page.nbytes)
                    waits = [w.record(name) for w in self._waits]
                    if not registered:
                        waits.append(wait.record(name))
                    raise PagerStallError(
                        self.name,
                        Tier.FILE,
                        page.name,
                        "page-out",
                        name,
                        page.nbytes,
                        space.capacity,
                        space.capacity - free,
                        free,
                        page.nbytes - decision.largest_free,
                        tuple(p.name for p in self._lru if p._extent is not None and p is not page),
                        tuple(waits),
                    )
                if not registered:
                    # While it waits, its page counts as waiting, not moving, for the others.
                    self._waits.append(wait)
                    registered = True
                    self._changed()
                # A page-in from the file (or a release) may give an extent back.
                if self._returned is None:
                    self._returned = asyncio.get_running_loop().create_future()
                await asyncio.wait([self._returned])
        finally:
            if registered:
                self._waits.remove(wait)
                self._changed()

    def _free(self, buffer: Buffer, death: Frontier) -> None:
        """Give a buffer back and wake allocations waiting for the pager's memory."""
        self.runtime._memory.free(buffer, death)
        self._changed()

    def _free_extent(self, extent: Block, death: Frontier) -> None:
        """Give a file extent back and wake what waits for file space."""
        self._file_space.free(extent, death)
        self._changed()

    def _changed(self) -> None:
        """Wake the pager's waits: memory came back, a move ended, a pin dropped."""
        returned, self._returned = self._returned, None
        if returned is not None and not returned.done():
            returned.set_result(None)

    def waits(self) -> tuple[PagerWait, ...]:
        """Every wait for memory in the pager now, oldest first (plain values).

        A stall report: each names the page, what the memory is for, the tier, the
        budget's context and the bytes.
        """
        name = os.fspath(self.file)
        return tuple(w.record(name) for w in self._waits)

    # -- foresight -------------------------------------------------------------------

    def expect(self, page: Page, *, at: float | None = None, after: float | None = None) -> float:
        """Say that ``page`` will be used at ``at`` (runtime clock) or ``after`` seconds from now.

        A page out of device memory is then brought in ahead of the use: read file →
        host about ``prefetch_margin`` times its measured read and copy time before,
        and copied host → device shortly before if the device has free room (with
        ``prefetch_evicts``, paging out least recently used device pages that nobody
        expects sooner); otherwise the use finds it in host memory and pays only the
        copy. A page on the device keeps the expectation: if
        it is paged out before then, it is brought back. A later call replaces the
        expectation; :meth:`forget` drops it. A prediction that proves wrong costs only
        memory within the budgets: the prefetched copy is clean, evicted first and
        without writing.

        Returns:
            The expected time, on the runtime clock.

        Raises:
            TypeError: not exactly one of ``at`` and ``after``, or one is not a number.
            ValueError: a value that is not finite, or ``after`` < 0.
            PageReleasedError: the page was released.
            UnknownPageError: the page belongs to another pager.
            RuntimeError: the pager is closed.
        """
        self._check_page(page)
        when = self._expected_time(at, after)
        self._cancel_prefetch(page)
        page._expected = when
        if page.tier is not Tier.DEVICE or page._transit is not None:
            self._start_prefetch(page, when)
        self._log("page_expected", page, at=when, tier=page.tier.value)
        return when

    def forget(self, page: Page) -> None:
        """Drop the page's expected use; a prefetch not yet moving it is called off.

        Raises:
            PageReleasedError / UnknownPageError / RuntimeError: as :meth:`expect`.
        """
        self._check_page(page)
        page._expected = None
        self._cancel_prefetch(page)

    def _expected_time(self, at: object, after: object) -> float:
        """The runtime-clock time that ``at=`` or ``after=`` names (exactly one of them)."""
        if (at is None) == (after is None):
            raise TypeError(
                f"expect takes exactly one of at= (runtime clock) and after= (seconds from "
                f"now), got at={at!r}, after={after!r}"
            )
        name, value = ("at", at) if at is not None else ("after", after)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(
                f"expect: {name}= must be seconds, got {type(value).__name__} {value!r}"
            )
        if not math.isfinite(value):
            raise ValueError(f"expect: {name}= must be finite, got {value!r}")
        if name == "after":
            if value < 0:
                raise ValueError(f"expect: after= must be >= 0 seconds, got {value!r}")
            return self.runtime.now() + float(value)
        return float(value)

    def _start_prefetch(self, page: Page, when: float) -> None:
        task = asyncio.get_running_loop().create_task(
            self._foresee(page, when), name=f"asyncfront:prefetch {page.name}"
        )
        page._prefetch = task
        self._prefetching.add(task)
        task.add_done_callback(self._prefetching.discard)

    def _cancel_prefetch(self, page: Page) -> None:
        """Call off the page's prefetch unless it is moving the page now."""
        task, page._prefetch = page._prefetch, None
        if task is not None and not page._prefetch_moving:
            task.cancel()

    def _foresee_after_page_out(self, page: Page) -> None:
        """After a page-out: bring the page back for its expected (or predicted) use."""
        if page.released or page.tier is Tier.DEVICE or page._prefetch is not None:
            return
        now = self.runtime.now()
        when = page._expected
        if when is None and self.arrivals is not None:
            when = self.arrivals.predict(page, now)
            if when is not None and math.isfinite(when) and when > now:
                page._expected = when
                self._log("page_predicted", page, at=when)
            else:
                when = None
        if when is not None and when > now:
            self._start_prefetch(page, when)

    async def _foresee(self, page: Page, when: float) -> None:
        """The prefetch task: file → host, then host → device, each as late as is safe."""
        task = asyncio.current_task()
        _HOLDER.set(None)  # it acts for itself, not for the operation that started it
        slept = False  # once per step: a clock with coarse resolution may wake a hair early
        try:
            while not (self._closed or page.released) and page._expected == when:
                if page.tier is Tier.DEVICE and page._transit is None:
                    return
                if page._transit is not None:
                    await asyncio.wait([page._transit])
                    continue
                if page.pins:
                    return  # a use is paging it in itself
                start = when - self._lead(page, from_file=page.tier is Tier.FILE)
                now = self.runtime.now()
                if now < start and not slept:
                    await asyncio.sleep(start - now)
                    slept = True
                    continue
                page._prefetch_moving = True
                try:
                    if page.tier is Tier.FILE:
                        await self._prefetch_to_host(page)
                        slept = False
                        continue
                    if not await self._make_room_on_device(page, when):
                        return  # the use finds it in host memory and pays only the copy
                    await self.page_in(page)
                    self._lru.move_to_end(page, last=False)  # unused: evicted first
                    return
                finally:
                    page._prefetch_moving = False
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # The page is where it was; the use pages it in on demand and meets the error
            # itself if it persists.
            self._prefetch_failures += 1
            self._log("prefetch_failed", page, error=f"{type(exc).__name__}: {exc}")
        finally:
            if page._prefetch is task:
                page._prefetch = None

    async def _prefetch_to_host(self, page: Page) -> None:
        """Read the page file → host, keeping its extent: a clean host copy, evicted first."""
        loop = asyncio.get_running_loop()
        page._transit = loop.create_future()
        sem, value = page.semaphore, page._value
        staging: Buffer | None = None
        read: Submission | None = None
        try:
            assert page._extent is not None
            # Host memory now or not at all (page-outs of older host pages allowed): a
            # prefetch waiting for memory would hold back the use it is meant to speed up.
            staging = await self._allocate(
                self.host, page, loop.time(), purpose="prefetch", demote=False
            )
            host_bytes = buffer_bytes(staging)
            read = self._storage_device.read(
                self._prefetch_queue(),
                host_bytes,
                self.file,
                page._extent.offset,
                waits=[(sem, value)],
                signals=[(sem, value + 1)],
                name=f"prefetch read {page.name}",
                checksum=page._checksum,
            )
            await read
        except BaseException as exc:
            if staging is not None:
                self._free(staging, _death(read) if read is not None else Frontier())
            self._rearm(page)
            self._settle(page)
            corrupted = self._corrupted(page, exc)
            if corrupted is not None:
                raise corrupted from exc
            raise
        page._value = value + 1
        page._host, page._host_tensor = staging, host_bytes
        page.tier = Tier.HOST
        page._clean = True  # the extent keeps the same bytes until the first use
        self._lru.move_to_end(page, last=False)
        self._measure(read, None, page.nbytes)
        self._prefetches += 1
        self._settle(page)
        self._log("prefetch", page, tier="host", frontier=repr(read.frontier))

    async def _make_room_on_device(self, page: Page, when: float) -> bool:
        """Page out what must go for ``page`` to fit on its device; False if it cannot.

        Without ``prefetch_evicts`` nothing goes: only free room is taken. With it, only
        pages nobody expects before ``when`` go, least recently used first (unused
        prefetched copies sit there): a page that will be needed sooner stays. A victim
        whose page-out fails keeps its place, and the prefetch stops in host memory.
        """
        needed, reclaimable = shortfall(self.runtime, page.context, page.nbytes)
        if needed <= 0:
            return True
        if not self.prefetch_evicts:
            return False
        order = [
            p
            for p in self._lru
            if p is not page
            and p.context.device is page.context.device
            and (p._expected is None or p._expected > when)
        ]
        plan = choose_page_outs(order, needed, reclaimable)
        if not plan.victims:
            return False
        for victim in plan.victims:
            if victim.pins or victim._transit is not None or victim.tier is not Tier.DEVICE:
                return False  # it changed while an earlier victim moved
            try:
                await self.page_out(victim, self.spill)
            except Exception:
                return False  # logged and counted by page_out; the victim kept its data
        needed, _ = shortfall(self.runtime, page.context, page.nbytes)
        return needed <= 0

    def _prefetch_queue(self) -> DeviceQueue:
        """A queue below the storage queue's priority: page-ins and page-outs go first."""
        queue = self._prefetch_reads
        if queue is None:
            queue = self._prefetch_reads = self._storage_device.queue(
                priority=self.storage.priority - 1, name=f"{self.storage.name}.prefetch"
            )
        return queue

    def _lead(self, page: Page, *, from_file: bool) -> float:
        """Seconds before the use to start bringing the page in (inf: start now).

        The host → device step starts early enough to push one victim out through host
        memory to the file and copy the page in; the file → host step before that,
        early enough for one more read. Both times ``prefetch_margin``.
        """
        copy, read = self._copy_rate, self._read_rate
        if copy is None or read is None:
            return math.inf
        seconds = (read + 2 * copy) * page.nbytes
        if from_file:
            seconds += read * page.nbytes
        return seconds * self.prefetch_margin

    def _measure(self, read: Submission | None, copy: Submission | None, nbytes: int) -> None:
        """Keep the latest read and copy seconds per byte (device time, not queueing)."""
        for sub, attr in ((read, "_read_rate"), (copy, "_copy_rate")):
            if sub is None or sub.started_at is None or sub.finished_at is None:
                continue
            setattr(self, attr, (sub.finished_at - sub.started_at) / nbytes)

    def _evict_clean(self, page: Page) -> None:
        """Drop a prefetched copy nobody used: its file extent still holds the same bytes."""
        death = page.semaphore.frontier  # the prefetch's read and copy, all signalled
        if page._device is not None:
            self._free(page._device, death)
        if page._host is not None:
            self._free(page._host, death)
        page._device = page._device_tensor = page._host = page._host_tensor = None
        page.tier = Tier.FILE
        page._clean = False
        self._prefetch_wasted += 1
        self._page_outs += 1
        self._log("page_out", page, tier="file", clean=True)

    def _drop_clean_extent(self, page: Page) -> None:
        """The first use of a prefetched page: its file extent no longer holds its data."""
        assert page._extent is not None
        self._free_extent(page._extent, page.semaphore.frontier)
        page._extent = page._checksum = None
        page._clean = False

    # -- memory pressure -------------------------------------------------------------

    async def reclaim(self, context: ExecutionContext, nbytes: int) -> int:
        """Page out least recently used pages so ``context`` can allocate ``nbytes``.

        For a device context, pages leave its device (to ``spill``); for the host
        context, host copies go to the file. Returns the bytes freed; a page whose
        page-out fails keeps its data where it was and frees nothing.
        """
        freed, _ = await self._reclaim(context, nbytes)
        return freed

    async def _reclaim(self, context: ExecutionContext, nbytes: int) -> tuple[int, list[Exception]]:
        """:meth:`reclaim`, and the errors of the page-outs that failed."""
        needed, reclaimable = shortfall(self.runtime, context, nbytes)
        if needed <= 0 or self._closed:
            return 0, []
        if context is self.host:
            plan = choose_page_outs(list(self._lru), needed, reclaimable, tier=Tier.HOST)
            target = Tier.FILE
        else:
            order = [p for p in self._lru if p.context.device is context.device]
            plan = choose_page_outs(order, needed, reclaimable)
            target = self.spill
        if not plan.victims:
            return 0, []
        with progress(f"paging out {len(plan.victims)} pages", total=len(plan.victims)) as shown:
            source = Tier.HOST if context is self.host else Tier.DEVICE

            async def page_out(page: Page) -> bool:
                try:
                    if (
                        page.pins
                        or page._transit is not None
                        or page.released
                        or page.tier is not source
                    ):
                        return False  # another reclaim or a use took it since the plan
                    await self.page_out(page, target)
                    return True
                finally:
                    shown.advance()

            outcomes = await asyncio.gather(
                *(page_out(page) for page in plan.victims), return_exceptions=True
            )
        freed = 0
        failures: list[Exception] = []
        for page, outcome in zip(plan.victims, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                if not isinstance(outcome, Exception):
                    raise outcome  # cancellation and the like are not ours to swallow
                failures.append(outcome)  # logged by page_out; the page kept its data
                continue
            if outcome:
                freed += page.nbytes
        return freed, failures

    async def _on_memory_pressure(
        self, context: ExecutionContext, requested: int, available: int
    ) -> bool:
        return await self.reclaim(context, requested) > 0

    # -- helpers ---------------------------------------------------------------------

    def _direct(self, device_bytes: Any) -> bool:
        """Whether this transfer skips the host tier: asked for, and storage reaches it."""
        return self.direct and self._storage_device.can_access(device_bytes)

    def _storage_requester(self) -> Frontier:
        """The frontier the storage queue's next submission will have, at least."""
        q = self.storage
        return q._materialize(q._base, q.submitted_epoch + 1)

    def _settle(self, page: Page) -> None:
        """The page's move ended: it is free to move again (once a move on to the file ends)."""
        demoting = page._demoting
        if demoting is not None and not demoting.done():
            # A page-in that ended (cancelled) while its host copy goes on to the file: the
            # page stays in transit until that write is done.
            demoting.add_done_callback(lambda _: self._settle(page))
            return
        transit, page._transit = page._transit, None
        if transit is not None and not transit.done():
            transit.set_result(None)
        self._changed()

    @staticmethod
    def _typed(raw: Any, page: Page) -> Any:
        torch = import_torch()
        return raw.view(getattr(torch, page.dtype)).reshape(page.shape)

    @staticmethod
    def _raw(tensor: Any) -> Any:
        torch = import_torch()
        return tensor.reshape(-1).view(torch.uint8)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"pager {self.name!r} is closed")

    def _check_page(self, page: Page) -> None:
        self._check_open()
        if page.released:
            raise PageReleasedError(f"{page!r} was released; its data is gone")
        if page not in self._lru:
            raise UnknownPageError(f"{page!r} is not a page of pager {self.name!r}")

    def _log(self, event: str, page: Page, **fields: Any) -> None:
        rt = self.runtime
        if rt._log_info:
            rt._log.info(event, pager=self.name, page=page.name, nbytes=page.nbytes, **fields)

    # -- visible state and lifecycle -------------------------------------------------

    def lru(self) -> tuple[Page, ...]:
        """Every live page, least recently used first."""
        return tuple(self._lru)

    @property
    def storage_axis(self) -> int:
        """The axis of the storage queue page files move on."""
        return self.storage.axis

    def statistics(self) -> PagerStatistics:
        """A frozen snapshot of pages per tier and bytes moved."""
        tiers = [page.tier for page in self._lru]
        return PagerStatistics(
            pages=len(tiers),
            device_pages=tiers.count(Tier.DEVICE),
            host_pages=tiers.count(Tier.HOST),
            file_pages=tiers.count(Tier.FILE),
            pinned=sum(1 for page in self._lru if page.pins),
            page_outs=self._page_outs,
            page_ins=self._page_ins,
            bytes_out=self._bytes_out,
            bytes_in=self._bytes_in,
            failures=self._failures,
            prefetches=self._prefetches,
            prefetch_hits=self._prefetch_hits,
            prefetch_wasted=self._prefetch_wasted,
            prefetch_failures=self._prefetch_failures,
            waiting=len(self._waits),
            demotions=self._demotions,
            stalls=self._stalls,
        )

    async def aclose(self) -> None:
        """Release every page; the pager stops answering memory pressure."""
        tasks = list(self._prefetching)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for page in list(self._lru):
            if page._transit is not None:
                await asyncio.wait([page._transit])
            if not page.released and not page.pins:
                await self.release(page)
        self._closed = True

    async def __aenter__(self) -> Pager:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        s = self.statistics()
        return (
            f"<Pager {self.name!r} pages={s.pages} device={s.device_pages} host={s.host_pages} "
            f"file={s.file_pages} outs={s.page_outs} ins={s.page_ins}>"
        )
