"""Scenario B2c: a fine-tune pages its optimizer state to NVMe and back inside every step.

During a LoRA fine-tune the optimizer's moments (Adam's momentum and variance) are
needed only by the optimizer step. So each step pages them out once the forward pass
is done and back in before the step, on the storage axis, while the GPU runs the
backward pass. The semaphores are the scenario's:

- GPU 0: forward, ``signal(train_sem, step*3 + 1)``; backward, ``signal(train_sem,
  step*3 + 2)``.
- NVMe: page-out of the optimizer state, ``wait(train_sem, step*3 + 1)``,
  ``signal(page_sem, P)``; page-in, ``wait(page_sem, P)``, ``signal(page_sem, P + 1)``,
  with ``P = 2*step + 1``.
- GPU 0: optimizer step, ``wait(train_sem, step*3 + 2)`` and ``wait(page_sem, P + 1)``,
  ``signal(train_sem, (step + 1)*3)``; the next forward waits for that value.

Two ways to run it:

- :func:`simulate` (``python -m asyncfront simulate finetune_paging``): a LoRA fine-tune
  of Llama-3-8B on GPU 0 of the workstation, on fake devices in virtual time. Every
  step of the whole run is submitted at once, before any of it runs; the page-out
  (a PCIe copy, then an NVMe write) and the page-in (an NVMe read, then a PCIe copy)
  fit inside the backward pass, so the optimizer step starts the moment the backward
  pass ends.
- :func:`run_finetune`: a real fine-tune of a 2-layer GPT-2 (built from a config under
  a fixed seed) on the CPU, whose Adam moments live in pager pages
  (:class:`~asyncfront.models.PagedOptimizerState`) and go to a page file and back
  every step; :func:`run_finetune` with ``paged=False`` is the same fine-tune with
  PyTorch's own optimizer state, for comparison.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._budget import GiB, format_bytes
from .._frontier import Frontier, axis_name
from .._queue import Submission
from .._runtime import Runtime, open_runtime
from .._semaphore import TimelineSemaphore
from .._trace import TraceRecord
from ..devices.cpu import CpuDevice
from ..devices.fake import FakeDevice
from ..devices.storage import StorageDevice
from ..memory._pager import Pager, Tier
from ..memory._tensors import import_torch

__all__ = (
    "ADAPTER_PARAMETERS",
    "DEFAULT_STEPS",
    "FINETUNE_TEXT",
    "NVME_BYTES_PER_SECOND",
    "OPTIMIZER_BYTES",
    "PCIE_BYTES_PER_SECOND",
    "STAGE_SECONDS",
    "FinetuneReport",
    "FinetuneStep",
    "SimulatedStep",
    "SimulationReport",
    "finetune_devices",
    "page_values",
    "run_finetune",
    "simulate",
    "tiny_gpt2",
    "train_values",
)

DEFAULT_STEPS = 3

ADAPTER_PARAMETERS = 168_000_000
"""LoRA adapters of rank 64 on every projection of Llama-3-8B's 32 layers (about 168 M)."""
OPTIMIZER_BYTES = 2 * 4 * ADAPTER_PARAMETERS
"""Adam's two FP32 moments of the adapters: 1.25 GiB."""
NVME_BYTES_PER_SECOND = 14e9
"""Two NVMe SSDs striped (hardware configuration B)."""
PCIE_BYTES_PER_SECOND = 50e9
"""Pinned host <-> GPU copies over PCIe 5.0 x16."""
STAGE_SECONDS = {"forward": 0.300, "backward": 0.600, "step": 0.020}
"""GPU 0 seconds per training step of a batch of 8 x 2048 tokens (orders of magnitude)."""

FINETUNE_TEXT = (
    "asyncfront orders work with timeline semaphores whose signals carry frontiers. "
    "A page-out waits for the forward pass; the optimizer step waits for the page-in. "
)
"""The fixed text the real fine-tune learns (its bytes are the tokens)."""


