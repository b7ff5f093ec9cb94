"""asyncfront: an asyncio-native scheduler for many AI models on shared hardware.

Timeline semaphores carry frontiers (vector clocks of device-queue axes), device
queues are async tasks consuming FIFOs of submissions, and fake devices run it all in
virtual time.
"""

from typing import TYPE_CHECKING, Any

from . import _native as _native  # first: chooses the core's build before it is imported
from . import cluster as cluster
from . import devices as devices
from . import memory as memory
from . import models as models
from ._blocking import RuntimeCrashedError as RuntimeCrashedError
from ._budget import AdmissionError as AdmissionError
from ._budget import ContextUsage as ContextUsage
from ._budget import GiB as GiB
from ._budget import KiB as KiB
from ._budget import MemoryBudgetError as MemoryBudgetError
from ._budget import MemoryLedger as MemoryLedger
from ._budget import MiB as MiB
from ._budget import QoS as QoS
from ._budget import format_bytes as format_bytes
from ._collective import CollectiveChannel as CollectiveChannel
from ._collective import CollectiveStatistics as CollectiveStatistics
from ._collective import CollectiveStep as CollectiveStep
from ._context import Buffer as Buffer
from ._context import ContextStatistics as ContextStatistics
from ._context import ExecutionContext as ExecutionContext
from ._context import ForeignBufferError as ForeignBufferError
from ._context import Session as Session
from ._context import SyncSession as SyncSession
from ._context import WorkingMemory as WorkingMemory
from ._frontier import DEFAULT_FRONTIER_CAPACITY as DEFAULT_FRONTIER_CAPACITY
from ._frontier import AxisFields as AxisFields
from ._frontier import Domain as Domain
from ._frontier import Frontier as Frontier
from ._frontier import Order as Order
from ._frontier import axis as axis
from ._frontier import axis_fields as axis_fields
from ._frontier import axis_name as axis_name
from ._frontier import set_axis_name as set_axis_name
from ._graph import ITERATION as ITERATION
from ._graph import Graph as Graph
from ._graph import GraphDefinitionError as GraphDefinitionError
from ._graph import GraphError as GraphError
from ._graph import GraphRun as GraphRun
from ._graph import GraphRunStatistics as GraphRunStatistics
from ._graph import Stage as Stage
from ._graph import StageChain as StageChain
from ._native import core_build as core_build
from ._placement import ModelInfo as ModelInfo
from ._placement import ModelRegistry as ModelRegistry
from ._placement import PlacementCandidate as PlacementCandidate
from ._placement import PlacementDecision as PlacementDecision
from ._placement import PlacementError as PlacementError
from ._placement import PlacementReason as PlacementReason
from ._placement import PlacementResidency as PlacementResidency
from ._placement import RuntimeResidency as RuntimeResidency
from ._placement import StageNeeds as StageNeeds
from ._placement import place as place
from ._policy import DEFAULT_MAX_WAIT as DEFAULT_MAX_WAIT
from ._policy import EDFPolicy as EDFPolicy
from ._policy import KeyedPolicy as KeyedPolicy
from ._policy import Policy as Policy
from ._policy import PriorityPolicy as PriorityPolicy
from ._policy import ReadyWork as ReadyWork
from ._policy import SLOPolicy as SLOPolicy
from ._policy import SLOStatistics as SLOStatistics
from ._policy import StagePredictor as StagePredictor
from ._queue import CancelledWorkError as CancelledWorkError
from ._queue import DeviceQueue as DeviceQueue
from ._queue import QueueStatistics as QueueStatistics
from ._queue import StalledError as StalledError
from ._queue import Submission as Submission
from ._queue import SubmissionState as SubmissionState
from ._runtime import Runtime as Runtime
from ._runtime import RuntimeStatistics as RuntimeStatistics
from ._runtime import RuntimeThread as RuntimeThread
from ._runtime import open_runtime as open_runtime
from ._runtime import start_runtime_thread as start_runtime_thread
from ._semaphore import SemaphoreFailedError as SemaphoreFailedError
from ._semaphore import SemaphoreStatistics as SemaphoreStatistics
from ._semaphore import TimelineSemaphore as TimelineSemaphore
from ._semaphore import wait_all as wait_all
from ._semaphore import wait_any as wait_any
from ._stealing import BinderStatistics as BinderStatistics
from ._stealing import BindingError as BindingError
from ._stealing import StageBinder as StageBinder
from ._stealing import StageBinding as StageBinding
from ._stealing import Stealing as Stealing
from ._stealing import StealOffer as StealOffer
from ._stealing import Topology as Topology
from ._stealing import choose_victim as choose_victim
from ._trace import DEFAULT_TRACE_CAPACITY as DEFAULT_TRACE_CAPACITY
from ._trace import TraceRecord as TraceRecord
from ._trace import TraceRecorder as TraceRecorder
from ._version import __version__ as __version__
from .cluster import NodeLostError as NodeLostError
from .cluster import open_cluster as open_cluster
from .memory._pager import PageCorruptedError as PageCorruptedError
from .memory._pager import PagerStallError as PagerStallError
from .memory._safetensors import WeightsFormatError as WeightsFormatError

