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
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._budget import format_bytes
from .._frontier import Frontier
from .._progress import progress
from .._semaphore import TimelineSemaphore
from ._reclaim import Reclaim, ReclaimPlan, RequestRate, plan_reclaim, shortfall
from ._safetensors import TensorLayout, read_safetensors_layout
from ._tensors import buffer_bytes, copy_bytes, import_torch, typed_view

if TYPE_CHECKING:
    from .._context import Buffer, ExecutionContext
    from .._queue import DeviceQueue
    from .._runtime import Runtime
    from ..devices._base import Device
    from ..devices.storage import StorageDevice

__all__ = (
    "EvictionCandidate",
    "Residency",
    "ResidencyStatistics",
    "ResidentWeights",
    "Weights",
    "choose_evictions",
)

DEFAULT_BANDWIDTH = 2 << 30
"""Bytes per second assumed for a first load, before one has been measured."""

_ALIGN = 64  # offsets of tensors packed from a dict: a multiple of every element size


class Weights:
    """Immutable weights registered with :meth:`asyncfront.Runtime.weights`.

    Attributes:
        name: the weights' name (also the default context that holds them).
        path: the safetensors file, or None for weights given as host tensors.
        nbytes: bytes of device memory they take.
        priority: eviction priority (higher stays longer); None uses the context's.
        request_rate: expected requests per second; None estimates it from requests.
        layouts: every tensor's dtype, shape and place in the bytes.
    """

    def __init__(
        self,
        name: str,
        source: str | os.PathLike[str] | Mapping[str, Any],
        *,
        size: int | None = None,
        priority: int | None = None,
        request_rate: float | None = None,
        storage: str | Device | None = None,
    ) -> None:
        self.name = name
        self.priority = priority
        self.request_rate = request_rate
        self.storage = storage
        self._host: dict[str, Any] | None = None
        if isinstance(source, Mapping):
            self.path: Path | None = None
            self._host = dict(source)
            self.data_offset = 0
            layouts, offset = [], 0
            for key, tensor in self._host.items():
                offset = -(-offset // _ALIGN) * _ALIGN
                nbytes = tensor.numel() * tensor.element_size()
                dtype = str(tensor.dtype).removeprefix("torch.")
                layouts.append(TensorLayout(key, dtype, tuple(tensor.shape), offset, nbytes))
                offset += nbytes
            self.layouts: tuple[TensorLayout, ...] = tuple(layouts)
            actual = offset
        else:
            self.path = Path(source)
            self.data_offset, self.layouts = read_safetensors_layout(self.path)
            actual = max((t.offset + t.nbytes for t in self.layouts), default=0)
        if size is not None and size != actual:
            raise ValueError(
                f"weights {name!r}: size={size:,} bytes given, but the tensors take {actual:,}"
            )
        if actual == 0:
            raise ValueError(f"weights {name!r} hold no bytes")
        self.nbytes = actual
        self.load_seconds: float | None = None  # the last load's duration, once measured

    def __repr__(self) -> str:
        source = os.fspath(self.path) if self.path is not None else "host tensors"
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
        self.dropped = False
        self._buffer: Buffer | None = buffer
        self._raw: Any = raw
        self.tensors: dict[str, Any] = {}
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
        """Whether eviction must keep them: a ``using`` block holds them, or their
        context has work queued or running."""
        return self.pins > 0 or self.context.queue._busy()

    def __repr__(self) -> str:
        state = "dropped" if self.dropped else f"pins={self.pins}"
        return (
            f"<ResidentWeights {self.weights.name!r} on {self.device.name!r} "
            f"{format_bytes(self.nbytes)} context={self.context.name!r} {state}>"
        )


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
    """

    def __init__(
        self, runtime: Runtime, *, bandwidth: float = DEFAULT_BANDWIDTH, half_life: float = 60.0
    ) -> None:
        self.runtime = runtime
        self.bandwidth = bandwidth
        self.half_life = half_life
        self._weights: dict[str, Weights] = {}
        self._rates: dict[str, RequestRate] = {}
        self._resident: dict[tuple[str, str], ResidentWeights] = {}
        self._loading: dict[tuple[str, str], asyncio.Future[None]] = {}
        self._queues: dict[tuple[str, str], DeviceQueue] = {}
        self._loads = self._shared_loads = self._drops = self._evictions = 0
        runtime.on_memory_pressure(self._on_memory_pressure)

    # -- registration ----------------------------------------------------------------

    def register(
        self,
        name: str,
        source: str | os.PathLike[str] | Mapping[str, Any],
        *,
        size: int | None = None,
        priority: int | None = None,
        request_rate: float | None = None,
        storage: str | Device | None = None,
    ) -> Weights:
        """Register weights from a safetensors path or a dict of host tensors.

        ``size`` (bytes), when given, must match the tensors. ``storage`` names the
        storage device that reads the file (default: the runtime's only one).
        """
        if name in self._weights:
            raise ValueError(f"weights named {name!r} are already registered")
        weights = Weights(
            name, source, size=size, priority=priority, request_rate=request_rate, storage=storage
        )
        self._weights[name] = weights
        self._rates[name] = RequestRate(self.half_life)
        return weights

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
            return resident

    @asynccontextmanager
    async def using(
        self,
        weights: Weights | str,
        device: str | Device,
        *,
        context: ExecutionContext | None = None,
    ) -> AsyncIterator[ResidentWeights]:
        """Load if needed and pin the weights for the block (eviction skips them)."""
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
        key = (device.name, weights.name)
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = device.queue(name=f"{device.name}.load.{weights.name}")
        return queue

    async def _load(
        self, weights: Weights, device: Device, context: ExecutionContext
    ) -> ResidentWeights:
        rt = self.runtime
        started = rt.now()
        buffer = await rt._memory.allocate(context, weights.nbytes, owner=self)
        sem = rt.semaphore(name=f"load:{weights.name}@{device.name}")
        last: Any = None
        try:
            raw = buffer_bytes(buffer)
            if weights.path is not None:
                storage = self._storage_for(weights)
                nvme = self._queue(storage, weights)
                if storage.can_access(raw):
                    last = storage.read(
                        nvme, raw, weights.path, weights.data_offset, signals=[(sem, 1)]
                    )
                else:  # a device storage cannot reach: through a host buffer and a copy
                    torch = import_torch()
                    staging = torch.empty(weights.nbytes, dtype=torch.uint8, pin_memory=True)
                    storage.read(
                        nvme, staging, weights.path, weights.data_offset, signals=[(sem, 1)]
                    )
                    last = self._queue(device, weights).submit(
                        copy_bytes, raw, staging, waits=[(sem, 1)], signals=[(sem, 2)], name="copy"
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
        except BaseException:
            # Nothing but the load touched the buffer: it dies with the load's epoch, and
            # the budget gets its charge back whatever step failed.
            death = Frontier({last.queue.axis: last.epoch}) if last is not None else Frontier()
            rt._memory.free(buffer, death)
            raise
        weights.load_seconds = rt.now() - started
        self._loads += 1
        self._log("weights_loaded", weights, device, seconds=weights.load_seconds)
        return resident

    # -- dropping and eviction -------------------------------------------------------

    def drop(self, weights: Weights | str, device: str | Device) -> bool:
        """Drop the weights from ``device`` (no write-back); False if they were not there.

        Raises:
            RuntimeError: they are pinned (a ``using`` block or queued work holds them).
        """
        w = self.get(weights) if isinstance(weights, str) else weights
        dev = self.runtime.device(device) if isinstance(device, str) else device
        resident = self._resident.get((w.name, dev.name))
        if resident is None:
            return False
        if resident.pinned:
            raise RuntimeError(f"{resident!r} is pinned by work that uses it; cannot drop")
        self._drop(resident)
        return True

    def _drop(self, resident: ResidentWeights) -> None:
        del self._resident[(resident.weights.name, resident.device.name)]
        buffer, resident._buffer = resident._buffer, None
        resident._raw = None
        resident.tensors.clear()
        resident.dropped = True
        death = resident.context.death_frontier().merge(resident.frontier)
        assert buffer is not None
        self.runtime._memory.free(buffer, death)
        self._drops += 1
        self._log("weights_dropped", resident.weights, resident.device, death=repr(death))

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
                    w.nbytes,
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
            self._drop(resident)
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
            f"<Residency registered={len(self._weights)} resident={len(self._resident)} "
            f"loading={len(self._loading)}>"
        )


def _pack(raw: Any, tensors: Mapping[str, Any], layouts: Sequence[TensorLayout]) -> None:
    """Copy host tensors into their places in the device bytes (runs on a copy queue)."""
    for layout in layouts:
        src = tensors[layout.name].detach().contiguous().reshape(-1)
        copy_bytes(raw[layout.offset : layout.offset + layout.nbytes], src.view(raw.dtype))
