"""Work stealing: stages bound to a device queue when they become ready, not when submitted.

Work in a queue's FIFO never moves: its epoch is assigned when it is submitted, and a
death frontier may already name it. A graph stage submitted with ``bind="ready"`` is
therefore not queued anywhere at first. Placement still chooses its *home* device when
the run is submitted (the device whose backlog of unbound stages it joins), but the
:class:`StageBinder` submits it to a device queue only once its waits are met and a
device takes it: its home when the home has a free slot, or, under work stealing, an
idle device that takes it from a busy device's backlog. The queue's epoch is assigned
then, and the stage's frontier names the device that really ran it.

Who may steal from whom is a :class:`Topology` (links between devices) and a
:class:`Stealing` mode: ``NONE`` (each device runs its own backlog), ``NEIGHBOURS``
(an idle device takes work only from devices it has a link to, as neighbour-only
stealing on a mesh of satellites, where a steal is one hop) or ``GLOBAL`` (from any
device). The choice of victim is :func:`choose_victim`, pure and synchronous: the busiest
allowed backlog (most seconds of ready work the thief may run), ties to the nearer,
then the earlier device; the thief takes the newest stage there, the one its owner
would reach last.

Liveness: a stage whose waits fail fails (its signals fail with the cause, so its
dependants fail too); a stage none of whose candidate devices is alive
(:meth:`StageBinder.retire`) fails with :class:`BindingError` naming it; closing the
runtime fails every stage still unbound with a :class:`~asyncfront.StalledError`.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ._placement import device_speed
from ._queue import (
    DeviceQueue,
    Outcome,
    SemaphoreValue,
    StalledError,
    Submission,
    SubmissionState,
    _check_pairs,
)
from ._semaphore import SemaphoreFailedError, TimelineSemaphore

if TYPE_CHECKING:
    from ._frontier import Frontier
    from ._runtime import Runtime
    from .devices._base import Device

__all__ = (
    "BinderStatistics",
    "BindingError",
    "StageBinder",
    "StageBinding",
    "StealOffer",
    "Stealing",
    "Topology",
    "choose_victim",
)


class BindingError(RuntimeError):
    """An unbound stage can never be bound: none of its candidate devices is alive."""


class Stealing(enum.Enum):
    """Which busy devices an idle device may take ready, unbound stages from."""

    NONE = "none"
    """None: every device runs only its own backlog."""
    NEIGHBOURS = "neighbours"
    """Only devices it has a link to in the topology (one hop)."""
    GLOBAL = "global"
    """Any device, however many hops away."""


class Topology:
    """Undirected links between devices: who is whose neighbour, and how many hops apart.

    A steal over ``h`` hops costs ``h * hop_seconds`` on the thief's queue before the
    stage runs there (a barrier of that many seconds at speed 1.0; a simulation's model
    of moving the stage's inputs; 0, the default, submits nothing).

    Args:
        links: ``(device, device)`` pairs, by name.
        hop_seconds: the modelled cost of moving a stage one hop.

    Raises:
        ValueError: a link from a device to itself, or a negative ``hop_seconds``.
    """

    def __init__(self, links: Iterable[tuple[str, str]] = (), *, hop_seconds: float = 0.0) -> None:
        if hop_seconds < 0:
            raise ValueError(f"topology hop_seconds must be >= 0, got {hop_seconds}")
        self.hop_seconds = float(hop_seconds)
        self._neighbours: dict[str, list[str]] = {}
        pairs: list[tuple[str, str]] = []
        for a, b in links:
            if a == b:
                raise ValueError(f"topology: a link from {a!r} to itself")
            for x, y in ((a, b), (b, a)):
                near = self._neighbours.setdefault(x, [])
                if y not in near:
                    near.append(y)
            if (b, a) not in pairs and (a, b) not in pairs:
                pairs.append((a, b))
        self.links: tuple[tuple[str, str], ...] = tuple(pairs)
        self._hops: dict[str, dict[str, int]] = {}

    @classmethod
    def full(cls, devices: Sequence[str], *, hop_seconds: float = 0.0) -> Topology:
        """Every device linked to every other (one hop everywhere)."""
        links = [(a, b) for i, a in enumerate(devices) for b in devices[i + 1 :]]
        return cls(links, hop_seconds=hop_seconds)

    @classmethod
    def ring(cls, devices: Sequence[str], *, hop_seconds: float = 0.0) -> Topology:
        """Each device linked to the next, the last to the first."""
        n = len(devices)
        links = [(devices[i], devices[(i + 1) % n]) for i in range(n)] if n > 2 else []
        if n == 2:
            links = [(devices[0], devices[1])]
        return cls(links, hop_seconds=hop_seconds)

    @classmethod
    def grid(
        cls, devices: Sequence[str], columns: int, *, wrap: bool = False, hop_seconds: float = 0.0
    ) -> Topology:
        """A 2D mesh, row by row, ``columns`` wide: each device linked to its four neighbours.

        With ``wrap`` the mesh is a torus (the last column links to the first, the last
        row to the first), as the intra- and inter-plane links of a satellite constellation.

        Raises:
            ValueError: ``columns`` < 1 or not dividing the number of devices.
        """
        n = len(devices)
        if columns < 1 or n % columns:
            raise ValueError(f"a grid of {n} devices cannot be {columns} columns wide")
        rows = n // columns
        links: list[tuple[str, str]] = []
        for r in range(rows):
            for c in range(columns):
                here = devices[r * columns + c]
                if c + 1 < columns or (wrap and columns > 2):
                    links.append((here, devices[r * columns + (c + 1) % columns]))
                if r + 1 < rows or (wrap and rows > 2):
                    links.append((here, devices[((r + 1) % rows) * columns + c]))
        return cls(links, hop_seconds=hop_seconds)

    @property
    def devices(self) -> tuple[str, ...]:
        """Every device with a link, in the order first linked."""
        return tuple(self._neighbours)

    def neighbours(self, device: str) -> tuple[str, ...]:
        """The devices ``device`` has a link to (none for a device the topology lacks)."""
        return tuple(self._neighbours.get(device, ()))

    def hops(self, a: str, b: str) -> float:
        """Links on the shortest path from ``a`` to ``b`` (0 to itself, ``inf`` unreachable)."""
        if a == b:
            return 0
        table = self._hops.get(a)
        if table is None:
            table = self._hops[a] = {a: 0}
            frontier = [a]
            while frontier:
                nxt = []
                for x in frontier:
                    for y in self._neighbours.get(x, ()):
                        if y not in table:
                            table[y] = table[x] + 1
                            nxt.append(y)
                frontier = nxt
        return table.get(b, float("inf"))

    def __repr__(self) -> str:
        return (
            f"<Topology devices={len(self._neighbours)} links={len(self.links)} "
            f"hop_seconds={self.hop_seconds}>"
        )


@dataclass(frozen=True)
class StealOffer:
    """A ready, unbound stage in a device's backlog, as :func:`choose_victim` sees it.

    Attributes:
        name: the stage's name (for logs).
        candidates: the devices it may run on.
        seconds: its estimated run time (cost / speed of its home; 0 without a cost).
    """

    name: str
    candidates: frozenset[str]
    seconds: float


def choose_victim(
    thief: str,
    backlogs: Mapping[str, Sequence[StealOffer]],
    topology: Topology | None,
    stealing: Stealing,
    order: Sequence[str] = (),
) -> tuple[str, int] | None:
    """Which backlog an idle ``thief`` takes a stage from, and the stage's index there.

    Pure and synchronous. Victims are the devices ``stealing`` allows (its topology
    neighbours, or every device; ``GLOBAL`` without a topology counts every device one
    hop away) holding a stage whose candidates include the thief. The busiest goes
    first (most seconds of such stages, then most stages), ties to the fewer hops, then
    to the earlier device in ``order``; the thief takes the newest such stage there.
    Returns None when there is nothing it may take.
    """
    if stealing is Stealing.NONE:
        return None
    if stealing is Stealing.NEIGHBOURS:
        if topology is None:
            return None
        allowed: Iterable[str] = topology.neighbours(thief)
    else:
        allowed = (d for d in backlogs if d != thief)
    rank = {name: i for i, name in enumerate(order)}
    best: tuple[float, int, float, int] | None = None
    chosen: tuple[str, int] | None = None
    for victim in allowed:
        offers = backlogs.get(victim)
        if not offers:
            continue
        seconds = 0.0
        count = 0
        newest = -1
        for i, offer in enumerate(offers):
            if thief in offer.candidates:
                seconds += offer.seconds
                count += 1
                newest = i
        if newest < 0:
            continue
        hops = topology.hops(thief, victim) if topology is not None else 1
        key = (-seconds, -count, hops, rank.get(victim, len(rank)))
        if best is None or key < best:
            best, chosen = key, (victim, newest)
    return chosen


class StageBinding(Outcome):
    """A stage bound to a device when it becomes ready; awaitable for its result.

    Attributes:
        name: the stage's name.
        candidates: the devices it may run on.
        home: the device whose backlog it joined (placement's choice at submission;
            another candidate if that device was retired before it was bound).
        device: where it was bound (None until then).
        submission: its queue submission once bound (None until then).
        stolen: whether a device other than its home took it.
        hops: topology hops from home to where it ran (0 unless stolen).
        ready_at / bound_at: runtime clock readings (None until then).
    """

    __slots__ = (
        "_binder",
        "_counted",
        "_futures_waits",
        "_plan",
        "_remaining",
        "_work",
        "annotations",
        "bound_at",
        "candidates",
        "cost",
        "deadline_at",
        "device",
        "home",
        "hops",
        "priority",
        "ready_at",
        "signals",
        "stolen",
        "submission",
        "waits",
    )

    _kind = "unbound stage"

    def __init__(
        self,
        binder: StageBinder,
        name: str,
        work: tuple[Callable[..., Any] | None, tuple[Any, ...], dict[str, Any]],
        waits: tuple[SemaphoreValue, ...],
        signals: tuple[SemaphoreValue, ...],
        cost: float | None,
        priority: int,
        candidates: tuple[str, ...],
        home: str,
    ) -> None:
        self._binder = binder
        self.name = name
        self._work: tuple[Callable[..., Any] | None, tuple[Any, ...], dict[str, Any]] | None = work
        self.waits = waits
        self.signals = signals
        self.cost = cost
        self.priority = priority
        self.candidates = candidates
        self.home = home
        self.device: str | None = None
        self.submission: Submission | None = None
        self.stolen = False
        self.hops = 0
        self.ready_at: float | None = None
        self.bound_at: float | None = None
        self.annotations: dict[str, Any] | None = None
        self._plan: Any = None  # the arbitration policy's view of its run, handed on when bound
        self.deadline_at: float | None = None  # handed on to its submission when bound
        self._futures_waits: list[tuple[TimelineSemaphore, asyncio.Future[Frontier]]] = []
        self._remaining = 0
        self._counted = False  # in its home's pending seconds
        self.state = SubmissionState.PENDING
        self._result: Any = None
        self._exception: BaseException | None = None
        self._futures: list[asyncio.Future[None]] | None = None

    def annotate(self, **facts: Any) -> None:
        """Attach facts (JSON-friendly values) that the trace shows once it is bound."""
        if self.submission is not None:
            self.submission.annotate(**facts)
        elif self.annotations is None:
            self.annotations = facts
        else:
            self.annotations.update(facts)

    @property
    def frontier(self) -> Frontier | None:
        """The bound submission's frontier (its queue's axis names where it ran); else None."""
        sub = self.submission
        return None if sub is None else sub.frontier

    def _event_loop(self) -> asyncio.AbstractEventLoop:
        return self._binder._loop

    def __repr__(self) -> str:
        where = f"bound to {self.device!r}" if self.device is not None else f"home {self.home!r}"
        return f"<StageBinding {self.name!r} {where} {self.state.value}>"


@dataclass(frozen=True)
class BinderStatistics:
    """A snapshot of a :class:`StageBinder`.

    Attributes:
        stealing: the mode's value.
        waiting: unbound stages whose waits are not met yet.
        ready: ready, unbound stages per home device (only devices holding some).
        in_flight: bound stages not finished yet, per device (only devices running some).
        bound: stages bound so far; stolen: how many of them a device other than their
            home took; stolen_hops: the topology hops those steals crossed, in all.
        ran: stages bound so far per device.
        retired: devices that take no more stages.
    """

    stealing: str
    waiting: int
    ready: dict[str, int]
    in_flight: dict[str, int]
    bound: int
    stolen: int
    stolen_hops: float
    ran: dict[str, int]
    retired: tuple[str, ...]


class StageBinder:
    """The runtime's backlogs of unbound stages, one per device, and who takes from whom.

    Reach it as :attr:`asyncfront.Runtime.binder`; graph stages with ``bind="ready"``
    join it. A device takes a ready stage when fewer than ``concurrency`` stages it
    took are still unfinished: first from its own backlog, then (under work stealing)
    from the backlog :func:`choose_victim` names. A bound stage runs on the binder's own
    queue on that device (``<device>.bound.p<priority>``), which holds only ready work,
    so no bound stage ever waits there behind work that waits.
    """

    def __init__(
        self,
        runtime: Runtime,
        *,
        stealing: Stealing = Stealing.NONE,
        topology: Topology | None = None,
    ) -> None:
        # Weak: the runtime owns its binder, and a closed runtime must be freed by
        # reference counting, not kept alive by a cycle through it.
        self._runtime_ref = weakref.ref(runtime)
        self.stealing = stealing
        self.topology = topology
        self._loop = runtime._require_loop()
        self._waiting: set[StageBinding] = set()
        self._ready: dict[str, deque[StageBinding]] = {}
        self._in_flight: dict[str, int] = {}
        self._queues: dict[tuple[str, int], DeviceQueue] = {}
        self._retired: set[str] = set()
        self._bound = 0
        self._stolen = 0
        self._stolen_hops = 0.0
        self._ran: dict[str, int] = {}
        self._pending: dict[str, float] = {}  # estimated seconds of unbound stages per home
        self._closed = False

    @property
    def _runtime(self) -> Runtime:
        runtime = self._runtime_ref()
        if runtime is None:
            raise RuntimeError("stage binder: its runtime was closed and freed")
        return runtime

    # -- configuration -------------------------------------------------------------

    def configure(
        self, *, stealing: Stealing | str | None = None, topology: Topology | None = None
    ) -> None:
        """Set the stealing mode and/or the topology (from the next decision on).

        Raises:
            ValueError: an unknown mode, ``NEIGHBOURS`` without a topology, or a topology
                naming a device the runtime lacks.
        """
        mode = self.stealing if stealing is None else Stealing(stealing)
        topo = self.topology if topology is None else topology
        if mode is Stealing.NEIGHBOURS and topo is None:
            raise ValueError("neighbour-only stealing needs a topology (links between devices)")
        if topo is not None:
            unknown = sorted(set(topo.devices) - set(self._runtime.devices))
            if unknown:
                raise ValueError(
                    f"the topology names devices this runtime lacks: {unknown}; "
                    f"devices: {sorted(self._runtime.devices)}"
                )
        self.stealing, self.topology = mode, topo

    def retire(self, device: str) -> None:
        """Take no more stages on ``device`` (it is lost or leaving).

        Its ready backlog moves to the alive candidate with the least ready work; a
        stage with no alive candidate fails with :class:`BindingError`. Stages already
        bound there stay (work in a queue's FIFO never moves).

        Raises:
            KeyError: no such device.
        """
        self._runtime.device(device)
        if device in self._retired:
            return
        self._retired.add(device)
        backlog = self._ready.pop(device, None)
        for binding in backlog or ():
            self._rehome_ready(binding)
        self._dispatch()

    def alive(self, device: str) -> bool:
        """Whether ``device`` still takes stages."""
        return device not in self._retired

    def pending_seconds(self, device: str) -> float:
        """Estimated seconds of unbound stages homed on ``device`` (what placement adds)."""
        return self._pending.get(device, 0.0)

    def _homed(self, binding: StageBinding, sign: float) -> None:
        """Count a stage in (``+1``) or out of (``-1``) its home's pending seconds."""
        counted = sign > 0
        if not binding.cost or binding._counted is counted:
            return
        binding._counted = counted
        home = binding.home
        seconds = self._pending.get(home, 0.0) + sign * binding.cost / device_speed(
            self._runtime.devices[home]
        )
        if seconds > 1e-12:
            self._pending[home] = seconds
        else:
            self._pending.pop(home, None)

    # -- submission ----------------------------------------------------------------

    def submit(
        self,
        fn: Callable[..., Any] | None,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        waits: Iterable[SemaphoreValue],
        signals: Iterable[SemaphoreValue],
        name: str,
        cost: float | None,
        priority: int,
        candidates: Sequence[str],
        home: str,
        deadline_at: float | None = None,
        plan: Any = None,
    ) -> StageBinding:
        """Hold a stage until its waits are met, then bind it; returns its handle at once.

        ``deadline_at`` (runtime clock) and ``plan`` (what an arbitration policy knows of
        the stage's run) are handed on to the submission the stage becomes.

        Raises:
            RuntimeError: the binder's runtime is closing.
            TypeError / ValueError: malformed waits or signals, no candidates, or
                ``home`` not among them.
            KeyError: a candidate the runtime has no device for.
        """
        if self._closed:
            raise RuntimeError("the runtime is closing: no more stages are bound")
        waits_t, signals_t = tuple(waits), tuple(signals)
        _check_pairs("waits", waits_t)
        _check_pairs("signals", signals_t)
        cands = tuple(candidates)
        if not cands:
            raise ValueError(f"stage {name!r}: no candidate devices to bind it to")
        if home not in cands:
            raise ValueError(f"stage {name!r}: home {home!r} is not among its candidates {cands}")
        devices = self._runtime.devices
        unknown = [c for c in cands if c not in devices]
        if unknown:
            raise KeyError(f"stage {name!r}: no devices named {unknown}; known: {sorted(devices)}")
        binding = StageBinding(
            self, name, (fn, args, kwargs), waits_t, signals_t, cost, priority,
            cands, home,
        )  # fmt: skip
        binding.deadline_at = deadline_at
        binding._plan = plan
        if not any(self.alive(c) for c in cands):
            self._fail(binding, self._unbindable(binding))
            return binding
        if not self.alive(home):
            binding.home = self._least_loaded(binding)
        self._homed(binding, +1)
        for sem, value in binding.waits:
            failure = sem._failure
            if failure is not None:
                self._drop_waits(binding)  # the waits registered before this one
                self._fail(binding, SemaphoreFailedError(sem, failure))
                return binding
            if sem._value >= value:
                continue
            fut = sem._add_waiter(value)
            binding._futures_waits.append((sem, fut))
            binding._remaining += 1
            fut.add_done_callback(functools.partial(self._wait_done, binding))
        if binding._remaining:
            self._waiting.add(binding)
        else:
            self._make_ready(binding)
        return binding

    # -- decisions and binding -----------------------------------------------------

    def _wait_done(self, binding: StageBinding, fut: asyncio.Future[Frontier]) -> None:
        if binding.state is not SubmissionState.PENDING or fut.cancelled():
            return
        exc = fut.exception()
        if exc is not None:
            self._waiting.discard(binding)
            self._drop_waits(binding)
            self._fail(binding, exc)
            return
        binding._remaining -= 1
        if not binding._remaining:
            self._waiting.discard(binding)
            binding._futures_waits = []
            self._make_ready(binding)

    def _make_ready(self, binding: StageBinding) -> None:
        binding.state = SubmissionState.READY
        binding.ready_at = self._loop.time()
        if not self.alive(binding.home):
            self._rehome_ready(binding)
            if binding.done():
                return
        else:
            self._ready.setdefault(binding.home, deque()).append(binding)
        self._dispatch()

    def _rehome_ready(self, binding: StageBinding) -> None:
        if not any(self.alive(c) for c in binding.candidates):
            self._fail(binding, self._unbindable(binding))
            return
        self._homed(binding, -1)
        binding.home = self._least_loaded(binding)
        self._homed(binding, +1)
        self._ready.setdefault(binding.home, deque()).append(binding)

    def _least_loaded(self, binding: StageBinding) -> str:
        alive = [c for c in binding.candidates if self.alive(c)]
        return min(alive, key=lambda d: len(self._ready.get(d, ())) + self._in_flight.get(d, 0))

    def _unbindable(self, binding: StageBinding) -> BindingError:
        return BindingError(
            f"stage {binding.name!r} can never be bound: none of its candidate devices "
            f"{list(binding.candidates)} is alive (retired: {sorted(self._retired)})"
        )

    def _free(self, device: Device) -> bool:
        return self._in_flight.get(device.name, 0) < device.concurrency

    def _dispatch(self) -> None:
        """Bind ready stages to every device with a free slot, until none can take one."""
        if self._closed or not self._ready:
            return
        devices = self._runtime.devices
        order = tuple(devices)
        progress = True
        while progress and self._ready:
            progress = False
            for name, device in devices.items():
                if name in self._retired or not self._free(device):
                    continue
                own = self._ready.get(name)
                if own:
                    binding = own.popleft()
                    if not own:
                        del self._ready[name]
                    self._bind(binding, name)
                    progress = True
                    continue
                if self.stealing is Stealing.NONE:
                    continue
                offers = {
                    victim: [
                        StealOffer(
                            b.name,
                            frozenset(b.candidates),
                            (b.cost or 0.0) / device_speed(devices[victim]),
                        )
                        for b in backlog
                    ]
                    for victim, backlog in self._ready.items()
                }
                choice = choose_victim(name, offers, self.topology, self.stealing, order)
                if choice is None:
                    continue
                victim, index = choice
                backlog = self._ready[victim]
                binding = backlog[index]
                del backlog[index]
                if not backlog:
                    del self._ready[victim]
                self._bind(binding, name)
                progress = True

    def _bind(self, binding: StageBinding, device: str) -> None:
        rt = self._runtime
        work = binding._work
        assert work is not None
        binding._work = None
        fn, args, kwargs = work
        self._homed(binding, -1)
        stolen = device != binding.home
        hops = 0.0
        if stolen:
            hops = self.topology.hops(binding.home, device) if self.topology is not None else 1
        q = self._queue(device, binding.priority)
        try:
            if stolen and self.topology is not None and self.topology.hop_seconds > 0:
                q.submit(
                    None,
                    name=f"{binding.name}.steal",
                    cost=hops * self.topology.hop_seconds,
                )
            sub = q.submit(
                fn, *args, waits=binding.waits, signals=binding.signals,
                name=binding.name, cost=binding.cost, **kwargs,
            )  # fmt: skip
        except Exception as exc:  # the queue closed under it: the runtime is closing
            self._fail(binding, exc)
            return
        notes = dict(binding.annotations or {})
        notes["binding"] = {
            "home": binding.home,
            "device": device,
            "stolen": stolen,
            "hops": hops,
            "stealing": self.stealing.value,
        }
        sub.annotate(**notes)
        plan = sub._plan = binding._plan
        sub.deadline_at = binding.deadline_at
        if plan is not None and sub.done():  # finished inside submit: a ready barrier
            plan.finished(
                sub.started_at,
                self._loop.time() if sub.finished_at is None else sub.finished_at,
                sub.state is not SubmissionState.COMPLETED,
            )
        binding.annotations = None
        binding._plan = None
        binding.submission = sub
        binding.device = device
        binding.stolen = stolen
        binding.hops = int(hops) if hops != float("inf") else -1
        binding.bound_at = self._loop.time()
        binding.state = SubmissionState.RUNNING
        self._in_flight[device] = self._in_flight.get(device, 0) + 1
        self._bound += 1
        self._ran[device] = self._ran.get(device, 0) + 1
        if stolen:
            self._stolen += 1
            self._stolen_hops += hops
        done: asyncio.Future[None] = self._loop.create_future()
        if sub._futures is None:
            sub._futures = [done]
        else:
            sub._futures.append(done)
        done.add_done_callback(lambda _: self._finished(binding, sub, device))
        if rt._log_debug:
            rt._log.debug(
                "bind", stage=binding.name, device=device, home=binding.home, stolen=stolen
            )

    def _finished(self, binding: StageBinding, sub: Submission, device: str) -> None:
        count = self._in_flight.get(device, 0) - 1
        if count > 0:
            self._in_flight[device] = count
        else:
            self._in_flight.pop(device, None)
        if sub.state is SubmissionState.COMPLETED:
            binding._finish(sub._result)
        else:
            exc = sub._exception
            binding._fail(exc if exc is not None else StalledError(f"{sub.name!r} ended"))
        self._dispatch()

    def _queue(self, device: str, priority: int) -> DeviceQueue:
        key = (device, priority)
        q = self._queues.get(key)
        if q is None or q._closed:
            q = self._runtime.queue(device, priority=priority, name=f"{device}.bound.p{priority}")
            self._queues[key] = q
        return q

    # -- failure and closing -------------------------------------------------------

    def _drop_waits(self, binding: StageBinding) -> None:
        for sem, fut in binding._futures_waits:
            if not fut.done():
                fut.cancel()
                sem._forget_cancelled()
        binding._futures_waits = []

    def _fail(self, binding: StageBinding, exc: BaseException) -> None:
        """Fail an unbound stage: its signals fail with the root cause, then its handle."""
        root = exc
        while isinstance(root, SemaphoreFailedError):
            root = root.root_cause
        self._homed(binding, -1)
        binding._work = None
        binding.annotations = None
        for sem, value in binding.signals:
            if sem._failure is None and sem._value < value:
                sem.fail(root)
        binding._fail(exc)
        rt = self._runtime
        if rt._log_warning:
            rt._log.warning(
                "fail",
                stage=binding.name,
                home=binding.home,
                error=f"{type(root).__name__}: {root}",
            )

    def close(self) -> None:
        """Fail every stage still unbound (the runtime is closing: nothing will bind them)."""
        self._closed = True
        pending = [*self._waiting, *(b for backlog in self._ready.values() for b in backlog)]
        self._waiting.clear()
        self._ready.clear()
        for binding in pending:
            self._drop_waits(binding)
            self._fail(
                binding,
                StalledError(
                    f"the runtime closed before stage {binding.name!r} was bound to a device "
                    f"(candidates {list(binding.candidates)}, home {binding.home!r})"
                ),
            )

    def statistics(self) -> BinderStatistics:
        """A frozen snapshot of the backlogs, what is in flight and what was stolen."""
        return BinderStatistics(
            stealing=self.stealing.value,
            waiting=len(self._waiting),
            ready={d: len(b) for d, b in self._ready.items()},
            in_flight=dict(self._in_flight),
            bound=self._bound,
            stolen=self._stolen,
            stolen_hops=self._stolen_hops,
            ran=dict(self._ran),
            retired=tuple(sorted(self._retired)),
        )

    def __repr__(self) -> str:
        ready = sum(len(b) for b in self._ready.values())
        return (
            f"<StageBinder stealing={self.stealing.value} waiting={len(self._waiting)} "
            f"ready={ready} bound={self._bound} stolen={self._stolen}>"
        )
