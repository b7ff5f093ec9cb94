"""Scenario C3b: MoE experts loaded ahead of need from routing foresight, in virtual time.

Scenario C3 (:mod:`~asyncfront.scenarios.moe_routing`) loads a cold expert from NVMe when
the router first picks it. In RL post-training the routing of micro-step k+1 is known
before it runs (the rollout produced it, or a predictor guesses it): the experts it will
need can load from the storage axis while micro-step k computes. This scenario measures
what that foresight buys.

One MoE layer of Mixtral-8x7B (eight experts of 336 MiB, top-2 routing) on one GPU
whose expert context holds four experts: its budget, :data:`SLOTS` experts, is a hard
limit, and every load goes through the residency (:meth:`~asyncfront.Runtime.weights`
accounting-only weights: a read of the expert's bytes on the NVMe axis, then a copy on
the PCIe engine, charged to the context). A micro-step runs the layer's dense part
(attention and the rest of the micro-step, :data:`SECONDS` ``dense``), the router, the
chosen experts' FFNs and the combine; the routing drifts between micro-steps (the expert
popularity reshuffles every few steps), so experts come and go.

- **on demand**: when the router has picked, the missing experts load (least recently
  used experts make room), and the FFNs wait for them: an *expert-load stall*.
- **foresight**: when micro-step k has routed, the prediction for k+1 is known and its
  missing experts load at once, behind k's own loads. Room is made from experts neither
  step needs: unused prefetches first (a wrong prediction is evicted first), then the
  least recently used. Predictions are right for ``accuracy`` percent of the (step,
  expert) picks, exactly, the wrong ones chosen by a seeded draw.

The stall of a micro-step is the time from its routing to the moment all its experts are
resident; the report sums it, with the loads made and the loads wasted (prefetches the
step did not need). The budget is checked after every load, and no eviction is left to
the residency's own pressure handling.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field

from .._budget import GiB, format_bytes
from .._runtime import Runtime, open_runtime
from ..devices.fake import FakeDevice
from .moe_routing import COPY_BYTES_PER_SECOND, EXPERT_BYTES, NVME_BYTES_PER_SECOND

__all__ = (
    "ACCURACIES",
    "DEFAULT_SEED",
    "DEFAULT_STEPS",
    "EXPERTS",
    "LOAD_SECONDS",
    "MAX_STEPS",
    "SECONDS",
    "SLOTS",
    "MoePrefetchReport",
    "MoePrefetchRun",
    "moe_prefetch_devices",
    "predict",
    "route_steps",
    "run_moe_prefetch",
    "simulate",
)

EXPERTS = 8
"""Experts of the layer."""
SLOTS = 4
"""Experts the GPU's expert budget holds at once."""
SECONDS = {"dense": 0.030, "router": 20e-6, "expert": 0.002, "combine": 20e-6}
"""GPU seconds per micro-step: the dense part, the router, one expert's FFN, the combine."""
LOAD_SECONDS = EXPERT_BYTES / NVME_BYTES_PER_SECOND + EXPERT_BYTES / COPY_BYTES_PER_SECOND
"""One expert's load alone: NVMe read then PCIe copy (0.0322 s)."""
ACCURACIES = (100, 80, 50)
"""The prediction accuracies (percent) the scenario reports."""
DEFAULT_STEPS = 48
DEFAULT_SEED = 13
MAX_STEPS = 4096
"""The most micro-steps the command line runs."""
PHASE = 4
"""Micro-steps between reshuffles of the experts' popularity."""


def moe_prefetch_devices() -> list[FakeDevice]:
    """One GPU, its PCIe copy engine and one NVMe SSD."""
    return [
        FakeDevice("gpu0", memory=192 * GiB),
        FakeDevice("pcie0", kind="copy", speed=COPY_BYTES_PER_SECOND),
        FakeDevice("nvme", kind="storage", speed=NVME_BYTES_PER_SECOND),
    ]


