"""Scenario C4: a multimedia request through seven models, in virtual time.

Audio and image decoding, Whisper, CLIP, tensor-parallel Llama-3-70B, Code-Llama,
SDXL-Turbo and XTTS, all submitted as one graph; the final frontier carries every
axis. The code is asyncfront/scenarios/multimedia_request.py.

Run: python examples/scenarios/multimedia_request.py [--trace PATH]
"""

from __future__ import annotations

from _run import main

if __name__ == "__main__":
    main("multimedia_request")
