"""SDXL under memory pressure on a two-GPU workstation, in virtual time (scenario B2).

A voice conversation runs Whisper and Bark on GPU 1 and Llama-3-8B on GPU 0 when the
user asks for an image. SDXL needs 6 GiB that neither GPU has free: Bark's weights are
dropped (freed with a death frontier, nothing written back), SDXL's weights land in the
same memory once Bark's queued speech has finished, and Bark is reloaded into SDXL's
memory when the next voice reply needs it. The scenario code is
`asyncfront/scenarios/sdxl_pressure.py`; this program runs it and prints the stage
timings, the weight drops and loads, memory over time, the decisive frontiers and a text
timeline, and can write a Perfetto trace for https://ui.perfetto.dev.

Run: python examples/sdxl_memory_pressure_sim.py [--image-at S] [--voice-at S] [--trace PATH]
"""

from __future__ import annotations

import argparse
import functools

from asyncfront.scenarios.sdxl_pressure import simulate
from asyncfront.testing import run_virtual


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--image-at", type=float, default=1.2, help="image request time (s)")
    parser.add_argument("--voice-at", type=float, default=7.0, help="second voice message (s)")
    parser.add_argument("--trace", default=None, help="write a Perfetto trace here")
    args = parser.parse_args()
    report, timeline = run_virtual(
        functools.partial(
            simulate,
            image_at=args.image_at,
            second_voice_at=args.voice_at,
            trace_path=args.trace,
        )
    )
    print(report.describe())
    print()
    print(timeline)
    if args.trace:
        print()
        print(f"Perfetto trace written to {args.trace}")


if __name__ == "__main__":
    main()
