"""Scenario B1: speculative decoding on GPU 0, in virtual time.

Llama-3-8B verifies its draft model's rounds of 4 tokens; draft round k+1 runs while
round k is verified, and a seeded acceptance pattern decides which speculative drafts a
rejection invalidates. The code is asyncfront/scenarios/speculative_decoding.py.

Run: python examples/scenarios/speculative_decoding.py [--rounds N] [--seed S] [--trace PATH]
"""

from __future__ import annotations

from _run import main

if __name__ == "__main__":
    main("speculative_decoding")
