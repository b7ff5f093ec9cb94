"""Virtual-time simulation cost: per submission, against raw hops, by queue count and frontier size.

The workload: Q queues spread over D ``FakeDevice``s take submissions round robin; each
waits for the latest submission of the queue 7 places ahead, so causal history spreads
to every queue and, after warm-up, every frontier holds min(Q, capacity) axes. Work
costs 1 µs of virtual time, the runtime keeps its defaults (trace on), and at most
4,096 submissions are outstanding (the oldest is awaited before more are queued), as a
long-running simulation would keep them.

Measured in one run, every case once per round:

* the headline workload, 64 queues on 16 devices (64-axis frontiers), in µs of wall time
  per submission and in raw hops (a future hand-off between two tasks, measured in the
  same round) per submission;
* flatness: 2 queues on 2 devices and 128 queues on 32 devices against it;
* frontier size: the headline 64 queues on 16 devices split into independent groups
  of 8, 16, 32 or 64 queues, each waiting only within its group, so every frontier
  carries exactly that many axes with nothing truncated (the capacity stays 64) and the
  queue and device counts stay those of the headline; the slope of a least-squares
  line through the medians is the cost per axis;
* memory: the resident set (RSS) after every 100k submissions of one long run of the
  headline workload (``--submissions``), which must stay flat after warm-up.

The run rewrites the "simulate" section of ``docs/benchmarks.md`` unless ``--no-docs``.

Run: ``python benchmarks/simulate.py [--per-case 20000] [--rounds 5] [--submissions 1000000]``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import Figure, interleaved, table, write_section
from dispatch import raw_future_hop

import asyncfront as af
from asyncfront.testing import FakeDevice, run_virtual

SAMPLE_EVERY = 100_000
STRIDE = 7  # which queue's latest submission each one waits for
WINDOW = 4096


def rss_mib() -> float:
    """Resident memory of this process in MiB."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


async def workload(
    queues_total: int,
    devices_total: int,
    submissions: int,
    samples: list[tuple[int, float]],
    group: int | None = None,
) -> float:
    """µs of wall time per submission; appends (submissions, RSS MiB) every 100k to samples.

    With ``group``, queues wait only within consecutive groups of that many queues, so
    frontiers carry ``group`` axes.
    """
    size = queues_total if group is None else group
    devices = [FakeDevice(f"d{i}") for i in range(devices_total)]
    async with af.open_runtime(devices) as rt:
        queues = [rt.queue(devices[i % devices_total]) for i in range(queues_total)]
        sems = [rt.semaphore(name=f"s{i}") for i in range(queues_total)]
        counts = [0] * queues_total
        outstanding: collections.deque[af.Submission] = collections.deque()
        start = time.perf_counter()
        last = None
        for n in range(1, submissions + 1):
            q = n % queues_total
            first = q - q % size
            other = first + (q - first + STRIDE) % size
            waits = [(sems[other], counts[other])] if counts[other] else []
            counts[q] += 1
            last = queues[q].submit(waits=waits, signals=[(sems[q], counts[q])], cost=1e-6)
            outstanding.append(last)
            if len(outstanding) > WINDOW:
                await outstanding.popleft()
            if n % SAMPLE_EVERY == 0:
                samples.append((n, rss_mib()))
        assert last is not None
        await last
        return (time.perf_counter() - start) / submissions * 1e6


def case(queues: int, devices: int, submissions: int, group: int | None = None) -> float:
    return float(run_virtual(workload, queues, devices, submissions, [], group, idle_timeout=None))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--per-case", type=int, default=20_000, help="submissions per sample")
    parser.add_argument("--rounds", type=int, default=5, help="samples per case (median kept)")
    parser.add_argument(
        "--submissions", type=int, default=1_000_000, help="submissions of the memory run"
    )
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite docs/benchmarks.md")
    args = parser.parse_args()
    if args.per_case < 1000 or args.rounds < 1 or args.submissions < 0:
        parser.error("--per-case must be >= 1000, --rounds >= 1, --submissions >= 0")
    n = args.per_case
    sizes = (8, 16, 32, 64)
    cases = [("raw hop", lambda: asyncio.run(raw_future_hop(n)))]
    cases += [("2 queues, 2 devices", lambda: case(2, 2, n))]
    cases += [("64 queues, 16 devices", lambda: case(64, 16, n))]
    cases += [(f"{k}-axis frontiers", lambda k=k: case(64, 16, n, k)) for k in sizes[:-1]]
    cases += [("128 queues, 32 devices", lambda: case(128, 32, n))]
    figures = interleaved(cases, args.rounds)
    raw = figures["raw hop"]
    head = figures["64 queues, 16 devices"]

    def hops(figure: Figure) -> str:
        return f"{figure.median / raw.median:.1f}"

    rows = [
        [name, f.format(1), f"{1e6 / f.median:,.0f}", hops(f), f"{f.median / head.median:.2f}x"]
        for name, f in figures.items()
        if name != "raw hop"
    ]
    medians = [figures[f"{k}-axis frontiers"].median for k in sizes[:-1]] + [head.median]
    mean_k, mean_t = statistics.fmean(sizes), statistics.fmean(medians)
    slope = sum((k - mean_k) * (t - mean_t) for k, t in zip(sizes, medians, strict=True)) / sum(
        (k - mean_k) ** 2 for k in sizes
    )
    text = table(
        ["workload", "µs per submission", "submissions/s", "raw hops", "vs 64 queues"], rows
    )
    memory: list[tuple[int, float]] = []
    if args.submissions:
        run_virtual(workload, 64, 16, args.submissions, memory, idle_timeout=None)
    print(f"{args.rounds} interleaved rounds of {n:,} submissions; raw hop {raw.format(2)} µs")
    print(text)
    print(f"cost per frontier axis: {slope:.3f} µs (least squares over groups of {sizes} queues)")
    for count, mib in memory:
        print(f"{count:>10,} submissions: RSS {mib:.1f} MiB")
    if not args.no_docs:
        memory_text = ""
        if memory:
            settled = [mib for count, mib in memory if count >= 2 * SAMPLE_EVERY]
            growth = (max(settled) - min(settled)) if settled else 0.0
            memory_text = (
                f"\n\nMemory over one run of {args.submissions:,} submissions of the 64-queue "
                "workload, resident set after every 100k: "
                + ", ".join(f"{mib:.1f}" for _, mib in memory)
                + f" MiB; growth after the first 200k: {growth:.1f} MiB."
            )
        body = (
            "The virtual-time workload: queues spread over `FakeDevice`s take submissions "
            "round robin, each waiting for the latest submission of the queue 7 places "
            "ahead, so every frontier holds one axis per queue (up to the capacity of 64); "
            "work costs 1 µs of virtual time, the runtime keeps its defaults (trace on), and "
            "at most 4,096 submissions are outstanding. Every case runs once per round, "
            f"{args.rounds} rounds of {n:,} submissions; medians (min-max) of wall time. "
            "**raw hops** divides by a future hand-off between two tasks measured in the "
            f"same rounds ({raw.format(2)} µs).\n\n"
            + text
            + "\n\nCost per frontier axis: the 64 queues on 16 devices split into independent "
            f"groups of {', '.join(map(str, sizes))} queues, each waiting only within its group, "
            "so every frontier carries exactly that many axes, nothing is truncated (capacity "
            "64) and the queue and device counts are those of the headline; the least-squares "
            f"slope over the group sizes is {slope:.3f} µs per axis." + memory_text
        )
        write_section("simulate", "Simulation in virtual time (`benchmarks/simulate.py`)", body)


if __name__ == "__main__":
    main()
