"""TorchDevice: PyTorch work on the CPU or on one CUDA GPU.

On the CPU (or where CUDA is missing) it is a :class:`~asyncfront.devices.CpuDevice`:
work runs on a pool of threads (PyTorch releases the GIL). On a GPU every queue issues
its work on its own CUDA stream from a worker thread and records an event after it; one
completion thread per device waits on those events in submission order and hands each
completion to the event loop, so nothing spins on the loop thread. A wait on work of the
same GPU that is issued but not finished becomes ``stream.wait_event`` with no host round
trip. With a memory budget the device owns one segment of real memory and the runtime's
pool hands out views of it.

torch is imported when a TorchDevice is created, never when asyncfront is.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import math
import threading
from collections.abc import Callable, Iterable, Iterator
from queue import SimpleQueue
from typing import TYPE_CHECKING, Any, Protocol, cast

from .._semaphore import SemaphoreFailedError, TimelineSemaphore
from .cpu import CpuDevice

if TYPE_CHECKING:
    import torch

    from .._frontier import Frontier
    from .._queue import DeviceQueue, Submission
    from .._runtime import Runtime
    from ..memory import Block

__all__ = ("DEFAULT_PRIORITY_STEP", "CudaBackend", "TorchDevice", "stream_priority")

DEFAULT_PRIORITY_STEP = 10
"""Queue priorities per CUDA priority level: the QoS tiers (0, 10, 20) get distinct levels."""

_CUDA_SLOTS = 8  # submissions in flight on one GPU by default (each queue keeps one)

_Pairs = Iterable[tuple[TimelineSemaphore, int]]


def _require_torch() -> None:
    try:
        import torch  # noqa: F401
    except ImportError as exc:
        from .._install import install_hint

        raise ImportError(
            "TorchDevice needs PyTorch, which is not installed: pip install torch==2.13.0 "
            f"(or {install_hint('torch')})"
        ) from exc


def stream_priority(
    priority: int, priority_range: tuple[int, int], step: int = DEFAULT_PRIORITY_STEP
) -> int:
    """The CUDA stream priority of a queue priority (higher queue priority = more urgent).

    CUDA counts the other way: ``priority_range`` is ``(least, greatest)`` as
    ``torch.cuda.Stream.priority_range()`` gives it, for example ``(0, -5)``, and a lower
    number is more urgent. Queue priorities up to 0 get the least; every ``step`` above 0
    is one level more urgent, up to the greatest.

    >>> [stream_priority(p, (0, -5)) for p in (-3, 0, 1, 10, 20, 1000)]
    [0, 0, -1, -1, -2, -5]
    """
    if step < 1:
        raise ValueError(f"priority step must be >= 1, got {step}")
    least, greatest = priority_range
    level = min(least - greatest, max(0, -(-priority // step)))
    return least - level


class CudaBackend(Protocol):
    """The CUDA calls a GPU :class:`TorchDevice` makes: PyTorch's by default.

    A test may pass an emulation (streams as threads) to exercise the scheduling on a
    machine without a GPU. Streams need ``wait_event(event)``; events ``record(stream)``
    and a ``synchronize()`` that blocks the calling thread (and releases the GIL).
    """

    def priority_range(self) -> tuple[int, int]:
        """``(least, greatest)`` stream priorities; lower numbers are more urgent."""
        ...

    def stream(self, priority: int) -> Any:
        """A new stream of the device at a CUDA ``priority``."""
        ...

    def event(self) -> Any:
        """A new event to record after a submission's work."""
        ...

    def issuing(self, stream: Any) -> contextlib.AbstractContextManager[Any]:
        """Make ``stream`` (and its device) current on the calling thread."""
        ...

    def synchronize(self) -> None:
        """Block until all work issued on the device has finished."""
        ...

    def empty(self, nbytes: int) -> Any:
        """``nbytes`` of uninitialised device memory as a flat ``uint8`` tensor."""
        ...


