"""The Device ABC and the priority arbiter every device shares."""

from __future__ import annotations

import asyncio
import heapq
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, TypeAlias

from mypy_extensions import mypyc_attr

from .._policy import Policy, PriorityPolicy, ReadyWork

if TYPE_CHECKING:
    from .._frontier import Frontier
    from .._queue import DeviceQueue, Submission
    from .._runtime import Runtime
    from .._semaphore import TimelineSemaphore
    from ..memory import Block

__all__ = ("LATER", "Device", "DeviceStatistics", "SlotArbiter")


class _Later:
    """The type of :data:`LATER`."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "LATER"


LATER: Final[Any] = _Later()
"""What :meth:`Device.execute_now` returns when the work must go through ``execute``."""


class SlotGrant:
    """A queue's request for a slot, granted in place by calling its owner back: no future.

    It answers the part of the future API the arbiter uses (``done``, ``cancelled``,
    ``set_result``, ``cancel``); ``cancel`` does not call back, since only the owner
    cancels.
    """

    __slots__ = ("_callback", "_state")

    def __init__(self, callback: Callable[[], None]) -> None:
        self._callback: Callable[[], None] | None = callback
        self._state = 0  # 0 waiting, 1 granted, 3 cancelled

    def done(self) -> bool:
        """Whether it was granted or cancelled."""
        return self._state != 0

    def cancelled(self) -> bool:
        """Whether its owner withdrew it."""
        return self._state == 3

    def set_result(self, result: None) -> None:
        """Grant the slot and call the owner back."""
        if self._state:
            raise asyncio.InvalidStateError("the slot request is already done")
        self._state = 1
        callback, self._callback = self._callback, None
        if callback is not None:
            callback()

    def cancel(self) -> bool:
        """Withdraw it (no call back); False once it is done."""
        if self._state:
            return False
        self._state = 3
        self._callback = None
        return True


SlotRequest: TypeAlias = "asyncio.Future[None] | SlotGrant"
"""What waits in an arbiter for a slot: a future, or a queue's :class:`SlotGrant`."""


