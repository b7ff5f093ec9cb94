"""Graphs: multi-stage pipelines submitted atomically, and streaming chains.

A :class:`Graph` is a definition: stages, each a function to run on a device, and the
stages each waits for. :meth:`Graph.submit` turns one *run* of it into device-queue
submissions: every dependency becomes a timeline semaphore, every stage is queued (in
dependency order, on the runtime's shared queue for its device and priority) before
any of them runs, and the :class:`GraphRun` it returns gives the results and the final
frontier, the whole provenance of the run.

A stage without a device is placed when the run is submitted (see
:mod:`asyncfront._placement`): where its model's weights are resident, else the
cheapest device that meets its deadline, else the CPU. With ``bind="ready"`` that
choice is only the stage's *home*: the stage joins the runtime's
:class:`~asyncfront.StageBinder` and is bound to a device queue when its waits are met
and a device takes it, its home or, under work stealing, an idle device that takes it
from a busy one's backlog (see :mod:`asyncfront._stealing`).

A failing stage fails the stages that depend on it (they raise
:class:`~asyncfront.SemaphoreFailedError` whose ``__cause__`` is the original error)
and nothing else: independent branches finish. :meth:`GraphRun.results` then raises a
:class:`GraphError` naming the failed stages, and the results that were computed stay
available through :meth:`GraphRun.result`.

:meth:`Graph.chain` unrolls a streaming pipeline: it replicates the stages that lead to
a stage ``N`` times (``name[0]`` ... ``name[N-1]``), adds *skip* edges from each
iteration of a stateful stage to the next, and optionally chains iteration ``k + 1``'s
first stages behind a stage of iteration ``k``.
"""

from __future__ import annotations

import dataclasses
import functools
import heapq
import inspect
import itertools
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final, TypeAlias

from ._budget import QoS
from ._collective import CollectiveChannel, CollectiveStep
from ._frontier import EMPTY, Frontier
from ._placement import (
    PlacementDecision,
    StageNeeds,
    device_speed,
    place,
    runtime_candidates,
)
from ._policy import _StagePlan, _WorkflowRecord, critical_paths
from ._queue import DeviceQueue, SemaphoreValue, Submission, SubmissionState, _deadline_at
from ._semaphore import SemaphoreFailedError
from ._stealing import StageBinding

if TYPE_CHECKING:
    from ._runtime import Runtime
    from .devices._base import Device

__all__ = (
    "ITERATION",
    "Graph",
    "GraphDefinitionError",
    "GraphError",
    "GraphRun",
    "GraphRunStatistics",
    "Stage",
    "StageChain",
)

StageHandle: TypeAlias = "Submission | CollectiveStep | StageBinding"
"""What a stage becomes in a run: a queue submission, a step of a collective channel, or
a stage bound to a device when it becomes ready."""

BINDINGS: Final = ("submit", "ready")
"""When a stage without a device is bound to one: when the run is submitted, or when ready."""

StageRef: TypeAlias = "Stage | str"
"""A stage, or its name."""

Target: TypeAlias = "str | Device | DeviceQueue | CollectiveChannel | None"

_RESERVED = frozenset({"waits", "signals"})  # keywords of queue.submit a stage sets itself


class _Iteration:
    """The type of :data:`ITERATION`."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "ITERATION"


ITERATION: Final = _Iteration()
"""In a stage's arguments, stands for its iteration number (``k`` in ``name[k]``; 0 unchained)."""


class GraphDefinitionError(ValueError):
    """A graph definition is invalid: an unknown stage, a duplicate name or a cycle."""


class GraphError(ExceptionGroup[Exception]):
    """Stages of a graph run failed; one sub-exception per failed stage.

    Attributes:
        run: the run's name.
        failed: ``{stage: error}`` for every failed stage, in submission order. A stage
            that failed because a stage it waits for failed holds a
            :class:`~asyncfront.SemaphoreFailedError` whose ``__cause__`` is the original.
        origins: the stages whose own work failed (not merely a stage they wait for).
    """

    run: str
    failed: dict[str, Exception]
    origins: tuple[str, ...]

    def __new__(cls, run: str, failed: Mapping[str, Exception]) -> GraphError:
        origins = tuple(n for n, e in failed.items() if not isinstance(e, SemaphoreFailedError))
        dependants = [n for n in failed if n not in origins]
        parts = [f"stage {n!r} raised {type(failed[n]).__name__}: {failed[n]}" for n in origins]
        if dependants:
            names = ", ".join(repr(n) for n in dependants)
            parts.append(f"{len(dependants)} dependant stage(s) failed as a result: {names}")
        message = f"graph run {run!r}: " + "; ".join(parts)
        self = super().__new__(cls, message, list(failed.values()))
        self.run = run
        self.failed = dict(failed)
        self.origins = origins
        return self

    def __init__(self, run: str, failed: Mapping[str, Exception]) -> None:
        super().__init__(self.message, list(self.exceptions))

    @property
    def causes(self) -> dict[str, BaseException]:
        """``{stage: original error}``: dependants' errors traced back to the first failure."""
        out: dict[str, BaseException] = {}
        for name, exc in self.failed.items():
            root: BaseException = exc
            while isinstance(root, SemaphoreFailedError):
                root = root.root_cause
            out[name] = root
        return out


