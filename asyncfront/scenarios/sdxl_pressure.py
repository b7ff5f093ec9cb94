"""Scenario B2: SDXL under memory pressure on a two-GPU workstation, in virtual time.

The workstation (hardware configuration B) has two 24 GiB GPUs, a PCIe DMA engine per
GPU, two NVMe SSDs striped as one 14 GB/s device, and a CPU. GPU 0 holds the chat
LLM (Llama-3-8B with its quantized draft model and a large KV cache) and CLIP; GPU 1
holds Whisper, the RAG models with their vector index, and Bark. Neither GPU has the
6 GiB SDXL needs.

The user talks to the LLM (Whisper, speculative decoding, Bark) and then asks for an
image. SDXL's allocation on GPU 1 runs the runtime's pressure policy: Bark, the
BestEffort context, is asked to give memory back through ``ctx.on_evict`` and drops
its weights by freeing them with a death frontier (weights are read-only: nothing is
written back). The pool hands the same memory to SDXL only once Bark's queued speech
has finished, so SDXL's weights are read from NVMe into host memory at once but copied
into GPU 1 only then. When the next voice message needs Bark, its reload asks the
``rt.on_memory_pressure`` handler, which drops SDXL's idle weights; the reload lands
once SDXL's last step has finished. Every weight that moves goes through the storage
and copy queues, so it shows in the trace and in the frontiers.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

from .._budget import GiB, MiB, QoS, format_bytes
from .._context import Buffer, ExecutionContext, Session
from .._frontier import Frontier, axis_name
from .._queue import DeviceQueue, Submission
from .._runtime import Runtime, open_runtime
from .._semaphore import TimelineSemaphore
from .._trace import TraceRecord
from ..devices.fake import FakeDevice
from ..memory import PoolStatistics, ResidencyChange, Reuse

__all__ = (
    "COPY_ENGINES",
    "GPU_MEMORY",
    "NVME_BYTES_PER_SECOND",
    "PCIE_BYTES_PER_SECOND",
    "RESIDENT_MODELS",
    "SDXL",
    "STAGE_COSTS",
    "ImageJob",
    "MemorySample",
    "ModelSpec",
    "SdxlPressureReport",
    "VoiceTurn",
    "WeightsDrop",
    "WeightsLoad",
    "run_sdxl_pressure",
    "simulate",
    "workstation_devices",
)

GPU_MEMORY = 24 * GiB
"""VRAM of each of the two GPUs."""
NVME_BYTES_PER_SECOND = 14e9
"""Two NVMe SSDs at 7 GB/s sequential read each, striped."""
PCIE_BYTES_PER_SECOND = 50e9
"""Pinned host<->device copies over PCIe 5.0 x16 (64 GB/s raw per direction)."""
COPY_ENGINES = {"gpu0": "pcie0", "gpu1": "pcie1"}
"""The DMA engine that moves data between host memory and each GPU."""
IMAGE_BYTES = 1024 * 1024 * 3
"""One 1024x1024 RGB image, copied back to the host."""

STAGE_COSTS = {
    "preprocess": 0.030,  # CPU: resample and log-mel features of one utterance
    "whisper": 0.300,  # GPU 1: Whisper-large-v3 transcribes the utterance
    "draft": 0.020,  # GPU 0: the draft model proposes 4 tokens
    "verify": 0.050,  # GPU 0: Llama-3-8B verifies them
    "bark": 0.500,  # GPU 1: Bark synthesises one chunk of speech
    "embed": 0.050,  # GPU 1: BGE-large embeds one batch of documents
    "sdxl_encode": 0.050,  # GPU 1: SDXL's two text encoders
    "sdxl_step": 0.100,  # GPU 1: one UNet denoising step at 1024x1024
    "sdxl_decode": 0.200,  # GPU 1: VAE decode of the final latents
}
"""Seconds per stage at speed 1.0 (orders of magnitude of the real models)."""

ROUNDS_PER_REPLY = 8  # speculative rounds of 4 tokens in a voice reply
CHAT_ROUNDS = 4  # the LLM's short text answer to the image request
BARK_CHUNKS = 3  # speech chunks per voice reply
EMBED_BATCHES = 6  # background RAG indexing batches at the start
SAMPLE_PERIOD = 0.010  # seconds of virtual time between memory samples
HORIZON = 120.0  # virtual seconds after which the memory sampler gives up


@dataclass(frozen=True)
class ModelSpec:
    """One model of the workstation: where it runs, its tier and its memory.

    ``weights`` is one read-only buffer; ``workspace`` (KV cache, activations, a
    vector index) is allocated once and kept. ``droppable`` weights are accounting-only
    weights of the runtime's residency and may be dropped under memory pressure.
    """

    name: str
    model: str
    device: str
    qos: QoS
    weights: int
    workspace: int = 0
    base_memory: int | None = None
    droppable: bool = False

    @property
    def max_memory(self) -> int:
        """The context's budget: weights plus workspace."""
        return self.weights + self.workspace


