"""The Device ABC and the priority arbiter every device shares."""

from __future__ import annotations

import asyncio
import heapq
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

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


LATER: Any = _Later()
"""What :meth:`Device.execute_now` returns when the work must go through ``execute``."""


class SlotArbiter:
    """Hands a device's execution slots to queues by priority (higher first, FIFO within).

    The decision is synchronous: :meth:`try_acquire` grants at once when a slot is free
    and nobody is queued; otherwise the caller queues with :meth:`enqueue` and is granted
    by :meth:`grant`, which the device runs on the loop turn after a release, so the queue
    that just finished can present its next ready submission and priorities hold under
    back-to-back work.
    """

    __slots__ = ("_free", "_grant_scheduled", "_heap", "_seq", "capacity")

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"device concurrency must be >= 1, got {capacity}")
        self.capacity = capacity
        self._free = capacity
        self._heap: list[tuple[int, int, asyncio.Future[None]]] = []
        self._seq = 0
        self._grant_scheduled = False

    @property
    def free(self) -> int:
        """Slots not held by any queue."""
        return self._free

    @property
    def waiting(self) -> int:
        """Queues waiting for a slot."""
        return sum(1 for _, _, fut in self._heap if not fut.done())

    def try_acquire(self) -> bool:
        """Take a slot now if one is free and nobody is ahead; True on success."""
        if self._free and not self._heap and not self._grant_scheduled:
            self._free -= 1
            return True
        return False

    def enqueue(self, priority: int, future: asyncio.Future[None]) -> None:
        """Queue a request; ``future`` resolves when the slot is granted."""
        self._seq += 1
        heapq.heappush(self._heap, (-priority, self._seq, future))

    def release(self) -> bool:
        """Return a slot; True when a grant should be scheduled for the next loop turn."""
        self._free += 1
        if self._heap and not self._grant_scheduled:
            self._grant_scheduled = True
            return True
        return False

    def grant(self) -> None:
        """Give free slots to the highest-priority waiting requests."""
        self._grant_scheduled = False
        heap = self._heap
        while self._free and heap:
            fut = heapq.heappop(heap)[2]
            if not fut.done():
                self._free -= 1
                fut.set_result(None)


@dataclass(frozen=True)
class DeviceStatistics:
    """A snapshot of a device's scheduling state."""

    name: str
    kind: str
    concurrency: int
    busy_slots: int
    waiting_queues: int
    executed: int


class Device(ABC):
    """A piece of hardware that runs submissions from its queues.

    Subclasses implement :meth:`execute`; the base class arbitrates the device's
    ``concurrency`` slots among its queues by priority.
    """

    kind: str = "device"
    claims_waits: bool = False
    """Whether its queues offer the device their unmet waits (see :meth:`claim_wait`)."""

    def __init__(self, name: str, *, concurrency: int = 1) -> None:
        self.name = name
        self.concurrency = concurrency
        self.memory: Any = None  # the device's BufferPool, set by the runtime
        self.memory_capacity: int | None = None  # bytes of device memory, None if untracked
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

    async def acquire(self, priority: int) -> None:
        """Wait for an execution slot, highest priority first."""
        arbiter = self._arbiter
        if arbiter.try_acquire():
            return
        loop = self._loop or asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        arbiter.enqueue(priority, fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # granted just as we were cancelled: give it back
            raise

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