def route_steps(steps: int, seed: int) -> list[tuple[int, int]]:
    """The top-2 experts of every micro-step: skewed popularity, reshuffled every few steps."""
    rng = random.Random(seed)
    order = list(range(EXPERTS))
    routes = []
    for step in range(steps):
        if step % PHASE == 0:
            rng.shuffle(order)
        weights = [0.0] * EXPERTS
        for rank, expert in enumerate(order):
            weights[expert] = 1.0 / (1 + rank)
        first = rng.choices(range(EXPERTS), weights)[0]
        weights[first] = 0.0
        second = rng.choices(range(EXPERTS), weights)[0]
        routes.append((min(first, second), max(first, second)))
    return routes


def predict(routes: list[tuple[int, int]], accuracy: int, seed: int) -> list[tuple[int, ...]]:
    """Predicted routes: exactly ``accuracy`` percent of the picks right, the rest wrong.

    Each wrong pick names an expert the step does not use (and the prediction does not
    name already); which picks are wrong, and what they name, is a seeded draw.

    Raises:
        ValueError: ``accuracy`` outside 0..100.
    """
    if isinstance(accuracy, bool) or not isinstance(accuracy, int) or not 0 <= accuracy <= 100:
        raise ValueError(f"accuracy must be a percentage 0..100, got {accuracy!r}")
    rng = random.Random(seed * 7919 + accuracy)
    picks = [(step, i) for step, route in enumerate(routes) for i in range(len(route))]
    wrong = set(rng.sample(picks, round(len(picks) * (100 - accuracy) / 100)))
    predicted = []
    for step, route in enumerate(routes):
        guess = [e for i, e in enumerate(route) if (step, i) not in wrong]
        for i in range(len(route)):
            if (step, i) in wrong:
                others = [e for e in range(EXPERTS) if e not in route and e not in guess]
                guess.append(rng.choice(others))
        predicted.append(tuple(sorted(guess)))
    return predicted


@dataclass
class MoePrefetchRun:
    """One run: on demand (``accuracy`` None) or with foresight at ``accuracy`` percent.

    Attributes:
        accuracy: the prediction accuracy in percent, or None for on-demand loading.
        stalls: per micro-step, seconds from its routing until its experts were resident.
        ran: per micro-step, the experts whose FFN ran (resident, as routed).
        demand_loads / prefetch_loads: loads started by a step's need / by a prediction.
        wasted: prefetches whose step did not use the expert.
        makespan: seconds until the last micro-step combined.
        peak_bytes / budget: the most the expert context held after any load, its limit.
        pressure_evictions: experts the residency had to evict itself (0: the
            scenario's own choices kept within the budget).
    """

    accuracy: int | None
    stalls: list[float] = field(default_factory=list)
    ran: list[tuple[int, ...]] = field(default_factory=list)
    demand_loads: int = 0
    prefetch_loads: int = 0
    wasted: int = 0
    makespan: float = 0.0
    peak_bytes: int = 0
    budget: int = 0
    pressure_evictions: int = 0

    @property
    def stall(self) -> float:
        """Total expert-load stall, seconds."""
        return sum(self.stalls)

    @property
    def loads(self) -> int:
        """Every expert load."""
        return self.demand_loads + self.prefetch_loads

    @property
    def label(self) -> str:
        """``on demand`` or ``foresight 80 %``."""
        return "on demand" if self.accuracy is None else f"foresight {self.accuracy} %"