RESIDENT_MODELS = (
    # GPU 0. Llama's workspace is its KV cache: 128 KiB per token, about 120k tokens.
    ModelSpec("llama", "Llama-3-8B", "gpu0", QoS.GUARANTEED, 5 * GiB, 15 * GiB),
    ModelSpec(
        "llama-draft", "Llama-3-8B draft, quantized", "gpu0", QoS.GUARANTEED, 1 * GiB, 512 * MiB
    ),
    ModelSpec("clip", "CLIP-ViT-L", "gpu0", QoS.GUARANTEED, 1 * GiB, 512 * MiB),
    # GPU 1. RAG keeps a 12 GiB vector index (about 3 million 1024-float embeddings)
    # and 0.5 GiB of batch buffers; its tier is Burstable with all of it reserved.
    ModelSpec("whisper", "Whisper-large-v3", "gpu1", QoS.GUARANTEED, 2 * GiB, 1 * GiB),
    ModelSpec(
        "rag", "BGE-large + reranker, vector index", "gpu1", QoS.BURSTABLE,
        1536 * MiB, 12800 * MiB, base_memory=14 * GiB,
    ),
    ModelSpec("bark", "Bark", "gpu1", QoS.BEST_EFFORT, 4 * GiB, droppable=True),
)  # fmt: skip
"""The models resident when the scenario starts, in allocation order per GPU."""

SDXL = ModelSpec("sdxl", "SDXL", "", QoS.BURSTABLE, 5 * GiB, 1 * GiB, base_memory=0, droppable=True)
"""SDXL: 5 GiB of weights and 1 GiB of UNet latents; its GPU is chosen on request."""


def workstation_devices() -> list[FakeDevice]:
    """Hardware configuration B: a CPU, two 24 GiB GPUs, their DMA engines, striped NVMe.

    Copy and storage devices take a cost in bytes and run at their bandwidth.
    """
    return [
        FakeDevice("cpu1", kind="cpu", concurrency=4),
        FakeDevice("gpu0", kind="gpu", memory=GPU_MEMORY),
        FakeDevice("gpu1", kind="gpu", memory=GPU_MEMORY),
        FakeDevice("pcie0", kind="copy", speed=PCIE_BYTES_PER_SECOND),
        FakeDevice("pcie1", kind="copy", speed=PCIE_BYTES_PER_SECOND),
        FakeDevice("nvme", kind="storage", speed=NVME_BYTES_PER_SECOND),
    ]


# -- records -----------------------------------------------------------------------


@dataclass(frozen=True)
class WeightsDrop:
    """Weights freed with a death frontier (no write-back: they are read-only).

    Attributes:
        time: when the drop was requested.
        model: whose weights.
        nbytes: bytes returned to the budget.
        offset: where they lived in the device's pool.
        death: the death frontier: the model queue's tail when dropped.
        pending: the entries of ``death`` not yet complete when dropped: what a reuse
            of the memory must wait for (empty when the model was idle).
        mechanism: ``"on_evict"`` (the tier policy) or ``"on_memory_pressure"``.
        requested_by: the context whose allocation caused it, when known.
    """

    time: float
    model: str
    nbytes: int
    offset: int | None
    death: Frontier
    pending: Frontier
    mechanism: str
    requested_by: str | None


