"""Scenario A: voice-to-chat on a laptop, in virtual time.

Whisper on the APU, Phi-3 on the discrete GPU; voice input takes the CPU from
background MiniLM tokenising at the next submission boundary. The code is
asyncfront/scenarios/laptop_voice.py.

Run: python examples/scenarios/laptop_voice.py [--trace PATH]
"""

from __future__ import annotations

from _run import main

if __name__ == "__main__":
    main("laptop_voice")
