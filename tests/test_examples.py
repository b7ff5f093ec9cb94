"""examples/: one program per scenario, and the old voice program's name still runs it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from asyncfront.scenarios import SCENARIOS

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def _scenarios_run_by(path: Path) -> set[str]:
    """The registered scenarios a program runs: by name, or through a scenario module."""
    text = path.read_text(encoding="utf-8")
    named = set(re.findall(r"""main\(\s*["'](\w+)["']""", text))
    imported = set(re.findall(r"asyncfront\.scenarios\.(\w+) import \w*simulate", text))
    return {name for name in named | imported if name in SCENARIOS}


def test_each_scenario_has_exactly_one_example_program() -> None:
    """Every registered scenario is run by one example program, examples/scenarios/NAME.py."""
    runners: dict[str, list[str]] = {name: [] for name in SCENARIOS}
    for path in sorted(EXAMPLES.rglob("*.py")):
        for name in _scenarios_run_by(path):
            runners[name].append(str(path.relative_to(EXAMPLES)))
    assert runners == {name: [f"scenarios/{name}.py"] for name in SCENARIOS}


def test_the_old_voice_program_name_runs_the_scenario_program() -> None:
    """examples/voice_pipeline_sim.py prints exactly what scenarios/laptop_voice.py prints."""
    outputs = [
        subprocess.run(
            [sys.executable, str(EXAMPLES / program), "--utterances", "3"],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout
        for program in ("voice_pipeline_sim.py", "scenarios/laptop_voice.py")
    ]
    assert outputs[0] == outputs[1]
    assert "dgpu.phi3=3" in outputs[0]
    assert len((EXAMPLES / "voice_pipeline_sim.py").read_text().splitlines()) < 12
