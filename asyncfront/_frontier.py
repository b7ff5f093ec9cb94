"""Axes and frontiers: the vector clocks that carry causal history.

An *axis* is a 64-bit integer naming one timeline (a device queue, a collective
channel, a host context). A :class:`Frontier` maps axes to epochs and says "everything
up to this epoch on each of these axes has happened before me". Everything here is
pure and synchronous.
"""

from __future__ import annotations

import enum
import operator
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Mapping
from typing import Final, NamedTuple, SupportsIndex

from mypy_extensions import mypyc_attr

__all__ = (
    "DEFAULT_FRONTIER_CAPACITY",
    "AxisFields",
    "Domain",
    "Frontier",
    "Order",
    "axis",
    "axis_fields",
    "axis_name",
    "set_axis_name",
)

DEFAULT_FRONTIER_CAPACITY = 64
"""Default number of entries an operation's frontier may hold before truncation."""

_BYTE: Final = 0xFF
_ORDINAL_MASK: Final = (1 << 40) - 1
_U64_MAX: Final = (1 << 64) - 1  # axes and epochs are unsigned 64-bit integers
_QUEUE_MASK: Final = (1 << 32) - 1


class Domain(enum.IntEnum):
    """What kind of timeline an axis names (bits 47:40 of the axis)."""

    QUEUE = 0
    COLLECTIVE = 1
    HOST = 3


class AxisFields(NamedTuple):
    """The decoded fields of an axis."""

    incarnation: int
    node: int
    domain: int
    ordinal: int

    @property
    def device(self) -> int:
        """Device index of a queue axis (bits 39:32)."""
        return (self.ordinal >> 32) & _BYTE

    @property
    def queue(self) -> int:
        """Queue slot of a queue axis (bits 31:0)."""
        return self.ordinal & _QUEUE_MASK


def _check_byte(label: str, value: int) -> None:
    if not 0 <= value <= _BYTE:
        raise ValueError(f"axis {label} must be in 0..255, got {value}")


def axis(
    node: int = 0,
    domain: Domain | int = Domain.QUEUE,
    device: int = 0,
    queue: int = 0,
    incarnation: int = 0,
    *,
    ordinal: int | None = None,
) -> int:
    """Build an axis: ``[63:56] incarnation | [55:48] node | [47:40] domain | [39:0] ordinal``.

    For queue axes the ordinal is ``device << 32 | queue``: 8 bits of device and a 32-bit
    queue slot; other domains may pass ``ordinal`` directly (any 40-bit value).

    Raises:
        ValueError: a field is out of range (the message names it and its range).
    """
    _check_byte("incarnation", incarnation)
    _check_byte("node", node)
    _check_byte("domain", int(domain))
    if ordinal is None:
        _check_byte("device", device)
        if not 0 <= queue <= _QUEUE_MASK:
            raise ValueError(f"axis queue must be in 0..{_QUEUE_MASK}, got {queue}")
        ordinal = device << 32 | queue
    elif not 0 <= ordinal <= _ORDINAL_MASK:
        raise ValueError(f"axis ordinal must fit in 40 bits, got {ordinal}")
    return incarnation << 56 | node << 48 | int(domain) << 40 | ordinal


def axis_fields(value: int) -> AxisFields:
    """Decode an axis into its fields."""
    return AxisFields(
        incarnation=(value >> 56) & _BYTE,
        node=(value >> 48) & _BYTE,
        domain=(value >> 40) & _BYTE,
        ordinal=value & _ORDINAL_MASK,
    )


_AXIS_NAMES: Final[dict[int, str]] = {}


def set_axis_name(value: int, name: str) -> None:
    """Give an axis a human-readable name used by reprs and traces.

    The runtime names each queue's axis while the queue lives and forgets the name when
    the queue retires, so names do not accumulate over a long-running process.
    """
    _AXIS_NAMES[value] = name


def _forget_axis_name(value: int, name: str) -> None:
    """Drop the name of ``value`` if it is still ``name`` (another owner may have renamed it)."""
    if _AXIS_NAMES.get(value) == name:
        del _AXIS_NAMES[value]


def axis_name(value: int) -> str:
    """The name given to an axis, or a decoded form such as ``q(n0.d1.q2#0)``."""
    name = _AXIS_NAMES.get(value)
    if name is not None:
        return name
    fields = axis_fields(value)
    if fields.domain == Domain.QUEUE:
        return f"q(n{fields.node}.d{fields.device}.q{fields.queue}#{fields.incarnation})"
    try:
        label = Domain(fields.domain).name.lower()
    except ValueError:
        label = f"domain{fields.domain}"
    return f"{label}(n{fields.node}.{fields.ordinal}#{fields.incarnation})"


class Order(enum.Enum):
    """How two frontiers relate in the causal partial order."""

    EQUAL = "equal"
    BEFORE = "before"
    AFTER = "after"
    CONCURRENT = "concurrent"


