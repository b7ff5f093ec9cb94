"""A transformers KV cache whose keys and values live in pager pages.

Each layer of the cache owns a list of fixed-capacity pages, each holding the keys and
the values of ``page_tokens`` positions: a page is one pager block of shape
``(2, batch, heads, page_tokens, head_dim)``. New keys and values are copied into
narrowed views of the pages as the sequence grows, so the cache's state never grows by
concatenation; when a layer's last page fills, the cache takes more pages through the
context's budget (which may page out other sessions' least recently used pages). The
attention of a layer reads its keys and values as one narrowed view while they fit in
one page; across pages it reads a gathered copy made for that forward pass only.

The pages are the pager's, so an idle session's cache pages out to the host or the file
like any mutable block and comes back bit for bit. Work that uses the cache runs through
:meth:`PagedKVCache.run` (on a device queue) or inside :meth:`PagedKVCache.pinned` (on
the event loop's thread): both page the cache in on demand, pin its pages, and rebind
the layers' views to wherever the pages now are. A use anywhere else raises
:class:`KVCacheNotPinnedError`, or :class:`KVCachePagedOutError` when the cache is
paged out, rather than reading memory the pager may have moved or freed.

transformers is imported when the first cache is made, not when this module is.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import types
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .._budget import MemoryBudgetError, format_bytes
from .._semaphore import TimelineSemaphore
from ..memory._pager import Page, Pager, PageUse, Tier
from ..memory._tensors import import_torch

if TYPE_CHECKING:
    from .._context import ExecutionContext
    from .._queue import DeviceQueue, SemaphoreValue

__all__ = (
    "DEFAULT_PAGE_TOKENS",
    "KVCacheGrowthError",
    "KVCacheNotPinnedError",
    "KVCachePagedOutError",
    "KVCacheStatistics",
    "PagedKVCache",
    "PagedKVLayer",
)

DEFAULT_PAGE_TOKENS = 64
"""Positions per page: keys and values of 64 tokens of one layer."""

DEFAULT_GROW_TIMEOUT = 60.0
"""Seconds a worker thread waits for the event loop to grant a new page."""


class KVCacheNotPinnedError(RuntimeError):
    """The cache was used outside :meth:`PagedKVCache.run` and :meth:`PagedKVCache.pinned`.

    Outside them its pages are not pinned: the pager may move or free them at any time.
    """


class KVCachePagedOutError(KVCacheNotPinnedError):
    """The cache was used while some of its pages are paged out (or moving)."""


class KVCacheGrowthError(RuntimeError):
    """The cache needed another page and could not get one where it was used.

    On the event loop's thread no page can be awaited in the middle of a forward pass:
    reserve room first with :meth:`PagedKVCache.reserve`.
    """


@dataclass(frozen=True)
class KVCacheStatistics:
    """A snapshot of a paged KV cache: its length, pages and where they are."""

    name: str
    layers: int
    tokens: int
    capacity: int
    page_tokens: int
    pages: int
    device_pages: int
    host_pages: int
    file_pages: int
    nbytes: int
    pinned: bool


class PagedKVLayer:
    """One layer of a :class:`PagedKVCache`: its pages, its length, its current views.

    Instances are also transformers ``CacheLayerMixin`` objects (the cache makes them).
    ``keys`` and ``values`` are views into the pages, valid only while the cache is
    pinned; they are rebound every time it is pinned, since a page-in may have put the
    pages elsewhere.
    """

    is_compileable = False
    is_croppable = True
    is_sliding = False
    supports_early_init = False

    def __init__(self, cache: PagedKVCache, index: int) -> None:
        self.cache = cache
        self.index = index
        self.pages: list[Page] = []
        self.length = 0
        self.keys: Any = None
        self.values: Any = None
        self.is_initialized = False
        self.device: Any = None
        self._tensors: list[Any] = []  # the pages' tensors while pinned, else empty

    @property
    def batch_size(self) -> int:
        """Sequences per forward pass, as the cache's pages are shaped."""
        return self.cache.batch

    def __repr__(self) -> str:
        return f"<PagedKVLayer {self.index} tokens={self.length} pages={len(self.pages)}>"

    # -- the transformers layer API -------------------------------------------------

    def lazy_initialization(self, key_states: Any, value_states: Any) -> None:
        """Check the first keys and values against the cache's page shape."""
        cache = self.cache
        expected = (cache.batch, cache.heads, cache.head_dim)
        for what, states in (("keys", key_states), ("values", value_states)):
            got = (states.shape[0], states.shape[1], states.shape[-1])
            if states.dim() != 4 or got != expected:
                raise ValueError(
                    f"cache {cache.name!r} layer {self.index}: {what} of shape "
                    f"{tuple(states.shape)} do not fit pages of (batch, heads, head_dim) "
                    f"{expected}"
                )
            if str(states.dtype).removeprefix("torch.") != cache.dtype:
                raise ValueError(
                    f"cache {cache.name!r} layer {self.index}: {what} are {states.dtype}, "
                    f"its pages hold {cache.dtype}"
                )
        self.device = key_states.device
        self.is_initialized = True

    def update(
        self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any
    ) -> tuple[Any, Any]:
        """Write the new keys and values into the pages; return the layer's whole K and V."""
        cache = self.cache
        cache._check_usable(self)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        count = int(key_states.shape[-2])
        end = self.length + count
        if end > len(self.pages) * cache.page_tokens:
            cache._grow_from_use(end)
        written = 0
        while written < count:
            position = self.length + written
            page, offset = divmod(position, cache.page_tokens)
            chunk = min(count - written, cache.page_tokens - offset)
            tensor = self._tensors[page]
            tensor[0].narrow(2, offset, chunk).copy_(key_states.narrow(2, written, chunk))
            tensor[1].narrow(2, offset, chunk).copy_(value_states.narrow(2, written, chunk))
            written += chunk
        self.length = end
        self._bind_views()
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """The key length and offset the attention mask covers."""
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        """Positions cached so far."""
        return self.length

    def get_max_length(self) -> int:
        """No maximum: the layer takes more pages as it grows."""
        return -1

    def reset(self) -> None:
        """Forget the cached positions; the pages stay, to be overwritten."""
        self.length = 0
        self._bind_views()

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last ``-tokens_to_remove`` positions (transformers' convention)."""
        if tokens_to_remove > 0:
            raise ValueError(
                f"crop takes a negative count of tokens to remove, got {tokens_to_remove}"
            )
        self.length = max(0, self.length + tokens_to_remove)
        self._bind_views()

    def offload(self) -> None:
        """Refused: a paged cache moves through its pager (:meth:`PagedKVCache.page_out`)."""
        raise NotImplementedError("a paged KV cache pages out with PagedKVCache.page_out()")

    def prefetch(self) -> None:
        """Refused: a paged cache comes back through its pager (:meth:`PagedKVCache.page_in`)."""
        raise NotImplementedError("a paged KV cache pages in with PagedKVCache.page_in()")

    def reorder_cache(self, beam_idx: Any) -> None:
        """Refused: beam search would reorder pages across the batch, which is not supported."""
        raise NotImplementedError("a paged KV cache does not support beam search reordering")

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Refused: the batch size of the pages is fixed when the cache is made."""
        raise NotImplementedError("a paged KV cache has a fixed batch size")

    def batch_select_indices(self, indices: Any) -> None:
        """Refused: the batch size of the pages is fixed when the cache is made."""
        raise NotImplementedError("a paged KV cache has a fixed batch size")

    # -- views ------------------------------------------------------------------------

    def _bind_views(self) -> None:
        """Point ``keys``/``values`` at the first ``length`` positions of the pinned pages."""
        if not self._tensors or self.length == 0:
            self.keys = self.values = None
            if self._tensors and self.is_initialized:
                self.keys = self._tensors[0][0].narrow(2, 0, 0)
                self.values = self._tensors[0][1].narrow(2, 0, 0)
            return
        size = self.cache.page_tokens
        full, rest = divmod(self.length, size)
        parts = [(t, size) for t in self._tensors[:full]]
        if rest:
            parts.append((self._tensors[full], rest))
        if len(parts) == 1:
            tensor, n = parts[0]
            self.keys, self.values = tensor[0].narrow(2, 0, n), tensor[1].narrow(2, 0, n)
            return
        # Attention needs one tensor per K and V: gather across pages for this pass only.
        torch = import_torch()
        self.keys = torch.cat([t[0].narrow(2, 0, n) for t, n in parts], dim=2)
        self.values = torch.cat([t[1].narrow(2, 0, n) for t, n in parts], dim=2)


@dataclass
class _Pin:
    """The pinned state of a cache: the uses it holds and the pages taken while pinned."""

    stack: AsyncExitStack
    uses: dict[Page, PageUse]
    loop: asyncio.AbstractEventLoop
    thread: int
    added: list[PageUse]


class PagedKVCache:
    """A transformers ``Cache`` whose keys and values live in pages of a :class:`Pager`.

    Instances are transformers ``Cache`` objects (the class is combined with
    transformers' ``Cache`` when the first one is made), so they go wherever a cache
    does: ``model(ids, cache=cache)`` (``past_key_values=`` before transformers 5) and
    ``model.generate(..., cache=cache)``.

    Args:
        pager: the pager whose pages hold the keys and values.
        context: the context whose device budget holds the pages while resident.
        layers: attention layers (see :meth:`for_model` to read these from a config).
        heads: key/value heads per layer.
        head_dim: size of one head's keys and values.
        dtype: the keys' and values' dtype (a torch dtype or its name).
        batch_size: sequences per forward pass.
        page_tokens: positions per page.
        name: a label for pages, logs and errors.
        grow_timeout: seconds a worker thread waits for a new page before
            :class:`KVCacheGrowthError`.

    Raises:
        ValueError: a size below 1.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> PagedKVCache:
        combined = cls if _is_transformers_cache(cls) else _transformers_cache_class(cls)
        instance: PagedKVCache = object.__new__(combined)
        return instance

    def __init__(
        self,
        pager: Pager,
        context: ExecutionContext,
        *,
        layers: int,
        heads: int,
        head_dim: int,
        dtype: Any = "float32",
        batch_size: int = 1,
        page_tokens: int = DEFAULT_PAGE_TOKENS,
        name: str = "kv",
        grow_timeout: float = DEFAULT_GROW_TIMEOUT,
    ) -> None:
        sizes = {
            "layers": layers,
            "heads": heads,
            "head_dim": head_dim,
            "batch_size": batch_size,
            "page_tokens": page_tokens,
        }
        for what, value in sizes.items():
            if value < 1:
                raise ValueError(f"a paged KV cache needs {what} >= 1, got {value}")
        torch = import_torch()
        torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        if not isinstance(torch_dtype, torch.dtype):
            raise ValueError(f"dtype must be a torch dtype or its name, got {dtype!r}")
        self.pager = pager
        self.context = context
        self.heads = heads
        self.head_dim = head_dim
        self.batch = batch_size
        self.page_tokens = page_tokens
        self.dtype = str(torch_dtype).removeprefix("torch.")
        self.name = name
        self.grow_timeout = grow_timeout
        self._pin: _Pin | None = None
        self._closed = False
        layer_class = _transformers_layer_class()
        paged = [layer_class(self, i) for i in range(layers)]
        _cache_base().__init__(self, layers=paged)

    @classmethod
    def for_model(
        cls,
        model: Any,
        pager: Pager,
        context: ExecutionContext,
        *,
        batch_size: int = 1,
        page_tokens: int = DEFAULT_PAGE_TOKENS,
        dtype: Any = None,
        name: str = "kv",
    ) -> PagedKVCache:
        """A cache shaped for ``model`` (a transformers model or its config).

        Reads the decoder's layer count, key/value heads and head size from the config;
        the dtype is the model's unless given.

        Raises:
            ValueError: the config does not say its layers, heads or hidden size.
        """
        config = getattr(model, "config", model)
        text = (
            config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        )
        layers = getattr(text, "num_hidden_layers", None)
        heads = getattr(text, "num_attention_heads", None)
        hidden = getattr(text, "hidden_size", None)
        if layers is None or heads is None or hidden is None:
            raise ValueError(
                f"config {type(text).__name__} does not give num_hidden_layers, "
                "num_attention_heads and hidden_size"
            )
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        head_dim = getattr(text, "head_dim", None) or hidden // heads
        if dtype is None:
            dtype = getattr(model, "dtype", None) or getattr(text, "dtype", None) or "float32"
        return cls(
            pager,
            context,
            layers=int(layers),
            heads=int(kv_heads),
            head_dim=int(head_dim),
            dtype=dtype,
            batch_size=batch_size,
            page_tokens=page_tokens,
            name=name,
        )

    # -- shape and state ------------------------------------------------------------

    @property
    def paged_layers(self) -> tuple[PagedKVLayer, ...]:
        """The cache's layers."""
        layers: list[PagedKVLayer] = self.layers  # type: ignore[attr-defined]
        return tuple(layers)

    @property
    def batch_size(self) -> int:
        """Sequences per forward pass (fixed: the pages are shaped for it)."""
        return self.batch

    @property
    def page_shape(self) -> tuple[int, int, int, int, int]:
        """One page: (key/value, batch, heads, page_tokens, head_dim)."""
        return (2, self.batch, self.heads, self.page_tokens, self.head_dim)

    @property
    def tokens(self) -> int:
        """Positions cached (those of the first layer)."""
        layers = self.paged_layers
        return layers[0].length if layers else 0

    @property
    def capacity(self) -> int:
        """Positions the pages taken so far hold, per layer."""
        return min(len(layer.pages) for layer in self.paged_layers) * self.page_tokens

    def pages(self) -> tuple[Page, ...]:
        """Every page of the cache, layer by layer."""
        return tuple(page for layer in self.paged_layers for page in layer.pages)

    @property
    def tier(self) -> Tier | None:
        """Where the pages are when they all agree (None for a mix or no pages)."""
        tiers = {page.tier for page in self.pages()}
        return tiers.pop() if len(tiers) == 1 else None

    @property
    def is_pinned(self) -> bool:
        """Whether work is using the cache now (:meth:`run` or :meth:`pinned`)."""
        return self._pin is not None

    def statistics(self) -> KVCacheStatistics:
        """A frozen snapshot of the cache's length and pages."""
        pages = self.pages()
        tiers = [page.tier for page in pages]
        return KVCacheStatistics(
            name=self.name,
            layers=len(self.paged_layers),
            tokens=self.tokens,
            capacity=self.capacity,
            page_tokens=self.page_tokens,
            pages=len(pages),
            device_pages=tiers.count(Tier.DEVICE),
            host_pages=tiers.count(Tier.HOST),
            file_pages=tiers.count(Tier.FILE),
            nbytes=sum(page.nbytes for page in pages),
            pinned=self.is_pinned,
        )

    def __repr__(self) -> str:
        s = self.statistics()
        where = self.tier.value if self.tier is not None else "mixed" if s.pages else "empty"
        return (
            f"<PagedKVCache {self.name!r} {s.layers} layers tokens={s.tokens}/{s.capacity} "
            f"pages={s.pages} ({format_bytes(s.nbytes)}, {where})"
            f"{' pinned' if s.pinned else ''}>"
        )

    # -- using the cache ------------------------------------------------------------

    @asynccontextmanager
    async def pinned(self) -> AsyncIterator[PagedKVCache]:
        """Page the cache in if needed and pin it for work run inline in the block.

        For a forward pass called on the event loop's thread (a hand-written decode
        loop): ``async with cache.pinned(): model(ids, cache=cache)``. Pages taken
        inside the block (by :meth:`reserve`) are pinned too. Leaving the block
        signals each page's timeline (also when the block raises: inline work is over
        either way), so later page-outs follow the work.

        Raises:
            RuntimeError: the cache is already pinned, or closed.
            StorageError: a page-in failed; the pages stay where they were.
        """
        async with self._pinning() as pin:
            try:
                yield self
            finally:
                # The work ran inline and is over, whether it returned or raised: nothing
                # still writes the pages, so their timelines move on either way.
                for use in pin.uses.values():
                    sem, value = use.signal
                    sem.signal(value, use.page.frontier)

    async def run(
        self,
        queue: DeviceQueue,
        fn: Callable[..., Any],
        *args: Any,
        waits: Iterable[SemaphoreValue] = (),
        signals: Iterable[SemaphoreValue] = (),
        name: str | None = None,
        **kwargs: Any,
    ) -> Any:
        """Run ``fn(*args, **kwargs)`` on ``queue`` with the cache paged in and pinned.

        The submission waits for the pages' previous uses and moves and signals their
        timelines, so it is ordered with page-outs and its frontier carries the storage
        axis after a page-in. ``fn`` may be ``model.generate``: when a page fills while
        it runs on a worker thread, the cache takes another through the budget on the
        event loop and goes on.

        Returns:
            What ``fn`` returned.

        Raises:
            RuntimeError: the cache is already pinned, or closed.
            StorageError: a page-in failed; the pages stay where they were.
            Exception: whatever ``fn`` raised (the pages' timelines fail with it).
        """
        async with self._pinning() as pin:
            uses = list(pin.uses.values())
            sub = queue.submit(
                fn,
                *args,
                waits=[*(u.wait for u in uses), *waits],
                signals=[*(u.signal for u in uses), *signals],
                name=name if name is not None else f"{self.name} use",
                **kwargs,
            )
            try:
                result = await sub
            except BaseException as exc:
                _fail(pin.added, exc)
                raise
            for use in pin.added:  # pages taken while it ran: not in its signals
                sem, value = use.signal
                sem.signal(value, sub.frontier)
            return result

    async def reserve(self, tokens: int) -> None:
        """Take pages through the budget so every layer has room for ``tokens`` more.

        Raises:
            ValueError: ``tokens`` is negative.
            MemoryBudgetError: the context's budget cannot hold another page (at once
                when the cache is pinned and its own pages fill the budget).
        """
        if tokens < 0:
            raise ValueError(f"reserve takes a count of tokens >= 0, got {tokens}")
        self._check_open()
        await self._extend(self.tokens + tokens)

    async def page_out(self, tier: Tier = Tier.FILE) -> None:
        """Move every page out of device memory to ``tier`` (the host or the file).

        Raises:
            RuntimeError: the cache is pinned by work using it.
            StorageError: a page's move failed; that page stays where it was, usable.
        """
        self._check_open()
        if self._pin is not None:
            raise RuntimeError(f"{self!r} is in use; cannot page it out")
        results = await asyncio.gather(
            *(self.pager.page_out(page, tier) for page in self.pages()), return_exceptions=True
        )
        _raise_first(results)

    async def page_in(self) -> None:
        """Bring every page back to device memory (:meth:`run` and :meth:`pinned` do it too).

        Raises:
            StorageError: a page-in failed; that page stays in its tier, intact.
        """
        self._check_open()
        results = await asyncio.gather(
            *(self.pager.page_in(page) for page in self.pages() if page.tier is not Tier.DEVICE),
            return_exceptions=True,
        )
        _raise_first(results)

    async def aclose(self) -> None:
        """Release every page once its uses are done; the cache is empty and closed."""
        if self._closed:
            return
        if self._pin is not None:
            raise RuntimeError(f"{self!r} is in use; cannot close it")
        self._closed = True
        for layer in self.paged_layers:
            pages, layer.pages = layer.pages, []
            layer.length = 0
            layer.keys = layer.values = None
            for page in pages:
                await self.pager.release(page)

    async def __aenter__(self) -> PagedKVCache:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # -- internals ----------------------------------------------------------------

    @asynccontextmanager
    async def _pinning(self) -> AsyncIterator[_Pin]:
        self._check_open()
        if self._pin is not None:
            raise RuntimeError(f"{self!r} is already in use by other work")
        async with AsyncExitStack() as stack:
            pin = _Pin(stack, {}, asyncio.get_running_loop(), threading.get_ident(), [])
            self._pin = pin
            try:
                for page in self.pages():
                    pin.uses[page] = await stack.enter_async_context(self.pager.use(page))
                self._bind()
                yield pin
            finally:
                self._pin = None
                for layer in self.paged_layers:
                    layer._tensors = []
                    layer.keys = layer.values = None

    def _bind(self) -> None:
        """Rebind every layer's page tensors and views to the pinned uses."""
        pin = self._pin
        assert pin is not None
        for layer in self.paged_layers:
            layer._tensors = [pin.uses[page].tensor for page in layer.pages]
            layer._bind_views()

    async def _extend(self, tokens: int) -> None:
        """Take pages until every layer holds ``tokens`` positions (pinned if pinned)."""
        needed = -(-tokens // self.page_tokens)
        for layer in self.paged_layers:
            while len(layer.pages) < needed:
                self._check_can_grow()
                page = await self.pager.allocate(
                    self.context,
                    self.page_shape,
                    self.dtype,
                    owner=self.name,
                    name=f"{self.name}/L{layer.index}/p{len(layer.pages)}",
                )
                layer.pages.append(page)
                pin = self._pin
                if pin is not None:
                    use = await pin.stack.enter_async_context(self.pager.use(page))
                    pin.uses[page] = use
                    pin.added.append(use)
                    layer._tensors.append(use.tensor)

    def _check_can_grow(self) -> None:
        """Refuse a page that cannot fit beside the cache's own pinned pages, ever.

        While pinned, the cache's pages cannot be paged out to make room, and the budget
        would wait for memory only they hold: say so now instead.
        """
        pin = self._pin
        if pin is None:
            return
        pinned = sum(page.nbytes for page in pin.uses)
        used, _, limit = self.context.usage()
        nbytes = self._page_bytes()
        if pinned + nbytes > limit:
            available = self.context.runtime.available_memory(self.context.device)
            raise MemoryBudgetError(
                self.context.name,
                nbytes,
                limit,
                used,
                available,
                f"cache {self.name!r} is in use with {format_bytes(pinned)} in "
                f"{len(pin.uses)} pinned pages and cannot grow past the budget",
            )

    def _grow_from_use(self, tokens: int) -> None:
        """Called by a layer's update that needs room for ``tokens`` positions."""
        pin = self._pin
        assert pin is not None
        if threading.get_ident() == pin.thread:
            raise KVCacheGrowthError(
                f"cache {self.name!r} needs room for {tokens} positions and holds "
                f"{self.capacity}; on the event loop's thread no page can be awaited in a "
                f"forward pass: await cache.reserve({tokens - self.tokens}) first, or run "
                "the work on a queue with cache.run()"
            )
        future = asyncio.run_coroutine_threadsafe(self._extend(tokens), pin.loop)
        try:
            future.result(self.grow_timeout)
        except TimeoutError:
            future.cancel()
            raise KVCacheGrowthError(
                f"cache {self.name!r} waited {self.grow_timeout} s for a page of "
                f"{format_bytes(self._page_bytes())} in context {self.context.name!r}"
            ) from None

    def _page_bytes(self) -> int:
        torch = import_torch()
        size: int = torch.empty((), dtype=getattr(torch, self.dtype)).element_size()
        n = 1
        for d in self.page_shape:
            n *= d
        return n * size

    def _check_usable(self, layer: PagedKVLayer) -> None:
        if self._closed:
            raise RuntimeError(f"cache {self.name!r} is closed")
        if self._pin is None:
            away = [p for p in layer.pages if p.tier is not Tier.DEVICE or p.in_transit]
            if away:
                page = away[0]
                raise KVCachePagedOutError(
                    f"cache {self.name!r} layer {layer.index} is paged out ({page.name!r} is "
                    f"in the {page.tier.value} tier{', moving' if page.in_transit else ''}); "
                    "use it through cache.run() or cache.pinned(), which page it in"
                )
            raise KVCacheNotPinnedError(
                f"cache {self.name!r} layer {layer.index} used outside cache.run() and "
                "cache.pinned(): its pages are not pinned and may move"
            )

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"cache {self.name!r} is closed")


def _fail(uses: Iterable[PageUse], exc: BaseException) -> None:
    """Fail the timelines the work would have signalled: it did not finish."""
    error = exc if isinstance(exc, Exception) else RuntimeError(f"cancelled: {exc!r}")
    for use in uses:
        sem: TimelineSemaphore = use.signal[0]
        if sem.failure is None and sem.value < use.signal[1]:
            sem.fail(error)


def _raise_first(results: Sequence[object]) -> None:
    for result in results:
        if isinstance(result, BaseException):
            raise result


# -- the transformers classes, made on first use --------------------------------------


def _cache_base() -> Any:
    from transformers.cache_utils import Cache

    return Cache


def _is_transformers_cache(cls: type) -> bool:
    return bool(getattr(cls, "_transformers_combined", False))


_COMBINED: dict[type[PagedKVCache], type[PagedKVCache]] = {}


def _transformers_cache_class(cls: type[PagedKVCache]) -> type[PagedKVCache]:
    """``cls`` combined with transformers' ``Cache``, so instances pass its isinstance checks."""
    known = _COMBINED.get(cls)
    if known is not None:
        return known
    base = _cache_base()

    def namespace(ns: dict[str, Any]) -> None:
        ns.update({"__module__": cls.__module__, "__doc__": cls.__doc__})
        ns["_transformers_combined"] = True

    combined: type[PagedKVCache] = types.new_class(cls.__name__, (cls, base), exec_body=namespace)
    combined.__qualname__ = cls.__qualname__
    _COMBINED[cls] = combined
    return combined


@functools.cache
def _transformers_layer_class() -> type[PagedKVLayer]:
    """:class:`PagedKVLayer` combined with transformers' ``CacheLayerMixin``."""
    from transformers.cache_utils import CacheLayerMixin

    def namespace(ns: dict[str, Any]) -> None:
        ns.update({"__module__": PagedKVLayer.__module__, "__doc__": PagedKVLayer.__doc__})

    combined: type[PagedKVLayer] = types.new_class(
        "PagedKVLayer", (PagedKVLayer, CacheLayerMixin), exec_body=namespace
    )
    return combined
