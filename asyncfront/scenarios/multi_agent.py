"""Scenario B5: LLM agents with end-to-end SLOs on a workstation's two GPUs, in virtual time.

Maestro's experiment (workload-aware scheduling of multi-agent LLM systems) on fake
devices. Agents are graphs of 2-6 dependent LLM calls; each call plays a role
(``plan``, ``code``, ``review``, ``summarize``) whose output length is drawn from that
role's log-normal distribution. Three models share the two 24 GiB GPUs of the workstation
(hardware configuration B), four batch slots each: Llama-3-8B (plan and summarize) and
Phi-3-mini (review) on ``gpu0``, Qwen2.5-Coder-7B (code) on ``gpu1``, each a
Guaranteed context whose budget holds its KV caches (the 4-bit weights stay resident
and are left out).

Workflows arrive as a Poisson process at 0.5, 0.8, 1.0, 1.2 and 1.5 times capacity
(the arrival rate at which the busier GPU's slots are busy all the time, from the mean
work per workflow); each workflow's SLO is 1.5-3 times its unloaded latency (its
critical path with no queueing). Every call is a stage on a queue of its own, so each
GPU's arbiter chooses among the ready calls of every workflow: first come first served
(:class:`~asyncfront.PriorityPolicy`), earliest deadline first
(:class:`~asyncfront.EDFPolicy`) or least slack over the remaining critical path
(:class:`~asyncfront.SLOPolicy`, with a predictor from each role's mean output length
observed so far). The workload (agents, lengths, SLOs, arrival pattern) is seeded, so
every policy sees the same one.

KV reservations: a call reserves its KV cache in its model's budget when it starts,
``(prompt + reserved output tokens) x bytes per token``, and grows the reservation in
steps of ``GROW_TOKENS`` through the budget when its output outgrows it. With
``max_length`` reservation it reserves ``MAX_OUTPUT_TOKENS`` up front (never grows);
with ``predicted`` reservation it reserves a running quantile (``RESERVE_QUANTILE``) of
the output lengths its role produced so far (``MAX_OUTPUT_TOKENS`` before
``MIN_OBSERVATIONS`` of them). The report gives the KV memory reserved (time-averaged
and peak, both GPUs) and the SLO attainment of each.

Numbers chosen: decode 25 ms/token (8B), 22 ms/token (7B), 12 ms/token (3.8B); prefill
0.1 ms per prompt token; prompts 300-1500 tokens; KV bytes per token 128 KiB (8B,
GQA), 56 KiB (7B, GQA), 384 KiB (3.8B); output means plan 250, code 500, review 120,
summarize 180 tokens (sigma 0.6), at most 2048.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .._budget import GiB, QoS
from .._context import ExecutionContext
from .._graph import GraphRun, Stage
from .._policy import EDFPolicy, Policy, PriorityPolicy, SLOPolicy
from .._runtime import Runtime, open_runtime
from ..devices.fake import FakeDevice

__all__ = (
    "AGENTS",
    "DEFAULT_SEED",
    "DEFAULT_WORKFLOWS",
    "GROW_TOKENS",
    "LOADS",
    "FEASIBILITY",
    "MAX_OUTPUT_TOKENS",
    "MAX_WAIT",
    "MAX_WORKFLOWS",
    "MIN_OBSERVATIONS",
    "POLICIES",
    "MODELS",
    "RESERVATIONS",
    "RESERVE_QUANTILE",
    "ROLES",
    "SLOTS",
    "AgentCall",
    "AgentWorkflow",
    "ModelSpec",
    "MultiAgentReport",
    "PolicyResult",
    "ReservationResult",
    "RoleSpec",
    "RunningQuantile",
    "agent_devices",
    "capacity_rate",
    "make_workload",
    "run_multi_agent",
    "simulate",
)

SLOTS = 4
"""Batch slots per GPU (the device's concurrency)."""
MAX_OUTPUT_TOKENS = 2048
"""The longest output a call may produce: what a max-length reservation reserves."""
GROW_TOKENS = 128
"""Tokens a reservation grows by when a call's output outgrows it."""
RESERVE_QUANTILE = 0.9
"""The quantile of a role's observed output lengths that a predicted reservation reserves."""
MIN_OBSERVATIONS = 8
"""Observed outputs of a role before its predicted reservation replaces the maximum."""
LOADS = (0.5, 0.8, 1.0, 1.2, 1.5)
"""Arrival rates of the sweep, as multiples of capacity."""
POLICIES = ("priority", "edf", "slo", "slo_deadline")
"""The policies :func:`run_multi_agent` runs: the default SLO policy (least slack) at
``feasibility`` :data:`FEASIBILITY`, and ``slo_deadline``, earliest deadline first among
the work that can still make it (``order="deadline"``, ``feasibility=0.5``)."""
RESERVATIONS = ("max_length", "predicted")
"""The KV reservation modes compared."""
DEFAULT_WORKFLOWS = 240
"""Workflows per run."""
DEFAULT_SEED = 7
"""The seed of the workload."""
MAX_WORKFLOWS = 2000
"""The most workflows a run takes."""
MAX_WAIT = 600.0
"""Seconds of aging for EDF and SLO: ready work that waited this long goes first.

SLOs here are at most a few minutes, so a call that waited ten is long lost; aging is
the bound on starvation, not a second deadline."""
FEASIBILITY = 0.9
"""The SLO policy's ``feasibility``: the share of the predicted path that must still fit."""


@dataclass(frozen=True)
class ModelSpec:
    """One served model: where it runs, how fast it decodes, what its KV cache costs."""

    name: str
    gpu: str
    seconds_per_token: float
    kv_bytes_per_token: int
    prefill_seconds_per_token: float = 1e-4


@dataclass(frozen=True)
class RoleSpec:
    """An agent role: the model that plays it and its output-length distribution."""

    model: str
    mean_tokens: float
    sigma: float = 0.6

    def draw(self, rng: random.Random) -> int:
        """An output length: log-normal with this mean, clipped to 16..MAX_OUTPUT_TOKENS."""
        mu = math.log(self.mean_tokens) - self.sigma**2 / 2
        return max(16, min(MAX_OUTPUT_TOKENS, round(rng.lognormvariate(mu, self.sigma))))


MODELS = {
    "llama-3-8b": ModelSpec("llama-3-8b", "gpu0", 0.025, 128 * 1024),
    "phi-3-mini": ModelSpec("phi-3-mini", "gpu0", 0.012, 384 * 1024),
    "qwen2.5-coder-7b": ModelSpec("qwen2.5-coder-7b", "gpu1", 0.022, 56 * 1024),
}
"""The three co-located models, by name."""
ROLES = {
    "plan": RoleSpec("llama-3-8b", 250),
    "summarize": RoleSpec("llama-3-8b", 180),
    "review": RoleSpec("phi-3-mini", 120),
    "code": RoleSpec("qwen2.5-coder-7b", 500),
}
"""The agent roles, by name."""
AGENTS: dict[str, tuple[float, tuple[tuple[str, tuple[int, ...]], ...]]] = {
    # name: (share of arrivals, calls as (role, indices of the calls it waits for))
    "qa": (0.3, (("plan", ()), ("summarize", (0,)))),
    "coding": (0.3, (("plan", ()), ("code", (0,)), ("review", (1,)), ("code", (2,)))),
    "research": (
        0.2,
        (
            ("plan", ()),
            ("summarize", (0,)),
            ("summarize", (0,)),
            ("review", (0,)),
            ("summarize", (1, 2, 3)),
        ),
    ),
    "debate": (
        0.2,
        (
            ("plan", ()),
            ("code", (0,)),
            ("review", (1,)),
            ("code", (2,)),
            ("review", (3,)),
            ("summarize", (4,)),
        ),
    ),
}
"""The agents: their share of arrivals and their graphs of 2-6 dependent calls."""
PROMPT_TOKENS = (300, 1500)


@dataclass(frozen=True)
class AgentCall:
    """One LLM call of a workflow, with the lengths it really has."""

    role: str
    after: tuple[int, ...]
    prompt_tokens: int
    output_tokens: int

    @property
    def model(self) -> ModelSpec:
        """The model that serves it."""
        return MODELS[ROLES[self.role].model]

    @property
    def seconds(self) -> float:
        """Its run time on its GPU: prefill plus decoding every output token."""
        m = self.model
        return self.prompt_tokens * m.prefill_seconds_per_token + (
            self.output_tokens * m.seconds_per_token
        )


@dataclass(frozen=True)
class AgentWorkflow:
    """One arrival: an agent's calls, its SLO factor and its gap since the previous one."""

    index: int
    agent: str
    calls: tuple[AgentCall, ...]
    slo_factor: float
    gap: float  # a unit-rate exponential draw; divided by the arrival rate

    @property
    def unloaded_latency(self) -> float:
        """Seconds the workflow takes with nothing else running: its critical path."""
        finish: list[float] = []
        for call in self.calls:
            start = max((finish[d] for d in call.after), default=0.0)
            finish.append(start + call.seconds)
        return max(finish)

    @property
    def slo(self) -> float:
        """Its deadline, seconds from arrival."""
        return self.slo_factor * self.unloaded_latency


def make_workload(
    workflows: int = DEFAULT_WORKFLOWS, seed: int = DEFAULT_SEED
) -> list[AgentWorkflow]:
    """The seeded sequence of workflows every policy and load sees."""
    rng = random.Random(seed)
    names = list(AGENTS)
    shares = [AGENTS[n][0] for n in names]
    out: list[AgentWorkflow] = []
    for i in range(workflows):
        agent = rng.choices(names, shares)[0]
        calls = tuple(
            AgentCall(role, after, rng.randint(*PROMPT_TOKENS), ROLES[role].draw(rng))
            for role, after in AGENTS[agent][1]
        )
        out.append(AgentWorkflow(i, agent, calls, rng.uniform(1.5, 3.0), rng.expovariate(1.0)))
    return out


def capacity_rate(workload: Sequence[AgentWorkflow]) -> float:
    """Workflows per second at which the busier GPU's slots are busy all the time."""
    demand: dict[str, float] = {}
    for wf in workload:
        for call in wf.calls:
            demand[call.model.gpu] = demand.get(call.model.gpu, 0.0) + call.seconds
    per_workflow = max(demand.values()) / len(workload)
    return SLOTS / per_workflow


def agent_devices() -> list[FakeDevice]:
    """The workstation's two 24 GiB GPUs, of ``SLOTS`` batch slots each."""
    return [FakeDevice(f"gpu{i}", memory=24 * GiB, concurrency=SLOTS) for i in range(2)]


class RunningQuantile:
    """A quantile of the last ``window`` observations (None before ``minimum`` of them).

    Args:
        q: the quantile, 0 < q <= 1.
        window: how many recent observations it keeps.
        minimum: observations needed before it answers.

    Raises:
        ValueError: ``q`` outside (0, 1], or ``window`` < ``minimum`` or < 1.
    """

    def __init__(self, q: float = RESERVE_QUANTILE, window: int = 256, minimum: int = 8) -> None:
        if not 0 < q <= 1:
            raise ValueError(f"quantile must be in (0, 1], got {q}")
        if window < 1 or window < minimum:
            raise ValueError(f"window must be >= max(1, minimum={minimum}), got {window}")
        self.q = q
        self.minimum = minimum
        self._values: deque[float] = deque(maxlen=window)

    def observe(self, value: float) -> None:
        """Add one observation."""
        self._values.append(value)

    def value(self) -> float | None:
        """The quantile of what it keeps, or None with fewer than ``minimum`` observations."""
        if len(self._values) < max(1, self.minimum):
            return None
        ordered = sorted(self._values)
        return ordered[min(len(ordered) - 1, math.ceil(self.q * len(ordered)) - 1)]

    def __repr__(self) -> str:
        return f"<RunningQuantile q={self.q} observed={len(self._values)}>"


@dataclass(frozen=True)
class PolicyResult:
    """One policy at one load: SLO attainment, overall and per agent."""

    load: float
    policy: str
    reservation: str
    workflows: int
    met: int
    per_agent: dict[str, float]
    kv_mean_gib: float
    kv_peak_gib: float
    reserved_tokens: int
    used_tokens: int
    makespan: float

    @property
    def attainment(self) -> float:
        """The share of workflows that finished within their SLO."""
        return self.met / self.workflows if self.workflows else 1.0


@dataclass(frozen=True)
class ReservationResult:
    """Max-length against predicted reservation, one load, the same policy and workload."""

    load: float
    max_length: PolicyResult
    predicted: PolicyResult

    @property
    def saving(self) -> float:
        """The share of time-averaged KV memory that predicted reservation did not reserve."""
        base = self.max_length.kv_mean_gib
        return 1.0 - self.predicted.kv_mean_gib / base if base else 0.0


@dataclass
class MultiAgentReport:
    """Every run of the sweep: policies at each load, and the reservation comparison."""

    workflows: int
    seed: int
    capacity: float
    policies: list[PolicyResult] = field(default_factory=list)
    reservations: list[ReservationResult] = field(default_factory=list)

    def result(self, load: float, policy: str) -> PolicyResult:
        """The policy sweep's result of ``policy`` at ``load``."""
        for r in self.policies:
            if r.load == load and r.policy == policy:
                return r
        raise KeyError(f"no result for policy {policy!r} at load {load}")

    def describe(self) -> str:
        """The attainment table per load and policy, and the reservation comparison."""
        lines = [
            f"{self.workflows} agent workflows (seed {self.seed}) on 2 GPUs x {SLOTS} slots; "
            f"capacity {self.capacity * 60:.2f} workflows/min",
            "SLO attainment (predicted KV reservation):",
        ]
        names = [p for p in POLICIES if any(r.policy == p for r in self.policies)]
        lines.append(
            f"  {'load':>5}" + "".join(f"  {n:>12}" for n in names) + f"  {'slo - edf':>10}"
        )
        for load in sorted({r.load for r in self.policies}):
            row = {r.policy: r.attainment for r in self.policies if r.load == load}
            gap = (row.get("slo", 0.0) - row.get("edf", 0.0)) * 100
            cells = "".join(f"  {row[n] * 100:>11.1f}%" for n in names)
            lines.append(f"  {load:>4.1f}x{cells}  {gap:>+7.1f} pt")
        if self.reservations:
            lines.append("KV reservation under the SLO policy: max length vs predicted:")
            lines.append(
                f"  {'load':>5}  {'max-length mean/peak GiB':>25}  {'predicted mean/peak GiB':>24}"
                f"  {'saved':>6}  {'attainment max/pred':>20}"
            )
            for r in self.reservations:
                m, p = r.max_length, r.predicted
                lines.append(
                    f"  {r.load:>4.1f}x  {m.kv_mean_gib:>14.2f} / {m.kv_peak_gib:>6.2f}  "
                    f"{p.kv_mean_gib:>13.2f} / {p.kv_peak_gib:>6.2f}  {r.saving * 100:>5.1f}%"
                    f"  {m.attainment * 100:>9.1f}% / {p.attainment * 100:>5.1f}%"
                )
        return "\n".join(lines)


class _KvMeter:
    """Reserved KV bytes over virtual time: their time average and their peak."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.start = loop.time()
        self._last = self.start
        self.current = 0
        self.peak = 0
        self.area = 0.0
        self.reserved_tokens = 0
        self.used_tokens = 0

    def change(self, nbytes: int) -> None:
        now = self._loop.time()
        self.area += self.current * (now - self._last)
        self._last = now
        self.current += nbytes
        self.peak = max(self.peak, self.current)

    def mean(self) -> float:
        span = self._last - self.start
        return self.area / span if span > 0 else 0.0


class _Predictions:
    """What the scenario has learnt of each role: output lengths seen so far."""

    def __init__(self) -> None:
        self.quantiles = {role: RunningQuantile(minimum=MIN_OBSERVATIONS) for role in ROLES}
        self.totals = {role: [0, 0.0] for role in ROLES}

    def observe(self, role: str, tokens: int) -> None:
        self.quantiles[role].observe(tokens)
        total = self.totals[role]
        total[0] += 1
        total[1] += tokens

    def mean_tokens(self, role: str) -> float:
        count, total = self.totals[role]
        return total / count if count else ROLES[role].mean_tokens

    def reserve_tokens(self, role: str) -> int:
        q = self.quantiles[role].value()
        return MAX_OUTPUT_TOKENS if q is None else max(1, min(MAX_OUTPUT_TOKENS, round(q)))

    def stage_seconds(self, stage: Stage) -> float | None:
        """The SLO policy's predictor: prefill of a mean prompt plus the role's mean output."""
        role = stage.name.split(".", 1)[1]
        spec = ROLES.get(role)
        if spec is None:
            return None
        model = MODELS[spec.model]
        prompt = sum(PROMPT_TOKENS) / 2
        return prompt * model.prefill_seconds_per_token + (
            self.mean_tokens(role) * model.seconds_per_token
        )


async def _call(
    rt: Runtime,
    ctx: ExecutionContext,
    call: AgentCall,
    reservation: str,
    learnt: _Predictions,
    meter: _KvMeter,
) -> int:
    """One LLM call in its batch slot: reserve KV, prefill, decode, grow as needed."""
    model = call.model
    reserve = MAX_OUTPUT_TOKENS if reservation == "max_length" else learnt.reserve_tokens(call.role)
    per_token = model.kv_bytes_per_token
    owner = object()
    held = (call.prompt_tokens + reserve) * per_token
    await rt._memory.reserve(ctx, held, owner=owner)
    meter.change(held)
    try:
        await asyncio.sleep(call.prompt_tokens * model.prefill_seconds_per_token)
        generated = 0
        while reserve < call.output_tokens:
            await asyncio.sleep((reserve - generated) * model.seconds_per_token)
            generated = reserve
            grow = min(GROW_TOKENS, MAX_OUTPUT_TOKENS - reserve)
            await rt._memory.reserve(ctx, grow * per_token, owner=owner)
            held += grow * per_token
            meter.change(grow * per_token)
            reserve += grow
        await asyncio.sleep((call.output_tokens - generated) * model.seconds_per_token)
    finally:
        rt._memory.unreserve(ctx, held, owner=owner)
        meter.change(-held)
    meter.reserved_tokens += reserve
    meter.used_tokens += call.output_tokens
    learnt.observe(call.role, call.output_tokens)
    return call.output_tokens


def _policy(name: str, learnt: _Predictions) -> Policy:
    if name == "priority":
        return PriorityPolicy()
    if name == "edf":
        return EDFPolicy(max_wait=MAX_WAIT)
    if name == "slo":
        return SLOPolicy(predictor=learnt.stage_seconds, max_wait=MAX_WAIT, feasibility=FEASIBILITY)
    if name == "slo_deadline":
        return SLOPolicy(
            predictor=learnt.stage_seconds, max_wait=MAX_WAIT, feasibility=0.5, order="deadline"
        )
    raise ValueError(f"no policy named {name!r}; choose from {POLICIES}")


async def run_multi_agent(
    workload: Sequence[AgentWorkflow],
    *,
    load: float,
    policy: str,
    reservation: str = "predicted",
    capacity: float | None = None,
    trace: bool = False,
    keep: Callable[[Runtime], None] | None = None,
) -> PolicyResult:
    """Run ``workload`` at ``load`` x capacity under one policy and reservation mode.

    ``keep(rt)`` is called with the runtime once its work has finished (to export its
    trace, say).

    Raises:
        ValueError: an unknown policy or reservation mode, or a load that is not > 0.
    """
    if reservation not in RESERVATIONS:
        raise ValueError(f"no reservation mode {reservation!r}; choose from {RESERVATIONS}")
    if not load > 0:
        raise ValueError(f"load must be > 0 (a multiple of capacity), got {load}")
    learnt = _Predictions()
    chosen = _policy(policy, learnt)
    rate = load * (capacity if capacity is not None else capacity_rate(workload))
    loop = asyncio.get_running_loop()
    meter = _KvMeter(loop)
    async with open_runtime(agent_devices(), policy=chosen, trace=trace) as rt:
        contexts = {
            name: rt.create_context(
                name,
                device=spec.gpu,
                max_memory=SLOTS * (PROMPT_TOKENS[1] + MAX_OUTPUT_TOKENS) * spec.kv_bytes_per_token,
                qos=QoS.GUARANTEED,
            )
            for name, spec in MODELS.items()
        }
        start = loop.time()
        arrival = start
        runs: list[GraphRun] = []
        for wf in workload:
            arrival += wf.gap / rate
            delay = arrival - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            g = rt.graph(wf.agent, deadline=wf.slo)
            stages: list[Stage] = []
            queues = []
            for j, call in enumerate(wf.calls):
                ctx = contexts[call.model.name]
                q = rt.queue(
                    call.model.gpu, priority=ctx.priority, name=f"{wf.agent}{wf.index}.{j}"
                )
                queues.append(q)
                stages.append(
                    g.stage(
                        f"{j}.{call.role}",
                        _call,
                        rt,
                        ctx,
                        call,
                        reservation,
                        learnt,
                        meter,
                        device=q,
                        after=[stages[d] for d in call.after],
                    )
                )
            runs.append(g.submit_nowait())
            for q in queues:
                q.close()
        for run in runs:
            await run.wait()
        end = loop.time()
        stats = rt.slo_statistics()
        if keep is not None:
            keep(rt)
    met = sum(1 for run in runs if run.met_deadline)
    return PolicyResult(
        load=load,
        policy=policy,
        reservation=reservation,
        workflows=len(runs),
        met=met,
        per_agent={name: s.attainment for name, s in stats.items()},
        kv_mean_gib=meter.mean() / GiB,
        kv_peak_gib=meter.peak / GiB,
        reserved_tokens=meter.reserved_tokens,
        used_tokens=meter.used_tokens,
        makespan=end - start,
    )


async def simulate(
    *,
    load: int = 0,
    workflows: int = DEFAULT_WORKFLOWS,
    seed: int = DEFAULT_SEED,
    trace_path: str | None = None,
) -> tuple[MultiAgentReport, str]:
    """Run the sweep (or one ``load``, in percent of capacity); return report and timeline.

    Every policy runs at each load with predicted reservation, and the SLO policy with
    max-length reservation too. The timeline and the trace (written to ``trace_path``
    when given) are those of the SLO policy's run at the highest load.
    """
    workload = make_workload(workflows, seed)
    capacity = capacity_rate(workload)
    loads = LOADS if load == 0 else (load / 100,)
    report = MultiAgentReport(workflows, seed, capacity)
    timeline = ""

    def keep(rt: Runtime) -> None:
        nonlocal timeline
        timeline = rt.trace.format_timeline()
        if trace_path is not None:
            rt.trace.export_perfetto(trace_path)

    for x in loads:
        for name in ("priority", "edf", "slo"):
            last = x == loads[-1] and name == "slo"
            report.policies.append(
                await run_multi_agent(
                    workload,
                    load=x,
                    policy=name,
                    capacity=capacity,
                    trace=last,
                    keep=keep if last else None,
                )
            )
        predicted = report.result(x, "slo")
        max_length = await run_multi_agent(
            workload, load=x, policy="slo", reservation="max_length", capacity=capacity
        )
        report.reservations.append(ReservationResult(x, max_length, predicted))
    return report, timeline