# Equal axes tuples made apart can be replaced by the first one made, so that frontiers
# over one set of axes share one tuple and ``a._axes is b._axes`` answers comparisons
# without reading the entries. Bounded: cleared when full, which costs only that fast
# path until tuples are shared again.
_AXES: Final[dict[tuple[int, ...], tuple[int, ...]]] = {}
_AXES_LIMIT: Final = 1024


def _shared_axes(axes: tuple[int, ...]) -> tuple[int, ...]:
    """The shared tuple equal to ``axes`` (``axes`` itself, the first time it is seen)."""
    shared = _AXES.get(axes)
    if shared is not None:
        return shared
    if len(_AXES) >= _AXES_LIMIT:
        _AXES.clear()
    _AXES[axes] = axes
    return axes


def _exact_int(value: SupportsIndex) -> int:
    """``value`` as an exact ``int``: an int subclass's instance is copied (it could hold
    attributes that refer back to the frontier; the compiled class is acyclic)."""
    if type(value) is int:
        return value
    return operator.index(value)  # exact int since Python 3.10


def _union(
    a_axes: tuple[int, ...],
    a_epochs: tuple[int, ...],
    b_axes: tuple[int, ...],
    b_epochs: tuple[int, ...],
) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """The union of two sorted frontiers, maximum per axis; None when a already covers b."""
    axes: list[int] = []
    epochs: list[int] = []
    grew = False
    i = j = 0
    na, nb = len(a_axes), len(b_axes)
    while i < na and j < nb:
        x, y = a_axes[i], b_axes[j]
        if x == y:
            axes.append(x)
            ea, eb = a_epochs[i], b_epochs[j]
            if ea >= eb:
                epochs.append(ea)
            else:
                epochs.append(eb)
                grew = True
            i += 1
            j += 1
        elif x < y:
            axes.append(x)
            epochs.append(a_epochs[i])
            i += 1
        else:
            axes.append(y)
            epochs.append(b_epochs[j])
            grew = True
            j += 1
    if j < nb:
        grew = True
        axes.extend(b_axes[j:])
        epochs.extend(b_epochs[j:])
    if not grew:
        return None
    if i < na:
        axes.extend(a_axes[i:])
        epochs.extend(a_epochs[i:])
    return tuple(axes), tuple(epochs)


def _max_epochs(a: tuple[int, ...], b: tuple[int, ...]) -> list[int] | None:
    """The per-entry maximum of two epoch tuples of one axes tuple.

    None when ``a`` is at least ``b`` everywhere (the maximum is ``a``), an empty list when
    ``b`` is at least ``a`` everywhere (it is ``b``), else the maximum. One comparison
    per entry finds which: nothing is allocated when an operand dominates.
    """
    n = len(a)
    i = 0
    while i < n and a[i] >= b[i]:
        i += 1
    if i == n:
        return None  # a dominates (or equals) b
    # b is larger at i: does a still exceed b somewhere?
    j = 0
    while j < n and a[j] <= b[j]:
        j += 1
    if j == n:
        return []  # b dominates a
    out = list(a)
    while i < n:
        y = b[i]
        if y > out[i]:
            out[i] = y
        i += 1
    return out


