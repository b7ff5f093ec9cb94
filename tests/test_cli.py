"""The command line: python -m asyncfront simulate."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from asyncfront.__main__ import main
from asyncfront.scenarios import SCENARIOS, get_scenario


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
        main(["simulate", "laptop_voice", "--depth", "3"])
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
