"""Placement: choose the device a stage runs on from weight residency, backlog and deadline.

:func:`place` is pure and synchronous: it takes what a stage needs and what every
candidate device offers (whether the model's weights are resident there, the time to
load them if not, the device's backlog and the stage's compute time there) and returns a
:class:`PlacementDecision` with the chosen device, the rule that chose it and the
estimate for every candidate. The rules, in order:

1. **resident**: among the devices where the weights are resident, the one with the
   lowest ``backlog + compute``, if it meets the deadline (always, without a deadline);
2. **no accelerator**: when some accelerator is a candidate but none can hold the
   model, the CPU;
3. **cheapest**: the device with the lowest ``load + backlog + compute`` that meets
   the deadline (CPUs included);
4. **CPU fallback**: nothing meets the deadline: the CPU, which leaves the
   accelerators to work that can still meet its own;
5. **best effort**: nothing meets the deadline and no CPU can take it: the cheapest.

A device is a CPU when its ``kind`` is ``"cpu"``; every other candidate is an
accelerator. Ties go to the candidate whose weights are resident, then to the earlier
candidate (the runtime's device order).

:class:`RuntimeResidency` is the runtime's default answer to "is this model resident
there, and how long would loading it take" (:class:`PlacementResidency`): it asks the
runtime's residency (``rt.residency``) about weights and models registered with
``rt.weights``, ``rt.model`` or ``from_transformers``, what is resident where and the
load times it measured, and a :class:`ModelRegistry` about models a simulation declares
by hand (``rt.declare_model``, ``rt.declare_resident``).
"""

from __future__ import annotations

import enum
import math
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from ._budget import GiB, format_bytes
from ._queue import SubmissionState

if TYPE_CHECKING:
    from ._queue import DeviceQueue
    from ._runtime import Runtime
    from .devices._base import Device

__all__ = (
    "DEFAULT_LOAD_BANDWIDTH",
    "ModelInfo",
    "ModelRegistry",
    "PlacementCandidate",
    "PlacementDecision",
    "PlacementError",
    "PlacementReason",
    "PlacementResidency",
    "RuntimeResidency",
    "StageNeeds",
    "device_backlog",
    "place",
)

DEFAULT_LOAD_BANDWIDTH = 4 * GiB
"""Bytes per second a model's weights load at when the device names no ``load_bandwidth``."""

NON_COMPUTE_KINDS = frozenset({"copy", "dma", "storage", "network", "nic"})
"""Device kinds that move data but run no stages: never placement candidates."""


class PlacementError(RuntimeError):
    """No candidate device can run the stage (none given, or none can hold the model)."""


class PlacementReason(enum.Enum):
    """Which placement rule chose the device."""

    RESIDENT = "resident"
    """The weights are resident there and it meets the deadline."""
    NO_ACCELERATOR = "no_accelerator"
    """No accelerator can hold the model: the CPU."""
    CHEAPEST = "cheapest"
    """The lowest load + backlog + compute that meets the deadline."""
    CPU_FALLBACK = "cpu_fallback"
    """Nothing meets the deadline: the CPU."""
    BEST_EFFORT = "best_effort"
    """Nothing meets the deadline and no CPU can take the stage: the cheapest."""


@dataclass(frozen=True)
class StageNeeds:
    """What a stage asks of a device.

    Attributes:
        model: the model whose weights it needs, or None.
        cost: its work in seconds at speed 1.0, or None (no estimate: zero).
        deadline: seconds from now by which it should finish, or None.
    """

    model: str | None = None
    cost: float | None = None
    deadline: float | None = None


@dataclass(frozen=True)
class PlacementCandidate:
    """One device as placement sees it; all times in seconds.

    Attributes:
        device: the device's name.
        kind: its kind (``"cpu"`` marks a CPU, anything else an accelerator).
        resident: whether the stage's weights are resident there.
        load_time: time to make them resident (``math.inf``: it cannot hold them);
            not counted when ``resident``.
        backlog: queued work on the device ahead of the stage.
        compute: the stage's own run time there (cost / speed).
    """

    device: str
    kind: str
    resident: bool
    load_time: float
    backlog: float
    compute: float

    @property
    def is_cpu(self) -> bool:
        """Whether this candidate is a CPU."""
        return self.kind == "cpu"

    @property
    def can_hold(self) -> bool:
        """Whether the weights are, or can be made, resident here."""
        return self.resident or math.isfinite(self.load_time)

    @property
    def estimate(self) -> float:
        """Seconds until the stage would finish here: load (unless resident) + backlog + compute."""
        load = 0.0 if self.resident else self.load_time
        return load + self.backlog + self.compute


