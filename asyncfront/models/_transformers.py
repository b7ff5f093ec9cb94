"""transformers checkpoints as models: ``config.json`` built on meta, safetensors mapped.

The module comes from the directory's ``config.json`` (``AutoConfig`` and an
``AutoModel*`` class's ``from_config``), built under the process-wide build lock; its
weights are the directory's safetensors (one file, or the shards of a
``*.safetensors.index.json``), read by positional reads on the storage queue into the
model's block. ``from_pretrained``'s loader is never used, and outputs equal its
outputs bit for bit.
"""

from __future__ import annotations

import importlib
import os
from collections import Counter
from typing import TYPE_CHECKING, Any

from ..memory._residency import Weights
from ..memory._tensors import import_torch
from ._model import Model, weights_source

if TYPE_CHECKING:
    from .._context import ExecutionContext
    from .._runtime import Runtime
    from ..devices._base import Device

__all__ = ("from_transformers",)


def _import_transformers() -> Any:
    try:
        return importlib.import_module("transformers")
    except ImportError as exc:
        raise ImportError(
            "from_transformers needs the transformers package: pip install transformers"
        ) from exc


def from_transformers(
    rt: Runtime,
    name: str,
    checkpoint_dir: str | os.PathLike[str],
    *,
    device: str | Device,
    context: ExecutionContext | None = None,
    auto_class: str = "AutoModel",
    dtype: Any = None,
    priority: int | None = None,
    train: bool = False,
) -> Model:
    """Register a transformers checkpoint directory as a model of ``rt``.

    Args:
        rt: the runtime.
        name: the model's name (and its weights').
        checkpoint_dir: a directory with ``config.json`` and safetensors weights.
        device: where the model lives.
        context: whose budget holds the weights (default: the context named ``name``).
        auto_class: the transformers auto class that builds the module from the config:
            ``"AutoModel"``, ``"AutoModelForCausalLM"``, ...
        dtype: the floating weights' dtype; None keeps the checkpoint's. Another dtype
            reads the files into host staging and converts into the block (as
            ``from_pretrained(dtype=...)`` casts).
        priority: eviction priority (higher stays longer).
        train: parameters require gradients and the module is in train mode.

    Raises:
        FileNotFoundError: no ``config.json`` or no safetensors in the directory.
        ValueError: an unknown ``auto_class``, or a ``dtype`` that is not floating.
        CheckpointMismatchError: the checkpoint lacks a parameter of the module (named).
    """
    path = os.fspath(checkpoint_dir)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path!r} has no config.json")
    transformers = _import_transformers()
    torch = import_torch()
    if not auto_class.startswith("AutoModel") or not hasattr(transformers, auto_class):
        raise ValueError(
            f"auto_class must name a transformers AutoModel class such as 'AutoModel' or "
            f"'AutoModelForCausalLM', got {auto_class!r}"
        )
    auto = getattr(transformers, auto_class)
    source = weights_source(path)
    floats = Counter(
        t.dtype for t in Weights(name, source).layouts if getattr(torch, t.dtype).is_floating_point
    )
    stored = getattr(torch, floats.most_common(1)[0][0]) if floats else torch.float32
    wanted = stored
    if dtype is not None:
        wanted = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
        if not isinstance(wanted, torch.dtype) or not wanted.is_floating_point:
            raise ValueError(f"model {name!r}: dtype must be a floating torch dtype, got {dtype!r}")
    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)

    # transformers 5 calls it ``dtype``; 4.x ``torch_dtype`` (5 warns about the old name).
    major = int(str(transformers.__version__).split(".", 1)[0])
    keyword = "dtype" if major >= 5 else "torch_dtype"

    def build() -> Any:
        return auto.from_config(config, **{keyword: wanted})

    return rt.residency.register_model(
        name,
        build,
        path,
        dtype=None if dtype is None else str(wanted).removeprefix("torch."),
        device=device,
        context=context,
        priority=priority,
        train=train,
    )