@dataclass
class MoePrefetchReport:
    """The on-demand baseline and the foresight runs, on the same routing."""

    steps: int
    seed: int
    runs: list[MoePrefetchRun]

    def run(self, accuracy: int | None) -> MoePrefetchRun:
        """The run at ``accuracy`` (None: on demand)."""
        for r in self.runs:
            if r.accuracy == accuracy:
                return r
        raise KeyError(f"no run at accuracy {accuracy!r}")

    def describe(self) -> str:
        """Stall, loads and waste per run, against on-demand loading."""
        base = self.run(None)
        lines = [
            f"Mixtral MoE layer, {EXPERTS} experts, {SLOTS} fit on the GPU; {self.steps} "
            f"micro-steps, seed {self.seed}; one load {LOAD_SECONDS * 1e3:.1f} ms",
            f"  {'':16} {'stall (s)':>10} {'vs on demand':>13} {'loads':>6} {'wasted':>7} "
            f"{'makespan (s)':>13} {'peak':>10}",
        ]
        for r in self.runs:
            ratio = f"{r.stall / base.stall:.0%}" if base.stall else "-"
            lines.append(
                f"  {r.label:16} {r.stall:10.4f} {ratio:>13} {r.loads:6d} {r.wasted:7d} "
                f"{r.makespan:13.4f} {format_bytes(r.peak_bytes):>10}"
            )
        lines.append(f"  expert budget {format_bytes(base.budget)}; never exceeded")
        return "\n".join(lines)


async def run_moe_prefetch(
    rt: Runtime,
    routes: list[tuple[int, int]],
    predictions: list[tuple[int, ...]] | None,
) -> MoePrefetchRun:
    """Run the micro-steps of ``routes`` on ``rt`` (holding :func:`moe_prefetch_devices`).

    ``predictions[k]`` is what is known of step k's routing once step k-1 has routed;
    None loads on demand only.
    """
    budget = SLOTS * EXPERT_BYTES
    ctx = rt.create_context("experts", device="gpu0", max_memory=budget)
    rt.residency.copy_engines["gpu0"] = "pcie0"
    names = [f"expert{e}" for e in range(EXPERTS)]
    for name in names:
        rt.weights(name, size=EXPERT_BYTES, storage="nvme")
    dense_q = rt.queue("gpu0", name="moe.dense")
    router_q = rt.queue("gpu0", name="moe.router")
    expert_q = rt.queue("gpu0", name="moe.experts")
    combine_q = rt.queue("gpu0", name="moe.combine")
    combined = rt.semaphore(name="moe.combined")
    densed = rt.semaphore(name="moe.dense")
    ffn_done = rt.semaphore(name="moe.ffn")
    ffn_count = 0
    run = MoePrefetchRun(None if predictions is None else -1, budget=budget)
    loading: dict[int, asyncio.Task[None]] = {}
    last_use = dict.fromkeys(range(EXPERTS), -1)
    unused_prefetch: set[int] = set()  # prefetched, not yet used by a step
    evictions_before = rt.residency.statistics().evictions

    def resident(e: int) -> bool:
        return rt.residency.resident_on(names[e], "gpu0")

    async def make_room(keep: set[int]) -> bool:
        """Drop one expert outside ``keep`` if the slots are full; False if none can go."""
        while sum(1 for e in range(EXPERTS) if resident(e)) + len(loading) >= SLOTS:
            pinned = {r.weights.name for r in rt.residency.resident("gpu0") if r.pinned}
            victims = [
                e
                for e in range(EXPERTS)
                if resident(e) and e not in keep and names[e] not in pinned
            ]
            if victims:
                # A wrong guess goes first, then the least recently used.
                victim = min(victims, key=lambda e: (e not in unused_prefetch, last_use[e]))
                rt.residency.drop(names[victim], "gpu0")
                if victim in unused_prefetch:
                    unused_prefetch.discard(victim)
                    run.wasted += 1
                return True
            if not loading:
                return False
            await asyncio.wait(list(loading.values()), return_when=asyncio.FIRST_COMPLETED)
        return True

    async def load(e: int) -> None:
        try:
            await rt.ensure_resident(names[e], "gpu0", context=ctx)
            run.peak_bytes = max(run.peak_bytes, rt.usage(ctx).used)
        finally:
            del loading[e]

    def start_load(e: int) -> asyncio.Task[None]:
        task = loading[e] = asyncio.get_running_loop().create_task(load(e))
        return task

    for step, chosen in enumerate(routes):
        dense = dense_q.submit(
            name=f"dense s{step}",
            cost=SECONDS["dense"],
            waits=[(combined, step)] if step else [],
            signals=[(densed, step + 1)],
        )
        router = router_q.submit(
            lambda c=chosen: c,
            name=f"route s{step}",
            cost=SECONDS["router"],
            waits=[(densed, step + 1)],
        )
        await dense
        picked: tuple[int, ...] = await router
        routed = rt.now()
        keep = set(picked)
        for e in picked:  # the step's own needs first
            if not resident(e) and e not in loading:
                if not await make_room(keep):
                    raise RuntimeError(f"step {step}: no expert slot can be freed for {e}")
                start_load(e)
                run.demand_loads += 1
        if predictions is not None and step + 1 < len(routes):
            guess = set(predictions[step + 1])
            for e in sorted(guess):
                if not resident(e) and e not in loading and await make_room(keep | guess):
                    start_load(e)
                    run.prefetch_loads += 1
                    unused_prefetch.add(e)
        needed = [loading[e] for e in picked if e in loading]
        if needed:
            await asyncio.gather(*needed)
        run.stalls.append(rt.now() - routed)
        ffns = []
        held = {r.weights.name: r for r in rt.residency.resident("gpu0")}
        for e in picked:
            handle = held.get(names[e])
            if handle is None:  # a load above failed to keep it: say so, never run without
                raise RuntimeError(f"step {step}: {names[e]} is not resident after its load")
            ffn_count += 1
            sub = expert_q.submit(
                name=f"{names[e]} s{step}",
                cost=SECONDS["expert"],
                signals=[(ffn_done, ffn_count)],
            )
            handle.hold_until_done(sub)
            ffns.append(sub)
            last_use[e] = step
            if e in unused_prefetch:
                unused_prefetch.discard(e)
        if predictions is not None:
            # Prefetches for this step that it did not use: wasted, whatever happens later.
            for e in set(predictions[step]) - set(picked):
                if e in unused_prefetch:
                    unused_prefetch.discard(e)
                    run.wasted += 1
        run.ran.append(picked)
        combine = combine_q.submit(
            name=f"combine s{step}",
            cost=SECONDS["combine"],
            waits=[(ffn_done, ffn_count)],
            signals=[(combined, step + 1)],
        )
        await combine
    if loading:
        await asyncio.gather(*loading.values())
    run.makespan = rt.now()
    run.pressure_evictions = rt.residency.statistics().evictions - evictions_before
    return run


