"""Where the bytes of resident weights and pages live: torch tensors, imported lazily.

A device's memory is a torch tensor on ``device.torch_device`` when the device has that
attribute (a CUDA device), else in CPU memory. The budget and the device's
:class:`BufferPool` account for it; the tensor is what holds the bytes, and dropping
the last reference returns them to the allocator.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..devices._base import Device

__all__ = ("empty_bytes", "import_torch", "staging_bytes", "torch_device", "typed_view")


def import_torch() -> Any:
    """The torch module, or an ImportError that says what needs it."""
    try:
        return importlib.import_module("torch")
    except ImportError as exc:
        raise ImportError(
            "asyncfront's weight residency and pager hold tensors and need PyTorch "
            "(pip install torch)"
        ) from exc


def torch_device(device: Device) -> str:
    """The torch device string whose memory backs ``device`` (``"cpu"`` unless it says)."""
    return str(getattr(device, "torch_device", "cpu"))


def empty_bytes(device: Device, nbytes: int) -> Any:
    """An uninitialised ``uint8`` tensor of ``nbytes`` in ``device``'s memory."""
    torch = import_torch()
    return torch.empty(nbytes, dtype=torch.uint8, device=torch_device(device))


def staging_bytes(nbytes: int, peer: Any) -> Any:
    """A host ``uint8`` tensor for transfers to or from ``peer`` (pinned for CUDA peers)."""
    torch = import_torch()
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=peer.device.type == "cuda")


def typed_view(raw: Any, offset: int, dtype: Any, shape: tuple[int, ...]) -> Any:
    """``raw[offset:]`` seen as a tensor of ``dtype`` and ``shape`` (shares memory).

    Falls back to a copy when ``offset`` is not a multiple of the element size, which
    a view cannot express.
    """
    torch = import_torch()
    itemsize = torch.empty((), dtype=dtype).element_size()
    count = 1
    for dim in shape:
        count *= dim
    piece = raw[offset : offset + count * itemsize]
    if offset % itemsize:
        piece = piece.clone()
    return piece.view(dtype).reshape(shape)
