"""Scenario C1: 4-way tensor-parallel Llama-3-70B with its all-reduce gaps filled, in virtual time.

Each decode step of the 70B model runs its 80 layers on four GPUs as collective-channel
steps: an attention shard, an all-reduce, an FFN shard, an all-reduce. The shards run on
a channel over the four GPUs' high-priority queues (one axis, ``tp``); the all-reduces
run on a channel over the four GPUs' interconnect links (one axis, ``tp.xgmi``), so
while a layer's partial results are exchanged the GPU's compute units are free. Low
priority queues on each GPU hold independent background work that fills those windows:
BGE embedding batches on GPUs 0 and 2, Whisper encoder chunks on GPU 1, LayoutLM pages
on GPU 3. Preemption is at submission boundaries, so a background item that is still
running when the all-reduce finishes delays the next shard.

The report compares the same decode steps with and without the background work:
Llama's own time, the share of the all-reduce windows filled, and the aggregate
throughput (useful GPU work per second over the four GPUs).

Numbers chosen (per layer, per GPU): attention shard 120 us, FFN shard 180 us, each
all-reduce 50 us (100 us of all-reduce per layer, as in the ~3 ms per token over 30
layers the scenario cites, here over 80 layers), so a quarter of Llama's time is
all-reduce. Each GPU's background queue holds work worth :data:`FILL_SUPPLY` (40 %) of
its all-reduce windows, in items of :data:`ITEM_SECONDS` (25 us), submitted up front.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .._frontier import Frontier, axis_name
from .._queue import Submission
from .._runtime import Runtime, open_runtime
from .._semaphore import TimelineSemaphore
from ..devices.fake import FakeDevice

__all__ = (
    "FILLERS",
    "FILL_SUPPLY",
    "ITEM_SECONDS",
    "LAYERS",
    "MAX_DEPTH",
    "SECONDS",
    "TensorParallelReport",
    "TensorParallelRun",
    "simulate",
    "tensor_parallel_devices",
)

GPUS = 4
LAYERS = 80
"""Transformer layers of Llama-3-70B."""
MAX_DEPTH = 8
"""The most decode steps the command line runs (each is 320 collective steps on 8 queues)."""
SECONDS = {"attention": 120e-6, "all_reduce": 50e-6, "ffn": 180e-6}
"""Seconds per layer step on each GPU (all-reduces on the interconnect)."""
FILLERS = {0: "bge", 1: "whisper", 2: "bge", 3: "layoutlm"}
"""The background model on each GPU's low-priority queue."""
FILL_SUPPLY = 0.40
"""Background work per GPU, as a share of that GPU's all-reduce windows."""
ITEM_SECONDS = 25e-6
"""Seconds per background item (an embedding batch, an encoder chunk, a page)."""


def tensor_parallel_devices() -> list[FakeDevice]:
    """Four GPUs and each one's interconnect link (XGMI)."""
    gpus = [FakeDevice(f"gpu{i}") for i in range(GPUS)]
    links = [FakeDevice(f"xgmi{i}", kind="network") for i in range(GPUS)]
    return gpus + links


@dataclass
class TensorParallelRun:
    """One simulation: Llama's steps, the background items and what they cost."""

    tokens: int
    llama_seconds: float  # from the first shard's start to the last all-reduce's end
    llama_work: float  # GPU-seconds of shards, over the four GPUs
    gap_seconds: float  # GPU-seconds of all-reduce windows, over the four GPUs
    fill_work: float  # GPU-seconds of background items finished inside Llama's run
    fillers: dict[int, list[Submission]]
    frontier: Frontier  # the last step's frontier
    channel_axes: tuple[int, int]
    filler_axes: dict[int, int]

    @property
    def filled(self) -> float:
        """Share of the all-reduce windows that background work filled."""
        return self.fill_work / self.gap_seconds

    @property
    def throughput(self) -> float:
        """Useful GPU work per second of Llama's run, over the four GPUs (0..1)."""
        return (self.llama_work + self.fill_work) / (GPUS * self.llama_seconds)