def train_values(step: int) -> tuple[int, int, int]:
    """``train_sem`` after the forward, the backward and the optimizer step of ``step``."""
    return step * 3 + 1, step * 3 + 2, (step + 1) * 3


def page_values(step: int) -> tuple[int, int]:
    """``page_sem`` after the page-out (``P``) and the page-in (``P + 1``) of ``step``."""
    return 2 * step + 1, 2 * step + 2


# -- in virtual time ---------------------------------------------------------------------


@dataclass
class SimulatedStep:
    """One training step's submissions in the simulation."""

    step: int
    forward: Submission
    backward: Submission
    copy_out: Submission
    write: Submission
    read: Submission
    copy_in: Submission
    optimizer: Submission

    @property
    def page_out(self) -> tuple[float, float]:
        """When the page-out ran: the copy's start to the write's end."""
        return _interval(self.copy_out, self.write)

    @property
    def page_in(self) -> tuple[float, float]:
        """When the page-in ran: the read's start to the copy's end."""
        return _interval(self.read, self.copy_in)


@dataclass
class SimulationReport:
    """Every step of the simulated fine-tune, with the semaphores and axes they used."""

    steps: list[SimulatedStep]
    train: TimelineSemaphore
    page: TimelineSemaphore
    axes: dict[str, int] = field(default_factory=dict)
    submitted_before_start: bool = False

    def describe(self) -> str:
        """Each step's compute and paging intervals, and the optimizer step's frontier."""
        lines = [
            f"LoRA fine-tune of Llama-3-8B on gpu0: {len(self.steps)} steps, "
            f"{format_bytes(OPTIMIZER_BYTES)} of Adam moments paged to NVMe and back every step",
        ]
        for s in self.steps:
            fwd, bwd = _interval(s.forward), _interval(s.backward)
            out, back = s.page_out, s.page_in
            opt = _interval(s.optimizer)
            lines.append(
                f"  step {s.step}: forward {fwd[0]:.3f}-{fwd[1]:.3f}  backward {bwd[0]:.3f}-"
                f"{bwd[1]:.3f}  page-out {out[0]:.3f}-{out[1]:.3f}  page-in {back[0]:.3f}-"
                f"{back[1]:.3f}  optimizer {opt[0]:.3f}-{opt[1]:.3f} s"
            )
            frontier = s.optimizer.frontier or Frontier()
            names = ", ".join(f"{axis_name(a)}: {e}" for a, e in frontier)
            lines.append(f"    optimizer step frontier {{{names}}}")
        return "\n".join(lines)


def _interval(first: Submission, last: Submission | None = None) -> tuple[float, float]:
    end = last if last is not None else first
    return first.started_at or 0.0, end.finished_at or 0.0


def b2c_devices() -> list[FakeDevice]:
    """GPU 0 of the workstation, its PCIe DMA engine and the striped NVMe."""
    return [
        FakeDevice("gpu0", kind="gpu", memory=24 * GiB),
        FakeDevice("pcie0", kind="copy", speed=PCIE_BYTES_PER_SECOND),
        FakeDevice("nvme", kind="storage", speed=NVME_BYTES_PER_SECOND),
    ]


