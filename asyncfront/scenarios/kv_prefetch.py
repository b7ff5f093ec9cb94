"""Scenario B2d: idle chat sessions' KV caches paged back in before their users return.

Scenario B2b (:mod:`~asyncfront.scenarios.kv_paging`) pages an idle session's KV cache
out and back in on demand: the resumed decode waits for the read and the copy. Here a
predictor knows, a second ahead, which session the next message is for (a scheduler
that sees its clients' requests queue up, an agent framework that knows when a tool call
returns), and tells the pager with :meth:`~asyncfront.memory.Pager.expect`; or the
pager's own arrival model (:class:`~asyncfront.memory.ReuseIntervals`) guesses from each
session's past idle periods. The pager brings the cache file → host memory → device
ahead of the message.

Six sessions share a device budget of three KV pages; device pressure pages the least
recently used out to the file through host staging (``spill=Tier.FILE``), and host
memory (four pages) is the middle tier prefetches read into. Each session receives
:data:`DEFAULT_MESSAGES` messages at seeded times (think times of mean
:data:`THINK_SECONDS`); each message decodes :data:`TOKENS` tokens, one use
of the session's page each, every decode adding one to every byte of the page, so the
bytes at the end prove that no prediction, right or wrong, lost or mixed up data.

Everything runs in virtual time on fake devices that move real bytes
(:class:`~asyncfront.testing.FakeStorageDevice`, :class:`~asyncfront.testing.FakeCopyEngine`):
a page is 1 MiB standing for a 1 GiB cache, the bandwidths scaled by the same 1:1024 (an
8 GiB/s NVMe SSD, 32 GiB/s PCIe), so one page reads in 0.125 s and copies in 0.031 s.
The resume latency of a message is the time from its arrival until its first decode may
use the page.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import tempfile
from dataclasses import dataclass, field

from .._budget import MiB
from .._runtime import open_runtime
from ..devices.fake import FakeDevice
from ..memory._pager import Page, Pager, ReuseIntervals, Tier
from ..testing._paging import FakeCopyEngine, FakeStorageDevice

__all__ = (
    "ACCURACIES",
    "COPY_BYTES_PER_SECOND",
    "DEFAULT_MESSAGES",
    "DEFAULT_SEED",
    "DEFAULT_SESSIONS",
    "LOOKAHEAD_SECONDS",
    "PAGE_BYTES",
    "READ_BYTES_PER_SECOND",
    "THINK_SECONDS",
    "TOKENS",
    "KvPrefetchReport",
    "ResumeRun",
    "arrivals",
    "predict_sessions",
    "run_session_resume",
    "simulate",
)

PAGE_BYTES = 1 * MiB
"""One session's KV page (standing for a 1 GiB cache, times scaled alike)."""
READ_BYTES_PER_SECOND = 8 * MiB
"""The NVMe SSD: 8 GiB/s scaled 1:1024."""
COPY_BYTES_PER_SECOND = 32 * MiB
"""PCIe host <-> device: 32 GiB/s scaled 1:1024."""
DEVICE_PAGES = 3
HOST_PAGES = 4
TOKENS = 4
"""Decode steps per message."""
DECODE_SECONDS = 0.02
"""GPU seconds of one decode step."""
THINK_SECONDS = 6.0
"""Mean seconds between a session's messages."""
LOOKAHEAD_SECONDS = 1.0
"""How long before a message the predictor names its session."""
ACCURACIES = (100, 80, 50)
"""Prediction accuracies (percent) the scenario reports."""
DEFAULT_SESSIONS = 6
DEFAULT_MESSAGES = 6
DEFAULT_SEED = 5
MAX_SESSIONS = 32
MAX_MESSAGES = 64


def arrivals(sessions: int, messages: int, seed: int) -> list[tuple[float, int]]:
    """Every message as ``(time, session)``, in time order: seeded exponential think times."""
    rng = random.Random(seed)
    events = []
    for s in range(sessions):
        t = 0.5 + s * 0.25
        for _ in range(messages):
            events.append((round(t, 6), s))
            t += rng.expovariate(1.0 / THINK_SECONDS) + TOKENS * DECODE_SECONDS
    return sorted(events)


def predict_sessions(
    events: list[tuple[float, int]], sessions: int, accuracy: int, seed: int
) -> list[int]:
    """The session named for each message: exactly ``accuracy`` percent right, seeded.

    A wrong prediction names another session.

    Raises:
        ValueError: ``accuracy`` outside 0..100, or fewer than two sessions with wrong
            predictions to make.
    """
    if isinstance(accuracy, bool) or not isinstance(accuracy, int) or not 0 <= accuracy <= 100:
        raise ValueError(f"accuracy must be a percentage 0..100, got {accuracy!r}")
    rng = random.Random(seed * 104729 + accuracy)
    wrong = set(rng.sample(range(len(events)), round(len(events) * (100 - accuracy) / 100)))
    if wrong and sessions < 2:
        raise ValueError(f"a wrong prediction needs another session, got sessions={sessions}")
    named = []
    for i, (_, s) in enumerate(events):
        named.append(rng.choice([o for o in range(sessions) if o != s]) if i in wrong else s)
    return named


