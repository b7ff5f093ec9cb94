"""Diffusion-transformer serving with parallelism re-placed between steps, in virtual time.

Eight GPUs serve image and video generation requests (seeded Poisson arrivals). A
request's denoising steps run on a collective channel over ``k`` GPUs, each step a
channel step whose parts take ``W * (1 + ALPHA * (k - 1)) / k`` seconds (``W``: the
step's work on one GPU; ``ALPHA``: the share lost to communication per extra GPU, so
parallelism speeds a step up, sub-linearly).

With fixed parallelism every request waits for ``k`` free GPUs and keeps them to the
end. With dynamic parallelism (parallelism as a schedulable resource, as GF-DiT serves
DiTs) a request starts on whatever is free up to its fair share, *grows* at a step
boundary when GPUs idle and nobody waits, and *shrinks* to its fair share at a step
boundary when a new request waits; the GPUs it lets go go to the waiting request at
once. Every change of membership is :meth:`~asyncfront.CollectiveChannel.resize`: the
next channel's first step waits on the last step of the one before, so a request's
frontier chain runs unbroken through every channel it used.

The report compares throughput (requests per second over the run) and mean latency
(arrival to last step) of the dynamic policy against fixed parallelism on the same
arrivals.
"""

from __future__ import annotations

import asyncio
import random
from collections import deque
from dataclasses import dataclass, field

from .._collective import CollectiveChannel, CollectiveStep
from .._frontier import Frontier
from .._queue import DeviceQueue
from .._runtime import Runtime, open_runtime
from ..devices.fake import FakeDevice

__all__ = (
    "ALPHA",
    "DEFAULT_LOAD",
    "DEFAULT_REQUESTS",
    "DEFAULT_SEED",
    "DYNAMIC",
    "FIXED",
    "GPUS",
    "KINDS",
    "DitReport",
    "DitRun",
    "Request",
    "ServingResize",
    "arrivals",
    "dit_devices",
    "simulate",
    "step_seconds",
)

GPUS = 8
ALPHA = 0.15
"""Share of a step's one-GPU time lost to communication per extra GPU."""
KINDS = {"image": (20, 0.15), "video": (30, 0.9)}
"""Request kinds: (denoising steps, seconds per step on one GPU)."""
VIDEO_SHARE = 0.3
DEFAULT_REQUESTS = 48
DEFAULT_SEED = 11
DEFAULT_LOAD = 80
"""Offered load, percent of the eight GPUs' capacity at one GPU per request."""
DYNAMIC = 0
"""The policy number of dynamic parallelism (fixed ones are their k)."""
FIXED = (1, 2, 4, 8)
"""The fixed parallelisms compared."""


def dit_devices() -> list[FakeDevice]:
    """Eight GPUs."""
    return [FakeDevice(f"gpu{i}") for i in range(GPUS)]


def step_seconds(work: float, k: int) -> float:
    """Seconds one denoising step of ``work`` GPU-seconds takes on ``k`` GPUs."""
    return work * (1 + ALPHA * (k - 1)) / k


@dataclass(frozen=True)
class Request:
    """One generation request."""

    index: int
    kind: str
    arrival: float
    steps: int
    work: float  # seconds per step on one GPU


def arrivals(requests: int, seed: int, load: int) -> tuple[Request, ...]:
    """``requests`` seeded Poisson arrivals at ``load`` percent of one-GPU capacity.

    Raises:
        ValueError: ``requests`` < 1 or ``load`` <= 0.
    """
    if requests < 1:
        raise ValueError(f"dit serving needs at least one request, got {requests}")
    if load <= 0:
        raise ValueError(f"load must be > 0 percent, got {load}")
    mean = sum(
        share * steps * work
        for share, (steps, work) in zip((1 - VIDEO_SHARE, VIDEO_SHARE), KINDS.values(), strict=True)
    )
    rate = load / 100 * GPUS / mean  # requests per second
    rng = random.Random(seed)
    now = 0.0
    out = []
    for i in range(requests):
        now += rng.expovariate(rate)
        kind = "video" if rng.random() < VIDEO_SHARE else "image"
        steps, work = KINDS[kind]
        out.append(Request(i, kind, round(now, 4), steps, work))
    return tuple(out)


