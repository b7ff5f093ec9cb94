"""ThreadPoolDevice: a device whose work runs in a bounded pool of worker threads."""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

from ._base import Device

if TYPE_CHECKING:
    from .._queue import Submission
    from .._runtime import Runtime

__all__ = ("ThreadPoolDevice",)

T = TypeVar("T")


class ThreadPoolDevice(Device):
    """``workers`` threads, one execution slot per thread.

    Synchronous work runs in the pool (PyTorch, NumPy and positional file I/O release
    the GIL); coroutine functions run on the event loop while holding a slot, so
    priorities still apply.
    """

    def __init__(self, name: str, workers: int, *, concurrency: int | None = None) -> None:
        if workers < 1:
            raise ValueError(f"{type(self).__name__} needs at least 1 worker, got {workers}")
        # One slot per worker; a subclass whose work outlives its thread (a CUDA stream
        # finishing after the launch returned) may hold more slots than threads.
        super().__init__(name, concurrency=workers if concurrency is None else concurrency)
        self.workers = workers
        self._pool: ThreadPoolExecutor | None = None

    async def start(self, runtime: Runtime) -> None:
        await super().start(runtime)
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix=f"asyncfront-{self.name}")

    async def aclose(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            # Running work cannot be interrupted; wait for it off the loop thread.
            await asyncio.get_running_loop().run_in_executor(None, pool.shutdown)
        await super().aclose()

    async def execute(self, submission: Submission) -> Any:
        fn = submission.fn
        if fn is None:
            return None
        if inspect.iscoroutinefunction(fn):
            return await fn(*submission.args, **submission.kwargs)
        return await self._in_pool(functools.partial(fn, *submission.args, **submission.kwargs))

    def _in_pool(self, call: Callable[[], T]) -> asyncio.Future[T]:
        """Run ``call`` on one of the device's threads; await the returned future."""
        pool = self._pool
        if pool is None:
            raise RuntimeError(f"device {self.name!r} is not started")
        return asyncio.get_running_loop().run_in_executor(pool, call)
