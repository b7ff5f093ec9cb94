"""ThreadPoolDevice: a device whose work runs in a bounded pool of worker threads."""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from ._base import LATER, Device
from ._workers import WorkerPool

if TYPE_CHECKING:
    from .._queue import Submission
    from .._runtime import Runtime

__all__ = ("ThreadPoolDevice",)

T = TypeVar("T")


class ThreadPoolDevice(Device):
    """``workers`` threads, one execution slot per thread.

    Synchronous work runs on the threads (PyTorch, NumPy and positional file I/O release
    the GIL); coroutine functions run on the event loop while holding a slot, so
    priorities still apply.

    A worker that finishes a submission takes up the next ready work of the device's
    queues itself, highest priority first, FIFO per queue: a submission whose waits are
    met by work that ran on this device runs on the worker without a round trip through
    the loop, and the loop then finds its result ready (see ``docs/devices.md``).
    """

    def __init__(self, name: str, workers: int, *, concurrency: int | None = None) -> None:
        if workers < 1:
            raise ValueError(f"{type(self).__name__} needs at least 1 worker, got {workers}")
        # One slot per worker; a subclass whose work outlives its thread (a CUDA stream
        # finishing after the launch returned) may hold more slots than threads.
        super().__init__(name, concurrency=workers if concurrency is None else concurrency)
        self.workers = workers
        cls = type(self)
        # Chaining needs this class's execute path; a subclass that runs work its own way
        # (a CUDA stream) keeps the plain hand-off.
        chains = (
            cls.execute is ThreadPoolDevice.execute
            and cls.execute_now is ThreadPoolDevice.execute_now
            and cls.watch_wait is ThreadPoolDevice.watch_wait
        )
        # The queues show the device their blocked heads; the waits stay callbacks on the
        # loop, so a run of chained results is processed in one loop callback.
        self.watches_waits = chains
        self._workers = WorkerPool(name, workers, self._arbiter, chains=chains)

    async def start(self, runtime: Runtime) -> None:
        await super().start(runtime)
        assert self._loop is not None
        self._workers.start(self._loop, runtime)

    async def aclose(self) -> None:
        threads = self._workers.stop()
        if threads:
            # Running work cannot be interrupted; wait for it off the loop thread.
            def join() -> None:
                for thread in threads:
                    thread.join()

            await asyncio.get_running_loop().run_in_executor(None, join)
        self._workers.forget()
        await super().aclose()

    def execute_now(self, submission: Submission) -> Any:
        """The result of work a worker already ran for ``submission``, else :data:`LATER`."""
        if submission.fn is None:
            return None
        taken = self._workers.take(submission)
        return LATER if taken is None else taken[1]

    async def execute(self, submission: Submission) -> Any:
        fn = submission.fn
        if fn is None:
            return None
        if inspect.iscoroutinefunction(fn):
            work = functools.partial(fn, *submission.args, **submission.kwargs)
            return await self._workers.run_on_loop(submission, work)
        return await self._workers.run(submission)

    def watch_wait(self, submission: Submission) -> None:
        """Show the device the blocked queue's work; the wait itself stays the loop's."""
        self._workers.show(submission.queue)

    def _in_pool(self, call: Callable[[], T]) -> asyncio.Future[T]:
        """Run ``call`` on one of the device's threads; await the returned future."""
        return self._workers.call(call)
