"""Links: the NIC axis between two nodes, tensors over a torch.distributed gloo group."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ._errors import NodeLostError
from ._protocol import dumps

if TYPE_CHECKING:
    from ._cluster import Cluster, ClusterNode, ClusterSemaphore, RemoteSubmission

__all__ = ("Link", "Transfer")

_link_ids = itertools.count(1)


@dataclass(frozen=True)
class Transfer:
    """One message over a link: the send on the sender's NIC queue and the matching receive.

    ``received`` finishes on the receiving node with the tensor kept there: pass it as an
    argument to work on that node (awaiting it here gives None; the tensor stays put).
    """

    message: int
    sent: RemoteSubmission
    received: RemoteSubmission


class Link:
    """A link from node ``a`` to node ``b``: a send queue on a's NIC, a receive queue on b's.

    The sender's ``sent`` semaphore (owned by ``a``) and the receiver's ``received``
    semaphore (owned by ``b``) count messages. Shape and dtype travel with the Ray call
    that announces a message, the data over a ``torch.distributed`` gloo group of every
    node runtime (NCCL where GPUs are is the same protocol; not exercised here); the
    receive signals with the sender's frontier merged with its own NIC axis. Groups
    carry a timeout, so a receive whose peer is gone fails instead of hanging.
    """

    def __init__(self, cluster: Cluster, a: ClusterNode, b: ClusterNode, name: str) -> None:
        if a is b:
            raise ValueError(f"a link joins two different nodes, got node {a.index} twice")
        self.cluster = cluster
        self.a = a
        self.b = b
        self.name = name
        self.id = next(_link_ids)
        self.send_queue = a.queue("nic", name=f"{name}.send")
        self.recv_queue = b.queue("nic", name=f"{name}.recv")
        self.sent = cluster.semaphore(f"{name}.sent", owner=a)
        self.received = cluster.semaphore(f"{name}.received", owner=b)
        self._messages = 0
        cluster._ensure_links()

    def send(
        self,
        value: Any,
        *,
        waits: Iterable[tuple[ClusterSemaphore, int]] = (),
        signals: Iterable[tuple[ClusterSemaphore, int]] = (),
        receiver_waits: Iterable[tuple[ClusterSemaphore, int]] = (),
        receiver_signals: Iterable[tuple[ClusterSemaphore, int]] = (),
        name: str | None = None,
    ) -> Transfer:
        """Send a tensor from ``a`` to ``b`` once ``waits`` are met; returns the :class:`Transfer`.

        ``value`` is a tensor or the :class:`RemoteSubmission` of work on ``a`` whose
        result is the tensor (it stays on ``a`` until sent). The send signals
        ``(sent, n)`` and ``signals`` (semaphores of ``a``); the receive signals
        ``(received, n)`` and ``receiver_signals`` (semaphores of ``b``), n counting
        this link's messages from 1.

        Raises:
            NodeLostError: an end of the link was lost.
            TypeError / ValueError: as for ``RemoteQueue.submit``.
        """
        from ._cluster import RemoteSubmission

        cluster = self.cluster
        cluster._check_open()
        for node in (self.a, self.b):
            if node.lost is not None:
                raise NodeLostError(node.lost.node, node.lost.reason)
        message = self._messages + 1
        label = name or f"{self.name}[{message}]"
        send_waits = cluster._wire_pairs("waits", waits, None)
        send_signals = cluster._wire_pairs("signals", [*signals, (self.sent, message)], self.a)
        recv_waits = cluster._wire_pairs("receiver_waits", receiver_waits, None)
        recv_signals = cluster._wire_pairs(
            "receiver_signals", [*receiver_signals, (self.received, message)], self.b
        )
        if isinstance(value, RemoteSubmission) and value.queue.node is not self.a:
            raise ValueError(
                f"link {self.name!r} sends from node {self.a.index}; the value is the "
                f"result of work on node {value.queue.node.index}"
            )
        payload = dumps(cluster._argument(value, self.a))
        self._messages = message
        sent = cluster._submit_item(
            self.send_queue,
            label + ".send",
            send_signals,
            lambda sub_id: (
                "link_send",
                sub_id,
                self.send_queue.qid,
                self.id,
                message,
                self.b.index,
                payload,
                send_waits,
                send_signals,
                label + ".send",
            ),
        )
        received = cluster._submit_item(
            self.recv_queue,
            label + ".recv",
            recv_signals,
            lambda sub_id: (
                "link_recv",
                sub_id,
                self.recv_queue.qid,
                self.id,
                message,
                self.a.index,
                None,
                recv_waits,
                recv_signals,
                label + ".recv",
            ),
        )
        if isinstance(value, RemoteSubmission):
            sent._holds = (value,)
        return Transfer(message, sent, received)

    async def wait_ready(self) -> None:
        """Wait until every node joined the process group the links use."""
        await asyncio.shield(self.cluster._links_ready())

    def __repr__(self) -> str:
        return (
            f"<Link {self.name!r} node {self.a.index} -> node {self.b.index} "
            f"messages={self._messages}>"
        )
