"""Graphs across nodes: stages on any node, one atomic submission, failure that travels.

A :class:`ClusterGraph` is the cluster's counterpart of :class:`asyncfront.Graph`: stages
with dependencies, each on a node (``node=``) or placed when a run is submitted. A run
turns every dependency into a cluster semaphore owned by the producing stage's node and
queues every stage, on every node, in dependency order, before any of it runs; a stage
that takes the result of a stage of another node gets a copy of it from that node. The
:class:`ClusterGraphRun` it returns gives the results and the final frontier, whose
entries name the node each happened on.

Placement of a stage without a node asks every live node how it sees the stage (the
same candidates :meth:`asyncfront.Runtime.place` weighs there: residency, load time,
backlog, compute) and applies :func:`asyncfront.place` to the candidates of all nodes
together: a stage with ``model=`` goes where the model is resident, if it is anywhere.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, TypeAlias

from .._budget import QoS
from .._frontier import Frontier
from .._graph import (
    GraphDefinitionError,
    GraphError,
    GraphRunStatistics,
    _as_exception,
    sinks_frontier,
)
from .._placement import (
    PlacementCandidate,
    PlacementDecision,
    PlacementError,
    StageNeeds,
    place,
    runtime_candidates,
)

if TYPE_CHECKING:
    from .._runtime import Runtime
    from ._cluster import (
        Cluster,
        ClusterNode,
        ClusterSemaphore,
        NodeDevice,
        RemoteQueue,
        RemoteSubmission,
        _Prepared,
    )

__all__ = ("ClusterGraph", "ClusterGraphRun", "ClusterPlacement", "ClusterStage")

ClusterStageRef: TypeAlias = "ClusterStage | str"
"""A stage of a cluster graph, or its name."""

_RESERVED = frozenset({"waits", "signals"})
_SEPARATOR = "\x1f"  # between a node's index and a device's name in a merged candidate


@dataclass(frozen=True)
class ClusterPlacement:
    """Where placement put a stage: a node, a device of it, and the decision that chose it.

    ``decision`` is :func:`asyncfront.place`'s over the candidates of every node that
    answered; its device names read ``"<node>:<device>"``.
    """

    node: int
    device: str
    decision: PlacementDecision

    @property
    def reason(self) -> str:
        """The rule that chose it (``"resident"``, ``"cheapest"``...)."""
        return self.decision.reason.value

    @property
    def resident_on(self) -> tuple[int, ...]:
        """The nodes on which the stage's model was resident when it was placed."""
        return tuple(sorted({_split(c.device)[0] for c in self.decision.candidates if c.resident}))

    def as_dict(self) -> dict[str, object]:
        """A plain summary for logs and traces (devices named ``"<node>:<device>"``)."""
        decision = self.decision
        return {
            "node": self.node,
            "device": self.device,
            "reason": decision.reason.value,
            "model": decision.needs.model,
            "deadline": decision.needs.deadline,
            "estimates": {
                _label(c.device): round(c.estimate, 9) if math.isfinite(c.estimate) else "inf"
                for c in decision.candidates
            },
            "resident": [_label(c.device) for c in decision.candidates if c.resident],
        }


def _split(merged: str) -> tuple[int, str]:
    node, device = merged.split(_SEPARATOR, 1)
    return int(node), device


def _label(merged: str) -> str:
    node, device = _split(merged)
    return f"{node}:{device}"


