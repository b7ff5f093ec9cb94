"""Scenario C2: a 70B model pipeline-parallel across two nodes, with a link between them.

Node 1 runs layers 0-39 on its GPUs, node 2 layers 40-79; each micro-batch's activations
cross the link between the stages. Each node is its own runtime (``node=0`` and
``node=1``) on one virtual-time loop, so every frontier says on which node each of its
entries happened. The link is a :class:`FakeLinkDevice` per end: a message costs
``latency + bytes / bandwidth`` on the sender's NIC queue, and the receiver's NIC queue
signals ``received`` with the sender's frontier merged with its own axis.

Everything is submitted before anything runs, the second stage first. The report sweeps
link bandwidths (400, 100, 25, 10 Gb/s) and latencies (2, 10, 50 us) and gives, for
each, the time to push every micro-batch through, the throughput and the pipeline
bubble (the share of GPU time the two stages sit idle).

Numbers chosen: a micro-batch of 1024 tokens, hidden size 8192 in bf16 (16 MiB of
activations per transfer); each stage computes a micro-batch in 10 ms.
"""

from __future__ import annotations

from dataclasses import dataclass

from .._frontier import Frontier, axis_fields, axis_name
from .._queue import Submission
from .._runtime import open_runtime
from ..devices.fake import FakeDevice

__all__ = (
    "ACTIVATION_BYTES",
    "BANDWIDTHS_GBPS",
    "DEFAULT_MICRO_BATCHES",
    "LATENCIES_US",
    "STAGE_SECONDS",
    "CrossNodePipelineReport",
    "FakeLinkDevice",
    "PipelineRun",
    "run_pipeline",
    "simulate",
)

ACTIVATION_BYTES = 1024 * 8192 * 2
"""Bytes of activations per micro-batch (1024 tokens x hidden 8192 x bf16)."""
STAGE_SECONDS = 10e-3
"""Seconds one stage (40 layers on one node) takes per micro-batch."""
DEFAULT_MICRO_BATCHES = 16
BANDWIDTHS_GBPS = (400.0, 100.0, 25.0, 10.0)
LATENCIES_US = (2.0, 10.0, 50.0)


class FakeLinkDevice(FakeDevice):
    """A NIC in virtual time: a message of ``cost`` bytes takes ``latency + bytes / bandwidth``.

    Args:
        name: the device's name.
        gbps: link bandwidth in gigabits per second (400 by default).
        latency_us: per-message latency in microseconds (2 by default).
    """

    def __init__(self, name: str, *, gbps: float = 400.0, latency_us: float = 2.0) -> None:
        if gbps <= 0:
            raise ValueError(f"link bandwidth must be > 0 Gb/s, got {gbps}")
        if latency_us < 0:
            raise ValueError(f"link latency must be >= 0 us, got {latency_us}")
        super().__init__(name, kind="nic")
        self.gbps = gbps
        self.latency_us = latency_us

    def duration(self, submission: Submission) -> float:
        """Seconds a message of ``submission.cost`` bytes occupies the link."""
        size = submission.cost or 0.0
        return self.latency_us * 1e-6 + size * 8 / (self.gbps * 1e9)


@dataclass(frozen=True)
class PipelineRun:
    """One pass of every micro-batch through both stages over one link setting."""

    gbps: float
    latency_us: float
    micro_batches: int
    seconds: float  # first stage start to last stage end
    busy: float  # GPU-seconds of stage work, both nodes
    frontier: Frontier  # the last micro-batch's final frontier

    @property
    def throughput(self) -> float:
        """Micro-batches per second."""
        return self.micro_batches / self.seconds

    @property
    def bubble(self) -> float:
        """The share of the two stages' time spent idle."""
        return 1.0 - self.busy / (2 * self.seconds)


