"""Dispatch-path cost with the defaults a user gets, against raw asyncio in the same run.

Two shapes, each for barriers (``fn=None``) and for a real no-op function (``fn=noop``,
no cost), on fake devices with ``open_runtime``'s defaults (trace on, garbage collection
on, the default logger):

* stream: N submissions through one queue, then await the last; baseline: a producer
  puts N items on an ``asyncio.Queue`` and a consumer task takes them.
* hop: N dependent hops between two queues through two semaphores (round i on A waits
  for B's round i-1, round i on B for A's round i); baselines: two tasks handing a chain
  of futures back and forth (a future hand-off), and anyio's memory-object-stream
  ping-pong.

Every case runs once per round, in fresh event loops, for ``--rounds`` rounds; the
figures are medians with the range of the rounds, and the ratios compare medians
(per-round ratio range in brackets). The run rewrites the "dispatch" section of
``docs/benchmarks.md`` unless ``--no-docs`` is given.

With the compiled core installed, the same cases run again in a child process on the
pure-Python core (``ASYNCFRONT_PURE_PYTHON=1``), and the table shows both.

Run: ``python benchmarks/dispatch.py [--n 20000] [--rounds 7]``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import anyio
from _report import (
    Figure,
    interleaved,
    print_samples,
    pure_python_samples,
    ratio,
    table,
    write_section,
)

import asyncfront as af


def noop() -> None:
    """The work of a 'real function' submission: nothing, but a call."""


async def raw_queue_stream(n: int) -> float:
    """A producer puts n items on an asyncio.Queue; a consumer task takes them all."""
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


async def raw_future_hop(n: int) -> float:
    """Two tasks hand a chain of n futures back and forth: hop i wakes the other task."""
    loop = asyncio.get_running_loop()
    start = time.perf_counter()
    futures = [loop.create_future() for _ in range(n + 1)]

    async def side(first: int) -> None:
        for i in range(first, n, 2):
            await futures[i]
            futures[i + 1].set_result(None)

    a = asyncio.ensure_future(side(0))
    b = asyncio.ensure_future(side(1))
    futures[0].set_result(None)
    await a
    await b
    await futures[n]
    return (time.perf_counter() - start) / n * 1e6


async def anyio_stream_hop(n: int) -> float:
    """Two tasks bounce a token through two unbuffered anyio memory object streams."""
    rounds = n // 2
    to_b_send, to_b_receive = anyio.create_memory_object_stream[int](0)
    to_a_send, to_a_receive = anyio.create_memory_object_stream[int](0)

    async def a() -> None:
        for i in range(rounds):
            await to_b_send.send(i)
            await to_a_receive.receive()

    async def b() -> None:
        for _ in range(rounds):
            value = await to_b_receive.receive()
            await to_a_send.send(value)

    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        tg.start_soon(b)
        tg.start_soon(a)
    return (time.perf_counter() - start) / (2 * rounds) * 1e6


async def asyncfront_stream(n: int, fn: Callable[[], None] | None) -> float:
    """n submissions through one queue of a fake device; await the last."""
    async with af.open_runtime([af.devices.FakeDevice("dev")]) as rt:
        q = rt.queue("dev")
        await q.submit()  # the queue task is running
        start = time.perf_counter()
        sub = None
        for _ in range(n):
            sub = q.submit(fn)
        assert sub is not None
        await sub
        return (time.perf_counter() - start) / n * 1e6


async def asyncfront_hop(n: int, fn: Callable[[], None] | None) -> float:
    """n dependent hops between two queues of two fake devices through two semaphores."""
    devices = [af.devices.FakeDevice("a"), af.devices.FakeDevice("b")]
    async with af.open_runtime(devices) as rt:
        qa, qb = rt.queue("a"), rt.queue("b")
        ab, ba = rt.semaphore(name="ab"), rt.semaphore(name="ba")
        rounds = n // 2
        await qa.submit()
        await qb.submit()
        start = time.perf_counter()
        last = None
        for i in range(1, rounds + 1):
            qa.submit(fn, waits=[(ba, i - 1)], signals=[(ab, i)])
            last = qb.submit(fn, waits=[(ab, i)], signals=[(ba, i)])
        assert last is not None
        await last
        return (time.perf_counter() - start) / (2 * rounds) * 1e6


def sample(make: Callable[[], Coroutine[Any, Any, float]]) -> Callable[[], float]:
    """One sample: the coroutine run in a fresh event loop."""
    return lambda: asyncio.run(make())


def measure(n: int, rounds: int) -> dict[str, Figure]:
    """Every case, interleaved, in this process (on whichever core it runs)."""
    cases = [
        ("queue hand-off", sample(lambda: raw_queue_stream(n))),
        ("stream barrier", sample(lambda: asyncfront_stream(n, None))),
        ("stream noop", sample(lambda: asyncfront_stream(n, noop))),
        ("future hand-off", sample(lambda: raw_future_hop(n))),
        ("anyio stream", sample(lambda: anyio_stream_hop(n))),
        ("hop barrier", sample(lambda: asyncfront_hop(n, None))),
        ("hop noop", sample(lambda: asyncfront_hop(n, noop))),
    ]
    return interleaved(cases, rounds)


def measure_pure(n: int, rounds: int) -> dict[str, Figure]:
    """The same cases in a child process on the pure-Python core (ASYNCFRONT_PURE_PYTHON=1)."""
    return pure_python_samples(__file__, "--n", str(n), "--rounds", str(rounds))


ROWS = [
    ("stream", "barriers", "stream barrier", "queue hand-off", "asyncio.Queue hand-off"),
    ("stream", "no-op function", "stream noop", "queue hand-off", "asyncio.Queue hand-off"),
    ("hop", "barriers", "hop barrier", "future hand-off", "future hand-off"),
    ("hop", "no-op function", "hop noop", "future hand-off", "future hand-off"),
    ("hop", "barriers", "hop barrier", "anyio stream", "anyio memory stream"),
    ("hop", "no-op function", "hop noop", "anyio stream", "anyio memory stream"),
]


def report(builds: list[tuple[str, dict[str, Figure]]]) -> str:
    """One table: per shape, each build's figure and its baseline of the same process."""
    header = ["shape", "submissions", "baseline"]
    for label, _ in builds:
        header += [f"{label} µs", "baseline µs", "ratio"]
    rows = []
    for shape, what, ours, base, name in ROWS:
        row = [shape, what, name]
        for _, figures in builds:
            row += [
                figures[ours].format(),
                figures[base].format(),
                ratio(figures[ours], figures[base]),
            ]
        rows.append(row)
    return table(header, rows, align="lll" + "rrr" * len(builds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--n", type=int, default=20_000, help="items or hops per sample")
    parser.add_argument("--rounds", type=int, default=7, help="samples per case (median kept)")
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite docs/benchmarks.md")
    parser.add_argument(
        "--json", action="store_true", help="print this process's samples as JSON (no table)"
    )
    args = parser.parse_args()
    if args.n < 2 or args.rounds < 1:
        parser.error("--n must be >= 2 and --rounds >= 1")
    n = args.n
    if args.json:
        print_samples(measure(n, args.rounds))
        return
    core = af.core_build()
    builds = [("compiled" if core == "compiled" else "pure Python", measure(n, args.rounds))]
    if core == "compiled":
        builds.append(("pure Python", measure_pure(n, args.rounds)))
    text = report(builds)
    print(f"core: {core}; n={n}, {args.rounds} interleaved rounds per build")
    print("medians (min-max) in µs per item or hop; ratios against the same process's baseline")
    print(text)
    if not args.no_docs:
        which = (
            "the compiled core (the default install) and, in a child process, the pure-Python "
            "core (`ASYNCFRONT_PURE_PYTHON=1`), each against raw asyncio measured in its own "
            "process"
            if core == "compiled"
            else f"the pure-Python core ({core}) against raw asyncio in the same process"
        )
        body = (
            "What one submission costs on the hot path (submit → wait → run → signal) with the "
            "defaults a user gets: `open_runtime` with its trace on, garbage collection on, "
            f"fake devices; {which}. Each case runs once per "
            f"round in a fresh event loop, {args.rounds} rounds of {n:,} items or hops; "
            "figures are medians with the range of the rounds in brackets, ratios compare "
            "medians (the range of the per-round ratios in brackets).\n\n"
            "- **stream**: submissions through one queue, then await the last; baseline: an "
            "`asyncio.Queue` hand-off from a producer to a consumer task.\n"
            "- **hop**: dependent hops between two queues on two devices through two "
            "semaphores; baselines: a future hand-off chain between two tasks, and anyio's "
            "unbuffered memory-object-stream ping-pong.\n\n" + text
        )
        write_section("dispatch", "Dispatch path (`benchmarks/dispatch.py`)", body)


if __name__ == "__main__":
    main()