@dataclass(frozen=True)
class WeightsLoad:
    """Weights loaded into device memory through the storage and copy queues.

    Attributes:
        model: whose weights.
        nbytes: their size.
        requested_at: when the allocation was asked for.
        granted_at: when the pool handed the memory out.
        offset: where they landed in the device's pool.
        requester: the frontier the pool was asked with (the model queue's).
        reuse: how the pool found the memory safe to hand out.
        read: the NVMe read into host memory (None when already in host memory).
        copy: the host-to-device copy into the allocated memory.
    """

    model: str
    nbytes: int
    requested_at: float
    granted_at: float
    offset: int | None
    requester: Frontier | None
    reuse: Reuse | None
    read: Submission | None
    copy: Submission


@dataclass(frozen=True)
class MemorySample:
    """The budgets of one device at one instant.

    Attributes:
        time: runtime seconds.
        device: the device's name.
        capacity: its memory.
        committed: reserved or used bytes (``capacity - rt.available_memory``).
        used: ``(context, bytes used)`` for each context on the device.
        pool_in_use: bytes the pool has handed out.
        pool_cached: bytes freed and not yet reused.
    """

    time: float
    device: str
    capacity: int
    committed: int
    used: tuple[tuple[str, int], ...]
    pool_in_use: int
    pool_cached: int


@dataclass
class VoiceTurn:
    """One voice message: preprocessing, Whisper, speculative rounds, Bark's speech."""

    arrival: float
    preprocess: Submission
    whisper: Submission
    drafts: list[Submission]
    verifies: list[Submission]
    speech: list[Submission] = field(default_factory=list)

    @property
    def final_frontier(self) -> Frontier:
        """The frontier of the last speech chunk: the reply's whole causal history."""
        frontier = self.speech[-1].frontier
        assert frontier is not None
        return frontier


@dataclass
class ImageJob:
    """The SDXL request: text encoders, UNet steps, VAE decode, download to the host."""

    requested_at: float
    encode: Submission
    steps: list[Submission]
    decode: Submission
    download: Submission
    latents: Buffer


# -- weight residency --------------------------------------------------------------


class _WeightsLog:
    """The scenario's record of the core residency's loads and drops of weights.

    The droppable models' weights are accounting-only weights of ``rt.residency``:
    Bark's are adopted where the warm start allocated them, SDXL's registered on
    request. Both may be dropped while their context still has work queued (the death
    frontier keeps the memory from reuse until that work is done), the QoS tiers'
    eviction of their context drops them (``evict_with_context``), and the residency's
    pressure handler drops idle ones for anyone else. Every load and drop is reported
    here through :meth:`~asyncfront.memory.Residency.on_change`.
    """

    def __init__(self, rt: Runtime, on_change: Callable[[], None]) -> None:
        self.drops: list[WeightsDrop] = []
        self.loads: list[WeightsLoad] = []
        self._on_change = on_change
        rt.residency.on_change(self._record)

    def _record(self, change: ResidencyChange) -> None:
        if change.action == "drop":
            assert change.death is not None and change.pending is not None
            assert change.reason is not None
            self.drops.append(
                WeightsDrop(
                    time=change.time,
                    model=change.weights,
                    nbytes=change.nbytes,
                    offset=change.offset,
                    death=change.death,
                    pending=change.pending,
                    mechanism=change.reason,
                    requested_by=change.requested_by,
                )
            )
        else:
            assert change.requested_at is not None and change.copy is not None
            self.loads.append(
                WeightsLoad(
                    model=change.weights,
                    nbytes=change.nbytes,
                    requested_at=change.requested_at,
                    granted_at=change.time,
                    offset=change.offset,
                    requester=change.requester,
                    reuse=change.reuse,
                    read=change.read,
                    copy=change.copy,
                )
            )
        self._on_change()


def _register_droppable(rt: Runtime, spec: ModelSpec, *, in_host_memory: bool) -> None:
    """Register ``spec``'s weights with the core residency as droppable, accounting-only."""
    rt.residency.register(
        spec.name,
        size=spec.weights,
        storage="nvme",
        in_host_memory=in_host_memory,
        drop_while_queued=True,
        evict_with_context=True,
    )