@dataclass
class TensorParallelReport:
    """The same decode steps alone and with gap filling."""

    alone: TensorParallelRun
    filled: TensorParallelRun
    notes: list[str] = field(default_factory=list)

    @property
    def throughput_gain(self) -> float:
        """Relative gain in aggregate throughput from filling the gaps."""
        return self.filled.throughput / self.alone.throughput - 1

    @property
    def llama_slowdown(self) -> float:
        """Relative increase of Llama's own time from the background work."""
        return self.filled.llama_seconds / self.alone.llama_seconds - 1

    def describe(self) -> str:
        """The two runs side by side, the gain and the final frontier."""
        a, f = self.alone, self.filled
        names = ", ".join(f"{axis_name(x)}={e}" for x, e in f.frontier)
        return "\n".join(
            [
                f"Llama-3-70B, 4-way tensor parallel, {f.tokens} decode step(s) of {LAYERS} layers",
                f"  alone:       {a.llama_seconds * 1e3:7.3f} ms, all-reduce windows "
                f"{a.gap_seconds / (GPUS * a.llama_seconds):.0%} of GPU time, "
                f"throughput {a.throughput:.1%}",
                f"  gap-filled:  {f.llama_seconds * 1e3:7.3f} ms, windows filled "
                f"{f.filled:.0%}, throughput {f.throughput:.1%}",
                f"aggregate throughput gain {self.throughput_gain:+.1%}, "
                f"Llama slowed by {self.llama_slowdown:+.1%}",
                f"Llama's last frontier (4 GPUs, 2 entries): {{{names}}}",
            ]
        )


async def _decode(rt: Runtime, tokens: int, fill: bool) -> TensorParallelRun:
    shards = rt.collective([rt.queue(f"gpu{i}", priority=10) for i in range(GPUS)], name="tp")
    links = rt.collective([rt.queue(f"xgmi{i}") for i in range(GPUS)], name="tp.xgmi")
    steps = [("attention", shards), ("all_reduce", links), ("ffn", shards), ("all_reduce", links)]
    gap_per_gpu = tokens * LAYERS * 2 * SECONDS["all_reduce"]
    fillers: dict[int, list[Submission]] = {}
    filler_axes: dict[int, int] = {}
    if fill:
        items = round(FILL_SUPPLY * gap_per_gpu / ITEM_SECONDS)
        for i, model in FILLERS.items():
            q = rt.queue(f"gpu{i}", priority=0, name=f"gpu{i}.{model}")
            filler_axes[i] = q.axis
            fillers[i] = [q.submit(name=model, cost=ITEM_SECONDS) for _ in range(items)]
    llama = TimelineSemaphore(name="llama")
    first = last = None
    value = 0
    for _ in range(tokens):
        for _ in range(LAYERS):
            for name, channel in steps:
                waits = [(llama, value)] if value else []
                value += 1
                last = channel.submit(
                    name=name, waits=waits, signals=[(llama, value)], cost=SECONDS[name]
                )
                first = first or last
    assert first is not None and last is not None
    await last
    start = min(p.started_at or 0.0 for p in first.parts)
    end = max(p.finished_at or 0.0 for p in last.parts)
    for subs in fillers.values():
        for sub in subs:
            await sub
    fill_work = sum(
        max(0.0, min(s.finished_at or 0.0, end) - max(s.started_at or 0.0, start))
        for subs in fillers.values()
        for s in subs
    )
    frontier = last.frontier
    assert frontier is not None
    return TensorParallelRun(
        tokens=tokens,
        llama_seconds=end - start,
        llama_work=GPUS * tokens * LAYERS * (SECONDS["attention"] + SECONDS["ffn"]),
        gap_seconds=GPUS * gap_per_gpu,
        fill_work=fill_work,
        fillers=fillers,
        frontier=frontier,
        channel_axes=(shards.axis, links.axis),
        filler_axes=filler_axes,
    )


async def simulate(
    *, depth: int = 2, trace_path: str | None = None
) -> tuple[TensorParallelReport, str]:
    """Decode ``depth`` tokens alone and gap-filled; return report and the gap-filled timeline.

    Writes a Perfetto trace of the gap-filled run to ``trace_path`` when given.

    Raises:
        ValueError: ``depth`` below 1 (nothing to decode, so nothing to compare).
    """
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ValueError(f"tensor parallel decoding needs depth >= 1 decode steps, got {depth!r}")
    runs = []
    timeline = ""
    for fill in (False, True):
        async with open_runtime(tensor_parallel_devices(), trace=fill) as rt:
            runs.append(await _decode(rt, depth, fill))
        if fill:
            if trace_path is not None:
                rt.trace.export_perfetto(trace_path)
            timeline = rt.trace.format_timeline()
    return TensorParallelReport(alone=runs[0], filled=runs[1]), timeline