@dataclass(frozen=True)
class ServingResize:
    """One membership change: the old channel's last step and the new one's first (values)."""

    request: int
    before: int
    after: int
    last_frontier: Frontier
    first_frontier: Frontier


@dataclass
class DitRun:
    """One policy over the arrivals."""

    policy: int  # DYNAMIC, or the fixed k
    latencies: list[float]
    makespan: float
    gpu_steps: list[int]  # k of every step run
    resizes: list[ServingResize] = field(repr=False)
    final_frontiers: list[Frontier] = field(repr=False)

    @property
    def name(self) -> str:
        """``dynamic`` or ``fixed k=N``."""
        return "dynamic" if self.policy == DYNAMIC else f"fixed k={self.policy}"

    @property
    def throughput(self) -> float:
        """Requests finished per second of the run."""
        return len(self.latencies) / self.makespan

    @property
    def mean_latency(self) -> float:
        """Mean seconds from arrival to the last denoising step's end."""
        return sum(self.latencies) / len(self.latencies)

    @property
    def mean_k(self) -> float:
        """Mean GPUs per step."""
        return sum(self.gpu_steps) / len(self.gpu_steps)


@dataclass
class DitReport:
    """Every policy on the same arrivals."""

    requests: tuple[Request, ...]
    load: int
    runs: dict[int, DitRun]

    @property
    def dynamic(self) -> DitRun:
        """The dynamic policy's run."""
        return self.runs[DYNAMIC]

    def best_fixed(self, by: str) -> DitRun:
        """The fixed run with the best ``throughput`` or ``mean_latency``."""
        fixed = [r for p, r in self.runs.items() if p != DYNAMIC]
        if by == "throughput":
            return max(fixed, key=lambda r: r.throughput)
        return min(fixed, key=lambda r: r.mean_latency)

    def describe(self) -> str:
        """A table of throughput, mean latency and mean parallelism per policy."""
        videos = sum(r.kind == "video" for r in self.requests)
        lines = [
            f"DiT serving on {GPUS} GPUs: {len(self.requests)} requests ({videos} video), "
            f"load {self.load} % of one-GPU capacity",
            f"  {'policy':<11} {'throughput':>11} {'mean latency':>13} {'mean k':>7} "
            f"{'resizes':>8}",
        ]
        for run in self.runs.values():
            lines.append(
                f"  {run.name:<11} {run.throughput:9.3f}/s {run.mean_latency:12.2f}s "
                f"{run.mean_k:7.2f} {len(run.resizes):8d}"
            )
        d = self.dynamic
        t, lat = self.best_fixed("throughput"), self.best_fixed("mean_latency")
        lines.append(
            f"  dynamic vs the best fixed: throughput {d.throughput / t.throughput:.2f}x "
            f"({t.name}), mean latency {d.mean_latency / lat.mean_latency:.2f}x ({lat.name})"
        )
        return "\n".join(lines)


