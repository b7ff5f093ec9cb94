"""Memory budgets per device: admission of QoS tiers and atomic charging of allocations.

Pure and synchronous: the ledger decides, contexts and sessions carry the decision out.

Each context on a device has a *reservation* (Guaranteed: its ``max_memory``;
Burstable: its ``base_memory``; BestEffort: nothing), a *limit* (``max_memory``) and
*usage*. What the device has committed is the sum over contexts of
``max(reservation, usage)``: reservations are held even while unused, and usage above a
reservation is borrowed from spare capacity. An allocation is granted when it keeps the
context within its limit and the device's commitment within capacity.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import NamedTuple

__all__ = (
    "GiB",
    "KiB",
    "MiB",
    "AdmissionError",
    "Charge",
    "ContextUsage",
    "MemoryBudgetError",
    "MemoryLedger",
    "QoS",
    "format_bytes",
)

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30


def format_bytes(n: int | float) -> str:
    """``3.0 GiB``, ``512.0 MiB``, ``12 B``: sizes as people read them."""
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


class QoS(enum.Enum):
    """Quality-of-service tiers: memory guarantees and queue priority."""

    GUARANTEED = "guaranteed"
    """Reserves ``max_memory`` at creation; highest priority."""
    BURSTABLE = "burstable"
    """Reserves ``base_memory``; may grow to ``max_memory`` from spare capacity."""
    BEST_EFFORT = "best_effort"
    """Reserves nothing; uses spare capacity; first to wait or be evicted."""

    @classmethod
    def _missing_(cls, value: object) -> QoS | None:
        # ``QoS("best-effort")``: case, hyphens, spaces and a missing underscore are
        # forgiven, so the tiers' names read from configuration files work as written.
        if isinstance(value, str):
            key = value.strip().lower().replace("-", "_").replace(" ", "_")
            return _BY_NAME.get(key.replace("_", ""))
        return None

    @classmethod
    def coerce(cls, value: QoS | str) -> QoS:
        """A tier from a :class:`QoS` or its name (``"guaranteed"``, ``"best-effort"``, ...).

        Names are matched ignoring case, hyphens, spaces and underscores, so
        ``"best_effort"``, ``"best-effort"``, ``"besteffort"`` and ``"BEST_EFFORT"`` all
        name :attr:`BEST_EFFORT`.

        Raises:
            TypeError: ``value`` is neither a QoS nor a string.
            ValueError: the string names no tier.
        """
        if isinstance(value, QoS):
            return value
        if not isinstance(value, str):
            raise TypeError(
                f"qos must be a QoS or one of the names {_NAMES}, got "
                f"{value!r} ({type(value).__name__})"
            )
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"qos {value!r} names no tier; use one of {_NAMES}") from None

    @property
    def priority(self) -> int:
        """The queue priority of the tier (higher runs first)."""
        return _PRIORITY[self]


_PRIORITY = {QoS.GUARANTEED: 20, QoS.BURSTABLE: 10, QoS.BEST_EFFORT: 0}
_BY_NAME = {tier.value.replace("_", ""): tier for tier in QoS}
_NAMES = ", ".join(repr(tier.value) for tier in QoS)


class AdmissionError(RuntimeError):
    """A context cannot be created: its reservation does not fit the device."""


class MemoryBudgetError(MemoryError):
    """An allocation does not fit the context's budget or the device, with the numbers."""

    def __init__(
        self,
        context: str,
        requested: int,
        limit: int,
        used: int,
        available: int,
        reason: str,
    ) -> None:
        super().__init__(
            f"context {context!r} asked {format_bytes(requested)}, budget "
            f"{format_bytes(limit)}, {format_bytes(used)} in use, "
            f"{format_bytes(available)} available on the device: {reason}"
        )
        self.context = context
        self.requested = requested
        self.limit = limit
        self.used = used
        self.available = available


class ContextUsage(NamedTuple):
    """``(used, reserved, limit)`` bytes of one context."""

    used: int
    reserved: int
    limit: int


class Charge(enum.Enum):
    """The ledger's answer to a request."""

    GRANTED = "granted"
    OVER_LIMIT = "over_limit"  # the context's own max_memory: only its own frees help
    NO_SPACE = "no_space"  # the device is committed: others' frees or evictions help


@dataclass
class _Account:
    name: str
    qos: QoS
    reserved: int
    limit: int
    used: int = 0

    @property
    def committed(self) -> int:
        return max(self.reserved, self.used)


