"""Dispatch-path cost: asyncfront queues and semaphores against raw asyncio, same run.

(a) stream: N no-op submissions through one queue, against an ``asyncio.Queue``
    hand-off of N items from a producer to a consumer task.
(b) ping-pong: N dependent round trips between two queues through two semaphores,
    against two tasks bouncing a pair of ``asyncio.Event`` objects.

Run: ``python benchmarks/dispatch.py [--n 20000] [--repeat 5] [--trace]``. Each figure
is the best of ``--repeat`` runs, in microseconds per item (stream) or per hop
(ping-pong). The trace is off unless ``--trace`` records every submission (the default
``open_runtime`` does).
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import time
from collections.abc import Awaitable, Callable

import asyncfront as af

TRACE = False  # --trace: record every submission, as open_runtime's default does


async def raw_queue_stream(n: int) -> float:
    """Producer puts n items on an asyncio.Queue; a consumer task takes them all."""
    queue: asyncio.Queue[int | None] = asyncio.Queue()

    async def consumer() -> None:
        while await queue.get() is not None:
            pass

    task = asyncio.create_task(consumer())
    await asyncio.sleep(0)
    start = time.perf_counter()
    for i in range(n):
        queue.put_nowait(i)
    queue.put_nowait(None)
    await task
    return (time.perf_counter() - start) / n * 1e6


async def asyncfront_stream(n: int) -> float:
    """n no-op submissions through one queue; await the last."""
    async with af.open_runtime([af.devices.FakeDevice("dev")], trace=TRACE) as rt:
        q = rt.queue("dev")
        await q.submit()  # the queue task is running
        start = time.perf_counter()
        sub = None
        for _ in range(n):
            sub = q.submit()
        assert sub is not None
        await sub
        return (time.perf_counter() - start) / n * 1e6


async def raw_event_pingpong(n: int) -> float:
    """Two tasks bounce n hops through a pair of asyncio.Event objects."""
    ping, pong = asyncio.Event(), asyncio.Event()
    rounds = n // 2

    async def a() -> None:
        for _ in range(rounds):
            ping.set()
            await pong.wait()
            pong.clear()

    async def b() -> None:
        for _ in range(rounds):
            await ping.wait()
            ping.clear()
            pong.set()

    start = time.perf_counter()
    await asyncio.gather(a(), b())
    return (time.perf_counter() - start) / (2 * rounds) * 1e6


async def asyncfront_pingpong(n: int) -> float:
    """Two queues; round i on A waits for B's round i-1, round i on B waits for A's round i."""
    devices = [af.devices.FakeDevice("a"), af.devices.FakeDevice("b")]
    async with af.open_runtime(devices, trace=TRACE) as rt:
        qa, qb = rt.queue("a"), rt.queue("b")
        ab, ba = af.TimelineSemaphore(name="ab"), af.TimelineSemaphore(name="ba")
        rounds = n // 2
        await asyncio.sleep(0)
        start = time.perf_counter()
        last = None
        for i in range(1, rounds + 1):
            qa.submit(waits=[(ba, i - 1)], signals=[(ab, i)])
            last = qb.submit(waits=[(ab, i)], signals=[(ba, i)])
        assert last is not None
        await last
        return (time.perf_counter() - start) / (2 * rounds) * 1e6


def best(fn: Callable[[int], Awaitable[float]], n: int, repeat: int) -> float:
    """The smallest per-item time of ``repeat`` fresh-loop runs."""
    return min(asyncio.run(fn(n)) for _ in range(repeat))  # type: ignore[arg-type]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--n", type=int, default=20_000, help="items or hops per run")
    parser.add_argument("--repeat", type=int, default=5, help="runs per figure (best kept)")
    parser.add_argument("--trace", action="store_true", help="record the trace (the default)")
    args = parser.parse_args()
    global TRACE
    TRACE = args.trace
    rows = [
        ("stream", best(raw_queue_stream, args.n, args.repeat),
         best(asyncfront_stream, args.n, args.repeat), "asyncio.Queue hand-off"),
        ("ping-pong", best(raw_event_pingpong, args.n, args.repeat),
         best(asyncfront_pingpong, args.n, args.repeat), "asyncio.Event ping-pong"),
    ]  # fmt: skip
    print(f"python {platform.python_version()} on {platform.machine()}, n={args.n}, "
          f"best of {args.repeat}, trace {'on' if TRACE else 'off'}")  # fmt: skip
    print(f"{'case':<10} {'baseline':<24} {'raw µs':>8} {'asyncfront µs':>14} {'ratio':>6}")
    for case, raw, ours, baseline in rows:
        print(f"{case:<10} {baseline:<24} {raw:>8.2f} {ours:>14.2f} {ours / raw:>5.1f}x")


if __name__ == "__main__":
    main()