def _droppable_bytes(rt: Runtime, device: str) -> int:
    """Bytes of idle weights on ``device`` that the residency could drop."""
    return sum(r.nbytes for r in rt.residency.resident(device) if not r.pinned)


# -- memory sampling ---------------------------------------------------------------


class _MemorySampler:
    """Samples every GPU's budgets periodically and whenever the scenario changes them."""

    def __init__(self, rt: Runtime, devices: tuple[str, ...]) -> None:
        self.rt = rt
        self.devices = devices
        self.samples: list[MemorySample] = []

    def sample(self) -> None:
        rt = self.rt
        now = rt.now()
        for name in self.devices:
            device = rt.device(name)
            capacity = device.memory_capacity or 0
            pool = device.memory
            stats = pool.statistics() if pool is not None else None
            self.samples.append(
                MemorySample(
                    time=now,
                    device=name,
                    capacity=capacity,
                    committed=capacity - rt.available_memory(device),
                    used=tuple(
                        (ctx.name, rt.usage(ctx).used)
                        for ctx in rt.contexts
                        if ctx.device is device
                    ),
                    pool_in_use=stats.bytes_in_use if stats is not None else 0,
                    pool_cached=stats.bytes_cached if stats is not None else 0,
                )
            )

    async def run(self, period: float) -> None:
        while self.rt.now() < HORIZON:
            self.sample()
            await asyncio.sleep(period)


# -- the report --------------------------------------------------------------------


