"""What to give back when memory runs short: pure planning shared by residency and the pager.

Both managers order their candidates their own way (weights by eviction cost, pages
by recency) and hand the ordered list to :func:`plan_reclaim`, which picks the fewest
that cover the shortfall. Bytes only count where freeing them helps the requester:
its own memory always does; another context's only above that context's reservation
(freeing reserved memory returns it to the same reservation, not to the device).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, TypeVar

if TYPE_CHECKING:
    from .._context import ExecutionContext
    from .._runtime import Runtime

__all__ = ("Reclaim", "ReclaimPlan", "RequestRate", "plan_reclaim", "shortfall")

K = TypeVar("K", bound=Hashable)

UNLIMITED = math.inf


@dataclass(frozen=True)
class Reclaim(Generic[K]):
    """One thing that could be freed: its key, the context it is charged to, its size."""

    key: K
    context: str
    nbytes: int


@dataclass(frozen=True)
class ReclaimPlan(Generic[K]):
    """What to free, in order, and how many of its bytes help the requester.

    ``sufficient`` is False when freeing every candidate would still not cover the
    shortfall; the plan is then empty, because freeing would cost reloads and buy
    nothing.
    """

    victims: tuple[K, ...]
    counted: int
    needed: int

    @property
    def sufficient(self) -> bool:
        """Whether freeing the victims covers what was needed."""
        return self.counted >= self.needed


def _counted(picks: Sequence[Reclaim[K]], reclaimable: Mapping[str, float] | None) -> int:
    per_context: dict[str, int] = {}
    for pick in picks:
        per_context[pick.context] = per_context.get(pick.context, 0) + pick.nbytes
    if reclaimable is None:
        return sum(per_context.values())
    return int(sum(min(n, reclaimable.get(ctx, 0)) for ctx, n in per_context.items()))


def plan_reclaim(
    candidates: Sequence[Reclaim[K]],
    needed: int,
    reclaimable: Mapping[str, float] | None = None,
) -> ReclaimPlan[K]:
    """Take candidates in the given order until they cover ``needed`` bytes, then prune.

    Pruning drops any pick (earliest first) whose bytes the others already cover, so a
    single large victim is not joined by small ones it makes unnecessary.

    Args:
        candidates: what may be freed, best victim first.
        needed: bytes the requester is short of.
        reclaimable: per context, the most of its bytes that help the requester
            (missing contexts count 0); None counts every byte.
    """
    if needed <= 0:
        return ReclaimPlan((), 0, needed)
    picks: list[Reclaim[K]] = []
    counted = 0
    for candidate in candidates:
        if counted >= needed:
            break
        trial = _counted([*picks, candidate], reclaimable)
        if trial > counted:
            picks.append(candidate)
            counted = trial
    if counted < needed:
        return ReclaimPlan((), 0, needed)
    for pick in list(picks):
        rest = [p for p in picks if p is not pick]
        if _counted(rest, reclaimable) >= needed:
            picks = rest
    return ReclaimPlan(tuple(p.key for p in picks), _counted(picks, reclaimable), needed)


def shortfall(
    runtime: Runtime, context: ExecutionContext, nbytes: int
) -> tuple[int, dict[str, float]]:
    """Bytes ``context`` lacks for an ``nbytes`` allocation now, and what freeing helps.

    Over its own ``max_memory``, only the context's own memory helps. Otherwise the
    device lacks room (budget, or a free extent that fits in a fragmented pool): the
    context's own memory counts in full, another context's only the part of its usage
    above its reservation.
    """
    ledger = runtime._memory._memory(context.device).ledger
    used, _, limit = ledger.usage(context.name)
    charge = runtime._memory.charge_for(context, nbytes)  # the budget counts block spans
    if used + charge > limit:
        return used + charge - limit, {context.name: UNLIMITED}
    reclaimable: dict[str, float] = {}
    for name in ledger.accounts():
        other_used, other_reserved, _ = ledger.usage(name)
        reclaimable[name] = max(0, other_used - other_reserved)
    reclaimable[context.name] = UNLIMITED
    # A fragmented pool needs a fitting extent, not just free bytes in the budget.
    needed = max(
        charge - ledger.available_to(context.name),
        runtime._memory.placement_shortfall(context, nbytes),
    )
    return needed, reclaimable


class RequestRate:
    """An exponentially decayed request rate (requests per second) on an injected clock.

    Each request adds 1 to a count that halves every ``half_life`` seconds; for steady
    Poisson arrivals of rate r the count settles at ``r * half_life / ln 2``, so the
    estimate is ``count * ln 2 / half_life``.
    """

    __slots__ = ("_count", "_last", "half_life")

    def __init__(self, half_life: float = 60.0) -> None:
        if half_life <= 0:
            raise ValueError(f"half_life must be > 0 seconds, got {half_life}")
        self.half_life = half_life
        self._count = 0.0
        self._last: float | None = None

    def _decayed(self, now: float) -> float:
        if self._last is None:
            return 0.0
        return self._count * math.pow(0.5, max(0.0, now - self._last) / self.half_life)

    def record(self, now: float) -> None:
        """Count one request at time ``now``."""
        self._count = self._decayed(now) + 1.0
        self._last = now

    def rate(self, now: float) -> float:
        """Requests per second expected around ``now``."""
        return self._decayed(now) * math.log(2) / self.half_life

    def __repr__(self) -> str:
        return f"<RequestRate count={self._count:.2f} half_life={self.half_life}s>"
