"""TorchDevice on a real CUDA GPU: streams, events, same-device waits, copies, pool memory.

Skipped where torch or a CUDA GPU is missing. Long-running kernels
(``torch.cuda._sleep``) keep a producer busy on the GPU so that orderings can be
observed; nothing here asserts a duration.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

torch = pytest.importorskip("torch")

import asyncfront as af  # noqa: E402
from asyncfront.devices import Device  # noqa: E402
from asyncfront.devices.torch import TorchDevice, stream_priority  # noqa: E402
from asyncfront.testing import check_device_conformance  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

SLEEP_CYCLES = 500_000_000  # a few hundred milliseconds of GPU time on current parts


def test_gpu_device_conforms() -> None:
    """The CUDA path passes the conformance suite."""

    def make(*, concurrency: int, memory: int | None) -> Device:
        return TorchDevice("cuda:0", concurrency=concurrency, memory=memory)

    check_device_conformance(make, virtual=False)


async def test_streams_follow_queue_priorities() -> None:
    """Each queue issues on its own stream, at its priority mapped into the GPU's range."""
    dev = TorchDevice("cuda:0")
    assert dev.is_cuda and dev.kind == "gpu" and dev.torch_device == torch.device("cuda", 0)
    priority_range = torch.cuda.Stream.priority_range()
    async with af.open_runtime([dev]) as rt:
        queues = [rt.queue(dev, priority=p) for p in (0, 10, 20)]
        streams = [dev.stream(q) for q in queues]
        assert [s.priority for s in streams] == [
            stream_priority(p, priority_range) for p in (0, 10, 20)
        ]
        assert all(s.device == dev.torch_device for s in streams)
        current: list[Any] = []
        await queues[2].submit(lambda: current.append(torch.cuda.current_stream()))
        assert current == [streams[2]]


async def test_same_device_wait_is_ordered_on_the_gpu_without_a_host_round_trip() -> None:
    """The consumer is issued while the producer's kernel runs, and still reads its result."""
    dev = TorchDevice("cuda:0")
    x = torch.zeros(1 << 20, device="cuda:0")
    y = torch.empty_like(x)
    marker = torch.cuda.Event()
    torch.cuda.synchronize()
    issued_while_producer_ran: list[bool] = []

    def produce() -> None:
        torch.cuda._sleep(SLEEP_CYCLES)
        x.fill_(1.0)
        marker.record()

    def consume() -> None:
        issued_while_producer_ran.append(not marker.query())
        y.copy_(x)

    async with af.open_runtime([dev]) as rt:
        producer, consumer = rt.queue(dev, name="producer"), rt.queue(dev, name="consumer")
        ready = rt.semaphore(name="ready")
        c = consumer.submit(consume, waits=[(ready, 1)])
        p = producer.submit(produce, signals=[(ready, 1)])
        await c
        assert p.done()
    assert issued_while_producer_ran == [True]
    assert torch.all(y == 1.0)


async def test_completions_in_submission_order_without_blocking_the_loop() -> None:
    """Later work completes after earlier work; the loop keeps running meanwhile."""
    dev = TorchDevice("cuda:0")
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.005)
            ticks += 1

    async with af.open_runtime([dev]) as rt:
        slow, fast = rt.queue(dev, name="slow"), rt.queue(dev, name="fast")
        ticker = asyncio.ensure_future(tick())
        a = slow.submit(torch.cuda._sleep, SLEEP_CYCLES)
        b = fast.submit(lambda: torch.ones(4, device="cuda:0").sum())
        await b
        ticker.cancel()
        assert a.done() and a.finished_at is not None and b.finished_at is not None
        assert a.finished_at <= b.finished_at
        assert ticks >= 3  # the loop ran while the GPU slept


async def test_copy_queue_round_trip_with_pinned_memory() -> None:
    """Host → device → compute → host, linked by semaphores, lands in pinned memory."""
    dev = TorchDevice("cuda:0")
    x = torch.randn(1 << 20)
    # Consumers on the same GPU are issued before their producers finish: the stages
    # share tensors allocated up front, not each other's submission results.
    d = torch.empty(x.shape, device=dev.torch_device)
    y = torch.empty_like(d)
    async with af.open_runtime([dev]) as rt:
        compute, h2d = rt.queue(dev, name="compute"), dev.copy_queue(name="h2d")
        on_device, doubled = rt.semaphore(name="on_device"), rt.semaphore(name="doubled")
        there = dev.to_device(x, out=d, queue=h2d, signals=[(on_device, 1)])
        compute.submit(torch.mul, d, 2, out=y, waits=[(on_device, 1)], signals=[(doubled, 1)])
        back = dev.to_host(y, waits=[(doubled, 1)])
        h = await back
        assert there.done() and await there is d
        assert dev.stream(h2d) is not dev.stream(compute)
        assert back.queue is not h2d and dev.stream(back.queue) is not dev.stream(compute)
        assert h.is_pinned() and h.device.type == "cpu"
        assert torch.equal(h, x * 2)
        fresh = await dev.to_device(x)
        assert fresh.device == dev.torch_device and torch.equal(fresh.cpu(), x)


async def test_pool_buffers_are_views_of_one_device_segment() -> None:
    """Buffers are typed CUDA views at their pool offsets; work on queues sees them."""
    dev = TorchDevice("cuda:0", memory=64 << 20)
    async with af.open_runtime([dev]) as rt:
        ctx = rt.create_context("llm", max_memory=32 << 20)
        async with rt.session(ctx) as s:
            a = await s.allocate(4 << 20)
            b = await s.allocate(4 << 20)
            ta = a.tensor(torch.float16, (1024, 2048))
            tb = b.tensor(torch.float32)
            assert ta.device == dev.torch_device and ta.shape == (1024, 2048)
            assert tb.numel() == (4 << 20) // 4
            assert tb.data_ptr() - ta.data_ptr() == b.offset - a.offset
            assert ta.untyped_storage().data_ptr() == tb.untyped_storage().data_ptr()
            await s.run(ta.fill_, 3.0)
            # everything that reads ta runs on the queue's stream, after the fill
            await s.run(lambda: tb.copy_(ta.flatten()[: tb.numel()]))
            assert torch.all(tb == 3.0)
            out = a.tensor(torch.float32)
            x = torch.randn(out.numel())
            assert torch.equal((await dev.to_device(x, out=out)).cpu(), x)
