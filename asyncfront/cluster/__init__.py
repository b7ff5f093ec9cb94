"""asyncfront beyond one machine: node runtimes on Ray, remote queues, cross-node semaphores.

Importing this package imports no Ray; :func:`open_cluster` does, when it is called.
"""

from ._cluster import Cluster as Cluster
from ._cluster import ClusterNode as ClusterNode
from ._cluster import ClusterSemaphore as ClusterSemaphore
from ._cluster import ClusterStatistics as ClusterStatistics
from ._cluster import LocalRayCluster as LocalRayCluster
from ._cluster import NodeDevice as NodeDevice
from ._cluster import RemoteQueue as RemoteQueue
from ._cluster import RemoteSubmission as RemoteSubmission
from ._cluster import local_node_args as local_node_args
from ._cluster import open_cluster as open_cluster
from ._errors import ClusterError as ClusterError
from ._errors import NodeLostError as NodeLostError
from ._errors import RemoteWorkError as RemoteWorkError
from ._graph import ClusterGraph as ClusterGraph
from ._graph import ClusterGraphRun as ClusterGraphRun
from ._graph import ClusterPlacement as ClusterPlacement
from ._graph import ClusterStage as ClusterStage
from ._node import NodeRuntime as NodeRuntime
from ._node import NodeStatistics as NodeStatistics
from ._protocol import DeliveryFaults as DeliveryFaults
from ._protocol import SemaphoreRef as SemaphoreRef
from ._protocol import SemaphoreUpdate as SemaphoreUpdate
from ._protocol import Sequencer as Sequencer
from ._protocol import apply_update as apply_update
from ._trace import ClusterTrace as ClusterTrace

__all__ = (
    "Cluster",
    "ClusterError",
    "ClusterGraph",
    "ClusterGraphRun",
    "ClusterPlacement",
    "ClusterNode",
    "ClusterSemaphore",
    "ClusterStage",
    "ClusterStatistics",
    "ClusterTrace",
    "DeliveryFaults",
    "LocalRayCluster",
    "NodeDevice",
    "NodeLostError",
    "NodeRuntime",
    "NodeStatistics",
    "RemoteQueue",
    "RemoteSubmission",
    "RemoteWorkError",
    "SemaphoreRef",
    "SemaphoreUpdate",
    "Sequencer",
    "apply_update",
    "local_node_args",
    "open_cluster",
)