def _working_share(
    name: str,
    memory: int | None,
    working_memory: int | None,
    cuda: bool,
    backend: CudaBackend | None,
) -> int | None:
    """The bytes of ``memory`` left to working memory outside the pool's segment.

    Raises:
        ValueError: ``memory`` above what the GPU holds, or a share not below ``memory``.
    """
    if working_memory is not None:
        if type(working_memory) is not int or working_memory < 0:
            raise ValueError(
                f"device {name!r}: working_memory must be an int >= 0 bytes, got {working_memory!r}"
            )
        if not memory:
            raise ValueError(
                f"device {name!r}: working_memory={working_memory:,} is a share of memory=, "
                "which is not set"
            )
        if working_memory >= memory:
            raise ValueError(
                f"device {name!r}: working_memory={working_memory:,} leaves nothing of "
                f"memory={memory:,} to the pool's segment"
            )
    if not cuda or not memory:
        return working_memory or None
    total = getattr(backend, "total_memory", None)
    held = None if total is None else int(total())
    if held is not None and memory > held:
        raise ValueError(
            f"device {name!r}: memory={memory:,} bytes is more than the GPU holds ({held:,})"
        )
    return memory // 4 if working_memory is None else working_memory or None


class _PeakSource(Protocol):
    """A backend that measures its allocator's peak around each submission."""

    def start_peak(self) -> int: ...

    def peak_since(self, start: int) -> int: ...


def _peak_source(backend: CudaBackend | None) -> _PeakSource | None:
    """``backend`` if it measures allocator peaks (PyTorch's does; an emulation may)."""
    if callable(getattr(backend, "start_peak", None)) and callable(
        getattr(backend, "peak_since", None)
    ):
        return cast("_PeakSource", backend)
    return None


class _TorchCuda:
    """:class:`CudaBackend` on PyTorch's CUDA runtime."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def priority_range(self) -> tuple[int, int]:
        import torch

        # A static method in C++, typed as an instance method in torch's stubs.
        least, greatest = torch.cuda.Stream.priority_range()  # type: ignore[call-arg]
        return int(least), int(greatest)

    def stream(self, priority: int) -> Any:
        import torch

        return torch.cuda.Stream(device=self.device, priority=priority)  # type: ignore[no-untyped-call]

    def event(self) -> Any:
        import torch

        # blocking: synchronize() sleeps in the driver instead of spinning a CPU core
        return torch.cuda.Event(blocking=True)  # type: ignore[no-untyped-call]

    @contextlib.contextmanager
    def issuing(self, stream: Any) -> Iterator[None]:
        import torch

        with torch.cuda.device(self.device), torch.cuda.stream(stream):
            yield

    def synchronize(self) -> None:
        import torch

        torch.cuda.synchronize(self.device)

    def empty(self, nbytes: int) -> Any:
        import torch

        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def total_memory(self) -> int:
        """The bytes of memory the GPU holds."""
        import torch

        return int(torch.cuda.mem_get_info(self.device)[1])

    def start_peak(self) -> int:
        """Reset the allocator's peak; the bytes allocated now (on the issuing thread)."""
        import torch

        torch.cuda.reset_peak_memory_stats(self.device)
        return int(torch.cuda.memory_allocated(self.device))

    def peak_since(self, start: int) -> int:
        """The allocator's peak above ``start`` since the last :meth:`start_peak`."""
        import torch

        return max(0, int(torch.cuda.max_memory_allocated(self.device)) - start)


class _Issued:
    """A submission whose work is on its stream, until its event completes."""

    __slots__ = ("done", "error", "event", "submission")

    def __init__(self, submission: Submission, event: Any, done: asyncio.Future[None]) -> None:
        self.submission = submission
        self.event = event
        self.done = done  # resolved on the loop by the completion thread
        self.error: BaseException | None = None  # set before ``done`` resolves


def _complete_in_order(inbox: SimpleQueue[_Issued | None], loop: asyncio.AbstractEventLoop) -> None:
    """The completion thread: wait on each event in submission order, tell the loop."""
    while (issued := inbox.get()) is not None:
        error: BaseException | None = None
        try:
            issued.event.synchronize()  # releases the GIL while the GPU works
        except Exception as exc:
            error = exc
        try:
            loop.call_soon_threadsafe(_settle, issued, error)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            return


def _settle(issued: _Issued, error: BaseException | None) -> None:
    """On the loop: record the outcome first, so a consumer ordered after it sees it."""
    issued.error = error
    done = issued.done
    if done.done():
        return
    if error is None:
        done.set_result(None)
    else:
        done.set_exception(error)