class SlotArbiter:
    """Hands a device's execution slots to its queues' ready work.

    Queue priority separates tiers (higher first); within the highest waiting tier the
    device's :class:`~asyncfront.Policy` chooses. With the default
    :class:`~asyncfront.PriorityPolicy` that is first come, first served, kept in a heap
    of ``(-priority, sequence, future)``; any other policy sees the tier's ready work as
    :class:`~asyncfront.ReadyWork` records and picks one (:meth:`~asyncfront.Policy.choose`).

    The decision is synchronous: :meth:`try_acquire` grants at once when a slot is free
    and nobody is queued; otherwise the caller queues with :meth:`enqueue` (or
    :meth:`enqueue_work`) and is granted by :meth:`grant`, which the device runs on the
    loop turn after a release, so the queue that just finished can present its next
    ready submission and priorities hold under back-to-back work.
    """

    __slots__ = (
        "_free",
        "_grant_scheduled",
        "_heap",
        "_policy",
        "_ready",
        "_seq",
        "capacity",
        "chooser",
        "clock",
        "policy_error",
    )

    def __init__(self, capacity: int, policy: Policy | None = None) -> None:
        if capacity < 1:
            raise ValueError(f"device concurrency must be >= 1, got {capacity}")
        self.capacity = capacity
        self._free = capacity
        self._heap: list[tuple[int, int, SlotRequest]] = []
        # ready work under a policy other than the default, in the order it arrived
        self._ready: list[tuple[ReadyWork, SlotRequest]] = []
        self._seq = 0
        self._grant_scheduled = False
        self._policy: Policy | None = None
        self.chooser: Policy | None = None
        """The policy consulted for each grant; None for the default (the heap)."""
        self.clock: Callable[[], float] = _no_clock
        """The runtime clock the policy reads (the device's loop time once started)."""
        self.policy_error: str | None = None
        """The last error of the policy's ``choose``; that grant went to the oldest work."""
        self.policy = policy

    @property
    def policy(self) -> Policy:
        """The policy choosing within a tier (default: :class:`~asyncfront.PriorityPolicy`)."""
        return _DEFAULT_POLICY if self._policy is None else self._policy

    @policy.setter
    def policy(self, policy: Policy | None) -> None:
        if policy is not None and not isinstance(policy, Policy):
            raise TypeError(
                f"a device policy must be an asyncfront.Policy (or None for the default), "
                f"got {policy!r} ({type(policy).__name__})"
            )
        self._policy = policy
        self.chooser = None if policy is None or type(policy) is PriorityPolicy else policy

    @property
    def free(self) -> int:
        """Slots not held by any queue."""
        return self._free

    @property
    def waiting(self) -> int:
        """Queues waiting for a slot."""
        return sum(1 for _, _, fut in self._heap if not fut.done()) + sum(
            1 for _, fut in self._ready if not fut.done()
        )

    def ready_work(self) -> tuple[ReadyWork, ...]:
        """The work waiting for a slot under a policy, as that policy sees it."""
        return tuple(work for work, fut in self._ready if not fut.done())

    def highest_waiting(self) -> int | None:
        """The priority of the highest-priority queue waiting for a slot, or None.

        Read-only, and safe to call from a worker thread: a device that picks work on its
        own threads asks it so it never runs lower-priority work ahead of such a queue.
        """
        best: int | None = None
        heap = self._heap
        if heap:
            try:
                best = -heap[0][0]
            except IndexError:  # the loop emptied it meanwhile
                best = None
        if self._ready:  # a non-default policy's requests: priorities in no order
            for work, fut in list(self._ready):  # a snapshot: the loop may change the list
                if not fut.done() and (best is None or work.priority > best):
                    best = work.priority
        return best

    def try_acquire(self) -> bool:
        """Take a slot now if one is free and nobody is ahead; True on success."""
        if self._free and not self._heap and not self._ready and not self._grant_scheduled:
            self._free -= 1
            return True
        return False

    def next_sequence(self) -> int:
        """A new arrival number (the FIFO order of requests)."""
        self._seq += 1
        return self._seq

    def enqueue(self, priority: int, future: SlotRequest) -> None:
        """Queue a request; ``future`` resolves when the slot is granted."""
        self._seq += 1
        heapq.heappush(self._heap, (-priority, self._seq, future))

    def enqueue_work(self, work: ReadyWork, future: SlotRequest) -> None:
        """Queue ready work for the policy to choose; ``future`` resolves on the grant."""
        self._ready.append((work, future))

    def withdraw(self, future: SlotRequest) -> None:
        """Forget a request that will not be granted (its waiter was cancelled)."""
        heap = self._heap
        for i, entry in enumerate(heap):
            if entry[2] is future:
                heap[i] = heap[-1]
                heap.pop()
                heapq.heapify(heap)
                return
        ready = self._ready
        for i, (_, fut) in enumerate(ready):
            if fut is future:
                del ready[i]
                return

    def release(self) -> bool:
        """Return a slot; True when a grant should be scheduled for the next loop turn."""
        self._free += 1
        if (self._heap or self._ready) and not self._grant_scheduled:
            self._grant_scheduled = True
            return True
        return False

    def grant(self) -> None:
        """Give free slots to the waiting requests: highest tier first, then the policy."""
        self._grant_scheduled = False
        heap = self._heap
        if self._free == 1 and not self._ready:  # one slot, the first in line: the common case
            while heap:
                fut = heapq.heappop(heap)[2]
                if not fut.done():
                    self._free -= 1
                    fut.set_result(None)
                    return
            return
        # Every decision first, then the grants: a queue called back in place runs its work
        # only once every free slot is placed.
        granted: list[SlotRequest] = []
        self._decide(granted)
        for fut in granted:
            fut.set_result(None)

    def _decide(self, granted: list[SlotRequest]) -> None:
        """Take free slots for the waiting requests into ``granted`` (see :meth:`grant`)."""
        heap = self._heap
        if not self._ready:
            while self._free and heap:
                fut = heapq.heappop(heap)[2]
                if not fut.done():
                    self._free -= 1
                    granted.append(fut)
            return
        while self._free:
            while heap and heap[0][2].done():
                heapq.heappop(heap)
            ready = self._ready
            if any(fut.done() for _, fut in ready):
                ready[:] = [entry for entry in ready if not entry[1].done()]
            if not ready:
                if not heap:
                    return
                fut = heapq.heappop(heap)[2]
            else:
                top = max(work.priority for work, _ in ready)
                if heap and -heap[0][0] >= top:
                    fut = heapq.heappop(heap)[2]  # a higher (or older, default) tier first
                else:
                    fut = ready.pop(self._choose(ready, top))[1]
            self._free -= 1
            granted.append(fut)

    def _choose(self, ready: list[tuple[ReadyWork, SlotRequest]], top: int) -> int:
        """The index in ``ready`` of the tier ``top``'s work that the policy picks."""
        indices = [i for i, (work, _) in enumerate(ready) if work.priority == top]
        tier = [ready[i][0] for i in indices]
        if len(tier) == 1:
            return indices[0]
        policy = self.chooser if self.chooser is not None else self.policy
        # A failing policy must not leave the slot ungranted: the oldest work gets it.
        try:
            choice = policy.choose(tier, self.clock())
        except Exception as exc:
            self.policy_error = f"{policy!r}.choose raised {type(exc).__name__}: {exc}"
            return indices[0]
        if type(choice) is not int or not 0 <= choice < len(tier):
            self.policy_error = (
                f"{policy!r}.choose returned {choice!r} for {len(tier)} ready submissions, "
                f"not an index in 0..{len(tier) - 1}"
            )
            return indices[0]
        return indices[choice]


