"""Foresight prefetch in virtual time: MoE expert-load stall and KV resume latency.

Two workloads, each against its on-demand baseline in the same run, on the same seeded
workload (fake devices in virtual time: the figures are simulated seconds, exact for a
seed; the spread is over seeds):

* **MoE experts** (scenario C3b, ``simulate moe_prefetch``): one Mixtral layer, four of
  eight experts fit on the GPU; the experts of micro-step k+1 load during step k from a
  routing prediction right 100, 80 or 50 % of the time. Figures: total expert-load stall
  per 48 micro-steps, its ratio to on-demand loading, and the loads wasted on wrong
  predictions.
* **KV pages** (scenario B2d, ``simulate kv_prefetch``): six chat sessions, three KV
  pages fit on the device; hints (``pager.expect``) a second ahead of each message, right
  100, 80 or 50 % of the time, or the pager's ``ReuseIntervals`` arrival model, against
  on-demand page-in. Figures: mean and 95th-percentile resume latency, the total's ratio
  to on demand, wasted prefetches.

Everything runs with the pager's and residency's defaults (``prefetch_margin`` 2).
The run rewrites the "prefetch" section of ``docs/benchmarks.md`` unless ``--no-docs``.

Run: ``python benchmarks/prefetch.py [--moe-seeds 5] [--kv-seeds 3]``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import Figure, table, write_section

from asyncfront.scenarios import kv_prefetch, moe_prefetch
from asyncfront.testing import run_virtual


def _figure(values: list[float]) -> Figure:
    return Figure(tuple(values))


def moe(seeds: list[int]) -> str:
    """The MoE table: per accuracy, stall, ratio to on demand and wasted loads over seeds."""
    stalls: dict[str, list[float]] = {}
    ratios: dict[str, list[float]] = {}
    wasted: dict[str, list[float]] = {}
    for seed in seeds:

        async def main(seed: int = seed) -> moe_prefetch.MoePrefetchReport:
            report, _ = await moe_prefetch.simulate(seed=seed)
            return report

        report = run_virtual(main)
        base = report.run(None)
        for run in report.runs:
            stalls.setdefault(run.label, []).append(run.stall)
            ratios.setdefault(run.label, []).append(run.stall / base.stall)
            wasted.setdefault(run.label, []).append(run.wasted)
        print(report.describe())
    rows = [
        [
            label,
            _figure(stalls[label]).format(3),
            _figure(ratios[label]).format(2),
            _figure(wasted[label]).format(0),
        ]
        for label in stalls
    ]
    return table(["loading", "stall s / 48 steps", "vs on demand", "wasted loads"], rows)


def kv(seeds: list[int]) -> str:
    """The KV table: per run, mean and p95 resume latency, ratio of totals, wasted."""
    means: dict[str, list[float]] = {}
    p95s: dict[str, list[float]] = {}
    ratios: dict[str, list[float]] = {}
    wasted: dict[str, list[float]] = {}
    for seed in seeds:

        async def main(seed: int = seed) -> kv_prefetch.KvPrefetchReport:
            report, _ = await kv_prefetch.simulate(seed=seed)
            return report

        report = run_virtual(main)
        base = report.run("on demand")
        for run in report.runs:
            means.setdefault(run.label, []).append(run.mean * 1e3)
            p95s.setdefault(run.label, []).append(run.p95 * 1e3)
            ratios.setdefault(run.label, []).append(run.total / base.total)
            wasted.setdefault(run.label, []).append(run.wasted)
        print(report.describe())
    rows = [
        [
            label,
            _figure(means[label]).format(0),
            _figure(p95s[label]).format(0),
            _figure(ratios[label]).format(2),
            _figure(wasted[label]).format(0),
        ]
        for label in means
    ]
    header = ["page-in", "mean resume ms", "p95 resume ms", "total vs on demand", "wasted"]
    return table(header, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--moe-seeds", type=int, default=5, help="seeds of the MoE workload")
    parser.add_argument("--kv-seeds", type=int, default=3, help="seeds of the KV workload")
    parser.add_argument("--no-docs", action="store_true", help="print only")
    args = parser.parse_args()
    moe_seeds = [moe_prefetch.DEFAULT_SEED + i for i in range(args.moe_seeds)]
    kv_seeds = [kv_prefetch.DEFAULT_SEED + i for i in range(args.kv_seeds)]
    moe_table = moe(moe_seeds)
    kv_table = kv(kv_seeds)
    body = f"""
Foresight prefetch against on-demand loading, on the same seeded workloads, in virtual
time on fake devices (simulated seconds: exact for a seed; medians (min-max) over seeds
{moe_seeds[0]}-{moe_seeds[-1]} for the MoE layer, {kv_seeds[0]}-{kv_seeds[-1]} for the
sessions). Defaults throughout (``prefetch_margin`` 2).

**MoE experts** (`simulate moe_prefetch`, scenario C3b): Mixtral layer, 4 of 8 experts
fit on the GPU, one load 32.2 ms (NVMe read + PCIe copy), micro-steps of 34 ms; the
experts of step k+1 load during step k when the prediction names them. Wasted loads are
prefetches the predicted step did not use.

{moe_table}

**KV pages** (`simulate kv_prefetch`, scenario B2d): 6 chat sessions x 6 messages, 3 KV
pages fit on the device, one page-in 0.156 s (read 0.125 s + copy 0.031 s, a 1 GiB cache
over 8 GiB/s NVMe and 32 GiB/s PCIe, scaled 1:1024); hints a second ahead of each message
(`pager.expect`), or the pager's `ReuseIntervals` arrival model. Resume latency: from a
message's arrival until its first decode may use the page.

{kv_table}
"""
    print(body)
    if not args.no_docs:
        write_section("prefetch", "Foresight prefetch (`benchmarks/prefetch.py`)", body)


if __name__ == "__main__":
    main()
