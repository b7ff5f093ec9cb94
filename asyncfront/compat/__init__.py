"""Compatibility layers that offer other schedulers' APIs on top of asyncfront.

Each layer is imported by its path and exports nothing here:

- ``asyncfront.compat.pygpukit``: the Multi-LLM Scheduler Guide's API (contexts with
  VRAM budgets, sessions, streams and events, memory pool, QoS evaluator, partitions).
"""

__all__ = ()