class Stage:
    """One step of a :class:`Graph`; created by :meth:`Graph.stage`.

    Attributes:
        graph / name: the graph it belongs to and its unique name there.
        fn / args / kwargs: the work (``None``: a pure barrier). A :class:`Stage` among
            the top-level arguments is replaced by that stage's result when the work runs
            (and makes this stage wait for it); :data:`ITERATION` by the iteration number.
        device: a device name, a queue, a collective channel, or None (placed at submit).
        model / cost / deadline: what placement weighs (deadline in seconds from submit).
        qos: the tier whose priority the stage's queue gets (None: the graph's).
        candidates: device names placement may choose from (None: every compute device).
        bind: ``"submit"`` (placed and queued when the run is submitted) or ``"ready"``
            (placed on a home device's backlog, bound to a queue when its waits are met:
            work stealing may move it).
        iteration: its iteration in a chain (0 otherwise).
    """

    __slots__ = (
        "_after",
        "_chained",
        "_index",
        "args",
        "bind",
        "candidates",
        "cost",
        "deadline",
        "device",
        "fn",
        "graph",
        "iteration",
        "kwargs",
        "model",
        "name",
        "qos",
    )

    def __init__(
        self,
        graph: Graph,
        name: str,
        fn: Callable[..., Any] | None,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        device: str | DeviceQueue | CollectiveChannel | None,
        model: str | None,
        after: list[Stage],
        cost: float | None,
        qos: QoS | None,
        deadline: float | None,
        candidates: tuple[str, ...] | None,
        iteration: int,
        index: int,
        bind: str = "submit",
    ) -> None:
        self.graph = graph
        self.bind = bind
        self.name = name
        self.fn = fn
        self.args = args
        self.kwargs = kwargs
        self.device = device
        self.model = model
        self.cost = cost
        self.qos = qos
        self.deadline = deadline
        self.candidates = candidates
        self.iteration = iteration
        self._after = after
        self._chained: Stage | None = None  # the last iteration that replaced it
        self._index = index

    @property
    def after(self) -> tuple[Stage, ...]:
        """The stages this one waits for, directly."""
        return tuple(self._after)

    def __repr__(self) -> str:
        where = self.device if self.device is not None else "placed"
        if self.bind == "ready":
            where = "bound when ready"
        if isinstance(where, DeviceQueue | CollectiveChannel):
            where = where.name
        deps = ", ".join(s.name for s in self._after)
        return f"<Stage {self.name!r} of {self.graph.name!r} on {where} after [{deps}]>"


class StageChain:
    """What :meth:`Graph.chain` made: the replicated stages of every iteration.

    ``chain[k]`` is iteration ``k``'s copy of the chained stage; ``chain.iteration(k)``
    maps every replicated stage's original name to its copy in iteration ``k``.
    """

    def __init__(self, stage: str, iterations: list[dict[str, Stage]]) -> None:
        self.stage = stage
        self._iterations = iterations

    def iteration(self, k: int) -> dict[str, Stage]:
        """``{original name: copy}`` of iteration ``k``."""
        return dict(self._iterations[k])

    def __getitem__(self, k: int) -> Stage:
        return self._iterations[k][self.stage]

    def __len__(self) -> int:
        return len(self._iterations)

    def __iter__(self) -> Iterator[Stage]:
        return (it[self.stage] for it in self._iterations)

    def __repr__(self) -> str:
        names = sorted(self._iterations[0]) if self._iterations else []
        return f"<StageChain {self.stage!r} x{len(self._iterations)} stages={names}>"


