"""Shared by the scenario programs here: parse the scenario's options, run it, print it."""

from __future__ import annotations

import argparse
import functools
import math
from collections.abc import Mapping
from typing import Any

from asyncfront.scenarios import get_scenario
from asyncfront.testing import run_virtual


def main(name: str, times: Mapping[str, tuple[str, float, str]] | None = None) -> Any:
    """Run scenario ``name`` with the options given on the command line; return its report.

    The registered integer options come with their ranges. ``times`` adds options in
    seconds of virtual time, ``{"image-at": ("image_at", 1.2, "image request time")}``:
    the flag, the keyword the scenario's runner takes, its default and its help.
    """
    scenario = get_scenario(name)
    parser = argparse.ArgumentParser(description=f"{scenario.section}: {scenario.description}")
    for option, default in scenario.options.items():
        parser.add_argument(
            f"--{option}", type=int, default=default, help=scenario.describe_option(option)
        )
    for flag, (keyword, default, text) in (times or {}).items():
        parser.add_argument(
            f"--{flag}",
            dest=keyword,
            type=float,
            default=default,
            help=f"{text}, default {default}",
        )
    parser.add_argument("--trace", default=None, help="write a Perfetto trace here")
    args = parser.parse_args()
    options = {option: getattr(args, option) for option in scenario.options}
    try:
        scenario.check_options(options)
    except ValueError as error:
        parser.error(str(error))
    extra = {}
    for flag, (keyword, _, _) in (times or {}).items():
        value = getattr(args, keyword)
        if not (math.isfinite(value) and value >= 0):
            parser.error(f"--{flag} must be a time of at least 0 s, not {value}")
        extra[keyword] = value
    report, timeline = run_virtual(
        functools.partial(scenario.runner, trace_path=args.trace, **options, **extra)
    )
    print(report.describe())
    print()
    print(timeline)
    return report
