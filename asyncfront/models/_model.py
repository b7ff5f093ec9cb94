"""Models as resident weights: a module built on ``meta`` whose tensors are views of a block.

``rt.model(name, build, weights, device=...)`` builds the module once without its
weights (:func:`~asyncfront.models.build_on_meta`) and registers the checkpoint as the
model's :class:`~asyncfront.memory.Weights`. Making the model resident loads those
weights into one block of the device's pool, through the residency's load path, and
swaps every parameter and persistent buffer of the module for a view of the block
(``torch.utils.swap_tensors``: the same ``Parameter`` objects, so optimizers, hooks and
the module a user holds survive). Non-persistent buffers get the values the module
computed (or the checkpoint's, where it carries them) on the device; weights tied in the
module are one view. Dropping swaps them back to ``meta`` and frees the block with a
death frontier; a guard on every submodule raises :class:`ModelNotResidentError` on any
use while the model is not resident, because ``meta`` tensors alone do not always fail
(a bias-free ``Linear`` returns uninitialised memory, an ``Embedding`` a ``meta``
tensor).

Views of parameters kept past a ``using`` block are invalid once the model is dropped:
the block's memory goes to whoever allocates next.
"""

from __future__ import annotations

import contextvars
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .._budget import format_bytes
from ..memory._residency import ResidentWeights, Weights
from ..memory._tensors import import_torch
from ._build import BuiltModule

if TYPE_CHECKING:
    from .._context import ExecutionContext
    from .._frontier import Frontier
    from .._queue import Submission
    from .._semaphore import TimelineSemaphore
    from ..devices._base import Device

__all__ = (
    "CheckpointMismatchError",
    "Model",
    "ModelNotResidentError",
    "ResidentModel",
    "bind_checkpoint",
)

HELD: contextvars.ContextVar[tuple[ResidentWeights, ...]] = contextvars.ContextVar(
    "asyncfront_models_held", default=()
)
"""The models' weights that enclosing ``using`` blocks of the current task pin."""


