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
  of 4, 8, 16, 32 or 64 queues, each waiting only within its group, so every frontier
  carries exactly that many axes with nothing truncated (the capacity stays 64) and the
  queue and device counts stay those of the headline. The cost per axis is the slope of
  the least-squares line through the five sizes' medians; its spread is the range of
  the slopes fitted to each round alone (the sizes of one round ran side by side);
* the headline with the runtime's trace off (``trace=False``), beside it: what recording
  every submission costs (not a default, shown for comparison);
* memory: the resident set (RSS) after every 100k submissions of one long run of the
  headline workload (``--submissions``), which must stay flat after warm-up.

With the compiled core installed, the same cases (not the memory run) run again in a
child process on the pure-Python core (``ASYNCFRONT_PURE_PYTHON=1``) with its own raw
hop, and the table shows both.

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

from _report import Figure, interleaved, print_samples, pure_python_samples, table, write_section
from dispatch import raw_future_hop

import asyncfront as af
from asyncfront.testing import FakeDevice, run_virtual

SAMPLE_EVERY = 100_000
STRIDE = 7  # which queue's latest submission each one waits for
WINDOW = 4096
SIZES = (4, 8, 16, 32, 64)  # frontier axes of the per-axis fit (64: the headline)
HEADLINE = "64 queues, 16 devices"
TRACE_OFF = "64 queues, 16 devices, trace off"  # what the trace costs, for comparison


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
    trace: bool = True,
) -> float:
    """µs of wall time per submission; appends (submissions, RSS MiB) every 100k to samples.

    With ``group``, queues wait only within consecutive groups of that many queues, so
    frontiers carry ``group`` axes; ``trace=False`` turns the runtime's trace off.
    """
    size = queues_total if group is None else group
    devices = [FakeDevice(f"d{i}") for i in range(devices_total)]
    async with af.open_runtime(devices, trace=trace) as rt:
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


def case(
    queues: int, devices: int, submissions: int, group: int | None = None, trace: bool = True
) -> float:
    return float(
        run_virtual(workload, queues, devices, submissions, [], group, trace, idle_timeout=None)
    )


def axis_case(size: int) -> str:
    """The name of the case whose frontiers carry ``size`` axes."""
    return HEADLINE if size == SIZES[-1] else f"{size}-axis frontiers"


def measure(n: int, rounds: int) -> dict[str, Figure]:
    """Every case, interleaved, in this process (on whichever core it runs)."""
    cases = [("raw hop", lambda: asyncio.run(raw_future_hop(n)))]
    cases += [("2 queues, 2 devices", lambda: case(2, 2, n))]
    cases += [(HEADLINE, lambda: case(64, 16, n))]
    cases += [(axis_case(k), lambda k=k: case(64, 16, n, k)) for k in SIZES[:-1]]
    cases += [("128 queues, 32 devices", lambda: case(128, 32, n))]
    cases += [(TRACE_OFF, lambda: case(64, 16, n, trace=False))]
    return interleaved(cases, rounds)


def measure_pure(n: int, rounds: int) -> dict[str, Figure]:
    """The same cases in a child process on the pure-Python core (ASYNCFRONT_PURE_PYTHON=1)."""
    return pure_python_samples(__file__, "--per-case", str(n), "--rounds", str(rounds))


def slope(xs: tuple[int, ...], ys: list[float]) -> float:
    """The slope of the least-squares line through the points ``(xs[i], ys[i])``."""
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mean_x) ** 2 for x in xs
    )


def per_axis(figures: dict[str, Figure]) -> tuple[float, float, float]:
    """µs per frontier axis: the slope through the sizes' medians, and the per-round range."""
    fit = slope(SIZES, [figures[axis_case(k)].median for k in SIZES])
    rounds = range(len(figures[HEADLINE].samples))
    per_round = [slope(SIZES, [figures[axis_case(k)].samples[r] for k in SIZES]) for r in rounds]
    return fit, min(per_round), max(per_round)