async def _one(
    routes: list[tuple[int, int]],
    accuracy: int | None,
    seed: int,
    trace_path: str | None = None,
) -> tuple[MoePrefetchRun, str]:
    predictions = None if accuracy is None else predict(routes, accuracy, seed)
    async with open_runtime(moe_prefetch_devices()) as rt:
        run = await run_moe_prefetch(rt, routes, predictions)
    run.accuracy = accuracy
    if trace_path is not None:
        rt.trace.export_perfetto(trace_path)
    return run, rt.trace.format_timeline()


async def simulate(
    *,
    steps: int = DEFAULT_STEPS,
    seed: int = DEFAULT_SEED,
    accuracy: int = 100,
    trace_path: str | None = None,
) -> tuple[MoePrefetchReport, str]:
    """Run on-demand loading and foresight at 100, 80 and 50 % (and ``accuracy``).

    Every run routes the same micro-steps. Returns the report and the timeline of the
    run at ``accuracy`` (its Perfetto trace to ``trace_path`` when given).

    Raises:
        ValueError: fewer than one step, or ``accuracy`` outside 0..100.
    """
    if steps < 1:
        raise ValueError(f"the MoE prefetch scenario needs steps >= 1, got {steps}")
    predict([], accuracy, seed)  # refuses a bad accuracy before anything runs
    routes = route_steps(steps, seed)
    accuracies: list[int | None] = [None, *ACCURACIES]
    if accuracy not in ACCURACIES:
        accuracies.append(accuracy)
    runs = []
    timeline = ""
    for a in accuracies:
        run, text = await _one(routes, a, seed, trace_path if a == accuracy else None)
        runs.append(run)
        if a == accuracy:
            timeline = text
    return MoePrefetchReport(steps, seed, runs), timeline
