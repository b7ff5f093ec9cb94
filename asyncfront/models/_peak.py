"""How much working memory a piece of work needs: the figure to pass as ``memory=``.

On CUDA the figure is the caching allocator's own peak (``torch.cuda.max_memory_allocated``)
above what was allocated when the work started. On the CPU PyTorch keeps no allocator
statistics, and ``tracemalloc`` sees none of torch's allocations, so the figure is the peak
of tensor storage alive at once that the work's torch operations created, as a
``TorchDispatchMode`` sees each operation's outputs: activations and results, not memory
allocated outside torch operations (NumPy, Python objects, libraries' own buffers) nor
what the allocator keeps around them.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

from ..memory._tensors import import_torch

__all__ = ("measure_peak",)


def _cuda_device(args: tuple[Any, ...], kwargs: dict[str, Any], device: Any) -> Any:
    torch = import_torch()
    if device is not None:
        dev = torch.device(device)
        return dev if dev.type == "cuda" else None
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.device.type == "cuda":
            return value.device
        params = getattr(value, "parameters", None)
        if callable(params):
            for p in params():
                if p.device.type == "cuda":
                    return p.device
                break
    return None


def measure_peak(fn: Callable[..., Any], *args: Any, device: Any = None, **kwargs: Any) -> int:
    """Run ``fn(*args, **kwargs)`` once and return the bytes of working memory it peaked at.

    On CUDA (``device``, or the first CUDA tensor or module among the arguments) it is the
    allocator's peak above its level at the start. On the CPU it is the peak of tensor
    storage created by the call's torch operations and alive at once, outputs included
    (see the module docs for what that leaves out). Run it under the same grad mode as
    the real work: with gradients enabled, autograd keeps activations alive longer.
    """
    torch = import_torch()
    cuda = _cuda_device(args, kwargs, device)
    if cuda is not None:
        torch.cuda.synchronize(cuda)
        start = torch.cuda.memory_allocated(cuda)
        torch.cuda.reset_peak_memory_stats(cuda)
        fn(*args, **kwargs)
        torch.cuda.synchronize(cuda)
        return max(0, int(torch.cuda.max_memory_allocated(cuda)) - int(start))
    counter = _StorageCounter()
    with counter:
        result = fn(*args, **kwargs)
    del result
    return counter.peak


class _StorageCounter:
    """Counts the bytes of storages that operations create while it is active."""

    def __init__(self) -> None:
        torch = import_torch()
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        counter = self
        self.live: dict[int, list[int]] = {}  # storage pointer -> [nbytes, tensors alive]
        self.current = 0
        self.peak = 0
        self._seen_inputs: set[int] = set()

        class Mode(TorchDispatchMode):  # type: ignore[no-untyped-call]
            def __torch_dispatch__(
                self, func: Any, types: Any, args: Any = (), kwargs: Any = None
            ) -> Any:
                for leaf in tree_leaves((args, kwargs)):
                    if isinstance(leaf, torch.Tensor) and leaf.device.type != "meta":
                        key = leaf.untyped_storage().data_ptr()
                        if key not in counter.live:
                            counter._seen_inputs.add(key)
                out = func(*args, **(kwargs or {}))
                for leaf in tree_leaves(out):
                    if isinstance(leaf, torch.Tensor) and leaf.device.type != "meta":
                        counter._add(leaf)
                return out

        self._mode: Any = Mode()  # type: ignore[no-untyped-call]

    def _add(self, tensor: Any) -> None:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key == 0 or key in self._seen_inputs:
            return  # an input's storage (a weight, a view of one) or an empty tensor
        entry = self.live.get(key)
        if entry is None:
            entry = self.live[key] = [storage.nbytes(), 0]
            self.current += entry[0]
            self.peak = max(self.peak, self.current)
        entry[1] += 1
        weakref.finalize(tensor, self._gone, key)

    def _gone(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del self.live[key]
            self.current -= entry[0]

    def __enter__(self) -> _StorageCounter:
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._mode.__exit__(*exc)
