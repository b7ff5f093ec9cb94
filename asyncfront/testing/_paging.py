"""Storage and copy devices that move real bytes in virtual time, for the pager under looptime.

A :class:`~asyncfront.devices.StorageDevice` moves bytes in worker threads, and threads do
not advance a virtual-time loop. :class:`FakeStorageDevice` is the same device (the
same files, offsets, checksums and errors), but each transfer takes ``latency + bytes /
bandwidth`` seconds of loop time and then runs on the loop thread. :class:`FakeCopyEngine`
is a :class:`~asyncfront.testing.FakeDevice` whose copies take ``bytes / bandwidth``.
Together with fake devices for device and host memory, a :class:`~asyncfront.memory.Pager`
runs, bytes and all, in virtual time.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import os
from typing import TYPE_CHECKING, Any

from ..devices._base import LATER, SlotArbiter
from ..devices.fake import FakeDevice
from ..devices.storage import StorageDevice

if TYPE_CHECKING:
    from .._queue import Submission

__all__ = ("FakeCopyEngine", "FakeStorageDevice")


def _nbytes(obj: object) -> int:
    """Bytes of a tensor or buffer argument; 0 for anything else."""
    nbytes = getattr(obj, "nbytes", None)
    return nbytes if isinstance(nbytes, int) else 0


def _check_rate(owner: str, bandwidth: float, latency: float) -> None:
    if isinstance(bandwidth, bool) or not isinstance(bandwidth, int | float):
        raise TypeError(f"{owner}: bandwidth must be bytes per second, got {bandwidth!r}")
    if not (bandwidth > 0 and math.isfinite(bandwidth)):
        raise ValueError(f"{owner}: bandwidth must be finite and > 0, got {bandwidth!r}")
    if isinstance(latency, bool) or not isinstance(latency, int | float):
        raise TypeError(f"{owner}: latency must be seconds, got {latency!r}")
    if not (latency >= 0 and math.isfinite(latency)):
        raise ValueError(f"{owner}: latency must be finite and >= 0, got {latency!r}")


class FakeStorageDevice(StorageDevice):
    """A :class:`~asyncfront.devices.StorageDevice` whose transfers take loop time, not threads.

    Reads and writes go to real files under ``path``, with the same checksums and errors
    as the real device, but run on the loop thread after ``latency + bytes / bandwidth``
    seconds of loop time, so under :func:`~asyncfront.testing.run_virtual` paging takes
    the simulated time and no wall time. ``concurrency`` transfers run at once.

    Args:
        path: the directory that holds the files.
        name: the device name.
        bandwidth: bytes per second of one transfer.
        latency: seconds each transfer takes before its bytes move.
        concurrency: transfers that run at once.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        name: str = "nvme",
        bandwidth: float = 2e9,
        latency: float = 0.0,
        concurrency: int = 1,
    ) -> None:
        _check_rate(f"FakeStorageDevice {name!r}", bandwidth, latency)
        super().__init__(path, name=name, workers=1, use_kvikio=False)
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise ValueError(f"FakeStorageDevice {name!r}: concurrency must be an int >= 1")
        self.concurrency = concurrency
        self._arbiter = SlotArbiter(concurrency)
        self.bandwidth = float(bandwidth)
        self.latency = float(latency)

    def duration(self, submission: Submission) -> float:
        """Seconds of loop time ``submission``'s transfer takes."""
        moved = _nbytes(submission.args[0]) if submission.args else 0
        return self.latency + moved / self.bandwidth

    async def execute(self, submission: Submission) -> Any:
        seconds = self.duration(submission)
        if seconds > 0:
            await asyncio.sleep(seconds)
        fn = submission.fn
        if fn is None:
            return None
        result = fn(*submission.args, **submission.kwargs)
        if inspect.isawaitable(result):
            result = await result
        return result


class FakeCopyEngine(FakeDevice):
    """A fake copy engine: work without a ``cost`` takes its first argument's bytes / bandwidth.

    The pager's copies (``copy_bytes(dst, src)``) carry no cost; on this engine they take
    the time their bytes need, and still copy the bytes. Work with a ``cost`` takes
    ``cost / bandwidth`` as on any :class:`FakeDevice`.

    Args:
        name: the device name.
        bandwidth: bytes per second.
        concurrency: copies that run at once.
    """

    def __init__(self, name: str, *, bandwidth: float = 25e9, concurrency: int = 1) -> None:
        _check_rate(f"FakeCopyEngine {name!r}", bandwidth, 0.0)
        super().__init__(name, kind="copy", concurrency=concurrency, speed=bandwidth)

    def duration(self, submission: Submission) -> float:
        """Seconds of loop time ``submission`` takes: cost, else its first argument's bytes."""
        if submission.cost is not None:
            return submission.cost / self.speed
        return (_nbytes(submission.args[0]) if submission.args else 0) / self.speed

    def execute_now(self, submission: Submission) -> Any:
        """Always :data:`~asyncfront.devices.LATER`: a copy takes loop time."""
        return LATER
