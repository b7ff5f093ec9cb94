"""The command line: python -m asyncfront simulate."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from asyncfront.__main__ import main
from asyncfront.scenarios import SCENARIOS, Scenario, get_scenario


def test_simulate_list_names_every_scenario(capsys: pytest.CaptureFixture[str]) -> None:
    """simulate --list prints every registered scenario with its section."""
    assert main(["simulate", "--list"]) == 0
    out = capsys.readouterr().out
    for scenario in SCENARIOS.values():
        assert scenario.name in out and scenario.section in out


def test_simulate_writes_a_perfetto_trace(tmp_path: Path) -> None:
    """python -m asyncfront simulate NAME --gpus --depth runs it and writes a trace."""
    trace = tmp_path / "b4.json"
    out = subprocess.run(
        [sys.executable, "-m", "asyncfront", "simulate", "streaming_translation",
         "--gpus", "1", "--depth", "2", "--trace", str(trace)],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    assert "2 chunks on 1 GPU(s)" in out.stdout
    events = json.loads(trace.read_text())["traceEvents"]
    assert any(e.get("name") == "translate[1]" for e in events)


def test_simulate_refuses_an_option_the_scenario_lacks(capsys: pytest.CaptureFixture[str]) -> None:
    """An option a scenario does not take is a usage error naming what it takes."""
    with pytest.raises(SystemExit) as exit_info:
        main(["simulate", "rag_placement", "--depth", "3"])
    assert exit_info.value.code == 2
    assert "takes no options, not --depth" in capsys.readouterr().err


def test_simulate_refuses_an_unknown_scenario(capsys: pytest.CaptureFixture[str]) -> None:
    """An unknown scenario name is a usage error listing the scenarios."""
    with pytest.raises(SystemExit):
        main(["simulate", "nope"])
    assert "laptop_voice" in capsys.readouterr().err
    with pytest.raises(KeyError, match="no scenario named 'nope'"):
        get_scenario("nope")


def test_simulate_takes_every_registered_option(capsys: pytest.CaptureFixture[str]) -> None:
    """Options of any registered scenario (--rounds, --seed, --batches) reach its runner."""
    assert (
        main(["simulate", "speculative_decoding", "--rounds", "2", "--seed", "1", "--trace", ""])
        == 0
    )
    assert "2 rounds of 4 draft tokens" in capsys.readouterr().out
    assert main(["simulate", "moe_routing", "--batches", "2", "--tokens", "1", "--trace", ""]) == 0
    assert "2 batches" in capsys.readouterr().out


# -- Bad arguments: refused up front, argparse-style ------------------------------------

_BATCH = r"""
import contextlib, io, json, sys
from asyncfront.__main__ import main

results = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as exit_:
            code = exit_.code
    results.append({"argv": argv, "code": code, "stderr": err.getvalue()})
heavy = [m for m in ("torch", "transformers", "pocketsphinx", "safetensors") if m in sys.modules]
print(json.dumps({"results": results, "heavy": heavy}))
"""


def _write_wav(path: Path, *, rate: int, channels: int, seconds: float = 0.5) -> Path:
    """A silent 16-bit PCM WAV file."""
    import wave

    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(channels)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes(b"\0\0" * channels * int(rate * seconds))
    return path


def _bad_demo_arguments(tmp: Path) -> list[tuple[list[str], str]]:
    """Demo arguments a newcomer gets wrong, each with the error it must give."""
    (tmp / "notes.wav").write_text("not audio\n")
    (tmp / "header.wav").write_bytes(b"RIFF\x10\0\0\0WAVEfmt ")
    _write_wav(tmp / "4k.wav", rate=4000, channels=1)
    (tmp / "empty-ckpt").mkdir()
    (tmp / "bad-ckpt").mkdir()
    (tmp / "bad-ckpt" / "config.json").write_text("{not json")
    (tmp / "short-ckpt").mkdir()
    (tmp / "short-ckpt" / "config.json").write_text('{"n_positions": 32}')
    return [
        (["--audio", str(tmp / "missing.wav")], f"--audio {tmp / 'missing.wav'}: no such file"),
        (["--audio", str(tmp)], f"--audio {tmp}: a directory"),
        (["--audio", str(tmp / "notes.wav")], "notes.wav: not a PCM WAV file"),
        (["--audio", str(tmp / "header.wav")], "header.wav: not a PCM WAV file"),
        (["--audio", str(tmp / "4k.wav")], "4k.wav: 4000 Hz, outside 8000..192000 Hz; convert"),
        (["--tokens", "0"], "--tokens must be at least 1, not 0"),
        (["--tokens", "-5"], "--tokens must be at least 1, not -5"),
        (["--lm-layers", "0"], "--lm-layers must be at least 1, not 0"),
        (["--lm-width", "100"], "--lm-width must be a positive multiple of 64, not 100"),
        (["--checkpoint", str(tmp / "empty-ckpt")],
         "not a transformers checkpoint (no config.json)"),
        (["--checkpoint", str(tmp / "nowhere")],
         f"--checkpoint {tmp / 'nowhere'}: no such directory"),
        (["--checkpoint", str(tmp / "bad-ckpt")], "config.json: not readable JSON"),
        (["--checkpoint", str(tmp / "short-ckpt"), "--tokens", "32"],
         "--tokens must be 1..31 (the model's context is 32 tokens), not 32"),
        (["--docs", str(tmp / "nowhere")], "not a directory of Markdown files"),
        (["--output", str(tmp)], f"--output {tmp}: a directory"),
        (["--simulated", "--utterances", "0"], "--utterances must be 1..32, not 0"),
    ]  # fmt: skip


def _bad_simulate_arguments() -> list[tuple[list[str], str]]:
    """One below and one above every registered option's range, and the reported cases."""
    cases = [
        (["streaming_translation", "--gpus", "3"], "--gpus must be 1..2, not 3"),
        (["streaming_translation", "--gpus", "0"], "--gpus must be 1..2, not 0"),
        (["streaming_translation", "--depth", "0"], "--depth must be 1..8, not 0"),
        (["streaming_translation", "--depth", "200"], "--depth must be 1..8, not 200"),
        (["tensor_parallel", "--depth", "0"], "--depth must be 1..8, not 0"),
    ]
    for scenario in SCENARIOS.values():
        for option, (low, high) in scenario.ranges.items():
            for value in (low - 1, high + 1):
                cases.append(
                    (
                        [scenario.name, f"--{option}", str(value)],
                        f"scenario {scenario.name!r}: "
                        f"--{option} must be {low}..{high}, not {value}",
                    )
                )
    return cases


