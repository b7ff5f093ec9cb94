"""Scenario A: voice-to-chat on a laptop, in virtual time.

The CPU preprocesses audio, Whisper transcribes on the APU, a DMA engine copies the
features into VRAM and Phi-3 answers on the discrete GPU, while MiniLM indexes
documents in the background (CPU tokenising at low priority, NPU embedding): voice input
takes the CPU from background tokenising at the next submission boundary. The code is
asyncfront/scenarios/laptop_voice.py; this program prints the timings, the final
frontier and a text timeline, and can write a Perfetto trace for https://ui.perfetto.dev.

Run: python examples/scenarios/laptop_voice.py [--utterances N] [--trace PATH]
"""

from __future__ import annotations

from _run import main

if __name__ == "__main__":
    report = main("laptop_voice")
    embed_axes = set(report.embedding_axes.values())
    assert all(
        embed_axes.isdisjoint(sub.frontier.axes)
        for subs in report.stages.values()
        for sub in subs
        if sub.frontier is not None
    ), "background embedding leaked into the chat pipeline's frontiers"
