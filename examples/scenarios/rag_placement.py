"""Scenario B3: a RAG query placed by weight residency, in virtual time.

Warm, the query bounces CPU -> GPU 0 -> CPU -> GPU 1 -> GPU 0; once SDXL has taken GPU 1,
the reranker falls back to the CPU (tight deadline) or is loaded into GPU 0 through the
NVMe queue (looser deadline). The code is asyncfront/scenarios/rag_placement.py.

Run: python examples/scenarios/rag_placement.py [--trace PATH]
"""

from __future__ import annotations

from _run import main

if __name__ == "__main__":
    main("rag_placement")
