"""CpuDevice: work runs in a bounded thread pool (PyTorch and NumPy release the GIL)."""

from __future__ import annotations

from ._threaded import ThreadPoolDevice

__all__ = ("CpuDevice",)


class CpuDevice(ThreadPoolDevice):
    """The host CPU: ``workers`` threads, one execution slot per thread.

    ``memory`` (bytes) gives its contexts a host-memory budget to share; None leaves
    host memory untracked. ``concurrency`` (slots) defaults to ``workers``.

    Synchronous work runs in the pool; coroutine functions run on the event loop
    (while holding a slot, so priorities still apply).
    """

    kind = "cpu"

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
        self.memory_capacity = memory or None