class ClusterStage:
    """One step of a :class:`ClusterGraph`; created by :meth:`ClusterGraph.stage`.

    Attributes:
        graph / name: the graph it belongs to and its unique name there.
        fn / args / kwargs: the work (``None``: a pure barrier); a stage among the
            top-level arguments stands for that stage's result (and is waited for).
        node: the node it runs on, or None (placed at submit).
        device: the device's name on that node, or a queue of it, or None (the node's
            first compute device; with no node, placement chooses).
        model / cost / deadline: what placement weighs (deadline in seconds from submit).
        priority: the priority given with ``priority=`` (0 when none was).
        qos: the tier given with ``qos=``, or None (see :attr:`queue_priority`).
    """

    __slots__ = (
        "_after",
        "_index",
        "_priority_given",
        "args",
        "cost",
        "deadline",
        "device",
        "fn",
        "graph",
        "kwargs",
        "model",
        "name",
        "node",
        "priority",
        "qos",
    )

    def __init__(
        self,
        graph: ClusterGraph,
        name: str,
        fn: Callable[..., Any] | None,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        node: ClusterNode | None,
        device: str | RemoteQueue | None,
        model: str | None,
        after: list[ClusterStage],
        cost: float | None,
        deadline: float | None,
        priority: int | None,
        qos: QoS | None,
        index: int,
    ) -> None:
        self.graph = graph
        self.name = name
        self.fn = fn
        self.args = args
        self.kwargs = kwargs
        self.node = node
        self.device = device
        self.model = model
        self.cost = cost
        self.deadline = deadline
        self.priority = priority if priority is not None else 0
        self.qos = qos
        self._priority_given = priority is not None
        self._after = after
        self._index = index

    @property
    def queue_priority(self) -> int:
        """The priority of the default queue the stage joins.

        The stage's ``qos`` tier's (as :attr:`asyncfront.QoS.priority` maps it, the way a
        local graph's stage does), else its ``priority``, else its graph's ``qos``
        tier's, else 0. A stage given a queue joins that queue at the queue's priority.
        """
        if self.qos is not None:
            return self.qos.priority
        if self._priority_given:
            return self.priority
        graph_qos = self.graph.qos
        return graph_qos.priority if graph_qos is not None else 0

    @property
    def after(self) -> tuple[ClusterStage, ...]:
        """The stages this one waits for, directly."""
        return tuple(self._after)

    def __repr__(self) -> str:
        where = "placed" if self.node is None else f"node {self.node.index}"
        deps = ", ".join(s.name for s in self._after)
        return f"<ClusterStage {self.name!r} of {self.graph.name!r} on {where} after [{deps}]>"