@dataclass(frozen=True)
class PlacementDecision:
    """Where a stage runs, which rule decided, and what every candidate was estimated at."""

    device: str
    reason: PlacementReason
    needs: StageNeeds
    candidates: tuple[PlacementCandidate, ...] = field(repr=False)

    @property
    def chosen(self) -> PlacementCandidate:
        """The chosen candidate."""
        return next(c for c in self.candidates if c.device == self.device)

    @property
    def estimate(self) -> float:
        """The chosen device's estimate in seconds."""
        return self.chosen.estimate

    @property
    def estimates(self) -> dict[str, float]:
        """``{device: seconds}`` for every candidate (``inf``: it cannot hold the model)."""
        return {c.device: c.estimate for c in self.candidates}

    @property
    def meets_deadline(self) -> bool:
        """Whether the chosen device's estimate meets the deadline (True without one)."""
        deadline = self.needs.deadline
        return deadline is None or self.estimate <= deadline

    def as_dict(self) -> dict[str, object]:
        """A plain summary for logs and trace arguments."""
        return {
            "device": self.device,
            "reason": self.reason.value,
            "model": self.needs.model,
            "deadline": self.needs.deadline,
            "estimates": {
                c.device: round(c.estimate, 9) if math.isfinite(c.estimate) else "inf"
                for c in self.candidates
            },
            "resident": [c.device for c in self.candidates if c.resident],
        }


def place(needs: StageNeeds, candidates: Sequence[PlacementCandidate]) -> PlacementDecision:
    """Choose a device for a stage by the rules of this module (pure, synchronous).

    Raises:
        PlacementError: no candidates, or none can hold the model.
    """
    if not candidates:
        raise PlacementError(f"no candidate devices for model {needs.model!r}")
    cands = tuple(candidates)
    rank = {id(c): i for i, c in enumerate(cands)}
    deadline = needs.deadline

    def key(c: PlacementCandidate) -> tuple[float, bool, int]:
        return (c.estimate, not c.resident, rank[id(c)])

    def meets(c: PlacementCandidate) -> bool:
        return c.can_hold and (deadline is None or c.estimate <= deadline)

    def decide(c: PlacementCandidate, reason: PlacementReason) -> PlacementDecision:
        return PlacementDecision(c.device, reason, needs, cands)

    resident = [c for c in cands if c.resident]
    if resident:
        best = min(resident, key=key)
        if meets(best):
            return decide(best, PlacementReason.RESIDENT)
    holders = [c for c in cands if c.can_hold]
    if not holders:
        raise PlacementError(
            f"no candidate device can hold model {needs.model!r}: "
            f"{', '.join(c.device for c in cands)}"
        )
    cpus = [c for c in holders if c.is_cpu]
    accelerators = [c for c in cands if not c.is_cpu]
    if accelerators and not any(c.can_hold for c in accelerators) and cpus:
        return decide(min(cpus, key=key), PlacementReason.NO_ACCELERATOR)
    meeting = [c for c in holders if meets(c)]
    if meeting:
        return decide(min(meeting, key=key), PlacementReason.CHEAPEST)
    if cpus:
        return decide(min(cpus, key=key), PlacementReason.CPU_FALLBACK)
    return decide(min(holders, key=key), PlacementReason.BEST_EFFORT)


# -- residency -------------------------------------------------------------------------


@runtime_checkable
class PlacementResidency(Protocol):
    """What placement asks about weights; the runtime's default is :class:`RuntimeResidency`."""

    def is_resident(self, model: str, device: str) -> bool:
        """Whether ``model``'s weights are resident on ``device`` now."""
        ...

    def load_time(self, model: str, device: str) -> float:
        """Seconds to make ``model`` resident on ``device``; 0 if it is, ``inf`` if it cannot be."""
        ...


@dataclass
class ModelInfo:
    """A registered model: its weight size, where it is resident, known load times."""

    name: str
    size: int
    resident_on: set[str] = field(default_factory=set)
    load_times: dict[str, float] = field(default_factory=dict)
    default_load_time: float | None = None


