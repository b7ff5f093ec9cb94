"""Residency of immutable weights: load through storage and copy queues, pin, drop by cost.

Weights are registered once (``rt.weights(name, source)``), from a safetensors file or
a dict of host tensors. ``await rt.ensure_resident(weights, device)`` loads them into
the device's memory, charged to a context's budget: the context passed as
``context=``, else the context named like the weights (one context per model: its
queue runs the model, its budget holds the model's weights and activations).
Concurrent requests for the same weights on the same device share one load; loads of
different weights run at once on their own storage (and copy) queues.

``async with rt.using(weights, device) as w:`` loads if needed and pins the weights
for the block, so work submitted and awaited inside cannot lose them: load-then-run is
atomic. Weights whose context still has queued or running work count as pinned too.

Weights are immutable, so dropping them writes nothing back: their buffer is freed
with a death frontier (the context queue's tail merged with the load's frontier) and
the tensors are released. Under memory pressure the residency drops the weights that
are cheapest to lose, by priority and then by expected reload cost per second
(reload time times request rate): :func:`choose_evictions`, a pure function.

Weights registered with a ``size`` and no source are accounting-only, for simulations
on fake devices: a load charges the budget and takes the storage device's time for
the bytes (a read of ``size`` on its queue, then a copy of ``size`` on the target
device's copy engine when :attr:`Residency.copy_engines` names one) in virtual time,
and moves no bytes; everything else (sharing, pins, drops with a death frontier,
eviction by cost, placement) is the same. Three registration options serve simulations
of a serving system's weight manager: ``in_host_memory`` (a host copy exists, so a load
through a copy engine skips the storage read; the first read leaves one, and it survives
drops), ``drop_while_queued`` (queued work of the context does not pin the weights: the
death frontier keeps their memory from reuse until that work is done) and
``evict_with_context`` (the context's ``on_evict`` drops them, so the QoS tiers' eviction
takes them). :meth:`Residency.adopt` takes weights already in a device's memory (a warm
start), and :meth:`Residency.on_change` reports every load and drop as a
:class:`ResidencyChange`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._budget import format_bytes
from .._frontier import Frontier
from .._progress import progress
from .._semaphore import TimelineSemaphore
from ._reclaim import Reclaim, ReclaimPlan, RequestRate, plan_reclaim, shortfall
from ._safetensors import SAFETENSORS_DTYPES, TensorLayout, read_safetensors_layout
from ._tensors import buffer_bytes, copy_bytes, import_torch, release_pages, typed_view

if TYPE_CHECKING:
    from .._context import Buffer, ExecutionContext
    from .._queue import DeviceQueue, Submission
    from .._runtime import Runtime
    from ..devices._base import Device
    from ..devices.storage import StorageDevice
    from ..models._model import Model, ResidentModel

__all__ = (
    "EvictionCandidate",
    "Residency",
    "ResidencyChange",
    "ResidencyStatistics",
    "ResidentWeights",
    "Weights",
    "WeightsFile",
    "choose_evictions",
)

DEFAULT_BANDWIDTH = 2 << 30
"""Bytes per second assumed for a first load, before one has been measured."""

_ALIGN = 64  # offsets of tensors packed from a dict: a multiple of every element size

# bytes per element by torch dtype name, and the floating ones (which dtype= may convert)
_SIZES = {name: size for name, size in SAFETENSORS_DTYPES.values()}
_FLOAT_SIZES = {name: size for name, size in _SIZES.items() if name.startswith(("float", "bfloat"))}


@dataclass(frozen=True)
class WeightsFile:
    """One safetensors file of a weights set: where its data section goes in the block.

    Attributes:
        path: the file.
        data_offset: the file offset of its data section (after the header).
        start: where the data section lands in the weights' device block.
        nbytes: the data section's length.
    """

    path: Path
    data_offset: int
    start: int
    nbytes: int


class Weights:
    """Immutable weights registered with :meth:`asyncfront.Runtime.weights`.

    Attributes:
        name: the weights' name (also the default context that holds them).
        path: the safetensors file (the first, for a sharded set), or None for weights
            given as host tensors or accounting-only.
        accounting: whether they are accounting-only (a size and no source): loads
            charge the budget and take the storage's time, and move no bytes.
        files: every safetensors file and where its bytes go in the block (one per
            shard; empty for host tensors).
        nbytes: bytes of device memory they take.
        priority: eviction priority (higher stays longer); None uses the context's.
        request_rate: expected requests per second; None estimates it from requests.
        layouts: every tensor's dtype, shape and place in the block.
        load_seconds: the last load's duration, or None before the first.
        load_times: device name -> the duration of the last load there (placement's
            load time for that device).
        in_host_memory: accounting-only: host memory holds a copy, so a load through a
            copy engine skips the storage read (set by the first such read; drops keep it).
        drop_while_queued: accounting-only: queued or running work of the holding context
            does not pin them (its death frontier guards the memory instead).
        evict_with_context: the holding context's ``on_evict`` drops them.
    """

    def __init__(
        self,
        name: str,
        source: str
        | os.PathLike[str]
        | Mapping[str, Any]
        | Sequence[str | os.PathLike[str]]
        | None,
        *,
        size: int | None = None,
        priority: int | None = None,
        request_rate: float | None = None,
        storage: str | Device | None = None,
        dtype: str | None = None,
        in_host_memory: bool = False,
        drop_while_queued: bool = False,
        evict_with_context: bool = False,
    ) -> None:
        if source is not None and (in_host_memory or drop_while_queued):
            raise ValueError(
                f"weights {name!r}: in_host_memory and drop_while_queued are for "
                "accounting-only weights (a size and no source); real weights' bytes are "
                "read from their source, and queued work reads their tensors"
            )
        if dtype is not None and dtype not in _FLOAT_SIZES:
            raise ValueError(
                f"weights {name!r}: dtype must be a floating dtype name "
                f"({', '.join(sorted(_FLOAT_SIZES))}), got {dtype!r}"
            )
        self.name = name
        self.priority = priority
        self.request_rate = request_rate
        self.storage = storage
        self.in_host_memory = in_host_memory
        self.drop_while_queued = drop_while_queued
        self.evict_with_context = evict_with_context
        self._host: dict[str, Any] | None = None
        self.files: tuple[WeightsFile, ...] = ()
        self.file_layouts: tuple[TensorLayout, ...] | None = None
        self.staging_nbytes = 0
        self.accounting = source is None
        if source is None:
            if size is None or size <= 0:
                raise ValueError(
                    f"weights {name!r}: accounting-only weights (no source) need size= > 0 "
                    f"bytes, got {size}"
                )
            self.path: Path | None = None
            self.data_offset = 0
            self.layouts: tuple[TensorLayout, ...] = ()
            actual = size
        elif isinstance(source, Mapping):
            self.path = None
            self._host = dict(source)
            if dtype is not None:
                torch = import_torch()
                wanted = getattr(torch, dtype)
                self._host = {
                    k: v.to(wanted) if v.is_floating_point() else v for k, v in self._host.items()
                }
            self.data_offset = 0
            layouts, offset = [], 0
            for key, tensor in self._host.items():
                offset = -(-offset // _ALIGN) * _ALIGN
                nbytes = tensor.numel() * tensor.element_size()
                dtype = str(tensor.dtype).removeprefix("torch.")
                layouts.append(TensorLayout(key, dtype, tuple(tensor.shape), offset, nbytes))
                offset += nbytes
            self.layouts = tuple(layouts)
            actual = offset
        else:
            paths = [source] if isinstance(source, (str, os.PathLike)) else list(source)
            if not paths:
                raise ValueError(f"weights {name!r}: no safetensors files given")
            files, layouts, start = [], [], 0
            seen: dict[str, str | os.PathLike[str]] = {}
            for file in paths:
                data_offset, entries = read_safetensors_layout(file)
                nbytes = max((t.offset + t.nbytes for t in entries), default=0)
                start = -(-start // _ALIGN) * _ALIGN
                for t in entries:
                    if t.name in seen:
                        raise ValueError(
                            f"weights {name!r}: tensor {t.name!r} is in both "
                            f"{os.fspath(seen[t.name])!r} and {os.fspath(file)!r}"
                        )
                    seen[t.name] = file
                    layouts.append(
                        TensorLayout(t.name, t.dtype, t.shape, start + t.offset, t.nbytes)
                    )
                files.append(WeightsFile(Path(file), data_offset, start, nbytes))
                start += nbytes
            self.files = tuple(files)
            self.path = self.files[0].path
            self.data_offset = self.files[0].data_offset
            self.layouts = tuple(layouts)
            actual = start
            if dtype is not None and any(
                t.dtype in _FLOAT_SIZES and t.dtype != dtype for t in layouts
            ):
                # The files' bytes are read into host staging and converted into the block.
                self.file_layouts, self.staging_nbytes = self.layouts, start
                converted, offset = [], 0
                for t in layouts:
                    target = dtype if t.dtype in _FLOAT_SIZES else t.dtype
                    nbytes = t.nbytes // _SIZES[t.dtype] * _SIZES[target]
                    offset = -(-offset // _ALIGN) * _ALIGN
                    converted.append(TensorLayout(t.name, target, t.shape, offset, nbytes))
                    offset += nbytes
                self.layouts, actual = tuple(converted), offset
        if size is not None and size != actual:
            raise ValueError(
                f"weights {name!r}: size={size:,} bytes given, but the tensors take {actual:,}"
            )
        if actual == 0:
            raise ValueError(f"weights {name!r} hold no bytes")
        self.nbytes = actual
        self.load_seconds: float | None = None  # the last load's duration, once measured
        self.load_times: dict[str, float] = {}  # device name -> its last load's duration

    def __repr__(self) -> str:
        if self.accounting:
            source = "accounting only"
        elif self.path is None:
            source = "host tensors"
        elif len(self.files) > 1:
            source = f"{len(self.files)} files from {os.fspath(self.path)}"
        else:
            source = os.fspath(self.path)
        return (
            f"<Weights {self.name!r} {format_bytes(self.nbytes)} in {len(self.layouts)} "
            f"tensors from {source!r}>"
        )


class ResidentWeights:
    """Weights loaded on one device: their tensors and the frontier of the load.

    Attributes:
        weights: what was loaded.
        device: where.
        context: whose budget holds them.
        tensors: name -> tensor on the device (empty once dropped).
        ready: ``(semaphore, value)`` reached when the load finished; waiting on it
            gives work the load's frontier (its storage and copy axes).
        frontier: the load's frontier.
        pins: how many ``using`` blocks hold them.
        work: how many queued or running submissions hold them (see
            :meth:`hold_until_done`).
        dropped: whether they were dropped (the handle is then dead).
    """

    def __init__(
        self,
        weights: Weights,
        device: Device,
        context: ExecutionContext,
        buffer: Buffer,
        raw: Any,
        ready: tuple[TimelineSemaphore, int],
        frontier: Frontier,
    ) -> None:
        self.weights = weights
        self.device = device
        self.context = context
        self.ready = ready
        self.frontier = frontier
        self.pins = 0
        self.work = 0
        self.dropped = False
        self._on_drop: list[Callable[[ResidentWeights], None]] = []
        self._buffer: Buffer | None = buffer
        self._raw: Any = raw
        self.tensors: dict[str, Any] = {}
        if raw is None:  # accounting-only: no bytes, no tensors
            return
        torch = import_torch()
        for t in weights.layouts:
            dtype = getattr(torch, t.dtype)
            self.tensors[t.name] = typed_view(raw, t.offset, dtype, t.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of device memory held."""
        return self.weights.nbytes

    @property
    def pinned(self) -> bool:
        """Whether eviction must keep them: a ``using`` block holds them, submissions
        that use them are queued or running, or their context has work queued or running."""
        if self.pins > 0 or self.work > 0:
            return True
        return not self.weights.drop_while_queued and self.context.queue._busy()

    def hold_until_done(self, submission: Submission) -> None:
        """Keep the weights pinned until ``submission`` has completed or failed."""
        if submission.done():
            return
        self.work += 1
        fut: asyncio.Future[None] = submission.queue._loop.create_future()
        if submission._futures is None:
            submission._futures = [fut]
        else:
            submission._futures.append(fut)
        fut.add_done_callback(self._work_done)

    def _work_done(self, _: object) -> None:
        self.work -= 1

    def __repr__(self) -> str:
        state = "dropped" if self.dropped else f"pins={self.pins} work={self.work}"
        return (
            f"<ResidentWeights {self.weights.name!r} on {self.device.name!r} "
            f"{format_bytes(self.nbytes)} context={self.context.name!r} {state}>"
        )