_native.restore_class_docs()  # the compiled core's classes keep their docstrings

__all__ = (
    "AdmissionError",
    "AxisFields",
    "Buffer",
    "CancelledWorkError",
    "CollectiveChannel",
    "CollectiveStatistics",
    "CollectiveStep",
    "ContextStatistics",
    "ContextUsage",
    "DEFAULT_FRONTIER_CAPACITY",
    "DEFAULT_MAX_WAIT",
    "DEFAULT_TRACE_CAPACITY",
    "DeviceQueue",
    "Domain",
    "EDFPolicy",
    "ExecutionContext",
    "ForeignBufferError",
    "Frontier",
    "GiB",
    "Graph",
    "GraphDefinitionError",
    "GraphError",
    "GraphRun",
    "GraphRunStatistics",
    "ITERATION",
    "KeyedPolicy",
    "KiB",
    "MemoryBudgetError",
    "MemoryLedger",
    "MiB",
    "ModelInfo",
    "NodeLostError",
    "ModelRegistry",
    "Order",
    "PageCorruptedError",
    "PagerStallError",
    "PlacementCandidate",
    "PlacementDecision",
    "PlacementError",
    "PlacementReason",
    "PlacementResidency",
    "Policy",
    "PriorityPolicy",
    "ReadyWork",
    "RuntimeResidency",
    "QoS",
    "QueueStatistics",
    "Runtime",
    "RuntimeStatistics",
    "RuntimeCrashedError",
    "RuntimeThread",
    "SLOPolicy",
    "SLOStatistics",
    "SemaphoreFailedError",
    "SemaphoreStatistics",
    "Session",
    "Stage",
    "StageChain",
    "StageNeeds",
    "StagePredictor",
    "StalledError",
    "Submission",
    "SubmissionState",
    "SyncSession",
    "TimelineSemaphore",
    "TraceRecord",
    "TraceRecorder",
    "WeightsFormatError",
    "WorkingMemory",
    "__version__",
    "axis",
    "axis_fields",
    "axis_name",
    "cluster",
    "core_build",
    "devices",
    "format_bytes",
    "memory",
    "models",
    "open_cluster",
    "open_runtime",
    "place",
    "set_axis_name",
    "start_runtime_thread",
    "testing",
    "wait_all",
    "wait_any",
    "BinderStatistics",
    "BindingError",
    "StageBinder",
    "StageBinding",
    "StealOffer",
    "Stealing",
    "Topology",
    "choose_victim",
)

if TYPE_CHECKING:
    from . import testing as testing


def __getattr__(name: str) -> Any:
    """``asyncfront.testing`` is imported on first use: it brings pytest and looptime,
    which an application that never runs virtual time should not load (nor have every
    full garbage collection walk)."""
    if name == "testing":
        import importlib

        return importlib.import_module(".testing", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
