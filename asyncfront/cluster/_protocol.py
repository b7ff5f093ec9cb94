"""The wire protocol between the driver and the node runtimes: pure, synchronous parts.

Submissions travel in sequenced batches (a :class:`Sequencer` restores each sender's
order, dropping duplicates); semaphore updates travel as whole states that are applied
idempotently (:func:`apply_update`), so duplicated and reordered pushes are harmless.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, NamedTuple, TypeVar

from .._frontier import EMPTY, Frontier
from .._semaphore import SemaphoreFailedError, TimelineSemaphore
from ._errors import RemoteWorkError

__all__ = (
    "DeliveryFaults",
    "EncodedFrontier",
    "SemaphoreRef",
    "SemaphoreUpdate",
    "Sequencer",
    "ValueRef",
    "apply_update",
    "decode_frontier",
    "dumps",
    "encode_frontier",
    "loads",
    "pack_exception",
    "root_cause",
    "unpack_exception",
)

T = TypeVar("T")

EncodedFrontier = tuple[tuple[int, ...], tuple[int, ...]]


class SemaphoreRef(NamedTuple):
    """How a cluster semaphore is named on the wire: its name, owner node and initial value."""

    name: str
    owner: int
    initial: int


class ValueRef(NamedTuple):
    """An argument standing for the result of an earlier submission.

    ``node`` is None when that submission ran on the node that reads the argument;
    else it names the node that keeps the result and sends a copy.
    """

    submission: int
    node: int | None = None


class SemaphoreUpdate(NamedTuple):
    """A semaphore's whole state as its owner knows it: applying one twice changes nothing.

    ``error`` is the packed failure (see :func:`pack_exception`), or None.
    """

    name: str
    value: int
    frontier: EncodedFrontier
    error: bytes | None


def encode_frontier(frontier: Frontier) -> EncodedFrontier:
    """A frontier as two plain tuples (axes, epochs) for the wire."""
    return (frontier._axes, frontier._epochs)


def decode_frontier(encoded: EncodedFrontier) -> Frontier:
    """The frontier that :func:`encode_frontier` encoded."""
    axes, epochs = encoded
    if not axes:
        return EMPTY
    return Frontier._make(tuple(axes), tuple(epochs))


def dumps(obj: Any) -> bytes:
    """Serialize with cloudpickle (Ray's copy), the way work and results travel."""
    from ray import cloudpickle

    return bytes(cloudpickle.dumps(obj))  # type: ignore[no-untyped-call]


def loads(data: bytes) -> Any:
    """Deserialize what :func:`dumps` produced."""
    from ray import cloudpickle

    return cloudpickle.loads(data)


def root_cause(exc: BaseException) -> BaseException:
    """The original error under a chain of semaphore failures."""
    while isinstance(exc, SemaphoreFailedError):
        exc = exc.root_cause
    return exc


def pack_exception(exc: BaseException) -> bytes:
    """Pickle an error so it arrives with its type and message.

    An error that does not survive a pickle round trip travels as a
    :class:`RemoteWorkError` carrying its type's name and its message. Tracebacks do
    not travel (records hold values, not frames).
    """
    try:
        data = dumps(exc)
        back = loads(data)
        if type(back) is type(exc) and str(back) == str(exc):
            return data
    except Exception:
        pass
    cls = type(exc)
    return dumps(RemoteWorkError(f"{cls.__module__}.{cls.__qualname__}", str(exc)))


def unpack_exception(data: bytes) -> BaseException:
    """The error :func:`pack_exception` packed."""
    exc = loads(data)
    assert isinstance(exc, BaseException)
    return exc


def apply_update(sem: TimelineSemaphore, update: SemaphoreUpdate) -> bool:
    """Apply an owner's state to a local mirror; returns whether anything changed.

    Idempotent and order-insensitive: the value only grows (a stale or repeated update
    is a no-op) and the owner's frontier is cumulative, so the latest value carries the
    merge of every earlier one. A failure is applied after the value it was reached at.
    """
    if sem.failure is not None:
        return False
    changed = False
    if update.value > sem.value:
        sem.signal(update.value, decode_frontier(update.frontier))
        changed = True
    if update.error is not None:
        sem.fail(unpack_exception(update.error))
        changed = True
    return changed


class Sequencer(Generic[T]):
    """Restores one sender's order: batches numbered 1, 2, 3... come out in that order.

    A batch that arrives early is held until its predecessors arrive; a batch seen
    before (a duplicate) is dropped.
    """

    __slots__ = ("_next", "_pending")

    def __init__(self) -> None:
        self._next = 1
        self._pending: dict[int, T] = {}

    @property
    def expected(self) -> int:
        """The sequence number the next released batch will carry."""
        return self._next

    @property
    def held(self) -> int:
        """How many early batches wait for a predecessor."""
        return len(self._pending)

    def offer(self, seq: int, batch: T) -> list[T]:
        """Take batch ``seq``; return the batches now releasable, in order."""
        if seq < self._next or seq in self._pending:
            return []
        self._pending[seq] = batch
        released: list[T] = []
        pending = self._pending
        while self._next in pending:
            released.append(pending.pop(self._next))
            self._next += 1
        return released


@dataclass
class DeliveryFaults:
    """Injected delivery faults, for tests: every message is delayed by a random time
    (so messages overtake each other) and some are delivered twice.

    Applies to submission batches and to semaphore pushes, on the driver and on every
    node. The protocol must make both harmless.

    Attributes:
        seed: seeds the random choices (each process derives its own stream).
        max_delay: the longest delay, in seconds.
        duplicate: the probability that a message is delivered a second time.
    """

    seed: int = 0
    max_delay: float = 0.005
    duplicate: float = 0.3
    _random: random.Random = field(default_factory=random.Random, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.max_delay < 0:
            raise ValueError(f"max_delay must be >= 0 s, got {self.max_delay}")
        if not 0.0 <= self.duplicate <= 1.0:
            raise ValueError(f"duplicate must be a probability in [0, 1], got {self.duplicate}")
        self._random.seed(self.seed)

    def reseeded(self, salt: int) -> DeliveryFaults:
        """The same faults with a random stream of their own (one per process)."""
        return DeliveryFaults(self.seed * 1000003 + salt, self.max_delay, self.duplicate)

    def deliver(
        self, loop: asyncio.AbstractEventLoop, send: Callable[..., Any], *args: Any
    ) -> None:
        """Call ``send(*args)`` after a random delay, and maybe once more later."""
        rand = self._random
        loop.call_later(rand.uniform(0.0, self.max_delay), send, *args)
        if rand.random() < self.duplicate:
            loop.call_later(rand.uniform(0.0, self.max_delay), send, *args)
