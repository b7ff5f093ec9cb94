"""Laptop voice-to-chat on fake devices in virtual time (scenario A).

The CPU preprocesses audio, Whisper transcribes on the APU, a DMA engine copies the
features into VRAM and Phi-3 answers on the discrete GPU, while MiniLM indexes
documents in the background (CPU tokenising at low priority, NPU embedding). The
pipeline code is `asyncfront/scenarios/laptop_voice.py`; this program runs it,
prints the timings, the final frontier and a text timeline, and writes a Perfetto
trace you can open at https://ui.perfetto.dev.

Run: python examples/voice_pipeline_sim.py [--utterances N] [--trace PATH]
"""

from __future__ import annotations

import argparse
import functools

from asyncfront.scenarios.laptop_voice import simulate
from asyncfront.testing import run_virtual


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--utterances", type=int, default=2)
    parser.add_argument("--trace", default=None, help="write a Perfetto trace here")
    args = parser.parse_args()
    report, timeline = run_virtual(
        functools.partial(simulate, utterances=args.utterances, trace_path=args.trace)
    )
    print(report.describe())
    print()
    print(timeline)
    embed_axes = set(report.embedding_axes.values())
    assert all(
        embed_axes.isdisjoint(sub.frontier.axes)
        for subs in report.stages.values()
        for sub in subs
        if sub.frontier is not None
    ), "background embedding leaked into the chat pipeline's frontiers"


if __name__ == "__main__":
    main()