@pytest.fixture(scope="module")
def refused(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Every bad argument run through main() in one fresh interpreter."""
    tmp = tmp_path_factory.mktemp("bad-args")
    cases = [(["demo", *argv], message) for argv, message in _bad_demo_arguments(tmp)]
    cases += [(["simulate", *argv], message) for argv, message in _bad_simulate_arguments()]
    out = subprocess.run(
        [sys.executable, "-c", _BATCH, json.dumps([argv for argv, _ in cases])],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    report = json.loads(out.stdout)
    report["expected"] = [message for _, message in cases]
    return report


def test_every_bad_argument_is_a_one_line_usage_error(refused: dict[str, object]) -> None:
    """Each bad demo/simulate argument exits 2 with argparse's usage and one error line."""
    results = refused["results"]
    assert isinstance(results, list)
    for result, expected in zip(results, refused["expected"], strict=True):  # type: ignore[call-overload]
        lines = result["stderr"].strip().splitlines()
        assert result["code"] == 2, result
        assert lines[0].startswith("usage: asyncfront "), result
        assert lines[-1].startswith(f"asyncfront {result['argv'][0]}: error: "), result
        assert expected in lines[-1], (expected, result)
        assert "Traceback" not in result["stderr"], result


def test_bad_arguments_are_refused_before_any_model_library_loads(
    refused: dict[str, object],
) -> None:
    """No bad argument gets as far as importing torch, transformers or pocketsphinx."""
    assert refused["heavy"] == []


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["demo", "--tokens", "0"], "asyncfront demo: error: --tokens must be at least 1, not 0"),
        (["simulate", "tensor_parallel", "--depth", "0"],
         "asyncfront simulate: error: scenario 'tensor_parallel': --depth must be 1..8, not 0"),
    ],
)  # fmt: skip
def test_the_command_line_refuses_a_bad_argument(argv: list[str], message: str) -> None:
    """python -m asyncfront with a bad argument: exit status 2, the error as its last line."""
    out = subprocess.run(
        [sys.executable, "-m", "asyncfront", *argv], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == message
    assert "Traceback" not in out.stderr and out.stdout == ""


def test_simulate_list_shows_each_options_range(capsys: pytest.CaptureFixture[str]) -> None:
    """simulate --list gives every option's allowed range and default."""
    assert main(["simulate", "--list"]) == 0
    out = capsys.readouterr().out
    assert "[--gpus 1..2, default 2] [--depth 1..8, default 8]" in out
    for scenario in SCENARIOS.values():
        assert set(scenario.ranges) == set(scenario.options), scenario.name
        for option in scenario.options:
            assert f"[{scenario.describe_option(option)}]" in out
            assert ".." in scenario.describe_option(option)


def test_a_scenario_refuses_an_option_out_of_range_when_called_directly() -> None:
    """Scenario.simulate checks ranges too, before running anything."""
    with pytest.raises(ValueError, match=r"--depth must be 1\.\.8, not 0"):
        asyncio.run(get_scenario("tensor_parallel").simulate(depth=0))
    with pytest.raises(ValueError, match=r"defaults to 9, outside its range 1\.\.8"):
        Scenario("x", "Z", "test", get_scenario("tensor_parallel").runner, {"depth": 9},
                 {"depth": (1, 8)})  # fmt: skip
