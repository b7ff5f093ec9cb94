"""Diffusion-transformer serving on eight GPUs with parallelism re-placed between steps.

Each request's denoising runs on a collective channel whose GPUs grow when GPUs idle
and shrink when a new request waits (channel.resize at step boundaries); the program
prints throughput and mean latency against fixed parallelism on the same arrivals. The
code is asyncfront/scenarios/dit_serving.py.

Run: python examples/scenarios/dit_serving.py [--requests N] [--seed S] [--load PERCENT]
"""

from __future__ import annotations

from _run import main

if __name__ == "__main__":
    main("dit_serving")
