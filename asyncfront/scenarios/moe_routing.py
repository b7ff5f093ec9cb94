"""Scenario C3: Mixtral-8x7B routes token batches to hot and cold experts, in virtual time.

One MoE layer of Mixtral-8x7B on GPUs 4 and 5 of an MI300X node (hardware
configuration C). Its eight experts are the layer's FFNs of 336 MiB each (3 x 4096 x
14336 FP16 weights; 32 layers x 8 of them make the model's ~90 GB of experts). Experts
0-2 are resident on GPU 4, experts 3-5 on GPU 5; experts 6 and 7 are cold, on NVMe only.

Each token batch (one decode step) is routed on GPU 4: every token picks its top 2
experts, from a seeded pattern that favours the hot ones, and the batch needs the union.
The router's result is data, so a host coroutine reads it and submits the rest:

- a resident expert runs on its GPU's expert queue, waiting only for the router;
- a cold expert is placed with :meth:`~asyncfront.Runtime.place` (load + backlog +
  compute over the two GPUs), read from NVMe on the storage queue (``size / 14 GB/s``),
  copied host -> GPU on that GPU's copy queue (``size / 50 GB/s``), which marks it
  resident (:meth:`~asyncfront.Runtime.declare_resident`), and only then run; the next
  batch that picks it needs no load;
- the combine step on GPU 4 waits for every chosen expert: its frontier is the merge
  of the router's and the experts' frontiers, and the next batch's router waits for it.

A frontier is a causal history, and the experts' weights stay where they were loaded,
so once an expert came from NVMe every later frontier that depends on it keeps the
storage axis. What marks a batch that used a cold expert is that its combine's storage
entry *advances* (to that batch's read); a batch whose experts were all resident leaves
it where it was (absent, before the first load).

Numbers chosen (seconds): router 20 us, one expert's FFN over the batch 100 us, combine
20 us. Loading one expert: 0.0252 s from NVMe plus 0.0070 s over PCIe.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from .._budget import GiB
from .._frontier import Frontier, axis_name
from .._placement import PlacementDecision
from .._queue import DeviceQueue, Submission
from .._runtime import Runtime, open_runtime
from .._semaphore import TimelineSemaphore
from ..devices.fake import FakeDevice

__all__ = (
    "COLD_EXPERTS",
    "COPY_BYTES_PER_SECOND",
    "DEFAULT_BATCHES",
    "DEFAULT_SEED",
    "DEFAULT_TOKENS",
    "EXPERT_BYTES",
    "EXPERT_GPUS",
    "MAX_BATCHES",
    "MAX_TOKENS",
    "HOT_EXPERTS",
    "NVME_BYTES_PER_SECOND",
    "SECONDS",
    "ExpertRun",
    "MoeBatch",
    "MoeReport",
    "expert_name",
    "moe_devices",
    "route",
    "run_moe_routing",
    "simulate",
)

EXPERT_BYTES = 3 * 4096 * 14336 * 2
"""One expert FFN of one Mixtral layer in FP16: 336 MiB."""
NVME_BYTES_PER_SECOND = 14e9
"""One NVMe SSD of the node, sequential read."""
COPY_BYTES_PER_SECOND = 50e9
"""Pinned host -> GPU copies over PCIe 5.0 x16."""
EXPERT_GPUS = ("gpu4", "gpu5")
HOT_EXPERTS = {0: "gpu4", 1: "gpu4", 2: "gpu4", 3: "gpu5", 4: "gpu5", 5: "gpu5"}
"""Experts resident at the start, and where."""
COLD_EXPERTS = (6, 7)
"""Experts only on NVMe at the start."""
COLD_WEIGHT = 0.3
"""A cold expert's routing weight relative to a hot one's (cold routing patterns are rare)."""
SECONDS = {"router": 20e-6, "expert": 100e-6, "combine": 20e-6}
"""Seconds on the GPU per batch: the router, one expert's FFN, the weighted combine."""
DEFAULT_BATCHES = 6
DEFAULT_TOKENS = 1
DEFAULT_SEED = 171
MAX_BATCHES = 64
"""The most batches the command line routes."""
MAX_TOKENS = 64
"""The most tokens per batch the command line routes (a batch this large needs every expert)."""


