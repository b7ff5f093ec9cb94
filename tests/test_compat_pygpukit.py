"""The Multi-LLM Scheduler Guide's examples on asyncfront.compat.pygpukit.

Each guide example runs with only its imports changed, with small stand-in models,
and the test then checks what the example promises (budgets, ordering, usage numbers).
The last tests pin four defects of the original implementation that this one avoids.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

import asyncfront as af
from asyncfront.compat import pygpukit

GiB = af.GiB


@pytest.fixture(autouse=True)
def fresh_scheduler() -> Iterator[None]:
    """Every test starts and ends with no scheduler running."""
    pygpukit.shutdown()
    yield
    pygpukit.shutdown()


def eventually(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.001)


# Stand-in models: tiny real computations.


def tokenize(text: str) -> list[int]:
    return [ord(c) % 97 for c in text]


def generate(prompt: str) -> str:
    return " ".join(reversed(prompt.split())) + f" [{sum(tokenize(prompt))}]"


def synthesize(text: str) -> list[float]:
    return [round((t - 48) / 48, 3) for t in tokenize(text)]


def describe(text: str) -> str:
    return f"{len(text.split())} regions"


# -- Basic usage -------------------------------------------------------------------


def test_creating_contexts() -> None:
    """Three Guaranteed budgets come out of the device's 8 GiB; a fourth beyond it is refused."""
    from asyncfront.compat.pygpukit import (  # noqa: F401
        GB,
        MB,
        context_session,
        create_context,
        initialize,
    )

    # Initialize scheduler
    initialize(device_id=0)

    # Create execution contexts with VRAM budgets
    llm_ctx = create_context("llm", max_vram=4 * GB)
    tts_ctx = create_context("tts", max_vram=2 * GB)
    vision_ctx = create_context("vision", max_vram=1 * GB)

    contexts = [llm_ctx, tts_ctx, vision_ctx]
    assert pygpukit.get_available_vram() == 1 * GB
    assert [c.qos for c in contexts] == [pygpukit.QoSPolicy.GUARANTEED] * 3
    assert [pygpukit.get_context_usage(c).max for c in contexts] == [4 * GB, 2 * GB, 1 * GB]
    assert len({pygpukit.get_stream(c).id for c in contexts}) == 3
    with pytest.raises(af.AdmissionError, match=r"needs 2\.0 GiB reserved"):
        create_context("extra", max_vram=2 * GB)
    with pytest.raises(RuntimeError, match="already running"):
        initialize(device_id=0)


def test_running_with_context_sessions_sync() -> None:
    """Synchronous sessions run on the caller's thread, charge their context, free on exit."""
    from asyncfront.compat.pygpukit import GB, create_context, current_context, current_session

    llm_ctx = create_context("llm", max_vram=4 * GB)
    tts_ctx = create_context("tts", max_vram=2 * GB)
    prompt, text = "tell me a story", "once upon a time"
    seen: list[int] = []

    def run_llm_inference(prompt: str) -> str:
        assert current_context() is llm_ctx
        session = current_session()
        kv_cache = session.allocate(3 * GB)
        seen.append(pygpukit.get_context_usage(llm_ctx).used)
        answer = session.run(generate, prompt)  # on llm's own queue
        session.free(kv_cache)
        return answer

    def run_tts(text: str) -> list[float]:
        assert current_context() is tts_ctx
        session = current_session()
        with pytest.raises(af.MemoryBudgetError, match=r"'tts' asked 3\.0 GiB, budget 2\.0 GiB"):
            session.allocate(3 * GB)
        session.allocate(2 * GB)  # left for the session to free
        seen.append(pygpukit.get_context_usage(tts_ctx).used)
        return session.run(synthesize, text)

    from asyncfront.compat.pygpukit import context_session

    # Synchronous usage
    with context_session(llm_ctx):
        # All GPU operations here use llm_ctx's stream and VRAM budget
        result = run_llm_inference(prompt)

    with context_session(tts_ctx):
        # TTS uses its own isolated stream
        audio = run_tts(text)

    assert result == generate(prompt) and audio == synthesize(text)
    assert seen == [3 * GB, 2 * GB]
    assert pygpukit.get_context_usage(llm_ctx).used == 0
    assert pygpukit.get_context_usage(tts_ctx).used == 0  # the session freed it
    with pytest.raises(RuntimeError, match="no context session is open"):
        current_context()


