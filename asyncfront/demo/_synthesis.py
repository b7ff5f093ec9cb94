"""Text to speech: espeak-ng when installed, else a labelled PyTorch tone stand-in."""

from __future__ import annotations

import math
import shutil
import subprocess
import wave
from dataclasses import dataclass
from pathlib import Path

from ._deps import require

__all__ = ("SpeechSynthesizer", "Synthesis", "wav_info")

TONE_RATE = 16000


@dataclass(frozen=True)
class Synthesis:
    """A written WAV file and what produced it."""

    path: Path
    backend: str
    seconds: float
    sample_rate: int


def wav_info(path: str | Path) -> tuple[int, int, float]:
    """``(sample_rate, channels, seconds)`` of a WAV file (raises ``wave.Error`` if invalid)."""
    with wave.open(str(path), "rb") as wav:
        return wav.getframerate(), wav.getnchannels(), wav.getnframes() / wav.getframerate()


class SpeechSynthesizer:
    """Writes speech for a text to a WAV file.

    ``backend``: ``"espeak"`` (the espeak-ng program), ``"tone"`` (a small PyTorch
    stand-in: one short tone per character, not speech) or ``"auto"`` (espeak-ng when
    installed, else the tones).

    Raises:
        FileNotFoundError: ``backend="espeak"`` and espeak-ng is not installed.
        ValueError: an unknown backend.
    """

    def __init__(self, backend: str = "auto", *, voice: str = "en-us") -> None:
        if backend not in ("auto", "espeak", "tone"):
            raise ValueError(f"backend must be 'auto', 'espeak' or 'tone', got {backend!r}")
        program = shutil.which("espeak-ng")
        if backend == "espeak" and program is None:
            raise FileNotFoundError("espeak-ng is not installed (apt-get install espeak-ng)")
        if backend == "auto":
            backend = "espeak" if program is not None else "tone"
        if backend == "tone":
            require("torch")
        self.backend = backend
        self.voice = voice
        self._program = program

    @property
    def label(self) -> str:
        """What the backend is, in words."""
        if self.backend == "espeak":
            return f"espeak-ng ({self.voice})"
        return "tone stand-in (espeak-ng not used): one tone per character, not speech"

    def synthesize(self, text: str, path: str | Path) -> Synthesis:
        """Write ``text`` as audio to the WAV file ``path``.

        Raises:
            subprocess.CalledProcessError: espeak-ng failed.
        """
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        if self.backend == "espeak":
            assert self._program is not None
            subprocess.run(
                [self._program, "-v", self.voice, "-w", str(out), text or "nothing"],
                check=True,
                capture_output=True,
                timeout=60,
            )
        else:
            _write_tones(text, out)
        rate, _, seconds = wav_info(out)
        return Synthesis(out, self.backend, seconds, rate)

    def __repr__(self) -> str:
        return f"<SpeechSynthesizer {self.label}>"


def _write_tones(text: str, path: Path, *, per_char: float = 0.06) -> None:
    """One enveloped sine per character, its pitch from the character; spaces are rests."""
    import torch

    n = int(TONE_RATE * per_char)
    t = torch.arange(n, dtype=torch.float32) / TONE_RATE
    envelope = torch.sin(torch.linspace(0.0, math.pi, n))
    pieces = []
    for c in text or " ":
        if c.isspace():
            pieces.append(torch.zeros(n))
        else:
            frequency = 220.0 * 2.0 ** ((ord(c.lower()) % 32) / 12.0)
            pieces.append(0.3 * envelope * torch.sin(2 * math.pi * frequency * t))
    pcm = (torch.cat(pieces).clamp(-1.0, 1.0) * 32767).to(torch.int16)
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(TONE_RATE)
        wav.writeframes(pcm.numpy().tobytes())
