"""Adam's moment tensors in pager pages, so a fine-tune's optimizer state pages out between steps.

Each trainable parameter gets one page of shape ``(moments, *parameter.shape)``: the
first moment (``exp_avg``), the second (``exp_avg_sq``) and, with ``amsgrad``, the
running maximum of the second. The optimizer's state for the parameter holds views of
that page while the state is pinned; PyTorch's Adam updates its moments in place, so
the optimizer step writes straight into the pages, and its arithmetic is exactly the
unpaged optimizer's.

Between steps nothing needs the moments, which is when they page out (scenario B2c:
after the forward pass, while the backward pass runs) and back in (before the step).
:meth:`PagedOptimizerState.step` runs the step on a device queue with the pages
pinned, waiting for their page-in; outside it, the optimizer's moments are ``meta``
tensors and a step raises :class:`OptimizerStateNotPinnedError` (or
:class:`OptimizerStatePagedOutError` when the pages are out), rather than computing
on memory the pager may have moved or freed.
"""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .._budget import format_bytes
from .._frontier import Frontier
from ..memory._pager import Page, Pager, PageUse, Tier
from ..memory._tensors import import_torch

if TYPE_CHECKING:
    from .._context import ExecutionContext
    from .._queue import DeviceQueue, SemaphoreValue

__all__ = (
    "OptimizerStateNotPinnedError",
    "OptimizerStatePagedOutError",
    "OptimizerStateStatistics",
    "PagedOptimizerState",
)

MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
"""Adam's per-parameter moment tensors, in page order (the last one only with amsgrad)."""


class OptimizerStateNotPinnedError(RuntimeError):
    """The optimizer stepped outside :meth:`PagedOptimizerState.step` / ``pinned``."""


class OptimizerStatePagedOutError(OptimizerStateNotPinnedError):
    """The optimizer stepped while its moments are paged out (or moving)."""


@dataclass(frozen=True)
class OptimizerStateStatistics:
    """A snapshot of paged optimizer state: pages, bytes, where they are, steps taken."""

    name: str
    pages: int
    nbytes: int
    device_pages: int
    host_pages: int
    file_pages: int
    steps: int
    pinned: bool


@dataclass(frozen=True)
class _Pin:
    uses: tuple[PageUse, ...]


