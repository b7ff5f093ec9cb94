"""Shared by the scenario programs here: parse the scenario's options, run it, print it."""

from __future__ import annotations

import argparse
import functools

from asyncfront.scenarios import get_scenario
from asyncfront.testing import run_virtual


def main(name: str) -> None:
    """Run scenario ``name`` with the options given on the command line."""
    scenario = get_scenario(name)
    parser = argparse.ArgumentParser(description=f"{scenario.section}: {scenario.description}")
    for option, default in scenario.options.items():
        parser.add_argument(f"--{option}", type=int, default=default)
    parser.add_argument("--trace", default=None, help="write a Perfetto trace here")
    args = parser.parse_args()
    options = {option: getattr(args, option) for option in scenario.options}
    report, timeline = run_virtual(
        functools.partial(scenario.simulate, trace_path=args.trace, **options)
    )
    print(report.describe())
    print()
    print(timeline)
