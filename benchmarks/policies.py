"""SLO attainment of arbitration policies, and KV reserved, on Maestro's multi-agent workload.

The ``multi_agent`` scenario (``asyncfront/scenarios/multi_agent.py``) in virtual time:
agents of 2-6 dependent LLM calls, three models on two fake GPUs of four slots, Poisson
arrivals at 0.5, 0.8, 1.0, 1.2 and 1.5 times capacity, SLOs of 1.5-3 times each
workflow's unloaded latency. For every seed (a different workload) and load it runs:

* the baselines: first come first served (``PriorityPolicy``, the default) and
  earliest deadline first (``EDFPolicy``);
* ``SLOPolicy`` as the scenario configures it (least slack first, ``feasibility`` 0.9)
  and with ``order="deadline"`` (earliest deadline first among the work that can still
  make it, ``feasibility`` 0.5);
* the SLO policy with KV reserved at the maximum output length, against the predicted
  reservation (a running 0.9 quantile of each role's outputs, grown on demand) that
  every other run uses.

A run is deterministic (virtual time, seeded workload), so the spread is across seeds:
each figure is the median over the seeds with the range in brackets. The run rewrites
the "policies" section of ``docs/benchmarks.md`` unless ``--no-docs`` is given.

Run: ``python benchmarks/policies.py [--seeds 7 1 2] [--workflows 240] [--no-docs]``.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import Figure, table, write_section

from asyncfront.scenarios import multi_agent as ma
from asyncfront.testing import run_virtual

POLICIES = ("priority", "edf", "slo", "slo_deadline")


def main() -> None:
    """Run every seed, load and policy; print the tables and write the docs section."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[7, 1, 2])
    parser.add_argument("--workflows", type=int, default=ma.DEFAULT_WORKFLOWS)
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite docs/benchmarks.md")
    args = parser.parse_args()
    started = time.perf_counter()
    attainment: dict[tuple[float, str], list[float]] = {}
    gaps: dict[tuple[float, str], list[float]] = {}
    kv: dict[tuple[float, str], list[float]] = {}
    peak: dict[tuple[float, str], list[float]] = {}
    reserved: dict[tuple[float, str], list[float]] = {}
    for seed in args.seeds:
        workload = ma.make_workload(args.workflows, seed)
        capacity = ma.capacity_rate(workload)
        for load in ma.LOADS:
            got: dict[str, ma.PolicyResult] = {}
            for policy in POLICIES:
                got[policy] = run_virtual(
                    functools.partial(
                        ma.run_multi_agent, workload, load=load, policy=policy, capacity=capacity
                    )
                )
            got["slo/max_length"] = run_virtual(
                functools.partial(
                    ma.run_multi_agent,
                    workload,
                    load=load,
                    policy="slo",
                    reservation="max_length",
                    capacity=capacity,
                )
            )
            for name, result in got.items():
                attainment.setdefault((load, name), []).append(result.attainment * 100)
                kv.setdefault((load, name), []).append(result.kv_mean_gib)
                peak.setdefault((load, name), []).append(result.kv_peak_gib)
                reserved.setdefault((load, name), []).append(
                    result.reserved_tokens / result.used_tokens
                )
            for name in ("slo", "slo_deadline"):
                gaps.setdefault((load, name), []).append(
                    (got[name].attainment - got["edf"].attainment) * 100
                )
            print(
                f"seed {seed} load {load:.1f}x: "
                + ", ".join(f"{n} {r.attainment * 100:.1f}%" for n, r in got.items()),
                flush=True,
            )

    def fig(values: list[float], digits: int = 1) -> str:
        return Figure(tuple(values)).format(digits)

    rows = [
        [f"{load:.1f}x"]
        + [fig(attainment[load, p]) for p in POLICIES]
        + [fig(gaps[load, "slo"]), fig(gaps[load, "slo_deadline"])]
        for load in ma.LOADS
    ]
    policy_table = table(
        [
            "load",
            "priority (FCFS) %",
            "EDF %",
            "SLO (least slack) %",
            "SLO (deadline order) %",
            "SLO - EDF, pt",
            "SLO (deadline order) - EDF, pt",
        ],
        rows,
    )
    kv_rows = []
    for load in ma.LOADS:
        base, pred = kv[load, "slo/max_length"], kv[load, "slo"]
        saved = [100 * (1 - p / b) for p, b in zip(pred, base, strict=True)]
        kv_rows.append(
            [
                f"{load:.1f}x",
                fig(base, 2),
                fig(pred, 2),
                fig(saved),
                fig(peak[load, "slo/max_length"], 2),
                fig(peak[load, "slo"], 2),
                fig(reserved[load, "slo/max_length"], 2),
                fig(reserved[load, "slo"], 2),
                fig(attainment[load, "slo/max_length"]),
                fig(attainment[load, "slo"]),
            ]
        )
    kv_table = table(
        [
            "load",
            "max-length KV GiB (mean)",
            "predicted KV GiB (mean)",
            "saved %",
            "max-length peak GiB",
            "predicted peak GiB",
            "max-length output tokens reserved/produced",
            "predicted output tokens reserved/produced",
            "max-length attainment %",
            "predicted attainment %",
        ],
        kv_rows,
    )
    elapsed = time.perf_counter() - started
    print(policy_table)
    print()
    print(kv_table)
    print(f"{elapsed:.0f} s")
    if not args.no_docs:
        body = (
            f"Maestro's multi-agent experiment (`python -m asyncfront simulate multi_agent`) "
            f"in virtual time: {args.workflows} workflows per run, seeds "
            f"{', '.join(map(str, args.seeds))}; medians over the seeds (min-max). "
            "SLO attainment is the share of workflows whose every call finished by the "
            "deadline; EDF and the SLO policies age work after "
            f"{ma.MAX_WAIT:g} s. All runs but the max-length column reserve KV from the "
            "predicted output length.\n\n"
            + policy_table
            + "\n\nKV reservation under the SLO policy (least slack), the same workload and "
            "arrivals: the time-averaged and peak KV reserved over both GPUs, reserved over "
            "produced output tokens, and the attainment of each.\n\n"
            + kv_table
            + "\n\nWith the budgets sized for every slot at the longest output, memory never "
            "binds here, so reservation does not change the schedule: the attainment is the "
            "same and the saving is memory left for other models (or for more slots)."
        )
        write_section(
            "policies", "Arbitration policies and KV reservation (`benchmarks/policies.py`)", body
        )


if __name__ == "__main__":
    main()
