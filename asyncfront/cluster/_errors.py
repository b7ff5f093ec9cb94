"""Errors of the cluster layer."""

from __future__ import annotations

__all__ = ("ClusterError", "NodeLostError", "RemoteWorkError")


class ClusterError(RuntimeError):
    """The cluster could not be started, joined or used as asked."""


class NodeLostError(ClusterError):
    """A node runtime died or stopped answering; everything it owned fails with this.

    Attributes:
        node: the index of the lost node.
        reason: what showed the loss (actor death, missed heartbeat).
    """

    def __init__(self, node: int, reason: str) -> None:
        super().__init__(f"node {node} was lost: {reason}")
        self.node = node
        self.reason = reason

    def __reduce__(self) -> tuple[type[NodeLostError], tuple[int, str]]:
        return (type(self), (self.node, self.reason))


class RemoteWorkError(ClusterError):
    """A remote work's error whose own type could not travel (it does not pickle).

    Attributes:
        type_name: the qualified name of the original exception's type.
        message: ``str()`` of the original exception.
    """

    def __init__(self, type_name: str, message: str) -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.message = message

    def __reduce__(self) -> tuple[type[RemoteWorkError], tuple[str, str]]:
        return (type(self), (self.type_name, self.message))