@dataclass
class ResumeRun:
    """One run: on demand, hints at ``accuracy`` percent, or the arrival model.

    Attributes:
        mode: ``"on demand"``, ``"hint"`` or ``"arrival model"``.
        accuracy: the hints' accuracy in percent (hints only).
        latencies: per message, seconds from its arrival until its page was usable.
        prefetches / hits / wasted: the pager's prefetch counts (see
            :class:`~asyncfront.memory.PagerStatistics`).
        page_ins: page-ins onto the device.
        peak_device / peak_host: the most the device and host budgets held.
        budget_device / budget_host: their limits.
        intact: every session's page held exactly the bytes its decodes wrote.
    """

    mode: str
    accuracy: int | None = None
    latencies: list[float] = field(default_factory=list)
    prefetches: int = 0
    hits: int = 0
    wasted: int = 0
    page_ins: int = 0
    peak_device: int = 0
    peak_host: int = 0
    budget_device: int = 0
    budget_host: int = 0
    intact: bool = False

    @property
    def label(self) -> str:
        """``on demand``, ``hint 80 %`` or ``arrival model``."""
        return f"hint {self.accuracy} %" if self.mode == "hint" else self.mode

    @property
    def total(self) -> float:
        """Seconds of resume latency over all messages."""
        return sum(self.latencies)

    @property
    def mean(self) -> float:
        """Mean resume latency, seconds."""
        return statistics.fmean(self.latencies)

    @property
    def p95(self) -> float:
        """95th percentile resume latency, seconds."""
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


@dataclass
class KvPrefetchReport:
    """Every run of the scenario, on the same messages."""

    sessions: int
    messages: int
    seed: int
    runs: list[ResumeRun]

    def run(self, label: str) -> ResumeRun:
        """The run labelled ``label`` (``"on demand"``, ``"hint 100 %"``, ``"arrival model"``)."""
        for r in self.runs:
            if r.label == label:
                return r
        raise KeyError(f"no run {label!r}; runs: {[r.label for r in self.runs]}")

    def describe(self) -> str:
        """Resume latency per run, against on demand."""
        base = self.run("on demand")
        lines = [
            f"{self.sessions} chat sessions x {self.messages} messages, KV pages of 1 MiB; "
            f"device holds {DEVICE_PAGES}, host {HOST_PAGES}; seed {self.seed}",
            f"  {'':14} {'mean (s)':>9} {'p95 (s)':>8} {'total (s)':>10} {'vs on demand':>13} "
            f"{'prefetches':>11} {'hits':>5} {'wasted':>7} {'intact':>7}",
        ]
        for r in self.runs:
            lines.append(
                f"  {r.label:14} {r.mean:9.4f} {r.p95:8.4f} {r.total:10.3f} "
                f"{r.total / base.total:13.0%} {r.prefetches:11d} {r.hits:5d} {r.wasted:7d} "
                f"{'yes' if r.intact else 'NO':>7}"
            )
        return "\n".join(lines)