def test_async_concurrent_execution() -> None:
    """Two async sessions from the caller's own loop hold memory at once, each on its context."""
    from asyncfront.compat.pygpukit import GB, create_context, current_context, current_session

    llm_ctx = create_context("llm", max_vram=4 * GB)
    tts_ctx = create_context("tts", max_vram=2 * GB)
    both_holding = asyncio.Barrier(2)
    usage: list[tuple[int, int]] = []

    async def model(ctx: af.ExecutionContext, nbytes: int, fn: Callable[[str], Any], x: str) -> Any:
        assert current_context() is ctx
        session = current_session()
        assert isinstance(session, pygpukit.AsyncContextSession)
        buf = await session.allocate(nbytes)
        await asyncio.wait_for(both_holding.wait(), 5.0)  # both tasks hold memory now
        usage.append(
            (pygpukit.get_context_usage(llm_ctx).used, pygpukit.get_context_usage(tts_ctx).used)
        )
        out = await session.run(fn, x)
        session.free(buf)
        return out

    async def llm_inference_async(prompt: str) -> str:
        return await model(llm_ctx, 3 * GB, generate, prompt)

    async def tts_synthesis_async(text: str) -> list[float]:
        return await model(tts_ctx, 1 * GB, synthesize, text)

    from asyncfront.compat.pygpukit import context_session

    async def run_llm(prompt):
        async with context_session(llm_ctx):
            return await llm_inference_async(prompt)

    async def run_tts(text):
        async with context_session(tts_ctx):
            return await tts_synthesis_async(text)

    async def main():
        # Run both models concurrently
        text_task = asyncio.create_task(run_llm("Hello"))
        audio_task = asyncio.create_task(run_tts("Welcome"))

        text, audio = await asyncio.gather(text_task, audio_task)
        return text, audio

    result = asyncio.run(main())

    assert result == (generate("Hello"), synthesize("Welcome"))
    assert usage == [(3 * GB, 1 * GB)] * 2
    assert pygpukit.get_context_usage(llm_ctx).used == 0


# -- QoS policies ------------------------------------------------------------------


def test_setting_qos_policy() -> None:
    """Tiers reserve max, base and nothing; Burstable bursts into spare; BestEffort is capped."""
    from asyncfront.compat.pygpukit import GB, QoSPolicy, create_context

    # Guaranteed: Always has 4GB reserved
    llm_ctx = create_context(
        "llm",
        max_vram=4 * GB,
        qos=QoSPolicy.GUARANTEED,
    )

    # Burstable: Base 1GB, can burst to 2GB
    tts_ctx = create_context(
        "tts",
        max_vram=2 * GB,
        base_vram=1 * GB,
        qos=QoSPolicy.BURSTABLE,
    )

    # BestEffort: Uses whatever is available
    bg_ctx = create_context(
        "background",
        max_vram=1 * GB,
        qos=QoSPolicy.BEST_EFFORT,
    )

    reserved = [pygpukit.get_context_usage(c).reserved for c in (llm_ctx, tts_ctx, bg_ctx)]
    assert reserved == [4 * GB, 1 * GB, 0]
    assert pygpukit.get_available_vram() == 3 * GB
    assert llm_ctx.priority > tts_ctx.priority > bg_ctx.priority
    with pygpukit.context_session(tts_ctx) as tts, pygpukit.context_session(bg_ctx) as bg:
        tts.allocate(2 * GB)  # its 1 GiB base plus 1 GiB burst from spare
        assert pygpukit.get_available_vram() == 2 * GB
        with pytest.raises(af.MemoryBudgetError, match="over the context's max_memory"):
            bg.allocate(2 * GB)
        bg.allocate(1 * GB)
        assert pygpukit.get_available_vram() == 1 * GB


# -- Memory management -------------------------------------------------------------


