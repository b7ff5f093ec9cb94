"""Scenario B2d: idle chat sessions' KV pages paged back in before their users return.

A predictor names, a second ahead, the session the next message is for (right 100, 80
or 50 % of the time), or the pager's arrival model guesses from past idle periods; the
pager brings the page file -> host -> device ahead of it. Prints the resume latency of
each run against on-demand page-in. The code is asyncfront/scenarios/kv_prefetch.py.

Run: python examples/scenarios/kv_prefetch.py [--sessions N] [--messages M] [--seed S]
     [--trace PATH]
"""

from __future__ import annotations

from _run import main

if __name__ == "__main__":
    main("kv_prefetch")