async def run_session_resume(
    directory: str,
    events: list[tuple[float, int]],
    sessions: int,
    *,
    named: list[int] | None = None,
    model: bool = False,
    trace_path: str | None = None,
) -> tuple[ResumeRun, str]:
    """Serve ``events`` with the page file in ``directory``; hints from ``named`` or a model.

    ``named[i]`` is the session predicted, :data:`LOOKAHEAD_SECONDS` ahead, for message
    ``i``; ``model`` gives the pager a :class:`~asyncfront.memory.ReuseIntervals` instead.
    Returns the run and its text timeline (its Perfetto trace to ``trace_path``).
    """
    import torch

    devices = [
        FakeDevice("gpu0", memory=DEVICE_PAGES * PAGE_BYTES),
        FakeDevice("host", kind="cpu", memory=HOST_PAGES * PAGE_BYTES),
        FakeCopyEngine("pcie", bandwidth=COPY_BYTES_PER_SECOND),
        FakeStorageDevice(directory, bandwidth=READ_BYTES_PER_SECOND),
    ]
    run = ResumeRun("arrival model" if model else "hint" if named is not None else "on demand")
    async with open_runtime(devices) as rt:
        kv = rt.create_context("kv", device="gpu0", max_memory=DEVICE_PAGES * PAGE_BYTES)
        host = rt.create_context("host", device="host", max_memory=HOST_PAGES * PAGE_BYTES)
        run.budget_device, run.budget_host = rt.usage(kv).limit, rt.usage(host).limit
        pager = Pager(
            rt,
            host=host,
            copy=rt.queue("pcie", name="copy"),
            storage=rt.queue("nvme", name="nvme.pages"),
            spill=Tier.FILE,
            arrivals=ReuseIntervals(min_gap=1.0) if model else None,
        )
        decodes = [0] * sessions
        latencies: dict[int, float] = {}

        def watch() -> None:
            run.peak_device = max(run.peak_device, rt.usage(kv).used)
            run.peak_host = max(run.peak_host, rt.usage(host).used)

        async with pager:
            pages: list[Page] = []
            for s in range(sessions):
                page = await pager.allocate(kv, (PAGE_BYTES,), "uint8", name=f"session{s}")
                async with pager.use(page) as use:
                    sub = kv.queue.submit(
                        use.tensor.fill_, s, waits=[use.wait], signals=[use.signal]
                    )
                await sub
                pages.append(page)
                watch()

            async def message(i: int, at: float, s: int) -> None:
                await asyncio.sleep(max(0.0, at - rt.now()))
                for token in range(TOKENS):
                    started = rt.now()
                    async with pager.use(pages[s]) as use:
                        if token == 0:
                            latencies[i] = rt.now() - started
                        watch()
                        sub = kv.queue.submit(
                            use.tensor.add_,
                            1,
                            waits=[use.wait],
                            signals=[use.signal],
                            cost=DECODE_SECONDS,
                            name=f"decode s{s}",
                        )
                    await sub
                    decodes[s] += 1

            async def predictor() -> None:
                assert named is not None
                for (at, _), s in zip(events, named, strict=True):
                    await asyncio.sleep(max(0.0, at - LOOKAHEAD_SECONDS - rt.now()))
                    pager.expect(pages[s], at=at)

            # A session's messages run in order; different sessions' run at once.
            async def session(s: int) -> None:
                for i, (at, owner) in enumerate(events):
                    if owner == s:
                        await message(i, at, s)

            tasks = [session(s) for s in range(sessions)]
            if named is not None:
                tasks.append(predictor())
            await asyncio.gather(*tasks)
            intact = True
            for s, page in enumerate(pages):
                async with pager.use(page) as use:
                    expected = (s + decodes[s]) % 256
                    sub = kv.queue.submit(
                        lambda t, v=expected: bool(torch.all(t == v)),
                        use.tensor,
                        waits=[use.wait],
                        signals=[use.signal],
                    )
                intact = intact and bool(await sub)
            stats = pager.statistics()
    run.latencies = [latencies[i] for i in range(len(events))]
    run.prefetches, run.hits, run.wasted = (
        stats.prefetches,
        stats.prefetch_hits,
        stats.prefetch_wasted,
    )
    run.page_ins = stats.page_ins
    run.intact = intact
    if trace_path is not None:
        rt.trace.export_perfetto(trace_path)
    return run, rt.trace.format_timeline()


async def simulate(
    *,
    sessions: int = DEFAULT_SESSIONS,
    messages: int = DEFAULT_MESSAGES,
    seed: int = DEFAULT_SEED,
    trace_path: str | None = None,
) -> tuple[KvPrefetchReport, str]:
    """Run on demand, hints right 100, 80 and 50 % of the time, and the arrival model.

    Every run serves the same messages, each with its own page file in a temporary
    directory. Returns the report and the text timeline of the 100 % run (its Perfetto
    trace to ``trace_path`` when given).

    Raises:
        ValueError: fewer than two sessions or one message.
    """
    if sessions < 2 or messages < 1:
        raise ValueError(f"needs sessions >= 2 and messages >= 1, got {sessions}, {messages}")
    events = arrivals(sessions, messages, seed)
    runs: list[ResumeRun] = []
    timeline = ""
    plans: list[tuple[int | None, bool]] = [(None, False), *((a, False) for a in ACCURACIES)]
    plans.append((None, True))
    for accuracy, model in plans:
        named = None if accuracy is None else predict_sessions(events, sessions, accuracy, seed)
        with tempfile.TemporaryDirectory(prefix="asyncfront-kv-prefetch-") as directory:
            traced = accuracy == 100
            run, text = await run_session_resume(
                directory,
                events,
                sessions,
                named=named,
                model=model,
                trace_path=trace_path if traced else None,
            )
        run.accuracy = accuracy
        runs.append(run)
        if traced:
            timeline = text
    return KvPrefetchReport(sessions, messages, seed, runs), timeline
