"""Speech to text with PocketSphinx and its bundled US English model (no download)."""

from __future__ import annotations

import wave
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from ._deps import require

__all__ = (
    "SAMPLE_QUESTION",
    "SAMPLE_TRANSCRIPT",
    "SAMPLE_WAV",
    "SPEECH_SAMPLE_RATE",
    "Audio",
    "SpeechRecognizer",
    "WavInfo",
    "check_wav",
    "read_wav",
    "resample",
    "sample_wav_path",
)

SAMPLE_WAV = "question.wav"
"""The spoken question shipped in ``asyncfront/demo_data`` (espeak-ng, 16 kHz mono).

Made with ``espeak-ng -v en-us -s 160 -w raw.wav "how can i see what ran where"`` and
``sox raw.wav -r 16000 -c 1 -b 16 question.wav pad 0.3 0.3``: it says
:data:`SAMPLE_QUESTION`, and PocketSphinx's bundled model hears
:data:`SAMPLE_TRANSCRIPT`."""

SAMPLE_QUESTION = "How can I see what ran where?"
"""What the shipped question says (answered by the demo's section on the trace)."""

SAMPLE_TRANSCRIPT = "how can i see what and where"
"""What PocketSphinx's bundled US English model hears in the shipped question."""

SPEECH_SAMPLE_RATE = 16000
"""The rate PocketSphinx's bundled US English model hears: every input is resampled to it."""

_RATES = (8000, 192000)
"""The sample rates accepted from a WAV file (telephone to studio)."""

_CONVERT = "convert it with: ffmpeg -i INPUT -ac 1 -ar 16000 -sample_fmt s16 OUTPUT.wav"


@dataclass(frozen=True)
class Audio:
    """16-bit PCM mono samples and their rate."""

    pcm: bytes
    sample_rate: int

    @property
    def seconds(self) -> float:
        """The duration of the audio."""
        return len(self.pcm) / 2 / self.sample_rate


@dataclass(frozen=True)
class WavInfo:
    """What a WAV file's header says: enough to accept or refuse it before reading it."""

    path: Path
    channels: int
    sample_width: int
    sample_rate: int
    frames: int

    @property
    def seconds(self) -> float:
        """The duration of the audio."""
        return self.frames / self.sample_rate


def sample_wav_path() -> Path:
    """The path of the shipped sample question."""
    return Path(str(resources.files("asyncfront") / "demo_data" / SAMPLE_WAV))


def check_wav(path: str | Path) -> WavInfo:
    """Read a WAV file's header and refuse what :func:`read_wav` cannot turn into speech.

    Accepted: uncompressed PCM of 8, 16, 24 or 32 bits, any number of channels (they
    are averaged), a rate of 8 to 192 kHz (resampled to 16 kHz), at least one frame.
    Only the header is read, so the check is instant for any length.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: not a WAV file, not PCM, or a rate, width or length it cannot use;
            the message names the file and says how to convert it.
    """
    path = Path(path)
    if not path.is_file():
        what = "a directory" if path.is_dir() else "no such file"
        raise FileNotFoundError(f"{path}: {what}; pass a WAV file")
    try:
        with wave.open(str(path), "rb") as wav:
            info = WavInfo(
                path, wav.getnchannels(), wav.getsampwidth(), wav.getframerate(), wav.getnframes()
            )
    except (wave.Error, EOFError) as error:
        why = str(error) or "it ends inside the WAV header"
        raise ValueError(f"{path}: not a PCM WAV file ({why}); {_CONVERT}") from None
    if info.sample_width not in (1, 2, 3, 4):
        raise ValueError(f"{path}: {8 * info.sample_width}-bit samples; {_CONVERT}")
    if not _RATES[0] <= info.sample_rate <= _RATES[1]:
        raise ValueError(
            f"{path}: {info.sample_rate} Hz, outside {_RATES[0]}..{_RATES[1]} Hz; {_CONVERT}"
        )
    if info.frames == 0:
        raise ValueError(f"{path}: holds no audio (0 frames)")
    return info


def read_wav(
    path: str | Path | None = None, *, sample_rate: int | None = SPEECH_SAMPLE_RATE
) -> Audio:
    """Read a PCM WAV file as 16-bit mono at ``sample_rate`` (the shipped question by default).

    Several channels are averaged into one; another rate is resampled (a windowed-sinc
    interpolator that also low-passes when downsampling), so a 44.1 kHz stereo
    recording reaches the recognizer as the 16 kHz mono it hears. ``sample_rate=None``
    keeps the file's rate.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: see :func:`check_wav`.
    """
    info = check_wav(path if path is not None else sample_wav_path())
    with wave.open(str(info.path), "rb") as wav:
        frames = wav.readframes(info.frames)
    target = sample_rate if sample_rate is not None else info.sample_rate
    if info.channels == 1 and info.sample_width == 2 and target == info.sample_rate:
        return Audio(frames, info.sample_rate)
    import numpy as np

    samples = _to_float(frames, info.sample_width).reshape(-1, info.channels).mean(axis=1)
    samples = resample(samples, info.sample_rate, target)
    pcm = np.clip(np.round(samples * 32768.0), -32768, 32767).astype("<i2")
    return Audio(pcm.tobytes(), target)


def _to_float(frames: bytes, width: int) -> Any:
    """PCM bytes (8-bit unsigned, 16/24/32-bit signed little-endian) as floats in [-1, 1)."""
    import numpy as np

    if width == 1:
        return (np.frombuffer(frames, dtype=np.uint8).astype(np.float64) - 128.0) / 128.0
    if width == 3:
        raw = np.frombuffer(frames, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        values = raw[:, 0] | (raw[:, 1] << 8) | (raw[:, 2] << 16)
        values = np.where(values >= 1 << 23, values - (1 << 24), values)
        return values.astype(np.float64) / float(1 << 23)
    dtype = {2: "<i2", 4: "<i4"}[width]
    return np.frombuffer(frames, dtype=dtype).astype(np.float64) / float(1 << (8 * width - 1))


def resample(samples: Any, source_rate: int, target_rate: int, *, half_width: int = 16) -> Any:
    """Resample a 1-D float array from ``source_rate`` to ``target_rate`` (numpy).

    Each output sample is a Hann-windowed sinc over ``2 * half_width`` input samples,
    its cutoff at the lower rate's Nyquist frequency, so downsampling does not alias.

    Raises:
        ValueError: a rate that is not positive.
    """
    import numpy as np

    if source_rate <= 0 or target_rate <= 0:
        raise ValueError(f"sample rates must be positive, got {source_rate} -> {target_rate}")
    x = np.asarray(samples, dtype=np.float64)
    if source_rate == target_rate or len(x) == 0:
        return x.copy()
    ratio = target_rate / source_rate
    cutoff = min(1.0, ratio)
    positions = np.arange(round(len(x) * ratio)) / ratio
    base = np.floor(positions).astype(np.int64)
    fraction = positions - base
    out = np.zeros(len(positions))
    for k in range(-half_width + 1, half_width + 1):
        index = base + k
        distance = k - fraction
        weight = cutoff * np.sinc(cutoff * distance)
        weight *= 0.5 + 0.5 * np.cos(np.pi * distance / half_width)
        inside = (index >= 0) & (index < len(x))
        out += np.where(inside, x[np.clip(index, 0, len(x) - 1)], 0.0) * weight
    return out


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