@dataclass
class SdxlPressureReport:
    """What the scenario did: stages, weight drops and loads, memory over time."""

    contexts: dict[str, ExecutionContext]
    queues: dict[str, DeviceQueue]
    offers: dict[str, int]  # GPU -> bytes it could give SDXL (free + droppable)
    sdxl_device: str
    voice: list[VoiceTurn]
    chat: list[Submission]
    embeddings: list[Submission]
    image: ImageJob
    drops: list[WeightsDrop]
    loads: list[WeightsLoad]
    samples: list[MemorySample]
    initial_offsets: dict[str, tuple[int | None, ...]]  # context -> its buffers' offsets
    final_offsets: dict[str, tuple[int | None, ...]]
    bark_offset: int | None  # where Bark's weights lived before the image request
    pools: dict[str, PoolStatistics]  # each GPU's pool at the end
    trace: list[TraceRecord]  # every submission, as the runtime's trace recorded it

    def axis(self, queue: str) -> int:
        """The axis of the queue called ``queue``."""
        return self.queues[queue].axis

    def drop_of(self, model: str) -> WeightsDrop:
        """The (first) drop of ``model``'s weights."""
        return next(d for d in self.drops if d.model == model)

    def load_of(self, model: str) -> WeightsLoad:
        """The (first) load of ``model``'s weights."""
        return next(load for load in self.loads if load.model == model)

    def describe(self) -> str:
        """Per-stage timings, weight drops and loads, memory over time, decisive frontiers."""
        lines = ["stages (virtual seconds):"]

        def span(label: str, sub: Submission) -> None:
            assert sub.started_at is not None and sub.finished_at is not None
            lines.append(
                f"  {label:<24} on {sub.queue.name:<12} "
                f"{sub.started_at:7.3f} -> {sub.finished_at:7.3f}"
            )

        for n, turn in enumerate(self.voice, start=1):
            lines.append(f" voice {n} (arrives {turn.arrival:.3f})")
            span("preprocess", turn.preprocess)
            span("whisper", turn.whisper)
            span(f"speculative x{len(turn.verifies)} first", turn.drafts[0])
            span(f"speculative x{len(turn.verifies)} last", turn.verifies[-1])
            span(f"bark x{len(turn.speech)} first", turn.speech[0])
            span(f"bark x{len(turn.speech)} last", turn.speech[-1])
        image = self.image
        offers = ", ".join(f"{gpu} {format_bytes(n)}" for gpu, n in self.offers.items())
        lines.append(
            f" image (requested {image.requested_at:.3f}; free + droppable: {offers}; "
            f"placed on {self.sdxl_device})"
        )
        for load in self.loads:
            if load.model == "sdxl":
                if load.read is not None:
                    span("nvme read weights", load.read)
                span("h2d weights", load.copy)
        span("text encoders", image.encode)
        span(f"unet x{len(image.steps)} first", image.steps[0])
        span(f"unet x{len(image.steps)} last", image.steps[-1])
        span("vae decode", image.decode)
        span("d2h image", image.download)
        lines.append("")
        lines.append("weights:")
        events: list[tuple[float, str]] = []
        for d in self.drops:
            who = f" for {d.requested_by}" if d.requested_by else ""
            events.append(
                (
                    d.time,
                    f"  {d.time:7.3f} drop {d.model} {format_bytes(d.nbytes)} at "
                    f"{_offset(d.offset)} via {d.mechanism}{who}, no write-back; "
                    f"pending at drop {_names(d.pending)}",
                )
            )
        for load in self.loads:
            assert load.copy.started_at is not None
            events.append(
                (
                    load.requested_at,
                    f"  {load.requested_at:7.3f} load {load.model} {format_bytes(load.nbytes)}: "
                    f"memory granted {load.granted_at:.3f} at {_offset(load.offset)} "
                    f"({load.reuse.value if load.reuse else 'no pool'}), "
                    f"copy starts {load.copy.started_at:.3f}",
                )
            )
        lines += [text for _, text in sorted(events, key=lambda e: e[0])]
        lines.append("")
        lines.append("memory over time (GiB used; committed/capacity):")
        for device in (self.sdxl_device, *(d for d in ("gpu0", "gpu1") if d != self.sdxl_device)):
            lines.append(f" {device}")
            previous = None
            for s in self.samples:
                if s.device != device:
                    continue
                row = (s.committed, s.used)
                if row == previous:
                    continue
                previous = row
                used = "  ".join(f"{name} {n / GiB:4.1f}" for name, n in s.used)
                lines.append(
                    f"  {s.time:7.3f}  {used}  = {s.committed / GiB:4.1f}/{s.capacity / GiB:.0f}"
                )
        lines.append("")
        lines.append("decisive frontiers:")
        bark_drop = self.drop_of("bark")
        lines.append(f"  bark's death frontier      {_names(bark_drop.death)}")
        sdxl_load = self.load_of("sdxl")
        if sdxl_load.requester is not None:
            lines.append(f"  sdxl's requester frontier  {_names(sdxl_load.requester)}")
        sdxl_drop = self.drop_of("sdxl")
        lines.append(f"  sdxl's death frontier      {_names(sdxl_drop.death)}")
        image_frontier = image.decode.frontier
        assert image_frontier is not None
        lines.append(f"  image (vae decode)         {_names(image_frontier)}")
        for n, turn in enumerate(self.voice, start=1):
            lines.append(f"  voice {n} speech (final)     {_names(turn.final_frontier)}")
        return "\n".join(lines)


def _names(frontier: Frontier) -> str:
    return "{" + ", ".join(f"{axis_name(a)}={e}" for a, e in frontier) + "}"


def _offset(offset: int | None) -> str:
    return "no pool offset" if offset is None else f"offset {format_bytes(offset)}"


def _offsets(buffers: list[Buffer]) -> tuple[int | None, ...]:
    return tuple(None if b.freed else b.offset for b in buffers)


# -- the scenario ------------------------------------------------------------------


async def _sleep_until(rt: Runtime, when: float) -> None:
    if rt.now() < when:
        await asyncio.sleep(when - rt.now())


def _speculative_reply(
    rt: Runtime,
    draft: Session,
    verify: Session,
    rounds: int,
    label: str,
    after: tuple[TimelineSemaphore, int] | None,
) -> tuple[list[Submission], list[Submission], TimelineSemaphore]:
    """Draft and verify ``rounds`` times; returns the submissions and the verify semaphore."""
    drafted = rt.semaphore(name=f"{label}.drafted")
    verified = rt.semaphore(name=f"{label}.verified")
    drafts, verifies = [], []
    first = [after] if after is not None else []
    for r in range(1, rounds + 1):
        before = [(verified, r - 1)] if r > 1 else first
        drafts.append(
            draft.submit(
                name="draft", cost=STAGE_COSTS["draft"], waits=before, signals=[(drafted, r)]
            )
        )
        verifies.append(
            verify.submit(
                name="verify",
                cost=STAGE_COSTS["verify"],
                waits=[(drafted, r)],
                signals=[(verified, r)],
            )
        )
    return drafts, verifies, verified


