"""The driver's view of a cluster: nodes, remote queue proxies, cross-node semaphores.

The driver holds no devices. It numbers the nodes from 0 (each node runtime's axes
carry that number), sends submissions to a node in sequenced batches (one Ray call per
loop turn and node, fire-and-forget), and takes results and the states of the
semaphores it waits on from each node's stream back to it (or, where that stream does
not connect, from long polls). Nothing here calls ``ray.get``: every Ray answer is
awaited.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import itertools
import os
import shutil
import socket
import tempfile
import uuid
import weakref
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .._budget import QoS
from .._frontier import Frontier, set_axis_name
from .._install import install_hint
from .._queue import Outcome, StalledError, SubmissionState
from .._semaphore import SemaphoreFailedError, TimelineSemaphore
from ..devices._base import Device
from ._errors import ClusterError, NodeLostError
from ._node import NodeRuntime, NodeStatistics
from ._protocol import (
    DeliveryFaults,
    SemaphoreRef,
    SemaphoreUpdate,
    ValueRef,
    apply_update,
    decode_frontier,
    dumps,
    loads,
    unpack_exception,
)

if TYPE_CHECKING:
    from .._runtime import Runtime
    from ._graph import ClusterGraph
    from ._link import Link
    from ._trace import ClusterTrace

__all__ = (
    "Cluster",
    "ClusterNode",
    "ClusterSemaphore",
    "ClusterStatistics",
    "LocalRayCluster",
    "NodeDevice",
    "RemoteQueue",
    "RemoteSubmission",
    "open_cluster",
)

_NODE_RESOURCE = "asyncfront_node_{}"
_MAX_NODES = 256  # the node field of an axis is one byte
_ACTOR_CONCURRENCY = 10_000  # long polls, pings and batches all hold a slot while they run
_RELEASE_INTERVAL = 0.05  # seconds a node keeps a dropped submission's result at most, extra

DevicesFactory = Callable[[int], Iterable[Device]]
WirePair = tuple[tuple[str, int, int], int]


def _default_devices(index: int) -> list[Device]:
    from ..devices.cpu import CpuDevice

    return [CpuDevice("cpu")]


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:  # pragma: no cover - the extra is part of dev
        raise ClusterError(
            f"asyncfront's cluster layer needs Ray: {install_hint('cluster')}"
        ) from exc
    return ray


@dataclass(frozen=True)
class NodeDevice:
    """A device of a node, as the driver knows it."""

    node: int
    name: str
    kind: str
    index: int


@dataclass(frozen=True)
class ClusterStatistics:
    """A snapshot of the driver's side of a cluster.

    ``semaphores`` counts the driver's records of semaphores: the user's (kept until the
    cluster closes) and those of graph runs whose last stage is not done yet;
    ``graph_runs`` counts those runs (a run of one stage, or of stages that wait for
    nothing, makes none). ``result_streams`` are the nodes whose results come back over
    a direct stream (the others answer long polls).
    """

    nodes: int
    lost_nodes: tuple[int, ...]
    semaphores: int
    pending_submissions: int
    batches_sent: int
    submissions_sent: int
    result_streams: tuple[int, ...] = ()
    graph_runs: int = 0


class RemoteSubmission(Outcome):
    """A submission sent to a node; awaitable for its result.

    The result comes back as a value (pickled by the node). A failed work raises here
    with its original type and message; a work that failed because a semaphore it
    waited on failed raises :class:`~asyncfront.SemaphoreFailedError` whose cause is
    the original error.

    Attributes:
        queue: the remote queue it went to.
        name: its label.
        epoch: its epoch on the queue's axis, once the node reported it finished.
        frontier: the causal history it ran with, once finished (None before, or
            when it never ran).
    """

    __slots__ = (
        "__weakref__",
        "_copied_to",
        "_holds",
        "_loop",
        "_run",
        "_sent",
        "epoch",
        "frontier",
        "id",
        "queue",
    )

    def __init__(self, queue: RemoteQueue, name: str, sub_id: int) -> None:
        self.queue = queue
        self.name = name
        self.id = sub_id
        self.epoch: int | None = None
        self.frontier: Frontier | None = None
        self.state = SubmissionState.PENDING
        self._result: Any = None
        self._exception: BaseException | None = None
        self._futures: list[asyncio.Future[None]] | None = None
        self._loop = queue.node.cluster._loop
        # Submissions whose results this one takes as arguments: held until it finishes,
        # so their node keeps those results until they are used.
        self._holds: tuple[RemoteSubmission, ...] = ()
        # The nodes that keep its result: its own, then every node a copy was sent to.
        self._copied_to: list[ClusterNode] = [queue.node]
        self._sent = False
        # The graph run it is a stage of, whose semaphores go once its last stage is done.
        self._run: _RunSemaphores | None = None

    _kind = "remote submission"

    def __del__(self) -> None:
        # Dropped by the driver: the nodes that keep its result may drop it. (A finalizer
        # object per submission would cost several allocations on the submit path.)
        if self._sent:
            with contextlib.suppress(Exception):
                self.queue.node.cluster._release(self._copied_to, self.id)

    def _event_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def __repr__(self) -> str:
        return (
            f"<RemoteSubmission {self.name!r} on node {self.queue.node.index} "
            f"queue {self.queue.name!r} epoch={self.epoch} {self.state.value}>"
        )


class _Work:
    """A submission's work until its batch leaves: the function, the pickled arguments.

    Arguments are pickled at submit; functions when the batch leaves, once per batch
    however many of its submissions run the same function.
    """

    __slots__ = ("args", "fn")

    def __init__(self, fn: Callable[..., Any] | None, args: bytes | None) -> None:
        self.fn = fn
        self.args = args


def _encode_batch(batch: list[tuple[Any, ...]]) -> tuple[list[tuple[Any, ...]], list[bytes | str]]:
    """A batch for the wire: each distinct function pickled once, items naming it by index.

    A function that no longer pickles (its globals changed since it was checked at
    submit) travels as its error message; the node fails the submissions that run it.
    """
    functions: list[bytes | str] = []
    index: dict[int, int] = {}
    out: list[tuple[Any, ...]] = []
    for item in batch:
        if item[0] == "submit" and isinstance(item[3], _Work):
            work = item[3]
            slot = -1
            if work.fn is not None:
                found = index.get(id(work.fn))
                if found is None:
                    found = index[id(work.fn)] = len(functions)
                    try:
                        functions.append(dumps(work.fn))
                    except Exception as exc:
                        functions.append(
                            f"work {item[6]!r} cannot be pickled: {type(exc).__name__}: {exc}"
                        )
                slot = found
            item = (*item[:3], (slot, work.args), *item[4:])
        out.append(item)
    return out, functions


@dataclass(frozen=True)
class _Prepared:
    """A submission checked and pickled, not yet sent: committing it cannot fail."""

    queue: RemoteQueue
    name: str
    payload: _Work | None
    waits: tuple[WirePair, ...]
    signals: tuple[WirePair, ...]
    cost: float | None
    holds: tuple[RemoteSubmission, ...]
    copies: tuple[RemoteSubmission, ...]  # results of other nodes it takes: copied here


class _RunSemaphores:
    """The semaphores one graph run made, and who holds a record of each.

    Plain data (names and node indices): each entry is ``(name, owner, waiters)``, the
    waiters being the other nodes whose stages wait on it. When the run's last stage is
    done (``pending`` reaches 0), the driver drops its records and tells every node that
    holds one to drop its own.
    """

    __slots__ = ("pending", "semaphores")

    def __init__(
        self, semaphores: tuple[tuple[str, int, tuple[int, ...]], ...], pending: int
    ) -> None:
        self.semaphores = semaphores
        self.pending = pending


class RemoteQueue:
    """A proxy for a queue on a node: the same ``submit(...)`` as a local queue.

    Submissions return at once; they travel in sequenced batches and the node runs
    them in the order they were submitted here.
    """

    def __init__(
        self, node: ClusterNode, qid: int, device: NodeDevice, priority: int, name: str
    ) -> None:
        self.node = node
        self.qid = qid
        self.device = device
        self.priority = priority
        self.name = name
        self.axis: int | None = None  # known once the node created the queue
        self._ready: asyncio.Future[int] = node.cluster._loop.create_future()

    async def ready(self) -> int:
        """Wait until the node created the queue; returns its axis."""
        return await self._ready

    def submit(
        self,
        fn: Callable[..., Any] | None = None,
        *args: Any,
        waits: Iterable[tuple[ClusterSemaphore, int]] = (),
        signals: Iterable[tuple[ClusterSemaphore, int]] = (),
        name: str | None = None,
        cost: float | None = None,
        **kwargs: Any,
    ) -> RemoteSubmission:
        """Queue work on the node and return its :class:`RemoteSubmission` at once.

        ``fn`` travels by cloudpickle with ``args`` and ``kwargs`` and runs on the node
        once every ``(semaphore, value)`` in ``waits`` is reached (semaphores of any
        node); then every pair in ``signals`` (semaphores this node owns) is signalled
        with the submission's frontier.

        Raises:
            ClusterError: the cluster is closed.
            NodeLostError: the node was lost.
            TypeError: malformed waits or signals, or work that cannot be pickled.
            ValueError: a signal on a semaphore another node owns, a signal value the
                semaphore already reached (as far as this driver knows), a negative cost.
        """
        cluster = self.node.cluster
        prepared = self._prepare(fn, args, kwargs, waits, signals, name, cost)
        return cluster._commit(RemoteSubmission(self, prepared.name, next(cluster._ids)), prepared)

    def _prepare(
        self,
        fn: Callable[..., Any] | None,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        waits: Iterable[tuple[ClusterSemaphore, int]],
        signals: Iterable[tuple[ClusterSemaphore, int]],
        name: str | None,
        cost: float | None,
    ) -> _Prepared:
        """Check and pickle a submission without sending it or changing any state."""
        cluster = self.node.cluster
        cluster._check_open()
        lost = self.node.lost
        if lost is not None:
            raise NodeLostError(lost.node, lost.reason)
        waits_w = cluster._wire_pairs("waits", waits, None)
        signals_w = cluster._wire_pairs("signals", signals, self.node)
        if cost is not None and cost < 0:
            raise ValueError(f"cost must be >= 0, got {cost}")
        if name is None:
            name = getattr(fn, "__name__", "work") if fn is not None else "barrier"
        payload: _Work | None = None
        holds: list[RemoteSubmission] = []
        if fn is not None or args or kwargs:
            node = self.node
            holds = [v for v in (*args, *kwargs.values()) if isinstance(v, RemoteSubmission)]
            args = tuple(cluster._argument(a, node) for a in args)
            kwargs = {k: cluster._argument(v, node) for k, v in kwargs.items()}
            try:
                if fn is not None:
                    cluster._check_picklable(fn)
                payload = _Work(fn, dumps((args, kwargs)) if args or kwargs else None)
            except Exception as exc:
                raise TypeError(
                    f"work {name!r} for node {self.node.index} cannot be pickled: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
        copies = tuple(h for h in holds if h.queue.node is not self.node)
        return _Prepared(self, name, payload, waits_w, signals_w, cost, tuple(holds), copies)

    def __repr__(self) -> str:
        return (
            f"<RemoteQueue {self.name!r} on node {self.node.index} device "
            f"{self.device.name!r} priority={self.priority}>"
        )


class ClusterSemaphore:
    """A timeline semaphore with one owner node; every other member mirrors it.

    Only work on the owner signals it. The driver's mirror (``value``, ``frontier``)
    follows the owner's pushes once something here waits on it.
    """

    def __init__(self, cluster: Cluster, name: str, owner: ClusterNode, initial: int) -> None:
        self.cluster = cluster
        self.name = name
        self.owner = owner
        self.initial = initial
        self.ref = SemaphoreRef(name, owner.index, initial)
        self._mirror = TimelineSemaphore(initial, name=name)
        self._mirror.bind(cluster._loop)
        self._subscribed = False
        self._claimed = initial  # the highest value a submission from here will signal
        if owner.lost is not None:
            self._mirror.fail(owner.lost)

    @property
    def value(self) -> int:
        """The value as the driver knows it (pushed by the owner)."""
        self._subscribe()
        return self._mirror.value

    @property
    def frontier(self) -> Frontier:
        """The frontier as the driver knows it: the merge of every signal so far."""
        self._subscribe()
        return self._mirror.frontier

    @property
    def failure(self) -> BaseException | None:
        """The error it failed with, as the driver knows it, or None."""
        return self._mirror.failure

    async def wait(self, value: int, timeout: float | None = None) -> Frontier:
        """Wait until the owner's value reaches ``value``; returns its frontier.

        Raises:
            SemaphoreFailedError: the semaphore failed (its owner's work failed, or the
                owner was lost: the cause is then :class:`NodeLostError`).
            TimeoutError: not reached within ``timeout`` seconds (the message names the
                semaphore, its owner and the value known here).
        """
        self._subscribe()
        if timeout is None:
            return await self._mirror.wait(value)
        try:
            async with asyncio.timeout(timeout):
                return await self._mirror.wait(value)
        except TimeoutError:
            raise TimeoutError(
                f"semaphore {self.name!r} (owner node {self.owner.index}) did not reach "
                f"{value} within {timeout} s (value {self._mirror.value} as known here)"
            ) from None

    def _subscribe(self) -> None:
        if not self._subscribed and self.owner.lost is None and self.cluster._open:
            self._subscribed = True
            self.owner._actor.subscribe.remote(tuple(self.ref), self.cluster._sender)

    def __repr__(self) -> str:
        mirror = self._mirror
        state = "failed" if mirror.failure is not None else f"value={mirror.value}"
        return f"<ClusterSemaphore {self.name!r} owner=node {self.owner.index} {state}>"


class ClusterNode:
    """One node of the cluster as the driver sees it: its devices and queues."""

    def __init__(
        self, cluster: Cluster, index: int, actor: Any, devices: Sequence[NodeDevice]
    ) -> None:
        self.cluster = cluster
        self.index = index
        self._actor = actor
        self.devices = tuple(devices)
        self.lost: NodeLostError | None = None
        self._qids = itertools.count(1)
        self._batch: list[tuple[Any, ...]] = []
        self._seq = 0
        self._flush_scheduled = False
        self._released: list[int] = []

    @property
    def actor(self) -> Any:
        """The node runtime's Ray actor handle."""
        return self._actor

    def device(self, name: str) -> NodeDevice:
        """The node's device called ``name``.

        Raises:
            KeyError: no such device (the message lists the node's devices).
        """
        for device in self.devices:
            if device.name == name:
                return device
        raise KeyError(
            f"node {self.index} has no device named {name!r}; it has "
            f"{[d.name for d in self.devices]}"
        )

    def queue(
        self, device: str | NodeDevice, priority: int = 0, name: str | None = None
    ) -> RemoteQueue:
        """A new queue (a new axis of this node) on ``device``, as a proxy.

        Raises:
            KeyError: no such device on this node.
            ValueError: ``device`` belongs to another node.
            NodeLostError: the node was lost.
        """
        self.cluster._check_open()
        if self.lost is not None:
            raise NodeLostError(self.lost.node, self.lost.reason)
        if isinstance(device, NodeDevice):
            if device.node != self.index:
                raise ValueError(
                    f"device {device.name!r} belongs to node {device.node}, not {self.index}"
                )
            dev = self.device(device.name)
        else:
            dev = self.device(device)
        qid = next(self._qids)
        qname = name if name is not None else f"n{self.index}.{dev.name}.r{qid}"
        queue = RemoteQueue(self, qid, dev, priority, qname)
        self.cluster._queues[(self.index, qid)] = queue
        self.cluster._send(self, ("queue", qid, dev.name, priority, qname))
        return queue

    async def pid(self) -> int:
        """The process id of the node runtime."""
        return int(await self._actor.pid.remote())

    async def statistics(self) -> NodeStatistics:
        """A snapshot of the records the node runtime keeps (see :class:`NodeStatistics`).

        Raises:
            ClusterError: the cluster is closed.
            NodeLostError: the node was lost.
        """
        self.cluster._check_open()
        if self.lost is not None:
            raise NodeLostError(self.lost.node, self.lost.reason)
        stats: NodeStatistics = await _await(self._actor.statistics.remote())
        return stats

    def collective(self, queues: Iterable[RemoteQueue], *, name: str | None = None) -> RemoteQueue:
        """A collective channel over ``queues`` of this node, as a queue proxy.

        The node opens :meth:`asyncfront.Runtime.collective` over its queues: one axis of
        domain COLLECTIVE, carrying this node's index. ``submit(fn, ...)`` on the proxy
        runs one step of the channel: ``fn(rank, *args, **kwargs)`` on every member (or a
        barrier with ``fn=None``); its result is the list of the members' results and its
        signals carry the channel's axis.

        Raises:
            ValueError: no queues, a queue of another node or of another cluster, or the
                same queue twice.
            ClusterError: the cluster is closed.
            NodeLostError: the node was lost.
        """
        self.cluster._check_open()
        if self.lost is not None:
            raise NodeLostError(self.lost.node, self.lost.reason)
        members = list(queues)
        if not members:
            raise ValueError(f"a collective on node {self.index} needs at least one queue")
        for queue in members:
            if not isinstance(queue, RemoteQueue) or queue.node is not self:
                raise ValueError(
                    f"a collective on node {self.index} takes this node's queues, not {queue!r}"
                )
        qids = [q.qid for q in members]
        if len(set(qids)) != len(qids):
            raise ValueError(f"a collective on node {self.index} lists a queue twice: {members}")
        qid = next(self._qids)
        cname = name if name is not None else f"n{self.index}.collective.r{qid}"
        channel = RemoteQueue(self, qid, members[0].device, 0, cname)
        self.cluster._queues[(self.index, qid)] = channel
        self.cluster._send(self, ("collective", qid, tuple(qids), cname))
        return channel

    async def run(self, fn: Callable[[Runtime], Any]) -> Any:
        """Run ``fn(runtime)`` on the node's event loop with its :class:`~asyncfront.Runtime`.

        For what the remote queues do not reach: memory, pagers, models and scenarios
        that take a runtime. ``fn`` travels by cloudpickle; a coroutine it returns is
        awaited on the node; the result travels back by pickle. ``fn`` must not block
        (the node's queues, pushes and heartbeat share that loop).

        Raises:
            TypeError: ``fn`` or its result cannot be pickled.
            NodeLostError: the node was lost.
            Exception: what ``fn`` raised, with its type and message.
        """
        self.cluster._check_open()
        if self.lost is not None:
            raise NodeLostError(self.lost.node, self.lost.reason)
        try:
            payload = dumps(fn)
        except Exception as exc:
            raise TypeError(
                f"a function for node {self.index} cannot be pickled: {type(exc).__name__}: {exc}"
            ) from exc
        answer = await _await(self._actor.run.remote(payload))
        ok, value = loads(answer)
        if not ok:
            raise unpack_exception(value)
        return value

    def __repr__(self) -> str:
        state = "lost" if self.lost is not None else "live"
        return f"<ClusterNode {self.index} {state} devices={[d.name for d in self.devices]}>"


