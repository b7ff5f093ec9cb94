"""Collective channels: one axis for a group of queues that work in lockstep.

A tensor-parallel model runs each layer on several devices at once and joins them with
an all-reduce. Tracked per queue, every such step would add one frontier entry per
device to everything downstream. A :class:`CollectiveChannel` gives the group a single
axis (domain ``COLLECTIVE``): its step ``k`` runs a part on every member queue, and
completes once every part has; its signals then carry the merged frontier of the step's
waits plus ``{channel_axis: k}``, and none of the member queues' axes. Four GPUs or
forty, the step adds one entry.

Steps complete in order (each member runs its parts in FIFO order), their epochs
advance the runtime's completed frontier (``rt.completed``, ``rt.wait_completed``) on
the channel axis, and a failing part fails the step and everything that waits on it.

:meth:`CollectiveChannel.resize` changes a group's membership between steps: it closes
the channel to new steps and returns the next channel, over the new queues, whose first
step waits on the last step submitted to the one before. A request whose parallelism
changes from step to step (two GPUs, then four, then one) thus keeps one unbroken
frontier chain: every step's frontier dominates every earlier step's, whichever
channel ran it.

``all_reduce`` sums one tensor per member in place, as a step of the channel: each
member first reduces its slice of the flattened tensors, then copies every reduced
slice back into its own tensor. With a ``torch.distributed`` process group (gloo), the
reduced slices are also all-reduced across processes in between, by the first member.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ._frontier import Frontier, axis_name
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
    from ._runtime import Runtime

__all__ = ("CollectiveChannel", "CollectiveStatistics", "CollectiveStep")


# A wait's frontier, captured when the wait is satisfied: a frontier (already reached at
# submission), a future (resolved by the semaphore's signal), or None (already failed).
_Capture = tuple[TimelineSemaphore, "Frontier | asyncio.Future[Frontier] | None"]


class CollectiveStep(Outcome):
    """One step of a channel: a part on every member queue; awaitable for the step's result.

    For :meth:`CollectiveChannel.submit` the result is the list of the members' results
    in rank order; for :meth:`CollectiveChannel.all_reduce`, the list of tensors.

    Attributes:
        channel: the channel it belongs to.
        epoch: its epoch on the channel's axis.
        name: a label for traces and logs.
        parts: the member submissions that make it up, in the order they were queued.
        waits / signals: ``(semaphore, value)`` pairs.
        errors: ``(part name, error)`` for every failed part, once failed.
    """

    __slots__ = (
        "_captures",
        "_finalize",
        "_frontier",
        "channel",
        "epoch",
        "errors",
        "parts",
        "signals",
        "waits",
    )

    def __init__(
        self,
        channel: CollectiveChannel,
        epoch: int,
        name: str,
        parts: tuple[Submission, ...],
        waits: tuple[SemaphoreValue, ...],
        signals: tuple[SemaphoreValue, ...],
        captures: list[_Capture],
        finalize: Callable[[list[Any]], Any],
    ) -> None:
        self.channel = channel
        self.epoch = epoch
        self.name = name
        self.parts = parts
        self.waits = waits
        self.signals = signals
        self.state = SubmissionState.PENDING
        self.errors: tuple[tuple[str, BaseException], ...] = ()
        self._captures = captures
        self._finalize = finalize
        self._frontier: Frontier | None = None
        self._result: Any = None
        self._exception: BaseException | None = None
        self._futures: list[asyncio.Future[None]] | None = None

    @property
    def frontier(self) -> Frontier | None:
        """The step's signalled frontier: its waits' frontiers and ``{channel axis: epoch}``.

        None until the step is done.
        """
        return self._frontier

    _kind = "collective step"

    def _event_loop(self) -> asyncio.AbstractEventLoop:
        return self.channel._loop

    def __repr__(self) -> str:
        return (
            f"<CollectiveStep {self.name!r} on {self.channel.name!r} epoch={self.epoch} "
            f"parts={len(self.parts)} {self.state.value}>"
        )


@dataclass(frozen=True)
class CollectiveStatistics:
    """A snapshot of a channel."""

    name: str
    members: int
    world_size: int
    submitted_epoch: int
    completed_epoch: int
    pending: int
    distributed: bool


class CollectiveChannel:
    """One axis for a group of member queues; created by :meth:`asyncfront.Runtime.collective`.

    ``rank`` numbers the members: within one process, ``0..len(members)-1`` in the
    order given; with a process group, ``process_rank * len(members) + index``, so
    every process must hold the same number of members. ``world_size`` counts the
    members of all processes.
    """

    def __init__(
        self,
        runtime: Runtime,
        members: Sequence[DeviceQueue],
        name: str,
        axis: int,
        process_group: Any = None,
    ) -> None:
        members = tuple(members)
        if not members:
            raise ValueError(f"collective channel {name!r} needs at least one member queue")
        seen: set[int] = set()
        for q in members:
            if not isinstance(q, DeviceQueue):
                raise TypeError(f"collective channel {name!r}: members must be queues, got {q!r}")
            if q.runtime is not runtime:
                raise ValueError(f"queue {q.name!r} belongs to another runtime")
            if id(q) in seen:
                raise ValueError(f"collective channel {name!r}: queue {q.name!r} appears twice")
            seen.add(id(q))
        self.runtime = runtime
        self.members = members
        self.name = name
        self.axis = axis
        self.process_group = process_group
        self._loop = asyncio.get_running_loop()
        if process_group is not None:
            dist = _distributed()
            self.rank_offset = dist.get_rank(process_group) * len(members)
            self.world_size = dist.get_world_size(process_group) * len(members)
        else:
            self.rank_offset = 0
            self.world_size = len(members)
        self._steps: deque[CollectiveStep] = deque()
        self._next_epoch = 1
        self._completed_epoch = 0
        self._base = Frontier()  # merge of every completed step's waits
        self._blocked: CollectiveStep | None = None  # the step whose parts it awaits
        self._wakeup: asyncio.Future[None] | None = None
        self._closed = False
        self._task: asyncio.Task[None] | None = None
        # resize: the successor's name, the semaphore its first step waits on and the
        # epoch of the step that signals it (this channel's last); None before a resize
        self._successor: str | None = None
        self._handoff: tuple[TimelineSemaphore, int] | None = None
        # the first step submitted here also waits on this (the predecessor's last step)
        self._predecessor: SemaphoreValue | None = None
        self._last_error: BaseException | None = None  # root cause, if the last step failed

    # -- public --------------------------------------------------------------------

    @property
    def submitted_epoch(self) -> int:
        """The epoch of the latest step submitted."""
        return self._next_epoch - 1

    @property
    def completed_epoch(self) -> int:
        """The epoch of the latest step finished (completed or failed)."""
        return self._completed_epoch

    @property
    def frontier(self) -> Frontier:
        """What the latest finished step's signals carried (empty before the first)."""
        if not self._completed_epoch:
            return self._base
        return self._base.with_epoch(self.axis, self._completed_epoch)

    def ranks(self) -> tuple[int, ...]:
        """The ranks of this process's members, in member order."""
        return tuple(range(self.rank_offset, self.rank_offset + len(self.members)))

    @property
    def closed(self) -> bool:
        """Whether the channel takes no more steps (closed, or resized into another)."""
        return self._closed

    @property
    def successor(self) -> str | None:
        """The name of the channel :meth:`resize` returned, or None."""
        return self._successor

    def close(self) -> None:
        """Take no more steps; the steps already submitted still run and signal."""
        self._closed = True
        wakeup, self._wakeup = self._wakeup, None
        if wakeup is not None and not wakeup.done():
            wakeup.set_result(None)

    def resize(
        self, queues: Iterable[DeviceQueue], *, name: str | None = None
    ) -> CollectiveChannel:
        """The next channel of this group, over ``queues``; this one takes no more steps.

        Membership changes at a step boundary: the returned channel (a new axis) makes
        its first step wait on the last step submitted here, so that step's frontier
        dominates the frontier of every step of this channel, and a failure of that
        last step fails it (and what waits on it) with the same cause. Steps already
        submitted here still run. Queues may be kept, dropped or added; a queue dropped
        here is free for other work once this channel's last step has run on it.

        Args:
            queues: the new members (at least one queue of this runtime, none twice).
            name: the new channel's name (default: this name with a resize count).

        Raises:
            RuntimeError: this channel is closed or was resized already.
            ValueError / TypeError: invalid members (as :meth:`asyncfront.Runtime.collective`),
                or a channel across processes (its membership is the process group's).
        """
        if self._closed:
            raise RuntimeError(self._closed_message())
        if self.process_group is not None:
            raise ValueError(
                f"collective channel {self.name!r} spans processes; its membership is its "
                "process group's and cannot be resized"
            )
        members = tuple(queues)
        if name is None:
            stem, _, count = self.name.rpartition("~")
            name = f"{stem}~{int(count) + 1}" if stem and count.isdigit() else f"{self.name}~1"
        successor = self.runtime.collective(members, name=name)  # validates the members
        last = self.submitted_epoch
        if last:
            link = TimelineSemaphore(name=f"{self.name}->{successor.name}")
            link.bind(self._loop)
            if last == self._completed_epoch:
                if self._last_error is not None:
                    link.fail(self._last_error)
                else:
                    link.signal(1, self.frontier)
            else:
                self._handoff = (link, last)
            successor._predecessor = (link, 1)
        else:  # nothing ran here: the successor inherits what this channel waited on
            successor._predecessor = self._predecessor
        self._successor = successor.name
        self.close()
        return successor

    def submit(
        self,
        fn: Callable[..., Any] | Sequence[Callable[..., Any]] | None = None,
        *args: Any,
        waits: Iterable[SemaphoreValue] = (),
        signals: Iterable[SemaphoreValue] = (),
        name: str | None = None,
        cost: float | None = None,
        **kwargs: Any,
    ) -> CollectiveStep:
        """Run one step: a part on every member queue; returns the step at once.

        With one callable, member ``rank`` runs ``fn(rank, *args, **kwargs)``; with a
        sequence of callables (one per member, in member order), member ``i`` runs
        ``fn[i](*args, **kwargs)``; ``None`` makes a pure barrier step. Every part waits
        on ``waits``; ``signals`` are signalled once every part has finished, with the
        waits' merged frontier and ``{channel axis: epoch}``. ``cost`` is each part's.

        Raises:
            RuntimeError: the channel, a member queue or the runtime is closed.
            TypeError / ValueError: malformed waits, signals or callables.
        """
        n = len(self.members)
        if fn is None or callable(fn):
            single = fn
            fns: list[Callable[..., Any] | None] = [
                None if single is None else functools.partial(single, rank) for rank in self.ranks()
            ]
        else:
            fns = list(fn)
            if len(fns) != n or not all(callable(f) for f in fns):
                raise TypeError(
                    f"collective channel {self.name!r}: pass one callable, or {n} callables "
                    f"(one per member), got {fn!r}"
                )
        label = name if name is not None else getattr(fn, "__name__", "step")
        waits_t, signals_t = self._check(waits, signals, cost)
        epoch = self._next_epoch
        parts = tuple(
            q.submit(part, *args, waits=waits_t, name=f"{label}[{rank}]", cost=cost, **kwargs)
            for q, part, rank in zip(self.members, fns, self.ranks(), strict=True)
        )
        return self._enqueue(epoch, label, parts, waits_t, signals_t, list)

    def all_reduce(
        self,
        tensors: Sequence[Any],
        *,
        waits: Iterable[SemaphoreValue] = (),
        signals: Iterable[SemaphoreValue] = (),
        name: str = "all_reduce",
        cost: float | None = None,
    ) -> CollectiveStep:
        """Sum ``tensors`` (one contiguous CPU tensor per member, same shape) in place.

        A step of the channel: member ``i`` reduces the ``i``-th slice of the flattened
        tensors across all of them, then, once every slice is reduced, copies every
        slice into its own tensor; with a process group, the first member all-reduces
        the reduced slices across processes in between. ``cost`` is each member's time
        in the step (half reducing, half copying back) on fake devices. Await the step
        for the list of tensors.

        Raises:
            ValueError: not one tensor per member, or mismatched shapes or dtypes, or a
                tensor that is not contiguous.
        """
        n = len(self.members)
        tensors = list(tensors)
        if len(tensors) != n:
            raise ValueError(
                f"collective channel {self.name!r}: all_reduce takes one tensor per member "
                f"({n}), got {len(tensors)}"
            )
        first = tensors[0]
        for i, t in enumerate(tensors):
            if t.shape != first.shape or t.dtype != first.dtype:
                raise ValueError(
                    f"all_reduce tensor {i} is {tuple(t.shape)} {t.dtype}, "
                    f"tensor 0 is {tuple(first.shape)} {first.dtype}"
                )
            if not t.is_contiguous():
                raise ValueError(f"all_reduce tensor {i} is not contiguous (it is summed in place)")
        waits_t, signals_t = self._check(waits, signals, cost)
        epoch = self._next_epoch
        flats = [t.view(-1) for t in tensors]
        bounds = _slices(flats[0].numel(), n)
        reduced: list[Any] = [None] * n
        half = None if cost is None else cost / 2
        stem = f"{self.name}.{name}#{epoch}"
        arrived = [TimelineSemaphore(name=f"{stem}.reduced[{i}]") for i in range(n)]

        def reduce_slice(i: int) -> None:
            lo, hi = bounds[i]
            acc = flats[0][lo:hi].clone()
            for flat in flats[1:]:
                acc.add_(flat[lo:hi])
            reduced[i] = acc

        def copy_back(i: int) -> None:
            own = flats[i]
            for (lo, hi), chunk in zip(bounds, reduced, strict=True):
                own[lo:hi].copy_(chunk)

        parts = [
            q.submit(
                reduce_slice, i, waits=waits_t, signals=[(arrived[i], 1)],
                name=f"{name}.reduce[{rank}]", cost=half,
            )
            for i, (q, rank) in enumerate(zip(self.members, self.ranks(), strict=True))
        ]  # fmt: skip
        ready: list[SemaphoreValue] = [(sem, 1) for sem in arrived]
        group = self.process_group
        if group is not None:
            dist = _distributed()
            exchanged = TimelineSemaphore(name=f"{stem}.exchanged")

            def exchange() -> None:
                for chunk in reduced:
                    if chunk.numel():
                        dist.all_reduce(chunk, group=group)

            parts.append(
                self.members[0].submit(
                    exchange, waits=ready, signals=[(exchanged, 1)], name=f"{name}.exchange"
                )
            )
            ready = [(exchanged, 1)]
        parts += [
            q.submit(copy_back, i, waits=ready, name=f"{name}.gather[{rank}]", cost=half)
            for i, (q, rank) in enumerate(zip(self.members, self.ranks(), strict=True))
        ]
        return self._enqueue(epoch, name, tuple(parts), waits_t, signals_t, lambda _: tensors)

    def statistics(self) -> CollectiveStatistics:
        """A frozen snapshot of epochs and pending steps."""
        return CollectiveStatistics(
            name=self.name,
            members=len(self.members),
            world_size=self.world_size,
            submitted_epoch=self.submitted_epoch,
            completed_epoch=self._completed_epoch,
            pending=len(self._steps),
            distributed=self.process_group is not None,
        )

    def __repr__(self) -> str:
        members = ", ".join(q.name for q in self.members)
        return (
            f"<CollectiveChannel {self.name!r} axis={axis_name(self.axis)} members=[{members}] "
            f"epochs {self._completed_epoch}/{self.submitted_epoch}>"
        )

    # -- submission ----------------------------------------------------------------

    def _check(
        self,
        waits: Iterable[SemaphoreValue],
        signals: Iterable[SemaphoreValue],
        cost: float | None,
    ) -> tuple[tuple[SemaphoreValue, ...], tuple[SemaphoreValue, ...]]:
        if self._closed:
            raise RuntimeError(self._closed_message())
        for q in self.members:
            if q._closed:
                raise RuntimeError(f"collective channel {self.name!r}: queue {q.name!r} is closed")
        waits_t, signals_t = tuple(waits), tuple(signals)
        _check_pairs("waits", waits_t)
        _check_pairs("signals", signals_t)
        for sem, value in signals_t:
            if value <= sem.value:
                raise ValueError(
                    f"collective channel {self.name!r}: signal value {value} for semaphore "
                    f"{sem.name!r} must exceed its current value {sem.value}"
                )
        if cost is not None and cost < 0:
            raise ValueError(f"cost must be >= 0, got {cost}")
        predecessor = self._predecessor
        if predecessor is not None:  # the first step after a resize: chain it on
            self._predecessor = None
            waits_t = (predecessor, *waits_t)
        return waits_t, signals_t

    def _closed_message(self) -> str:
        if self._successor is not None:
            return (
                f"collective channel {self.name!r} was resized into {self._successor!r}; "
                "submit there"
            )
        return f"collective channel {self.name!r} is closed"

    def _enqueue(
        self,
        epoch: int,
        name: str,
        parts: tuple[Submission, ...],
        waits: tuple[SemaphoreValue, ...],
        signals: tuple[SemaphoreValue, ...],
        finalize: Callable[[list[Any]], Any],
    ) -> CollectiveStep:
        self._next_epoch = epoch + 1
        captures: list[_Capture] = []
        for sem, value in waits:
            if sem.failure is not None:
                captures.append((sem, None))
            elif sem.value >= value:
                captures.append((sem, sem.frontier))
            else:  # resolved with the frontier the satisfying signal brings
                captures.append((sem, sem._add_waiter(value)))
        step = CollectiveStep(self, epoch, name, parts, waits, signals, captures, finalize)
        # The step, not its parts, signals: traces draw its dependants' arrows from this.
        step_signals = [f"{sem.name} = {value}" for sem, value in signals]
        for part in parts:
            part.annotate(collective=self.name, step=epoch, step_signals=step_signals)
        self._steps.append(step)
        wakeup, self._wakeup = self._wakeup, None
        if wakeup is not None and not wakeup.done():
            wakeup.set_result(None)
        runtime = self.runtime
        if runtime._log_debug:
            runtime._log.debug(
                "collective_submit", channel=self.name, step=name, epoch=epoch, parts=len(parts)
            )
        return step

    # -- the completion task -------------------------------------------------------

    def _busy(self) -> bool:
        return bool(self._steps)

    def _abort_blocked(self) -> bool:
        """Nothing to abort here: a stalled step waits on its member queues, which abort."""
        return False

    async def _run(self) -> None:
        runtime = self.runtime
        steps = self._steps
        try:
            while True:
                if not steps:
                    if self._closed:
                        return  # closed and drained
                    runtime._queue_settled()
                    wakeup = self._wakeup = self._loop.create_future()
                    await wakeup
                    continue
                step = steps[0]
                step.state = SubmissionState.RUNNING
                self._blocked = step
                if runtime._draining:
                    runtime._queue_settled()
                results: list[Any] = []
                errors: list[tuple[str, BaseException]] = []
                try:
                    for part in step.parts:
                        try:
                            results.append(await part)
                        except Exception as exc:
                            errors.append((part.name, exc))
                finally:
                    self._blocked = None
                steps.popleft()
                self._complete(step, results, errors)
        finally:
            self._closed = True
            if steps:
                closing = StalledError(f"collective channel {self.name!r} closed before this step")
                while steps:
                    self._finish_failed(steps.popleft(), [("", closing)])
            handoff, self._handoff = self._handoff, None
            if handoff is not None:  # its step never finished: the successor must not wait
                handoff[0].fail(StalledError(f"collective channel {self.name!r} closed"))
            with contextlib.suppress(ValueError):  # a closed, drained channel is no unit
                runtime._channels.remove(self)

    def _captured(self, step: CollectiveStep) -> Frontier:
        """The merged frontiers the step's waits were satisfied with."""
        base = self._base
        for sem, capture in step._captures:
            if isinstance(capture, Frontier):
                base = base.merge(capture)
            elif capture is not None:
                if not capture.done():
                    capture.cancel()  # the parts failed before the wait was satisfied
                    sem._forget_cancelled()
                elif not capture.cancelled() and capture.exception() is None:
                    base = base.merge(capture.result())
        step._captures = []
        return base

    def _complete(
        self,
        step: CollectiveStep,
        results: list[Any],
        errors: list[tuple[str, BaseException]],
    ) -> None:
        runtime = self.runtime
        base = self._captured(step)
        if not errors:
            capacity = runtime.frontier_capacity
            if len(base) > capacity:
                base = base.truncated(capacity, keep=self.axis)
            frontier = base.with_epoch(self.axis, step.epoch)
            if len(frontier) > capacity:
                frontier = frontier.truncated(capacity, keep=self.axis)
            try:
                result = step._finalize(results)
                for sem, value in step.signals:
                    sem.signal(value, frontier)
            except Exception as exc:
                errors.append((step.name, exc))
            else:
                self._base = base
                step._frontier = frontier
                self._last_error = None
                self._hand_off(step.epoch, frontier, None)
                step._finish(result)
                if runtime._log_debug:
                    runtime._log.debug(
                        "collective_step", channel=self.name, step=step.name, epoch=step.epoch
                    )
        if errors:
            self._finish_failed(step, errors)
        self._record(step.epoch)

    def _finish_failed(self, step: CollectiveStep, errors: list[tuple[str, BaseException]]) -> None:
        _, first = errors[0]
        root = first
        while isinstance(root, SemaphoreFailedError):
            root = root.root_cause
        if step._captures:
            self._captured(step)
        step.errors = tuple(errors)
        step._frontier = self._base.with_epoch(self.axis, step.epoch)
        for sem, value in step.signals:
            if sem.failure is None and sem.value < value:
                sem.fail(root)
        self._last_error = root
        self._hand_off(step.epoch, None, root)
        step._fail(first)
        runtime = self.runtime
        if runtime._log_warning:
            runtime._log.warning(
                "fail",
                channel=self.name,
                step=step.name,
                epoch=step.epoch,
                error=f"{type(root).__name__}: {root}",
            )

    def _hand_off(self, epoch: int, frontier: Frontier | None, error: BaseException | None) -> None:
        """Pass the last step's outcome on to the successor's first step (after a resize)."""
        handoff = self._handoff
        if handoff is None or handoff[1] != epoch:
            return
        self._handoff = None
        link = handoff[0]
        if error is not None:
            link.fail(error)
        else:
            assert frontier is not None
            link.signal(1, frontier)

    def _record(self, epoch: int) -> None:
        self._completed_epoch = epoch
        runtime = self.runtime
        runtime._completed_epochs[self.axis] = epoch
        runtime._completed_cache = None
        if runtime._completion_waiters:
            runtime._axis_completed(self.axis, epoch)


def _slices(total: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous ``(start, stop)`` ranges covering ``range(total)``, sizes within one."""
    size, extra = divmod(total, parts)
    bounds = []
    start = 0
    for i in range(parts):
        stop = start + size + (1 if i < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def _distributed() -> Any:
    """``torch.distributed``, imported on first use."""
    try:
        import torch.distributed as dist
    except ImportError as exc:
        from ._install import install_hint

        raise ImportError(
            f"collective channels across processes need torch.distributed ({install_hint('torch')})"
        ) from exc
    if not dist.is_available():
        raise ImportError("this torch build has no torch.distributed support")
    return dist
