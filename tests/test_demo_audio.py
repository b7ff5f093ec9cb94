"""The demo's audio input: a PCM WAV of any rate and channel count is heard as 16 kHz mono."""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
import pytest

from asyncfront.demo import SpeechRecognizer, missing_packages, read_wav
from asyncfront.demo._speech import SPEECH_SAMPLE_RATE, check_wav, resample


def _write(path: Path, samples: np.ndarray, rate: int, width: int = 2) -> Path:
    """Write float samples in [-1, 1) (frames x channels) as a PCM WAV file."""
    frames = samples if samples.ndim == 2 else samples[:, None]
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(frames.shape[1])
        wav.setsampwidth(width)
        wav.setframerate(rate)
        if width == 1:
            data = np.clip(np.round(frames * 128 + 128), 0, 255).astype(np.uint8).tobytes()
        else:
            scale = float(1 << (8 * width - 1))
            ints = np.clip(np.round(frames * scale), -scale, scale - 1).astype("<i4")
            data = ints.reshape(-1, 1).view(np.uint8)[:, :width].tobytes()  # low bytes first
        wav.writeframes(data)
    return path


def _sample_as_float() -> np.ndarray:
    """The shipped question as floats at 16 kHz."""
    audio = read_wav(sample_rate=None)
    return np.frombuffer(audio.pcm, dtype="<i2").astype(np.float64) / 32768.0


@pytest.mark.parametrize("rate", [22050, 44100])
def test_a_stereo_recording_at_another_rate_is_heard_like_the_original(
    tmp_path: Path, rate: int
) -> None:
    """The shipped question as a stereo WAV at 22.05/44.1 kHz reads as 16 kHz mono, same words."""
    original = _sample_as_float()
    recording = resample(original, 16000, rate)  # band-limited, as a real recording is
    stereo = np.stack([recording, 0.5 * recording], axis=1)
    path = _write(tmp_path / f"question-{rate}-stereo.wav", stereo, rate)
    info = check_wav(path)
    assert (info.sample_rate, info.channels) == (rate, 2)
    audio = read_wav(path)
    assert audio.sample_rate == SPEECH_SAMPLE_RATE
    assert abs(len(audio.pcm) // 2 - len(original)) <= 1
    if missing_packages("pocketsphinx"):
        pytest.skip("needs pocketsphinx for the transcription half")
    recognizer = SpeechRecognizer()
    heard, expected = (
        recognizer.transcribe(audio).split(),
        recognizer.transcribe(read_wav()).split(),
    )
    # PocketSphinx can swap a word on 16-bit requantisation noise; most must agree, in order.
    agree = sum(a == b for a, b in zip(heard, expected, strict=False))
    assert agree >= len(expected) - 2 and len(expected) >= 4, (heard, expected)


@pytest.mark.parametrize(("source", "target"), [(44100, 16000), (8000, 16000), (48000, 16000)])
def test_resampling_keeps_a_tone_and_its_length(source: int, target: int) -> None:
    """A 440 Hz tone resampled between rates stays that tone, sample for sample, in length."""
    tone = 0.5 * np.sin(2 * np.pi * 440 * np.arange(source) / source)
    out = resample(tone, source, target)
    expected = 0.5 * np.sin(2 * np.pi * 440 * np.arange(target) / target)
    assert len(out) == target
    assert np.max(np.abs(out[64:-64] - expected[64:-64])) < 1e-3


def test_downsampling_filters_out_what_the_lower_rate_cannot_hold() -> None:
    """A 12 kHz tone at 48 kHz, above 16 kHz's Nyquist, is removed instead of aliased to 4 kHz."""
    tone = 0.5 * np.sin(2 * np.pi * 12000 * np.arange(48000) / 48000)
    out = resample(tone, 48000, 16000)
    assert np.sqrt(np.mean(out[64:-64] ** 2)) < 0.02


@pytest.mark.parametrize("width", [1, 2, 3, 4])
def test_every_pcm_width_reads_as_the_same_16_bit_samples(tmp_path: Path, width: int) -> None:
    """8-bit unsigned and 16/24/32-bit signed PCM of one signal read back alike at 16-bit."""
    signal = 0.5 * np.sin(2 * np.pi * 300 * np.arange(1600) / 16000)
    audio = read_wav(_write(tmp_path / f"w{width}.wav", signal, 16000, width))
    got = np.frombuffer(audio.pcm, dtype="<i2") / 32768.0
    assert audio.sample_rate == 16000 and len(got) == 1600
    assert np.max(np.abs(got - signal)) < (1 / 128 if width == 1 else 1e-4)


def test_refused_files_name_themselves_and_the_conversion(tmp_path: Path) -> None:
    """A non-WAV, a rate out of range and an empty WAV each raise a ValueError saying how."""
    (tmp_path / "text.wav").write_text("hello\n")
    with pytest.raises(ValueError, match=r"text\.wav: not a PCM WAV file .*ffmpeg -i INPUT"):
        check_wav(tmp_path / "text.wav")
    low = _write(tmp_path / "low.wav", np.zeros(100), 4000)
    with pytest.raises(ValueError, match=r"low\.wav: 4000 Hz, outside 8000\.\.192000 Hz"):
        read_wav(low)
    empty = _write(tmp_path / "empty.wav", np.zeros(0), 16000)
    with pytest.raises(ValueError, match=r"empty\.wav: holds no audio \(0 frames\)"):
        read_wav(empty)
    with pytest.raises(FileNotFoundError, match=r"missing\.wav: no such file"):
        read_wav(tmp_path / "missing.wav")