def _typed_view(raw: torch.Tensor, dtype: torch.dtype | None, shape: Any) -> torch.Tensor:
    """``raw`` (flat uint8) as ``dtype`` with ``shape``; by default as many as fit, flat."""
    if dtype is None and shape is None:
        return raw
    import torch

    kind = torch.uint8 if dtype is None else dtype
    if shape is None:
        dims: tuple[int, ...] = (raw.numel() // kind.itemsize,)
    else:
        dims = (shape,) if isinstance(shape, int) else tuple(shape)
        if any(d < 0 for d in dims):
            raise ValueError(f"shape {dims} has a negative dimension")
    needed = math.prod(dims) * kind.itemsize
    if needed > raw.numel():
        raise ValueError(
            f"a {kind} tensor of shape {dims} needs {needed:,} bytes; "
            f"the buffer holds {raw.numel():,}"
        )
    return raw[:needed].view(kind).view(dims)


class TorchDevice(CpuDevice):
    """PyTorch on the CPU (``"cpu"``) or on one CUDA GPU (``"cuda:N"``).

    On the CPU, and for ``"cuda:N"`` on a machine without CUDA, it behaves as a
    :class:`~asyncfront.devices.CpuDevice`: plain functions run on ``workers`` threads
    (``torch.set_num_threads`` is left to you), coroutine functions on the loop.

    On a GPU, each queue gets a ``torch.cuda.Stream`` whose priority follows the queue's
    (:func:`stream_priority`). A submission's function runs on a worker thread with that
    stream current and must only *enqueue* work (plain PyTorch calls do); an event is
    recorded after it and the submission completes, and signals, once the event has.
    A wait whose semaphore will be signalled by work already issued on this GPU becomes
    ``stream.wait_event``: the consumer is issued at once, ordered on the GPU.
    ``concurrency`` counts submissions in flight on the GPU (8 by default).

    With ``memory`` (bytes), the runtime's pool of the device hands out views of one
    segment the device allocates on first use: ``buffer.tensor(dtype, shape)``. The
    segment is ``memory - working_memory`` bytes: the rest is left to the work's own
    allocations (activations, PyTorch's caching allocator), which ``submit(...,
    memory=)`` reserves. Pool blocks and working memory charge the same budgets, and
    working memory waits for the share it may use, so the two together never exceed
    ``memory``. On a GPU the segment is real memory from the start (a quarter of
    ``memory`` is left to working memory by default), and ``memory`` may not exceed what
    the GPU holds; on the CPU the arena's pages are touched only as blocks are used, so
    by default the pool may use all of ``memory``.

    Args:
        name_or_device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or a ``torch.device``.
        name: the device's name in the runtime (default: ``name_or_device`` as given).
        workers: threads that run (CPU) or issue (GPU) work.
        memory: bytes of device memory contexts may budget; None leaves it untracked.
        working_memory: bytes of ``memory`` left to working memory outside the pool's
            segment (default: a quarter of ``memory`` on a GPU, none set aside on the CPU).
        concurrency: execution slots (default: ``workers`` on the CPU, 8 on a GPU).
        priority_step: queue priorities per CUDA priority level.
        backend: the CUDA runtime to drive (default: PyTorch's; implies a GPU device).

    Raises:
        ImportError: PyTorch is not installed.
        ValueError: not a CPU or CUDA device, no such GPU, ``memory`` above what the GPU
            holds, or ``working_memory`` without ``memory`` or not below it.
    """

    def __init__(
        self,
        name_or_device: str | torch.device = "cpu",
        *,
        name: str | None = None,
        workers: int = 2,
        memory: int | None = None,
        concurrency: int | None = None,
        priority_step: int = DEFAULT_PRIORITY_STEP,
        backend: CudaBackend | None = None,
        working_memory: int | None = None,
    ) -> None:
        _require_torch()
        import torch

        requested = torch.device(name_or_device)
        if requested.type not in ("cpu", "cuda"):
            raise ValueError(f"TorchDevice runs on 'cpu' or 'cuda:N', not {str(requested)!r}")
        if priority_step < 1:
            raise ValueError(f"priority step must be >= 1, got {priority_step}")
        cuda = requested.type == "cuda" and (backend is not None or torch.cuda.is_available())
        target = torch.device("cpu")
        if cuda:
            index: int | None = requested.index  # None for plain "cuda" (stubs say int)
            if backend is None:
                count = torch.cuda.device_count()
                if index is None:
                    index = torch.cuda.current_device()
                if not 0 <= index < count:
                    raise ValueError(f"no GPU {str(requested)!r}: this machine has {count}")
            target = torch.device("cuda", index or 0)
        if concurrency is None and cuda:
            concurrency = _CUDA_SLOTS
        label = name if name is not None else str(name_or_device)
        self._backend: CudaBackend | None = None
        if cuda:
            self._backend = backend if backend is not None else _TorchCuda(target)
        working = _working_share(label, memory, working_memory, cuda, self._backend)
        super().__init__(label, workers, memory, concurrency=concurrency)
        self.working_capacity = working
        self.torch_device = target
        """The ``torch.device`` work runs on: the GPU, or the CPU."""
        self.is_cuda = cuda
        """Whether work runs on CUDA streams."""
        self.kind = "gpu" if cuda else "cpu"
        self.claims_waits = cuda
        self.priority_step = priority_step
        self._priority_range: tuple[int, int] | None = None
        self._streams: dict[DeviceQueue, Any] = {}
        # Issued, unfinished submissions by the semaphores they will signal; waits parked
        # until such a submission appears; and waits claimed, per queue, for its next run.
        self._issued: dict[TimelineSemaphore, list[tuple[int, _Issued]]] = {}
        self._watches: dict[
            TimelineSemaphore, list[tuple[int, Submission, asyncio.Future[Frontier]]]
        ] = {}
        self._claims: dict[DeviceQueue, list[tuple[Submission, TimelineSemaphore, _Issued]]] = {}
        self._completions: SimpleQueue[_Issued | None] | None = None
        self._completion_thread: threading.Thread | None = None
        self._segment: torch.Tensor | None = None
        self._segment_lock = threading.Lock()
        self._copy_queue: DeviceQueue | None = None

    # -- lifecycle -----------------------------------------------------------------

    async def start(self, runtime: Runtime) -> None:
        await super().start(runtime)
        if self._backend is not None:
            inbox: SimpleQueue[_Issued | None] = SimpleQueue()
            thread = threading.Thread(
                target=_complete_in_order,
                args=(inbox, asyncio.get_running_loop()),
                name=f"asyncfront-{self.name}-completion",
                daemon=True,
            )
            thread.start()
            self._completions, self._completion_thread = inbox, thread

    async def aclose(self) -> None:
        # Issuing threads first, then the events they recorded, then the GPU itself:
        # only then may the segment go back to PyTorch's allocator.
        await super().aclose()
        loop = asyncio.get_running_loop()
        thread, self._completion_thread = self._completion_thread, None
        if thread is not None and self._completions is not None:
            self._completions.put(None)
            await loop.run_in_executor(None, thread.join)
        if self._backend is not None and self._segment is not None:
            await loop.run_in_executor(None, self._backend.synchronize)
        self._segment = None
        self._completions = None
        self._copy_queue = None
        self._streams.clear()
        self._issued.clear()
        self._watches.clear()
        self._claims.clear()

    # -- streams ---------------------------------------------------------------------

    def stream(self, queue: DeviceQueue) -> Any:
        """The CUDA stream ``queue`` issues on (made on first use); None on the CPU."""
        backend = self._backend
        if backend is None:
            return None
        if queue.device is not self:
            raise ValueError(f"queue {queue.name!r} belongs to device {queue.device.name!r}")
        stream = self._streams.get(queue)
        if stream is None:
            if self._priority_range is None:
                self._priority_range = backend.priority_range()
            level = stream_priority(queue.priority, self._priority_range, self.priority_step)
            stream = self._streams[queue] = backend.stream(level)
        return stream

    # -- work ----------------------------------------------------------------------

    async def execute(self, submission: Submission) -> Any:
        if self._backend is None:
            return await super().execute(submission)
        fn = submission.fn
        if fn is not None and inspect.iscoroutinefunction(fn):
            raise TypeError(
                f"device {self.name!r}: work on a CUDA queue is a plain function that "
                f"enqueues on the current stream, not coroutine function {fn.__qualname__!r}"
            )
        stream = self.stream(submission.queue)
        claims = self._take_claims(submission)
        peaks = _peak_source(self._backend)
        issue = functools.partial(
            self._issue,
            stream,
            [producer.event for _, producer in claims],
            fn,
            submission.args,
            submission.kwargs,
            peaks,
        )
        (result, start), event = await self._in_pool(issue)
        inbox = self._completions
        if inbox is None:
            raise RuntimeError(f"device {self.name!r} is not started")
        issued = _Issued(submission, event, asyncio.get_running_loop().create_future())
        inbox.put(issued)
        if submission.signals:
            self._publish(issued)
        try:
            await issued.done
        finally:
            if submission.signals:
                self._retire(issued)
        if peaks is not None:
            self._record_peak(submission, peaks.peak_since(start))
        for sem, producer in claims:
            if producer.error is not None:
                cause = producer.error
                while isinstance(cause, SemaphoreFailedError):
                    cause = cause.root_cause
                raise SemaphoreFailedError(sem, cause)
        return result

    def _issue(
        self,
        stream: Any,
        waits: list[Any],
        fn: Callable[..., Any] | None,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        peaks: _PeakSource | None = None,
    ) -> tuple[tuple[Any, int], Any]:
        """On a worker thread: enqueue the work on ``stream`` after ``waits``, then an event.

        With ``peaks``, the allocator's peak is reset first; the result comes with the
        bytes allocated at that moment.
        """
        backend = self._backend
        assert backend is not None
        with backend.issuing(stream):
            for event in waits:
                stream.wait_event(event)
            start = peaks.start_peak() if peaks is not None else 0
            result = None if fn is None else fn(*args, **kwargs)
            event = backend.event()
            event.record(stream)
        return (result, start), event

    def _record_peak(self, submission: Submission, peak: int) -> None:
        """Put the allocator's peak of ``submission`` in the trace; log it above its reservation.

        Exact when the GPU runs one submission at a time (``concurrency=1``); with several
        in flight the peak is the device's since the latest submission started, above
        this one's starting level, so it may include the others' allocations.
        """
        submission.annotate(peak_memory=peak)
        reserved = submission.memory
        runtime = self._runtime
        over = reserved is not None and peak > reserved
        if over and runtime is not None and runtime._log_warning:
            runtime._log.warning(
                "working_memory_exceeded",
                queue=submission.queue.name,
                submission=submission.name,
                reserved=reserved,
                peak=peak,
            )

    # -- same-device waits -----------------------------------------------------------

    def claim_wait(
        self,
        submission: Submission,
        semaphore: TimelineSemaphore,
        value: int,
        waiter: asyncio.Future[Frontier],
    ) -> None:
        if submission.fn is None and submission.cost is None:
            return  # a barrier never reaches the stream: it must wait on the host
        producer = self._producer(semaphore, value)
        if producer is not None:
            self._claim(submission, semaphore, producer, waiter)
            return
        watch = (value, submission, waiter)
        self._watches.setdefault(semaphore, []).append(watch)
        waiter.add_done_callback(functools.partial(self._unwatch, semaphore, watch))

    def _producer(self, semaphore: TimelineSemaphore, value: int) -> _Issued | None:
        """The issued submission that signals the least value >= ``value``, if any."""
        best: tuple[int, _Issued] | None = None
        for signalled, issued in self._issued.get(semaphore, ()):
            if signalled >= value and (best is None or signalled < best[0]):
                best = (signalled, issued)
        return None if best is None else best[1]

    def _claim(
        self,
        submission: Submission,
        semaphore: TimelineSemaphore,
        producer: _Issued,
        waiter: asyncio.Future[Frontier],
    ) -> None:
        """Order ``submission`` after ``producer`` on the GPU; wake its queue now."""
        self._claims.setdefault(submission.queue, []).append((submission, semaphore, producer))
        frontier = producer.submission.frontier
        known = semaphore.frontier
        semaphore._satisfy(waiter, known if frontier is None else known.merge(frontier))

    def _take_claims(self, submission: Submission) -> list[tuple[TimelineSemaphore, _Issued]]:
        # Claims of an earlier submission of the queue that failed before running are stale.
        entries = self._claims.pop(submission.queue, None)
        if not entries:
            return []
        return [(sem, producer) for sub, sem, producer in entries if sub is submission]

    def _publish(self, issued: _Issued) -> None:
        """``issued`` is on its stream: hand it to the waits of its semaphores."""
        for sem, value in issued.submission.signals:
            self._issued.setdefault(sem, []).append((value, issued))
            for wanted, sub, waiter in list(self._watches.get(sem, ())):
                if wanted <= value and not waiter.done():
                    self._claim(sub, sem, issued, waiter)

    def _retire(self, issued: _Issued) -> None:
        for sem, value in issued.submission.signals:
            entries = self._issued.get(sem)
            if entries is not None:
                with contextlib.suppress(ValueError):
                    entries.remove((value, issued))
                if not entries:
                    del self._issued[sem]

    def _unwatch(
        self,
        semaphore: TimelineSemaphore,
        watch: tuple[int, Submission, asyncio.Future[Frontier]],
        _: object,
    ) -> None:
        entries = self._watches.get(semaphore)
        if entries is not None:
            with contextlib.suppress(ValueError):
                entries.remove(watch)
            if not entries:
                del self._watches[semaphore]

    # -- memory --------------------------------------------------------------------

    def view(self, block: Block, dtype: Any = None, shape: Any = None) -> torch.Tensor:
        """A pool block's bytes as a tensor on the device: raw ``uint8``, or typed.

        The device owns one segment of ``memory`` bytes (allocated on first use) and a
        block is a view at its offset. Reuse is gated by the pool's death frontiers, so
        no ``record_stream`` is needed when several streams share a block.

        Raises:
            ValueError: the block is not a live block of this device's pool, or
                ``dtype``/``shape`` need more bytes than it holds.
        """
        pool = self.memory
        if pool is None or block._owner is not pool:
            raise ValueError(f"{block!r} is not a block of device {self.name!r}")
        if block.death is not None:
            raise ValueError(f"{block!r} was freed")
        segment = self._segment
        if segment is None:
            segment = self._allocate_segment(pool.capacity)
        raw = segment[block.offset : block.offset + block.nbytes]
        return _typed_view(raw, dtype, shape)

    def _allocate_segment(self, nbytes: int) -> torch.Tensor:
        with self._segment_lock:  # views may be asked for from worker threads
            if self._segment is None:
                if self._backend is not None:
                    self._segment = self._backend.empty(nbytes)
                else:
                    import torch

                    self._segment = torch.empty(nbytes, dtype=torch.uint8)
            return self._segment

    # -- transfers -------------------------------------------------------------------

    def copy_queue(self, priority: int = 0, name: str | None = None) -> DeviceQueue:
        """A new queue for host↔device copies.

        On a GPU it has its own stream, so transfers from pinned memory run on the copy
        engines while other queues compute; a wait on a copy of the same GPU is a
        ``stream.wait_event``.
        """
        return self.queue(priority, name if name is not None else f"{self.name}.copy")

    def to_device(
        self,
        tensor: torch.Tensor,
        *,
        out: torch.Tensor | None = None,
        queue: DeviceQueue | None = None,
        waits: _Pairs = (),
        signals: _Pairs = (),
        name: str = "to_device",
    ) -> Submission:
        """Copy ``tensor`` onto the device; the submission's result is the copy.

        A host tensor that is not pinned is staged through pinned memory first. The copy
        lands in ``out`` when given (for example ``buffer.tensor(...)`` from the device's
        pool), else in a new tensor from PyTorch's allocator. ``queue`` defaults to the
        device's copy queue.
        """
        q = queue if queue is not None else self._default_copy_queue()
        return q.submit(self._copy_in, tensor, out, waits=waits, signals=signals, name=name)

    def to_host(
        self,
        tensor: torch.Tensor,
        *,
        out: torch.Tensor | None = None,
        queue: DeviceQueue | None = None,
        waits: _Pairs = (),
        signals: _Pairs = (),
        name: str = "to_host",
    ) -> Submission:
        """Copy ``tensor`` to host memory (pinned, from a GPU); the result is the copy.

        The copy is complete when the submission is: its signals are safe to wait on.
        """
        q = queue if queue is not None else self._default_copy_queue()
        return q.submit(self._copy_out, tensor, out, waits=waits, signals=signals, name=name)

    def _default_copy_queue(self) -> DeviceQueue:
        if self._copy_queue is None:
            self._copy_queue = self.copy_queue()
        return self._copy_queue

    def _copy_in(self, tensor: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
        if self.is_cuda and tensor.device.type == "cpu" and not tensor.is_pinned():
            tensor = tensor.pin_memory()  # DMA reads pinned memory without the CPU
        if out is not None:
            return out.copy_(tensor, non_blocking=True)
        return tensor.to(self.torch_device, non_blocking=True, copy=True)

    def _copy_out(self, tensor: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
        if out is None:
            import torch

            pinned = self.is_cuda and tensor.device.type == "cuda"
            out = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=pinned)
        return out.copy_(tensor, non_blocking=True)

    def __repr__(self) -> str:
        return (
            f"<TorchDevice {self.name!r} on {self.torch_device} kind={self.kind} "
            f"busy={self.concurrency - self._arbiter.free}/{self.concurrency}>"
        )
