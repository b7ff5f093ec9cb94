"""Command line: ``python -m asyncfront demo [--simulated]``, ``simulate`` and ``trace view``."""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from ._progress import progress
from ._timeline import read_trace, trace_title, write_html
from .scenarios import SCENARIOS
from .scenarios.laptop_voice import MAX_UTTERANCES, simulate
from .testing import run_virtual


def _check_demo(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Refuse the demo's bad arguments the way argparse does, before any model library loads.

    Only file headers and small JSON files are read, so a mistake costs well under a
    second instead of the seconds of loading after which the demo would otherwise fail.
    """
    if args.simulated:
        if not 1 <= args.utterances <= MAX_UTTERANCES:
            parser.error(f"--utterances must be 1..{MAX_UTTERANCES}, not {args.utterances}")
        return
    from .demo._speech import check_wav

    if args.audio is not None:
        try:
            check_wav(args.audio)
        except (OSError, ValueError) as error:
            parser.error(f"--audio {error}")
    if args.checkpoint is not None:
        _check_checkpoint(parser, args.checkpoint)
    if args.model_dir is not None and args.model_dir.exists() and not args.model_dir.is_dir():
        parser.error(f"--model-dir {args.model_dir}: not a directory")
    if args.lm_layers < 1:
        parser.error(f"--lm-layers must be at least 1, not {args.lm_layers}")
    if args.lm_width < 64 or args.lm_width % 64:
        parser.error(f"--lm-width must be a positive multiple of 64, not {args.lm_width}")
    if args.tokens < 1:
        parser.error(f"--tokens must be at least 1, not {args.tokens}")
    context = _context_length(args.checkpoint if args.checkpoint is not None else args.model_dir)
    if context is not None and args.tokens >= context:
        parser.error(
            f"--tokens must be 1..{context - 1} (the model's context is {context} tokens), "
            f"not {args.tokens}"
        )
    if args.docs is not None and not args.docs.is_dir():
        parser.error(f"--docs {args.docs}: not a directory of Markdown files")
    if args.output.is_dir():
        parser.error(f"--output {args.output}: a directory; name the reply's WAV file")


def _check_checkpoint(parser: argparse.ArgumentParser, path: Path) -> None:
    """A usage error unless ``path`` is a directory with a readable ``config.json`` object."""
    config = path / "config.json"
    if not path.is_dir():
        parser.error(f"--checkpoint {path}: no such directory (a transformers checkpoint)")
    if not config.is_file():
        parser.error(
            f"--checkpoint {path}: not a transformers checkpoint (no config.json); pass the "
            "directory save_pretrained wrote"
        )
    try:
        loaded = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        parser.error(f"--checkpoint {config}: not readable JSON ({error})")
    if not isinstance(loaded, dict):
        parser.error(f"--checkpoint {config}: a JSON {type(loaded).__name__}, not an object")


def _context_length(checkpoint: Path | None) -> int | None:
    """The context length a model directory's ``config.json`` declares, when it is known.

    ``None`` for a directory not made yet (the untrained demo LM is created on first use)
    or a config without ``n_positions``/``max_position_embeddings``: the model says then.
    """
    if checkpoint is None:
        from .demo._language import default_model_dir

        checkpoint = default_model_dir()
    try:
        config = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    length = config.get("n_positions") or config.get("max_position_embeddings")
    return length if isinstance(length, int) and not isinstance(length, bool) else None


def _demo(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    _check_demo(args, parser)
    if args.simulated:
        return _demo_simulated(args)
    from .demo import DemoDependencyError, DemoOptions, run_demo

    trace = args.trace if args.trace is not None else os.path.join("traces", "voice_assistant.json")
    if trace:
        os.makedirs(os.path.dirname(os.path.abspath(trace)), exist_ok=True)
    options = DemoOptions(
        audio=args.audio,
        checkpoint=args.checkpoint,
        model_dir=args.model_dir,
        lm_layers=args.lm_layers,
        lm_width=args.lm_width,
        tokens=args.tokens,
        tts=args.tts,
        output=args.output,
        docs=args.docs,
        progress=not args.no_progress,
    )
    print("asyncfront demo: a voice assistant with real models on this CPU")
    try:
        report = asyncio.run(run_demo(options, trace_path=trace or None))
    except DemoDependencyError as error:
        print(f"asyncfront demo: {error}", file=sys.stderr)
        return 2
    print()
    print(report.describe())
    print()
    print(report.timeline)
    if trace:
        print()
        _report_trace(trace, "asyncfront demo: voice assistant on real models (CPU)")
    return 0


def _demo_simulated(args: argparse.Namespace) -> int:
    trace = args.trace if args.trace is not None else os.path.join("traces", "voice_pipeline.json")
    if trace:
        os.makedirs(os.path.dirname(os.path.abspath(trace)), exist_ok=True)
    with progress("simulating the voice pipeline in virtual time", total=1) as shown:
        report, timeline = run_virtual(
            functools.partial(simulate, utterances=args.utterances, trace_path=trace or None)
        )
        shown.advance()
    print("asyncfront demo: laptop voice-to-chat pipeline on fake devices (virtual time)")
    print()
    print(report.describe())
    print()
    print(timeline)
    if trace:
        print()
        _report_trace(
            trace, "asyncfront demo --simulated: laptop voice-to-chat pipeline (virtual time)"
        )
    return 0


def _report_trace(trace: str, title: str) -> None:
    """Title a Perfetto trace, write the HTML timeline beside it, and say where both are.

    The title goes into the trace's ``otherData`` too, so ``trace view`` finds it later.
    """
    page = os.path.splitext(trace)[0] + ".html"
    document = read_trace(trace)
    other = document.get("otherData")
    document["otherData"] = {**(other if isinstance(other, dict) else {}), "title": title}
    with open(trace, "w", encoding="utf-8") as out:
        json.dump(document, out)
    write_html(document, page, title=title)
    print(f"Perfetto trace written to {trace} (open it at https://ui.perfetto.dev)")
    print(f"HTML timeline written to {page}")


_OPTION_HELP = {
    "gpus": "GPUs, for scenarios that take it",
    "depth": "pipeline depth (chunks, tokens)",
    "rounds": "speculative rounds (speculative_decoding)",
    "batches": "token batches to route (moe_routing)",
    "tokens": "tokens per batch (moe_routing)",
    "seed": "seed of the random pattern, for scenarios that take it",
    "micro_batches": "micro-batches through the pipeline (cross_node_pipeline)",
    "load": "arrival rate in percent of capacity, 0 for the whole sweep (multi_agent)",
    "workflows": "agent workflows per run (multi_agent)",
}


def _scenario_options() -> list[str]:
    """Every option some registered scenario takes, in first-seen order."""
    return list(dict.fromkeys(k for s in SCENARIOS.values() for k in s.options))


def _list_scenarios() -> str:
    width = max(len(name) for name in SCENARIOS)
    lines = []
    for s in SCENARIOS.values():
        options = " ".join(f"[{s.describe_option(k)}]" for k in s.options)
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
        _report_trace(
            trace,
            f"asyncfront simulate {scenario.name} ({scenario.section}): {scenario.description}",
        )
    return 0


def _trace_view(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    out = args.output or os.path.splitext(args.trace)[0] + ".html"
    try:
        document = read_trace(args.trace)
    except (OSError, ValueError) as error:
        parser.error(str(error))
    title = args.title or trace_title(document) or f"asyncfront timeline of {args.trace}"
    write_html(document, out, title=title)
    print(f"HTML timeline written to {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m asyncfront``."""
    parser = argparse.ArgumentParser(prog="asyncfront", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo", help="run the voice assistant on real models (or --simulated) and show it"
    )
    demo.add_argument(
        "--simulated",
        action="store_true",
        help="run the simulated laptop pipeline on fake devices in virtual time instead",
    )
    demo.add_argument(
        "--utterances", type=int, default=2, help="voice turns to simulate (--simulated)"
    )
    demo.add_argument(
        "--trace",
        default=None,
        help="where to write the Perfetto trace (default traces/voice_assistant.json, "
        "traces/voice_pipeline.json with --simulated; '' for none)",
    )
    demo.add_argument(
        "--audio",
        type=Path,
        default=None,
        help="PCM WAV to answer (any rate 8-192 kHz, mono or more channels: resampled to "
        "16 kHz mono)",
    )
    demo.add_argument(
        "--checkpoint", type=Path, default=None, help="a local transformers causal-LM directory"
    )
    demo.add_argument(
        "--model-dir",
        type=Path,
        default=None,
        help="where the untrained demo LM is saved (default ~/.cache/asyncfront/demo-lm)",
    )
    demo.add_argument(
        "--lm-layers",
        type=int,
        default=12,
        help="transformer blocks of the untrained demo LM (default 12, GPT-2's 124 M)",
    )
    demo.add_argument(
        "--lm-width",
        type=int,
        default=768,
        help="embedding width of the untrained demo LM, a multiple of 64 (default 768)",
    )
    demo.add_argument(
        "--tokens",
        type=int,
        default=48,
        help="tokens of reply to generate (1 to the model's context length - 1)",
    )
    demo.add_argument(
        "--tts", choices=("auto", "espeak", "tone"), default="auto", help="speech synthesis"
    )
    demo.add_argument(
        "--output", type=Path, default=Path("traces") / "reply.wav", help="the reply's WAV file"
    )
    demo.add_argument("--docs", type=Path, default=None, help="Markdown folder to index")
    demo.add_argument("--no-progress", action="store_true", help="no progress display")
    demo.set_defaults(handler=lambda args: _demo(args, demo))
    sim = commands.add_parser(
        "simulate", help="run a scenario on fake devices in virtual time and write a trace"
    )
    sim.add_argument("scenario", nargs="?", help="the scenario to run (see --list)")
    sim.add_argument("--list", action="store_true", help="list the scenarios and exit")
    for option in _scenario_options():
        help_text = _OPTION_HELP.get(option, "for scenarios that take it")
        ranges = ", ".join(
            f"{s.name} {s.ranges[option][0]}..{s.ranges[option][1]}"
            for s in SCENARIOS.values()
            if option in s.ranges
        )
        if ranges:
            help_text = f"{help_text}; allowed: {ranges}"
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