class Graph:
    """A pipeline of stages; create with :meth:`asyncfront.Runtime.graph`.

    Define stages with :meth:`stage` (each may only wait for stages defined before it,
    or add edges later with :meth:`add_dependency`, which refuses cycles), optionally
    unroll a streaming part with :meth:`chain`, then :meth:`submit` a run. A graph may
    be submitted many times; each run has its own semaphores and results.
    """

    def __init__(
        self,
        runtime: Runtime,
        name: str = "graph",
        *,
        qos: QoS | None = None,
        deadline: float | None = None,
    ) -> None:
        if deadline is not None:
            _deadline_at(f"graph {name}", deadline, None, 0.0)
        # A weak reference: a graph and its stages refer to each other, and that cycle must
        # not keep a closed runtime (and its trace) alive until the collector runs.
        self._runtime_ref = weakref.ref(runtime)
        self.name = name
        self.qos = qos
        self.deadline = deadline
        """Seconds from each run's submission by which the run should finish, or None."""
        # stage name -> (runs measured, mean run time in seconds): what estimates fall back on
        self._history: dict[str, tuple[int, float]] = {}
        self._stages: dict[str, Stage] = {}
        self._chained: dict[str, Stage] = {}  # names replaced by a chain -> the original stage
        self._indices = itertools.count()
        self._runs = itertools.count(1)

    @property
    def runtime(self) -> Runtime:
        """The runtime the graph submits to.

        Raises:
            RuntimeError: that runtime has been freed.
        """
        runtime = self._runtime_ref()
        if runtime is None:
            raise RuntimeError(f"graph {self.name!r}: its runtime no longer exists")
        return runtime

    # -- definition ----------------------------------------------------------------

    def stage(
        self,
        name: str,
        fn: Callable[..., Any] | None = None,
        *args: Any,
        device: Target = None,
        model: str | None = None,
        after: StageRef | Iterable[StageRef] = (),
        cost: float | None = None,
        qos: QoS | None = None,
        deadline: float | None = None,
        candidates: Iterable[str] | None = None,
        bind: str = "submit",
        **kwargs: Any,
    ) -> Stage:
        """Add a stage that runs ``fn(*args, **kwargs)`` after the stages in ``after``.

        Stages among ``args`` and ``kwargs`` values are waited for too, and replaced by
        their results. ``device`` pins the stage (a device or its name, a queue, or a
        collective channel, where member ``rank`` runs ``fn(rank, *args)``); None lets
        placement choose among ``candidates`` by ``model``, ``cost`` and ``deadline``.
        ``bind="ready"`` (no ``device``) makes placement's choice only the stage's home:
        it is bound to a device queue when its waits are met, so an idle device may
        steal it (configure with :attr:`asyncfront.Runtime.binder`).

        Raises:
            GraphDefinitionError: a duplicate name or an unknown stage.
            KeyError / ValueError: an unknown device, ``qos`` given with a queue, an
                unknown ``bind``, or ``bind="ready"`` with a ``device``.
            TypeError: ``waits``, ``signals`` or ``deadline_at`` among the keywords (the
                stage sets the first two itself; the last belongs to a run).
        """
        if not isinstance(name, str) or not name:
            raise GraphDefinitionError(f"a stage name must be a non-empty string, got {name!r}")
        if name in self._stages:
            raise GraphDefinitionError(f"graph {self.name!r} already has a stage named {name!r}")
        if cost is not None and cost < 0:
            raise ValueError(f"stage {name!r}: cost must be >= 0, got {cost}")
        if deadline is not None and deadline < 0:
            raise ValueError(f"stage {name!r}: deadline must be >= 0 s, got {deadline}")
        if bind not in BINDINGS:
            raise ValueError(f"stage {name!r}: bind must be one of {BINDINGS}, got {bind!r}")
        if bind == "ready" and device is not None:
            raise ValueError(
                f"stage {name!r}: bind='ready' is for stages without a device; "
                f"a stage pinned to {device!r} is queued when the run is submitted"
            )
        if "deadline_at" in kwargs:
            raise TypeError(
                f"stage {name!r}: deadline_at= is an absolute deadline of a run, so give it "
                "to graph.submit(deadline_at=...); a stage takes deadline= (seconds from the "
                "run's submission)"
            )
        reserved = sorted(_RESERVED & kwargs.keys())
        if reserved:
            raise TypeError(
                f"stage {name!r}: {reserved} are the stage's own waits and signals; "
                "use after=[...] for dependencies"
            )
        if isinstance(after, Stage | str):
            after = (after,)
        deps: list[Stage] = []
        for ref in (*after, *_stage_args(args, kwargs)):
            dep = self._resolve(ref)
            if dep not in deps:
                deps.append(dep)
        target = self._target(name, device)
        if qos is not None and isinstance(target, DeviceQueue | CollectiveChannel):
            raise ValueError(
                f"stage {name!r}: qos sets the priority of a default queue; "
                f"the queue or channel given has its own"
            )
        names = None
        if candidates is not None:
            names = tuple(candidates)
            for device_name in names:
                self.runtime.device(device_name)
        stage = Stage(
            self,
            name,
            fn,
            tuple(args),
            dict(kwargs),
            target,
            model,
            deps,
            cost,
            qos,
            deadline,
            names,
            0,
            next(self._indices),
            bind,
        )
        self._stages[name] = stage
        return stage

    def add_dependency(self, stage: StageRef, on: StageRef) -> None:
        """Make ``stage`` wait for ``on`` as well.

        Raises:
            GraphDefinitionError: an unknown stage, or the edge would close a cycle.
        """
        target, dep = self._resolve(stage), self._resolve(on)
        if dep in target._after:
            return
        path = _path(dep, target)
        if path is not None:
            cycle = " -> ".join(s.name for s in (target, *path))
            raise GraphDefinitionError(
                f"graph {self.name!r}: making {target.name!r} wait for {dep.name!r} would "
                f"close a cycle: {cycle} (each waits for the next)"
            )
        target._after.append(dep)

    def chain(
        self,
        stage: StageRef,
        iterations: int,
        *,
        skip: Iterable[StageRef] = (),
        through: StageRef | None = None,
    ) -> StageChain:
        """Unroll a streaming pipeline: ``iterations`` copies of the subgraph ending at ``stage``.

        The subgraph is ``stage`` and every stage it waits for, transitively. Each of
        them, ``s``, is replaced by ``s[0]`` ... ``s[N-1]``; within an iteration the
        copies wait for each other as the originals did. Across iterations:

        - ``skip``: ``s[k+1]`` also waits for ``s[k]`` (state carried from chunk to
          chunk, such as a decoder's beams or a TTS voice's prosody);
        - ``through``: the subgraph's first stages (those that wait for nothing) of
          iteration ``k+1`` also wait for ``through[k]``, the chain-through point.

        Stages outside the subgraph that waited for (or took the result of) a replaced
        stage now wait for its last iteration, and so does any later reference to the
        original stage.

        Raises:
            GraphDefinitionError: an unknown stage, a ``skip`` or ``through`` stage
                outside the subgraph, or a copy's name already taken.
            ValueError: ``iterations`` < 1.
        """
        end = self._resolve(stage)
        if iterations < 1:
            raise ValueError(f"chain of {end.name!r}: iterations must be >= 1, got {iterations}")
        body = sorted(_ancestors(end), key=lambda s: s._index)
        members = set(body)

        def in_body(ref: StageRef, role: str) -> Stage:
            s = self._resolve(ref)
            if s not in members:
                raise GraphDefinitionError(
                    f"{role} stage {s.name!r} is not part of the subgraph ending at "
                    f"{end.name!r}: {[b.name for b in body]}"
                )
            return s

        skips = {in_body(ref, "skip") for ref in skip}
        via = None if through is None else in_body(through, "through")
        for s in body:
            for k in range(iterations):
                copy_name = f"{s.name}[{k}]"
                if copy_name in self._stages and self._stages[copy_name] not in members:
                    raise GraphDefinitionError(
                        f"graph {self.name!r} already has a stage named {copy_name!r}"
                    )
        copies: dict[Stage, list[Stage]] = {s: [] for s in body}
        for k in range(iterations):
            for s in body:
                deps = [copies[d][k] for d in s._after]
                if k and s in skips:
                    deps.append(copies[s][k - 1])
                if k and via is not None and not s._after and copies[via][k - 1] not in deps:
                    deps.append(copies[via][k - 1])

                def same_iteration(value: Any, k: int = k) -> Any:
                    if isinstance(value, Stage) and value in members:
                        return copies[value][k]
                    return value

                copies[s].append(
                    Stage(
                        self,
                        f"{s.name}[{k}]",
                        s.fn,
                        tuple(map(same_iteration, s.args)),
                        {key: same_iteration(v) for key, v in s.kwargs.items()},
                        s.device,
                        s.model,
                        deps,
                        s.cost,
                        s.qos,
                        s.deadline,
                        s.candidates,
                        k,
                        next(self._indices),
                        s.bind,
                    )
                )
        last = {s: c[-1] for s, c in copies.items()}
        for s in body:
            del self._stages[s.name]
            s._chained = last[s]
            self._chained[s.name] = s

        def final(value: Any) -> Any:
            return last[value] if isinstance(value, Stage) and value in members else value

        for other in self._stages.values():
            other._after = list(dict.fromkeys(map(final, other._after)))
            other.args = tuple(map(final, other.args))
            other.kwargs = {key: final(v) for key, v in other.kwargs.items()}
        for k in range(iterations):
            for s in body:
                self._stages[copies[s][k].name] = copies[s][k]
        return StageChain(
            end.name, [{s.name: copies[s][k] for s in body} for k in range(iterations)]
        )

    # -- inspection ----------------------------------------------------------------

    @property
    def stages(self) -> tuple[Stage, ...]:
        """Every stage, in definition order."""
        return tuple(sorted(self._stages.values(), key=lambda s: s._index))

    def __getitem__(self, name: str) -> Stage:
        return self._resolve(name)

    def __contains__(self, name: object) -> bool:
        return name in self._stages

    def __len__(self) -> int:
        return len(self._stages)

    def order(self) -> list[Stage]:
        """The stages in the order a run queues them.

        Dependencies come first. Among stages whose dependencies are all queued, the one
        estimated to start earliest goes next: its start is the latest estimated finish
        of the stages it waits for (each finishing ``cost`` after its start), ties go to
        the fewer waits along the longest path, then to definition order. On a device
        queue shared by several stages (a FIFO), work that can start sooner is thus not
        queued behind work that must wait longer, such as the next chunk's first stage
        behind the previous chunk's last one in a streaming chain.

        Raises:
            GraphDefinitionError: the stages have a cycle.
        """
        stages = list(self._stages.values())
        waiting = {s: len(s._after) for s in stages}
        dependants: dict[Stage, list[Stage]] = {s: [] for s in stages}
        for s in stages:
            for dep in s._after:
                dependants[dep].append(s)
        finish: dict[Stage, float] = {}
        depth: dict[Stage, int] = {}
        ready = [(0.0, 0, s._index, s) for s in stages if not s._after]
        heapq.heapify(ready)
        out: list[Stage] = []
        while ready:
            start, hops, _, s = heapq.heappop(ready)
            out.append(s)
            finish[s] = start + (s.cost or 0.0)
            depth[s] = hops
            for nxt in dependants[s]:
                waiting[nxt] -= 1
                if not waiting[nxt]:
                    begin = max(finish[d] for d in nxt._after)
                    steps = 1 + max(depth[d] for d in nxt._after)
                    heapq.heappush(ready, (begin, steps, nxt._index, nxt))
        if len(out) != len(stages):  # only add_dependency could have let one in
            stuck = sorted(s.name for s in stages if waiting[s])
            raise GraphDefinitionError(f"graph {self.name!r} has a cycle among {stuck}")
        return out

    def __repr__(self) -> str:
        return f"<Graph {self.name!r} stages={len(self._stages)}>"

    # -- submission ----------------------------------------------------------------

    async def submit(
        self, *, deadline: float | None = None, deadline_at: float | None = None
    ) -> GraphRun:
        """Queue one run of the graph, every stage before any runs; returns the run.

        The run's deadline is ``deadline`` (seconds from now), else ``deadline_at`` (on
        the runtime clock), else the graph's :attr:`deadline`; it flows to every stage
        that sets none (a stage's own ``deadline`` counts from this submission too).
        Deadline-aware device policies weigh it, and :meth:`Runtime.slo_statistics`
        reports per graph name how many runs finished by it.

        Raises:
            RuntimeError: the runtime is not open.
            PlacementError: a stage cannot be placed (nothing is queued then).
            ValueError: both deadlines, or one that is not a finite number (a
                ``deadline`` must also be >= 0).
        """
        return self.submit_nowait(deadline=deadline, deadline_at=deadline_at)

    def submit_nowait(
        self, *, deadline: float | None = None, deadline_at: float | None = None
    ) -> GraphRun:
        """:meth:`submit` for code already on the runtime's loop that cannot await."""
        rt = self.runtime
        loop = rt._require_loop()
        now = loop.time()
        if deadline is None and deadline_at is None:
            deadline = self.deadline
        run_deadline = (
            None
            if deadline is None and deadline_at is None
            else _deadline_at(f"graph {self.name}", deadline, deadline_at, now)
        )
        order = self.order()
        index = next(self._runs)
        run_name = f"{self.name}#{index}"
        # Decide everything first, so that an error leaves nothing queued.
        targets: dict[Stage, DeviceQueue | CollectiveChannel | None] = {}  # None: bind later
        placements: dict[str, PlacementDecision] = {}
        ahead: dict[str, float] = {}  # work of this run queued ahead, per device (seconds)
        deadlines: dict[Stage, float | None] = {}
        for s in order:
            deadlines[s] = run_deadline if s.deadline is None else now + s.deadline
        for s in order:
            priority = _priority(s.qos if s.qos is not None else self.qos)
            target = s.device
            if target is None:
                stage_deadline = deadlines[s]
                decision = self._place(
                    s, ahead, now, None if stage_deadline is None else stage_deadline - now
                )
                placements[s.name] = decision
                if s.bind == "ready":
                    targets[s] = None
                    if s.cost:
                        dev = rt.devices[decision.device]
                        ahead[dev.name] = ahead.get(dev.name, 0.0) + s.cost / device_speed(dev)
                    continue
                target = rt.default_queue(decision.device, priority)
            elif isinstance(target, str):
                target = rt.default_queue(target, priority)
            targets[s] = target
            if isinstance(target, DeviceQueue) and s.cost:
                dev = target.device
                ahead[dev.name] = ahead.get(dev.name, 0.0) + s.cost / device_speed(dev)
        remaining = self._remaining_paths(order, targets, placements)
        parts = sum(
            len(t.members) if isinstance(t, CollectiveChannel) else 1 for t in targets.values()
        )
        record = _WorkflowRecord(
            run_deadline,
            parts,
            self._history,
            None if run_deadline is None else rt._slo_entry(self.name),
        )
        semaphores = {s: rt.semaphore(name=f"{run_name}.{s.name}") for s in order}
        handles: dict[str, StageHandle] = {}
        for s in order:
            waits: list[SemaphoreValue] = [(semaphores[d], 1) for d in s._after]
            signals: list[SemaphoreValue] = [(semaphores[s], 1)]
            fn, args, kwargs = self._bind(s, handles)
            target = targets[s]
            plan = _StagePlan(record, s.name, run_name, remaining[s.name])
            stage_deadline = deadlines[s]
            handle: StageHandle
            if target is None:
                decided = placements[s.name]
                handle = rt.binder.submit(
                    fn, args, kwargs, waits=waits, signals=signals, name=s.name, cost=s.cost,
                    priority=_priority(s.qos if s.qos is not None else self.qos),
                    candidates=[c.device for c in decided.candidates if c.can_hold],
                    home=decided.device, deadline_at=stage_deadline, plan=plan,
                )  # fmt: skip
            else:
                handle = target.submit(
                    fn, *args, waits=waits, signals=signals, name=s.name, cost=s.cost, **kwargs
                )
            notes: dict[str, Any] = {"graph": self.name, "run": run_name, "stage": s.name}
            placed = placements.get(s.name)
            if placed is not None:
                notes["placement"] = placed.as_dict()
            for sub in handle.parts if isinstance(handle, CollectiveStep) else (handle,):
                sub.annotate(**notes)
                if not isinstance(sub, StageBinding):  # a binding was given them at submit
                    sub._plan = plan
                    sub.deadline_at = stage_deadline
                    if sub.done():  # finished inside submit: a barrier with its waits met
                        plan.finished(
                            sub.started_at,
                            now if sub.finished_at is None else sub.finished_at,
                            sub.state is not SubmissionState.COMPLETED,
                        )
            handles[s.name] = handle
        has_dependants = {d for s in order for d in s._after}
        sinks = tuple(s.name for s in order if s not in has_dependants)
        if rt._log_debug:
            rt._log.debug("graph_submit", graph=self.name, run=run_name, stages=len(order))
        return GraphRun(self, index, run_name, handles, sinks, placements, run_deadline)

    def estimate(self, stage: StageRef, device: Device | None = None) -> float:
        """Predicted seconds ``stage`` runs on ``device``: what least-slack policies weigh.

        In order: the device's :class:`~asyncfront.SLOPolicy` ``predictor``; the stage's
        ``cost`` at the device's speed; the mean measured run time of the stage in earlier
        runs of this graph; else 0.0.
        """
        s = self._resolve(stage)
        predictor = getattr(device.policy, "predictor", None) if device is not None else None
        if predictor is not None:
            predicted = predictor(s)
            if predicted is not None:
                return float(predicted)
        if s.cost is not None:
            return s.cost / (device_speed(device) if device is not None else 1.0)
        measured = self._history.get(s.name)
        return measured[1] if measured is not None else 0.0

    def _remaining_paths(
        self,
        order: list[Stage],
        targets: Mapping[Stage, DeviceQueue | CollectiveChannel | None],
        placements: Mapping[str, PlacementDecision],
    ) -> dict[str, float]:
        """``{stage: predicted seconds from its start to the end of the run}``.

        A stage bound when ready (no target yet) is estimated on its home device.
        """
        estimates: dict[str, float] = {}
        dependants: dict[str, list[str]] = {}
        for s in order:
            target = targets[s]
            device: Device
            if target is None:
                device = self.runtime.devices[placements[s.name].device]
            elif isinstance(target, CollectiveChannel):
                device = target.members[0].device
            else:
                device = target.device
            estimates[s.name] = self.estimate(s, device)
            for dep in s._after:
                dependants.setdefault(dep.name, []).append(s.name)
        return critical_paths(estimates, dependants, [s.name for s in order])

    def _place(
        self, s: Stage, ahead: Mapping[str, float], now: float, deadline: float | None = None
    ) -> PlacementDecision:
        rt = self.runtime
        needs = StageNeeds(model=s.model, cost=s.cost, deadline=deadline)
        candidates = runtime_candidates(
            rt.devices, rt.placement_residency, rt._queues, needs, now, devices=s.candidates
        )
        candidates = [
            dataclasses.replace(c, backlog=c.backlog + ahead.get(c.device, 0.0))
            if c.device in ahead
            else c
            for c in candidates
        ]
        binder = rt._binder
        if binder is not None:  # unbound stages homed there are backlog too
            candidates = [
                dataclasses.replace(c, backlog=c.backlog + binder.pending_seconds(c.device))
                for c in candidates
            ]
        decision = place(needs, candidates)
        if rt._log_info:
            rt._log.info(
                "placement",
                graph=self.name,
                stage=s.name,
                model=s.model,
                device=decision.device,
                reason=decision.reason.value,
                estimates=decision.estimates,
            )
        return decision

    def _bind(
        self, s: Stage, handles: Mapping[str, StageHandle]
    ) -> tuple[Callable[..., Any] | None, tuple[Any, ...], dict[str, Any]]:
        """The stage's work with stage arguments bound to this run's results."""
        fn = s.fn
        if fn is None or not _stage_args(s.args, s.kwargs, iteration=True):
            return fn, s.args, s.kwargs

        def bind(value: Any) -> Any:
            if isinstance(value, Stage):
                return _Result(handles[self._resolve(value).name])
            if value is ITERATION:
                return s.iteration
            return value

        args = tuple(map(bind, s.args))
        kwargs = {key: bind(v) for key, v in s.kwargs.items()}
        work = fn
        if inspect.iscoroutinefunction(work):

            @functools.wraps(work)
            async def run_async(*a: Any, **kw: Any) -> Any:
                return await work(*map(_resolved, a), **{k: _resolved(v) for k, v in kw.items()})

            return run_async, args, kwargs

        @functools.wraps(work)
        def run(*a: Any, **kw: Any) -> Any:
            return work(*map(_resolved, a), **{k: _resolved(v) for k, v in kw.items()})

        return run, args, kwargs

    # -- helpers -------------------------------------------------------------------

    def _resolve(self, ref: StageRef) -> Stage:
        if isinstance(ref, str):
            found = self._stages.get(ref) or self._chained.get(ref)
            if found is None:
                raise GraphDefinitionError(
                    f"graph {self.name!r} has no stage named {ref!r}; "
                    f"stages: {sorted(self._stages)}"
                )
            ref = found
        if not isinstance(ref, Stage):
            raise TypeError(f"expected a stage or a stage name, got {ref!r}")
        if ref.graph is not self:
            raise GraphDefinitionError(
                f"stage {ref.name!r} belongs to graph {ref.graph.name!r}, not {self.name!r}"
            )
        while ref._chained is not None:
            ref = ref._chained
        if self._stages.get(ref.name) is not ref:
            raise GraphDefinitionError(
                f"stage {ref.name!r} is no longer part of graph {self.name!r}"
            )
        return ref

    def _target(self, name: str, device: Target) -> str | DeviceQueue | CollectiveChannel | None:
        rt = self.runtime
        if device is None:
            return None
        if isinstance(device, DeviceQueue | CollectiveChannel):
            if device.runtime is not rt:
                raise ValueError(f"stage {name!r}: {device.name!r} belongs to another runtime")
            return device
        if isinstance(device, str):
            return rt.device(device).name
        if rt.devices.get(device.name) is not device:
            raise ValueError(f"stage {name!r}: device {device.name!r} is not in this runtime")
        return device.name