async def run_sdxl_pressure(
    rt: Runtime,
    *,
    image_at: float = 1.2,
    second_voice_at: float = 7.0,
    unet_steps: int = 50,
    sample_period: float = SAMPLE_PERIOD,
) -> SdxlPressureReport:
    """Run scenario B2 on ``rt`` (which must hold :func:`workstation_devices`).

    A voice message arrives at 0, the image request at ``image_at`` (while Bark still
    speaks the first reply) and a second voice message at ``second_voice_at``.
    """
    sampler = _MemorySampler(rt, ("gpu0", "gpu1"))
    async with contextlib.AsyncExitStack() as stack:
        contexts: dict[str, ExecutionContext] = {}
        sessions: dict[str, Session] = {}
        resident_buffers: dict[str, list[Buffer]] = {}
        nvme = rt.queue("nvme", name="nvme")
        audio_queue = rt.queue("cpu1", name="cpu1.audio")
        # One NVMe queue and one DMA queue per GPU carry every load, in order.
        copy_queues = {gpu: rt.queue(engine, name=engine) for gpu, engine in COPY_ENGINES.items()}
        residency = rt.residency
        residency.copy_engines.update(COPY_ENGINES)
        residency.load_queues["nvme"] = nvme
        residency.load_queues.update({q.name: q for q in copy_queues.values()})
        log = _WeightsLog(rt, sampler.sample)
        # The workstation starts warm: resident weights are already in VRAM.
        for spec in RESIDENT_MODELS:
            ctx = rt.create_context(
                spec.name,
                device=spec.device,
                max_memory=spec.max_memory,
                base_memory=spec.base_memory,
                qos=spec.qos,
            )
            session = await stack.enter_async_context(rt.session(ctx))
            contexts[spec.name], sessions[spec.name] = ctx, session
            weights = await session.allocate(spec.weights)
            resident_buffers[spec.name] = [weights]
            if spec.workspace:
                resident_buffers[spec.name].append(await session.allocate(spec.workspace))
            if spec.droppable:  # warm: its weights are in host memory and on the GPU
                _register_droppable(rt, spec, in_host_memory=True)
                residency.adopt(spec.name, spec.device, weights)
        bark_offset = resident_buffers["bark"][0].offset
        initial_offsets = {name: _offsets(b) for name, b in resident_buffers.items()}
        sampling = asyncio.ensure_future(sampler.run(sample_period))
        try:
            embeddings = [
                sessions["rag"].submit(name="bge embed", cost=STAGE_COSTS["embed"])
                for _ in range(EMBED_BATCHES)
            ]
            voice: list[VoiceTurn] = []
            audio = rt.semaphore(name="audio")
            transcript = rt.semaphore(name="transcript")

            async def voice_turn(n: int, arrival: float) -> None:
                await _sleep_until(rt, arrival)
                preprocess = audio_queue.submit(
                    name="preprocess", cost=STAGE_COSTS["preprocess"], signals=[(audio, n)]
                )
                whisper = sessions["whisper"].submit(
                    name="whisper",
                    cost=STAGE_COSTS["whisper"],
                    waits=[(audio, n)],
                    signals=[(transcript, n)],
                )
                drafts, verifies, verified = _speculative_reply(
                    rt,
                    sessions["llama-draft"],
                    sessions["llama"],
                    ROUNDS_PER_REPLY,
                    f"voice{n}",
                    (transcript, n),
                )
                turn = VoiceTurn(arrival, preprocess, whisper, drafts, verifies)
                voice.append(turn)
                # Bark's weights are made resident while Whisper and the LLM work.
                async with residency.using("bark", "gpu1") as bark:
                    for c in range(BARK_CHUNKS):
                        waits = [(verified, ROUNDS_PER_REPLY), bark.ready] if c == 0 else []
                        turn.speech.append(
                            sessions["bark"].submit(
                                name="bark", cost=STAGE_COSTS["bark"], waits=waits
                            )
                        )
                await turn.speech[-1]

            async def image_request() -> tuple[ImageJob, list[Submission], dict[str, int], str]:
                await _sleep_until(rt, image_at)
                requested_at = rt.now()
                # The LLM acknowledges the request in text while GPU 1 makes room.
                _, chat, _ = _speculative_reply(
                    rt, sessions["llama-draft"], sessions["llama"], CHAT_ROUNDS, "chat", None
                )
                offers = {
                    gpu: rt.available_memory(gpu) + _droppable_bytes(rt, gpu)
                    for gpu in ("gpu0", "gpu1")
                }
                device = next(gpu for gpu, offer in offers.items() if offer >= SDXL.max_memory)
                ctx = rt.create_context(
                    SDXL.name,
                    device=device,
                    max_memory=SDXL.max_memory,
                    base_memory=SDXL.base_memory,
                    qos=SDXL.qos,
                )
                contexts[SDXL.name] = ctx
                _register_droppable(rt, SDXL, in_host_memory=False)
                image_ready = rt.semaphore(name="image")
                async with rt.session(ctx) as job:
                    async with residency.using(SDXL.name, device) as sdxl:
                        latents = await job.allocate(SDXL.workspace)
                        sampler.sample()
                        encode = job.submit(
                            name="sdxl encode",
                            cost=STAGE_COSTS["sdxl_encode"],
                            waits=[sdxl.ready],
                        )
                        steps = [
                            job.submit(name="unet step", cost=STAGE_COSTS["sdxl_step"])
                            for _ in range(unet_steps)
                        ]
                        decode = job.submit(
                            name="vae decode",
                            cost=STAGE_COSTS["sdxl_decode"],
                            signals=[(image_ready, 1)],
                        )
                        download = copy_queues[device].submit(
                            name="d2h sdxl image", cost=IMAGE_BYTES, waits=[(image_ready, 1)]
                        )
                    await download
                sampler.sample()  # the job's latents were freed
                job_record = ImageJob(requested_at, encode, steps, decode, download, latents)
                return job_record, chat, offers, device

            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(voice_turn(1, 0.0))
                image_task = tasks.create_task(image_request())
                tasks.create_task(voice_turn(2, second_voice_at))
            image, chat, offers, sdxl_device = image_task.result()
            for sub in (*embeddings, *chat):
                await sub
            sampler.sample()
        finally:
            sampling.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampling
        final_offsets = {name: _offsets(b) for name, b in resident_buffers.items()}
        queues = {q.name: q for q in rt.queues}
        pools = {
            gpu: pool.statistics()
            for gpu in ("gpu0", "gpu1")
            if (pool := rt.device(gpu).memory) is not None
        }
        return SdxlPressureReport(
            contexts=contexts,
            queues=queues,
            offers=offers,
            sdxl_device=sdxl_device,
            voice=sorted(voice, key=lambda t: t.arrival),
            chat=chat,
            embeddings=embeddings,
            image=image,
            drops=list(log.drops),
            loads=list(log.loads),
            samples=list(sampler.samples),
            initial_offsets=initial_offsets,
            final_offsets=final_offsets,
            bark_offset=bark_offset,
            pools=pools,
            trace=rt.trace.records,
        )


async def simulate(
    *,
    image_at: float = 1.2,
    second_voice_at: float = 7.0,
    unet_steps: int = 50,
    trace_path: str | None = None,
) -> tuple[SdxlPressureReport, str]:
    """Open a runtime on the workstation's fake devices, run B2, return report and timeline.

    Writes a Perfetto trace to ``trace_path`` when given.
    """
    async with open_runtime(workstation_devices()) as rt:
        report = await run_sdxl_pressure(
            rt, image_at=image_at, second_voice_at=second_voice_at, unet_steps=unet_steps
        )
    if trace_path is not None:
        rt.trace.export_perfetto(trace_path)
    return report, rt.trace.format_timeline()