def expert_name(index: int) -> str:
    """The registered model name of expert ``index``."""
    return f"expert{index}"


def moe_devices() -> list[FakeDevice]:
    """GPUs 4 and 5 (192 GiB each), their PCIe copy engines and one NVMe SSD."""
    return [
        FakeDevice("gpu4", memory=192 * GiB),
        FakeDevice("gpu5", memory=192 * GiB),
        FakeDevice("pcie4", kind="copy", speed=COPY_BYTES_PER_SECOND),
        FakeDevice("pcie5", kind="copy", speed=COPY_BYTES_PER_SECOND),
        FakeDevice("nvme", kind="storage", speed=NVME_BYTES_PER_SECOND),
    ]


def route(rng: random.Random, tokens: int) -> tuple[int, ...]:
    """The experts a batch of ``tokens`` tokens needs: the union of each token's top 2."""
    weights = {e: 1.0 for e in HOT_EXPERTS} | {e: COLD_WEIGHT for e in COLD_EXPERTS}
    chosen: set[int] = set()
    for _ in range(tokens):
        first = rng.choices(list(weights), list(weights.values()))[0]
        rest = {e: w for e, w in weights.items() if e != first}
        second = rng.choices(list(rest), list(rest.values()))[0]
        chosen |= {first, second}
    return tuple(sorted(chosen))


@dataclass
class ExpertRun:
    """One chosen expert in one batch: where it ran and, if cold, how it was loaded."""

    expert: int
    device: str
    ffn: Submission
    read: Submission | None = None
    copy: Submission | None = None
    placement: PlacementDecision | None = None

    @property
    def loaded(self) -> bool:
        """Whether this batch had to load the expert from NVMe."""
        return self.read is not None


@dataclass
class MoeBatch:
    """One routed token batch."""

    index: int
    router: Submission
    experts: list[ExpertRun]
    combine: Submission

    @property
    def chosen(self) -> tuple[int, ...]:
        """The experts the router picked."""
        return tuple(run.expert for run in self.experts)

    @property
    def loaded(self) -> tuple[int, ...]:
        """The experts this batch loaded from NVMe."""
        return tuple(run.expert for run in self.experts if run.loaded)

    @property
    def frontier(self) -> Frontier:
        """The combine step's frontier."""
        frontier = self.combine.frontier
        assert frontier is not None, "the batch has not combined"
        return frontier


@dataclass
class MoeReport:
    """Every batch and the axes that matter."""

    batches: list[MoeBatch]
    axes: dict[str, int] = field(default_factory=dict)  # queue name -> axis

    def describe(self) -> str:
        """Each batch's experts, loads and combine frontier."""
        lines = [f"Mixtral-8x7B MoE layer: {len(self.batches)} batches, experts 6-7 cold on NVMe"]
        for b in self.batches:
            parts = []
            for run in b.experts:
                how = "loaded" if run.loaded else "resident"
                parts.append(f"{run.expert}@{run.device} ({how})")
            end = b.combine.finished_at or 0.0
            lines.append(f"  batch {b.index}: experts {', '.join(parts)}; combined at {end:.6f} s")
            names = ", ".join(f"{axis_name(a)}={e}" for a, e in b.frontier)
            lines.append(f"    combine frontier: {{{names}}}")
        return "\n".join(lines)


