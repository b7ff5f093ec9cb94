"""The laptop voice pipeline: runs examples/scenarios/laptop_voice.py, with the same options."""

import runpy
import sys
from pathlib import Path

scenarios = Path(__file__).with_name("scenarios")
sys.path.insert(0, str(scenarios))
runpy.run_path(str(scenarios / "laptop_voice.py"), run_name="__main__")
