"""Where the bytes of resident weights and pages live: torch tensors, imported lazily.

A device's memory is a torch tensor on ``device.torch_device`` when the device has that
attribute (a CUDA device), else in CPU memory. A device with a :class:`BufferPool` owns
one *arena*, a ``uint8`` tensor as large as the pool: the device's own ``arena`` when
it offers one, else one allocated here on first use. A buffer's bytes are the arena's
slice at the buffer's block offset, so the pool's decisions are the memory's: a freed
block's bytes are reused exactly when its death frontier allows, with no allocator in
between (and no page faults on memory touched before). A device without a pool gets a
tensor per buffer.
"""

from __future__ import annotations

import ctypes
import importlib
import mmap
import sys
import weakref
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .._context import Buffer
    from ..devices._base import Device
    from ._pool import BufferPool

__all__ = (
    "buffer_bytes",
    "copy_bytes",
    "dtype_names",
    "import_torch",
    "release_pages",
    "resolve_dtype",
    "torch_device",
    "typed_view",
)

_arenas: weakref.WeakKeyDictionary[BufferPool, Any] = weakref.WeakKeyDictionary()


def import_torch() -> Any:
    """The torch module, or an ImportError that says what needs it."""
    try:
        return importlib.import_module("torch")
    except ImportError as exc:
        from .._install import install_hint

        raise ImportError(
            "asyncfront's weight residency and pager hold tensors and need PyTorch "
            f"({install_hint('torch')})"
        ) from exc


def dtype_names() -> tuple[str, ...]:
    """The names of torch's dtypes as ``str(dtype)`` gives them, less ``torch.``, sorted."""
    torch = import_torch()
    found = {
        str(value).removeprefix("torch.")
        for value in vars(torch).values()
        if isinstance(value, torch.dtype)
    }
    return tuple(sorted(found))


def resolve_dtype(dtype: object) -> Any:
    """The torch dtype that ``dtype`` names: a ``torch.dtype``, or a name such as ``"float16"``.

    Names are torch's (``"float16"``, ``"bfloat16"``, aliases like ``"half"``), with or
    without a ``"torch."`` prefix.

    Raises:
        ValueError: a string that names no torch dtype (the message lists the names).
        TypeError: neither a string nor a torch dtype.
    """
    torch = import_torch()
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str):
        found = getattr(torch, dtype.removeprefix("torch."), None)
        if isinstance(found, torch.dtype):
            return found
        raise ValueError(f"unknown dtype {dtype!r}; accepted: {', '.join(dtype_names())}")
    raise TypeError(
        f"dtype must be a torch.dtype or its name (such as 'float16'), "
        f"got {type(dtype).__name__} {dtype!r}"
    )


def torch_device(device: Device) -> str:
    """The torch device string whose memory backs ``device`` (``"cpu"`` unless it says)."""
    return str(getattr(device, "torch_device", "cpu"))


def buffer_bytes(buffer: Buffer) -> Any:
    """The ``uint8`` tensor holding a budgeted buffer's bytes (uninitialised)."""
    torch = import_torch()
    device = buffer.context.device
    pool: BufferPool | None = device.memory
    block = buffer.block
    if pool is None or block is None:
        return torch.empty(buffer.nbytes, dtype=torch.uint8, device=torch_device(device))
    arena = getattr(device, "arena", None)
    if arena is None:
        arena = _arenas.get(pool)
    if arena is None:
        where = torch_device(device)
        # Host memory that CUDA copies read or write is pinned, so they run as DMA.
        pin = where == "cpu" and torch.cuda.is_available()
        arena = torch.empty(pool.capacity, dtype=torch.uint8, device=where, pin_memory=pin)
        _arenas[pool] = arena
    return arena[block.offset : block.offset + buffer.nbytes]


def copy_bytes(dst: Any, src: Any) -> None:
    """Copy ``src`` into ``dst`` (same size): the work of a copy queue.

    Between CPU tensors this is one memcpy on the calling worker thread (NumPy's, which
    releases the GIL): torch's intra-op threads would compete with the device's own
    workers, and on small machines their hand-offs cost more than the copy.
    """
    if dst.device.type == "cpu" and src.device.type == "cpu":
        import numpy

        numpy.copyto(dst.detach().numpy(), src.detach().numpy())
    else:
        dst.copy_(src)


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


_MADV_DONTNEED = 4  # Linux


def release_pages(tensor: Any) -> int:
    """Give the whole pages of a CPU tensor's memory back to the operating system.

    The memory stays mapped and reads as zeros until written again, so a pool block
    whose contents nobody needs any more (dropped weights) stops counting in the
    process's resident memory while the arena keeps its address range. Only Linux CPU
    memory that is not pinned is released; returns the bytes released (0 otherwise).
    """
    if sys.platform != "linux" or tensor.device.type != "cpu" or tensor.is_pinned():
        return 0
    page = mmap.PAGESIZE
    start = int(tensor.data_ptr())
    end = start + int(tensor.numel()) * int(tensor.element_size())
    first, last = -(-start // page) * page, end // page * page
    if last <= first:
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    if libc.madvise(ctypes.c_void_p(first), last - first, _MADV_DONTNEED) != 0:
        return 0
    return last - first