async def run_moe_routing(
    rt: Runtime,
    *,
    batches: int = DEFAULT_BATCHES,
    tokens: int = DEFAULT_TOKENS,
    seed: int = DEFAULT_SEED,
) -> MoeReport:
    """Route ``batches`` batches of ``tokens`` tokens on ``rt`` (holding :func:`moe_devices`).

    Raises:
        ValueError: fewer than one batch or one token.
    """
    if batches < 1 or tokens < 1:
        raise ValueError(f"MoE routing needs batches >= 1 and tokens >= 1, got {batches}, {tokens}")
    load_time = EXPERT_BYTES / NVME_BYTES_PER_SECOND + EXPERT_BYTES / COPY_BYTES_PER_SECOND
    for e in (*HOT_EXPERTS, *COLD_EXPERTS):
        home = [HOT_EXPERTS[e]] if e in HOT_EXPERTS else []
        rt.declare_model(expert_name(e), EXPERT_BYTES, resident_on=home, load_time=load_time)
    router_q = rt.queue("gpu4", name="moe.router")
    combine_q = rt.queue("gpu4", name="moe.combine")
    expert_qs: dict[str, DeviceQueue] = {g: rt.queue(g, name=f"{g}.experts") for g in EXPERT_GPUS}
    copy_qs = {g: rt.default_queue(f"pcie{g[-1]}") for g in EXPERT_GPUS}
    nvme_q = rt.default_queue("nvme")
    routed = rt.semaphore(name="moe.routed")
    combined = rt.semaphore(name="moe.combined")
    paged = rt.semaphore(name="expert.paged")
    copied = rt.semaphore(name="expert.copied")
    expert_done = {e: rt.semaphore(name=f"{expert_name(e)}.done") for e in HOT_EXPERTS}
    expert_done |= {e: rt.semaphore(name=f"{expert_name(e)}.done") for e in COLD_EXPERTS}
    rng = random.Random(seed)
    report = MoeReport([])
    loads = 0  # signals of ``paged`` and ``copied``, one per load
    uses = dict.fromkeys(expert_done, 0)  # signals of each expert's semaphore

    for t in range(1, batches + 1):
        pick = route(rng, tokens)
        router = router_q.submit(
            lambda p=pick: p,
            name=f"route b{t}",
            cost=SECONDS["router"],
            waits=[(combined, t - 1)] if t > 1 else [],
            signals=[(routed, t)],
        )
        chosen: tuple[int, ...] = await router
        runs = []
        for e in chosen:
            model = expert_name(e)
            waits: list[tuple[TimelineSemaphore, int]] = [(routed, t)]
            resident = [g for g in EXPERT_GPUS if rt.is_resident(model, g)]
            read = copy = None
            decision = None
            if resident:
                gpu = resident[0]
            else:
                decision = rt.place(model, cost=SECONDS["expert"], devices=EXPERT_GPUS)
                gpu = decision.device
                loads += 1
                read = nvme_q.submit(
                    name=f"read {model}",
                    cost=EXPERT_BYTES,
                    waits=[(routed, t)],
                    signals=[(paged, loads)],
                )
                copy = copy_qs[gpu].submit(
                    lambda m=model, g=gpu: rt.declare_resident(m, g),
                    name=f"copy {model}",
                    cost=EXPERT_BYTES,
                    waits=[(paged, loads)],
                    signals=[(copied, loads)],
                )
                waits.append((copied, loads))
            uses[e] += 1
            ffn = expert_qs[gpu].submit(
                name=f"{model} b{t}",
                cost=SECONDS["expert"],
                waits=waits,
                signals=[(expert_done[e], uses[e])],
            )
            runs.append(ExpertRun(e, gpu, ffn, read, copy, decision))
        combine = combine_q.submit(
            name=f"combine b{t}",
            cost=SECONDS["combine"],
            waits=[(expert_done[r.expert], uses[r.expert]) for r in runs],
            signals=[(combined, t)],
        )
        await combine
        report.batches.append(MoeBatch(t, router, runs, combine))
    report.axes = {q.name: q.axis for q in (router_q, combine_q, nvme_q, *expert_qs.values())}
    report.axes |= {q.name: q.axis for q in copy_qs.values()}
    return report


async def simulate(
    *,
    batches: int = DEFAULT_BATCHES,
    tokens: int = DEFAULT_TOKENS,
    seed: int = DEFAULT_SEED,
    trace_path: str | None = None,
) -> tuple[MoeReport, str]:
    """Open a runtime on GPUs 4-5, NVMe and copy engines, run C3, return report and timeline.

    Writes a Perfetto trace to ``trace_path`` when given.
    """
    async with open_runtime(moe_devices()) as rt:
        report = await run_moe_routing(rt, batches=batches, tokens=tokens, seed=seed)
    if trace_path is not None:
        rt.trace.export_perfetto(trace_path)
    return report, rt.trace.format_timeline()
