"""Memory shared across models: death-frontier buffer pools, weight residency and paging."""

from ._pager import ArrivalModel as ArrivalModel
from ._pager import Page as Page
from ._pager import PageCorruptedError as PageCorruptedError
from ._pager import Pager as Pager
from ._pager import PageReleasedError as PageReleasedError
from ._pager import PagerStallError as PagerStallError
from ._pager import PagerStatistics as PagerStatistics
from ._pager import PagerWait as PagerWait
from ._pager import PageUse as PageUse
from ._pager import ReuseIntervals as ReuseIntervals
from ._pager import Tier as Tier
from ._pager import UnknownPageError as UnknownPageError
from ._pager import choose_page_outs as choose_page_outs
from ._pool import DEFAULT_ALIGNMENT as DEFAULT_ALIGNMENT
from ._pool import Block as Block
from ._pool import BufferPool as BufferPool
from ._pool import CompletedSource as CompletedSource
from ._pool import DoubleFreeError as DoubleFreeError
from ._pool import ForeignBlockError as ForeignBlockError
from ._pool import FreeBlock as FreeBlock
from ._pool import InvalidFreeError as InvalidFreeError
from ._pool import InvalidSizeError as InvalidSizeError
from ._pool import PoolError as PoolError
from ._pool import PoolExhaustedError as PoolExhaustedError
from ._pool import PoolStatistics as PoolStatistics
from ._pool import Reuse as Reuse
from ._pool import SupportsCompleted as SupportsCompleted
from ._pool import Wait as Wait
from ._pool import WaitCompleted as WaitCompleted
from ._pool import WaitForFree as WaitForFree
from ._pool import WouldWaitError as WouldWaitError
from ._reclaim import Reclaim as Reclaim
from ._reclaim import ReclaimPlan as ReclaimPlan
from ._reclaim import RequestRate as RequestRate
from ._reclaim import plan_reclaim as plan_reclaim
from ._residency import EvictionCandidate as EvictionCandidate
from ._residency import Residency as Residency
from ._residency import ResidencyChange as ResidencyChange
from ._residency import ResidencyStatistics as ResidencyStatistics
from ._residency import ResidentWeights as ResidentWeights
from ._residency import Weights as Weights
from ._residency import WeightsFile as WeightsFile
from ._residency import choose_evictions as choose_evictions
from ._safetensors import TensorLayout as TensorLayout
from ._safetensors import WeightsFormatError as WeightsFormatError
from ._safetensors import parse_safetensors_header as parse_safetensors_header
from ._safetensors import read_safetensors_layout as read_safetensors_layout

__all__ = (
    "DEFAULT_ALIGNMENT",
    "ArrivalModel",
    "Block",
    "BufferPool",
    "CompletedSource",
    "DoubleFreeError",
    "EvictionCandidate",
    "ForeignBlockError",
    "FreeBlock",
    "InvalidFreeError",
    "InvalidSizeError",
    "Page",
    "PageCorruptedError",
    "PageReleasedError",
    "PageUse",
    "Pager",
    "PagerStallError",
    "PagerStatistics",
    "PagerWait",
    "PoolError",
    "PoolExhaustedError",
    "PoolStatistics",
    "Reclaim",
    "ReclaimPlan",
    "RequestRate",
    "Residency",
    "ResidencyChange",
    "ResidencyStatistics",
    "ResidentWeights",
    "ReuseIntervals",
    "Reuse",
    "SupportsCompleted",
    "TensorLayout",
    "Tier",
    "UnknownPageError",
    "Wait",
    "WaitCompleted",
    "WaitForFree",
    "Weights",
    "WeightsFormatError",
    "WeightsFile",
    "WouldWaitError",
    "choose_evictions",
    "choose_page_outs",
    "parse_safetensors_header",
    "plan_reclaim",
    "read_safetensors_layout",
)