def test_vram_budgeting(capsys: pytest.CaptureFixture[str]) -> None:
    """Available VRAM and a context's used/max read as the guide prints them, and track use."""
    from asyncfront.compat.pygpukit import (
        GB,
        create_context,
        get_available_vram,
        get_context_usage,
    )

    # Check available VRAM
    available = get_available_vram()
    print(f"Available VRAM: {available / GB:.1f} GB")

    # Create context with budget
    ctx = create_context("model", max_vram=4 * GB)

    # Check context usage
    usage = get_context_usage(ctx)
    print(f"Used: {usage.used / GB:.1f} GB")
    print(f"Max: {usage.max / GB:.1f} GB")

    assert capsys.readouterr().out.splitlines() == [
        "Available VRAM: 8.0 GB",
        "Used: 0.0 GB",
        "Max: 4.0 GB",
    ]
    assert get_available_vram() == 4 * GB  # the Guaranteed budget is reserved
    with pygpukit.context_session(ctx) as session:
        session.allocate(3 * GB // 2)
        assert get_context_usage(ctx).used == 3 * GB // 2
        with pytest.raises(af.MemoryBudgetError, match=r"budget 4\.0 GiB, 1\.5 GiB in use"):
            session.allocate(3 * GB)
    assert get_context_usage(ctx).used == 0


def test_memory_pressure_handling(capsys: pytest.CaptureFixture[str]) -> None:
    """False from the handler refuses at once; True retries and waits, never overcommits."""
    from asyncfront.compat.pygpukit import GB, create_context, on_memory_pressure

    def handle_pressure(ctx, requested, available):
        print(f"Context {ctx.name}: requested {requested}, available {available}")
        # Return True to allow allocation, False to reject
        return available > requested * 0.5

    # Register handler
    on_memory_pressure(handle_pressure)

    create_context("big", max_vram=6 * GB)  # reserves 6 of the 8 GiB
    a = create_context("a", max_vram=4 * GB, qos=pygpukit.QoSPolicy.BEST_EFFORT)
    b = create_context("b", max_vram=4 * GB, qos=pygpukit.QoSPolicy.BEST_EFFORT)
    with (
        pygpukit.context_session(a) as sa,
        pygpukit.context_session(b) as sb,
        ThreadPoolExecutor(1) as other_thread,
    ):
        held = sa.allocate(1 * GB)  # 1 GiB of spare memory is left
        # 2 GiB asked (it would fit if `a` freed), 1 GiB available: the handler refuses
        # at once although `a` could free memory
        with pytest.raises(af.MemoryBudgetError, match="refused by the memory-pressure handler"):
            sb.allocate(2 * GB)
        # 1.5 GiB asked, 1 GiB available: allowed, so it waits until `a` frees
        waiting = other_thread.submit(sb.allocate, 3 * GB // 2, timeout=5.0)
        eventually(lambda: b.statistics().waits == 1)
        assert not waiting.done()
        sa.free(held)
        assert waiting.result(timeout=5.0).nbytes == 3 * GB // 2
    out = capsys.readouterr().out.splitlines()
    assert out == [
        f"Context b: requested {2 * GB}, available {1 * GB}",
        f"Context b: requested {3 * GB // 2}, available {1 * GB}",
    ]


def test_memory_pressure_handler_frees_and_retries() -> None:
    """A handler that frees another session's buffer lets the allocation through on retry."""
    a = pygpukit.create_context("a", max_vram=8 * GiB, qos=pygpukit.QoSPolicy.BEST_EFFORT)
    b = pygpukit.create_context("b", max_vram=4 * GiB, qos=pygpukit.QoSPolicy.BEST_EFFORT)
    with pygpukit.context_session(a) as sa, pygpukit.context_session(b) as sb:
        cache = sa.allocate(8 * GiB)

        @pygpukit.on_memory_pressure
        def drop_cache(ctx: af.ExecutionContext, requested: int, available: int) -> bool:
            assert pygpukit.get_context_usage(a).used == 8 * GiB  # callable from here
            sa.free(cache)
            return True

        assert sb.allocate(4 * GiB).nbytes == 4 * GiB
        assert pygpukit.get_context_usage(a).used == 0


# -- Streams -----------------------------------------------------------------------


def test_explicit_stream_control(capsys: pytest.CaptureFixture[str]) -> None:
    """A stream is the context's queue; synchronize returns once all its queued work ran."""
    from asyncfront.compat.pygpukit import GB, create_context, get_stream

    ctx = create_context("model", max_vram=4 * GB)

    # Get CUDA stream for context
    stream = get_stream(ctx)
    print(f"Stream ID: {stream.id}")

    # Synchronize stream
    stream.synchronize()

    assert capsys.readouterr().out == f"Stream ID: {ctx.queue.axis}\n"
    gate = threading.Event()
    done: list[int] = []
    with pygpukit.context_session(ctx) as session:
        futures = [session.submit(lambda i=i: gate.wait(5) and done.append(i)) for i in range(3)]
    assert not stream.query()
    threading.Timer(0.05, gate.set).start()
    stream.synchronize(timeout=5.0)
    assert done == [0, 1, 2] and all(f.done() for f in futures) and stream.query()


def test_stream_events() -> None:
    """The consumer's queued work waits on the producer's event, not on the caller's thread."""
    gate = threading.Event()
    log: list[str] = []
    consumed: list[Any] = []

    def produce_data() -> Any:
        def produce() -> list[int]:
            assert gate.wait(5)
            log.append("produce")
            return [1, 2, 3]

        return pygpukit.current_session().submit(produce)  # on the producer's queue

    def consume_data(result: Any) -> None:
        def consume() -> int:
            log.append("consume")
            return sum(result.result(timeout=5))

        consumed.append(pygpukit.current_session().submit(consume))

    from asyncfront.compat.pygpukit import (
        GB,
        context_session,
        create_context,
        record_event,
        wait_event,
    )

    ctx1 = create_context("producer", max_vram=2 * GB)
    ctx2 = create_context("consumer", max_vram=2 * GB)

    # Record event after producer finishes
    with context_session(ctx1):
        result = produce_data()
        event = record_event(ctx1)

    # Consumer waits for producer
    with context_session(ctx2):
        wait_event(ctx2, event)
        consume_data(result)

    # The consumer's queue is blocked on the event while the producer is held back...
    eventually(lambda: ctx2.queue.statistics().blocked)
    assert log == [] and not event.query()
    # ...while a context that waits for nothing runs at once.
    bystander = create_context("bystander", max_vram=1 * GB)
    with context_session(bystander) as session:
        session.run(log.append, "bystander")
    gate.set()
    pygpukit.get_stream(ctx2).synchronize(timeout=5.0)
    assert log == ["bystander", "produce", "consume"]
    assert consumed[0].result(timeout=5) == 6 and event.query()
    event.synchronize(timeout=1.0)


# -- The low-level API -------------------------------------------------------------


def test_rust_memory_pool(capsys: pytest.CaptureFixture[str]) -> None:
    """A freed block is cached, counted, and reused by the next request of its size."""
    import asyncfront.compat.pygpukit as rust

    # Memory Pool with LRU eviction
    pool = rust.MemoryPool(
        quota=100 * 1024 * 1024,  # 100 MB
        enable_eviction=True,
    )

    # Allocate and free
    block = pool.allocate(4096)
    pool.free(block)

    # Check stats
    stats = pool.stats()
    print(f"Allocated: {stats.allocated_bytes}")
    print(f"Free blocks: {stats.free_blocks}")

    assert capsys.readouterr().out == "Allocated: 0\nFree blocks: 1\n"
    assert stats.cached_bytes == 4096
    again = pool.allocate(4000)
    assert again.offset == 0 and pool.stats().reuses == 1 and pool.stats().free_blocks == 0
    assert pool.stats().allocated_bytes == 4000
    with pytest.raises(ValueError, match="already freed"):
        pool.free(block)


def test_qos_policy_evaluator(capsys: pytest.CaptureFixture[str]) -> None:
    """A Guaranteed task is admitted at its tier's priority; one that cannot fit is told why."""
    import asyncfront.compat.pygpukit as rust

    # Create evaluator
    evaluator = rust.QosPolicyEvaluator(
        total_memory=8 * 1024**3,  # 8 GB
        total_bandwidth=1.0,
    )

    # Create task metadata
    task = rust.QosTaskMeta.guaranteed(
        "inference-1",
        "LLM Inference",
        256 * 1024 * 1024,  # 256 MB
    )

    # Evaluate admission
    result = evaluator.evaluate(task)
    if result.admitted:
        print(f"Task admitted with priority {result.priority}")
    else:
        print(f"Task rejected: {result.reason}")

    assert capsys.readouterr().out == f"Task admitted with priority {af.QoS.GUARANTEED.priority}\n"
    assert evaluator.available_memory == 8 * GiB - 256 * 1024 * 1024
    too_big = evaluator.evaluate(rust.QosTaskMeta.guaranteed("train", "Training", 8 * GiB))
    assert not too_big.admitted
    assert too_big.reason.endswith("needs 8.0 GiB of memory, 7.8 GiB of 8.0 GiB left")
    evaluator.release("inference-1")
    assert evaluator.available_memory == 8 * GiB and evaluator.admitted == ()


def test_gpu_partitioning(capsys: pytest.CaptureFixture[str]) -> None:
    """Two half-device partitions fit exactly; nothing more fits beside them."""
    import asyncfront.compat.pygpukit as rust

    # Create partition manager
    config = rust.PartitionConfig(total_memory=8 * 1024**3)
    manager = rust.PartitionManager(config)

    # Create partitions
    manager.create_partition(
        "inference",
        "Inference Partition",
        rust.PartitionLimits().memory(4 * 1024**3).compute(0.5),
    )

    manager.create_partition(
        "training",
        "Training Partition",
        rust.PartitionLimits().memory(4 * 1024**3).compute(0.5),
    )

    # Get partition info
    info = manager.get_partition("inference")
    print(f"Memory limit: {info.memory_limit}")
    print(f"Compute limit: {info.compute_limit}")

    assert capsys.readouterr().out == "Memory limit: 4294967296\nCompute limit: 0.5\n"
    with pytest.raises(af.AdmissionError, match=r"needs 0\.1 of compute, 0 of 1 left"):
        manager.create_partition("eval", "Eval", rust.PartitionLimits().compute(0.1))
    with pytest.raises(af.AdmissionError, match=r"needs 1\.0 GiB of memory, 0 B of 8\.0 GiB"):
        manager.create_partition("eval", "Eval", rust.PartitionLimits().memory(1 * GiB))
    manager.remove_partition("training")
    assert (
        manager.create_partition("eval", "Eval", rust.PartitionLimits().compute(0.5)).id == "eval"
    )
    with pytest.raises(KeyError, match="no partition 'training'"):
        manager.get_partition("training")


# -- Complete example --------------------------------------------------------------


def test_complete_example() -> None:
    """LLM and vision run concurrently in their budgets, then TTS speaks their combined text."""
    both_running = asyncio.Barrier(2)
    log: list[str] = []

    async def generate_response(user_input: str) -> str:
        session = pygpukit.current_session()
        assert isinstance(session, pygpukit.AsyncContextSession)
        kv_cache = await session.allocate(3 * GiB)
        await asyncio.wait_for(both_running.wait(), 5.0)
        text: str = await session.run(generate, user_input)
        session.free(kv_cache)
        log.append("llm")
        return text

    async def analyze_images(user_input: str) -> str:
        session = pygpukit.current_session()
        assert isinstance(session, pygpukit.AsyncContextSession)
        await session.allocate(2 * GiB)  # freed when the session ends
        await asyncio.wait_for(both_running.wait(), 5.0)
        log.append("vision")
        return await session.run(describe, user_input)

    async def synthesize_speech(text: str) -> list[float]:
        session = pygpukit.current_session()
        assert isinstance(session, pygpukit.AsyncContextSession)
        assert pygpukit.current_context().name == "tts"
        log.append("tts")
        await session.allocate(1 * GiB)
        return await session.run(synthesize, text)

    # Run LLM + TTS + Vision concurrently.
    from asyncfront.compat.pygpukit import (
        GB,
        context_session,
        create_context,
        initialize,
    )

    # Initialize
    initialize(device_id=0)

    # Create contexts
    llm_ctx = create_context("llm", max_vram=4 * GB)
    tts_ctx = create_context("tts", max_vram=2 * GB)
    vision_ctx = create_context("vision", max_vram=2 * GB)

    async def process_request(user_input: str):
        """Process user request with multiple AI models."""

        async def llm_task():
            async with context_session(llm_ctx):
                # Generate text response
                return await generate_response(user_input)

        async def vision_task():
            async with context_session(vision_ctx):
                # Analyze any images in input
                return await analyze_images(user_input)

        async def tts_task(text):
            async with context_session(tts_ctx):
                # Convert text to speech
                return await synthesize_speech(text)

        # Run LLM and Vision in parallel
        text_response, image_analysis = await asyncio.gather(
            llm_task(),
            vision_task(),
        )

        # Then run TTS on the combined response
        combined_text = f"{text_response}. {image_analysis}"
        audio = await tts_task(combined_text)

        return {
            "text": combined_text,
            "audio": audio,
        }

    # Run
    result = asyncio.run(process_request("Describe this image and tell me a story"))

    request = "Describe this image and tell me a story"
    combined = f"{generate(request)}. {describe(request)}"
    assert result == {"text": combined, "audio": synthesize(combined)}
    assert sorted(log[:2]) == ["llm", "vision"] and log[2] == "tts"
    assert [pygpukit.get_context_usage(c).used for c in (llm_ctx, tts_ctx, vision_ctx)] == [0] * 3


# -- The layer itself --------------------------------------------------------------


def test_lazy_start_and_shutdown() -> None:
    """The first call starts a default scheduler; after shutdown its contexts are refused."""
    ctx = pygpukit.create_context("early", max_vram=1 * GiB)
    assert pygpukit.get_available_vram() == 7 * GiB
    with pytest.raises(RuntimeError, match="already running on device 'gpu0'"):
        pygpukit.initialize()
    pygpukit.shutdown()
    with pytest.raises(ValueError, match="shut down"):
        pygpukit.get_context_usage(ctx)
    thread = pygpukit.initialize(device_id=1, memory=2 * GiB)
    assert list(thread.runtime.devices) == ["gpu1"]
    assert pygpukit.get_available_vram() == 2 * GiB


def test_initialize_with_any_device() -> None:
    """Any asyncfront device that tracks memory can stand for the GPU."""
    with pytest.raises(ValueError, match="not both"):
        pygpukit.initialize(memory=1 * GiB, device=af.testing.FakeDevice("npu", memory=GiB))
    with pytest.raises(ValueError, match="tracks no memory"):
        pygpukit.initialize(device=af.devices.CpuDevice("host"))
    pygpukit.initialize(device=af.testing.FakeDevice("npu", memory=2 * GiB))
    ctx = pygpukit.create_context("m", max_vram=1 * GiB)
    assert ctx.device.name == "npu" and pygpukit.get_available_vram() == 1 * GiB
    with pygpukit.context_session(ctx) as session:
        assert session.run(sum, [1, 2, 3]) == 6


def test_async_session_is_cancellable_while_waiting_for_memory() -> None:
    """Cancelling a task whose allocation waits leaves nothing charged on the runtime."""
    a = pygpukit.create_context("a", max_vram=8 * GiB, qos=pygpukit.QoSPolicy.BEST_EFFORT)
    b = pygpukit.create_context("b", max_vram=8 * GiB, qos=pygpukit.QoSPolicy.BEST_EFFORT)

    async def main() -> None:
        async with pygpukit.context_session(a) as sa:
            held = await sa.allocate(8 * GiB)
            async with pygpukit.context_session(b) as sb:
                waiting = asyncio.ensure_future(sb.allocate(1 * GiB))
                await asyncio.to_thread(eventually, lambda: b.statistics().waits == 1)
                waiting.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await waiting
            sa.free(held)

    asyncio.run(main())
    eventually(lambda: not b.statistics().live_buffers)
    assert pygpukit.get_context_usage(b).used == 0
    assert pygpukit.get_available_vram() == 8 * GiB


# -- Defects of the original that must not come back -------------------------------


def test_memory_pool_evicts_least_recently_used_after_touch() -> None:
    """Touching and allocating refresh recency: eviction takes the least recently used block."""
    pool = pygpukit.MemoryPool(quota=3 * 4096, enable_eviction=True)
    a, b, c = (pool.allocate(4096) for _ in range(3))
    pool.touch(a)
    pool.allocate(4096)
    assert b.evicted and not a.evicted and not c.evicted
    pool.allocate(4096)  # c is now the least recently used
    assert c.evicted and not a.evicted
    pool.touch(b)  # brings b back, evicting a
    assert not b.evicted and a.evicted and b.offset is not None
    stats = pool.stats()
    assert (stats.evictions, stats.rehydrations, stats.active_blocks) == (3, 1, 3)
    assert stats.allocated_bytes <= pool.quota


def test_memory_pool_cached_blocks_count_toward_quota() -> None:
    """Cached bytes stay within the quota, and are dropped least recently freed first."""
    quota = 4 * 4096
    pool = pygpukit.MemoryPool(quota=quota)
    a, b, c, d = (pool.allocate(4096) for _ in range(4))
    c_offset = c.offset
    pool.free(c)  # freed first: least recently freed
    pool.free(a)
    stats = pool.stats()
    assert (stats.allocated_bytes, stats.cached_bytes) == (2 * 4096, 2 * 4096)
    # 2 KiB fits no cached block's size and there is no fresh space: one cached block
    # must go, and it is c's.
    small = pool.allocate(2048)
    stats = pool.stats()
    assert small.offset == c_offset and stats.cache_drops == 1 and stats.free_blocks == 1
    assert stats.allocated_bytes + stats.cached_bytes <= quota
    with pytest.raises(pygpukit.QuotaExceededError, match="eviction off"):
        pool.allocate(3 * 4096)  # dropping a's cached block still leaves no room
    assert pool.stats().cached_bytes == 0 and pool.stats().allocated_bytes == 2 * 4096 + 2048
    pool.free(b)  # b lies next to the space a left: dropping b alone makes room
    pool.free(d)
    big = pool.allocate(2 * 4096)
    stats = pool.stats()
    assert big.offset == 0 and stats.cache_drops == 3 and stats.free_blocks == 1  # d stays
    assert stats.allocated_bytes + stats.cached_bytes <= quota


def test_two_half_compute_partitions_fit_a_fresh_manager() -> None:
    """Compute shares default to a total of 1.0 and are summed with a tolerance."""
    manager = pygpukit.PartitionManager(pygpukit.PartitionConfig(total_memory=8 * GiB))
    for name in ("inference", "training"):
        manager.create_partition(name, name, pygpukit.PartitionLimits().compute(0.5))
    assert manager.available_compute == 0.0
    thirds = pygpukit.PartitionManager(pygpukit.PartitionConfig(total_memory=8 * GiB))
    for i in range(3):
        thirds.create_partition(f"p{i}", f"third {i}", pygpukit.PartitionLimits().compute(1 / 3))
    with pytest.raises(af.AdmissionError, match="compute"):
        thirds.create_partition("p3", "one too many", pygpukit.PartitionLimits().compute(0.01))


def test_lower_tiers_are_admitted_again_after_guaranteed_release() -> None:
    """Once a Guaranteed task is released, BestEffort and Burstable tasks are admitted again."""
    rust = pygpukit
    evaluator = rust.QosPolicyEvaluator(total_memory=8 * GiB)
    assert evaluator.evaluate(rust.QosTaskMeta.guaranteed("g", "LLM", 8 * GiB)).admitted
    best = rust.QosTaskMeta.best_effort("bg", "Indexer", 1 * GiB)
    burst = rust.QosTaskMeta.burstable("tts", "TTS", 2 * GiB, 1 * GiB)
    refused = evaluator.evaluate(best)
    assert not refused.admitted and "needs 1.0 GiB of memory, 0 B of 8.0 GiB left" in refused.reason
    assert not evaluator.evaluate(burst).admitted
    evaluator.release("g")
    assert evaluator.evaluate(best).admitted and evaluator.evaluate(burst).admitted
    assert evaluator.admitted == ("bg", "tts")


def test_best_effort_is_admitted_beside_guaranteed_while_memory_remains() -> None:
    """A Guaranteed admission leaves BestEffort admitted for as long as spare memory remains."""
    rust = pygpukit
    evaluator = rust.QosPolicyEvaluator(total_memory=8 * GiB, total_bandwidth=1.0)
    g = evaluator.evaluate(rust.QosTaskMeta.guaranteed("g", "LLM", 5 * GiB, bandwidth=0.5))
    assert g.admitted and g.priority == af.QoS.GUARANTEED.priority
    for i in range(3):
        r = evaluator.evaluate(rust.QosTaskMeta.best_effort(f"bg{i}", "Indexer", 1 * GiB))
        assert r.admitted and r.priority == af.QoS.BEST_EFFORT.priority
    assert not evaluator.evaluate(rust.QosTaskMeta.best_effort("bg3", "Indexer", 1 * GiB)).admitted
    evaluator.release("bg0")
    assert evaluator.evaluate(rust.QosTaskMeta.best_effort("bg3", "Indexer", 1 * GiB)).admitted
    # Bandwidth is booked the same way: half is reserved, a task asking 0.6 does not fit.
    hungry = rust.QosTaskMeta.best_effort("scan", "Scanner", 0, bandwidth=0.6)
    assert "bandwidth" in evaluator.evaluate(hungry).reason
    assert evaluator.available_bandwidth == 0.5
