"""Scenario C1: 4-way tensor-parallel Llama-3-70B with gap filling, in virtual time.

Background BGE, Whisper and LayoutLM work fills the all-reduce windows; the program
prints Llama's time alone and gap-filled, the share of windows filled and the aggregate
throughput gain. The code is asyncfront/scenarios/tensor_parallel.py.

Run: python examples/scenarios/tensor_parallel.py [--depth TOKENS] [--trace PATH]
"""

from __future__ import annotations

from _run import main

if __name__ == "__main__":
    main("tensor_parallel")
