"""Command line: ``python -m asyncfront demo``."""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Sequence

from .scenarios.laptop_voice import simulate
from .testing import run_virtual


def _demo(args: argparse.Namespace) -> int:
    if args.trace:
        os.makedirs(os.path.dirname(os.path.abspath(args.trace)), exist_ok=True)
    report, timeline = run_virtual(
        functools.partial(simulate, utterances=args.utterances, trace_path=args.trace or None)
    )
    print("asyncfront demo: laptop voice-to-chat pipeline on fake devices (virtual time)")
    print()
    print(report.describe())
    print()
    print(timeline)
    if args.trace:
        print()
        print(f"Perfetto trace written to {args.trace} (open it at https://ui.perfetto.dev)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m asyncfront``."""
    parser = argparse.ArgumentParser(prog="asyncfront", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="run the simulated voice pipeline and show it")
    demo.add_argument("--utterances", type=int, default=2, help="voice turns to simulate")
    demo.add_argument(
        "--trace",
        default=os.path.join("traces", "voice_pipeline.json"),
        help="where to write the Perfetto trace ('' for none)",
    )
    demo.set_defaults(handler=_demo)
    args = parser.parse_args(argv)
    handler = args.handler
    return int(handler(args))


if __name__ == "__main__":
    sys.exit(main())