class ClusterGraph:
    """A pipeline of stages across the nodes of a cluster; create with :meth:`Cluster.graph`.

    Define stages with :meth:`stage` (each may wait only for stages defined before it;
    :meth:`add_dependency` adds edges later and refuses cycles), then :meth:`submit` a
    run. A graph may be submitted many times; each run has its own semaphores, dropped
    on the driver and on every node once the run's last stage is done.

    Attributes:
        qos: the tier whose priority the stages' default queues get when a stage gives
            neither ``qos`` nor ``priority`` (None: priority 0).
    """

    def __init__(
        self, cluster: Cluster, name: str = "graph", *, qos: QoS | str | None = None
    ) -> None:
        self.cluster = cluster
        self.name = name
        self.qos: QoS | None = None if qos is None else QoS.coerce(qos)
        self._stages: dict[str, ClusterStage] = {}
        self._indices = itertools.count()
        self._runs = itertools.count(1)

    # -- definition ------------------------------------------------------------------

    def stage(
        self,
        name: str,
        fn: Callable[..., Any] | None = None,
        *args: Any,
        node: ClusterNode | int | None = None,
        device: str | NodeDevice | RemoteQueue | None = None,
        model: str | None = None,
        after: ClusterStageRef | Iterable[ClusterStageRef] = (),
        cost: float | None = None,
        deadline: float | None = None,
        priority: int | None = None,
        qos: QoS | str | None = None,
        **kwargs: Any,
    ) -> ClusterStage:
        """Add a stage that runs ``fn(*args, **kwargs)`` after the stages in ``after``.

        ``node`` pins the stage to a node; ``device`` names its device there (or is a
        queue of that node, whose FIFO it then joins). Without ``node``, placement
        chooses the node and device when a run is submitted, among the nodes' compute
        devices (only those called ``device``, when it is a name), by ``model``'s
        residency, ``cost`` and ``deadline``. Stages among ``args`` and ``kwargs``
        values are waited for and replaced by their results, copied between nodes
        where the stages' nodes differ. ``qos`` (a tier or its name) sets the priority
        of the stage's default queue as it does for a local graph's stage; ``priority``
        sets it as a number (see :attr:`ClusterStage.queue_priority`).

        Raises:
            GraphDefinitionError: a duplicate or empty name, or an unknown stage.
            ValueError: a node or queue of another cluster, a device of another node,
                a negative cost or deadline, both ``qos`` and ``priority``, ``qos``
                with a queue (it has its own priority), or a ``qos`` name of no tier.
            KeyError: no such device on the node.
            TypeError: ``waits`` or ``signals`` among the keyword arguments, or a
                ``qos`` that is neither a :class:`~asyncfront.QoS` nor a string.
        """
        from ._cluster import NodeDevice, RemoteQueue

        if not isinstance(name, str) or not name:
            raise GraphDefinitionError(f"a stage name must be a non-empty string, got {name!r}")
        if name in self._stages:
            raise GraphDefinitionError(f"graph {self.name!r} already has a stage named {name!r}")
        if cost is not None and cost < 0:
            raise ValueError(f"stage {name!r}: cost must be >= 0, got {cost}")
        if deadline is not None and deadline < 0:
            raise ValueError(f"stage {name!r}: deadline must be >= 0 s, got {deadline}")
        reserved = sorted(_RESERVED & kwargs.keys())
        if reserved:
            raise TypeError(
                f"stage {name!r}: {reserved} are the stage's own waits and signals; "
                "use after=[...] for dependencies"
            )
        tier = None if qos is None else QoS.coerce(qos)
        if tier is not None and priority is not None:
            raise ValueError(
                f"stage {name!r}: give qos= or priority=, not both (qos {tier.value!r} "
                f"is priority {tier.priority}, priority= says {priority})"
            )
        if tier is not None and isinstance(device, RemoteQueue):
            raise ValueError(
                f"stage {name!r}: qos sets the priority of a default queue; queue "
                f"{device.name!r} has its own (priority {device.priority})"
            )
        cluster = self.cluster
        where = None if node is None else cluster._node(node)
        target: str | RemoteQueue | None = None
        if isinstance(device, RemoteQueue):
            if device.node.cluster is not cluster:
                raise ValueError(f"stage {name!r}: queue {device.name!r} is of another cluster")
            if where is not None and device.node is not where:
                raise ValueError(
                    f"stage {name!r}: queue {device.name!r} is on node {device.node.index}, "
                    f"not node {where.index}"
                )
            where, target = device.node, device
        elif isinstance(device, NodeDevice):
            if where is not None and device.node != where.index:
                raise ValueError(
                    f"stage {name!r}: device {device.name!r} is of node {device.node}, "
                    f"not node {where.index}"
                )
            where = cluster._node(device.node)
            target = where.device(device.name).name
        elif isinstance(device, str):
            if where is not None:
                where.device(device)
            elif not any(d.name == device for n in cluster.nodes for d in n.devices):
                raise KeyError(f"stage {name!r}: no node of the cluster has a device {device!r}")
            target = device
        elif device is not None:
            raise TypeError(
                f"stage {name!r}: device must be a name, a NodeDevice or a RemoteQueue, "
                f"got {device!r}"
            )
        if isinstance(after, ClusterStage | str):
            after = (after,)
        deps: list[ClusterStage] = []
        for ref in (*after, *_stage_args(args, kwargs)):
            dep = self._resolve(ref)
            if dep not in deps:
                deps.append(dep)
        stage = ClusterStage(
            self,
            name,
            fn,
            tuple(args),
            dict(kwargs),
            where,
            target,
            model,
            deps,
            cost,
            deadline,
            priority,
            tier,
            next(self._indices),
        )
        self._stages[name] = stage
        return stage

    def add_dependency(self, stage: ClusterStageRef, on: ClusterStageRef) -> None:
        """Make ``stage`` wait for ``on`` as well.

        Raises:
            GraphDefinitionError: an unknown stage, or the edge would close a cycle.
        """
        target, dep = self._resolve(stage), self._resolve(on)
        if dep in target._after:
            return
        if dep is target or target in _ancestors(dep):
            raise GraphDefinitionError(
                f"graph {self.name!r}: making {target.name!r} wait for {dep.name!r} would "
                f"close a cycle ({dep.name!r} already waits for {target.name!r})"
            )
        target._after.append(dep)

    @property
    def stages(self) -> tuple[ClusterStage, ...]:
        """Every stage, in definition order."""
        return tuple(sorted(self._stages.values(), key=lambda s: s._index))

    def __getitem__(self, name: str) -> ClusterStage:
        return self._resolve(name)

    def __contains__(self, name: object) -> bool:
        return name in self._stages

    def __len__(self) -> int:
        return len(self._stages)

    def order(self) -> list[ClusterStage]:
        """The stages in the order a run queues them: dependencies first, then definition order."""
        stages = self.stages
        waiting = {s: len(s._after) for s in stages}
        dependants: dict[ClusterStage, list[ClusterStage]] = {s: [] for s in stages}
        for s in stages:
            for dep in s._after:
                dependants[dep].append(s)
        ready = [(s._index, s) for s in stages if not s._after]
        heapq.heapify(ready)
        out: list[ClusterStage] = []
        while ready:
            _, s = heapq.heappop(ready)
            out.append(s)
            for nxt in dependants[s]:
                waiting[nxt] -= 1
                if not waiting[nxt]:
                    heapq.heappush(ready, (nxt._index, nxt))
        return out

    def __repr__(self) -> str:
        return f"<ClusterGraph {self.name!r} stages={len(self._stages)}>"

    # -- submission ------------------------------------------------------------------

    async def submit(self) -> ClusterGraphRun:
        """Queue one run on every node it spans, every stage before any runs; returns it.

        Placement, pickling and every check happen first, so an error leaves nothing
        queued; then every stage is sent in one event-loop turn.

        Raises:
            ClusterError: the cluster is closed.
            NodeLostError: a stage's node was lost.
            PlacementError: no node can take a stage that has no node.
            TypeError: a stage's work or arguments cannot be pickled.
        """
        from ._cluster import RemoteSubmission, _RunSemaphores

        cluster = self.cluster
        cluster._check_open()
        order = self.order()
        placements = await self._place([s for s in order if s.node is None])
        cluster._check_open()  # it may have closed while the nodes answered
        index = next(self._runs)
        run_name = f"{self.name}#{index}"
        queues: dict[ClusterStage, RemoteQueue] = {}
        for s in order:
            queues[s] = self._queue(s, placements.get(s.name))
        dependants = {d for s in order for d in s._after}
        # A serial makes the names unique for the cluster's life: the nodes key pushes by
        # name, so a name is never reused, even after its run's records are dropped.
        serial = next(cluster._run_serials)
        made: list[str] = []
        try:
            sems: dict[ClusterStage, ClusterSemaphore] = {}
            for s in order:
                if s in dependants:
                    sem_name = cluster._unused_semaphore_name(f"{run_name}.{s.name}~r{serial}")
                    sems[s] = cluster.semaphore(sem_name, owner=queues[s].node)
                    made.append(sem_name)
            subs: dict[ClusterStage, RemoteSubmission] = {}
            prepared: list[tuple[RemoteSubmission, _Prepared]] = []
            for s in order:
                queue = queues[s]

                def bind(value: Any) -> Any:
                    return subs[self._resolve(value)] if isinstance(value, ClusterStage) else value

                ready = queue._prepare(
                    s.fn,
                    tuple(map(bind, s.args)),
                    {k: bind(v) for k, v in s.kwargs.items()},
                    [(sems[d], 1) for d in s._after],
                    [(sems[s], 1)] if s in sems else [],
                    s.name,
                    s.cost,
                )
                sub = subs[s] = RemoteSubmission(queue, s.name, next(cluster._ids))
                prepared.append((sub, ready))
        except BaseException:
            for sem_name in made:
                del cluster._sems[sem_name]
            raise
        if sems:
            waiters: dict[ClusterStage, set[int]] = {d: set() for d in sems}
            for s in order:
                for d in s._after:
                    waiters[d].add(queues[s].node.index)
            record = _RunSemaphores(
                tuple(
                    (sem.name, sem.owner.index, tuple(sorted(waiters[d] - {sem.owner.index})))
                    for d, sem in sems.items()
                ),
                len(prepared),
            )
            cluster._graph_runs += 1
            for sub, _ in prepared:
                sub._run = record
        for sub, ready in prepared:
            cluster._commit(sub, ready)
        sinks = tuple(s.name for s in order if s not in dependants)
        handles = {s.name: subs[s] for s in order}
        return ClusterGraphRun(self, index, run_name, handles, sinks, placements)

    def _queue(self, s: ClusterStage, placed: ClusterPlacement | None) -> RemoteQueue:
        from ._cluster import RemoteQueue

        if isinstance(s.device, RemoteQueue):
            return s.device
        if placed is not None:
            node, device = self.cluster.nodes[placed.node], placed.device
        else:
            assert s.node is not None
            node = s.node
            device = s.device if isinstance(s.device, str) else _compute_device(node)
        return self.cluster._default_queue(node, device, s.queue_priority)

    async def _place(self, stages: Sequence[ClusterStage]) -> dict[str, ClusterPlacement]:
        """Ask every live node how it sees each stage; choose among all of them at once."""
        import asyncio

        if not stages:
            return {}
        cluster = self.cluster
        live = [n for n in cluster.nodes if n.lost is None]
        asks = tuple(
            (
                StageNeeds(model=s.model, cost=s.cost, deadline=s.deadline),
                s.device if isinstance(s.device, str) else None,
            )
            for s in stages
        )
        answers = await asyncio.gather(
            *(_await(n.actor.placement_candidates.remote(asks)) for n in live),
            return_exceptions=True,
        )
        per_node: list[tuple[int, list[list[PlacementCandidate] | None]]] = []
        for n, answer in zip(live, answers, strict=True):
            if isinstance(answer, BaseException):
                continue  # a node that did not answer is no candidate
            per_node.append((n.index, answer))
        out: dict[str, ClusterPlacement] = {}
        ahead: dict[str, float] = {}  # work of this run placed ahead, per node and device
        for i, s in enumerate(stages):
            merged = [
                dataclasses.replace(
                    c,
                    device=f"{index}{_SEPARATOR}{c.device}",
                    backlog=c.backlog + ahead.get(f"{index}{_SEPARATOR}{c.device}", 0.0),
                )
                for index, lists in per_node
                if lists[i] is not None
                for c in lists[i]  # type: ignore[union-attr]
            ]
            if not merged:
                wanted = f"model {s.model!r}" if s.model is not None else "its work"
                raise PlacementError(
                    f"stage {s.name!r}: no node of the cluster can take {wanted}"
                    + (f" on a device named {s.device!r}" if isinstance(s.device, str) else "")
                    + f" (nodes asked: {[n.index for n in live]})"
                )
            decision = place(asks[i][0], merged)
            node, device = _split(decision.device)
            out[s.name] = ClusterPlacement(node, device, decision)
            chosen = decision.chosen
            if math.isfinite(chosen.compute) and chosen.compute:
                ahead[decision.device] = ahead.get(decision.device, 0.0) + chosen.compute
        return out

    # -- helpers ---------------------------------------------------------------------

    def _resolve(self, ref: ClusterStageRef) -> ClusterStage:
        if isinstance(ref, str):
            found = self._stages.get(ref)
            if found is None:
                raise GraphDefinitionError(
                    f"graph {self.name!r} has no stage named {ref!r}; "
                    f"stages: {sorted(self._stages)}"
                )
            return found
        if not isinstance(ref, ClusterStage):
            raise TypeError(f"expected a stage or a stage name, got {ref!r}")
        if ref.graph is not self or self._stages.get(ref.name) is not ref:
            raise GraphDefinitionError(
                f"stage {ref.name!r} belongs to graph {ref.graph.name!r}, not {self.name!r}"
            )
        return ref