def submit_b2c(rt: Runtime, steps: int) -> SimulationReport:
    """Submit every step of the fine-tune at once on :func:`b2c_devices` (nothing waits).

    Raises:
        ValueError: fewer than one step.
    """
    if steps < 1:
        raise ValueError(f"a fine-tune needs steps >= 1, got {steps}")
    gpu = rt.queue("gpu0", name="gpu0.train")
    pcie = rt.default_queue("pcie0")
    nvme = rt.default_queue("nvme")
    train = rt.semaphore(name="train_sem")
    page = rt.semaphore(name="page_sem")
    moved = rt.semaphore(name="optimizer_state.staged")  # copy -> write, read -> copy
    report = SimulationReport([], train, page)
    for step in range(steps):
        forward_done, backward_done, stepped = train_values(step)
        paged_out, paged_in = page_values(step)
        before = [(train, step * 3)] if step else []
        forward = gpu.submit(
            name=f"forward {step}",
            cost=STAGE_SECONDS["forward"],
            waits=before,
            signals=[(train, forward_done)],
        )
        backward = gpu.submit(
            name=f"backward {step}",
            cost=STAGE_SECONDS["backward"],
            waits=[(train, forward_done)],
            signals=[(train, backward_done)],
        )
        # Page-out of the previous step's optimizer state: the forward is done with it.
        copy_out = pcie.submit(
            name=f"page-out copy {step}",
            cost=OPTIMIZER_BYTES,
            waits=[(train, forward_done)],
            signals=[(moved, 2 * step + 1)],
        )
        write = nvme.submit(
            name=f"page-out write {step}",
            cost=OPTIMIZER_BYTES,
            waits=[(moved, 2 * step + 1)],
            signals=[(page, paged_out)],
        )
        read = nvme.submit(
            name=f"page-in read {step}",
            cost=OPTIMIZER_BYTES,
            waits=[(page, paged_out)],
            signals=[(moved, 2 * step + 2)],
        )
        copy_in = pcie.submit(
            name=f"page-in copy {step}",
            cost=OPTIMIZER_BYTES,
            waits=[(moved, 2 * step + 2)],
            signals=[(page, paged_in)],
        )
        optimizer = gpu.submit(
            name=f"optimizer step {step}",
            cost=STAGE_SECONDS["step"],
            waits=[(train, backward_done), (page, paged_in)],
            signals=[(train, stepped)],
        )
        report.steps.append(
            SimulatedStep(step, forward, backward, copy_out, write, read, copy_in, optimizer)
        )
    report.submitted_before_start = all(s.forward.started_at is None for s in report.steps)
    report.axes = {q.name: q.axis for q in (gpu, pcie, nvme)}
    return report


async def simulate(
    *, steps: int = DEFAULT_STEPS, trace_path: str | None = None
) -> tuple[SimulationReport, str]:
    """Run B2c in virtual time on fake devices; returns the report and a text timeline.

    Writes a Perfetto trace to ``trace_path`` when given.
    """
    async with open_runtime(b2c_devices()) as rt:
        report = submit_b2c(rt, steps)
        await report.steps[-1].optimizer
    if trace_path is not None:
        rt.trace.export_perfetto(trace_path)
    return report, rt.trace.format_timeline()


# -- for real, on the CPU ----------------------------------------------------------------


def tiny_gpt2(seed: int = 0) -> Any:
    """A 2-layer GPT-2 (64 wide, 4 heads, 256 byte tokens) from a config, without dropout."""
    torch = import_torch()
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=2,
        n_embd=64,
        n_head=4,
        vocab_size=256,
        n_positions=128,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=None,
    )
    model: Any = GPT2LMHeadModel(config)
    model.loss_type = "ForCausalLM"  # the loss GPT-2 uses; said, so it is not logged
    return model.eval()


def finetune_devices(directory: str | Path) -> list[Any]:
    """A "GPU" (the CPU, one worker), host memory and a page file in ``directory``."""
    return [
        CpuDevice("gpu0", workers=1, memory=64 << 20),
        CpuDevice("host", workers=1, memory=64 << 20),
        StorageDevice(directory, name="nvme"),
    ]


@dataclass
class FinetuneStep:
    """One real training step: its loss and the trace records of its work."""

    step: int
    loss: float
    forward: TraceRecord
    backward: TraceRecord
    optimizer: TraceRecord
    page_out: tuple[TraceRecord, ...] = ()
    page_in: tuple[TraceRecord, ...] = ()

    @property
    def page_out_interval(self) -> tuple[float, float] | None:
        """From the first page-out copy's start to the last write's end (None unpaged)."""
        return _span(self.page_out)

    @property
    def page_in_interval(self) -> tuple[float, float] | None:
        """From the first page-in read's start to the last copy's end (None unpaged)."""
        return _span(self.page_in)