_DEFAULT_POLICY: Final = PriorityPolicy()


def _no_clock() -> float:
    return 0.0


@mypyc_attr(allow_interpreted_subclasses=True)
@dataclass(frozen=True)
class DeviceStatistics:
    """A snapshot of a device's scheduling state."""

    name: str
    kind: str
    concurrency: int
    busy_slots: int
    waiting_queues: int
    executed: int


@mypyc_attr(allow_interpreted_subclasses=True)
class Device(ABC):
    """A piece of hardware that runs submissions from its queues.

    Subclasses implement :meth:`execute`; the base class arbitrates the device's
    ``concurrency`` slots among its queues by priority.
    """

    kind: str = "device"
    claims_waits: bool = False
    """Whether its queues offer the device their unmet waits (see :meth:`claim_wait`)."""
    watches_waits: bool = False
    """Whether its queues show the device each head that blocks (see :meth:`watch_wait`)."""

    def __init__(self, name: str, *, concurrency: int = 1) -> None:
        # A subclass may declare these as class attributes (``kind = "npu"``): where this
        # class is compiled its instances hold their own, so take the declared ones.
        cls = type(self)
        kind = getattr(cls, "kind", None)
        if isinstance(kind, str):
            self.kind = kind
        claims = getattr(cls, "claims_waits", None)
        if isinstance(claims, bool):
            self.claims_waits = claims
        watches = getattr(cls, "watches_waits", None)
        if isinstance(watches, bool):
            self.watches_waits = watches
        self.name = name
        self.concurrency = concurrency
        self.memory: Any = None  # the device's BufferPool, set by the runtime
        self.memory_capacity: int | None = None  # bytes of device memory, None if untracked
        # Bytes of memory_capacity that only work's own allocations (working memory) may
        # use; the pool takes the rest. None: the pool and working memory share all of it.
        self.working_capacity: int | None = None
        self.index = -1  # set by the runtime: the device field of its queue axes
        self._arbiter = SlotArbiter(concurrency)
        self._runtime: Runtime | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._executed = 0

    # -- lifecycle -----------------------------------------------------------------

    async def start(self, runtime: Runtime) -> None:
        """Attach to a runtime (called by :func:`asyncfront.open_runtime`)."""
        if self._runtime is not None:
            raise RuntimeError(f"device {self.name!r} already belongs to a runtime")
        self._runtime = runtime
        self._loop = asyncio.get_running_loop()
        self._arbiter.clock = self._loop.time

    async def aclose(self) -> None:
        """Release the device's resources (called when the runtime closes)."""
        self._runtime = None
        self._loop = None

    def queue(self, priority: int = 0, name: str | None = None) -> DeviceQueue:
        """A new queue on this device, in the runtime it belongs to."""
        if self._runtime is None:
            raise RuntimeError(f"device {self.name!r} is not part of an open runtime")
        return self._runtime.queue(self, priority=priority, name=name)

    # -- arbitration ---------------------------------------------------------------

    @property
    def policy(self) -> Policy:
        """How the device chooses among ready work of one priority.

        The default, :class:`~asyncfront.PriorityPolicy`, is first come, first served;
        set an :class:`~asyncfront.EDFPolicy` or :class:`~asyncfront.SLOPolicy` (or your
        own :class:`~asyncfront.Policy`) here or with ``open_runtime(policy=...)``. A new
        policy decides from the next grant on; ``None`` restores the default.

        Raises:
            TypeError: (on setting) not a :class:`~asyncfront.Policy` nor None.
        """
        return self._arbiter.policy

    @policy.setter
    def policy(self, policy: Policy | None) -> None:
        self._arbiter.policy = policy

    @property
    def policy_error(self) -> str | None:
        """The last error of the policy's ``choose``, or None (that grant went to the oldest)."""
        return self._arbiter.policy_error

    async def acquire(self, priority: int, work: Submission | None = None) -> None:
        """Wait for an execution slot: highest priority first, then the device's policy.

        ``work`` is the submission asking (what a policy other than the default weighs:
        its deadline and its workflow's predicted remaining path).
        """
        arbiter = self._arbiter
        if arbiter.try_acquire():
            return
        loop = self._loop or asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        if arbiter.chooser is None or work is None:
            arbiter.enqueue(priority, fut)
        else:
            arbiter.enqueue_work(self._ready_work(work, priority, loop.time()), fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # granted just as we were cancelled: give it back
            else:
                arbiter.withdraw(fut)  # a stale request would keep free slots from others
            raise

    def _ready_work(self, work: Submission, priority: int, now: float) -> ReadyWork:
        """What the policy sees of ``work``: plain values, no reference to it."""
        plan = work._plan
        if plan is not None:
            remaining, workflow = plan.remaining, plan.workflow
        else:
            speed = getattr(self, "speed", 1.0)
            remaining = (work.cost or 0.0) / speed if isinstance(speed, int | float) else 0.0
            workflow = None
        return ReadyWork(
            name=work.name,
            priority=priority,
            sequence=self._arbiter.next_sequence(),
            ready_at=now,
            deadline_at=work.deadline_at,
            remaining=remaining,
            workflow=workflow,
        )

    def release(self) -> None:
        """Return an execution slot; the next grant happens on the next loop turn."""
        self._executed += 1
        if self._arbiter.release():
            loop = self._loop or asyncio.get_running_loop()
            loop.call_soon(self._arbiter.grant)

    # -- work ----------------------------------------------------------------------

    @abstractmethod
    async def execute(self, submission: Submission) -> Any:
        """Run one submission's work to completion and return its result."""

    def execute_now(self, submission: Submission) -> Any:
        """Run the work at once on the loop thread if this device can, else :data:`LATER`.

        The queue calls it, holding a slot it took without waiting, before it would await
        :meth:`execute`: a device whose work for ``submission`` needs no time and no other
        thread (a fake device's zero-cost call) returns the result (an awaitable result
        is awaited by the queue), or raises the work's error, and saves the coroutine and
        the loop turn. The default, :data:`LATER`, sends every submission to :meth:`execute`.
        """
        return LATER

    def timed_seconds(self, submission: Submission) -> float | None:
        """Seconds of loop time the work takes if this device runs it as a timer, else None.

        The queue asks, holding a slot, when :meth:`execute_now` returned :data:`LATER`:
        a device whose work is a pure wait of known length (a fake device's cost) returns
        it, and the queue sets a loop timer instead of awaiting :meth:`execute`, then calls
        :meth:`finish_timed` when it fires. The default, None, sends the work to
        :meth:`execute`.
        """
        return None

    def finish_timed(self, submission: Submission) -> Any:
        """Complete work whose :meth:`timed_seconds` elapsed: its result, or its error.

        An awaitable result is awaited by the queue, the slot still held.
        """
        raise NotImplementedError(f"device {self.name!r} runs no work as a timer")

    def claim_wait(  # noqa: B027 (a hook whose default is to do nothing)
        self,
        submission: Submission,
        semaphore: TimelineSemaphore,
        value: int,
        waiter: asyncio.Future[Frontier],
    ) -> None:
        """Offered each unmet wait of a submission on a device with :attr:`claims_waits`.

        ``waiter`` is the queue's pending wait for ``semaphore`` to reach ``value``. A
        device that can order ``submission``'s work after the signalling work on its own
        (a CUDA stream waiting on an event of the same GPU) resolves ``waiter`` itself,
        now or later, with the frontier the wait yields (``semaphore._satisfy``), and
        makes :meth:`execute` wait on the device. Otherwise it leaves ``waiter`` to the
        semaphore's signal: the host path. The default leaves every wait to the host.
        """

    def watch_wait(self, submission: Submission) -> None:  # noqa: B027 (a hook: default no-op)
        """Shown each submission that blocks on unmet waits, on a device with :attr:`watches_waits`.

        The waits stay the host's (the queue's callbacks, with no future and no loop
        turn); the device only learns that the queue's head waits, so it can look at the
        queue's work (a thread pool reads its FIFO to take up work on its own workers).
        Called on the loop thread, once per blocking, before any of the waits ends.
        """

    def view(self, block: Block, dtype: Any = None, shape: Any = None) -> Any:
        """The device memory of a pool block, as the device's array type.

        Raises:
            TypeError: the device's pool only accounts for memory (the default).
        """
        raise TypeError(
            f"device {self.name!r} ({type(self).__name__}) accounts for memory but holds "
            f"no addressable buffers"
        )

    def statistics(self) -> DeviceStatistics:
        """A frozen snapshot of slots and waiting queues."""
        return DeviceStatistics(
            name=self.name,
            kind=self.kind,
            concurrency=self.concurrency,
            busy_slots=self.concurrency - self._arbiter.free,
            waiting_queues=self._arbiter.waiting,
            executed=self._executed,
        )

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} {self.name!r} kind={self.kind} "
            f"busy={self.concurrency - self._arbiter.free}/{self.concurrency}>"
        )
