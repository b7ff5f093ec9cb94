"""Scenario B2: SDXL under memory pressure on a two-GPU workstation, in virtual time.

A voice conversation runs Whisper and Bark on GPU 1 and Llama-3-8B on GPU 0 when the
user asks for an image. SDXL needs 6 GiB that neither GPU has free: Bark's weights are
dropped (freed with a death frontier, nothing written back), SDXL's weights land in the
same memory once Bark's queued speech has finished, and Bark is reloaded into SDXL's
memory when the next voice reply needs it. The code is
asyncfront/scenarios/sdxl_pressure.py; this program prints the stage timings, the
weight drops and loads, memory over time, the decisive frontiers and a text timeline,
and can write a Perfetto trace for https://ui.perfetto.dev.

Run: python examples/scenarios/sdxl_pressure.py [--image-at S] [--voice-at S] [--trace PATH]
"""

from __future__ import annotations

from _run import main

if __name__ == "__main__":
    main(
        "sdxl_pressure",
        times={
            "image-at": ("image_at", 1.2, "when the image request arrives (s)"),
            "voice-at": ("second_voice_at", 7.0, "when the second voice message arrives (s)"),
        },
    )