class ModelNotResidentError(RuntimeError):
    """A model's module was used while its weights are not resident on any device."""

    def __init__(self, model: str, submodule: str) -> None:
        where = f" (submodule {submodule!r})" if submodule else ""
        super().__init__(
            f"model {model!r} is not resident{where}: use it inside "
            f"'async with rt.using(model, device)'"
        )
        self.model = model
        self.submodule = submodule


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit its module: a tensor missing, unknown or of another shape."""


@dataclass(frozen=True)
class _Binding:
    """Where one parameter or buffer of the module comes from."""

    names: tuple[str, ...]  # every state-dict name of the tensor (tied weights share one)
    layout: str | None  # the checkpoint entry, or None for a computed buffer
    owners: tuple[tuple[Any, str], ...]  # (submodule, attribute) holding it
    is_parameter: bool


def _strip(key: str, prefix: str) -> str | None:
    return key[len(prefix) + 1 :] if prefix and key.startswith(prefix + ".") else None


def bind_checkpoint(
    module: Any, entries: Mapping[str, tuple[str, tuple[int, ...]]], *, model: str = "model"
) -> tuple[dict[str, str], set[str]]:
    """Match a module's state-dict names to checkpoint entries.

    ``entries`` maps each checkpoint name to ``(dtype, shape)``. A name matches as is, or
    with the module's ``base_model_prefix`` (transformers' ``bert.``, ``transformer.``)
    added or removed. Tied weights match when any of their names is in the checkpoint.

    Returns:
        ``(found, computed)``: module name -> checkpoint name for every parameter and
        persistent buffer, and for the non-persistent buffers the checkpoint carries; and
        the names of non-persistent buffers it does not carry (computed on the device).

    Raises:
        CheckpointMismatchError: a parameter or persistent buffer is missing (naming it),
            a checkpoint entry is unknown to the module and is not a non-persistent
            buffer, or shapes differ.
    """
    prefix = str(getattr(module, "base_model_prefix", "") or "")

    def lookup(name: str) -> str | None:
        for candidate in (name, _strip(name, prefix), f"{prefix}.{name}" if prefix else None):
            if candidate is not None and candidate in entries:
                return candidate
        return None

    groups: dict[int, list[str]] = {}
    persistent: dict[int, bool] = {}
    tensors: dict[int, Any] = {}
    for mod_name, sub in module.named_modules(remove_duplicate=False):
        for attr, tensor in list(sub._parameters.items()) + list(sub._buffers.items()):
            if tensor is None:
                continue
            full = f"{mod_name}.{attr}" if mod_name else attr
            key = id(tensor)
            groups.setdefault(key, [])
            if full not in groups[key]:
                groups[key].append(full)
            tensors[key] = tensor
            keep = attr in sub._parameters or attr not in sub._non_persistent_buffers_set
            persistent[key] = persistent.get(key, False) or keep
    found: dict[str, str] = {}
    computed: set[str] = set()
    used: set[str] = set()
    for key, names in groups.items():
        hits = [h for h in map(lookup, names) if h is not None]
        hit = hits[0] if hits else None
        if hit is None:
            if persistent[key]:
                tied = f" (tied with {', '.join(repr(n) for n in names[1:])})" if names[1:] else ""
                raise CheckpointMismatchError(
                    f"model {model!r}: the checkpoint has no entry for {names[0]!r}{tied}"
                )
            computed.update(names)
            continue
        shape = tuple(tensors[key].shape)
        if tuple(entries[hit][1]) != shape:
            raise CheckpointMismatchError(
                f"model {model!r}: checkpoint entry {hit!r} has shape {tuple(entries[hit][1])}, "
                f"the module's {names[0]!r} has shape {shape}"
            )
        # A checkpoint may carry a tied weight under each of its names (one saved before
        # the tie, for one): those entries are known, and the tie keeps the first, as
        # from_pretrained's tying after loading does.
        used.update(hits)
        for name in names:
            found[name] = hit
    unknown = sorted(set(entries) - used)
    if unknown:
        raise CheckpointMismatchError(
            f"model {model!r}: checkpoint entries unknown to the module: "
            f"{', '.join(repr(u) for u in unknown[:5])}"
            + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        )
    return found, computed


class Model:
    """A ``torch.nn.Module`` whose weights are resident weights of the runtime.

    Created by :meth:`asyncfront.Runtime.model` or
    :func:`asyncfront.models.from_transformers`. The module exists from registration on
    (built on ``meta``); its tensors are real only while the model is resident.

    Attributes:
        name: the model's name (also its weights' name in the residency).
        module: the module; the same object across drops and reloads.
        weights: the checkpoint as registered weights (one block when resident).
        device: where the model was registered to live (``using`` elsewhere moves it).
        context: the context whose budget holds the weights; None for the context named
            like the model on the device it goes to.
        priority: eviction priority (higher stays longer); None uses the context's.
        train: whether parameters require gradients and the module is in train mode.
    """

    def __init__(
        self,
        name: str,
        built: BuiltModule,
        weights: Weights,
        *,
        device: Device,
        context: ExecutionContext | None,
        priority: int | None,
        train: bool,
    ) -> None:
        self.name = name
        self.module = built.module
        self.weights = weights
        self.device = device
        self.context = context
        self.priority = priority
        self.train = train
        self.resident: ResidentModel | None = None
        self._loads = 0
        entries = {t.name: (t.dtype, t.shape) for t in weights.layouts}
        found, computed = bind_checkpoint(self.module, entries, model=name)
        self._computed = {n: built.buffers[n] for n in computed if n in built.buffers}
        bindings: dict[int, _Binding] = {}
        for mod_name, sub in self.module.named_modules(remove_duplicate=False):
            for attr, tensor in list(sub._parameters.items()) + list(sub._buffers.items()):
                if tensor is None:
                    continue
                full = f"{mod_name}.{attr}" if mod_name else attr
                prior = bindings.get(id(tensor))
                if prior is None:
                    bindings[id(tensor)] = _Binding(
                        (full,), found.get(full), ((sub, attr),), attr in sub._parameters
                    )
                else:
                    bindings[id(tensor)] = _Binding(
                        (*prior.names, full),
                        prior.layout,
                        (*prior.owners, (sub, attr)),
                        prior.is_parameter,
                    )
        self._bindings = tuple(bindings.values())
        for param in self.module.parameters():
            param.requires_grad_(train)
        self.module.train(train)
        self._guards = [
            sub.register_forward_pre_hook(self._guard_for(sub_name))
            for sub_name, sub in self.module.named_modules()
        ]

    def _guard_for(self, submodule: str) -> Callable[[Any, Any], None]:
        def guard(module: Any, args: Any) -> None:
            if self.resident is None:
                raise ModelNotResidentError(self.name, submodule)

        return guard

    @property
    def nbytes(self) -> int:
        """Bytes of device memory the model's weights take."""
        return self.weights.nbytes

    @property
    def is_resident(self) -> bool:
        """Whether the model's tensors are real (resident on some device)."""
        return self.resident is not None

    def _attach(self, weights: ResidentWeights) -> ResidentModel:
        """Swap the module's tensors for views of ``weights``' block."""
        torch = import_torch()
        target = weights.tensors
        where = torch.device(_torch_device(weights.device))
        tensors: dict[str, Any] = {}
        for binding in self._bindings:
            if binding.layout is not None:
                value = target[binding.layout]
            else:
                value = self._computed[binding.names[0]].to(where, copy=True)
            if binding.is_parameter:
                sub, attr = binding.owners[0]
                param = sub._parameters[attr]
                torch.utils.swap_tensors(param, torch.nn.Parameter(value, requires_grad=self.train))
                value = param
            else:
                for sub, attr in binding.owners:
                    sub._buffers[attr] = value
            for name in binding.names:
                tensors[name] = value
        resident = ResidentModel(self, weights, tensors)
        self.resident = resident
        self.device = weights.device
        self._loads += 1
        weights._on_drop.append(self._detach)
        return resident

    def _detach(self, weights: ResidentWeights) -> None:
        """The block is going: swap every tensor back to ``meta``."""
        torch = import_torch()
        for binding in self._bindings:
            sub, attr = binding.owners[0]
            if binding.is_parameter:
                param = sub._parameters[attr]
                empty = torch.empty_like(param, device="meta")
                torch.utils.swap_tensors(
                    param, torch.nn.Parameter(empty, requires_grad=param.requires_grad)
                )
            else:
                empty = torch.empty_like(sub._buffers[attr], device="meta")
                for sub, attr in binding.owners:
                    sub._buffers[attr] = empty
        if self.resident is not None:
            self.resident.tensors = {}
        self.resident = None

    def __repr__(self) -> str:
        where = f"resident on {self.resident.device.name!r}" if self.resident else "not resident"
        return (
            f"<Model {self.name!r} {type(self.module).__name__} {format_bytes(self.nbytes)} "
            f"{where}>"
        )