def _merge_scan(
    a_axes: tuple[int, ...],
    a_epochs: tuple[int, ...],
    b_axes: tuple[int, ...],
    b_epochs: tuple[int, ...],
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The union of two sorted frontiers, maximum per axis, as (axes, epochs)."""
    union = _union(a_axes, a_epochs, b_axes, b_epochs)
    return (a_axes, a_epochs) if union is None else union


def _covers(
    a_axes: tuple[int, ...],
    a_epochs: tuple[int, ...],
    b_axes: tuple[int, ...],
    b_epochs: tuple[int, ...],
) -> bool:
    """True when every entry of b is at most the same axis in a (a dominates b)."""
    if len(b_axes) > len(a_axes):
        return False
    i = 0
    na = len(a_axes)
    for y, eb in zip(b_axes, b_epochs, strict=True):
        while i < na and a_axes[i] < y:
            i += 1
        if i == na or a_axes[i] != y or a_epochs[i] < eb:
            return False
        i += 1
    return True


# Acyclic: a frontier holds only tuples of exact ints (its constructors convert int
# subclasses, see _exact_int), so it can be in no reference cycle and the compiled class
# leaves the garbage collector out (nothing to track or traverse).
@mypyc_attr(acyclic=True)
class Frontier:
    """An immutable vector clock: ``(axis, epoch)`` entries sorted by axis.

    Every stored epoch is positive; a missing axis reads as epoch 0. Frontiers form a
    lattice under :meth:`merge` (component-wise max) ordered by :meth:`dominates`.

    Args:
        entries: a mapping ``{axis: epoch}`` or an iterable of ``(axis, epoch)`` pairs.
            Axes and epochs are unsigned 64-bit integers; zero epochs are dropped;
            negative or oversized values and repeated axes are errors.

    Raises:
        TypeError: an entry is not a pair of ints.
        ValueError: an axis or epoch outside ``0..2**64 - 1``, or an axis given twice.
    """

    __slots__ = ("_axes", "_epochs", "_hash")

    _axes: tuple[int, ...]
    _epochs: tuple[int, ...]
    _hash: int | None

    def __new__(cls, entries: Mapping[int, int] | Iterable[tuple[int, int]] = ()) -> Frontier:
        # Defined so that _make can allocate without __init__ also where this module is
        # compiled (a compiled class refuses object.__new__ from outside its __new__).
        return object.__new__(cls)

    def __init__(self, entries: Mapping[int, int] | Iterable[tuple[int, int]] = ()) -> None:
        items = list(entries.items()) if isinstance(entries, Mapping) else list(entries)
        items.sort()
        axes: list[int] = []
        epochs: list[int] = []
        previous: int | None = None  # the last axis seen, zero epoch or not
        for ax, epoch in items:
            if not isinstance(ax, int) or not isinstance(epoch, int):
                raise TypeError(
                    f"frontier entries must be (int, int) pairs, got ({ax!r}, {epoch!r})"
                )
            if not 0 <= ax <= _U64_MAX:
                raise ValueError(f"frontier axis must be an unsigned 64-bit integer, got {ax}")
            if epoch < 0:
                raise ValueError(f"epoch for axis {axis_name(ax)} must be >= 0, got {epoch}")
            if epoch > _U64_MAX:
                raise ValueError(
                    f"epoch for axis {axis_name(ax)} must be at most 2**64 - 1, got {epoch}"
                )
            if ax == previous:
                raise ValueError(f"axis {axis_name(ax)} appears twice in frontier entries")
            previous = ax
            if epoch:
                axes.append(_exact_int(ax))
                epochs.append(_exact_int(epoch))
        self._axes = tuple(axes)
        self._epochs = tuple(epochs)
        self._hash = None

    @classmethod
    def _make(cls, axes: tuple[int, ...], epochs: tuple[int, ...]) -> Frontier:
        """Build from already sorted, validated tuples (no checks: internal fast path)."""
        self = Frontier.__new__(Frontier)
        self._axes = axes
        self._epochs = epochs
        self._hash = None
        return self

    @classmethod
    def single(cls, axis: int, epoch: int) -> Frontier:
        """The frontier ``{axis: epoch}``."""
        if epoch <= 0:
            return EMPTY
        return cls._make((_exact_int(axis),), (_exact_int(epoch),))  # as in __init__

    # -- queries ---------------------------------------------------------------------

    def get(self, axis: int) -> int:
        """The epoch of ``axis``, 0 when absent."""
        axes = self._axes
        lo, hi = 0, len(axes)
        while lo < hi:
            mid = (lo + hi) >> 1
            if axes[mid] < axis:
                lo = mid + 1
            else:
                hi = mid
        if lo < len(axes) and axes[lo] == axis:
            return self._epochs[lo]
        return 0

    @property
    def axes(self) -> tuple[int, ...]:
        """The axes present, in ascending order."""
        return self._axes

    def __len__(self) -> int:
        return len(self._axes)

    def __bool__(self) -> bool:
        return bool(self._axes)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return zip(self._axes, self._epochs, strict=True)

    def __contains__(self, axis: object) -> bool:
        return isinstance(axis, int) and self.get(axis) > 0

    def as_dict(self) -> dict[int, int]:
        """The entries as a new ``{axis: epoch}`` dict."""
        return dict(zip(self._axes, self._epochs, strict=True))

    # -- algebra ---------------------------------------------------------------------

    def merge(self, other: Frontier) -> Frontier:
        """Component-wise maximum: the causal history of both."""
        # Returns an operand itself whenever it dominates the other: no allocation.
        a_axes, b_axes = self._axes, other._axes
        if a_axes is b_axes or a_axes == b_axes:
            epochs = _max_epochs(self._epochs, other._epochs)
            if epochs is None:
                return self
            if not epochs:
                return other
            return Frontier._make(a_axes, tuple(epochs))
        if not b_axes:
            return self
        if not a_axes:
            return other
        union = _union(a_axes, self._epochs, b_axes, other._epochs)
        if union is None:
            return self
        if union[0] == b_axes and union[1] == other._epochs:
            return other
        return Frontier._make(*union)

    def __or__(self, other: Frontier) -> Frontier:
        """``a | b`` is :meth:`merge`."""
        return self.merge(other)

    def dominates(self, other: Frontier) -> bool:
        """True when every entry of ``other`` is at most the same axis here."""
        a_axes, b_axes = self._axes, other._axes
        if a_axes is b_axes or a_axes == b_axes:
            return all(map(operator.ge, self._epochs, other._epochs))
        if not b_axes:
            return True
        return _covers(a_axes, self._epochs, b_axes, other._epochs)

    def __ge__(self, other: object) -> bool:
        if not isinstance(other, Frontier):
            return NotImplemented
        return self.dominates(other)

    def __le__(self, other: object) -> bool:
        if not isinstance(other, Frontier):
            return NotImplemented
        return other.dominates(self)

    def __gt__(self, other: object) -> bool:
        if not isinstance(other, Frontier):
            return NotImplemented
        return self != other and self.dominates(other)

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, Frontier):
            return NotImplemented
        return self != other and other.dominates(self)

    def compare(self, other: Frontier) -> Order:
        """Where this frontier stands relative to ``other``."""
        if self == other:
            return Order.EQUAL
        if other.dominates(self):
            return Order.BEFORE
        if self.dominates(other):
            return Order.AFTER
        return Order.CONCURRENT

    def undominated(self, other: Frontier) -> Frontier:
        """The entries of ``other`` this frontier does not cover: the waits still needed."""
        if self.dominates(other):
            return EMPTY
        axes: list[int] = []
        epochs: list[int] = []
        get = self.get
        for ax, epoch in zip(other._axes, other._epochs, strict=True):
            if get(ax) < epoch:
                axes.append(ax)
                epochs.append(epoch)
        return Frontier._make(tuple(axes), tuple(epochs))

    def with_epoch(self, axis: int, epoch: int) -> Frontier:
        """A copy where ``axis`` reads at least ``epoch``."""
        axis, epoch = _exact_int(axis), _exact_int(epoch)  # as in __init__
        axes = self._axes
        epochs = self._epochs
        i = bisect_left(axes, axis)  # the axes are sorted: its place, present or not
        if i < len(axes) and axes[i] == axis:
            if epochs[i] >= epoch:
                return self
            raised = list(epochs)
            raised[i] = epoch
            return Frontier._make(axes, tuple(raised))
        if epoch <= 0:
            return self
        grown_axes = list(axes)
        grown_axes.insert(i, axis)  # a new axis goes in at its place: no merge scan
        grown_epochs = list(epochs)
        grown_epochs.insert(i, epoch)
        return Frontier._make(tuple(grown_axes), tuple(grown_epochs))

    def truncated(self, capacity: int, keep: int | None = None) -> Frontier:
        """A valid lower bound with at most ``capacity`` entries.

        Drops the smallest-epoch entries (never ``keep``): claiming less causal
        knowledge than we have is always safe.
        """
        if capacity < 1:
            raise ValueError(f"frontier capacity must be >= 1, got {capacity}")
        axes = self._axes
        n = len(axes)
        if n <= capacity:
            return self
        epochs = self._epochs
        # keep first, then by epoch, ties to the larger axis: the entries ranked first by
        # (axis == keep, epoch, axis), found with one C-level sort of the epochs.
        kept_at = -1
        if keep is not None:
            i = bisect_left(axes, keep)
            if i < n and axes[i] == keep:
                kept_at = i
        slots = capacity if kept_at < 0 else capacity - 1
        if slots == 0:
            return Frontier._make((axes[kept_at],), (epochs[kept_at],))
        others = list(epochs)
        if kept_at >= 0:
            del others[kept_at]
        others.sort(reverse=True)
        threshold = others[slots - 1]  # the smallest epoch that stays
        ties = others[:slots].count(threshold)  # entries at it that stay
        if ties == others.count(threshold):  # all of them (always so with distinct epochs)
            chosen = [i for i, e in enumerate(epochs) if e >= threshold or i == kept_at]
        else:  # the larger axes among the tied stay
            tied = [i for i, e in enumerate(epochs) if e == threshold and i != kept_at]
            dropped = set(tied[: len(tied) - ties])
            chosen = [
                i
                for i, e in enumerate(epochs)
                if (e >= threshold and i not in dropped) or i == kept_at
            ]
        return Frontier._make(tuple([axes[i] for i in chosen]), tuple([epochs[i] for i in chosen]))

    # -- identity --------------------------------------------------------------------

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Frontier):
            return NotImplemented
        return self._axes == other._axes and self._epochs == other._epochs

    def __hash__(self) -> int:
        h = self._hash
        if h is None:
            h = self._hash = hash((self._axes, self._epochs))
        return h

    def __repr__(self) -> str:
        body = ", ".join(
            f"{axis_name(a)}: {e}" for a, e in zip(self._axes, self._epochs, strict=True)
        )
        return f"Frontier({{{body}}})"


EMPTY: Final = Frontier()
"""The empty frontier: no causal knowledge."""
