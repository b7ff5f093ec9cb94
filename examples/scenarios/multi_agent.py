"""Scenario B5: LLM agent workflows with end-to-end SLOs on two GPUs, in virtual time.

Agents of 2-6 dependent LLM calls arrive at 0.5-1.5 times capacity; each GPU
arbitrates ready calls first come first served, earliest deadline first, or least slack
over the workflow's remaining critical path; KV caches are reserved at the maximum
output length or at a running quantile of each role's outputs, grown on demand. The
code is asyncfront/scenarios/multi_agent.py.

Run: python examples/scenarios/multi_agent.py [--load PERCENT] [--workflows N] [--seed S]
[--trace PATH]
"""

from __future__ import annotations

from _run import main

if __name__ == "__main__":
    main("multi_agent")