class ModelRegistry:
    """A plain record of models declared by hand: their sizes and where they are resident.

    Nothing loads or drops these models: a simulation declares them
    (``rt.declare_model``) and says when they move (``rt.declare_resident``). Weights
    and models that really live in memory are registered with ``rt.weights`` or
    ``rt.model`` instead, and placement asks the residency about those.

    Load time, when not given at registration, is ``size / bandwidth`` with the device's
    ``load_bandwidth`` attribute (bytes per second) or ``default_bandwidth``; a device
    whose ``memory_capacity`` is smaller than the model cannot hold it (``inf``).

    Args:
        devices: the runtime's devices by name (read when load times are asked).
        default_bandwidth: bytes per second for devices that name none.
    """

    def __init__(
        self,
        devices: Mapping[str, Device],
        default_bandwidth: float = DEFAULT_LOAD_BANDWIDTH,
    ) -> None:
        if default_bandwidth <= 0:
            raise ValueError(f"load bandwidth must be > 0, got {default_bandwidth}")
        self._devices = devices
        self.default_bandwidth = default_bandwidth
        self._models: dict[str, ModelInfo] = {}

    def register(
        self,
        name: str,
        size: int,
        *,
        resident_on: Iterable[str] = (),
        load_time: float | Mapping[str, float] | None = None,
    ) -> ModelInfo:
        """Record a model of ``size`` bytes, resident on ``resident_on``.

        ``load_time`` overrides the bandwidth estimate: seconds for every device, or a
        ``{device: seconds}`` mapping for some.

        Raises:
            ValueError: a negative size or load time, or a model registered twice.
            KeyError: an unknown device.
        """
        if name in self._models:
            raise ValueError(f"model {name!r} is already declared")
        if size < 0:
            raise ValueError(f"model {name!r}: size must be >= 0 bytes, got {size}")
        info = ModelInfo(name, size)
        if isinstance(load_time, Mapping):
            for device, seconds in load_time.items():
                self._check_device(device)
                info.load_times[device] = _check_seconds(name, seconds)
        elif load_time is not None:
            info.default_load_time = _check_seconds(name, load_time)
        for device in resident_on:
            self._check_device(device)
            info.resident_on.add(device)
        self._models[name] = info
        return info

    def model(self, name: str) -> ModelInfo:
        """The registered model ``name``.

        Raises:
            KeyError: it was never registered (the message lists those that were).
        """
        try:
            return self._models[name]
        except KeyError:
            raise KeyError(
                f"model {name!r} is not declared (use rt.declare_model); "
                f"known: {sorted(self._models)}"
            ) from None

    @property
    def models(self) -> tuple[ModelInfo, ...]:
        """Every registered model."""
        return tuple(self._models.values())

    def mark_resident(self, model: str, device: str, resident: bool = True) -> None:
        """Record that ``model``'s weights are now (or, with False, no longer) on ``device``."""
        info = self.model(model)
        self._check_device(device)
        if resident:
            info.resident_on.add(device)
        else:
            info.resident_on.discard(device)

    def is_resident(self, model: str, device: str) -> bool:
        """Whether ``model`` is resident on ``device`` (False for unknown models)."""
        info = self._models.get(model)
        return info is not None and device in info.resident_on

    def load_time(self, model: str, device: str) -> float:
        """Seconds to make ``model`` resident on ``device``: 0 if it is, ``inf`` if it cannot."""
        info = self.model(model)
        if device in info.resident_on:
            return 0.0
        dev = self._check_device(device)
        capacity = dev.memory_capacity
        if capacity is not None and info.size > capacity:
            return math.inf
        if device in info.load_times:
            return info.load_times[device]
        if info.default_load_time is not None:
            return info.default_load_time
        bandwidth = getattr(dev, "load_bandwidth", None) or self.default_bandwidth
        return info.size / float(bandwidth)

    def _check_device(self, device: str) -> Device:
        try:
            return self._devices[device]
        except KeyError:
            raise KeyError(f"no device named {device!r}; known: {sorted(self._devices)}") from None

    def __repr__(self) -> str:
        body = ", ".join(
            f"{m.name} ({format_bytes(m.size)}) on {sorted(m.resident_on)}"
            for m in self._models.values()
        )
        return f"<ModelRegistry {body or 'empty'}>"


