"""Scenario B2: SDXL under memory pressure on a two-GPU workstation, in virtual time.

Bark's weights are dropped with a death frontier for SDXL and reloaded afterwards.
The code is asyncfront/scenarios/sdxl_pressure.py.

Run: python examples/scenarios/sdxl_pressure.py [--trace PATH]
"""

from __future__ import annotations

from _run import main

if __name__ == "__main__":
    main("sdxl_pressure")
