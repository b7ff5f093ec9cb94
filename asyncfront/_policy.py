"""Arbitration policies: which ready submission a device runs next.

A device's queues present their ready heads (waits met, working memory reserved) to
the device's arbiter. Queue priority always separates QoS tiers: only work of the
highest priority present competes, so a lower tier still only fills the gaps. Within
that tier the device's :class:`Policy` chooses, as a pure synchronous decision over
the ready set and the clock (:meth:`Policy.choose`), unit-testable without a loop.

* :class:`PriorityPolicy` (the default): first come, first served within the tier,
  exactly the arbitration devices always had.
* :class:`EDFPolicy`: earliest deadline first.
* :class:`SLOPolicy`: workflow-aware least slack first. A stage's slack is its
  workflow's deadline minus now minus the predicted remaining critical path of its
  graph from that stage on; work that can no longer meet its deadline yields to work
  that still can.

Every policy here ages work: a ready submission's key is never later than the moment
it became ready plus ``max_wait``, so once it has waited ``max_wait`` only work that
became ready before it can still run first (see :class:`KeyedPolicy`).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._graph import Stage

__all__ = (
    "DEFAULT_MAX_WAIT",
    "EDFPolicy",
    "KeyedPolicy",
    "Policy",
    "PriorityPolicy",
    "ReadyWork",
    "SLOPolicy",
    "SLOStatistics",
    "StagePredictor",
)

DEFAULT_MAX_WAIT = 60.0
"""Seconds of waiting after which ready work no longer yields to younger work."""

StagePredictor = Callable[["Stage"], "float | None"]
"""A user's prediction of a stage's run time in seconds (None: no prediction)."""


@dataclass(frozen=True, slots=True)
class ReadyWork:
    """One ready submission competing for a device slot, as a policy sees it (plain data).

    Attributes:
        name: the submission's name.
        priority: its queue's priority (a policy only ever sees one priority at a time).
        sequence: the order in which the work became ready at this device (FIFO ties).
        ready_at: when it started waiting for a slot (runtime clock).
        deadline_at: when it must finish, on the runtime clock, or None.
        remaining: predicted seconds from its start to the end of its workflow: its own
            run time plus the longest predicted path through the stages after it (its own
            predicted run time for work outside a graph, 0.0 when nothing is known).
        workflow: the graph run it belongs to, or None.
    """

    name: str
    priority: int
    sequence: int
    ready_at: float
    deadline_at: float | None = None
    remaining: float = 0.0
    workflow: str | None = None


class Policy(ABC):
    """Chooses which ready submission of one QoS tier a device runs next.

    Subclass it and implement :meth:`choose`; give an instance to
    :func:`asyncfront.open_runtime` (``policy=``, every device) or set
    :attr:`asyncfront.devices.Device.policy`.
    """

    name: str = "policy"

    @abstractmethod
    def choose(self, ready: Sequence[ReadyWork], now: float) -> int:
        """The index in ``ready`` (non-empty, one priority) of the work to run next."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__}>"


class PriorityPolicy(Policy):
    """Queue priority, first come first served within a priority: the default.

    Devices with this policy keep the arbitration they always had (a heap keyed by
    priority and arrival, no per-decision cost); :meth:`choose` states the same rule.
    """

    name = "priority"

    def choose(self, ready: Sequence[ReadyWork], now: float) -> int:
        """The work that became ready first."""
        _check_ready(ready)
        return min(range(len(ready)), key=lambda i: ready[i].sequence)


