"""Virtual-time simulation throughput and memory growth: 16 fake devices, 64-axis frontiers.

Sixty-four queues, four on each of 16 ``FakeDevice``s, take submissions round robin.
Each submission waits for the latest submission of the queue 7 places ahead, so causal
history spreads to every queue and, after warm-up, every frontier holds all 64 axes.
Work costs 1 µs of virtual time, the trace is off, and at most ``--window`` submissions
are outstanding (the oldest is awaited before more are queued), as a long-running
simulation would keep them.

Reported: submissions per wall second over the whole run and per 100k block, the
frontier size, and the process's resident memory (RSS, from ``/proc/self/statm``) after
every 100k submissions; ``--tracemalloc`` also samples Python allocations (slower).
Memory must stay flat after warm-up.

Run: ``python benchmarks/simulate.py [--submissions 1000000] [--window 4096]``.
"""

from __future__ import annotations

import argparse
import collections
import os
import platform
import time
import tracemalloc

import asyncfront as af
from asyncfront.testing import FakeDevice, run_virtual

DEVICES = 16
QUEUES_PER_DEVICE = 4
SAMPLE_EVERY = 100_000
STRIDE = 7  # which queue's latest submission each one waits for


def rss_mib() -> float:
    """Resident memory of this process in MiB."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


async def simulate(submissions: int, window: int, trace_python: bool) -> None:
    devices = [FakeDevice(f"d{i}") for i in range(DEVICES)]
    async with af.open_runtime(devices, trace=False) as rt:
        queues = [rt.queue(d.name) for d in devices for _ in range(QUEUES_PER_DEVICE)]
        n_queues = len(queues)
        sems = [rt.semaphore(name=f"s{i}") for i in range(n_queues)]
        counts = [0] * n_queues
        outstanding: collections.deque[af.Submission] = collections.deque()
        if trace_python:
            tracemalloc.start()
        start = block = time.perf_counter()
        print(f"{'submissions':>12} {'per s (block)':>14} {'RSS MiB':>8} {'traced MiB':>10} axes")
        last = None
        for n in range(1, submissions + 1):
            q = n % n_queues
            other = (q + STRIDE) % n_queues
            waits = [(sems[other], counts[other])] if counts[other] else []
            counts[q] += 1
            last = queues[q].submit(waits=waits, signals=[(sems[q], counts[q])], cost=1e-6)
            outstanding.append(last)
            if len(outstanding) > window:
                await outstanding.popleft()
            if n % SAMPLE_EVERY == 0:
                now = time.perf_counter()
                rate = SAMPLE_EVERY / (now - block)
                traced = tracemalloc.get_traced_memory()[0] / 2**20 if trace_python else 0.0
                head = outstanding[0]
                if not head.done():
                    await head
                axes = len(head.frontier or ())
                print(f"{n:>12,} {rate:>14,.0f} {rss_mib():>8.1f} {traced:>10.1f} {axes:>4}")
                block = time.perf_counter()
        assert last is not None
        await last
        elapsed = time.perf_counter() - start
        print(
            f"total: {submissions:,} submissions in {elapsed:.1f} s wall, "
            f"{submissions / elapsed:,.0f} per second, {rt.now():.3f} s virtual; "
            f"last frontier {len(last.frontier or ())} axes"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--submissions", type=int, default=1_000_000)
    parser.add_argument("--window", type=int, default=4096, help="most outstanding submissions")
    parser.add_argument("--tracemalloc", action="store_true", help="also sample tracemalloc")
    args = parser.parse_args()
    print(f"Python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} cores")
    print(f"{DEVICES} fake devices, {DEVICES * QUEUES_PER_DEVICE} queues, trace off")
    run_virtual(simulate, args.submissions, args.window, args.tracemalloc, idle_timeout=None)


if __name__ == "__main__":
    main()