@dataclass(frozen=True)
class ResidencyChange:
    """One load or drop of weights, as :meth:`Residency.on_change` callbacks receive it.

    The residency keeps none of these: a callback that wants a history keeps its own.

    Attributes:
        action: ``"load"`` or ``"drop"``.
        weights: the weights' name.
        device: the device's name.
        context: the context whose budget holds (held) them.
        nbytes: their size.
        offset: where their block lies in the device's pool (None without a pool).
        time: when the load's memory was granted, or when the drop happened.
        requested_at: a load: when it asked for the memory.
        requester: a load: the frontier the pool was asked with.
        reuse: a load: how the pool found the memory safe to hand out.
        read: a load: its storage read (the last one for several files; None when host
            memory held a copy).
        copy: a load: its copy onto the device (None when the read lands there).
        death: a drop: the death frontier the memory was freed with.
        pending: a drop: the entries of ``death`` not yet complete at the drop (what a
            reuse must wait for; empty when nothing still used them).
        reason: a drop: ``"by hand"``, ``"moved"`` (a model used on another device),
            ``"on_evict"`` (the QoS tiers' eviction of the context) or
            ``"on_memory_pressure"`` (the residency's pressure handler).
        requested_by: a drop: the context whose allocation caused it, when known.
    """

    action: str
    weights: str
    device: str
    context: str
    nbytes: int
    offset: int | None
    time: float
    requested_at: float | None = None
    requester: Frontier | None = None
    reuse: Any = None
    read: Submission | None = None
    copy: Submission | None = None
    death: Frontier | None = None
    pending: Frontier | None = None
    reason: str | None = None
    requested_by: str | None = None


