"""Scenario C3: Mixtral-8x7B expert routing with cold experts on NVMe, in virtual time.

A router on GPU 4 picks experts per token batch; hot experts run where they are
resident, cold ones are read from NVMe, copied to a GPU and stay resident; the combine
step's frontier merges every chosen expert's. The code is asyncfront/scenarios/moe_routing.py.

Run: python examples/scenarios/moe_routing.py [--batches N] [--tokens T] [--seed S] [--trace PATH]
"""

from __future__ import annotations

from _run import main

if __name__ == "__main__":
    main("moe_routing")