class RuntimeResidency:
    """Placement's view of a runtime: the residency's weights and models, then declared ones.

    A name registered with ``rt.weights``, ``rt.model`` or ``from_transformers`` is
    answered from ``rt.residency``: resident on a device when its weights are loaded
    there now; its load time is the last load measured on that device, else its size
    over the device's ``load_bandwidth`` (bytes per second) or the residency's
    ``bandwidth``; ``inf`` on a device whose ``memory_capacity`` is smaller than it.
    Any other name is answered by the runtime's :class:`ModelRegistry` of declared
    models (``rt.declared_models``).

    Args:
        runtime: the runtime whose residency and declared models it reads.
    """

    def __init__(self, runtime: Runtime) -> None:
        # Weak: the runtime owns this view, and a closed runtime must be freed by
        # reference counting, not kept alive by a cycle through it.
        self._runtime_ref = weakref.ref(runtime)

    @property
    def _runtime(self) -> Runtime:
        runtime = self._runtime_ref()
        if runtime is None:
            raise RuntimeError("placement residency: its runtime was closed and freed")
        return runtime

    def is_resident(self, model: str, device: str) -> bool:
        """Whether ``model``'s weights are resident on ``device`` now."""
        rt = self._runtime
        residency = rt._residency
        if residency is not None and residency.knows(model):
            return residency.resident_on(model, device)
        return rt.declared_models.is_resident(model, device)

    def load_time(self, model: str, device: str) -> float:
        """Seconds to make ``model`` resident on ``device``; 0 if it is, ``inf`` if it cannot be.

        Raises:
            KeyError: no such model or weights, or no such device.
        """
        rt = self._runtime
        residency = rt._residency
        if residency is None or not residency.knows(model):
            return rt.declared_models.load_time(model, device)
        if residency.resident_on(model, device):
            return 0.0
        try:
            dev = rt.devices[device]
        except KeyError:
            raise KeyError(f"no device named {device!r}; known: {sorted(rt.devices)}") from None
        weights = residency.get(model)
        capacity = dev.memory_capacity
        if capacity is not None and weights.nbytes > capacity:
            return math.inf
        measured = weights.load_times.get(device)
        if measured is not None:
            return measured
        bandwidth = getattr(dev, "load_bandwidth", None) or residency.bandwidth
        return weights.nbytes / float(bandwidth)

    def __repr__(self) -> str:
        rt = self._runtime_ref()
        if rt is None:
            return "<RuntimeResidency of a freed runtime>"
        return f"<RuntimeResidency of {rt._residency!r} and {rt.declared_models!r}>"


def _check_seconds(model: str, seconds: float) -> float:
    if seconds < 0:
        raise ValueError(f"model {model!r}: load time must be >= 0 s, got {seconds}")
    return float(seconds)


# -- reading the runtime ---------------------------------------------------------------


def device_speed(device: Device) -> float:
    """Cost units per second of ``device``: its ``speed`` attribute, else 1.0."""
    speed = getattr(device, "speed", None)
    return float(speed) if speed else 1.0


def device_backlog(device: Device, queues: Iterable[DeviceQueue], now: float) -> float:
    """Seconds of queued work on ``device``: the sum of its unfinished submissions' costs / speed.

    The submission a queue is running counts only for what is left of it. On a fake
    device this is exact for work without waits; on real devices it counts the costs
    the work was submitted with (seconds at speed 1.0): work submitted without a cost
    counts as nothing, so give costs to work that placement should see.
    """
    speed = device_speed(device)
    total = 0.0
    for q in queues:
        if q.device is not device:
            continue
        current = q._current
        if current is not None and current.cost:
            seconds = current.cost / speed
            if current.state is SubmissionState.RUNNING and current.started_at is not None:
                seconds = max(0.0, current.started_at + seconds - now)
            total += seconds
        for sub in q._fifo:
            if sub.cost:
                total += sub.cost / speed
    return total


def runtime_candidates(
    runtime_devices: Mapping[str, Device],
    residency: PlacementResidency,
    queues: Iterable[DeviceQueue],
    needs: StageNeeds,
    now: float,
    devices: Iterable[str] | None = None,
) -> list[PlacementCandidate]:
    """Describe ``devices`` (default: every compute device) as candidates for ``needs``."""
    queues = tuple(queues)
    if devices is None:
        chosen = [d for d in runtime_devices.values() if d.kind not in NON_COMPUTE_KINDS]
    else:
        chosen = []
        for name in devices:
            if name not in runtime_devices:
                raise KeyError(f"no device named {name!r}; known: {sorted(runtime_devices)}")
            chosen.append(runtime_devices[name])
    out = []
    for dev in chosen:
        if needs.model is None:
            resident, load = False, 0.0
        else:
            resident = residency.is_resident(needs.model, dev.name)
            load = 0.0 if resident else residency.load_time(needs.model, dev.name)
        out.append(
            PlacementCandidate(
                device=dev.name,
                kind=dev.kind,
                resident=resident,
                load_time=load,
                backlog=device_backlog(dev, queues, now),
                compute=(needs.cost or 0.0) / device_speed(dev),
            )
        )
    return out
