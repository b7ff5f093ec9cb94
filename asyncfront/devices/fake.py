"""FakeDevice: a device that runs work in virtual time from its cost, for tests and simulations."""

from __future__ import annotations

import asyncio
import inspect
from typing import TYPE_CHECKING, Any

from mypy_extensions import mypyc_attr

from ._base import LATER, Device

if TYPE_CHECKING:
    from .._queue import Submission

__all__ = ("FakeDevice", "FakeDeviceError")


@mypyc_attr(native_class=False)
class FakeDeviceError(RuntimeError):
    """The error a :class:`FakeDevice` raises for an injected fault."""


@mypyc_attr(allow_interpreted_subclasses=True)
class FakeDevice(Device):
    """Runs each submission for ``cost / speed`` seconds of loop time, then calls its work.

    It uses no threads, so under a virtual-time loop (:func:`asyncfront.testing.run_virtual`)
    whole pipelines simulate in milliseconds. Work functions run on the loop; coroutine
    functions are awaited. :meth:`fail_next` injects faults.

    Args:
        name: the device's name.
        kind: a label such as ``"gpu"``, ``"cpu"``, ``"npu"``, ``"copy"``.
        memory: bytes of device memory (0 for none).
        concurrency: how many submissions run at once.
        speed: cost units per second.
    """

    def __init__(
        self,
        name: str,
        kind: str = "gpu",
        memory: int = 0,
        concurrency: int = 1,
        speed: float = 1.0,
    ) -> None:
        if speed <= 0:
            raise ValueError(f"FakeDevice speed must be > 0, got {speed}")
        if memory < 0:
            raise ValueError(f"FakeDevice memory must be >= 0, got {memory}")
        super().__init__(name, concurrency=concurrency)
        self.kind = kind
        self.memory_capacity = memory or None
        self.speed = speed
        self._faults: list[tuple[str | None, BaseException]] = []
        # A subclass that overrides execute() gets every submission there.
        self._runs_here = type(self).execute is FakeDevice.execute

    def fail_next(
        self, exc: BaseException | None = None, *, name: str | None = None, count: int = 1
    ) -> None:
        """Make the next ``count`` submissions (named ``name``, if given) raise ``exc``."""
        error = exc if exc is not None else FakeDeviceError(f"injected fault on {self.name!r}")
        self._faults.extend((name, error) for _ in range(count))

    def duration(self, submission: Submission) -> float:
        """Seconds of loop time the submission takes here."""
        return (submission.cost or 0.0) / self.speed

    def execute_now(self, submission: Submission) -> Any:
        """Call zero-cost work at once (no fault pending); anything else is :data:`LATER`."""
        fn = submission.fn
        if fn is None or self._faults or not self._runs_here or submission.cost:
            return LATER
        if submission.kwargs:
            return fn(*submission.args, **submission.kwargs)
        args = submission.args
        return fn(*args) if args else fn()  # the common calls, without building a call

    def timed_seconds(self, submission: Submission) -> float | None:
        """The work's duration when it has a cost: the queue runs it as a loop timer."""
        if not self._runs_here or not submission.cost:
            return None
        seconds = self.duration(submission)
        return seconds if seconds > 0 else None

    def finish_timed(self, submission: Submission) -> Any:
        """After the duration: raise a pending fault for it, else call its work."""
        if self._faults:
            self._take_fault(submission)
        fn = submission.fn
        if fn is None:
            return None
        return fn(*submission.args, **submission.kwargs)

    def _take_fault(self, submission: Submission) -> None:
        for i, (name, error) in enumerate(self._faults):
            if name is None or name == submission.name:
                del self._faults[i]
                raise error

    async def execute(self, submission: Submission) -> Any:
        seconds = self.duration(submission)
        if seconds > 0:
            await asyncio.sleep(seconds)
        if self._faults:
            self._take_fault(submission)
        fn = submission.fn
        if fn is None:
            return None
        result = fn(*submission.args, **submission.kwargs)
        if inspect.isawaitable(result):
            result = await result
        return result

    def __repr__(self) -> str:
        return (
            f"<FakeDevice {self.name!r} kind={self.kind} speed={self.speed} "
            f"busy={self.concurrency - self._arbiter.free}/{self.concurrency}>"
        )