class KeyedPolicy(Policy):
    """A policy that runs the work with the smallest key, with aging.

    The key of a ready submission is ``min(key(work, now), work.ready_at + max_wait)``;
    ties go to the work that became ready first. Aging bounds every wait: once a
    submission has waited ``max_wait`` seconds its key is at most now, and work that
    becomes ready later can only go first with a key earlier than that. For EDF that
    takes a deadline earlier than it, so a workflow submitted before it; for the SLO
    policy a latest start time, which is never more than ``(1 - feasibility)`` times
    the work's predicted remaining path before the moment it is chosen. Either way only
    a finite amount of work can still pass it.

    Args:
        max_wait: seconds (> 0, may be ``math.inf`` to turn aging off) after which
            waiting work no longer yields to younger work.

    Raises:
        ValueError: ``max_wait`` is not a number > 0.
    """

    def __init__(self, *, max_wait: float = DEFAULT_MAX_WAIT) -> None:
        if (
            isinstance(max_wait, bool)
            or not isinstance(max_wait, int | float)
            or math.isnan(max_wait)
            or max_wait <= 0
        ):
            raise ValueError(f"max_wait must be a number of seconds > 0, got {max_wait!r}")
        self.max_wait = float(max_wait)

    @abstractmethod
    def key(self, work: ReadyWork, now: float) -> float:
        """The policy's own key for ``work`` (smaller runs first), before aging."""

    def effective_key(self, work: ReadyWork, now: float) -> float:
        """The key with aging applied: never later than ``ready_at + max_wait``."""
        return min(self.key(work, now), work.ready_at + self.max_wait)

    def choose(self, ready: Sequence[ReadyWork], now: float) -> int:
        """The work with the smallest effective key, the earliest ready among equals."""
        _check_ready(ready)
        best = 0
        best_key = (self.effective_key(ready[0], now), ready[0].sequence)
        for i in range(1, len(ready)):
            work = ready[i]
            k = (self.effective_key(work, now), work.sequence)
            if k < best_key:
                best, best_key = i, k
        return best

    def __repr__(self) -> str:
        return f"<{type(self).__name__} max_wait={self.max_wait:g}s>"


class EDFPolicy(KeyedPolicy):
    """Earliest deadline first (work without a deadline ages like any other).

    The key is the work's absolute deadline; work without one has only its aging key,
    ``ready_at + max_wait``. Pick it when deadlines are per request and rarely missed:
    under overload EDF keeps serving the work that is already late, so misses cascade.
    """

    name = "edf"

    def key(self, work: ReadyWork, now: float) -> float:
        """The deadline (``inf`` without one)."""
        return math.inf if work.deadline_at is None else work.deadline_at


class SLOPolicy(KeyedPolicy):
    """Workflow-aware least slack first, serving the workflows that can still make it.

    A stage's slack is ``deadline - now - remaining``, where ``remaining`` is the
    predicted critical path of its workflow from that stage on (run-time estimates per
    stage from, in order: the user's ``predictor``, the stage's ``cost=`` at the
    device's speed, the mean measured run time of that stage in earlier runs of its
    graph). Work that can still meet its deadline (slack >= 0) is keyed by its latest
    start time, ``deadline - remaining``: least slack first. Work that can no longer
    meet it (not even ``feasibility`` times its predicted remaining path fits before
    the deadline) is keyed like work without a deadline (its aging key), so it yields to
    work that can, yet still runs once it has waited ``max_wait``.

    Pick it for graphs of dependent calls with end-to-end deadlines (agents, RAG
    pipelines), above all when load can exceed capacity.

    Args:
        predictor: ``predictor(stage) -> seconds | None``, a prediction of a graph
            stage's run time on its device (None falls back to cost, then history).
        max_wait: see :class:`KeyedPolicy`.
        feasibility: the share (0..1) of the predicted remaining path that must still
            fit before the deadline for work to count as able to meet it; 1.0 trusts the
            predictions fully, 0.0 never gives up on work before its deadline.
        order: how work that can still meet its deadline is ordered: ``"slack"`` (least
            slack first, the latest start time) or ``"deadline"`` (earliest deadline
            first among the feasible: favours the workflows that need the least work
            to finish, which meets more SLOs under overload at the price of the long
            ones; see the ``policies`` benchmark).

    Raises:
        TypeError: ``predictor`` is not callable.
        ValueError: ``max_wait`` is not > 0, ``feasibility`` is outside 0..1, or an
            unknown ``order``.
    """

    name = "slo"

    def __init__(
        self,
        predictor: StagePredictor | None = None,
        *,
        max_wait: float = DEFAULT_MAX_WAIT,
        feasibility: float = 0.9,
        order: str = "slack",
    ) -> None:
        super().__init__(max_wait=max_wait)
        if order not in ("slack", "deadline"):
            raise ValueError(f"order must be 'slack' or 'deadline', got {order!r}")
        if predictor is not None and not callable(predictor):
            raise TypeError(f"predictor must be callable or None, got {predictor!r}")
        if (
            isinstance(feasibility, bool)
            or not isinstance(feasibility, int | float)
            or not 0 <= feasibility <= 1
        ):
            raise ValueError(f"feasibility must be a number in 0..1, got {feasibility!r}")
        self.predictor = predictor
        self.feasibility = float(feasibility)
        self.order = order

    def key(self, work: ReadyWork, now: float) -> float:
        """The latest start time ``deadline - remaining`` (or the deadline) while feasible."""
        if work.deadline_at is None or not self.feasible(work, now):
            return math.inf
        if self.order == "deadline":
            return work.deadline_at
        return work.deadline_at - work.remaining

    def feasible(self, work: ReadyWork, now: float) -> bool:
        """Whether ``work`` can still meet its deadline, given the prediction's error.

        True when ``feasibility`` times its predicted remaining path still fits before
        the deadline: predictions err, and giving up on work that would have made it
        costs more than trying a little longer.
        """
        if work.deadline_at is None:
            return False
        return work.deadline_at - now >= self.feasibility * work.remaining

    def slack(self, work: ReadyWork, now: float) -> float | None:
        """``deadline - now - remaining``, or None for work without a deadline."""
        if work.deadline_at is None:
            return None
        return work.deadline_at - now - work.remaining