def _compute_device(node: ClusterNode) -> str:
    """A node's first device that runs work (not a NIC, copy engine or storage)."""
    from .._placement import NON_COMPUTE_KINDS

    for device in node.devices:
        if device.kind not in NON_COMPUTE_KINDS:
            return device.name
    raise KeyError(f"node {node.index} has no compute device: {[d.name for d in node.devices]}")


async def _await(ref: Any) -> Any:
    return await ref


def node_candidates(
    asks: tuple[tuple[StageNeeds, str | None], ...], runtime: Runtime
) -> list[list[PlacementCandidate] | None]:
    """On a node: each stage's candidates there, or None where the node cannot take it."""
    loop_time = runtime._require_loop().time()
    out: list[list[PlacementCandidate] | None] = []
    for needs, device in asks:
        if device is not None and device not in runtime.devices:
            out.append(None)
            continue
        try:
            candidates = runtime_candidates(
                runtime.devices,
                runtime.placement_residency,
                runtime._queues,
                needs,
                loop_time,
                None if device is None else (device,),
            )
        except KeyError:  # the node knows no such model
            out.append(None)
            continue
        out.append(candidates or None)
    return out


def _stage_args(args: Iterable[Any], kwargs: Mapping[str, Any]) -> list[ClusterStage]:
    return [v for v in (*args, *kwargs.values()) if isinstance(v, ClusterStage)]