class PagedOptimizerState:
    """The moments of a ``torch.optim.Adam`` (or ``AdamW``) held in pages of a :class:`Pager`.

    Make it before the optimizer's first step and :meth:`allocate` it: that takes one
    zeroed page per parameter through ``context``'s budget and fills the optimizer's
    state as Adam would on its first step, with the moments in the pages.

    Args:
        optimizer: an Adam or AdamW without ``fused`` or ``capturable`` (their state
            lives on the device in a form this does not page).
        pager: the pager whose pages hold the moments.
        context: the context whose device budget holds them while resident.
        name: a label for pages, logs and errors.

    Raises:
        TypeError: not an Adam optimizer.
        ValueError: fused or capturable, or the optimizer already has state.
    """

    def __init__(
        self, optimizer: Any, pager: Pager, context: ExecutionContext, *, name: str = "adam"
    ) -> None:
        torch = import_torch()
        if not isinstance(optimizer, torch.optim.Adam):
            raise TypeError(
                f"paged optimizer state needs torch.optim.Adam or AdamW, got {optimizer!r}"
            )
        for group in optimizer.param_groups:
            for flag in ("fused", "capturable", "differentiable"):
                if group.get(flag):
                    raise ValueError(f"paged optimizer state does not support {flag}=True")
        if any(optimizer.state[p] for group in optimizer.param_groups for p in group["params"]):
            raise ValueError("the optimizer already has state: page it from before its first step")
        self.optimizer = optimizer
        self.pager = pager
        self.context = context
        self.name = name
        self._pages: dict[Any, Page] = {}  # parameter -> its moments' page
        self._moments: dict[Any, tuple[str, ...]] = {}
        self._pin: _Pin | None = None
        self._steps = 0
        self._closed = False
        self._hook = optimizer.register_step_pre_hook(self._before_step)

    # -- state -------------------------------------------------------------------------

    def pages(self) -> tuple[Page, ...]:
        """Every page, in parameter order."""
        return tuple(self._pages.values())

    @property
    def tier(self) -> Tier | None:
        """Where the pages are when they all agree (None for a mix or before allocate)."""
        tiers = {page.tier for page in self._pages.values()}
        return tiers.pop() if len(tiers) == 1 else None

    @property
    def nbytes(self) -> int:
        """Bytes of the moments."""
        return sum(page.nbytes for page in self._pages.values())

    @property
    def frontier(self) -> Frontier:
        """The merge of every page's timeline: what the moments' last use or move reached."""
        merged = Frontier()
        for page in self._pages.values():
            merged = merged | page.frontier
        return merged

    @property
    def is_pinned(self) -> bool:
        """Whether an optimizer step is using the moments now."""
        return self._pin is not None

    def statistics(self) -> OptimizerStateStatistics:
        """A frozen snapshot of the pages and steps."""
        tiers = [page.tier for page in self._pages.values()]
        return OptimizerStateStatistics(
            name=self.name,
            pages=len(tiers),
            nbytes=self.nbytes,
            device_pages=tiers.count(Tier.DEVICE),
            host_pages=tiers.count(Tier.HOST),
            file_pages=tiers.count(Tier.FILE),
            steps=self._steps,
            pinned=self.is_pinned,
        )

    def __repr__(self) -> str:
        s = self.statistics()
        where = self.tier.value if self.tier is not None else "mixed" if s.pages else "empty"
        return (
            f"<PagedOptimizerState {self.name!r} pages={s.pages} {format_bytes(s.nbytes)} "
            f"({where}) steps={s.steps}{' pinned' if s.pinned else ''}>"
        )

    # -- lifecycle -----------------------------------------------------------------------

    async def allocate(self) -> None:
        """Take a zeroed page per trainable parameter and fill the optimizer's state.

        Raises:
            RuntimeError: already allocated, or closed.
            MemoryBudgetError: the context's budget cannot hold the moments; the pages
                taken so far are given back.
        """
        self._check_open()
        if self._pages:
            raise RuntimeError(f"{self!r} is already allocated")
        torch = import_torch()
        scalar_dtype = importlib.import_module("torch.optim.optimizer")._get_scalar_dtype
        taken: dict[Any, Page] = {}
        try:
            for i, (group, p) in enumerate(self._parameters()):
                moments = MOMENTS if group["amsgrad"] else MOMENTS[:2]
                page = await self.pager.allocate(
                    self.context,
                    (len(moments), *p.shape),
                    p.dtype,
                    owner=self.name,
                    name=f"{self.name}/{i}",
                )
                taken[p] = page
                self._moments[p] = moments
                async with self.pager.use(page) as use:
                    zero = self.context.queue.submit(
                        use.tensor.zero_,
                        waits=[use.wait],
                        signals=[use.signal],
                        name=f"zero {page.name}",
                    )
                await zero
        except BaseException:
            for page in taken.values():
                await self.pager.release(page)
            self._moments.clear()
            raise
        self._pages = taken
        for p in self._pages:
            # What Adam's first step puts there (non-fused, non-capturable).
            state = self.optimizer.state[p]
            state["step"] = torch.tensor(0.0, dtype=scalar_dtype())
            self._unbind(p)

    async def aclose(self) -> None:
        """Release the pages; the optimizer's state is dropped (a later step starts afresh)."""
        if self._closed:
            return
        if self._pin is not None:
            raise RuntimeError(f"{self!r} is in use; cannot close it")
        self._closed = True
        self._hook.remove()
        pages, self._pages = self._pages, {}
        for p, page in pages.items():
            self.optimizer.state.pop(p, None)
            await self.pager.release(page)

    async def __aenter__(self) -> PagedOptimizerState:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # -- moving ------------------------------------------------------------------------

    async def page_out(self, tier: Tier = Tier.FILE) -> Frontier:
        """Move the moments out of device memory; returns the frontier of the last move.

        Raises:
            RuntimeError: a step is using them.
            StorageError: a page's move failed; it stays where it was, usable.
        """
        self._check_open()
        if self._pin is not None:
            raise RuntimeError(f"{self!r} is in use; cannot page it out")
        await _all(self.pager.page_out(page, tier) for page in self._pages.values())
        return self.frontier

    async def page_in(self) -> Frontier:
        """Bring the moments back to device memory; returns the frontier of the last move.

        Raises:
            StorageError: a page-in failed; that page stays in its tier, intact.
        """
        self._check_open()
        away = [page for page in self._pages.values() if page.tier is not Tier.DEVICE]
        await _all(self.pager.page_in(page) for page in away)
        return self.frontier

    # -- stepping ----------------------------------------------------------------------

    @asynccontextmanager
    async def pinned(self) -> AsyncIterator[tuple[list[SemaphoreValue], list[SemaphoreValue]]]:
        """Pin the moments (paging them in if needed) and bind them into the optimizer.

        Yields the waits and signals for the one submission that steps the optimizer
        inside the block; :meth:`step` is the usual way to use it.

        Raises:
            RuntimeError: already pinned, closed or not allocated.
        """
        self._check_open()
        if not self._pages:
            raise RuntimeError(f"{self!r} is not allocated: await allocate() first")
        if self._pin is not None:
            raise RuntimeError(f"{self!r} is already pinned")
        async with AsyncExitStack() as stack:
            uses = []
            for page in self._pages.values():
                uses.append(await stack.enter_async_context(self.pager.use(page)))
            self._pin = _Pin(tuple(uses))
            try:
                for p, use in zip(self._pages, uses, strict=True):
                    self._bind(p, use.tensor)
                yield [u.wait for u in uses], [u.signal for u in uses]
            finally:
                self._pin = None
                for p in self._pages:
                    self._unbind(p)

    async def step(
        self,
        queue: DeviceQueue,
        *,
        closure: Callable[[], Any] | None = None,
        waits: Iterable[SemaphoreValue] = (),
        signals: Iterable[SemaphoreValue] = (),
        name: str | None = None,
    ) -> Any:
        """Run ``optimizer.step()`` on ``queue`` with the moments paged in and pinned.

        The submission waits for ``waits`` (the backward pass, the page-in) and for the
        pages' previous uses and moves, and signals ``signals`` and the pages' timelines.

        Returns:
            What ``optimizer.step`` returned (the closure's loss, if given).
        """
        async with self.pinned() as (page_waits, page_signals):
            sub = queue.submit(
                self.optimizer.step,
                *(() if closure is None else (closure,)),
                waits=[*page_waits, *waits],
                signals=[*page_signals, *signals],
                name=name if name is not None else f"{self.name} step",
            )
            result = await sub
        self._steps += 1
        return result

    # -- internals ---------------------------------------------------------------------

    def _parameters(self) -> list[tuple[dict[str, Any], Any]]:
        return [
            (group, p)
            for group in self.optimizer.param_groups
            for p in group["params"]
            if p.requires_grad
        ]

    def _bind(self, p: Any, tensor: Any) -> None:
        state = self.optimizer.state[p]
        for i, key in enumerate(self._moments[p]):
            state[key] = tensor[i]

    def _unbind(self, p: Any) -> None:
        torch = import_torch()
        state = self.optimizer.state[p]
        for key in self._moments[p]:
            state[key] = torch.empty_like(p, device="meta")

    def _before_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self._pin is not None or self._closed:
            return
        away = [page for page in self._pages.values() if page.tier is not Tier.DEVICE]
        if away:
            raise OptimizerStatePagedOutError(
                f"optimizer state {self.name!r} is paged out ({away[0].name!r} is in the "
                f"{away[0].tier.value} tier); step it with PagedOptimizerState.step()"
            )
        raise OptimizerStateNotPinnedError(
            f"optimizer state {self.name!r} stepped outside PagedOptimizerState.step(): "
            "its pages are not pinned and may move"
        )

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"optimizer state {self.name!r} is closed")


async def _all(moves: Iterable[Any]) -> None:
    """Run the moves together; raise the first failure once all have settled."""
    results = await asyncio.gather(*moves, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
