"""Speech to text with PocketSphinx and its bundled US English model (no download)."""

from __future__ import annotations

import wave
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from ._deps import require

__all__ = ("SAMPLE_WAV", "Audio", "SpeechRecognizer", "read_wav", "sample_wav_path")

SAMPLE_WAV = "question.wav"
"""The spoken question shipped in ``asyncfront/demo_data`` (espeak-ng, 16 kHz mono)."""


@dataclass(frozen=True)
class Audio:
    """16-bit PCM mono samples and their rate."""

    pcm: bytes
    sample_rate: int

    @property
    def seconds(self) -> float:
        """The duration of the audio."""
        return len(self.pcm) / 2 / self.sample_rate


def sample_wav_path() -> Path:
    """The path of the shipped sample question."""
    return Path(str(resources.files("asyncfront") / "demo_data" / SAMPLE_WAV))


def read_wav(path: str | Path | None = None) -> Audio:
    """Read a 16-bit mono WAV file (the shipped question when ``path`` is None).

    Raises:
        ValueError: the file is not 16-bit mono PCM.
    """
    with wave.open(str(path or sample_wav_path()), "rb") as wav:
        if wav.getnchannels() != 1 or wav.getsampwidth() != 2:
            raise ValueError(
                f"{path}: need 16-bit mono PCM, got {wav.getnchannels()} channel(s) of "
                f"{8 * wav.getsampwidth()} bits"
            )
        return Audio(wav.readframes(wav.getnframes()), wav.getframerate())


class SpeechRecognizer:
    """A PocketSphinx decoder loaded once, transcribing whole utterances."""

    def __init__(self, sample_rate: int = 16000) -> None:
        require("pocketsphinx")
        from pocketsphinx import Decoder

        self.sample_rate = sample_rate
        self._decoder: Any = Decoder(samprate=sample_rate, loglevel="FATAL")

    def transcribe(self, audio: Audio) -> str:
        """The words PocketSphinx hears in ``audio`` ('' when it hears none).

        Raises:
            ValueError: the audio's rate differs from the decoder's.
        """
        if audio.sample_rate != self.sample_rate:
            raise ValueError(
                f"audio at {audio.sample_rate} Hz, the decoder expects {self.sample_rate} Hz"
            )
        decoder = self._decoder
        decoder.start_utt()
        decoder.process_raw(audio.pcm, full_utt=True)
        decoder.end_utt()
        hypothesis = decoder.hyp()
        return str(hypothesis.hypstr) if hypothesis is not None else ""

    def __repr__(self) -> str:
        return f"<SpeechRecognizer pocketsphinx en-us {self.sample_rate} Hz>"