class _Gpus:
    """Free GPUs and the requests waiting for some, FIFO; grants follow the policy."""

    def __init__(self, policy: int) -> None:
        self.policy = policy
        self.free: list[int] = list(range(GPUS))
        self.waiting: deque[tuple[asyncio.Future[list[int]], int]] = deque()
        self.holding = 0  # requests holding GPUs

    def fair_share(self) -> int:
        return max(1, GPUS // max(1, self.holding + len(self.waiting)))

    def acquire(self, loop: asyncio.AbstractEventLoop) -> asyncio.Future[list[int]]:
        need = 1 if self.policy == DYNAMIC else self.policy
        fut: asyncio.Future[list[int]] = loop.create_future()
        self.waiting.append((fut, need))
        self.grant()
        return fut

    def grant(self) -> None:
        while self.waiting and len(self.free) >= self.waiting[0][1]:
            fut, need = self.waiting[0]
            if self.policy == DYNAMIC:
                take = max(need, min(len(self.free), self.fair_share()))
            else:
                take = need
            self.waiting.popleft()
            self.holding += 1
            gpus, self.free = self.free[:take], self.free[take:]
            fut.set_result(gpus)

    def release(self, gpus: list[int], *, leaving: bool) -> None:
        self.free = sorted(self.free + gpus)
        if leaving:
            self.holding -= 1
        self.grant()

    def rebalance(self, gpus: list[int]) -> list[int]:
        """At a step boundary (dynamic): shrink to the fair share for waiters, else grow."""
        if self.waiting:
            fair = self.fair_share()
            if len(gpus) > fair:
                keep, let_go = gpus[:fair], gpus[fair:]
                self.release(let_go, leaving=False)
                return keep
            return gpus
        if self.free:
            grown, self.free = sorted(gpus + self.free), []
            return grown
        return gpus


async def _serve(rt: Runtime, requests: tuple[Request, ...], policy: int) -> DitRun:
    loop = asyncio.get_running_loop()
    start = loop.time()
    queues: list[DeviceQueue] = [rt.queue(f"gpu{i}") for i in range(GPUS)]
    pool = _Gpus(policy)
    latencies: list[float] = []
    gpu_steps: list[int] = []
    resizes: list[ServingResize] = []
    finals: list[Frontier] = []
    finished = 0.0

    async def serve(r: Request) -> None:
        nonlocal finished
        await asyncio.sleep(r.arrival)
        gpus = await pool.acquire(loop)
        channel: CollectiveChannel = rt.collective([queues[g] for g in gpus], name=f"req{r.index}")
        last: CollectiveStep | None = None
        for k in range(r.steps):
            if last is not None and policy == DYNAMIC:
                regrouped = pool.rebalance(gpus)
                if regrouped != gpus:
                    before = len(gpus)
                    gpus = regrouped
                    channel = channel.resize([queues[g] for g in gpus])
                    first = channel.submit(
                        name=f"req{r.index}.step{k}", cost=step_seconds(r.work, len(gpus))
                    )
                    await first
                    assert last.frontier is not None and first.frontier is not None
                    resizes.append(
                        ServingResize(r.index, before, len(gpus), last.frontier, first.frontier)
                    )
                    gpu_steps.append(len(gpus))
                    last = first
                    continue
            last = channel.submit(
                name=f"req{r.index}.step{k}", cost=step_seconds(r.work, len(gpus))
            )
            await last
            gpu_steps.append(len(gpus))
        assert last is not None and last.frontier is not None
        end = loop.time() - start
        finished = max(finished, end)
        latencies.append(end - r.arrival)
        finals.append(last.frontier)
        channel.close()
        pool.release(gpus, leaving=True)

    await asyncio.gather(*(serve(r) for r in requests))
    return DitRun(policy, latencies, finished, gpu_steps, resizes, finals)


async def simulate(
    *,
    requests: int = DEFAULT_REQUESTS,
    seed: int = DEFAULT_SEED,
    load: int = DEFAULT_LOAD,
    trace_path: str | None = None,
) -> tuple[DitReport, str]:
    """Serve the same seeded arrivals with fixed k = 1, 2, 4, 8 and with dynamic parallelism.

    Returns the report and the dynamic run's text timeline; writes its Perfetto trace
    to ``trace_path`` when given.

    Raises:
        ValueError: ``requests`` < 1 or ``load`` <= 0.
    """
    reqs = arrivals(requests, seed, load)
    runs: dict[int, DitRun] = {}
    timeline = ""
    for policy in (*FIXED, DYNAMIC):
        dynamic = policy == DYNAMIC
        async with open_runtime(dit_devices(), trace=dynamic) as rt:
            runs[policy] = await _serve(rt, reqs, policy)
        if dynamic:
            if trace_path is not None:
                rt.trace.export_perfetto(trace_path)
            timeline = rt.trace.format_timeline()
    return DitReport(reqs, load, runs), timeline