@dataclass(frozen=True)
class CrossNodePipelineReport:
    """Every link setting's run, the ideal, and the default link's final frontier."""

    runs: tuple[PipelineRun, ...]

    @property
    def ideal_seconds(self) -> float:
        """The time with a free link: (micro-batches + 1) stage steps."""
        m = self.runs[0].micro_batches
        return (m + 1) * STAGE_SECONDS

    def run(self, gbps: float, latency_us: float) -> PipelineRun:
        """The run at ``gbps`` and ``latency_us``.

        Raises:
            KeyError: that setting was not simulated.
        """
        for r in self.runs:
            if r.gbps == gbps and r.latency_us == latency_us:
                return r
        raise KeyError(f"no run at {gbps} Gb/s and {latency_us} us")

    def describe(self) -> str:
        """A table of throughput and bubble per bandwidth and latency."""
        m = self.runs[0].micro_batches
        lines = [
            f"70B pipeline over two nodes: {m} micro-batches of "
            f"{ACTIVATION_BYTES / 2**20:.0f} MiB activations, {STAGE_SECONDS * 1e3:.0f} ms "
            f"per stage; ideal (free link) {self.ideal_seconds * 1e3:.1f} ms",
            f"{'link':>10} {'latency':>8} {'time':>10} {'micro-batches/s':>16} {'bubble':>7}",
        ]
        for r in self.runs:
            lines.append(
                f"{r.gbps:>6.0f} Gb/s {r.latency_us:>5.0f} us {r.seconds * 1e3:>7.2f} ms "
                f"{r.throughput:>16.1f} {r.bubble:>7.1%}"
            )
        default = self.run(BANDWIDTHS_GBPS[0], LATENCIES_US[0])
        names = ", ".join(
            f"{axis_name(a)}@node{axis_fields(a).node}={e}" for a, e in default.frontier
        )
        lines.append(f"final frontier at 400 Gb/s, 2 us: {{{names}}}")
        return "\n".join(lines)


async def run_pipeline(
    *,
    gbps: float = 400.0,
    latency_us: float = 2.0,
    micro_batches: int = DEFAULT_MICRO_BATCHES,
    trace_path: str | None = None,
) -> tuple[PipelineRun, str]:
    """Push ``micro_batches`` through the two-node pipeline once; returns the run and timeline.

    Run it under a virtual-time loop (:func:`asyncfront.testing.run_virtual`).
    """
    if micro_batches < 1:
        raise ValueError(f"micro_batches must be >= 1, got {micro_batches}")
    node1 = [FakeDevice("gpu", kind="gpu"), FakeLinkDevice("nic", gbps=gbps, latency_us=latency_us)]
    node2 = [FakeDevice("gpu", kind="gpu"), FakeLinkDevice("nic", gbps=gbps, latency_us=latency_us)]
    async with open_runtime(node1, node=0) as rt1, open_runtime(node2, node=1) as rt2:
        stage1 = rt1.queue("gpu", name="node1.layers0-39")
        send = rt1.queue("nic", name="node1.nic")
        recv = rt2.queue("nic", name="node2.nic")
        stage2 = rt2.queue("gpu", name="node2.layers40-79")
        computed = rt1.semaphore(name="node1.computed")
        sent = rt1.semaphore(name="node1.sent")
        received = rt2.semaphore(name="node2.received")
        done = rt2.semaphore(name="node2.done")
        second: list[Submission] = []
        # The second stage and the receives are queued before node 1 computes anything.
        for m in range(1, micro_batches + 1):
            recv.submit(None, waits=[(sent, m)], signals=[(received, m)], name=f"recv{m}")
            second.append(
                stage2.submit(
                    None,
                    waits=[(received, m)],
                    signals=[(done, m)],
                    cost=STAGE_SECONDS,
                    name=f"stage2[{m}]",
                )
            )
        first = [
            stage1.submit(None, signals=[(computed, m)], cost=STAGE_SECONDS, name=f"stage1[{m}]")
            for m in range(1, micro_batches + 1)
        ]
        for m in range(1, micro_batches + 1):
            send.submit(
                None,
                waits=[(computed, m)],
                signals=[(sent, m)],
                cost=ACTIVATION_BYTES,
                name=f"send{m}",
            )
        frontier = await done.wait(micro_batches)
    subs = first + second
    start = min(s.started_at for s in subs if s.started_at is not None)
    end = max(s.finished_at for s in subs if s.finished_at is not None)
    busy = sum(
        s.finished_at - s.started_at
        for s in subs
        if s.finished_at is not None and s.started_at is not None
    )
    if trace_path is not None:
        rt1.trace.export_perfetto(trace_path)
    timeline = rt1.trace.format_timeline() + "\n" + rt2.trace.format_timeline()
    return (
        PipelineRun(gbps, latency_us, micro_batches, end - start, busy, frontier),
        timeline,
    )


async def simulate(
    *, micro_batches: int = DEFAULT_MICRO_BATCHES, trace_path: str | None = None
) -> tuple[CrossNodePipelineReport, str]:
    """Sweep every bandwidth and latency; returns the report and the default link's timeline."""
    runs = []
    timeline = ""
    for gbps in BANDWIDTHS_GBPS:
        for latency in LATENCIES_US:
            default = gbps == BANDWIDTHS_GBPS[0] and latency == LATENCIES_US[0]
            run, text = await run_pipeline(
                gbps=gbps,
                latency_us=latency,
                micro_batches=micro_batches,
                trace_path=trace_path if default else None,
            )
            runs.append(run)
            if default:
                timeline = text
    return CrossNodePipelineReport(tuple(runs)), timeline