@dataclass(frozen=True)
class SLOStatistics:
    """The SLO attainment of one workflow (graph name): runs with a deadline, finished.

    Attributes:
        workflow: the graph's name (runs of graphs that share a name count together).
        runs: finished runs that had a deadline.
        met: those whose every stage completed by the deadline.
        missed: the others (late, or a stage failed).
    """

    workflow: str
    runs: int
    met: int
    missed: int

    @property
    def attainment(self) -> float:
        """``met / runs`` (1.0 when no run has finished yet)."""
        return self.met / self.runs if self.runs else 1.0


def _check_ready(ready: Sequence[ReadyWork]) -> None:
    if not ready:
        raise ValueError("a policy chooses among ready work; got none")


def critical_paths(
    estimates: Mapping[str, float], dependants: Mapping[str, Sequence[str]], order: Sequence[str]
) -> dict[str, float]:
    """``{stage: its estimate + the longest estimated path through the stages after it}``.

    ``order`` lists the stages dependencies first; ``dependants[s]`` are the stages that
    wait for ``s``.
    """
    remaining: dict[str, float] = {}
    for name in reversed(order):
        after = dependants.get(name, ())
        tail = max((remaining[d] for d in after), default=0.0)
        remaining[name] = estimates.get(name, 0.0) + tail
    return remaining


class _WorkflowRecord:
    """One graph run's bookkeeping for SLOs and history: plain numbers, no submissions."""

    __slots__ = ("deadline_at", "failed", "history", "last_finish", "pending", "slo")

    def __init__(
        self,
        deadline_at: float | None,
        pending: int,
        history: dict[str, tuple[int, float]],
        slo: list[int] | None,
    ) -> None:
        self.deadline_at = deadline_at
        self.pending = pending
        self.history = history
        self.slo = slo  # [runs, met] of the workflow's name, for runs with a deadline
        self.failed = False
        self.last_finish = -math.inf


class _StagePlan:
    """What a graph stage's submission carries for policies: its workflow and the path left."""

    __slots__ = ("record", "remaining", "stage", "workflow")

    def __init__(self, record: _WorkflowRecord, stage: str, workflow: str, remaining: float):
        self.record = record
        self.stage = stage
        self.workflow = workflow
        self.remaining = remaining

    def finished(self, started_at: float | None, finished_at: float, failed: bool) -> None:
        """Record one finished submission of the stage: history, and the run's SLO at its end."""
        record = self.record
        if failed:
            record.failed = True
        elif started_at is not None:
            count, mean = record.history.get(self.stage, (0, 0.0))
            count += 1
            record.history[self.stage] = (count, mean + (finished_at - started_at - mean) / count)
        if finished_at > record.last_finish:
            record.last_finish = finished_at
        record.pending -= 1
        if record.pending == 0 and record.slo is not None and record.deadline_at is not None:
            record.slo[0] += 1
            if not record.failed and record.last_finish <= record.deadline_at:
                record.slo[1] += 1