def _ancestors(stage: ClusterStage) -> set[ClusterStage]:
    seen = {stage}
    todo = [stage]
    while todo:
        for dep in todo.pop()._after:
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


class ClusterGraphRun:
    """One submitted run of a :class:`ClusterGraph`: its submissions, results and frontier."""

    def __init__(
        self,
        graph: ClusterGraph,
        index: int,
        name: str,
        handles: dict[str, RemoteSubmission],
        sinks: tuple[str, ...],
        placements: dict[str, ClusterPlacement],
    ) -> None:
        self.graph = graph
        self.index = index
        self.name = name
        self.sinks = sinks
        self._handles = handles
        self._placements = placements

    @property
    def submissions(self) -> Mapping[str, RemoteSubmission]:
        """``{stage: remote submission}``, in the order they were queued."""
        return MappingProxyType(self._handles)

    @property
    def placements(self) -> Mapping[str, ClusterPlacement]:
        """``{stage: placement}`` for every stage that placement put on a node."""
        return MappingProxyType(self._placements)

    def node_of(self, stage: str) -> int:
        """The index of the node ``stage`` ran (or runs) on."""
        return self._handle(stage).queue.node.index

    def __getitem__(self, stage: str) -> RemoteSubmission:
        return self._handle(stage)

    def done(self) -> bool:
        """Whether every stage completed or failed."""
        return all(h.done() for h in self._handles.values())

    async def wait(self) -> None:
        """Wait until every stage completed or failed (never raises a stage's error)."""
        for handle in self._handles.values():
            await handle._until_done()

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
            exc = handle.exception() if handle.done() else None
            if exc is not None:
                out[name] = exc
        return out

    @property
    def frontier(self) -> Frontier:
        """The merge of the sink stages' frontiers: the run's whole provenance, every node's.

        Final once :meth:`wait` or :meth:`results` returned.
        """
        return sinks_frontier(self._handles, self.sinks)

    def statistics(self) -> GraphRunStatistics:
        """A frozen snapshot of how many stages completed, failed and are pending."""
        return GraphRunStatistics.of(self.name, (h.state for h in self._handles.values()))

    def _handle(self, stage: str) -> RemoteSubmission:
        try:
            return self._handles[stage]
        except KeyError:
            raise KeyError(
                f"run {self.name!r} has no stage {stage!r}; stages: {list(self._handles)}"
            ) from None

    def __repr__(self) -> str:
        st = self.statistics()
        return (
            f"<ClusterGraphRun {self.name!r} stages={st.stages} completed={st.completed} "
            f"failed={st.failed} pending={st.pending}>"
        )
