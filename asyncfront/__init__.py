"""asyncfront: an asyncio-native scheduler for many AI models on shared hardware.

Timeline semaphores carry frontiers (vector clocks of device-queue axes), device
queues are async tasks consuming FIFOs of submissions, and fake devices run it all in
virtual time.
"""

from . import devices as devices
from . import testing as testing
from ._frontier import DEFAULT_FRONTIER_CAPACITY as DEFAULT_FRONTIER_CAPACITY
from ._frontier import AxisFields as AxisFields
from ._frontier import Domain as Domain
from ._frontier import Frontier as Frontier
from ._frontier import Order as Order
from ._frontier import axis as axis
from ._frontier import axis_fields as axis_fields
from ._frontier import axis_name as axis_name
from ._frontier import set_axis_name as set_axis_name
from ._queue import DeviceQueue as DeviceQueue
from ._queue import QueueStatistics as QueueStatistics
from ._queue import StalledError as StalledError
from ._queue import Submission as Submission
from ._queue import SubmissionState as SubmissionState
from ._runtime import Runtime as Runtime
from ._runtime import RuntimeStatistics as RuntimeStatistics
from ._runtime import open_runtime as open_runtime
from ._semaphore import SemaphoreFailedError as SemaphoreFailedError
from ._semaphore import SemaphoreStatistics as SemaphoreStatistics
from ._semaphore import TimelineSemaphore as TimelineSemaphore
from ._semaphore import wait_all as wait_all
from ._semaphore import wait_any as wait_any
from ._trace import TraceRecord as TraceRecord
from ._trace import TraceRecorder as TraceRecorder
from ._version import __version__ as __version__

__all__ = (
    "DEFAULT_FRONTIER_CAPACITY",
    "AxisFields",
    "DeviceQueue",
    "Domain",
    "Frontier",
    "Order",
    "QueueStatistics",
    "Runtime",
    "RuntimeStatistics",
    "SemaphoreFailedError",
    "SemaphoreStatistics",
    "StalledError",
    "Submission",
    "SubmissionState",
    "TimelineSemaphore",
    "TraceRecord",
    "TraceRecorder",
    "__version__",
    "axis",
    "axis_fields",
    "axis_name",
    "devices",
    "open_runtime",
    "set_axis_name",
    "testing",
    "wait_all",
    "wait_any",
)
