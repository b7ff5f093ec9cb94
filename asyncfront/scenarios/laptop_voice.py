"""Scenario A: voice-to-chat on a laptop, simulated on fake devices in virtual time.

The user speaks; the CPU preprocesses the audio, Whisper transcribes on the APU, a DMA
engine copies the transcript's features into VRAM, and Phi-3 generates the reply on the
discrete GPU. Each utterance's four stages are submitted at once, last stage first:
nothing waits for the application between stages. Meanwhile MiniLM indexes local
documents in the background: tokenising on the CPU at low priority (so voice input
takes the CPU at the next submission boundary) and embedding on the NPU. The
embedding axes never enter the chat pipeline's frontiers.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from .._frontier import Frontier, axis_name
from .._queue import DeviceQueue, Submission
from .._runtime import Runtime, open_runtime
from .._semaphore import TimelineSemaphore
from ..devices.fake import FakeDevice

__all__ = (
    "MAX_UTTERANCES",
    "STAGE_COSTS",
    "VoiceReport",
    "laptop_devices",
    "run_voice_pipeline",
    "simulate",
)

GiB = 1 << 30

MAX_UTTERANCES = 32
"""The most voice turns the command line simulates."""

STAGE_COSTS = {
    "preprocess": 0.030,  # CPU: resample, VAD trim, log-mel features
    "whisper": 0.250,  # APU: Whisper-small encoder + decoder
    "h2d_copy": 0.004,  # DMA: features host -> VRAM over PCIe
    "phi3": 0.400,  # dGPU: Phi-3-mini prefill + decode
    "tokenize": 0.050,  # CPU: MiniLM tokenisation of one document batch
    "embed": 0.045,  # NPU: MiniLM-L6 embedding of one batch
}
"""Seconds per stage at speed 1.0 (orders of magnitude of the real models)."""


def laptop_devices() -> list[FakeDevice]:
    """Hardware configuration A: CPU, APU, DMA engine, discrete GPU and NPU."""
    return [
        FakeDevice("cpu", kind="cpu", concurrency=1),
        FakeDevice("apu", kind="gpu", memory=4 * GiB),
        FakeDevice("dma", kind="copy"),
        FakeDevice("dgpu", kind="gpu", memory=8 * GiB),
        FakeDevice("npu", kind="npu"),
    ]


@dataclass
class VoiceReport:
    """What one simulated session produced and where its work ran."""

    replies: list[str]
    stages: dict[str, list[Submission]]  # stage name -> one submission per utterance
    embeddings: list[Submission]
    tokenizations: list[Submission]
    queues: dict[str, DeviceQueue]
    pipeline_axes: dict[str, int] = field(default_factory=dict)
    embedding_axes: dict[str, int] = field(default_factory=dict)

    @property
    def final_frontier(self) -> Frontier:
        """The frontier of the last reply: the whole causal history of the answer."""
        frontier = self.stages["phi3"][-1].frontier
        assert frontier is not None
        return frontier

    def describe(self) -> str:
        """A human-readable summary: per-stage timings and the final frontier."""
        lines = []
        for n, reply in enumerate(self.replies, start=1):
            lines.append(f"utterance {n}: {reply!r}")
            for stage, subs in self.stages.items():
                sub = subs[n - 1]
                assert sub.started_at is not None and sub.finished_at is not None
                lines.append(
                    f"  {stage:<10} on {sub.queue.name:<12} "
                    f"{sub.started_at * 1e3:8.1f} -> {sub.finished_at * 1e3:8.1f} ms"
                )
        lines.append(f"background: {len(self.embeddings)} document batches embedded on the NPU")
        names = ", ".join(f"{axis_name(a)}={e}" for a, e in self.final_frontier)
        lines.append(f"final frontier: {{{names}}}")
        return "\n".join(lines)


async def run_voice_pipeline(
    rt: Runtime, *, utterances: int = 2, interval: float = 1.2, batches: int = 32
) -> VoiceReport:
    """Run ``utterances`` voice turns, ``interval`` seconds apart, beside background indexing.

    ``rt`` must hold the devices of :func:`laptop_devices`.
    """
    queues = {
        "cpu.audio": rt.queue("cpu", priority=10, name="cpu.audio"),
        "apu.whisper": rt.queue("apu", priority=10, name="apu.whisper"),
        "dma.h2d": rt.queue("dma", priority=10, name="dma.h2d"),
        "dgpu.phi3": rt.queue("dgpu", priority=10, name="dgpu.phi3"),
        "cpu.tokenize": rt.queue("cpu", priority=0, name="cpu.tokenize"),
        "npu.minilm": rt.queue("npu", priority=0, name="npu.minilm"),
    }
    audio = TimelineSemaphore(name="audio")
    transcript = TimelineSemaphore(name="transcript")
    in_vram = TimelineSemaphore(name="in_vram")
    reply = TimelineSemaphore(name="reply")
    tokens = TimelineSemaphore(name="tokens")
    vectors = TimelineSemaphore(name="vectors")
    data: dict[tuple[str, int], object] = {}

    # Background indexing: submitted up front, runs whenever the devices are free.
    tokenizations, embeddings = [], []
    for b in range(1, batches + 1):
        tokenizations.append(
            queues["cpu.tokenize"].submit(
                lambda b=b: data.__setitem__(("tokens", b), f"doc batch {b}"),
                name="tokenize",
                cost=STAGE_COSTS["tokenize"],
                signals=[(tokens, b)],
            )
        )
        embeddings.append(
            queues["npu.minilm"].submit(
                lambda b=b: data.__setitem__(("vector", b), hash(data[("tokens", b)])),
                name="embed",
                cost=STAGE_COSTS["embed"],
                waits=[(tokens, b)],
                signals=[(vectors, b)],
            )
        )

    stages: dict[str, list[Submission]] = {
        "preprocess": [],
        "whisper": [],
        "h2d_copy": [],
        "phi3": [],
    }
    for n in range(1, utterances + 1):
        arrival = (n - 1) * interval
        if rt.now() < arrival:
            await asyncio.sleep(arrival - rt.now())
        # One atomic submission per utterance, last stage first: the dGPU's FIFO holds
        # Phi-3 until the DMA signal arrives, with no round trip to this code.
        stages["phi3"].append(
            queues["dgpu.phi3"].submit(
                lambda n=n: f"reply to <{data[('vram', n)]}>",
                name="phi3",
                cost=STAGE_COSTS["phi3"],
                waits=[(in_vram, n)],
                signals=[(reply, n)],
            )
        )
        stages["h2d_copy"].append(
            queues["dma.h2d"].submit(
                lambda n=n: data.__setitem__(("vram", n), data[("text", n)]),
                name="h2d_copy",
                cost=STAGE_COSTS["h2d_copy"],
                waits=[(transcript, n)],
                signals=[(in_vram, n)],
            )
        )
        stages["whisper"].append(
            queues["apu.whisper"].submit(
                lambda n=n: data.__setitem__(("text", n), f"transcript of {data[('mel', n)]}"),
                name="whisper",
                cost=STAGE_COSTS["whisper"],
                waits=[(audio, n)],
                signals=[(transcript, n)],
            )
        )
        stages["preprocess"].append(
            queues["cpu.audio"].submit(
                lambda n=n: data.__setitem__(("mel", n), f"utterance {n} features"),
                name="preprocess",
                cost=STAGE_COSTS["preprocess"],
                signals=[(audio, n)],
            )
        )
    replies = [await sub for sub in stages["phi3"]]
    for sub in embeddings:
        await sub
    order = ["preprocess", "whisper", "h2d_copy", "phi3"]
    report = VoiceReport(
        replies=replies,
        stages={name: stages[name] for name in order},
        embeddings=embeddings,
        tokenizations=tokenizations,
        queues=queues,
    )
    for name in ("cpu.audio", "apu.whisper", "dma.h2d", "dgpu.phi3"):
        report.pipeline_axes[name] = queues[name].axis
    for name in ("cpu.tokenize", "npu.minilm"):
        report.embedding_axes[name] = queues[name].axis
    return report


async def simulate(
    *, utterances: int = 2, interval: float = 1.2, batches: int = 32, trace_path: str | None = None
) -> tuple[VoiceReport, str]:
    """Open a runtime on the laptop's fake devices, run the scenario, return report and timeline.

    Writes a Perfetto trace to ``trace_path`` when given.
    """
    async with open_runtime(laptop_devices()) as rt:
        report = await run_voice_pipeline(
            rt, utterances=utterances, interval=interval, batches=batches
        )
    if trace_path is not None:
        rt.trace.export_perfetto(trace_path)
    return report, rt.trace.format_timeline()