@dataclass
class FinetuneReport:
    """What a real fine-tune did: losses, final weights, and, paged, what moved and when."""

    paged: bool
    steps: list[FinetuneStep]
    weights: dict[str, Any]
    moments: dict[str, tuple[Any, ...]]
    optimizer_bytes: int
    storage_axis: int

    @property
    def losses(self) -> list[float]:
        """The loss of every step."""
        return [s.loss for s in self.steps]

    def describe(self) -> str:
        """Losses, and per step the page-out, page-in and backward timings in ms."""
        kind = "paged" if self.paged else "unpaged"
        lines = [
            f"fine-tune ({kind}): {len(self.steps)} steps, "
            f"{format_bytes(self.optimizer_bytes)} of Adam moments"
        ]
        for s in self.steps:
            line = (
                f"  step {s.step}: loss {s.loss:.6f}  backward {s.backward.duration * 1e3:.1f} ms"
            )
            out, back = s.page_out_interval, s.page_in_interval
            if out is not None and back is not None:
                line += (
                    f"  page-out {(out[1] - out[0]) * 1e3:.1f} ms"
                    f"  page-in {(back[1] - back[0]) * 1e3:.1f} ms"
                )
            lines.append(line)
        return "\n".join(lines)


def _span(records: tuple[TraceRecord, ...]) -> tuple[float, float] | None:
    if not records:
        return None
    return min(r.started_at for r in records), max(r.finished_at for r in records)


