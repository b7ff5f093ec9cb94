"""asyncfront across two nodes against Ray itself, on a local two-node Ray cluster, same run.

(a) hop: a dependent cross-node round trip. Node A's work signals ``ping`` k; node B's
    work waits for it and signals ``pong`` k; node A's next work waits for that. Every
    submission is queued up front, so the round trips run node to node without the
    driver. The work is a barrier (``fn=None``), which no device runs: the figure is the
    cluster layer's own. Figure: milliseconds per round trip (A -> B -> A).
    Baselines: a Ray actor call round trip (the driver awaits ``actor.ping.remote()``
    on an actor of node B, one call at a time), and a chain of Ray remote functions
    alternating between the nodes (each task takes the previous one's result).
(b) throughput: N independent submissions of a no-op function to a queue of node B,
    counted to completion (every result back at the driver), on two devices of the
    node: its ``CpuDevice`` (the default: each submission runs in a worker thread) and a
    zero-cost ``FakeDevice`` (work runs inline on the node's loop), which shows the
    cluster layer's own cost. Baseline: N independent Ray tasks of the same function,
    awaited together.

The latencies (a) are measured first, then the rates (b): thousands of Ray tasks leave
Ray starting and stopping worker processes for seconds after them. Within each phase
every case runs once per round, interleaved, for ``--repeat`` rounds after one uncounted
warm-up round, with ``--settle`` seconds of rest before each case (so that no case pays
for what the previous one left running); figures are medians with the min-max range of
the rounds. The defaults a user gets:
``open_cluster(nodes=2)`` (its devices plus the fake one), Ray's defaults otherwise. The
run rewrites the "cluster" section of ``docs/benchmarks.md`` unless ``--no-docs``.

Run: ``python benchmarks/cluster.py [--hops 100] [--n 2000] [--repeat 3]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import Figure, ratio, table, write_section

from asyncfront.cluster import Cluster, open_cluster


def _noop() -> None:
    return None


def _devices(index: int) -> list[Any]:
    """Each node's devices: the default CpuDevice, and a zero-cost fake device."""
    from asyncfront.devices.cpu import CpuDevice
    from asyncfront.testing import FakeDevice

    return [CpuDevice("cpu"), FakeDevice("fake", kind="cpu")]


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


async def asyncfront_throughput(cluster: Cluster, device: str, n: int) -> float:
    """Independent submissions per second to node B's ``device``, every result back."""
    queue = cluster.nodes[1].queue(device)
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


def _verdicts(f: dict[str, Figure]) -> str:
    """Whether this run met the targets, by the medians and round by round."""

    def rounds(ok: list[bool]) -> str:
        return f"{sum(ok)} of {len(ok)} rounds"

    hop_ok = [h <= a for h, a in zip(f["hop"].samples, f["actor"].samples, strict=True)]
    rate_ok = {
        device: [r >= 10 * t for r, t in zip(f[device].samples, f["tasks"].samples, strict=True)]
        for device in ("cpu", "fake")
    }

    def met(ok: bool) -> str:
        return "met" if ok else "not met"

    return (
        f"Targets in this run: the hop at or below one Ray actor round trip is "
        f"{met(f['hop'].median <= f['actor'].median)} by the medians (in "
        f"{rounds(hop_ok)}); submissions at 10x Ray's task rate or more are "
        f"{met(f['cpu'].median >= 10 * f['tasks'].median)} on the CpuDevice by the medians "
        f"(in {rounds(rate_ok['cpu'])}) and "
        f"{met(f['fake'].median >= 10 * f['tasks'].median)} on the zero-cost device (in "
        f"{rounds(rate_ok['fake'])})."
    )


def _load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.1f} / {five:.1f} / {fifteen:.1f}"


