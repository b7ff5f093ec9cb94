"""Work stealing on a satellite mesh: an irregular, seeded workload, in virtual time.

Sixteen satellites in a 4 x 4 torus (each linked to the satellites ahead and behind in
its orbital plane and to its neighbours in the adjacent planes), as in neighbour-only
work stealing for LEO constellations. Jobs arrive from the ground, seeded: each at one
satellite (the ground contacts favour a few of them, so arrivals are uneven), where its
data lands. A job fans out into a heavy-tailed number of tasks of heavy-tailed cost
(lognormal), then merges their results. Every task and merge is a graph stage with
``bind="ready"``: placement homes it on the satellite holding its data, and it is bound
to a satellite's queue only when it is ready, so an idle satellite can take it.

The same arrivals run three times: without stealing (each satellite works through its
own backlog), with neighbour-only stealing (an idle satellite takes the newest ready
stage from the busiest of its four neighbours) and with global stealing (from the
busiest satellite anywhere). A steal over ``h`` hops costs ``h * HOP_SECONDS`` on the
thief before the stage runs (moving its inputs over the inter-satellite links). The
report gives the makespan, the mean job latency, the steals and the hops they crossed.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from .._frontier import Frontier
from .._graph import GraphRun
from .._runtime import Runtime, open_runtime
from .._stealing import StageBinding, Stealing, Topology
from ..devices.fake import FakeDevice

__all__ = (
    "COLUMNS",
    "DEFAULT_JOBS",
    "DEFAULT_SEED",
    "HOP_SECONDS",
    "MAX_JOBS",
    "SATELLITES",
    "BoundStage",
    "StealingRun",
    "WorkStealingReport",
    "Workload",
    "irregular_workload",
    "satellite_devices",
    "satellite_topology",
    "simulate",
)

SATELLITES = 16
COLUMNS = 4
"""Satellites per orbital plane (the torus is SATELLITES / COLUMNS planes of this many)."""
HOP_SECONDS = 0.02
"""Seconds a stolen stage spends crossing one inter-satellite link."""
DEFAULT_JOBS = 40
DEFAULT_SEED = 7
MAX_JOBS = 400
MEAN_GAP = 0.4
"""Mean seconds between job arrivals (exponential gaps)."""
MERGE_SECONDS = 0.05
SKEW = 0.6
"""Zipf exponent of the ground contacts: the k-th satellite sees 1 / (1 + k) ** SKEW of them."""
MODES = (Stealing.NONE, Stealing.NEIGHBOURS, Stealing.GLOBAL)


def satellite_devices() -> list[FakeDevice]:
    """The sixteen satellites' processors."""
    return [FakeDevice(f"sat{i}", kind="npu") for i in range(SATELLITES)]


def satellite_topology() -> Topology:
    """The 4 x 4 torus of inter-satellite links, HOP_SECONDS per hop."""
    names = [f"sat{i}" for i in range(SATELLITES)]
    return Topology.grid(names, COLUMNS, wrap=True, hop_seconds=HOP_SECONDS)


@dataclass(frozen=True)
class Job:
    """One job: when and where it arrives, and its tasks' costs (seconds)."""

    index: int
    arrival: float
    satellite: str
    tasks: tuple[float, ...]


@dataclass(frozen=True)
class Workload:
    """The seeded jobs every mode runs."""

    seed: int
    jobs: tuple[Job, ...]

    @property
    def work(self) -> float:
        """Seconds of work in all (tasks and merges)."""
        return sum(sum(j.tasks) + MERGE_SECONDS for j in self.jobs)

    @property
    def stages(self) -> int:
        """Stages in all (tasks and merges)."""
        return sum(len(j.tasks) + 1 for j in self.jobs)


def irregular_workload(jobs: int = DEFAULT_JOBS, seed: int = DEFAULT_SEED) -> Workload:
    """``jobs`` jobs: exponential gaps, uneven contacts, lognormal fan-outs and costs.

    Raises:
        ValueError: ``jobs`` < 1.
    """
    if jobs < 1:
        raise ValueError(f"the workload needs at least one job, got {jobs}")
    rng = random.Random(seed)
    # ground contacts: a few satellites see most of the ground stations
    weights = [1.0 / (1 + i) ** SKEW for i in range(SATELLITES)]
    order = list(range(SATELLITES))
    rng.shuffle(order)
    out = []
    now = 0.0
    for j in range(jobs):
        now += rng.expovariate(1.0 / MEAN_GAP)
        sat = order[rng.choices(range(SATELLITES), weights)[0]]
        fan_out = max(1, min(24, round(rng.lognormvariate(math.log(6), 0.7))))
        tasks = tuple(round(rng.lognormvariate(math.log(0.5), 1.0), 4) for _ in range(fan_out))
        out.append(Job(j, round(now, 4), f"sat{sat}", tasks))
    return Workload(seed, tuple(out))


@dataclass(frozen=True)
class BoundStage:
    """Where one stage ran (plain values): home, device, hops, queue, its frontier's entry."""

    stage: str
    home: str
    device: str
    hops: int
    queue: str
    axis: int
    epoch: int
    frontier_epoch: int


