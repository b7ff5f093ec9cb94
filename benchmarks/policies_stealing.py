"""Work stealing and parallelism between steps: virtual-time figures over seeded workloads.

Two comparisons, each against its baseline on the same seeded arrivals, in virtual time
on fake devices (the figures are simulated seconds, so they do not depend on the
machine; the spread is over seeds, not over repeated runs):

* **work stealing** (``simulate work_stealing``): an irregular workload on a 4 x 4
  satellite torus with the scenario's defaults (40 jobs, 20 ms per hop); makespan and
  mean job latency without stealing (the baseline), with neighbour-only and with global
  stealing, and the per-seed ratio of each makespan to the baseline's;
* **parallelism between steps** (``simulate dit_serving``): DiT requests on eight GPUs
  (48 requests per seed) at 40, 80 and 120 % load; throughput and mean latency of fixed
  k = 1, 2, 4, 8 and of dynamic parallelism, and the per-seed ratios of dynamic against
  fixed k = 2 (the baseline) and against the best fixed k of that seed.

Every figure is the median over the seeds with the range (min-max). The run rewrites
the "policies_stealing" section of ``docs/benchmarks.md`` unless ``--no-docs``.

Run: ``python benchmarks/policies_stealing.py [--seeds 10] [--no-docs]``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import Figure, table, write_section

from asyncfront import Stealing
from asyncfront.scenarios import dit_serving, work_stealing
from asyncfront.testing import run_virtual

LOADS = (40, 80, 120)
BASELINE_K = 2


def fig(values: list[float]) -> Figure:
    return Figure(tuple(values))


def stealing_section(seeds: list[int]) -> str:
    makespan: dict[Stealing, list[float]] = {m: [] for m in work_stealing.MODES}
    latency: dict[Stealing, list[float]] = {m: [] for m in work_stealing.MODES}
    ratio: dict[Stealing, list[float]] = {m: [] for m in work_stealing.MODES}
    steals: dict[Stealing, list[float]] = {m: [] for m in work_stealing.MODES}
    hops: dict[Stealing, list[float]] = {m: [] for m in work_stealing.MODES}
    for seed in seeds:
        report, _ = run_virtual(lambda seed=seed: work_stealing.simulate(seed=seed))
        base = report.runs[Stealing.NONE].makespan
        for mode, run in report.runs.items():
            makespan[mode].append(run.makespan)
            latency[mode].append(run.mean_latency)
            ratio[mode].append(run.makespan / base)
            steals[mode].append(run.stolen)
            hops[mode].append(run.stolen_hops / run.stolen if run.stolen else 0.0)
        print(f"work_stealing seed {seed}: " + ", ".join(
            f"{m.value} {r.makespan:.2f}s" for m, r in report.runs.items()
        ))  # fmt: skip
    rows = [
        [
            mode.value,
            fig(makespan[mode]).format(),
            fig(ratio[mode]).format(),
            fig(latency[mode]).format(),
            fig(steals[mode]).format(0),
            fig(hops[mode]).format(),
        ]
        for mode in work_stealing.MODES
    ]
    header = ["stealing", "makespan (s)", "vs none", "mean job latency (s)", "steals", "hops/steal"]
    near = fig(
        [
            n / g
            for n, g in zip(makespan[Stealing.NEIGHBOURS], makespan[Stealing.GLOBAL], strict=True)
        ]
    )
    return (
        f"Irregular workload on a 4 x 4 satellite torus ({len(seeds)} seeds, "
        f"{work_stealing.DEFAULT_JOBS} jobs each, {work_stealing.HOP_SECONDS * 1e3:.0f} ms "
        "per hop), stages bound when ready; baseline: no stealing (each satellite runs the "
        "backlog placement gave it).\n\n"
        + table(header, rows)
        + f"\n\nNeighbour-only makespan / global makespan, per seed: {near.format()}."
    )


def dit_section(seeds: list[int]) -> str:
    rows = []
    for load in LOADS:
        thr: dict[int, list[float]] = {p: [] for p in (*dit_serving.FIXED, dit_serving.DYNAMIC)}
        lat: dict[int, list[float]] = {p: [] for p in thr}
        vs_base_thr: list[float] = []
        vs_base_lat: list[float] = []
        vs_best_thr: list[float] = []
        vs_best_lat: list[float] = []
        for seed in seeds:
            report, _ = run_virtual(
                lambda seed=seed, load=load: dit_serving.simulate(seed=seed, load=load)
            )
            for policy, run in report.runs.items():
                thr[policy].append(run.throughput)
                lat[policy].append(run.mean_latency)
            d, base = report.dynamic, report.runs[BASELINE_K]
            vs_base_thr.append(d.throughput / base.throughput)
            vs_base_lat.append(d.mean_latency / base.mean_latency)
            vs_best_thr.append(d.throughput / report.best_fixed("throughput").throughput)
            vs_best_lat.append(d.mean_latency / report.best_fixed("mean_latency").mean_latency)
            print(
                f"dit_serving load {load} seed {seed}: {d.throughput:.3f}/s {d.mean_latency:.2f}s"
            )
        for policy in thr:
            name = "dynamic" if policy == dit_serving.DYNAMIC else f"fixed k={policy}"
            rows.append([f"{load} %", name, fig(thr[policy]).format(3), fig(lat[policy]).format()])
        rows.append(
            [
                f"{load} %",
                f"dynamic / fixed k={BASELINE_K}",
                fig(vs_base_thr).format() + "x",
                fig(vs_base_lat).format() + "x",
            ]
        )
        rows.append(
            [
                f"{load} %",
                "dynamic / best fixed",
                fig(vs_best_thr).format() + "x",
                fig(vs_best_lat).format() + "x",
            ]
        )
    return (
        f"DiT serving on eight GPUs ({len(seeds)} seeds, {dit_serving.DEFAULT_REQUESTS} "
        "requests each, 30 % video); dynamic: grow at a step boundary when GPUs idle, "
        "shrink to the fair share when a request waits; baseline: fixed k = "
        f"{BASELINE_K}; the best fixed k is chosen per seed after the fact.\n\n"
        + table(["load", "policy", "throughput (req/s)", "mean latency (s)"], rows, "llrr")
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10, help="seeds per workload")
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite docs")
    args = parser.parse_args()
    seeds = list(range(1, args.seeds + 1))
    body = (
        "Virtual time on fake devices: medians over seeds, range (min-max).\n\n"
        "### Work stealing\n\n"
        + stealing_section(seeds)
        + "\n\n### Parallelism between steps\n\n"
        + dit_section(seeds)
    )
    print(body)
    if not args.no_docs:
        write_section("policies_stealing", "Work stealing and parallelism between steps", body)


if __name__ == "__main__":
    main()
