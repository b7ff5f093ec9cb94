"""Scenario C3b: MoE experts loaded ahead of need from routing foresight, in virtual time.

The routing of micro-step k+1 is known when micro-step k routes (from the rollout, or a
predictor right 100, 80 or 50 % of the time); the experts it needs load from NVMe while
k computes, within the GPU's expert budget. Prints the expert-load stall of each run
against on-demand loading. The code is asyncfront/scenarios/moe_prefetch.py.

Run: python examples/scenarios/moe_prefetch.py [--steps N] [--seed S] [--accuracy P] [--trace PATH]
"""

from __future__ import annotations

from _run import main

if __name__ == "__main__":
    main("moe_prefetch")