@dataclass
class StealingRun:
    """One mode over the workload."""

    stealing: Stealing
    makespan: float
    latencies: list[float]
    stolen: int
    stolen_hops: float
    ran: dict[str, int]
    stages: list[BoundStage]
    frontiers: list[Frontier] = field(repr=False)

    @property
    def mean_latency(self) -> float:
        """Mean seconds from a job's arrival to its merge's end."""
        return sum(self.latencies) / len(self.latencies)


@dataclass
class WorkStealingReport:
    """The three modes on the same arrivals."""

    workload: Workload
    runs: dict[Stealing, StealingRun]

    def describe(self) -> str:
        """A table of makespan, mean latency and steals per mode."""
        w = self.workload
        base = self.runs[Stealing.NONE].makespan
        lines = [
            f"work stealing on a {SATELLITES // COLUMNS}x{COLUMNS} satellite torus: "
            f"{len(w.jobs)} jobs, {w.stages} stages, {w.work:.1f} s of work (seed {w.seed}), "
            f"{HOP_SECONDS * 1e3:.0f} ms per hop",
            f"  {'stealing':<11} {'makespan':>9} {'vs none':>8} {'mean latency':>13} "
            f"{'steals':>7} {'hops':>6}",
        ]
        for mode, run in self.runs.items():
            lines.append(
                f"  {mode.value:<11} {run.makespan:8.2f}s {run.makespan / base - 1:+8.1%} "
                f"{run.mean_latency:12.2f}s {run.stolen:7d} {run.stolen_hops:6.0f}"
            )
        lines.append(
            f"  lower bound (work / satellites): {w.work / SATELLITES:.2f}s; "
            f"busiest satellite without stealing ran "
            f"{max(self.runs[Stealing.NONE].ran.values())} stages"
        )
        return "\n".join(lines)


async def _run(rt: Runtime, workload: Workload, mode: Stealing) -> StealingRun:
    rt.binder.configure(stealing=mode, topology=satellite_topology())
    runs: list[tuple[Job, GraphRun]] = []
    start = asyncio.get_running_loop().time()

    async def arrive(job: Job) -> None:
        await asyncio.sleep(job.arrival)
        data = f"data{job.index}"
        rt.declare_model(data, 1 << 20, resident_on=[job.satellite], load_time=0.0)
        g = rt.graph(f"job{job.index}")
        tasks = [
            g.stage(f"t{i}", None, model=data, cost=cost, bind="ready")
            for i, cost in enumerate(job.tasks)
        ]
        g.stage("merge", None, after=tasks, model=data, cost=MERGE_SECONDS, bind="ready")
        runs.append((job, await g.submit()))

    await asyncio.gather(*(arrive(job) for job in workload.jobs))
    latencies = []
    stages: list[BoundStage] = []
    frontiers: list[Frontier] = []
    makespan = 0.0
    for job, run in runs:
        await run.results()
        merge = run["merge"]
        assert isinstance(merge, StageBinding) and merge.submission is not None
        end = (merge.submission.finished_at or 0.0) - start
        makespan = max(makespan, end)
        latencies.append(end - job.arrival)
        frontiers.append(run.frontier)
        for name, handle in run.submissions.items():
            assert isinstance(handle, StageBinding)
            sub = handle.submission
            assert sub is not None and handle.device is not None
            frontier = sub.frontier
            assert frontier is not None
            stages.append(
                BoundStage(
                    f"{run.name}.{name}", handle.home, handle.device, handle.hops,
                    sub.queue.name, sub.queue.axis, sub.epoch, frontier.get(sub.queue.axis),
                )
            )  # fmt: skip
    stats = rt.binder.statistics()
    return StealingRun(
        stealing=mode,
        makespan=makespan,
        latencies=latencies,
        stolen=stats.stolen,
        stolen_hops=stats.stolen_hops,
        ran=stats.ran,
        stages=stages,
        frontiers=frontiers,
    )


async def run_modes(
    workload: Workload, modes: Sequence[Stealing] = MODES, *, trace_path: str | None = None
) -> tuple[dict[Stealing, StealingRun], str]:
    """Run ``workload`` under each mode, on a fresh runtime each; the last one's timeline."""
    runs: dict[Stealing, StealingRun] = {}
    timeline = ""
    for i, mode in enumerate(modes):
        last = i == len(modes) - 1
        async with open_runtime(satellite_devices(), trace=last) as rt:
            runs[mode] = await _run(rt, workload, mode)
        if last:
            if trace_path is not None:
                rt.trace.export_perfetto(trace_path)
            timeline = rt.trace.format_timeline()
    return runs, timeline


async def simulate(
    *, jobs: int = DEFAULT_JOBS, seed: int = DEFAULT_SEED, trace_path: str | None = None
) -> tuple[WorkStealingReport, str]:
    """Run the seeded workload without stealing, neighbour-only and global.

    Returns the report and the global run's text timeline; writes its Perfetto trace to
    ``trace_path`` when given.

    Raises:
        ValueError: ``jobs`` < 1.
    """
    workload = irregular_workload(jobs, seed)
    runs, timeline = await run_modes(workload, trace_path=trace_path)
    return WorkStealingReport(workload, runs), timeline
