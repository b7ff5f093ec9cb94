"""asyncfront beside its peers on two shapes, in one run: independent tasks and a dependent chain.

* independent: N no-op tasks, counted to completion;
* chain: N dependent no-op tasks, each started only when the previous one finished,
  alternating between two executors where the peer has them (two queues, two tasks,
  two threads), so every link is a hand-off.

Peers (each skipped with a note when its package is missing; install them with
``pip install -e '.[bench]'``): raw asyncio, anyio, trio, Dask's threaded scheduler and
Dask distributed in-process, Ray (local tasks and an actor round trip) and IREE's
runtime semaphore; asyncfront runs on fake devices and on a ``CpuDevice(workers=2)``
with the defaults a user gets (trace on, GC on). Every case runs once per round,
``--rounds`` rounds; figures are medians (min-max) in µs per task. The run rewrites
the "peers" section of ``docs/benchmarks.md`` unless ``--no-docs`` is given.

With the compiled core installed, the asyncfront cases run again in a child process on
the pure-Python core (``ASYNCFRONT_PURE_PYTHON=1``), beside raw asyncio measured in that
child, and the table shows those rows and how the peers compare with them too.

Run: ``python benchmarks/peers.py [--rounds 5] [--scale 1.0]``.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import math
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import Figure, interleaved, print_samples, pure_python_samples, table, write_section
from dispatch import (
    anyio_stream_hop,
    asyncfront_hop,
    asyncfront_stream,
    raw_future_hop,
    raw_queue_stream,
)

import asyncfront as af


def noop(*_: Any) -> None:
    """A task that does nothing but be called."""


def has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


# -- asyncio, anyio, trio -------------------------------------------------------------


async def anyio_stream(n: int) -> float:
    """A producer sends n items through a buffered anyio memory stream to a consumer task."""
    import anyio

    send, receive = anyio.create_memory_object_stream[int | None](math.inf)

    async def consumer() -> None:
        while await receive.receive() is not None:
            pass

    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        tg.start_soon(consumer)
        for i in range(n):
            send.send_nowait(i)
        send.send_nowait(None)
    return (time.perf_counter() - start) / n * 1e6


def trio_stream(n: int) -> float:
    """A producer sends n items through a buffered trio memory channel to a consumer task."""
    import trio

    async def main() -> float:
        send, receive = trio.open_memory_channel[int | None](math.inf)

        async def consumer() -> None:
            while await receive.receive() is not None:
                pass

        start = time.perf_counter()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(consumer)
            for i in range(n):
                send.send_nowait(i)
            send.send_nowait(None)
        return (time.perf_counter() - start) / n * 1e6

    return float(trio.run(main))


def trio_hop(n: int) -> float:
    """Two trio tasks bounce a token through two unbuffered memory channels."""
    import trio

    async def main() -> float:
        rounds = n // 2
        to_b_send, to_b_receive = trio.open_memory_channel[int](0)
        to_a_send, to_a_receive = trio.open_memory_channel[int](0)

        async def a() -> None:
            for i in range(rounds):
                await to_b_send.send(i)
                await to_a_receive.receive()

        async def b() -> None:
            for _ in range(rounds):
                await to_a_send.send(await to_b_receive.receive())

        start = time.perf_counter()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(b)
            nursery.start_soon(a)
        return (time.perf_counter() - start) / (2 * rounds) * 1e6

    return float(trio.run(main))


# -- asyncfront on a CpuDevice ---------------------------------------------------------


async def cpu_independent(n: int) -> float:
    """n independent no-op submissions over two queues of one CpuDevice(workers=2)."""
    async with af.open_runtime([af.devices.CpuDevice("cpu", workers=2)]) as rt:
        queues = (rt.queue("cpu"), rt.queue("cpu"))
        await queues[0].submit(noop)
        await queues[1].submit(noop)
        start = time.perf_counter()
        subs = [queues[i % 2].submit(noop) for i in range(n)]
        for sub in subs[-2:]:
            await sub
        return (time.perf_counter() - start) / n * 1e6


async def cpu_chain(n: int) -> float:
    """n dependent no-op submissions alternating between two queues of one CpuDevice."""
    async with af.open_runtime([af.devices.CpuDevice("cpu", workers=2)]) as rt:
        qa, qb = rt.queue("cpu"), rt.queue("cpu")
        ab, ba = rt.semaphore(name="ab"), rt.semaphore(name="ba")
        await qa.submit(noop)
        await qb.submit(noop)
        rounds = n // 2
        start = time.perf_counter()
        last = None
        for i in range(1, rounds + 1):
            qa.submit(noop, waits=[(ba, i - 1)], signals=[(ab, i)])
            last = qb.submit(noop, waits=[(ab, i)], signals=[(ba, i)])
        assert last is not None
        await last
        return (time.perf_counter() - start) / (2 * rounds) * 1e6


# -- Dask ------------------------------------------------------------------------------


def dask_independent(n: int, scheduler: Any) -> float:
    import dask

    tasks = [dask.delayed(noop)(i) for i in range(n)]
    start = time.perf_counter()
    dask.compute(*tasks, scheduler=scheduler, num_workers=2)
    return (time.perf_counter() - start) / n * 1e6


def dask_chain(n: int, scheduler: Any) -> float:
    import dask

    link = dask.delayed(noop)(0)
    for _ in range(n - 1):
        link = dask.delayed(noop)(link)
    start = time.perf_counter()
    dask.compute(link, scheduler=scheduler, num_workers=2)
    return (time.perf_counter() - start) / n * 1e6


# -- Ray -------------------------------------------------------------------------------


class RayPeer:
    """Ray on this machine: local tasks and an actor, started once for the run."""

    def __init__(self) -> None:
        import ray

        self.ray = ray
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
            object_store_memory=128 << 20,
        )
        self.task = ray.remote(noop)

        @ray.remote
        class Echo:
            def ping(self, *_: Any) -> None:
                return None

        self.actor = Echo.remote()
        ray.get([self.task.remote() for _ in range(10)])
        ray.get(self.actor.ping.remote())

    def independent(self, n: int) -> float:
        start = time.perf_counter()
        self.ray.get([self.task.remote(i) for i in range(n)])
        return (time.perf_counter() - start) / n * 1e6

    def chain(self, n: int) -> float:
        start = time.perf_counter()
        link = self.task.remote(0)
        for _ in range(n - 1):
            link = self.task.remote(link)
        self.ray.get(link)
        return (time.perf_counter() - start) / n * 1e6

    def actor_round_trip(self, n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            self.ray.get(self.actor.ping.remote())
        return (time.perf_counter() - start) / n * 1e6

    def close(self) -> None:
        self.ray.shutdown()


# -- IREE ------------------------------------------------------------------------------


def iree_hop(n: int) -> float:
    """Two threads hand a value back and forth through one IREE HAL semaphore."""
    import iree.runtime as iree

    device = iree.get_device("local-sync")
    sem = device.create_semaphore(0)

    def side(first: int) -> None:
        for value in range(first, n, 2):
            sem.wait(value)
            sem.signal(value + 1)

    threads = [threading.Thread(target=side, args=(k,)) for k in (0, 1)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return (time.perf_counter() - start) / n * 1e6


# -- the run ---------------------------------------------------------------------------


# the rows of the pure-Python child's cases, by the peer names they had there
PURE_ROWS = {
    "asyncio": "asyncio (pure-Python process)",
    "asyncfront fake": "asyncfront fake, pure Python",
    "asyncfront CpuDevice": "asyncfront CpuDevice, pure Python",
}


def measure_pure(rounds: int, scale: float) -> dict[str, Figure]:
    """asyncio and asyncfront's cases in a child process on the pure-Python core."""
    return pure_python_samples(__file__, "--rounds", str(rounds), "--scale", str(scale))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=5, help="samples per case (median kept)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every case's task count")
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite docs/benchmarks.md")
    parser.add_argument(
        "--only",
        action="append",
        metavar="PEER",
        help="run only the peers whose name contains PEER (repeatable; implies --no-docs)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="run only asyncio and asyncfront, print the samples as JSON (no table)",
    )
    args = parser.parse_args()
    if args.only:
        args.no_docs = True
    if args.rounds < 1 or args.scale <= 0:
        parser.error("--rounds must be >= 1 and --scale > 0")

    def count(n: int) -> int:
        return max(10, int(n * args.scale))

    fast, cpu, slow, slowest = count(20_000), count(4_000), count(2_000), count(200)

    def run(coro: Callable[[int], Any], n: int) -> Callable[[], float]:
        return lambda: asyncio.run(coro(n))

    # (peer, shape) -> sample
    cases: list[tuple[str, Callable[[], float]]] = [
        ("asyncio|independent", run(raw_queue_stream, fast)),
        ("asyncio|chain", run(raw_future_hop, fast)),
        ("asyncfront fake|independent", run(lambda k: asyncfront_stream(k, noop), fast)),
        ("asyncfront fake|chain", run(lambda k: asyncfront_hop(k, noop), fast)),
        ("asyncfront CpuDevice|independent", run(cpu_independent, cpu)),
        ("asyncfront CpuDevice|chain", run(cpu_chain, cpu)),
    ]
    missing: list[str] = []

    def wanted(peer: str) -> bool:
        return not args.only or any(w.lower() in peer.lower() for w in args.only)

    if args.json:
        print_samples(interleaved(cases, args.rounds))
        return

    if has("anyio"):
        cases += [
            ("anyio|independent", run(anyio_stream, fast)),
            ("anyio|chain", run(anyio_stream_hop, fast)),
        ]
    else:
        missing.append("anyio")
    if has("trio"):
        cases += [("trio|independent", lambda: trio_stream(fast))]
        cases += [("trio|chain", lambda: trio_hop(fast))]
    else:
        missing.append("trio")
    if has("dask"):
        cases += [
            ("Dask threaded|independent", lambda: dask_independent(slow, "threads")),
            ("Dask threaded|chain", lambda: dask_chain(slow, "threads")),
        ]
    else:
        missing.append("dask")
    client = None
    if not has("distributed"):
        missing.append("distributed")
    elif wanted("Dask distributed in-process"):
        from distributed import Client

        client = Client(processes=False, n_workers=1, threads_per_worker=2, dashboard_address=None)
        cases += [
            ("Dask distributed in-process|independent", lambda: dask_independent(slowest, client)),
            ("Dask distributed in-process|chain", lambda: dask_chain(slowest, client)),
        ]
    ray_peer = None
    if not has("ray"):
        missing.append("ray")
    elif wanted("Ray"):
        ray_peer = RayPeer()
        cases += [
            ("Ray tasks|independent", lambda: ray_peer.independent(slow)),  # type: ignore[union-attr]
            ("Ray tasks|chain", lambda: ray_peer.chain(slowest)),  # type: ignore[union-attr]
            ("Ray actor round trip|chain", lambda: ray_peer.actor_round_trip(slowest)),  # type: ignore[union-attr]
        ]
    if has("iree.runtime"):
        cases += [("IREE HAL semaphore, two threads|chain", lambda: iree_hop(slow))]
    else:
        missing.append("iree-base-runtime")
    cases = [case for case in cases if wanted(case[0].split("|")[0])]
    load_before = os.getloadavg()[0]
    try:
        figures = interleaved(cases, args.rounds)
    finally:
        if client is not None:
            client.close()
        if ray_peer is not None:
            ray_peer.close()

    pure: dict[str, Figure] = {}
    if af.core_build() == "compiled" and wanted("asyncfront"):
        pure = measure_pure(args.rounds, args.scale)
        figures.update(
            (f"{PURE_ROWS[key.split('|')[0]]}|{key.split('|')[1]}", figure)
            for key, figure in pure.items()
        )

    peers: dict[str, dict[str, Figure]] = {}
    for key, figure in figures.items():
        peer, shape = key.split("|")
        peers.setdefault(peer, {})[shape] = figure
    cpu_dev = peers.get("asyncfront CpuDevice", {})
    cpu_pure = peers.get(PURE_ROWS["asyncfront CpuDevice"], {})

    def cell(peer: dict[str, Figure], shape: str) -> str:
        figure = peer.get(shape)
        return figure.format(1) if figure is not None else "—"

    def versus(ours: Figure | None, shape: str, peer: dict[str, Figure]) -> str:
        figure = peer.get(shape)
        if figure is None or ours is None:
            return "—"
        return f"{figure.median / ours.median:.1f}x"

    rows = []
    for name, peer in peers.items():
        row = [
            name,
            cell(peer, "independent"),
            cell(peer, "chain"),
            versus(cpu_dev.get("independent"), "independent", peer),
            versus(cpu_dev.get("chain"), "chain", peer),
        ]
        if pure:
            row += [
                versus(cpu_pure.get("independent"), "independent", peer),
                versus(cpu_pure.get("chain"), "chain", peer),
            ]
        rows.append(row)
    header = [
        "peer",
        "independent µs/task",
        "chain µs/task",
        "vs CpuDevice, independent",
        "vs CpuDevice, chain",
    ]
    if pure:
        header += ["vs pure-Python CpuDevice, independent", "vs pure-Python CpuDevice, chain"]
    text = table(header, rows)
    load = (
        f"Load average (1 minute, {os.cpu_count()} cores) while measuring: "
        f"{load_before:.2f} at the start, {os.getloadavg()[0]:.2f} at the end."
    )
    print(f"{args.rounds} interleaved rounds; medians (min-max) in µs per task")
    print(load)
    print(text)
    if missing:
        print("not installed, skipped:", ", ".join(missing))
    if not args.no_docs:
        body = (
            "asyncfront beside its peers on two shapes, in one process and one run "
            "(`pip install -e '.[bench]'` installs the peers). **independent**: no-op tasks "
            "counted to completion; **chain**: dependent no-op tasks, each starting when the "
            "previous one finished, alternating between two executors where the peer has "
            "them. asyncfront runs with the defaults (trace on, GC on) on fake devices and on "
            "one `CpuDevice(workers=2)` with two queues. Figures are medians (min-max) in µs "
            "per task over the interleaved rounds; the last two columns give how many times "
            "the CpuDevice's median the peer's median is (above 1x: asyncfront is faster). "
            f"Task counts: {fast:,} for asyncio/anyio/trio/fake devices, {cpu:,} on the "
            f"CpuDevice, {slow:,} for Dask threaded, Ray independent tasks and IREE, "
            f"{slowest:,} for Dask distributed and Ray chains and actor round trips."
            + (f" Not installed, skipped: {', '.join(missing)}." if missing else "")
            + (
                " The rows marked *pure Python* ran after the others, in a child process on "
                "the pure-Python core (`ASYNCFRONT_PURE_PYTHON=1`), with raw asyncio measured "
                "again in that process as their baseline; the last two columns compare every "
                "peer with that CpuDevice."
                if pure
                else ""
            )
            + "\n\n"
            + text
            + "\n\nThe Ray actor round trip is a sequence of `ray.get(actor.ping.remote())`; "
            "IREE's HAL semaphore has no asyncio bridge in its Python package, so its chain "
            "is two threads waiting on and signalling one semaphore.\n\n" + load
        )
        write_section("peers", "Peers (`benchmarks/peers.py`)", body)


if __name__ == "__main__":
    main()
