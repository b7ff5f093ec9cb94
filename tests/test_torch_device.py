"""TorchDevice on the CPU, and its CUDA scheduling on an emulated CUDA runtime.

The emulation runs each stream as a thread executing its operations in order, with
events as thread events: enough to check stream priorities, completion in submission
order, same-device waits issued before the producer finished, and failure propagation
on a machine without a GPU. ``tests/test_torch_cuda.py`` checks the same on a real GPU.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from queue import SimpleQueue
from typing import Any

import pytest
import structlog

torch = pytest.importorskip("torch")

import asyncfront as af  # noqa: E402
from asyncfront.devices import CpuDevice, Device  # noqa: E402
from asyncfront.devices.torch import TorchDevice, stream_priority  # noqa: E402
from asyncfront.testing import CONFORMANCE_CHECKS, check_device_conformance  # noqa: E402

WAIT = 10.0  # seconds an emulated stream or test waits before calling it a hang


# -- an emulated CUDA runtime ------------------------------------------------------


class EmulatedEvent:
    """A CUDA event: done once its stream reaches it; carries the stream's sticky error."""

    def __init__(self) -> None:
        self._done = threading.Event()
        self.error: BaseException | None = None

    def record(self, stream: EmulatedStream) -> None:
        stream.enqueue(lambda: self._complete(stream.error))

    def _complete(self, error: BaseException | None) -> None:
        self.error = error
        self._done.set()

    def query(self) -> bool:
        return self._done.is_set()

    def synchronize(self) -> None:
        if not self._done.wait(WAIT):
            raise TimeoutError("emulated event never completed")
        if self.error is not None:
            raise RuntimeError(f"CUDA error: {self.error}")


class EmulatedStream:
    """A CUDA stream: a thread running its operations in order."""

    def __init__(self, priority: int) -> None:
        self.priority = priority
        self.error: BaseException | None = None
        self._ops: SimpleQueue[Callable[[], object] | None] = SimpleQueue()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (op := self._ops.get()) is not None:
            try:
                op()
            except Exception as exc:  # a failing kernel: sticky, like a CUDA error
                self.error = exc

    def enqueue(self, op: Callable[[], object]) -> None:
        self._ops.put(op)

    def wait_event(self, event: EmulatedEvent) -> None:
        self.enqueue(lambda: event._done.wait(WAIT))

    def close(self) -> None:
        self._ops.put(None)
        self._thread.join(WAIT)


class EmulatedCuda:
    """A :class:`asyncfront.devices.torch.CudaBackend` made of threads."""

    def __init__(self, priority_range: tuple[int, int] = (0, -5)) -> None:
        self.range = priority_range
        self.streams: list[EmulatedStream] = []
        self._current = threading.local()
        self.synchronized = 0

    def priority_range(self) -> tuple[int, int]:
        return self.range

    def stream(self, priority: int) -> EmulatedStream:
        stream = EmulatedStream(priority)
        self.streams.append(stream)
        return stream

    def event(self) -> EmulatedEvent:
        return EmulatedEvent()

    @contextlib.contextmanager
    def issuing(self, stream: EmulatedStream) -> Iterator[None]:
        self._current.stream = stream
        try:
            yield
        finally:
            self._current.stream = None

    def launch(self, kernel: Callable[[], object]) -> None:
        """What a PyTorch op does: enqueue on the current stream and return."""
        self._current.stream.enqueue(kernel)

    def synchronize(self) -> None:
        self.synchronized += 1
        for stream in self.streams:
            event = EmulatedEvent()
            event.record(stream)
            event.synchronize()

    def empty(self, nbytes: int) -> Any:
        return torch.empty(nbytes, dtype=torch.uint8)

    def close(self) -> None:
        for stream in self.streams:
            stream.close()


@pytest.fixture
def cuda() -> Iterator[EmulatedCuda]:
    backend = EmulatedCuda()
    yield backend
    backend.close()


