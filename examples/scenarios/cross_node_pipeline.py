"""Scenario C2: a 70B pipeline across two nodes over a fake link, in virtual time.

Sweeps link bandwidths (400, 100, 25, 10 Gb/s) and latencies (2, 10, 50 us) and prints
the pipeline bubble and throughput of each. The code is
asyncfront/scenarios/cross_node_pipeline.py.

Run: python examples/scenarios/cross_node_pipeline.py [--micro_batches N] [--trace PATH]
"""

from __future__ import annotations

from _run import main

if __name__ == "__main__":
    main("cross_node_pipeline")