@dataclass(frozen=True)
class EvictionCandidate:
    """What :func:`choose_evictions` knows of resident weights.

    Attributes:
        key: the caller's handle for them.
        context: the context whose budget holds them.
        nbytes: their size.
        reload_seconds: how long loading them again would take.
        request_rate: requests per second expected.
        priority: higher stays longer.
        pinned: work is about to use them or uses them: never evicted.
    """

    key: Any
    context: str
    nbytes: int
    reload_seconds: float
    request_rate: float
    priority: int
    pinned: bool = False

    @property
    def cost(self) -> float:
        """Expected reload seconds per second if dropped: reload time times request rate."""
        return self.reload_seconds * self.request_rate


def choose_evictions(
    candidates: Iterable[EvictionCandidate],
    needed: int,
    reclaimable: Mapping[str, float] | None = None,
) -> ReclaimPlan[Any]:
    """Which weights to drop to free ``needed`` bytes: the cheapest to lose first.

    Lower priority goes first; within a priority, the lower expected reload cost per
    second (reload time times request rate), then the larger. Pinned weights are never
    chosen. If everything droppable would not cover ``needed``, nothing is dropped.

    Args:
        candidates: resident weights on the device short of memory.
        needed: bytes to free.
        reclaimable: per context, the most of its bytes that help (see
            :func:`~asyncfront.memory.plan_reclaim`); None counts every byte.
    """
    order = sorted(
        (c for c in candidates if not c.pinned),
        key=lambda c: (c.priority, c.cost, -c.nbytes),
    )
    return plan_reclaim([Reclaim(c.key, c.context, c.nbytes) for c in order], needed, reclaimable)


@dataclass(frozen=True)
class ResidencyStatistics:
    """A snapshot of weight residency."""

    registered: int
    resident: int
    resident_bytes: int
    loading: int
    loads: int
    shared_loads: int
    drops: int
    evictions: int


