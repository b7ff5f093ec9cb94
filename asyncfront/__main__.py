"""Command line: ``python -m asyncfront demo``, ``simulate`` and ``trace view``."""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Sequence

from ._progress import progress
from ._timeline import read_trace, write_html
from .scenarios import SCENARIOS
from .scenarios.laptop_voice import simulate
from .testing import run_virtual


def _demo(args: argparse.Namespace) -> int:
    if args.trace:
        os.makedirs(os.path.dirname(os.path.abspath(args.trace)), exist_ok=True)
    with progress("simulating the voice pipeline in virtual time", total=1) as shown:
        report, timeline = run_virtual(
            functools.partial(simulate, utterances=args.utterances, trace_path=args.trace or None)
        )
        shown.advance()
    print("asyncfront demo: laptop voice-to-chat pipeline on fake devices (virtual time)")
    print()
    print(report.describe())
    print()
    print(timeline)
    if args.trace:
        print()
        print(f"Perfetto trace written to {args.trace} (open it at https://ui.perfetto.dev)")
    return 0


_OPTION_HELP = {
    "gpus": "GPUs, for scenarios that take it",
    "depth": "pipeline depth (chunks, tokens)",
    "rounds": "speculative rounds (speculative_decoding)",
    "batches": "token batches to route (moe_routing)",
    "tokens": "tokens per batch (moe_routing)",
    "seed": "seed of the random pattern, for scenarios that take it",
}


def _scenario_options() -> list[str]:
    """Every option some registered scenario takes, in first-seen order."""
    return list(dict.fromkeys(k for s in SCENARIOS.values() for k in s.options))


def _list_scenarios() -> str:
    width = max(len(name) for name in SCENARIOS)
    lines = []
    for s in SCENARIOS.values():
        options = " ".join(f"[--{k} N, default {v}]" for k, v in s.options.items())
        lines.append(f"{s.name:<{width}}  {s.section:<3} {s.description}")
        if options:
            lines.append(f"{'':<{width}}      options: {options}")
    return "\n".join(lines)


def _simulate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.list:
        print(_list_scenarios())
        return 0
    if args.scenario is None:
        parser.error("name a scenario, or pass --list to see them")
    scenario = SCENARIOS.get(args.scenario)
    if scenario is None:
        parser.error(f"no scenario named {args.scenario!r}; choose from: {', '.join(SCENARIOS)}")
    options = {k: getattr(args, k) for k in _scenario_options() if getattr(args, k) is not None}
    try:
        scenario.check_options(options)
    except ValueError as error:
        parser.error(str(error))
    trace = (
        args.trace if args.trace is not None else os.path.join("traces", f"{scenario.name}.json")
    )
    if trace:
        os.makedirs(os.path.dirname(os.path.abspath(trace)), exist_ok=True)
    with progress(f"simulating {scenario.name} in virtual time", total=1) as shown:
        report, timeline = run_virtual(
            functools.partial(scenario.simulate, trace_path=trace or None, **options)
        )
        shown.advance()
    print(f"asyncfront simulate {scenario.name} ({scenario.section}): {scenario.description}")
    print()
    print(report.describe())
    print()
    print(timeline)
    if trace:
        print()
        print(f"Perfetto trace written to {trace} (open it at https://ui.perfetto.dev)")
    return 0


def _trace_view(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    out = args.output or os.path.splitext(args.trace)[0] + ".html"
    try:
        document = read_trace(args.trace)
    except (OSError, ValueError) as error:
        parser.error(str(error))
    title = args.title or f"asyncfront timeline: {os.path.basename(args.trace)}"
    write_html(document, out, title=title)
    print(f"HTML timeline written to {out}")
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
    demo.set_defaults(handler=lambda args: _demo(args))
    sim = commands.add_parser(
        "simulate", help="run a scenario on fake devices in virtual time and write a trace"
    )
    sim.add_argument("scenario", nargs="?", help="the scenario to run (see --list)")
    sim.add_argument("--list", action="store_true", help="list the scenarios and exit")
    for option in _scenario_options():
        help_text = _OPTION_HELP.get(option, "for scenarios that take it")
        sim.add_argument(f"--{option}", type=int, default=None, help=help_text)
    sim.add_argument(
        "--trace",
        default=None,
        help="where to write the Perfetto trace (default traces/<scenario>.json; '' for none)",
    )
    sim.set_defaults(handler=lambda args: _simulate(args, sim))
    trace = commands.add_parser("trace", help="work with trace files")
    trace_commands = trace.add_subparsers(dest="trace_command", required=True)
    view = trace_commands.add_parser(
        "view", help="turn a Perfetto/Chrome JSON trace into a self-contained HTML timeline"
    )
    view.add_argument("trace", help="a JSON trace as demo, simulate or export_perfetto write it")
    view.add_argument("-o", "--output", default=None, help="the HTML file (default TRACE.html)")
    view.add_argument("--title", default=None, help="the page title")
    view.set_defaults(handler=lambda args: _trace_view(args, view))
    args = parser.parse_args(argv)
    handler = args.handler
    return int(handler(args))


if __name__ == "__main__":
    sys.exit(main())