class Cluster:
    """A set of node runtimes on Ray, driven from this process.

    Open it with :func:`open_cluster`. Nodes are numbered from 0; the driver holds no
    devices.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        *,
        heartbeat_interval: float,
        heartbeat_timeout: float,
        stall_timeout: float,
        faults: DeliveryFaults | None,
    ) -> None:
        self._loop = loop
        self._sender = f"driver-{uuid.uuid4().hex[:12]}"
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        self.stall_timeout = stall_timeout
        self._faults = faults
        self.nodes: tuple[ClusterNode, ...] = ()
        self._sems: dict[str, ClusterSemaphore] = {}
        self._queues: dict[tuple[int, int], RemoteQueue] = {}
        self._pending: dict[int, RemoteSubmission] = {}
        self._ids = itertools.count(1)
        self._tasks: set[asyncio.Task[None]] = set()
        self._progress: asyncio.Future[None] | None = None
        self._open = False
        self._batches_sent = 0
        self._submissions_sent = 0
        self._traces: dict[int, list[dict[str, Any]]] = {}
        self._links: list[Link] = []
        self._links_future: asyncio.Future[None] | None = None
        self.link_timeout = 30.0
        self._default_queues: dict[tuple[int, str, int], RemoteQueue] = {}
        # Results come back over a direct stream from each node where it connects (one
        # frame per burst of news), else through the long polls.
        self._result_server: asyncio.Server | None = None
        self._result_token = b""
        self._result_readers: dict[int, asyncio.Task[None]] = {}
        # Functions known to pickle: checked once, pickled again with every batch.
        self._picklable: weakref.WeakKeyDictionary[Any, None] = weakref.WeakKeyDictionary()
        self._names = itertools.count(2)
        # Graph runs whose semaphores are still kept (their last stage is not done), and
        # a serial that makes every run's semaphore names unique for the cluster's life.
        self._graph_runs = 0
        self._run_serials = itertools.count(1)

    # -- public ----------------------------------------------------------------------

    def semaphore(self, name: str, owner: ClusterNode | int, initial: int = 0) -> ClusterSemaphore:
        """A new semaphore called ``name`` owned by ``owner`` (a node or its index).

        Raises:
            ValueError: the name is taken, ``initial`` is negative, or ``owner`` is not
                a node of this cluster.
        """
        self._check_open()
        node = self._node(owner)
        if name in self._sems:
            raise ValueError(
                f"a semaphore named {name!r} exists (owner node {self._sems[name].owner.index})"
            )
        if initial < 0:
            raise ValueError(f"semaphore initial value must be >= 0, got {initial}")
        sem = self._sems[name] = ClusterSemaphore(self, name, node, initial)
        return sem

    def graph(self, name: str = "graph", *, qos: QoS | str | None = None) -> ClusterGraph:
        """A new pipeline whose stages run on any node (see :class:`ClusterGraph`).

        ``qos`` sets its stages' default queue priority, as :meth:`asyncfront.Runtime.graph`
        does (a stage's own ``qos`` or ``priority`` wins).

        Raises:
            ClusterError: the cluster is closed.
            TypeError / ValueError: ``qos`` is neither a QoS nor the name of a tier.
        """
        from ._graph import ClusterGraph

        self._check_open()
        return ClusterGraph(self, name, qos=qos)

    def _check_picklable(self, fn: Callable[..., Any]) -> None:
        """Raise what pickling ``fn`` raises; a function that pickled once is not pickled again."""
        try:
            if fn in self._picklable:
                return
        except TypeError:  # not weakly referenceable (a builtin): check every time
            dumps(fn)
            return
        dumps(fn)
        self._picklable[fn] = None

    def _default_queue(self, node: ClusterNode, device: str, priority: int) -> RemoteQueue:
        """The queue graphs share on ``node``'s ``device`` at ``priority`` (made on first use)."""
        key = (node.index, device, priority)
        queue = self._default_queues.get(key)
        if queue is None:
            suffix = f".p{priority}" if priority else ""
            queue = node.queue(device, priority=priority, name=f"n{node.index}.{device}{suffix}")
            self._default_queues[key] = queue
        return queue

    def _unused_semaphore_name(self, name: str) -> str:
        """``name``, or ``name~2``, ``name~3``... if a semaphore has it."""
        unique = name
        while unique in self._sems:
            unique = f"{name}~{next(self._names)}"
        return unique

    @property
    def trace(self) -> ClusterTrace:
        """Every node's trace merged: one Perfetto file and HTML timeline, a process per node.

        While the cluster is open it holds what the nodes reported at close or on
        :meth:`collect_trace`; after close, everything.
        """
        from ._trace import ClusterTrace

        return ClusterTrace(self._traces)

    async def collect_trace(self) -> ClusterTrace:
        """Fetch every live node's trace so far and return the merged trace."""
        from ._trace import ClusterTrace

        live = [n for n in self.nodes if n.lost is None]
        results = await asyncio.gather(
            *(_await(n._actor.trace_records.remote()) for n in live), return_exceptions=True
        )
        for node, records in zip(live, results, strict=True):
            if isinstance(records, list):
                self._traces[node.index] = records
        return ClusterTrace(self._traces)

    def statistics(self) -> ClusterStatistics:
        """A frozen snapshot of nodes, semaphores and work in flight."""
        return ClusterStatistics(
            nodes=len(self.nodes),
            lost_nodes=tuple(n.index for n in self.nodes if n.lost is not None),
            semaphores=len(self._sems),
            pending_submissions=len(self._pending),
            batches_sent=self._batches_sent,
            submissions_sent=self._submissions_sent,
            result_streams=tuple(
                sorted(i for i, t in self._result_readers.items() if not t.done())
            ),
            graph_runs=self._graph_runs,
        )

    def __repr__(self) -> str:
        state = "open" if self._open else "closed"
        return (
            f"<Cluster {state} nodes={len(self.nodes)} "
            f"lost={[n.index for n in self.nodes if n.lost is not None]} "
            f"pending={len(self._pending)}>"
        )

    # -- sending ---------------------------------------------------------------------

    def _check_open(self) -> None:
        if not self._open:
            raise ClusterError("the cluster is closed")

    def _node(self, node: ClusterNode | int) -> ClusterNode:
        if isinstance(node, ClusterNode):
            if node.cluster is not self:
                raise ValueError(f"node {node.index} belongs to another cluster")
            return node
        if type(node) is not int or not 0 <= node < len(self.nodes):
            raise ValueError(f"no node {node!r}: this cluster has nodes 0..{len(self.nodes) - 1}")
        return self.nodes[node]

    def _wire_pairs(
        self,
        label: str,
        pairs: Iterable[tuple[ClusterSemaphore, int]],
        signaller: ClusterNode | None,
    ) -> tuple[WirePair, ...]:
        out: list[WirePair] = []
        for pair in pairs:
            if (
                not isinstance(pair, tuple)
                or len(pair) != 2
                or not isinstance(pair[0], ClusterSemaphore)
                or type(pair[1]) is not int
            ):
                raise TypeError(f"{label} must be (ClusterSemaphore, int) pairs, got {pair!r}")
            sem, value = pair
            if sem.cluster is not self:
                raise ValueError(f"semaphore {sem.name!r} belongs to another cluster")
            if value < 0:
                raise ValueError(f"{label} value for semaphore {sem.name!r} must be >= 0")
            if signaller is not None:
                if sem.owner is not signaller:
                    raise ValueError(
                        f"semaphore {sem.name!r} is owned by node {sem.owner.index}: only "
                        f"work on its owner signals it, not work on node {signaller.index}"
                    )
                known = max(sem._mirror.value, sem._claimed)
                if value <= known:
                    raise ValueError(
                        f"signal value {value} for semaphore {sem.name!r} must exceed "
                        f"{known}, the value it has or is already due to reach"
                    )
            out.append((tuple(sem.ref), value))  # type: ignore[arg-type]
        return tuple(out)

    def _argument(self, value: Any, node: ClusterNode) -> Any:
        """A remote submission's result as an argument of work on ``node``.

        On its own node the result is used in place; for another node, the node that
        keeps it sends a copy once it exists, and the work waits for the copy.
        """
        if isinstance(value, RemoteSubmission):
            if value.queue.node.cluster is not self:
                raise ValueError(f"the result of {value.name!r} belongs to another cluster")
            source = value.queue.node
            if source is node:
                return ValueRef(value.id)
            if source.lost is not None:
                raise NodeLostError(source.lost.node, source.lost.reason)
            return ValueRef(value.id, source.index)
        return value

    def _commit(self, sub: RemoteSubmission, prepared: _Prepared) -> RemoteSubmission:
        """Send a prepared submission (and the copies it needs); nothing here raises."""
        queue = prepared.queue
        node = queue.node
        for source in prepared.copies:
            if node not in source._copied_to:
                source._copied_to.append(node)
                self._send(source.queue.node, ("copy", source.id, node.index))
        qid, payload, label, cost = queue.qid, prepared.payload, prepared.name, prepared.cost
        waits_w, signals_w = prepared.waits, prepared.signals
        self._submit_item(
            queue,
            prepared.name,
            signals_w,
            lambda sub_id: ("submit", sub_id, qid, payload, waits_w, signals_w, label, cost),
            sub=sub,
        )
        sub._holds = prepared.holds
        return sub

    def _submit_item(
        self,
        queue: RemoteQueue,
        name: str,
        signals: tuple[WirePair, ...],
        make_item: Callable[[int], tuple[Any, ...]],
        sub: RemoteSubmission | None = None,
    ) -> RemoteSubmission:
        """Record a new remote submission and batch its item for the queue's node."""
        if sub is None:
            sub = RemoteSubmission(queue, name, next(self._ids))
        sub_id = sub.id
        for (sem_name, _, _), value in signals:
            sem = self._sems[sem_name]
            sem._claimed = max(sem._claimed, value)
        self._pending[sub_id] = sub
        sub._sent = True
        self._send(queue.node, make_item(sub_id))
        return sub

    def _release(self, nodes: list[ClusterNode], sub_id: int) -> None:
        """The driver dropped a submission: the nodes that keep its result may drop it."""
        if not self._open:
            return
        for node in nodes:
            if node.lost is None:
                node._released.append(sub_id)
                if len(node._released) == 1:
                    # Releases wait a little and go together: one message per interval,
                    # not one per dropped submission (nothing waits for them).
                    self._loop.call_later(_RELEASE_INTERVAL, self._send_released, node)

    def _send_released(self, node: ClusterNode) -> None:
        released, node._released = node._released, []
        if released and self._open and node.lost is None:
            self._send(node, ("release", released))

    def link(self, a: ClusterNode | int, b: ClusterNode | int, *, name: str | None = None) -> Link:
        """A link from node ``a`` to node ``b`` (see :class:`asyncfront.cluster.Link`)."""
        from ._link import Link

        self._check_open()
        link = Link(self, self._node(a), self._node(b), name or f"link{len(self._links)}")
        self._links.append(link)
        return link

    def _ensure_links(self) -> None:
        if self._links_future is None:
            self._links_future = self._loop.create_future()
            self._spawn(self._init_links(self._links_future), "asyncfront:links")

    def _links_ready(self) -> asyncio.Future[None]:
        self._ensure_links()
        assert self._links_future is not None
        return self._links_future

    async def _init_links(self, done: asyncio.Future[None]) -> None:
        """Form the gloo group of every node runtime (rank = node index)."""
        try:
            live = [n for n in self.nodes if n.lost is None]
            if len(live) != len(self.nodes):
                raise ClusterError("links need every node; some were lost")
            host, port = await self.nodes[0]._actor.free_port.remote()
            await asyncio.gather(
                *(
                    _await(
                        n._actor.init_links.remote(host, port, len(self.nodes), self.link_timeout)
                    )
                    for n in self.nodes
                )
            )
        except Exception as exc:
            message = f"the nodes' process group did not form: {type(exc).__name__}: {exc}"
            for node in self.nodes:
                if node.lost is None:
                    node._actor.links_failed.remote(message)
            if not done.done():
                done.set_exception(ClusterError(message))
                done.exception()  # retrieved here: links report it through their work
            return
        if not done.done():
            done.set_result(None)

    def _send(self, node: ClusterNode, item: tuple[Any, ...]) -> None:
        node._batch.append(item)
        if not node._flush_scheduled:
            node._flush_scheduled = True
            self._loop.call_soon(self._flush, node)

    def _flush(self, node: ClusterNode) -> None:
        node._flush_scheduled = False
        batch, node._batch = node._batch, []
        if not batch or node.lost is not None:
            return
        node._seq += 1
        self._batches_sent += 1
        self._submissions_sent += len(batch)
        if self._faults is not None:
            self._faults.deliver(self._loop, self._deliver, node, node._seq, batch)
        else:
            self._deliver(node, node._seq, batch)

    def _deliver(self, node: ClusterNode, seq: int, batch: list[tuple[Any, ...]]) -> None:
        if node.lost is None:
            items, functions = _encode_batch(batch)
            node._actor.submit_batch.remote(self._sender, seq, items, functions)

    # -- receiving -------------------------------------------------------------------

    def _spawn(self, coro: Any, name: str) -> None:
        task = self._loop.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _open_result_streams(self, token: bytes, timeout: float) -> None:
        """Listen for each node's result stream and ask every node to connect to it."""
        ray = _import_ray()
        host = str(ray.util.get_node_ip_address())
        self._result_token = token
        try:
            self._result_server = await asyncio.start_server(self._result_connection, host, 0)
        except OSError:
            return  # the long polls carry the results
        port = int(self._result_server.sockets[0].getsockname()[1])
        await asyncio.wait_for(
            asyncio.gather(
                *(
                    _await(n._actor.stream_results.remote(self._sender, host, port, token))
                    for n in self.nodes
                ),
                return_exceptions=True,
            ),
            timeout,
        )

    async def _result_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Handle every frame (a 4-byte length, then pickled events) a node streams back.

        A stream opens with the cluster's secret and the node's index; one that does not
        is closed before anything it sends is unpickled. A zero length ends it.
        """
        task = asyncio.current_task()
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            token = await reader.readexactly(len(self._result_token))
            if not self._result_token or not hmac.compare_digest(token, self._result_token):
                return
            index = int.from_bytes(await reader.readexactly(2), "big")
            if not 0 <= index < len(self.nodes) or task is None:
                return
            node = self.nodes[index]
            self._result_readers[index] = task
            while True:
                size = int.from_bytes(await reader.readexactly(4), "big")
                if not size:
                    break
                self._handle(node, loads(await reader.readexactly(size)))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def _close_result_server(self) -> None:
        server, self._result_server = self._result_server, None
        if server is not None:
            server.close()
        for task in self._result_readers.values():
            task.cancel()

    async def _poll(self, node: ClusterNode) -> None:
        """Long-poll one node for results and semaphore states, for as long as it lives."""
        actor = node._actor
        while node.lost is None:
            try:
                data = await actor.poll.remote(self._sender)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._lose(node, f"its runtime actor died ({type(exc).__name__})")
                return
            self._handle(node, loads(data))

    def _handle(self, node: ClusterNode, events: list[tuple[Any, ...]]) -> None:
        progressed = False
        for event in events:
            kind = event[0]
            if kind == "done":
                progressed |= self._done(event)
            elif kind == "sem":
                update = SemaphoreUpdate(*event[1:])
                sem = self._sems.get(update.name)
                if sem is not None:
                    apply_update(sem._mirror, update)
            elif kind == "queue":
                _, qid, queue_axis, _ = event
                queue = self._queues.get((node.index, qid))
                if queue is not None and queue.axis is None:
                    queue.axis = queue_axis
                    set_axis_name(queue_axis, queue.name)
                    queue._ready.set_result(queue_axis)
        if progressed:
            self._note_progress()

    def _done(self, event: tuple[Any, ...]) -> bool:
        _, sub_id, epoch, frontier, ok, payload, failed_sem = event
        sub = self._pending.pop(sub_id, None)
        if sub is None:
            return False
        sub._holds = ()
        sub.epoch = epoch or None
        sub.frontier = decode_frontier(frontier) if frontier[0] else None
        if ok:
            try:
                result = loads(payload)
            except Exception as error:
                sub._fail(TypeError(f"the result of {sub.name!r} cannot be unpickled: {error}"))
            else:
                sub._finish(result)
        else:
            cause = unpack_exception(payload)
            if failed_sem is not None:
                known = self._sems.get(failed_sem)
                mirror = known._mirror if known is not None else TimelineSemaphore(name=failed_sem)
                # The node says it failed: the driver's view, which the error names and
                # its holder may wait on, fails with the same cause (first failure wins).
                mirror.fail(cause)
                cause = SemaphoreFailedError(mirror, cause)
            sub._fail(cause)
        if sub._run is not None:
            self._settled(sub)
        return True

    def _settled(self, sub: RemoteSubmission) -> None:
        """A stage of a graph run is done; after its last one, the run's semaphores go."""
        run = sub._run
        if run is None:
            return
        sub._run = None
        run.pending -= 1
        if not run.pending:
            self._forget_run(run)

    def _forget_run(self, run: _RunSemaphores) -> None:
        """Drop a finished run's semaphores here and on every live node that holds one.

        Every stage of the run is done, so nothing waits on them or signals them any
        more. The owner learns which nodes subscribed, so a subscription that arrives
        after the owner dropped the semaphore does not make it again.
        """
        self._graph_runs -= 1
        for name, _, _ in run.semaphores:
            self._sems.pop(name, None)
        if not self._open:
            return  # the nodes stopped with their records
        per_node: dict[int, list[tuple[str, int, tuple[int, ...]]]] = {}
        for name, owner, waiters in run.semaphores:
            per_node.setdefault(owner, []).append((name, owner, waiters))
            for waiter in waiters:
                per_node.setdefault(waiter, []).append((name, owner, ()))
        for index, items in per_node.items():
            node = self.nodes[index]
            if node.lost is None:
                self._send(node, ("forget", tuple(items)))

    def _note_progress(self) -> None:
        progress = self._progress
        if progress is not None and not progress.done():
            progress.set_result(None)

    # -- liveness --------------------------------------------------------------------

    async def _watch(self, node: ClusterNode) -> None:
        """Declare the node lost as soon as its actor dies."""
        try:
            await node._actor.lifetime.remote()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._lose(node, f"its runtime actor died ({type(exc).__name__})")

    async def _heartbeat(self, node: ClusterNode) -> None:
        """Declare the node lost when it misses a heartbeat (a hung or unreachable node)."""
        while node.lost is None:
            await asyncio.sleep(self.heartbeat_interval)
            try:
                await asyncio.wait_for(_await(node._actor.ping.remote()), self.heartbeat_timeout)
            except TimeoutError:
                self._lose(
                    node, f"it missed a heartbeat (no answer within {self.heartbeat_timeout} s)"
                )
                # A lost node does not come back: make sure it is gone.
                with contextlib.suppress(Exception):
                    _import_ray().kill(node._actor, no_restart=True)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._lose(node, f"its runtime actor died ({type(exc).__name__})")
                return

    def _lose(self, node: ClusterNode, reason: str) -> None:
        """Fail everything that depended on ``node``, here and on every other node."""
        if node.lost is not None or not self._open:
            return
        error = node.lost = NodeLostError(node.index, reason)
        for sem in self._sems.values():
            if sem.owner is node:
                sem._mirror.fail(error)
        for sub_id, sub in list(self._pending.items()):
            if sub.queue.node is node:
                del self._pending[sub_id]
                sub._holds = ()
                sub._fail(NodeLostError(node.index, reason))
                self._settled(sub)
        for other in self.nodes:
            if other.lost is None:
                other._actor.node_lost.remote(node.index, reason)
        self._note_progress()

    # -- lifecycle -------------------------------------------------------------------

    async def _drain(self) -> None:
        """Wait for every submission in flight, until nothing progresses for stall_timeout."""
        while self._pending:
            progress = self._progress = self._loop.create_future()
            try:
                await asyncio.wait_for(asyncio.shield(progress), self.stall_timeout)
            except TimeoutError:
                return
            finally:
                self._progress = None

    async def _close(self, timeout: float) -> None:
        live = [n for n in self.nodes if n.lost is None]
        for node in live:  # send what is still batched
            if node._flush_scheduled:
                self._flush(node)
        results = await asyncio.gather(
            *(asyncio.wait_for(_await(n._actor.stop.remote()), timeout) for n in live),
            return_exceptions=True,
        )
        finals = await asyncio.gather(
            *(asyncio.wait_for(_await(n._actor.poll.remote(self._sender)), timeout) for n in live),
            return_exceptions=True,
        )
        # Each node ended its result stream before it answered stop: read to its end.
        readers = [t for i, t in self._result_readers.items() if self.nodes[i] in live]
        if readers:
            await asyncio.wait(readers, timeout=timeout)
        for node, records, final in zip(live, results, finals, strict=True):
            if isinstance(records, list):
                self._traces[node.index] = records
            if isinstance(final, bytes):
                self._handle(node, loads(final))
        self._open = False
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._close_result_server()
        pending, self._pending = self._pending, {}
        for sub in pending.values():
            sub._fail(StalledError(f"the cluster closed before {sub.name!r} finished"))
            self._settled(sub)
        for sem in self._sems.values():  # nothing will update the mirrors any more
            sem._mirror.fail(StalledError(f"the cluster closed; semaphore {sem.name!r} is gone"))
        ray = _import_ray()
        for node in self.nodes:
            with contextlib.suppress(Exception):
                ray.kill(node._actor, no_restart=True)


async def _await(ref: Any) -> Any:
    return await ref


class LocalRayCluster:
    """A Ray cluster of ``nodes`` nodes on this machine, bound to 127.0.0.1.

    Each node is small (one CPU, a small object store, no dashboard) and advertises the
    custom resource ``asyncfront_node_<i>`` that pins node runtime ``i`` to it; Ray's
    files go to a private temp dir, removed by :meth:`stop`. Health checks are tight, so
    a dead Ray node is declared within about two seconds. :func:`open_cluster` with
    ``address=None`` uses one; a test session may start one and share it.
    """

    def __init__(self, nodes: int = 2, *, system_config: dict[str, Any] | None = None) -> None:
        if type(nodes) is not int or not 1 <= nodes <= _MAX_NODES:
            raise ValueError(f"nodes must be an int in 1..{_MAX_NODES}, got {nodes!r}")
        self.nodes = nodes
        self.system_config = system_config
        self.temp_dir: str | None = None
        self.address: str | None = None
        self._cluster: Any = None
        self._saved_env: dict[str, str | None] = {}

    def start(self, *, connect: bool = True) -> str:
        """Start the nodes (blocking, seconds), connect this process; returns the address."""
        if self._cluster is not None:
            raise ClusterError("this local Ray cluster is already started")
        self.temp_dir = tempfile.mkdtemp(prefix="afray-")
        os.makedirs(os.path.join(self.temp_dir, "ray"))
        # Ray resolves 127.0.0.1 to the machine's outward address unless told that it is
        # not forming a multi-machine cluster; every process of these nodes inherits it.
        for key, value in (
            ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0"),
            ("RAY_TMPDIR", self.temp_dir),
        ):
            self._saved_env[key] = os.environ.get(key)
            os.environ[key] = value
        ray = _import_ray()
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False  # read at call time; the import came first
        from ray.cluster_utils import Cluster as RayCluster

        try:
            self._cluster = RayCluster(
                initialize_head=True,
                head_node_args=local_node_args(
                    0, temp_dir=self.temp_dir, head=True, system_config=self.system_config
                ),
            )
            for index in range(1, self.nodes):
                self._cluster.add_node(**local_node_args(index))
            self.address = str(self._cluster.address)
            if connect:
                ray.init(
                    address=self.address,
                    include_dashboard=False,
                    log_to_driver=False,
                    logging_level="WARNING",
                )
        except BaseException:
            self.stop()
            raise
        return self.address

    def stop(self) -> None:
        """Disconnect, stop every process of the nodes, remove the temp dir."""
        ray = _import_ray()
        try:
            if ray.is_initialized():
                ray.shutdown()
            if self._cluster is not None:
                self._cluster.shutdown()
        finally:
            self._cluster = None
            for key, value in self._saved_env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            self._saved_env = {}
            if self.temp_dir is not None:
                shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __repr__(self) -> str:
        state = "started" if self._cluster is not None else "stopped"
        return f"<LocalRayCluster {state} nodes={self.nodes} address={self.address!r}>"


def local_node_args(
    index: int,
    *,
    temp_dir: str | None = None,
    head: bool = False,
    system_config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """``ray.cluster_utils.Cluster.add_node`` arguments for node ``index`` of a local cluster.

    Small: one CPU, a small object store, no dashboard, loopback only; the node
    advertises the custom resource that pins node runtime ``index`` to it.
    """
    args: dict[str, Any] = {
        "node_ip_address": "127.0.0.1",
        "num_cpus": 1,
        "object_store_memory": 80 * 1024 * 1024,
        "resources": {_NODE_RESOURCE.format(index): 1000},
    }
    if head:
        args["include_dashboard"] = False
        if temp_dir is not None:
            args["temp_dir"] = os.path.join(temp_dir, "ray")
        config = {
            # A lost node is declared within a few seconds, not Ray's default 30 s.
            "health_check_period_ms": 500,
            "health_check_timeout_ms": 500,
            "health_check_failure_threshold": 4,
        }
        config.update(system_config or {})
        args["_system_config"] = config
    return args


def _placements(ray: Any, count: int) -> list[dict[str, Any]]:
    """Ray actor options that pin node runtime ``i`` to the i-th node of the cluster."""
    alive = [n for n in ray.nodes() if n.get("Alive")]
    pinned: list[dict[str, Any]] = []
    if len(alive) < count:
        raise ClusterError(f"asked for {count} nodes; the Ray cluster has {len(alive)} alive")
    advertised = {key for n in alive for key in n.get("Resources", {})}
    if all(_NODE_RESOURCE.format(i) in advertised for i in range(count)):
        return [{"resources": {_NODE_RESOURCE.format(i): 0.001}} for i in range(count)]
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    def head_first(node: dict[str, Any]) -> tuple[int, str]:
        is_head = "node:__internal_head__" in node.get("Resources", {})
        return (0 if is_head else 1, str(node["NodeID"]))

    for node in sorted(alive, key=head_first)[:count]:
        strategy = NodeAffinitySchedulingStrategy(node_id=node["NodeID"], soft=False)
        pinned.append({"scheduling_strategy": strategy})
    return pinned


@asynccontextmanager
async def open_cluster(
    address: str | None = None,
    *,
    nodes: int = 2,
    devices: DevicesFactory | None = None,
    heartbeat_interval: float = 1.0,
    heartbeat_timeout: float = 10.0,
    stall_timeout: float = 5.0,
    start_timeout: float = 120.0,
    delivery_faults: DeliveryFaults | None = None,
) -> AsyncIterator[Cluster]:
    """Open a cluster of node runtimes on Ray; leaving drains the work, then closes.

    Args:
        address: None starts a local Ray cluster of ``nodes`` nodes on 127.0.0.1 in a
            private temp dir (and stops it on exit); ``"auto"`` or ``"host:port"``
            joins a running cluster and uses ``nodes`` of its alive nodes. When this
            process is already connected to Ray, that connection is used.
        nodes: how many node runtimes (one per Ray node), numbered from 0.
        devices: builds a node's devices from its index, on that node (it travels by
            cloudpickle); by default each node gets one ``CpuDevice("cpu")``.
        heartbeat_interval: seconds between heartbeats to each node.
        heartbeat_timeout: a node that does not answer a heartbeat within this many
            seconds is lost (so is a node whose actor dies, at once).
        stall_timeout: on exit, seconds without progress after which work still in
            flight is failed instead of awaited (a node's own drain uses it too).
        start_timeout: seconds the node runtimes have to start.
        delivery_faults: delay and duplicate every message (a test aid).

    Raises:
        ClusterError: Ray is missing, or the cluster has fewer nodes than asked.
        TypeError: ``devices`` cannot be pickled.
        ValueError: ``nodes`` is out of range.
    """
    if type(nodes) is not int or not 1 <= nodes <= _MAX_NODES:
        raise ValueError(f"nodes must be an int in 1..{_MAX_NODES}, got {nodes!r}")
    for label, seconds in (
        ("heartbeat_interval", heartbeat_interval),
        ("heartbeat_timeout", heartbeat_timeout),
        ("stall_timeout", stall_timeout),
        ("start_timeout", start_timeout),
    ):
        if not seconds > 0:
            raise ValueError(f"{label} must be > 0 s, got {seconds}")
    factory = devices if devices is not None else _default_devices
    ray = _import_ray()
    try:
        factory_bytes = dumps(factory)
    except Exception as exc:
        raise TypeError(f"devices cannot be pickled: {type(exc).__name__}: {exc}") from exc
    local: LocalRayCluster | None = None
    joined = False
    if not ray.is_initialized():
        if address is None:
            # Ray installs signal handlers while it starts: only the main thread may, so
            # this blocks the loop once, at open, for the seconds the nodes take to start.
            local = LocalRayCluster(nodes)
            local.start()
        else:
            ray.init(
                address=address,
                include_dashboard=False,
                log_to_driver=False,
                logging_level="WARNING",
            )
            joined = True
    loop = asyncio.get_running_loop()
    cluster = Cluster(
        loop,
        heartbeat_interval=heartbeat_interval,
        heartbeat_timeout=heartbeat_timeout,
        stall_timeout=stall_timeout,
        faults=delivery_faults.reseeded(0) if delivery_faults is not None else None,
    )
    actors: list[Any] = []
    try:
        placements = await asyncio.to_thread(_placements, ray, nodes)
        actor_class = ray.remote(NodeRuntime)
        for index, placement in enumerate(placements):
            actors.append(
                actor_class.options(
                    num_cpus=0,
                    max_concurrency=_ACTOR_CONCURRENCY,
                    max_restarts=0,
                    **placement,
                ).remote(index, factory_bytes, stall_timeout, delivery_faults)
            )
        infos = await asyncio.wait_for(
            asyncio.gather(*(_await(a.start.remote(actors)) for a in actors)), start_timeout
        )
        # Semaphore pushes between nodes go over direct streams where they connect; a
        # stream opens with a secret only the cluster's node runtimes know.
        push_token = os.urandom(32)
        endpoints = await asyncio.wait_for(
            asyncio.gather(
                *(_await(a.endpoint.remote(push_token)) for a in actors), return_exceptions=True
            ),
            start_timeout,
        )
        addresses = [e if isinstance(e, tuple) else None for e in endpoints]
        await asyncio.wait_for(
            asyncio.gather(*(_await(a.connect.remote(addresses)) for a in actors)), start_timeout
        )
        cluster.nodes = tuple(
            ClusterNode(
                cluster,
                index,
                actor,
                [NodeDevice(index, name, kind, dev) for name, kind, dev in info],
            )
            for index, (actor, info) in enumerate(zip(actors, infos, strict=True))
        )
        await cluster._open_result_streams(push_token, start_timeout)
        cluster._open = True
        for node in cluster.nodes:
            cluster._spawn(cluster._poll(node), f"asyncfront:poll:{node.index}")
            cluster._spawn(cluster._watch(node), f"asyncfront:watch:{node.index}")
            cluster._spawn(cluster._heartbeat(node), f"asyncfront:heartbeat:{node.index}")
    except BaseException:
        cluster._close_result_server()
        for actor in actors:
            with contextlib.suppress(Exception):
                ray.kill(actor, no_restart=True)
        if local is not None:
            local.stop()
        elif joined:
            ray.shutdown()
        raise
    try:
        yield cluster
        await cluster._drain()
    finally:
        try:
            await cluster._close(timeout=max(stall_timeout * 2, 10.0))
        finally:
            if local is not None:
                local.stop()
            elif joined:
                ray.shutdown()
