"""Building modules without their weights, one build at a time in the process.

A module is built with every parameter on ``meta`` (nothing of it is allocated or
initialised on a device) and its buffers computed on the CPU: the persistent ones are
replaced by the checkpoint's, the non-persistent ones (position ids, rotary
frequencies) are kept as the values the module itself computes.

Builds are serialised by one process-wide lock. Model construction is not thread-safe
in the libraries that build modules: ``transformers``' ``from_config`` sets torch's
default dtype and patches classes while it runs, so two builds on two threads can give
a model the other's dtype or leave its tied weights untied. Loading (reads and mapping)
runs outside the lock, in parallel.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from ..memory._tensors import import_torch

__all__ = ("BUILD_LOCK", "BuiltModule", "build_on_meta")

BUILD_LOCK = threading.RLock()
"""Held while any module is built: builds change process-global state."""


@dataclass(frozen=True)
class BuiltModule:
    """A module with its parameters on ``meta``, and its non-persistent buffers.

    Attributes:
        module: the ``torch.nn.Module``; every parameter and persistent buffer is on
            ``meta``.
        buffers: the non-persistent buffers as the module computed them, by state-dict
            style name (``"embeddings.position_ids"``), on the CPU; the module holds
            them on ``meta`` until it is made resident.
    """

    module: Any
    buffers: dict[str, Any]


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Move each parameter to ``meta`` as it is registered, on this thread only."""
    torch = import_torch()
    me = threading.get_ident()

    def to_meta(module: Any, name: str, param: Any) -> Any:
        if param is None or threading.get_ident() != me or param.device.type == "meta":
            return None
        return torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    handle = torch.nn.modules.module.register_module_parameter_registration_hook(to_meta)
    try:
        yield
    finally:
        handle.remove()


def build_on_meta(build: Callable[[], Any]) -> BuiltModule:
    """Call ``build()`` under the build lock with its parameters placed on ``meta``.

    Parameters go to ``meta`` as they are registered, so initialisers that follow run on
    ``meta`` and cost nothing; buffers are computed on the CPU, where the module puts
    them (they are small: position ids, masks, frequencies). Persistent buffers then go
    to ``meta`` too (the checkpoint holds them); non-persistent ones are returned.

    Raises:
        TypeError: ``build`` did not return a ``torch.nn.Module``.
    """
    torch = import_torch()
    with BUILD_LOCK:
        with _parameters_on_meta(), torch.device("cpu"):
            module = build()
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"build() must return a torch.nn.Module, got {type(module).__name__}")
        buffers: dict[str, Any] = {}
        for prefix, sub in module.named_modules(remove_duplicate=False):
            for attr, buf in list(sub._buffers.items()):
                if buf is None:
                    continue
                if attr in sub._non_persistent_buffers_set:
                    buffers[f"{prefix}.{attr}" if prefix else attr] = buf
                if buf.device.type != "meta":
                    sub._buffers[attr] = buf.to("meta")
        # Parameters put into ``_parameters`` directly were not seen by the hook; one
        # meta copy per parameter object, so weights shared between modules stay shared.
        moved: dict[int, Any] = {}
        for sub in module.modules():
            for attr, param in list(sub._parameters.items()):
                if param is not None and param.device.type != "meta":
                    if id(param) not in moved:
                        moved[id(param)] = torch.nn.Parameter(
                            param.to("meta"), requires_grad=param.requires_grad
                        )
                    sub._parameters[attr] = moved[id(param)]
    return BuiltModule(module, buffers)
