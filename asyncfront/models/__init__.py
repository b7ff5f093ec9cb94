"""Real PyTorch models on asyncfront's memory: pager-backed KV caches and optimizer state."""

from ._kv_cache import DEFAULT_PAGE_TOKENS as DEFAULT_PAGE_TOKENS
from ._kv_cache import KVCacheGrowthError as KVCacheGrowthError
from ._kv_cache import KVCacheNotPinnedError as KVCacheNotPinnedError
from ._kv_cache import KVCachePagedOutError as KVCachePagedOutError
from ._kv_cache import KVCacheStatistics as KVCacheStatistics
from ._kv_cache import PagedKVCache as PagedKVCache
from ._kv_cache import PagedKVLayer as PagedKVLayer
from ._optimizer import OptimizerStateNotPinnedError as OptimizerStateNotPinnedError
from ._optimizer import OptimizerStatePagedOutError as OptimizerStatePagedOutError
from ._optimizer import OptimizerStateStatistics as OptimizerStateStatistics
from ._optimizer import PagedOptimizerState as PagedOptimizerState

__all__ = (
    "DEFAULT_PAGE_TOKENS",
    "KVCacheGrowthError",
    "KVCacheNotPinnedError",
    "KVCachePagedOutError",
    "KVCacheStatistics",
    "OptimizerStateNotPinnedError",
    "OptimizerStatePagedOutError",
    "OptimizerStateStatistics",
    "PagedKVCache",
    "PagedKVLayer",
    "PagedOptimizerState",
)
