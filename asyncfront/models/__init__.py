"""Real PyTorch models on asyncfront's memory.

Weights as resident blocks (``rt.model``, :func:`from_transformers`), working-memory
peaks, and pager-backed KV caches and optimizer state.
"""

from ._build import BUILD_LOCK as BUILD_LOCK
from ._build import BuiltModule as BuiltModule
from ._build import build_on_meta as build_on_meta
from ._kv_cache import DEFAULT_PAGE_TOKENS as DEFAULT_PAGE_TOKENS
from ._kv_cache import KVCacheGrowthError as KVCacheGrowthError
from ._kv_cache import KVCacheNotPinnedError as KVCacheNotPinnedError
from ._kv_cache import KVCachePagedOutError as KVCachePagedOutError
from ._kv_cache import KVCacheStatistics as KVCacheStatistics
from ._kv_cache import PagedKVCache as PagedKVCache
from ._kv_cache import PagedKVLayer as PagedKVLayer
from ._model import CheckpointMismatchError as CheckpointMismatchError
from ._model import Model as Model
from ._model import ModelNotResidentError as ModelNotResidentError
from ._model import ResidentModel as ResidentModel
from ._model import bind_checkpoint as bind_checkpoint
from ._optimizer import OptimizerStateNotPinnedError as OptimizerStateNotPinnedError
from ._optimizer import OptimizerStatePagedOutError as OptimizerStatePagedOutError
from ._optimizer import OptimizerStateStatistics as OptimizerStateStatistics
from ._optimizer import PagedOptimizerState as PagedOptimizerState
from ._peak import measure_peak as measure_peak
from ._transformers import from_transformers as from_transformers

__all__ = (
    "BUILD_LOCK",
    "DEFAULT_PAGE_TOKENS",
    "BuiltModule",
    "CheckpointMismatchError",
    "KVCacheGrowthError",
    "KVCacheNotPinnedError",
    "KVCachePagedOutError",
    "KVCacheStatistics",
    "Model",
    "ModelNotResidentError",
    "OptimizerStateNotPinnedError",
    "OptimizerStatePagedOutError",
    "OptimizerStateStatistics",
    "PagedKVCache",
    "PagedKVLayer",
    "PagedOptimizerState",
    "ResidentModel",
    "bind_checkpoint",
    "build_on_meta",
    "from_transformers",
    "measure_peak",
)