class Residency:
    """Loads, pins and drops immutable weights for a runtime (``rt.residency``).

    Args:
        runtime: the runtime whose devices and budgets it uses.
        bandwidth: bytes per second assumed for a first load's reload estimate.
        half_life: seconds over which the request-rate estimate forgets.
        release_pages: whether drops give CPU blocks' pages back at once (see the
            attribute).
    """

    def __init__(
        self,
        runtime: Runtime,
        *,
        bandwidth: float = DEFAULT_BANDWIDTH,
        half_life: float = 60.0,
        release_pages: bool = False,
    ) -> None:
        self.runtime = runtime
        self.release_pages = release_pages
        """Whether a drop gives a CPU block's pages back to the operating system at once.

        Off by default: the pool keeps the pages for its next allocation, and a reload
        into pages it kept runs at read speed, where one into released pages pays a page
        fault per page first (about half the read bandwidth on a virtual machine). On, the
        process's resident memory shrinks by the weights' size at the drop.
        """
        self.bandwidth = bandwidth
        self.half_life = half_life
        self._weights: dict[str, Weights] = {}
        self._rates: dict[str, RequestRate] = {}
        self._resident: dict[tuple[str, str], ResidentWeights] = {}
        self._loading: dict[tuple[str, str], asyncio.Future[None]] = {}
        self._queues: dict[tuple[str, str], DeviceQueue] = {}
        self._models: dict[str, Model] = {}
        self._modules: dict[int, Model] = {}  # id(module) -> its model, to pin the work using it
        self.copy_engines: dict[str, str] = {}
        """Device name -> the copy engine that moves accounting-only weights onto it.

        An accounting-only load onto a device named here reads into host memory first
        (before the device memory is granted: the read needs none of it), then copies
        ``size`` bytes on the engine's queue; onto any other device it reads straight
        into the granted memory.
        """
        self.load_queues: dict[str, DeviceQueue] = {}
        """Device name -> the queue every load's reads or copies on that device use.

        By default each weights get their own queue per device (``DEVICE.load.NAME``),
        so loads of different weights run side by side; naming a queue here puts them
        all on its one axis, in order (one DMA queue per GPU, one NVMe queue).
        """
        self._loads = self._shared_loads = self._drops = self._evictions = 0
        self._on_change: list[Callable[[ResidencyChange], None]] = []
        self._evicting: set[str] = set()  # contexts whose on_evict drops their weights
        runtime.on_memory_pressure(self._on_memory_pressure)

    # -- registration ----------------------------------------------------------------

    def register(
        self,
        name: str,
        source: str | os.PathLike[str] | Mapping[str, Any] | None = None,
        *,
        size: int | None = None,
        priority: int | None = None,
        request_rate: float | None = None,
        storage: str | Device | None = None,
        in_host_memory: bool = False,
        drop_while_queued: bool = False,
        evict_with_context: bool = False,
    ) -> Weights:
        """Register weights from a safetensors path or a dict of host tensors.

        ``size`` (bytes), when given, must match the tensors; without a ``source`` the
        weights are accounting-only, of ``size`` bytes (see the module's description).
        ``storage`` names the storage device that reads the file (default: the
        runtime's only one). ``in_host_memory``, ``drop_while_queued`` (both for
        accounting-only weights) and ``evict_with_context`` are described on
        :class:`Weights`.

        Raises:
            ValueError: the name is taken, or an option does not apply to the source.
        """
        if name in self._weights:
            raise ValueError(f"weights named {name!r} are already registered")
        weights = Weights(
            name,
            source,
            size=size,
            priority=priority,
            request_rate=request_rate,
            storage=storage,
            in_host_memory=in_host_memory,
            drop_while_queued=drop_while_queued,
            evict_with_context=evict_with_context,
        )
        self._weights[name] = weights
        self._rates[name] = RequestRate(self.half_life)
        return weights

    def register_model(
        self,
        name: str,
        build: Callable[[], Any],
        weights: str | os.PathLike[str] | Mapping[str, Any],
        *,
        device: str | Device,
        context: ExecutionContext | None = None,
        priority: int | None = None,
        train: bool = False,
        storage: str | Device | None = None,
        dtype: str | None = None,
    ) -> Model:
        """Register a model: its module from ``build()`` (built on ``meta``), its weights.

        ``weights`` is a safetensors file, a directory (its one ``.safetensors`` file, or
        the shards its ``*.safetensors.index.json`` names) or a state dict of host
        tensors. The weights are registered under the model's name; ``dtype`` (a torch
        floating dtype name) converts floating tensors as they load. See
        :mod:`asyncfront.models`.

        Raises:
            ValueError: the name is taken.
            CheckpointMismatchError: the checkpoint does not fit the module (nothing is
                registered).
        """
        from ..models._build import build_on_meta
        from ..models._model import Model, track_submission, weights_source

        if name in self._weights:
            raise ValueError(f"weights named {name!r} are already registered")
        dev = self.runtime.device(device) if isinstance(device, str) else device
        if context is not None and context.device is not dev:
            raise ValueError(
                f"model {name!r} goes to {dev.name!r} but context {context.name!r} is on "
                f"{context.device.name!r}"
            )
        source = weights if isinstance(weights, Mapping) else weights_source(weights)
        loaded = Weights(name, source, priority=priority, storage=storage, dtype=dtype)
        built = build_on_meta(build)
        model = Model(
            name, built, loaded, device=dev, context=context, priority=priority, train=train
        )
        self._weights[name] = loaded
        self._rates[name] = RequestRate(self.half_life)
        self._models[name] = model
        self._modules[id(model.module)] = model
        modules = self._modules
        self.runtime._submit_hook = lambda sub: track_submission(modules, sub)
        return model

    def model(self, name: str) -> Model:
        """The model registered as ``name``."""
        try:
            return self._models[name]
        except KeyError:
            raise KeyError(f"no model named {name!r}; known: {sorted(self._models)}") from None

    async def ensure_model(
        self,
        model: Model | str,
        device: str | Device | None = None,
        *,
        context: ExecutionContext | None = None,
    ) -> ResidentModel:
        """Make ``model`` resident on ``device`` (default: where it lives); its handle.

        A model lives on one device at a time: resident elsewhere, it is dropped there
        first.

        Raises:
            RuntimeError: it is resident elsewhere and pinned there.
            MemoryBudgetError / StorageError: as :meth:`ensure_resident`.
        """
        m = self.model(model) if isinstance(model, str) else model
        dev = m.device if device is None else device
        dev = self.runtime.device(dev) if isinstance(dev, str) else dev
        while True:
            current = m.resident
            if current is not None and current.device is dev and not current.dropped:
                return current
            if current is not None and not current.dropped:
                if current.pinned:
                    raise RuntimeError(
                        f"model {m.name!r} is pinned on {current.device.name!r} by work "
                        f"that uses it; it cannot move to {dev.name!r} now"
                    )
                self._drop(current.weights, "moved")
                continue
            ctx = context
            if ctx is None and m.context is not None and m.context.device is dev:
                ctx = m.context
            weights = await self.ensure_resident(m.weights, dev, context=ctx)
            if weights.dropped:
                continue
            current = m.resident
            if current is None or current.weights is not weights:
                return m._attach(weights)
            return current

    @asynccontextmanager
    async def _using_model(
        self, model: Model, device: str | Device | None, context: ExecutionContext | None
    ) -> AsyncIterator[ResidentModel]:
        from ..models._model import HELD

        while True:
            resident = await self.ensure_model(model, device, context=context)
            if not resident.dropped:
                break
        weights = resident.weights
        weights.pins += 1
        token = HELD.set((*HELD.get(), weights))
        try:
            yield resident
        finally:
            with contextlib.suppress(ValueError):  # closed from another context: leave it
                HELD.reset(token)
            weights.pins -= 1

    def knows(self, name: str) -> bool:
        """Whether weights (or a model) are registered as ``name``."""
        return name in self._weights

    def resident_on(self, name: str, device: str | Device) -> bool:
        """Whether the weights (or model) ``name`` are resident on ``device`` now."""
        dev = device if isinstance(device, str) else device.name
        resident = self._resident.get((name, dev))
        return resident is not None and not resident.dropped

    def get(self, name: str) -> Weights:
        """The weights registered as ``name``."""
        try:
            return self._weights[name]
        except KeyError:
            raise KeyError(f"no weights named {name!r}; known: {sorted(self._weights)}") from None

    # -- loading ---------------------------------------------------------------------

    async def ensure_resident(
        self,
        weights: Weights | str,
        device: str | Device,
        *,
        context: ExecutionContext | None = None,
    ) -> ResidentWeights:
        """Load the weights on ``device`` unless they are there; return the handle.

        Concurrent calls for the same weights and device share one load. The handle is
        not pinned: use :meth:`using` to run work on the weights without a window in
        which pressure could drop them.

        Raises:
            StorageError: the file could not be read (nothing stays allocated).
            MemoryBudgetError: the context's budget cannot hold them.
        """
        w = self.get(weights) if isinstance(weights, str) else weights
        dev = self.runtime.device(device) if isinstance(device, str) else device
        key = (w.name, dev.name)
        self._rates[w.name].record(self.runtime.now())
        while True:
            resident = self._resident.get(key)
            if resident is not None:
                return resident
            settled = self._loading.get(key)
            if settled is not None:
                self._shared_loads += 1
                await asyncio.wait([settled])  # then look again: loaded, or load it ourselves
                continue
            ctx = self._context_for(w, dev, context)
            settled = self._loading[key] = asyncio.get_running_loop().create_future()
            try:
                label = f"loading {w.name} ({format_bytes(w.nbytes)}) to {dev.name}"
                with progress(label, total=1) as shown:
                    resident = await self._load(w, dev, ctx)
                    shown.advance()
            finally:
                del self._loading[key]
                settled.set_result(None)
            self._resident[key] = resident
            self._hook_eviction(resident)
            model = self._models.get(w.name)
            if model is not None and model.resident is None:
                model._attach(resident)  # the module runs on what was just loaded
            return resident

    def using(
        self,
        weights: Weights | Model | str,
        device: str | Device,
        *,
        context: ExecutionContext | None = None,
    ) -> AbstractAsyncContextManager[Any]:
        """Load if needed and pin for the block (eviction skips them).

        Weights yield :class:`ResidentWeights`; a model (or a model's name) yields its
        :class:`~asyncfront.models.ResidentModel`, and every submission made inside the
        block keeps the model pinned until it finishes, even after the block ends.
        """
        from ..models._model import Model

        if isinstance(weights, str) and weights in self._models:
            weights = self._models[weights]
        if isinstance(weights, Model):
            return self._using_model(weights, device, context)
        return self._using_weights(weights, device, context)

    @asynccontextmanager
    async def _using_weights(
        self,
        weights: Weights | str,
        device: str | Device,
        context: ExecutionContext | None,
    ) -> AsyncIterator[ResidentWeights]:
        while True:
            resident = await self.ensure_resident(weights, device, context=context)
            if not resident.dropped:  # not dropped while a shared load handed it over
                break
        resident.pins += 1
        try:
            yield resident
        finally:
            resident.pins -= 1

    def _context_for(
        self, weights: Weights, device: Device, context: ExecutionContext | None
    ) -> ExecutionContext:
        if context is None:
            try:
                context = self.runtime.context(weights.name)
            except KeyError:
                raise LookupError(
                    f"weights {weights.name!r}: pass context=, or create a context named "
                    f"{weights.name!r} on {device.name!r} to hold them"
                ) from None
        if context.device is not device:
            raise ValueError(
                f"weights {weights.name!r} go to {device.name!r} but context "
                f"{context.name!r} is on {context.device.name!r}"
            )
        return context

    def _storage_for(self, weights: Weights) -> StorageDevice:
        from ..devices.storage import StorageDevice

        wanted = weights.storage
        if wanted is not None:
            device = self.runtime.device(wanted) if isinstance(wanted, str) else wanted
            if not isinstance(device, StorageDevice):
                raise TypeError(f"device {device.name!r} is not a StorageDevice")
            return device
        found = [d for d in self.runtime.devices.values() if isinstance(d, StorageDevice)]
        if len(found) != 1:
            raise LookupError(
                f"weights {weights.name!r} load from a file: the runtime has "
                f"{len(found)} storage devices, name one with storage="
            )
        return found[0]

    def _queue(self, device: Device, weights: Weights) -> DeviceQueue:
        """The queue on ``device`` that loads ``weights``: each model its own axis."""
        shared = self.load_queues.get(device.name)
        if shared is not None:
            return shared
        key = (device.name, weights.name)
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = device.queue(name=f"{device.name}.load.{weights.name}")
        return queue

    async def _load(
        self, weights: Weights, device: Device, context: ExecutionContext
    ) -> ResidentWeights:
        if weights.accounting:
            return await self._load_accounted(weights, device, context)
        rt = self.runtime
        started = rt.now()
        buffer = await rt._memory.allocate(context, weights.nbytes, owner=self)
        sem = rt.semaphore(name=f"load:{weights.name}@{device.name}")
        last: Any = None
        try:
            raw = buffer_bytes(buffer)
            if weights.files:
                storage = self._storage_for(weights)
                nvme = self._queue(storage, weights)
                converting = weights.file_layouts is not None
                direct = not converting and storage.can_access(raw)
                if direct:
                    target = raw
                else:  # converted, or a device storage cannot reach: through host staging
                    torch = import_torch()
                    target = torch.empty(
                        weights.staging_nbytes if converting else weights.nbytes,
                        dtype=torch.uint8,
                        pin_memory=torch.cuda.is_available(),
                    )
                # One read per file, in order on the weights' storage axis; each waits on
                # the one before, so a failed read fails every later one and the load.
                for i, file in enumerate(weights.files):
                    last = storage.read(
                        nvme,
                        target[file.start : file.start + file.nbytes],
                        file.path,
                        file.data_offset,
                        waits=[(sem, i)] if i else (),
                        signals=[(sem, i + 1)],
                    )
                if not direct:
                    n = len(weights.files)
                    work: Any = copy_bytes
                    extra: tuple[Any, ...] = ()
                    if weights.file_layouts is not None:
                        work, extra = _convert, (weights.file_layouts, weights.layouts)
                    last = self._queue(device, weights).submit(
                        work,
                        raw,
                        target,
                        *extra,
                        waits=[(sem, n)],
                        signals=[(sem, n + 1)],
                        name="convert" if extra else "copy",
                    )
            else:
                assert weights._host is not None
                last = self._queue(device, weights).submit(
                    _pack, raw, weights._host, weights.layouts, signals=[(sem, 1)], name="copy"
                )
            await last
            frontier = last.frontier
            assert frontier is not None
            resident = ResidentWeights(
                weights, device, context, buffer, raw, (sem, sem.value), frontier
            )
            if self._on_change:
                copied = last if last.queue.device is device else None
                read = None if copied is last else last
                self._changed_load(weights, device, context, buffer, started, started, read, copied)
        except BaseException:
            # Nothing but the load touched the buffer: it dies with the load's epoch, and
            # the budget gets its charge back whatever step failed.
            death = Frontier({last.queue.axis: last.epoch}) if last is not None else Frontier()
            rt._memory.free(buffer, death)
            raise
        self._loaded(weights, device, started)
        return resident

    async def _load_accounted(
        self, weights: Weights, device: Device, context: ExecutionContext
    ) -> ResidentWeights:
        """An accounting-only load: budget charged, storage (and copy) time taken, no bytes."""
        rt = self.runtime
        started = rt.now()
        sem = rt.semaphore(name=f"load:{weights.name}@{device.name}")
        engine = self.copy_engines.get(device.name)
        last = read = copy = None
        staged = engine is not None and weights.in_host_memory
        if engine is not None and not staged:  # into host memory: needs no device memory
            read = self._queue(self._accounting_storage(weights), weights).submit(
                name=f"read {weights.name} weights", cost=weights.nbytes, signals=[(sem, 1)]
            )
            weights.in_host_memory = True  # the host copy outlives the device's
        buffer = await rt._memory.allocate(context, weights.nbytes, owner=self)
        granted = rt.now()
        try:
            if engine is None:
                last = read = self._queue(self._accounting_storage(weights), weights).submit(
                    name=f"read {weights.name} weights", cost=weights.nbytes, signals=[(sem, 1)]
                )
            else:
                done = 1 if staged else 2
                last = copy = self._queue(rt.device(engine), weights).submit(
                    name=f"h2d {weights.name} weights",
                    cost=weights.nbytes,
                    waits=() if staged else [(sem, 1)],
                    signals=[(sem, done)],
                )
            self._changed_load(weights, device, context, buffer, started, granted, read, copy)
            await last
            frontier = last.frontier
            assert frontier is not None
            resident = ResidentWeights(
                weights, device, context, buffer, None, (sem, sem.value), frontier
            )
        except BaseException:
            death = Frontier({last.queue.axis: last.epoch}) if last is not None else Frontier()
            rt._memory.free(buffer, death)
            raise
        self._loaded(weights, device, started)
        return resident

    def _accounting_storage(self, weights: Weights) -> Device:
        """The storage device accounting-only weights are read from: named, else the only one."""
        wanted = weights.storage
        if wanted is not None:
            return self.runtime.device(wanted) if isinstance(wanted, str) else wanted
        found = [d for d in self.runtime.devices.values() if d.kind == "storage"]
        if len(found) != 1:
            raise LookupError(
                f"weights {weights.name!r} load from storage: the runtime has "
                f"{len(found)} devices of kind 'storage', name one with storage="
            )
        return found[0]

    def _loaded(self, weights: Weights, device: Device, started: float) -> None:
        weights.load_seconds = self.runtime.now() - started
        weights.load_times[device.name] = weights.load_seconds
        self._loads += 1
        self._log("weights_loaded", weights, device, seconds=weights.load_seconds)

    # -- dropping and eviction -------------------------------------------------------

    def drop(self, weights: Weights | Model | str, device: str | Device) -> bool:
        """Drop weights or a model from ``device`` (no write-back); False if not there.

        A dropped model's module keeps its ``Parameter`` objects, now on ``meta``; using
        it raises :class:`~asyncfront.models.ModelNotResidentError` until it is resident
        again.

        Raises:
            RuntimeError: they are pinned (a ``using`` block or queued work holds them).
        """
        from ..models._model import Model

        if isinstance(weights, Model):
            weights = weights.weights
        w = self.get(weights) if isinstance(weights, str) else weights
        dev = self.runtime.device(device) if isinstance(device, str) else device
        resident = self._resident.get((w.name, dev.name))
        if resident is None:
            return False
        if resident.pinned:
            raise RuntimeError(f"{resident!r} is pinned by work that uses it; cannot drop")
        self._drop(resident, "by hand")
        return True

    def _drop(
        self, resident: ResidentWeights, reason: str, requested_by: str | None = None
    ) -> None:
        del self._resident[(resident.weights.name, resident.device.name)]
        buffer, resident._buffer = resident._buffer, None
        if (
            self.release_pages
            and resident._raw is not None
            and not resident.pinned
            and not resident.context.queue._busy()
        ):
            # Nothing queued or running uses them: their host pages go back to the
            # system now, not when the block is next reused.
            release_pages(resident._raw)
        resident._raw = None
        resident.tensors.clear()
        resident.dropped = True
        for callback in resident._on_drop:
            callback(resident)
        resident._on_drop.clear()
        death = resident.context.death_frontier().merge(resident.frontier)
        assert buffer is not None
        offset = buffer.offset
        self.runtime._memory.free(buffer, death)
        self._drops += 1
        self._log("weights_dropped", resident.weights, resident.device, death=repr(death))
        if self._on_change:
            rt = self.runtime
            self._emit(
                ResidencyChange(
                    "drop",
                    resident.weights.name,
                    resident.device.name,
                    resident.context.name,
                    resident.nbytes,
                    offset,
                    rt.now(),
                    death=death,
                    pending=rt.completed.undominated(death),
                    reason=reason,
                    requested_by=requested_by,
                )
            )

    # -- hooks -------------------------------------------------------------------------

    def on_change(self, callback: Callable[[ResidencyChange], None]) -> None:
        """Call ``callback`` with a :class:`ResidencyChange` on every load and drop.

        A load is reported once its memory is granted and its transfers are submitted
        (an accounting-only load) or once it finished (a real one); a drop once its
        memory is freed. Callbacks run synchronously and must not raise.
        """
        self._on_change.append(callback)

    def _emit(self, change: ResidencyChange) -> None:
        for callback in self._on_change:
            callback(change)

    def _changed_load(
        self,
        weights: Weights,
        device: Device,
        context: ExecutionContext,
        buffer: Buffer,
        requested_at: float,
        granted_at: float,
        read: Submission | None,
        copy: Submission | None,
    ) -> None:
        if not self._on_change:
            return
        block = buffer.block
        self._emit(
            ResidencyChange(
                "load",
                weights.name,
                device.name,
                context.name,
                weights.nbytes,
                buffer.offset,
                granted_at,
                requested_at=requested_at,
                requester=None if block is None else block.requester,
                reuse=None if block is None else block.reuse,
                read=read,
                copy=copy,
            )
        )

    def _hook_eviction(self, resident: ResidentWeights) -> None:
        """Let the QoS tiers' eviction of the holding context drop these weights."""
        ctx = resident.context
        if not resident.weights.evict_with_context or ctx.name in self._evicting:
            return
        self._evicting.add(ctx.name)

        def evict(wanted: int) -> int:
            freed = 0
            for other in list(self._resident.values()):
                if other.context is ctx and other.weights.evict_with_context and not other.pinned:
                    self._drop(other, "on_evict")
                    self._evictions += 1
                    freed += other.nbytes
            return freed

        ctx.on_evict(evict)

    def adopt(
        self, weights: Weights | str, device: str | Device, buffer: Buffer
    ) -> ResidentWeights:
        """Take accounting-only weights already in ``device``'s memory as resident.

        ``buffer`` (allocated in the holding context's budget, for example before the
        residency managed the weights: a warm start) becomes their block; drops free it
        with a death frontier like a loaded one. Their ``ready`` is reached at once.

        Raises:
            ValueError: the weights carry bytes, are already resident on ``device``, or
                ``buffer`` is freed, of another size or on another device.
        """
        w = self.get(weights) if isinstance(weights, str) else weights
        dev = self.runtime.device(device) if isinstance(device, str) else device
        if not w.accounting:
            raise ValueError(
                f"weights {w.name!r}: only accounting-only weights can be adopted; load "
                "weights with bytes through ensure_resident"
            )
        if (w.name, dev.name) in self._resident:
            raise ValueError(f"weights {w.name!r} are already resident on {dev.name!r}")
        if buffer.freed or buffer.nbytes != w.nbytes or buffer.context.device is not dev:
            raise ValueError(
                f"weights {w.name!r} ({w.nbytes:,} bytes on {dev.name!r}) cannot adopt {buffer!r}"
            )
        sem = self.runtime.semaphore(1, name=f"load:{w.name}@{dev.name}")
        resident = ResidentWeights(w, dev, buffer.context, buffer, None, (sem, 1), Frontier())
        self._resident[(w.name, dev.name)] = resident
        self._hook_eviction(resident)
        return resident

    def candidates(self, device: Device) -> list[EvictionCandidate]:
        """What :func:`choose_evictions` sees of the weights resident on ``device``."""
        now = self.runtime.now()
        found = []
        for resident in self._resident.values():
            if resident.device is not device:
                continue
            w = resident.weights
            reload = w.load_seconds if w.load_seconds is not None else w.nbytes / self.bandwidth
            rate = w.request_rate if w.request_rate is not None else self._rates[w.name].rate(now)
            priority = w.priority if w.priority is not None else resident.context.priority
            found.append(
                EvictionCandidate(
                    resident,
                    resident.context.name,
                    # what dropping it gives back to the budget: its block's span
                    self.runtime._memory.charge_for(resident.context, w.nbytes),
                    reload,
                    rate,
                    priority,
                    resident.pinned,
                )
            )
        return found

    def reclaim(self, context: ExecutionContext, nbytes: int) -> int:
        """Drop the cheapest weights so ``context`` can allocate ``nbytes``; bytes dropped."""
        needed, reclaimable = shortfall(self.runtime, context, nbytes)
        plan = choose_evictions(self.candidates(context.device), needed, reclaimable)
        freed = 0
        for resident in plan.victims:
            self._drop(resident, "on_memory_pressure", context.name)
            self._evictions += 1
            freed += resident.nbytes
        return freed

    def _on_memory_pressure(
        self, context: ExecutionContext, requested: int, available: int
    ) -> bool:
        return self.reclaim(context, requested) > 0

    # -- visible state ---------------------------------------------------------------

    def resident(self, device: str | Device | None = None) -> tuple[ResidentWeights, ...]:
        """The resident weights (on ``device``, if given)."""
        name = device if isinstance(device, str) or device is None else device.name
        return tuple(r for r in self._resident.values() if name is None or r.device.name == name)

    def statistics(self) -> ResidencyStatistics:
        """A frozen snapshot of loads, drops and what is resident."""
        return ResidencyStatistics(
            registered=len(self._weights),
            resident=len(self._resident),
            resident_bytes=sum(r.nbytes for r in self._resident.values()),
            loading=len(self._loading),
            loads=self._loads,
            shared_loads=self._shared_loads,
            drops=self._drops,
            evictions=self._evictions,
        )

    def _log(self, event: str, weights: Weights, device: Device, **fields: Any) -> None:
        rt = self.runtime
        if rt._log_info:
            rt._log.info(
                event, weights=weights.name, device=device.name, nbytes=weights.nbytes, **fields
            )

    def __repr__(self) -> str:
        return (
            f"<Residency registered={len(self._weights)} models={len(self._models)} "
            f"resident={len(self._resident)} "
            f"loading={len(self._loading)}>"
        )


def _pack(raw: Any, tensors: Mapping[str, Any], layouts: Sequence[TensorLayout]) -> None:
    """Copy host tensors into their places in the device bytes (runs on a copy queue)."""
    for layout in layouts:
        src = tensors[layout.name].detach().contiguous().reshape(-1)
        copy_bytes(raw[layout.offset : layout.offset + layout.nbytes], src.view(raw.dtype))


def _convert(
    raw: Any, staging: Any, sources: Sequence[TensorLayout], targets: Sequence[TensorLayout]
) -> None:
    """Copy each tensor from the files' bytes into its place in the block, in its new dtype."""
    torch = import_torch()
    for src, dst in zip(sources, targets, strict=True):
        into = typed_view(raw, dst.offset, getattr(torch, dst.dtype), dst.shape)
        into.copy_(typed_view(staging, src.offset, getattr(torch, src.dtype), src.shape))