async def main(args: argparse.Namespace) -> None:
    import ray

    hops, n, repeat = args.hops, args.n, args.repeat
    load_start = _load()
    started = time.strftime("%H:%M", time.gmtime())
    async with open_cluster(nodes=2, devices=_devices) as cluster:
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
        ray_n = min(n, 2000)
        cases: list[tuple[str, Callable[[int], Awaitable[float]]]] = [
            ("hop", lambda r: asyncfront_hop(cluster, hops, r)),
            ("actor", lambda r: ray_actor_round_trip(actor, hops)),
            ("chain", lambda r: ray_task_chain(step_a, step_b, hops)),
            ("cpu", lambda r: asyncfront_throughput(cluster, "cpu", n)),
            ("fake", lambda r: asyncfront_throughput(cluster, "fake", n)),
            ("tasks", lambda r: ray_throughput(task, ray_n)),
        ]
        samples: dict[str, list[float]] = {name: [] for name, _ in cases}
        # Latencies first, then rates: thousands of Ray tasks leave Ray starting and
        # stopping worker processes for seconds, which no latency should pay for.
        for phase in (cases[:3], cases[3:]):
            for r in range(-1, repeat):  # round -1 warms every case up and is not counted
                for name, run in phase:
                    # Let what the previous case left running (results on their way,
                    # Ray's task workers) settle, so that no case pays for another.
                    await asyncio.sleep(args.settle)
                    value = await run(r + 1)
                    if r >= 0:
                        samples[name].append(value)
        ray.kill(actor)
    load_end = _load()
    ended = time.strftime("%H:%M", time.gmtime())
    f = {name: Figure(tuple(values)) for name, values in samples.items()}
    ratios = {  # a time over its baseline (below 1 is better), a rate over its (above)
        "hop_actor": ratio(f["hop"], f["actor"]),
        "hop_chain": ratio(f["hop"], f["chain"]),
        "cpu_tasks": ratio(f["cpu"], f["tasks"]),
        "fake_tasks": ratio(f["fake"], f["tasks"]),
    }
    rows = [
        ["asyncfront dependent hop, ms per round trip A → B → A", f["hop"].format(2), ""],
        ["Ray actor round trip, ms", f["actor"].format(2), ""],
        ["Ray remote-function chain, ms per task", f["chain"].format(2), ""],
        ["hop / Ray actor round trip", ratios["hop_actor"], "target ≤ 1"],
        ["hop / Ray task chain", ratios["hop_chain"], ""],
        ["asyncfront submissions/s, node's CpuDevice (default)", f["cpu"].format(0), ""],
        ["asyncfront submissions/s, zero-cost FakeDevice", f["fake"].format(0), ""],
        [f"Ray tasks/s ({ray_n} tasks)", f["tasks"].format(0), ""],
        ["submissions (CpuDevice) / Ray tasks", ratios["cpu_tasks"], "target ≥ 10x"],
        ["submissions (FakeDevice) / Ray tasks", ratios["fake_tasks"], "target ≥ 10x"],
    ]
    verdicts = _verdicts(f)
    print(f"hops={hops} n={n} repeat={repeat}; median (min-max)")
    for label, value, note in rows:
        print(f"  {label:<58} {value:>24} {note}")
    print(f"load average (1/5/15 min): {load_start} at {started} UTC, {load_end} at {ended} UTC")
    print(verdicts)
    if args.no_docs:
        return
    body = (
        "On a local two-node Ray cluster (`open_cluster(nodes=2)`: both nodes on this "
        "machine, 127.0.0.1), against Ray itself in the same run; every case once per "
        "round, in two phases (the three latencies, then the three rates), "
        f"{repeat} interleaved rounds each after one uncounted warm-up round, "
        f"{args.settle:g} s of rest before each case, medians with the min-max range of the rounds "
        "(ratios: of the medians, per-round range in brackets). The hop is a chain of "
        "barriers queued up front that runs node to node through the semaphore pushes "
        "(direct TCP streams between the node runtimes); the driver only waits for the "
        "last signal. Independent submissions are counted to completion, every result "
        "back at the driver; on the node's `CpuDevice` each no-op runs in a worker thread "
        "(one thread hand-off per submission, in FIFO order), on the zero-cost "
        "`FakeDevice` inline on the node's loop, which isolates the cluster layer's own "
        "cost.\n\n" + table(["figure", "median (min-max)", "note"], rows, align="lrl") + "\n\n"
        f"Load average (1 / 5 / 15 min) on the machine: {load_start} at the start "
        f"({started} UTC), {load_end} at the end ({ended} UTC). On a shared machine the "
        "figures swing by several times within a run: compare only figures of one run. "
        "NCCL links (between GPUs) cannot run here: at most one GPU is lent to these "
        "machines, so only gloo links on CPU tensors are measured and tested. The "
        "single-process dispatch path runs no cluster code (`benchmarks/dispatch.py`)."
    )
    write_section("cluster", "Across two nodes against Ray (`benchmarks/cluster.py`)", body)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hops", type=int, default=100)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--settle", type=float, default=1.0, help="seconds of rest per case")
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite docs")
    asyncio.run(main(parser.parse_args()))