def _check_bytes(context: str, what: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(
            f"context {context!r}: {what} must be an int number of bytes, got {value!r} "
            f"({type(value).__name__}); for a fraction of a unit write int(1.5 * GiB)"
        )


class MemoryLedger:
    """The budget book of one device: who reserved, who uses, what is left."""

    def __init__(self, device: str, capacity: int) -> None:
        if capacity < 0:
            raise ValueError(f"device {device!r} capacity must be >= 0, got {capacity}")
        self.device = device
        self.capacity = capacity
        self._accounts: dict[str, _Account] = {}
        self._committed = 0
        self._reserved = 0  # the sum of every account's reservation

    # -- admission -----------------------------------------------------------------

    def check_admission(self, name: str, qos: QoS, max_memory: int, base_memory: int | None) -> int:
        """The reservation an account would get, or the error admitting it would raise.

        Changes nothing: :meth:`admit` runs the same checks, so a caller may validate a
        context completely before creating anything else for it.

        Raises:
            AdmissionError: the reservation does not fit what the device has left, or
                the name is taken.
            TypeError: a size is not an ``int`` number of bytes.
            ValueError: inconsistent sizes.
        """
        _check_bytes(name, "max_memory", max_memory)
        if base_memory is not None:
            _check_bytes(name, "base_memory", base_memory)
        if name in self._accounts:
            raise AdmissionError(f"a context named {name!r} already exists on {self.device!r}")
        if max_memory < 0:
            raise ValueError(f"context {name!r}: max_memory must be >= 0, got {max_memory}")
        if base_memory is not None and not 0 <= base_memory <= max_memory:
            raise ValueError(
                f"context {name!r}: base_memory {format_bytes(base_memory)} must lie "
                f"between 0 and max_memory {format_bytes(max_memory)}"
            )
        if max_memory > self.capacity:
            raise AdmissionError(
                f"context {name!r} asks a budget of {format_bytes(max_memory)} but device "
                f"{self.device!r} holds {format_bytes(self.capacity)}"
            )
        if qos is QoS.GUARANTEED:
            reserved = max_memory
        elif qos is QoS.BURSTABLE:
            reserved = base_memory or 0
        else:
            reserved = 0
        free = self.capacity - self._committed
        if reserved > free:
            raise AdmissionError(
                f"context {name!r} ({qos.value}) needs {format_bytes(reserved)} reserved on "
                f"{self.device!r}, but {format_bytes(self.capacity)} minus "
                f"{format_bytes(self._committed)} committed leaves {format_bytes(free)}"
            )
        return reserved

    def admit(self, name: str, qos: QoS, max_memory: int, base_memory: int | None) -> int:
        """Open an account; returns its reservation.

        Raises:
            AdmissionError: the reservation does not fit what the device has left, or
                the name is taken.
            TypeError: a size is not an ``int`` number of bytes.
            ValueError: inconsistent sizes.
        """
        reserved = self.check_admission(name, qos, max_memory, base_memory)
        self._accounts[name] = _Account(name, qos, reserved, max_memory)
        self._committed += reserved
        self._reserved += reserved
        return reserved

    def close(self, name: str) -> None:
        """Close an account and return its reservation (its usage must be zero)."""
        account = self._accounts[name]
        if account.used:
            raise RuntimeError(
                f"context {name!r} still uses {format_bytes(account.used)}; free it first"
            )
        self._committed -= account.committed
        self._reserved -= account.reserved
        del self._accounts[name]

    # -- charging ------------------------------------------------------------------

    def try_charge(self, name: str, nbytes: int) -> Charge:
        """Charge ``nbytes`` to the account if the budget and the device allow it."""
        account = self._accounts[name]
        used = account.used + nbytes
        if used > account.limit:
            return Charge.OVER_LIMIT
        growth = max(account.reserved, used) - account.committed
        if self._committed + growth > self.capacity:
            return Charge.NO_SPACE
        account.used = used
        self._committed += growth
        return Charge.GRANTED

    def release(self, name: str, nbytes: int) -> None:
        """Return ``nbytes`` of the account's usage."""
        account = self._accounts[name]
        if nbytes > account.used:
            raise ValueError(
                f"context {name!r} releases {format_bytes(nbytes)} but uses only "
                f"{format_bytes(account.used)}"
            )
        before = account.committed
        account.used -= nbytes
        self._committed -= before - account.committed

    # -- queries -------------------------------------------------------------------

    @property
    def committed(self) -> int:
        """Reservations plus usage above them, summed over accounts."""
        return self._committed

    @property
    def available(self) -> int:
        """Bytes nobody has reserved or is using."""
        return self.capacity - self._committed

    def available_to(self, name: str) -> int:
        """The most the account could allocate now: its own headroom plus spare capacity."""
        account = self._accounts[name]
        headroom = max(0, account.reserved - account.used)
        return min(account.limit - account.used, headroom + self.available)

    def ceiling(self, name: str, kept: int) -> int:
        """The most the account could ever be granted while it keeps ``kept`` bytes.

        That is what it could get if every other holder freed everything: its limit, and
        the device's capacity less the other accounts' reservations (held even unused),
        both less ``kept``. A request above it cannot be served by waiting; only a change
        of holders (a context closed, a reservation returned) can raise it.
        """
        account = self._accounts[name]
        others = self._reserved - account.reserved
        return min(account.limit, self.capacity - others) - kept

    def reserved_by_others(self, name: str) -> int:
        """The reservations of every account but ``name``'s."""
        return self._reserved - self._accounts[name].reserved

    def usage(self, name: str) -> ContextUsage:
        """``(used, reserved, limit)`` of one account."""
        account = self._accounts[name]
        return ContextUsage(account.used, account.reserved, account.limit)

    def qos(self, name: str) -> QoS:
        """The tier of one account."""
        return self._accounts[name].qos

    def accounts(self) -> tuple[str, ...]:
        """Account names in creation order."""
        return tuple(self._accounts)

    def __repr__(self) -> str:
        return (
            f"<MemoryLedger {self.device!r} committed {format_bytes(self._committed)} of "
            f"{format_bytes(self.capacity)} accounts={len(self._accounts)}>"
        )