class _Result:
    """A stage's result, read when the stage that takes it runs."""

    __slots__ = ("handle",)

    def __init__(self, handle: StageHandle) -> None:
        self.handle = handle


def _resolved(value: Any) -> Any:
    return value.handle.result() if isinstance(value, _Result) else value


def _stage_args(
    args: Iterable[Any], kwargs: Mapping[str, Any], *, iteration: bool = False
) -> list[Any]:
    """The stages (and, with ``iteration``, the ITERATION markers) among the arguments."""
    kinds: tuple[type, ...] = (Stage, _Iteration) if iteration else (Stage,)
    return [v for v in (*args, *kwargs.values()) if isinstance(v, kinds)]


def _priority(qos: QoS | None) -> int:
    return 0 if qos is None else qos.priority


def _ancestors(stage: Stage) -> set[Stage]:
    seen = {stage}
    todo = [stage]
    while todo:
        for dep in todo.pop()._after:
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def _path(start: Stage, goal: Stage) -> list[Stage] | None:
    """A chain of waits from ``start`` down to ``goal`` (``[start, ..., goal]``), or None."""
    parents: dict[Stage, Stage | None] = {start: None}
    todo = [start]
    while todo:
        s = todo.pop()
        if s is goal:
            path = [s]
            while (p := parents[path[-1]]) is not None:
                path.append(p)
            return path[::-1]
        for dep in s._after:
            if dep not in parents:
                parents[dep] = s
                todo.append(dep)
    return None


