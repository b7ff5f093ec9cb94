"""Work stealing on a 4 x 4 satellite torus: an irregular, seeded workload, in virtual time.

Jobs arrive unevenly at satellites and fan out into heavy-tailed tasks bound to a
device only when ready; the program prints the makespan, mean job latency and steals
without stealing, with neighbour-only stealing and with global stealing. The code is
asyncfront/scenarios/work_stealing.py.

Run: python examples/scenarios/work_stealing.py [--jobs N] [--seed S] [--trace PATH]
"""

from __future__ import annotations

from _run import main

if __name__ == "__main__":
    main("work_stealing")