async def until(condition: Callable[[], bool], what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT
    while not condition():
        assert loop.time() < deadline, f"timed out waiting until {what}"
        await asyncio.sleep(0.001)


# -- the CPU path ------------------------------------------------------------------


def test_cpu_device_is_a_cpu_device() -> None:
    """TorchDevice('cpu') is a CpuDevice on torch's CPU with one slot per worker."""
    dev = TorchDevice("cpu", workers=3)
    assert isinstance(dev, CpuDevice)
    assert dev.name == "cpu" and dev.kind == "cpu" and dev.concurrency == 3
    assert dev.torch_device == torch.device("cpu") and not dev.is_cuda
    assert "TorchDevice 'cpu' on cpu" in repr(dev)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_request_without_cuda_runs_on_the_cpu() -> None:
    """Without CUDA, TorchDevice('cuda:0') keeps its name and runs on the CPU."""
    dev = TorchDevice("cuda:0")
    assert dev.name == "cuda:0" and dev.torch_device.type == "cpu" and not dev.is_cuda
    assert dev.claims_waits is False


def test_rejects_other_device_types_and_bad_arguments() -> None:
    """Only CPU and CUDA devices exist; worker and step counts are checked."""
    with pytest.raises(ValueError, match="'cpu' or 'cuda:N', not 'meta'"):
        TorchDevice("meta")
    with pytest.raises(ValueError, match="at least 1 worker"):
        TorchDevice("cpu", workers=0)
    with pytest.raises(ValueError, match="priority step"):
        TorchDevice("cpu", priority_step=0)


async def test_cpu_work_runs_in_threads_and_releases_the_gil() -> None:
    """Two queues' matmuls run on worker threads, off the loop thread, in queue order."""
    loop_thread = threading.get_ident()
    a = torch.randn(64, 64)
    async with af.open_runtime([TorchDevice("cpu", workers=2)]) as rt:
        q1, q2 = rt.queue("cpu"), rt.queue("cpu")
        threads: list[int] = []

        def matmul(x: Any) -> Any:
            threads.append(threading.get_ident())
            return x @ x

        s1 = [q1.submit(matmul, a) for _ in range(4)]
        s2 = [q2.submit(matmul, a) for _ in range(4)]
        results = [await s for s in s1 + s2]
        assert all(torch.equal(r, a @ a) for r in results)
        assert loop_thread not in threads


async def test_pool_hands_out_real_tensors() -> None:
    """With a memory budget, buffers are typed views of one device segment."""
    dev = TorchDevice("cpu", memory=1 << 20)
    async with af.open_runtime([dev]) as rt:
        ctx = rt.create_context("llm", max_memory=1 << 19)
        async with rt.session(ctx) as s:
            a = await s.allocate(4096)
            b = await s.allocate(4096)
            x = a.tensor(torch.float32, (32, 32))
            y = b.tensor(torch.float32)
            assert x.shape == (32, 32) and y.shape == (1024,) and x.dtype == torch.float32
            raw = a.tensor()
            assert raw.dtype == torch.uint8 and raw.numel() == 4096
            x.fill_(1.0)
            y.fill_(2.0)
            assert torch.all(a.tensor(torch.float32) == 1.0)  # no overlap with b
            assert x.data_ptr() - y.data_ptr() == a.offset - b.offset  # type: ignore[operator]
            # work on a queue sees the same memory
            await s.run(torch.mul, x, 3.0, out=x)
            assert torch.all(a.tensor(torch.float32, 1024) == 3.0)
            with pytest.raises(ValueError, match="needs 4,100 bytes; the buffer holds 4,096"):
                a.tensor(torch.float32, (1025,))
            s.free(a)
            with pytest.raises(ValueError, match="freed"):
                a.tensor()


async def test_fake_device_buffers_have_no_tensor() -> None:
    """A device that only accounts for memory says so when asked for a tensor."""
    gpu = af.testing.FakeDevice("gpu", memory=1 << 20)
    async with af.open_runtime([gpu]) as rt:
        ctx = rt.create_context("m", max_memory=1 << 20)
        async with rt.session(ctx) as s:
            buf = await s.allocate(1024)
            with pytest.raises(TypeError, match="no addressable buffers"):
                buf.tensor()


async def test_copies_on_the_cpu() -> None:
    """to_device and to_host copy on the device's copy queue and never alias."""
    dev = TorchDevice("cpu")
    x = torch.arange(16.0)
    async with af.open_runtime([dev]) as rt:
        done = rt.semaphore(name="copied")
        there = dev.to_device(x, signals=[(done, 1)])
        back = dev.to_host(x, waits=[(done, 1)])
        y, z = await there, await back
        assert torch.equal(y, x) and torch.equal(z, x)
        assert y.data_ptr() != x.data_ptr() and z.data_ptr() != x.data_ptr()
        assert there.queue is back.queue and there.queue.name == "cpu.copy"
        out = torch.empty(16)
        assert await dev.to_device(x, out=out) is out and torch.equal(out, x)
        assert dev.stream(there.queue) is None  # no streams on the CPU


def test_stream_priority_maps_queue_priorities_into_the_cuda_range() -> None:
    """Higher queue priority means a lower (more urgent) CUDA number, clamped to the range."""
    assert [stream_priority(p, (0, -5)) for p in (-3, 0, 1, 10, 11, 20, 1000)] == [
        0, 0, -1, -1, -2, -2, -5,
    ]  # fmt: skip
    assert [stream_priority(p, (0, -1)) for p in (0, 10, 20)] == [0, -1, -1]
    assert stream_priority(3, (0, -5), step=1) == -3
    assert stream_priority(5, (0, 0)) == 0  # a GPU without stream priorities
    with pytest.raises(ValueError, match="step"):
        stream_priority(1, (0, -5), step=0)


def test_importing_asyncfront_devices_does_not_import_torch() -> None:
    """asyncfront.devices resolves TorchDevice lazily; torch loads when one is created."""
    code = (
        "import sys, asyncfront, asyncfront.devices as d\n"
        "assert 'torch' not in sys.modules\n"
        "T = d.TorchDevice\n"
        "assert 'torch' not in sys.modules and T.__doc__\n"
        "assert 'TorchDevice' not in d.__all__\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_torch_says_how_to_install_it() -> None:
    """Without torch, creating a TorchDevice names the pip command."""
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from asyncfront.devices import TorchDevice\n"
        "try:\n"
        "    TorchDevice('cpu')\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "pip install torch==2.13.0" in out.stdout


# -- the CUDA path, on the emulated runtime ----------------------------------------


@pytest.mark.parametrize("check", CONFORMANCE_CHECKS)
def test_emulated_cuda_device_conforms(check: str) -> None:
    """The CUDA path (streams, events, completion thread, claims) passes the suite."""
    backends: list[EmulatedCuda] = []

    def make(*, concurrency: int, memory: int | None) -> Device:
        backends.append(EmulatedCuda())
        return TorchDevice("cuda:0", concurrency=concurrency, memory=memory, backend=backends[-1])

    try:
        check_device_conformance(make, virtual=False, checks=[check])
    finally:
        for backend in backends:
            backend.close()


async def test_each_queue_gets_a_stream_at_its_priority(cuda: EmulatedCuda) -> None:
    """Queues of the QoS tiers get streams of decreasing CUDA number (more urgent)."""
    dev = TorchDevice("cuda:0", backend=cuda)
    assert dev.is_cuda and dev.kind == "gpu" and dev.concurrency == 8
    async with af.open_runtime([dev]) as rt:
        queues = [rt.queue(dev, priority=p) for p in (0, 10, 20)]
        assert [dev.stream(q).priority for q in queues] == [0, -1, -2]
        assert dev.stream(queues[0]) is dev.stream(queues[0])
        other = rt.queue(dev)
        assert dev.stream(other) is not dev.stream(queues[0])


async def test_same_device_wait_is_issued_before_the_producer_finishes(
    cuda: EmulatedCuda,
) -> None:
    """A wait on work of the same GPU orders the streams, with no host round trip."""
    dev = TorchDevice("cuda:0", backend=cuda)
    release = threading.Event()
    kernels: list[str] = []
    issued_while_producer_ran: list[bool] = []

    def produce() -> None:
        cuda.launch(lambda: (release.wait(WAIT), kernels.append("produce")))

    def consume() -> str:
        issued_while_producer_ran.append(not release.is_set())
        cuda.launch(lambda: kernels.append("consume"))
        return "consumed"

    async with af.open_runtime([dev]) as rt:
        producer, consumer = rt.queue(dev, name="producer"), rt.queue(dev, name="consumer")
        ready = rt.semaphore(name="ready")
        # consumer first: its wait is parked until the producer is on its stream
        c = consumer.submit(consume, waits=[(ready, 1)])
        p = producer.submit(produce, signals=[(ready, 1)])
        await until(lambda: issued_while_producer_ran, "the consumer is issued")
        assert issued_while_producer_ran == [True]
        assert ready.value == 0 and not p.done() and not c.done()
        release.set()
        assert await c == "consumed"
        assert kernels == ["produce", "consume"]
        assert p.done() and ready.value == 1
        assert c.frontier == af.Frontier({producer.axis: 1, consumer.axis: 1})
        # and when the producer is on its stream first, the claim is immediate
        release.clear()
        p2 = producer.submit(produce, signals=[(ready, 2)])
        await until(lambda: p2.state is af.SubmissionState.RUNNING, "the producer runs")
        c2 = consumer.submit(consume, waits=[(ready, 2)])
        await until(lambda: len(issued_while_producer_ran) == 2, "the second consumer issues")
        assert issued_while_producer_ran == [True, True]
        release.set()
        await c2
        assert kernels == ["produce", "consume", "produce", "consume"]


async def test_barriers_and_other_devices_wait_on_the_host(cuda: EmulatedCuda) -> None:
    """A barrier, and work waiting on another device, proceed only after the signal."""
    dev = TorchDevice("cuda:0", backend=cuda)
    release = threading.Event()

    def produce() -> None:
        cuda.launch(lambda: release.wait(WAIT))

    async with af.open_runtime([dev, CpuDevice("host")]) as rt:
        producer = rt.queue(dev)
        ready = rt.semaphore(name="ready")
        barrier = rt.queue(dev).submit(waits=[(ready, 1)])
        host = rt.queue("host").submit(lambda: ready.value, waits=[(ready, 1)])
        p = producer.submit(produce, signals=[(ready, 1)])
        await until(lambda: p.state is af.SubmissionState.RUNNING, "the producer runs")
        await asyncio.sleep(0.05)
        assert not barrier.done() and not host.done()
        release.set()
        await barrier
        assert p.done() and await host == 1


async def test_completions_arrive_in_submission_order(cuda: EmulatedCuda) -> None:
    """Work issued later on a faster stream completes after earlier work on the device."""
    dev = TorchDevice("cuda:0", backend=cuda)
    release = threading.Event()
    fast_ran = threading.Event()
    async with af.open_runtime([dev]) as rt:
        slow, fast = rt.queue(dev, name="slow"), rt.queue(dev, name="fast")
        a = slow.submit(lambda: cuda.launch(lambda: release.wait(WAIT)))
        await until(lambda: a.state is af.SubmissionState.RUNNING, "the slow work runs")
        b = fast.submit(lambda: cuda.launch(fast_ran.set))
        await until(fast_ran.is_set, "the fast kernel ran")
        await asyncio.sleep(0.05)
        assert not a.done() and not b.done()  # b's event is done, but a's is waited first
        release.set()
        await b
        assert a.done() and a.finished_at is not None and b.finished_at is not None
        assert a.finished_at <= b.finished_at


async def test_a_failing_kernel_fails_its_claimed_consumers(cuda: EmulatedCuda) -> None:
    """An error found at completion fails the producer, its semaphore and the consumer."""
    dev = TorchDevice("cuda:0", backend=cuda)
    release = threading.Event()

    def bad_kernel() -> None:
        release.wait(WAIT)
        raise ValueError("illegal memory access")

    async with af.open_runtime([dev], logger=_quiet()) as rt:
        producer, consumer = rt.queue(dev), rt.queue(dev)
        ready = rt.semaphore(name="ready")
        p = producer.submit(lambda: cuda.launch(bad_kernel), signals=[(ready, 1)])
        c = consumer.submit(lambda: cuda.launch(lambda: None), waits=[(ready, 1)])
        await until(lambda: c.state is af.SubmissionState.RUNNING, "the consumer is issued")
        release.set()
        with pytest.raises(RuntimeError, match="illegal memory access") as produced:
            await p
        with pytest.raises(af.SemaphoreFailedError) as consumed:
            await c
        assert consumed.value.__cause__ is produced.value
        assert ready.failure is produced.value
        # the queues go on
        assert await consumer.submit(lambda: 7) == 7


async def test_coroutine_work_is_refused_on_cuda_queues(cuda: EmulatedCuda) -> None:
    """CUDA work is a plain function that enqueues; a coroutine function is a TypeError."""

    async def work() -> None:
        return None

    async with af.open_runtime([TorchDevice("cuda:0", backend=cuda)], logger=_quiet()) as rt:
        with pytest.raises(TypeError, match="not coroutine function"):
            await rt.queue("cuda:0").submit(work)


async def test_segment_is_synchronized_before_release(cuda: EmulatedCuda) -> None:
    """Closing a GPU device with a live segment waits for the GPU before dropping it."""
    dev = TorchDevice("cuda:0", memory=1 << 16, backend=cuda)
    async with af.open_runtime([dev]) as rt:
        ctx = rt.create_context("m", max_memory=1 << 16)
        async with rt.session(ctx) as s:
            buf = await s.allocate(1024)
            assert buf.tensor(torch.int32).shape == (256,)
    assert cuda.synchronized == 1 and dev._segment is None


def _quiet() -> Any:
    import logging

    import structlog

    return structlog.wrap_logger(
        structlog.PrintLogger(sys.stderr),
        wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR),
    )


# -- the pool's segment and working memory ------------------------------------------


class MeasuringCuda(EmulatedCuda):
    """An emulated GPU of ``total`` bytes whose allocator peaks at ``peak`` per submission."""

    def __init__(self, total: int = 1 << 30, peak: int = 0) -> None:
        super().__init__()
        self.total, self.peak = total, peak

    def total_memory(self) -> int:
        return self.total

    def start_peak(self) -> int:
        return 0

    def peak_since(self, start: int) -> int:
        return self.peak


async def test_gpu_segment_leaves_a_quarter_of_memory_to_working_memory(
    cuda: EmulatedCuda,
) -> None:
    """On a GPU the pool's segment is three quarters of memory=; working memory gets the rest."""
    dev = TorchDevice("cuda:0", memory=1 << 20, backend=cuda)
    assert dev.working_capacity == 1 << 18
    async with af.open_runtime([dev]) as rt:
        assert dev.memory.capacity == 3 << 18
        ctx = rt.create_context("m", max_memory=1 << 20)
        async with rt.session(ctx) as s:
            buf = await s.allocate(1024)
            assert buf.tensor(torch.uint8).numel() == 1024  # the segment is made on first use
            assert dev._segment is not None and dev._segment.numel() == 3 << 18
            with pytest.raises(af.MemoryBudgetError):
                await s.allocate(3 << 18, timeout=0)  # beyond the segment's free space
    explicit = TorchDevice("cuda:0", memory=1 << 20, working_memory=0, backend=cuda)
    assert explicit.working_capacity is None  # the segment takes all of memory=


def test_cpu_pool_shares_all_of_memory_unless_told() -> None:
    """On the CPU the arena is touched lazily: no share is set aside unless working_memory says."""
    assert TorchDevice("cpu", memory=1 << 20).working_capacity is None
    assert TorchDevice("cpu", memory=1 << 20, working_memory=1 << 16).working_capacity == 1 << 16


def test_memory_and_working_share_are_checked() -> None:
    """memory= above the GPU's, or a share that leaves no segment, is refused with the numbers."""
    with pytest.raises(ValueError, match=r"memory=2,048 bytes is more than the GPU holds \(1,024"):
        TorchDevice("cuda:0", memory=2048, backend=MeasuringCuda(total=1024))
    with pytest.raises(ValueError, match="leaves nothing of memory=1,024"):
        TorchDevice("cpu", memory=1024, working_memory=1024)
    with pytest.raises(ValueError, match="memory=, which is not set"):
        TorchDevice("cpu", working_memory=16)
    with pytest.raises(ValueError, match=r"an int >= 0 bytes, got -1"):
        TorchDevice("cpu", memory=1024, working_memory=-1)


async def test_working_memory_above_the_share_is_refused_and_charges_nothing() -> None:
    """Working memory larger than the device's share can never run: refused, nothing charged."""
    dev = TorchDevice("cpu", memory=1 << 20, working_memory=1 << 16)
    async with af.open_runtime([dev]) as rt:
        ctx = rt.create_context("m", max_memory=1 << 20)
        sub = ctx.queue.submit(lambda: None, memory=(1 << 16) + 1, name="big")
        with pytest.raises(af.MemoryBudgetError, match=r"leaves 64\.0 KiB of its 1\.0 MiB"):
            await sub
        assert rt.usage(ctx).used == 0
        assert await ctx.queue.submit(lambda: "fits", memory=1 << 16) == "fits"


async def test_working_memory_waits_for_the_share_while_the_budget_has_room() -> None:
    """Two works whose memory= exceed the share together run one after the other."""
    dev = TorchDevice("cpu", workers=2, memory=1 << 20, working_memory=1 << 16)
    release = threading.Event()
    async with af.open_runtime([dev]) as rt:
        a = rt.create_context("a", max_memory=1 << 19)
        b = rt.create_context("b", max_memory=1 << 19)
        first = a.queue.submit(lambda: release.wait(WAIT), memory=3 << 14, name="first")
        await until(lambda: first.started_at is not None, "the first work runs")
        second = b.queue.submit(lambda: "second", memory=3 << 14, name="second")
        async with rt.session(a) as s:
            await s.allocate(1 << 18)  # the pool still serves blocks meanwhile
        await asyncio.sleep(0.05)
        assert second.started_at is None  # the share is taken, the budgets are not
        release.set()
        assert await second == "second" and await first is True
        assert second.started_at is not None and first.finished_at is not None
        assert second.started_at >= first.finished_at


async def test_allocator_peak_is_traced_and_logged_above_the_reservation() -> None:
    """Each GPU submission's allocator peak is in the trace; one above memory= is logged."""
    backend = MeasuringCuda(peak=5000)
    try:
        dev = TorchDevice("cuda:0", memory=1 << 20, backend=backend)
        with structlog.testing.capture_logs() as logs:
            async with af.open_runtime([dev]) as rt:
                ctx = rt.create_context("m", max_memory=1 << 19)
                within = ctx.queue.submit(lambda: None, memory=8192, name="within")
                over = ctx.queue.submit(lambda: None, memory=4096, name="over")
                await within
                await over
                assert within.annotations == {"memory": 8192, "peak_memory": 5000}
                records = {r.name: r for r in rt.trace.records}
                assert records["over"].annotations["peak_memory"] == 5000
    finally:
        backend.close()
    exceeded = [e for e in logs if e["event"] == "working_memory_exceeded"]
    assert [(e["submission"], e["reserved"], e["peak"]) for e in exceeded] == [("over", 4096, 5000)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
async def test_real_gpu_segment_leaves_working_memory_outside_it() -> None:
    """On a real GPU the segment is memory - working_memory; work allocates beside it."""
    dev = TorchDevice("cuda:0", memory=64 << 20, working_memory=16 << 20)
    async with af.open_runtime([dev]) as rt:
        ctx = rt.create_context("m", device="cuda:0", max_memory=64 << 20)
        async with rt.session(ctx) as s:
            buf = await s.allocate(1 << 20)
            assert buf.tensor(torch.uint8).device.type == "cuda"
            assert dev._segment is not None and dev._segment.numel() == 48 << 20
            sub = ctx.queue.submit(lambda: torch.ones(1 << 20, device="cuda").sum(), memory=8 << 20)
            await sub
            assert 0 < sub.annotations["peak_memory"] <= 8 << 20