def report(builds: list[tuple[str, dict[str, Figure]]]) -> str:
    """One table: per workload, each build's µs per submission, raw hops and flatness."""
    header = ["workload"]
    for label, _ in builds:
        header += [f"{label} µs per submission", "submissions/s", "raw hops", "vs 64 queues"]
    rows = []
    for name in builds[0][1]:
        if name == "raw hop":
            continue
        row = [name]
        for _, figures in builds:
            f, raw, head = figures[name], figures["raw hop"], figures[HEADLINE]
            row += [
                f.format(1),
                f"{1e6 / f.median:,.0f}",
                f"{f.median / raw.median:.1f}",
                f"{f.median / head.median:.2f}x",
            ]
        rows.append(row)
    return table(header, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--per-case", type=int, default=20_000, help="submissions per sample")
    parser.add_argument("--rounds", type=int, default=5, help="samples per case (median kept)")
    parser.add_argument(
        "--submissions", type=int, default=1_000_000, help="submissions of the memory run"
    )
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite docs/benchmarks.md")
    parser.add_argument(
        "--json", action="store_true", help="print this process's samples as JSON (no table)"
    )
    args = parser.parse_args()
    if args.per_case < 1000 or args.rounds < 1 or args.submissions < 0:
        parser.error("--per-case must be >= 1000, --rounds >= 1, --submissions >= 0")
    n = args.per_case
    if args.json:
        print_samples(measure(n, args.rounds))
        return
    core = af.core_build()
    load_before = os.getloadavg()[0]
    builds = [("compiled" if core == "compiled" else "pure Python", measure(n, args.rounds))]
    if core == "compiled":
        builds.append(("pure Python", measure_pure(n, args.rounds)))
    text = report(builds)
    axes = [(label, per_axis(figures)) for label, figures in builds]
    memory: list[tuple[int, float]] = []
    if args.submissions:
        run_virtual(workload, 64, 16, args.submissions, memory, idle_timeout=None)
    load = (
        f"Load average (1 minute, {os.cpu_count()} cores) while measuring: "
        f"{load_before:.2f} at the start, {os.getloadavg()[0]:.2f} at the end."
    )
    print(f"core: {core}; {args.rounds} interleaved rounds of {n:,} submissions per build")
    print(load)
    for label, figures in builds:
        print(f"{label}: raw hop {figures['raw hop'].format(2)} µs")
    print(text)
    for label, (fit, low, high) in axes:
        print(
            f"{label}: cost per frontier axis {fit:.3f} µs (per-round slopes {low:.3f} to "
            f"{high:.3f}; least squares over frontiers of {', '.join(map(str, SIZES))} axes)"
        )
    for count, mib in memory:
        print(f"{count:>10,} submissions: RSS {mib:.1f} MiB")
    if not args.no_docs:
        memory_text = ""
        if memory:
            settled = [mib for count, mib in memory if count >= 2 * SAMPLE_EVERY]
            growth = (max(settled) - min(settled)) if settled else 0.0
            memory_text = (
                f"\n\nMemory over one run of {args.submissions:,} submissions of the 64-queue "
                f"workload on the {builds[0][0]} core, resident set after every 100k: "
                + ", ".join(f"{mib:.1f}" for _, mib in memory)
                + f" MiB; growth after the first 200k: {growth:.1f} MiB."
            )
        which = (
            "the compiled core (the default install) and, in a child process, the pure-Python "
            "core (`ASYNCFRONT_PURE_PYTHON=1`), each with the raw hop of its own process"
            if core == "compiled"
            else f"the pure-Python core ({core})"
        )
        raws = "; ".join(f"{label} {figures['raw hop'].format(2)} µs" for label, figures in builds)
        slopes = "; ".join(
            f"{label} **{fit:.3f} µs per axis** (per-round slopes {low:.3f} to {high:.3f})"
            for label, (fit, low, high) in axes
        )
        body = (
            "The virtual-time workload: queues spread over `FakeDevice`s take submissions "
            "round robin, each waiting for the latest submission of the queue 7 places "
            "ahead, so every frontier holds one axis per queue (up to the capacity of 64); "
            "work costs 1 µs of virtual time, the runtime keeps its defaults (trace on), and "
            f"at most 4,096 submissions are outstanding. Measured on {which}. Every case runs "
            f"once per round, {args.rounds} rounds of {n:,} submissions; medians (min-max) of "
            "wall time. **raw hops** divides by a future hand-off between two tasks measured "
            f"in the same rounds ({raws}).\n\n"
            + text
            + f"\n\n*{TRACE_OFF}* is the headline with `open_runtime(trace=False)`, not a "
            "default: what recording every submission in the trace costs."
            + "\n\nCost per frontier axis: the 64 queues on 16 devices split into independent "
            f"groups of {', '.join(map(str, SIZES))} queues, each waiting only within its "
            "group, so every frontier carries exactly that many axes, nothing is truncated "
            "(capacity 64) and the queue and device counts are those of the headline. The "
            "slope of the least-squares line through the sizes' medians, with the range of "
            "the slopes fitted to each round alone (the sizes of a round ran side by side): "
            f"{slopes}." + memory_text + "\n\n" + load
        )
        write_section("simulate", "Simulation in virtual time (`benchmarks/simulate.py`)", body)


if __name__ == "__main__":
    main()
