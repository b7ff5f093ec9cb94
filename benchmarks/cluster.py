"""asyncfront across two nodes against Ray itself, on a local two-node Ray cluster, same run.

(a) hop: a dependent cross-node round trip. Node A's work signals ``ping`` k; node B's
    work waits for it and signals ``pong`` k; node A's next work waits for that. Every
    submission is queued up front, so the round trips run node to node without the
    driver. Figure: milliseconds per round trip (A -> B -> A).
    Baselines: a Ray actor call round trip (the driver awaits ``actor.ping.remote()``
    on an actor of node B, one call at a time), and a chain of Ray remote functions
    alternating between the nodes (each task takes the previous one's result).
(b) throughput: N independent submissions of a no-op function to a node's default CPU
    queue, counted to completion (every result back at the driver). Baseline: N
    independent Ray tasks of the same function, awaited together.

Run: ``python benchmarks/cluster.py [--hops 200] [--n 5000] [--repeat 5]``. Each figure is
the median of ``--repeat`` interleaved runs, with the min-max spread. The defaults a user
gets: ``open_cluster(nodes=2)`` (one CpuDevice per node), Ray's defaults otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import subprocess
import time
from typing import Any

from asyncfront.cluster import Cluster, open_cluster


def _noop() -> None:
    return None


async def asyncfront_hop(cluster: Cluster, hops: int, round_: int) -> float:
    """Milliseconds per dependent round trip A -> B -> A, queued up front."""
    a, b = cluster.nodes
    ping = cluster.semaphore(f"ping{round_}", owner=a)
    pong = cluster.semaphore(f"pong{round_}", owner=b)
    qa, qb = a.queue("cpu"), b.queue("cpu")
    await asyncio.gather(qa.submit(None), qb.submit(None))  # both queues exist and run
    start = time.perf_counter()
    for k in range(1, hops + 1):
        qb.submit(None, waits=[(ping, k)], signals=[(pong, k)])
        qa.submit(None, waits=[(pong, k - 1)] if k > 1 else [], signals=[(ping, k)])
    await pong.wait(hops)
    return (time.perf_counter() - start) / hops * 1e3


async def ray_actor_round_trip(actor: Any, hops: int) -> float:
    """Milliseconds per Ray actor call, awaited one at a time."""
    await actor.ping.remote()
    start = time.perf_counter()
    for _ in range(hops):
        await actor.ping.remote()
    return (time.perf_counter() - start) / hops * 1e3


async def ray_task_chain(step_a: Any, step_b: Any, hops: int) -> float:
    """Milliseconds per task in a chain of Ray remote functions alternating nodes."""
    ref = step_a.remote(0)
    await ref
    start = time.perf_counter()
    for k in range(hops):
        ref = (step_b if k % 2 == 0 else step_a).remote(ref)
    await ref
    return (time.perf_counter() - start) / hops * 1e3


async def asyncfront_throughput(cluster: Cluster, n: int) -> float:
    """Independent submissions per second, every result back at the driver."""
    queue = cluster.nodes[1].queue("cpu")
    await queue.submit(_noop)
    start = time.perf_counter()
    subs = [queue.submit(_noop) for _ in range(n)]
    for sub in subs:
        await sub
    return n / (time.perf_counter() - start)


async def ray_throughput(task: Any, n: int) -> float:
    """Independent Ray tasks per second, awaited together."""
    await task.remote()
    start = time.perf_counter()
    await asyncio.gather(*(task.remote() for _ in range(n)))
    return n / (time.perf_counter() - start)


def _commit() -> str:
    out = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    )
    return out.stdout.strip()


def _summary(values: list[float]) -> str:
    return f"{statistics.median(values):9.3f} (min {min(values):.3f}, max {max(values):.3f})"


async def main(hops: int, n: int, repeat: int) -> None:
    import ray

    async with open_cluster(nodes=2) as cluster:
        b_resource = {"asyncfront_node_1": 0.001}
        a_resource = {"asyncfront_node_0": 0.001}

        @ray.remote(num_cpus=0)
        class Echo:
            async def ping(self) -> int:
                return 1

        @ray.remote(num_cpus=0)
        def step(x: int) -> int:
            return x + 1

        @ray.remote(num_cpus=0)
        def noop() -> None:
            return None

        actor = Echo.options(resources=b_resource).remote()
        step_a = step.options(resources=a_resource)
        step_b = step.options(resources=b_resource)
        task = noop.options(resources=b_resource)
        figures: dict[str, list[float]] = {}
        for r in range(repeat):
            for label, run in (
                ("asyncfront hop (ms/round trip)", lambda r=r: asyncfront_hop(cluster, hops, r)),
                ("Ray actor round trip (ms)", lambda: ray_actor_round_trip(actor, hops)),
                ("Ray task chain (ms/task)", lambda: ray_task_chain(step_a, step_b, hops)),
                ("asyncfront submissions/s", lambda: asyncfront_throughput(cluster, n)),
                ("Ray tasks/s", lambda: ray_throughput(task, min(n, 2000))),
            ):
                figures.setdefault(label, []).append(await run())
        ray.kill(actor)
    commit = _commit()
    print(
        f"machine: {platform.machine()} {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}, Ray {ray.__version__}, commit {commit or '?'}"
    )
    print(f"hops={hops} n={n} repeat={repeat}; median (min, max)")
    for label, values in figures.items():
        print(f"  {label:<32} {_summary(values)}")
    hop = statistics.median(figures["asyncfront hop (ms/round trip)"])
    actor_rt = statistics.median(figures["Ray actor round trip (ms)"])
    rate = statistics.median(figures["asyncfront submissions/s"])
    ray_rate = statistics.median(figures["Ray tasks/s"])
    print(
        f"  hop / actor round trip: {hop / actor_rt:.2f}; submissions / Ray tasks: "
        f"{rate / ray_rate:.1f}x"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hops", type=int, default=200)
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    asyncio.run(main(args.hops, args.n, args.repeat))