@dataclass(frozen=True)
class GraphRunStatistics:
    """A snapshot of a run's stages."""

    name: str
    stages: int
    completed: int
    failed: int
    pending: int

    @classmethod
    def of(cls, name: str, states: Iterable[SubmissionState]) -> GraphRunStatistics:
        """The snapshot of a run called ``name`` whose stages are in ``states``."""
        states = list(states)
        completed = sum(1 for s in states if s is SubmissionState.COMPLETED)
        failed = sum(1 for s in states if s is SubmissionState.FAILED)
        return cls(
            name=name,
            stages=len(states),
            completed=completed,
            failed=failed,
            pending=len(states) - completed - failed,
        )


def sinks_frontier(handles: Mapping[str, Any], sinks: Iterable[str]) -> Frontier:
    """The merge of the sink stages' frontiers (those known yet): a run's provenance."""
    frontier = EMPTY
    for name in sinks:
        f = handles[name].frontier
        if f is not None:
            frontier = frontier.merge(f)
    return frontier


class GraphRun:
    """One submitted run of a :class:`Graph`: its stages' submissions, results and frontier."""

    def __init__(
        self,
        graph: Graph,
        index: int,
        name: str,
        handles: dict[str, StageHandle],
        sinks: tuple[str, ...],
        placements: dict[str, PlacementDecision],
        deadline_at: float | None = None,
    ) -> None:
        self.graph = graph
        self.index = index
        self.name = name
        self.sinks = sinks
        self.deadline_at = deadline_at
        """When the run should finish, on the runtime clock (its SLO), or None."""
        self._handles = handles
        self._placements = placements

    @property
    def submissions(self) -> Mapping[str, StageHandle]:
        """``{stage: submission}`` (a collective step for stages on a channel)."""
        return MappingProxyType(self._handles)

    @property
    def placements(self) -> Mapping[str, PlacementDecision]:
        """``{stage: decision}`` for every stage that placement put on a device."""
        return MappingProxyType(self._placements)

    def __getitem__(self, stage: str) -> StageHandle:
        return self._handle(stage)

    def done(self) -> bool:
        """Whether every stage completed or failed."""
        return all(h.done() for h in self._handles.values())

    @property
    def met_deadline(self) -> bool | None:
        """Whether every stage completed by :attr:`deadline_at`.

        None while the run is unfinished or has no deadline; False once a stage failed.
        """
        if self.deadline_at is None or not self.done():
            return None
        finish = -float("inf")
        for handle in self._handles.values():
            for part in handle.parts if isinstance(handle, CollectiveStep) else (handle,):
                sub = part.submission if isinstance(part, StageBinding) else part
                if (
                    sub is None
                    or sub.state is not SubmissionState.COMPLETED
                    or sub.finished_at is None
                ):
                    return False
                finish = max(finish, sub.finished_at)
        return finish <= self.deadline_at

    async def wait(self) -> None:
        """Wait until every stage completed or failed (never raises a stage's error)."""
        for handle in self._handles.values():
            await handle._until_done()  # a raised error would keep this frame (and run)

    async def results(self) -> dict[str, Any]:
        """Wait for every stage; ``{stage: result}`` in submission order.

        Raises:
            GraphError: some stages failed (:meth:`result` still reads the others).
        """
        await self.wait()
        failed = self.exceptions()
        if failed:
            raise GraphError(self.name, {n: _as_exception(e) for n, e in failed.items()})
        return {name: h.result() for name, h in self._handles.items()}

    def result(self, stage: str) -> Any:
        """The result of one finished stage; raises its error, or if it is not done."""
        return self._handle(stage).result()

    def exceptions(self) -> dict[str, BaseException]:
        """``{stage: error}`` of the stages that failed so far."""
        out: dict[str, BaseException] = {}
        for name, handle in self._handles.items():
            exc = handle.exception()
            if exc is not None:
                out[name] = exc
        return out

    @property
    def frontier(self) -> Frontier:
        """The merge of the sink stages' frontiers: the run's whole provenance.

        Final once :meth:`wait` or :meth:`results` returned.
        """
        return sinks_frontier(self._handles, self.sinks)

    def statistics(self) -> GraphRunStatistics:
        """A frozen snapshot of how many stages completed, failed and are pending."""
        return GraphRunStatistics.of(self.name, (h.state for h in self._handles.values()))

    def _handle(self, stage: str) -> StageHandle:
        try:
            return self._handles[stage]
        except KeyError:
            raise KeyError(
                f"run {self.name!r} has no stage {stage!r}; stages: {list(self._handles)}"
            ) from None

    def __repr__(self) -> str:
        st = self.statistics()
        return (
            f"<GraphRun {self.name!r} stages={st.stages} completed={st.completed} "
            f"failed={st.failed} pending={st.pending}>"
        )


def _as_exception(exc: BaseException) -> Exception:
    if isinstance(exc, Exception):
        return exc
    wrapped = RuntimeError(f"{type(exc).__name__}: {exc}")
    wrapped.__cause__ = exc
    return wrapped
