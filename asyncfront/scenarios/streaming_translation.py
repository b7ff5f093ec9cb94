"""Scenario B4: streaming voice-to-voice translation ("babelfish"), in virtual time.

Six stages per speech chunk: VAD on the CPU, the audio encoder, the decoder (speech to
source-language tokens), the translating LLM, TTS, and playback on the CPU's audio
queue. The pipeline is one :class:`~asyncfront.Graph` unrolled with
:meth:`~asyncfront.Graph.chain` over ``depth`` chunks: the decoder and TTS carry state
from chunk to chunk (``skip`` edges) and the next chunk's VAD starts once the current
chunk's decoder is done (``through`` the decoder). Every model has a queue of its own,
so every stage adds its own axis to the frontiers.

With two GPUs the encoder and decoder run on ``gpu1`` and the LLM and TTS on ``gpu0``:
``gpu1`` encodes chunk N+1 while ``gpu0`` translates chunk N. With one GPU all four
GPU stages share ``gpu0`` and serialise.

Numbers chosen (one tick is :data:`TICK` = 100 ms, a chunk of a few words): VAD 1 tick,
encode 2, decode 2, translate 3 (the slowest stage), TTS 2, playback 1. The
chain-through interval, VAD + encode + decode, is 5 ticks.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from .._frontier import Frontier, axis_name
from .._graph import ITERATION, GraphRun
from .._queue import Submission
from .._runtime import Runtime, open_runtime
from ..devices.fake import FakeDevice

__all__ = (
    "GPU_STAGES",
    "STAGES",
    "TICK",
    "TICKS",
    "TranslationReport",
    "run_streaming_translation",
    "simulate",
    "translation_devices",
)

TICK = 0.100
"""Seconds per tick."""
TICKS = {"vad": 1, "encode": 2, "decode": 2, "translate": 3, "tts": 2, "playback": 1}
"""Each stage's duration in ticks."""
STAGES = tuple(TICKS)
"""The stages of one chunk, in pipeline order."""
GPU_STAGES = ("encode", "decode", "translate", "tts")
"""The stages that run on a GPU."""
MAX_DEPTH = 8
"""The most chunks one simulation streams."""


def translation_devices(gpus: int = 2) -> list[FakeDevice]:
    """A CPU (VAD and playback run on separate queues of it) and one or two GPUs."""
    if gpus not in (1, 2):
        raise ValueError(f"the streaming translation runs on 1 or 2 GPUs, got {gpus}")
    return [FakeDevice("cpu", kind="cpu", concurrency=2)] + [
        FakeDevice(f"gpu{i}") for i in range(gpus)
    ]


@dataclass
class TranslationReport:
    """What one simulated stream produced: per-chunk audio, the run and its timings."""

    gpus: int
    depth: int
    heard: list[str]
    run: GraphRun
    axes: dict[str, int] = field(default_factory=dict)  # stage -> its queue's axis

    def times(self, stage: str) -> list[tuple[float, float]]:
        """``(start, finish)`` of ``stage`` in every chunk, in seconds."""
        out = []
        for k in range(self.depth):
            sub = self.run[f"{stage}[{k}]"]
            assert isinstance(sub, Submission)
            assert sub.started_at is not None and sub.finished_at is not None
            out.append((sub.started_at, sub.finished_at))
        return out

    def intervals(self, stage: str = "playback") -> list[float]:
        """Seconds between successive chunks' finishes of ``stage``."""
        ends = [end for _, end in self.times(stage)]
        return [b - a for a, b in itertools.pairwise(ends)]

    def frontier(self, stage: str, k: int) -> Frontier:
        """The frontier ``stage`` ran with in chunk ``k``."""
        frontier = self.run[f"{stage}[{k}]"].frontier
        assert frontier is not None
        return frontier

    @property
    def final_frontier(self) -> Frontier:
        """The last chunk's playback frontier: the whole audio-to-audio history."""
        return self.frontier("playback", self.depth - 1)

    def describe(self) -> str:
        """Per-chunk start and finish, the steady-state interval and the final frontier."""
        lines = [f"streaming translation: {self.depth} chunks on {self.gpus} GPU(s)"]
        vad, play = self.times("vad"), self.times("playback")
        for k in range(self.depth):
            lines.append(
                f"  chunk {k}: VAD at {vad[k][0] / TICK:5.1f} ticks, "
                f"played by {play[k][1] / TICK:5.1f} ticks"
            )
        gaps = ", ".join(f"{g / TICK:.0f}" for g in self.intervals())
        lines.append(f"ticks between finished chunks: [{gaps}]")
        names = ", ".join(f"{axis_name(a)}={e}" for a, e in self.final_frontier)
        lines.append(f"final frontier: {{{names}}}")
        return "\n".join(lines)


async def run_streaming_translation(
    rt: Runtime, *, gpus: int = 2, depth: int = MAX_DEPTH
) -> TranslationReport:
    """Stream ``depth`` chunks through the six stages; ``rt`` holds :func:`translation_devices`."""
    if not 1 <= depth <= MAX_DEPTH:
        raise ValueError(f"depth must be between 1 and {MAX_DEPTH} chunks, got {depth}")
    lanes = {"encode": "gpu1", "decode": "gpu1"} if gpus == 2 else {}
    queues = {"vad": rt.queue("cpu", name="cpu.vad"), "playback": rt.queue("cpu", name="cpu.play")}
    for stage in GPU_STAGES:
        device = lanes.get(stage, "gpu0")
        queues[stage] = rt.queue(device, name=f"{device}.{stage}")
    heard: list[str] = []
    g = rt.graph("babelfish")

    def cost(stage: str) -> float:
        return TICKS[stage] * TICK

    vad = g.stage("vad", "chunk{}".format, ITERATION, device=queues["vad"], cost=cost("vad"))
    enc = g.stage("encode", "z({})".format, vad, device=queues["encode"], cost=cost("encode"))
    dec = g.stage("decode", "src({})".format, enc, device=queues["decode"], cost=cost("decode"))
    llm = g.stage(
        "translate", "tgt({})".format, dec, device=queues["translate"], cost=cost("translate")
    )
    tts = g.stage("tts", "wav({})".format, llm, device=queues["tts"], cost=cost("tts"))
    play = g.stage("playback", heard.append, tts, device=queues["playback"], cost=cost("playback"))
    g.chain(play, iterations=depth, skip=[dec, tts], through=dec)
    run = await g.submit()
    await run.results()
    return TranslationReport(
        gpus=gpus, depth=depth, heard=heard, run=run, axes={s: q.axis for s, q in queues.items()}
    )


async def simulate(
    *, gpus: int = 2, depth: int = MAX_DEPTH, trace_path: str | None = None
) -> tuple[TranslationReport, str]:
    """Open a runtime with ``gpus`` fake GPUs, stream ``depth`` chunks, return report and timeline.

    Writes a Perfetto trace to ``trace_path`` when given.
    """
    async with open_runtime(translation_devices(gpus)) as rt:
        report = await run_streaming_translation(rt, gpus=gpus, depth=depth)
    if trace_path is not None:
        rt.trace.export_perfetto(trace_path)
    return report, rt.trace.format_timeline()