class ResidentModel:
    """A model resident on one device: what ``async with rt.using(model, device)`` yields.

    Attributes:
        model: the model.
        weights: its resident weights (the block, the load's frontier, pins).
        tensors: every state-dict name of the module -> its tensor on the device (empty
            once dropped).
    """

    def __init__(self, model: Model, weights: ResidentWeights, tensors: dict[str, Any]) -> None:
        self.model = model
        self.weights = weights
        self.tensors = tensors

    @property
    def module(self) -> Any:
        """The ``torch.nn.Module``, ready to run."""
        return self.model.module

    @property
    def device(self) -> Device:
        """Where the model is resident."""
        return self.weights.device

    @property
    def context(self) -> ExecutionContext:
        """Whose budget holds the weights."""
        return self.weights.context

    @property
    def ready(self) -> tuple[TimelineSemaphore, int]:
        """``(semaphore, value)`` reached when the load finished (wait on it in work)."""
        return self.weights.ready

    @property
    def frontier(self) -> Frontier:
        """The load's frontier."""
        return self.weights.frontier

    @property
    def pinned(self) -> bool:
        """Whether the model cannot be dropped now (``using`` blocks or work hold it)."""
        return self.weights.pinned

    @property
    def dropped(self) -> bool:
        """Whether the model was dropped since (the handle is then dead)."""
        return self.weights.dropped

    @property
    def nbytes(self) -> int:
        """Bytes of device memory held."""
        return self.weights.nbytes

    def __repr__(self) -> str:
        return (
            f"<ResidentModel {self.model.name!r} on {self.device.name!r} "
            f"{format_bytes(self.nbytes)} context={self.context.name!r} "
            f"{'dropped' if self.dropped else f'pins={self.weights.pins}'}>"
        )


def _torch_device(device: Device) -> str:
    return str(getattr(device, "torch_device", "cpu"))


def track_submission(modules: Mapping[int, Model], submission: Submission) -> None:
    """Pin what ``submission`` uses until it finishes: the models of enclosing ``using``
    blocks, and a resident model whose module is its work or one of its arguments."""
    for weights in HELD.get():
        if not weights.dropped:
            weights.hold_until_done(submission)
    if not modules:
        return
    fn = submission.fn
    for candidate in (fn, getattr(fn, "__self__", None), *submission.args):
        model = modules.get(id(candidate))
        if model is not None and model.resident is not None:
            held = model.resident.weights
            if held not in HELD.get():
                held.hold_until_done(submission)


def weights_source(
    weights: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
) -> str | os.PathLike[str] | list[str | os.PathLike[str]]:
    """The safetensors file(s) of a checkpoint file or directory, or the state dict as is.

    A directory gives its ``*.safetensors.index.json`` shards when it has an index, else
    its one ``.safetensors`` file.

    Raises:
        FileNotFoundError: the directory holds no safetensors file.
        ValueError: it holds several without an index.
    """
    if not isinstance(weights, str | os.PathLike):
        return list(weights)  # the files themselves
    path = os.fspath(weights)
    if not os.path.isdir(path):
        return weights
    import json

    indexes = sorted(f for f in os.listdir(path) if f.endswith(".safetensors.index.json"))
    if indexes:
        with open(os.path.join(path, indexes[0])) as f:
            index = json.load(f)
        shards = sorted(set(index.get("weight_map", {}).values()))
        if not shards:
            raise ValueError(f"{os.path.join(path, indexes[0])!r} names no shards")
        return [os.path.join(path, shard) for shard in shards]
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors file in {path!r}")
    if len(files) > 1:
        raise ValueError(
            f"{path!r} holds {len(files)} .safetensors files and no *.safetensors.index.json"
        )
    return os.path.join(path, files[0])
