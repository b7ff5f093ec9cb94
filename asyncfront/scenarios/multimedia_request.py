"""Scenario C4: one multimedia request through seven models, submitted atomically, in virtual time.

The user uploads an image with a voice note. One :class:`~asyncfront.Graph` holds the
whole request: audio and image decoding on the CPU; Whisper and CLIP, placed where
their weights are resident; Llama-3-70B on a 4-way tensor-parallel channel over GPUs
0-3; Code-Llama-34B on a 2-way channel over GPUs 6-7; SDXL-Turbo and XTTS, placed; the
response assembled on the CPU. Every stage is queued before any runs; the final
frontier (the merge of the assembled response's and the spoken reply's) carries the
axis of every device queue and channel that took part.

Numbers chosen (seconds): audio decode 0.02 and image decode 0.01 (CPU), Whisper 0.3,
CLIP 0.05, Llama-3-70B 2.0 (its description), Code-Llama 3.0 (the code), SDXL-Turbo 0.5
(four steps), XTTS 1.0, assembly 0.005. Weights: Whisper and SDXL-Turbo resident on GPU
4, CLIP and XTTS on GPU 5.
"""

from __future__ import annotations

from dataclasses import dataclass

from .._budget import GiB
from .._collective import CollectiveStep
from .._frontier import Frontier, axis_name
from .._graph import GraphRun
from .._queue import Submission
from .._runtime import Runtime, open_runtime
from ..devices.fake import FakeDevice

__all__ = (
    "MODELS",
    "SECONDS",
    "MultimediaReport",
    "multimedia_devices",
    "run_multimedia_request",
    "simulate",
)

SECONDS = {
    "audio_decode": 0.02,
    "image_decode": 0.01,
    "whisper": 0.3,
    "clip": 0.05,
    "llama": 2.0,
    "code": 3.0,
    "sdxl": 0.5,
    "assemble": 0.005,
    "tts": 1.0,
}
"""Seconds per stage on the device (or on each member of the channel) that runs it."""
MODELS = {
    "whisper": "Whisper-large-v3",
    "clip": "CLIP-ViT-L",
    "llama": "Llama-3-70B",
    "code": "Code-Llama-34B",
    "sdxl": "SDXL-Turbo",
    "tts": "XTTS-v2",
    "assemble": "response assembly",
}
"""The seven models (and the CPU's assembly) of the request, by stage."""


def multimedia_devices() -> list[FakeDevice]:
    """One node: a CPU and eight 192 GB GPUs."""
    return [FakeDevice("cpu", kind="cpu")] + [
        FakeDevice(f"gpu{i}", memory=192 * GiB) for i in range(8)
    ]


@dataclass
class MultimediaReport:
    """The request's run and the axes of everything it touched."""

    run: GraphRun
    response: dict[str, object]
    axes: dict[str, int]  # queue or channel name -> axis

    @property
    def final_frontier(self) -> Frontier:
        """The merge of the response's and the spoken reply's frontiers."""
        return self.run.frontier

    def describe(self) -> str:
        """Each stage's placement and timing, and the final frontier."""
        lines = ["multimedia request: image + voice note -> description, code, image, speech"]
        for name, sub in self.run.submissions.items():
            if isinstance(sub, CollectiveStep):
                parts, where = list(sub.parts), sub.channel.name
            else:
                assert isinstance(sub, Submission)  # every stage is pinned or placed at submit
                parts, where = [sub], sub.queue.name
            started = min(p.started_at or 0.0 for p in parts)
            lines.append(f"  {name:<13} on {where:<10} from {started:6.3f} s")
        names = ", ".join(f"{axis_name(a)}={e}" for a, e in self.final_frontier)
        lines.append(f"final frontier: {{{names}}}")
        return "\n".join(lines)


async def run_multimedia_request(rt: Runtime) -> MultimediaReport:
    """Submit the request as one graph and wait; ``rt`` holds :func:`multimedia_devices`."""
    rt.declare_model("whisper", 4 * GiB, resident_on=["gpu4"])
    rt.declare_model("clip", 1 * GiB, resident_on=["gpu5"])
    rt.declare_model("sdxl", 12 * GiB, resident_on=["gpu4"])
    rt.declare_model("tts", 4 * GiB, resident_on=["gpu5"])
    llama = rt.collective([rt.queue(f"gpu{i}") for i in range(4)], name="llama.tp")
    code = rt.collective([rt.queue(f"gpu{i}") for i in (6, 7)], name="code.tp")
    g = rt.graph("request")
    s = SECONDS
    audio = g.stage("audio_decode", lambda: "pcm", device="cpu", cost=s["audio_decode"])
    image = g.stage("image_decode", lambda: "rgb", device="cpu", cost=s["image_decode"])
    text = g.stage("whisper", "text({})".format, audio, model="whisper", cost=s["whisper"])
    vision = g.stage("clip", "vision({})".format, image, model="clip", cost=s["clip"])
    described = g.stage(
        "llama",
        lambda rank, t, v: f"description[{rank}]({t}, {v})",
        text,
        vision,
        device=llama,
        cost=s["llama"],
    )
    program = g.stage(
        "code", lambda rank, d: f"code[{rank}]({d[0]})", described, device=code, cost=s["code"]
    )
    picture = g.stage("sdxl", lambda c: f"image({c[0]})", program, model="sdxl", cost=s["sdxl"])
    g.stage(
        "assemble",
        lambda d, c, p: {"text": d[0], "code": c[0], "image": p},
        described,
        program,
        picture,
        device="cpu",
        cost=s["assemble"],
    )
    g.stage("tts", lambda d: f"speech({d[0]})", described, model="tts", cost=s["tts"])
    run = await g.submit()
    results = await run.results()
    axes = {q.name: q.axis for q in rt.queues if q.name.endswith(".p0")}
    axes |= {llama.name: llama.axis, code.name: code.axis}
    return MultimediaReport(run, results["assemble"], axes)


async def simulate(*, trace_path: str | None = None) -> tuple[MultimediaReport, str]:
    """Open a runtime on one node's fake devices, run C4, return report and timeline.

    Writes a Perfetto trace to ``trace_path`` when given.
    """
    async with open_runtime(multimedia_devices()) as rt:
        report = await run_multimedia_request(rt)
    if trace_path is not None:
        rt.trace.export_perfetto(trace_path)
    return report, rt.trace.format_timeline()
