"""Scenario B4: streaming voice-to-voice translation, in virtual time.

VAD, encode, decode, translate, TTS and playback per speech chunk, chained with
decoder and TTS skip edges. The code is asyncfront/scenarios/streaming_translation.py.

Run: python examples/scenarios/streaming_translation.py [--gpus 1|2] [--depth N] [--trace PATH]
"""

from __future__ import annotations

from _run import main

if __name__ == "__main__":
    main("streaming_translation")
