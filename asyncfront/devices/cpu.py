"""CpuDevice: work runs in a bounded thread pool (PyTorch and NumPy release the GIL)."""

from __future__ import annotations

from dataclasses import dataclass

from ._base import DeviceStatistics
from ._threaded import ThreadPoolDevice

__all__ = ("CpuDevice", "CpuStatistics")


@dataclass(frozen=True)
class CpuStatistics(DeviceStatistics):
    """A CPU device's scheduling state, with how much work its workers chained.

    ``chained`` counts submissions a worker took up on its own, before the loop handed
    them over: their waits were already reached, or met by work that ran on this device.
    """

    chained: int


class CpuDevice(ThreadPoolDevice):
    """The host CPU: ``workers`` threads, one execution slot per thread.

    ``memory`` (bytes) gives its contexts a host-memory budget to share; None leaves
    host memory untracked. ``concurrency`` (slots) defaults to ``workers``.

    Synchronous work runs in the pool; coroutine functions run on the event loop
    (while holding a slot, so priorities still apply). A worker that finishes a
    submission takes up the next ready work of the device's queues itself: a dependent
    chain across its queues runs back to back on the workers, the loop doing each
    submission's bookkeeping as it catches up (see ``docs/devices.md``).
    """

    def __init__(
        self,
        name: str = "cpu",
        workers: int = 2,
        memory: int | None = None,
        *,
        concurrency: int | None = None,
    ) -> None:
        if memory is not None and memory < 0:
            raise ValueError(f"{type(self).__name__} memory must be >= 0 bytes, got {memory}")
        super().__init__(name, workers, concurrency=concurrency)
        self.kind = "cpu"
        self.memory_capacity = memory or None

    def statistics(self) -> CpuStatistics:
        """A frozen snapshot of slots, waiting queues and chained work."""
        base = super().statistics()
        return CpuStatistics(
            name=base.name,
            kind=base.kind,
            concurrency=base.concurrency,
            busy_slots=base.busy_slots,
            waiting_queues=base.waiting_queues,
            executed=base.executed,
            chained=self._workers.chained,
        )
