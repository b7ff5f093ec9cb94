"""Memory shared across models: death-frontier buffer pools, residency and paging."""

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

__all__ = (
    "DEFAULT_ALIGNMENT",
    "Block",
    "BufferPool",
    "CompletedSource",
    "DoubleFreeError",
    "ForeignBlockError",
    "FreeBlock",
    "InvalidFreeError",
    "InvalidSizeError",
    "PoolError",
    "PoolExhaustedError",
    "PoolStatistics",
    "Reuse",
    "SupportsCompleted",
    "Wait",
    "WaitCompleted",
    "WaitForFree",
    "WouldWaitError",
)
