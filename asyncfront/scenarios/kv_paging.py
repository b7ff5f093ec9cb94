"""Scenario B2b: an idle chat session's KV cache goes to NVMe and comes back, bit for bit.

Several chat sessions of one model share the model's KV-cache budget on its device,
one block per session, so the budget is full. One session goes idle (its user is
reading). Another session's conversation grows and needs a second block: the pager
pages out the least recently used block across all sessions, the idle one's. Its
page-out copies device → host on the copy queue, writes host → NVMe on the storage
queue after the session's last decode, and frees the device block only once the
write is signalled; the growing session reuses that memory. When the idle user sends
a new message, the block is read back (the read waits on the value the page-out
signalled), copied to the device, and the resumed decode waits for that copy: its
frontier carries the storage axis, and the KV it finds is bit-identical to what the
session left.

Everything runs for real on the CPU: ``CpuDevice``s stand for the GPU (``gpu0``) and
for host memory (``host``), distinct devices with distinct budgets, and a
``StorageDevice`` writes a page file in a directory.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._frontier import Frontier, axis_name
from .._queue import DeviceQueue, Submission
from .._runtime import Runtime, open_runtime
from ..devices.cpu import CpuDevice
from ..devices.storage import StorageDevice
from ..memory._pager import Page, Pager, PagerStatistics, Tier
from ..memory._tensors import import_torch

__all__ = (
    "KV_SHAPE",
    "MAX_SESSIONS",
    "MIN_SESSIONS",
    "KvPagingReport",
    "check_sessions",
    "kv_devices",
    "run_kv_paging",
    "simulate",
)

KV_SHAPE = (2, 4, 4, 64, 32)
"""One KV block: (key/value, layers, heads, tokens, head dim) in float16, 128 KiB."""

_KV_BYTES = 2 * 4 * 4 * 64 * 32 * 2

MIN_SESSIONS = 2
"""The fewest sessions the scenario runs: one goes idle while another grows."""

MAX_SESSIONS = 64
"""The most sessions the scenario runs (a KV budget of 8 MiB, a few seconds of decodes)."""


def check_sessions(sessions: int, idle: int | None = None, grower: int | None = None) -> None:
    """Refuse a session count, idle session or growing session the scenario cannot run.

    Raises:
        ValueError: ``sessions`` outside ``MIN_SESSIONS..MAX_SESSIONS``, or ``idle`` or
            ``grower`` not a session number ``1..sessions``, or both the same session.
    """
    if isinstance(sessions, bool) or not isinstance(sessions, int):
        raise ValueError(f"sessions must be an integer, not {sessions!r}")
    if not MIN_SESSIONS <= sessions <= MAX_SESSIONS:
        raise ValueError(
            f"sessions must be {MIN_SESSIONS}..{MAX_SESSIONS} (one session goes idle while "
            f"another grows), not {sessions}"
        )
    for role, number in (("idle", idle), ("grower", grower)):
        if number is not None and not 1 <= number <= sessions:
            raise ValueError(f"{role} must be a session 1..{sessions}, not {number}")
    if idle is not None and idle == grower:
        raise ValueError(f"the idle and the growing session must differ, both are {idle}")


def _roles(sessions: int, idle: int | None, grower: int | None) -> tuple[int, int]:
    """The idle and growing sessions: 3 and 1 by default, within ``1..sessions``."""
    idle = idle if idle is not None else min(3, sessions)
    grower = grower if grower is not None else (1 if idle != 1 else 2)
    return idle, grower


def kv_devices(directory: str | Path, *, sessions: int) -> list[Any]:
    """The hardware: a "GPU" whose KV budget holds one block per session, host memory, NVMe."""
    return [
        CpuDevice("gpu0", workers=2, memory=sessions * _KV_BYTES),
        CpuDevice("host", workers=2, memory=2 * _KV_BYTES),
        StorageDevice(directory, name="nvme"),
    ]


def digest(kv: Any) -> str:
    """A checksum of a KV block's bytes."""
    torch = import_torch()
    return hashlib.sha256(kv.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()[:16]


def decode_step(kv: Any, position: int, seed: int) -> str:
    """One decode step: return the checksum of the KV as found, then append a token's K/V."""
    torch = import_torch()
    found = digest(kv)
    gen = torch.Generator().manual_seed(seed * 100_003 + position)
    kv[:, :, :, position % kv.shape[3], :] = torch.randn(
        kv.shape[0], kv.shape[1], kv.shape[2], kv.shape[4], generator=gen
    ).to(kv.dtype)
    return found


@dataclass
class _Session:
    number: int
    pages: list[Page] = field(default_factory=list)
    position: int = 0


@dataclass
class KvPagingReport:
    """What the scenario did, with the numbers its claims rest on."""

    sessions: int
    idle_session: int
    growing_session: int
    idle_digest: str
    resumed_digest: str
    idle_page: Page
    evicted_for_growth: tuple[str, ...]
    evicted_for_resume: tuple[str, ...]
    page_out_frontier: Frontier
    resumed: Submission
    grown: Submission
    queues: dict[str, DeviceQueue]
    statistics: PagerStatistics
    growth_seconds: float
    resume_seconds: float
    idle_offset: int | None
    growth_offset: int | None
    block_bytes: int = _KV_BYTES

    @property
    def resumed_frontier(self) -> Frontier:
        """The frontier of the idle session's first decode after it resumed."""
        frontier = self.resumed.frontier
        assert frontier is not None
        return frontier

    def describe(self) -> str:
        """A readable account: who was paged, bytes moved, timings and frontiers."""

        def names(frontier: Frontier) -> str:
            return "{" + ", ".join(f"{axis_name(a)}: {e}" for a, e in frontier) + "}"

        s = self.statistics
        lines = [
            f"{self.sessions} sessions, one {self.block_bytes // 1024} KiB KV block each; "
            f"session {self.idle_session} goes idle",
            f"session {self.growing_session} grows: paged out {list(self.evicted_for_growth)} "
            f"in {self.growth_seconds * 1e3:.1f} ms; its new block reuses device offset "
            f"{self.growth_offset} (the idle block's was {self.idle_offset})",
            f"  page-out frontier {names(self.page_out_frontier)}",
            f"session {self.idle_session} resumes: paged in {self.idle_page.name!r}, paged out "
            f"{list(self.evicted_for_resume)} to make room, in {self.resume_seconds * 1e3:.1f} ms",
            f"  KV at idle {self.idle_digest}, KV found on resume {self.resumed_digest}: "
            f"{'identical' if self.idle_digest == self.resumed_digest else 'DIFFERENT'}",
            f"  resumed decode frontier {names(self.resumed_frontier)}",
            f"pager: {s.page_outs} page-outs ({s.bytes_out // 1024} KiB), "
            f"{s.page_ins} page-ins ({s.bytes_in // 1024} KiB), {s.file_pages} page(s) in the file",
        ]
        return "\n".join(lines)


async def run_kv_paging(
    rt: Runtime,
    *,
    sessions: int = 6,
    idle: int | None = None,
    grower: int | None = None,
    steps: int = 4,
) -> KvPagingReport:
    """Run the scenario on a runtime holding :func:`kv_devices`.

    Args:
        sessions: chat sessions sharing the KV budget, ``MIN_SESSIONS..MAX_SESSIONS``.
        idle: the session that goes idle and later resumes (default 3, or the last
            session when there are fewer).
        grower: the session whose conversation outgrows its first block (default 1,
            or 2 when session 1 is the idle one).
        steps: decode steps per session before the idle one stops.

    Raises:
        ValueError: see :func:`check_sessions`; raised before anything is allocated.
    """
    check_sessions(sessions, idle, grower)
    idle, grower = _roles(sessions, idle, grower)
    torch = import_torch()
    storage = rt.device("nvme")
    assert isinstance(storage, StorageDevice)
    llama = rt.create_context("llama", device="gpu0", max_memory=sessions * _KV_BYTES)
    host = rt.create_context("host", device="host", max_memory=2 * _KV_BYTES)
    queues = {
        "llama": llama.queue,
        "copy": rt.queue("host", name="copy"),
        "nvme": storage.queue(name="nvme.kv"),
    }
    pager = Pager(rt, host=host, copy=queues["copy"], storage=queues["nvme"], spill=Tier.FILE)
    chats = {n: _Session(n) for n in range(1, sessions + 1)}

    async def decode(chat: _Session, page: Page | None = None) -> Submission:
        page = page if page is not None else chat.pages[-1]
        async with pager.use(page) as use:
            sub = llama.queue.submit(
                decode_step,
                use.tensor,
                chat.position,
                chat.number,
                waits=[use.wait],
                signals=[use.signal],
                name=f"decode s{chat.number}",
            )
        chat.position += 1
        return sub

    for chat in chats.values():  # prefill: every block allocated and written
        page = await pager.allocate(
            llama, KV_SHAPE, torch.float16, owner=chat.number, name=f"kv/s{chat.number}"
        )
        chat.pages.append(page)
        await decode(chat)
    for _ in range(steps):
        for chat in chats.values():
            await decode(chat)
    idle_chat = chats[idle]
    idle_page = idle_chat.pages[-1]
    async with pager.use(idle_page) as use:  # the user reads: the KV as the session leaves it
        idle_digest = await llama.queue.submit(
            digest, use.tensor, waits=[use.wait], signals=[use.signal], name="checksum"
        )
    for _ in range(steps):  # the others keep chatting; the idle session is now the LRU
        for chat in chats.values():
            if chat is not idle_chat:
                await decode(chat)

    # The growing session needs a second block: the budget is full, the LRU goes out.
    grow = chats[grower]
    before = {page: page.tier for page in pager.lru()}
    idle_offset = idle_page._device.offset if idle_page._device is not None else None
    started = rt.now()
    new_block = await pager.allocate(
        llama, KV_SHAPE, torch.float16, owner=grower, name=f"kv/s{grower}b"
    )
    growth_seconds = rt.now() - started
    evicted_for_growth = tuple(
        p.name for p, tier in before.items() if tier is Tier.DEVICE and p.tier is not Tier.DEVICE
    )
    page_out_frontier = idle_page.frontier
    growth_offset = new_block._device.offset if new_block._device is not None else None
    grow.pages.append(new_block)
    grown = await decode(grow)
    await grown

    # The idle user sends a new message: page in (making room again), then decode.
    before = {page: page.tier for page in pager.lru()}
    started = rt.now()
    resumed = await decode(idle_chat, idle_page)
    resumed_digest = await resumed
    resume_seconds = rt.now() - started
    evicted_for_resume = tuple(
        p.name for p, tier in before.items() if tier is Tier.DEVICE and p.tier is not Tier.DEVICE
    )
    report = KvPagingReport(
        sessions=sessions,
        idle_session=idle,
        growing_session=grower,
        idle_digest=idle_digest,
        resumed_digest=resumed_digest,
        idle_page=idle_page,
        evicted_for_growth=evicted_for_growth,
        evicted_for_resume=evicted_for_resume,
        page_out_frontier=page_out_frontier,
        resumed=resumed,
        grown=grown,
        queues=queues,
        statistics=pager.statistics(),
        growth_seconds=growth_seconds,
        resume_seconds=resume_seconds,
        idle_offset=idle_offset,
        growth_offset=growth_offset,
    )
    await pager.aclose()
    return report


async def simulate(directory: str | Path, **options: Any) -> KvPagingReport:
    """Open a runtime on :func:`kv_devices` with its page file in ``directory`` and run it."""
    sessions = options.get("sessions", 6)
    check_sessions(sessions, options.get("idle"), options.get("grower"))
    async with open_runtime(kv_devices(directory, sessions=sessions)) as rt:
        return await run_kv_paging(rt, **options)