def _batches(steps: int, batch: int, length: int) -> list[Any]:
    """Fixed windows of :data:`FINETUNE_TEXT`'s bytes, ``batch`` x ``length`` per step."""
    torch = import_torch()
    data = FINETUNE_TEXT.encode()
    tokens = torch.tensor(list(data * (1 + (batch * length) // len(data) + steps)))
    return [
        torch.stack([tokens[(7 * s + 13 * j) % len(data) :][:length] for j in range(batch)])
        for s in range(steps)
    ]


async def run_finetune(
    rt: Runtime,
    *,
    paged: bool = True,
    steps: int = DEFAULT_STEPS,
    batch: int = 8,
    length: int = 96,
    lr: float = 1e-3,
    seed: int = 0,
) -> FinetuneReport:
    """Fine-tune :func:`tiny_gpt2` on :data:`FINETUNE_TEXT` on ``rt`` (:func:`finetune_devices`).

    With ``paged``, the Adam moments are pager pages that go to the page file after
    every forward pass and come back before the optimizer step, ordered by
    ``train_sem`` and ``page_sem`` as in B2c.

    Raises:
        ValueError: fewer than one step.
    """
    if steps < 1:
        raise ValueError(f"a fine-tune needs steps >= 1, got {steps}")
    torch = import_torch()
    from ..models._optimizer import PagedOptimizerState

    model = tiny_gpt2(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    context = rt.create_context("finetune", device="gpu0", max_memory=32 << 20)
    queue = context.queue
    storage = rt.device("nvme")
    assert isinstance(storage, StorageDevice)
    nvme = storage.queue(name="nvme.pages")
    pager: Pager | None = None
    state: PagedOptimizerState | None = None
    if paged:
        host = rt.create_context("host", device="host", max_memory=32 << 20)
        pager = Pager(rt, host=host, copy=rt.queue("host", name="copy"), storage=nvme)
        state = PagedOptimizerState(optimizer, pager, context)
        await state.allocate()
    train = rt.semaphore(name="train_sem")
    page = rt.semaphore(name="page_sem")
    held: dict[str, Any] = {}

    def forward(ids: Any) -> float:
        optimizer.zero_grad(set_to_none=True)
        held["loss"] = model(ids, labels=ids).loss
        return float(held["loss"].detach())

    def backward() -> None:
        held.pop("loss").backward()

    async def move(step: int) -> None:
        assert state is not None
        forward_done, _, _ = train_values(step)
        paged_out, paged_in = page_values(step)
        try:
            await train.wait(forward_done)  # the forward is done: the moments are idle
            page.signal(paged_out, await state.page_out(Tier.FILE))
            await page.wait(paged_out)
            page.signal(paged_in, await state.page_in())
        except Exception as exc:
            page.fail(exc)
            raise

    losses: list[float] = []
    mover: asyncio.Task[None] | None = None
    try:
        for step, ids in enumerate(_batches(steps, batch, length)):
            forward_done, backward_done, stepped = train_values(step)
            fwd = queue.submit(
                forward,
                ids,
                waits=[(train, step * 3)] if step else [],
                signals=[(train, forward_done)],
                name=f"forward {step}",
            )
            queue.submit(
                backward,
                waits=[(train, forward_done)],
                signals=[(train, backward_done)],
                name=f"backward {step}",
            )
            waits = [(train, backward_done)]
            if state is not None:
                _, paged_in = page_values(step)
                mover = asyncio.create_task(move(step))
                await page.wait(paged_in)  # the moments are back: pin and bind them
                waits.append((page, paged_in))
                await state.step(
                    queue, waits=waits, signals=[(train, stepped)], name=f"optimizer step {step}"
                )
                await mover
                mover = None
            else:
                await queue.submit(
                    optimizer.step,
                    waits=waits,
                    signals=[(train, stepped)],
                    name=f"optimizer step {step}",
                )
            losses.append(await fwd)
        weights = {name: p.detach().clone() for name, p in model.named_parameters()}
        if state is not None:
            async with state.pinned() as (waits, signals):
                moments = await queue.submit(
                    _moments_of, optimizer, model, waits=waits, signals=signals, name="moments"
                )
        else:
            moments = _moments_of(optimizer, model)
        optimizer_bytes = state.nbytes if state is not None else _moment_bytes(optimizer)
    finally:
        if mover is not None:  # the loop failed first: stop the paging and collect it
            mover.cancel()
            await asyncio.gather(mover, return_exceptions=True)
        if state is not None:
            await state.aclose()
        if pager is not None:
            await pager.aclose()
    named = {r.name: r for r in rt.trace}
    paging = [r for r in rt.trace if r.name.startswith(("page-out", "page-in"))]
    report_steps = []
    for step, loss in enumerate(losses):
        fwd_r, bwd_r = named[f"forward {step}"], named[f"backward {step}"]
        following = named.get(f"forward {step + 1}")
        later = following.started_at if following is not None else float("inf")
        mine = [r for r in paging if fwd_r.finished_at <= r.started_at < later]
        report_steps.append(
            FinetuneStep(
                step,
                loss,
                fwd_r,
                bwd_r,
                named[f"optimizer step {step}"],
                tuple(r for r in mine if r.name.startswith("page-out")),
                tuple(r for r in mine if r.name.startswith("page-in")),
            )
        )
    return FinetuneReport(
        paged=paged,
        steps=report_steps,
        weights=weights,
        moments=moments,
        optimizer_bytes=optimizer_bytes,
        storage_axis=nvme.axis,
    )


def _moments_of(optimizer: Any, model: Any) -> dict[str, tuple[Any, ...]]:
    """A copy of every parameter's Adam moments, by parameter name."""
    out = {}
    for name, p in model.named_parameters():
        state = optimizer.state[p]
        out[name] = (state["exp_avg"].clone(), state["exp_avg_sq"].clone())
    return out


def _moment_bytes(optimizer: Any) -> int:
    return sum(
        state[key].nbytes
        for state in optimizer.state.values()
        for key in ("exp_avg", "exp_avg_sq")
        if key in state
    )
