"""Contexts and the pool together, driven by random sequences in virtual time.

A hypothesis state machine allocates (with timeouts) through four contexts of every tier
sharing one fragmenting 64 KiB pool, frees with death frontiers of queued work, runs
work, lets virtual time pass, and admits and closes a Guaranteed context. After every
step it checks, against its own model of the pool's units and the budgets:

* no allocation outlives its timeout, and one refused for time ends exactly at its
  deadline;
* no allocation that can never fit waits (over its limit, above what the reservations
  of other contexts leave, or larger than any extent the requester's own blocks leave);
* no budget is exceeded, and each budget equals the spans its live blocks hold;
* no block is handed out early: its units' death frontiers are dominated by the
  requester's frontier or complete when the allocation returns;
* after everything is freed and closed, usage is back to zero.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import asyncfront as af
from asyncfront.testing import FakeDevice, new_virtual_loop, run_virtual

KiB = af.KiB
CAPACITY = 64 * KiB
ALIGN = 256
UNITS = CAPACITY // ALIGN
EPSILON = 1e-9

SMALL = st.sampled_from([1, 255, 256, 1000, 2 * KiB, 4 * KiB, 4 * KiB + 1])
SIZES = st.sampled_from([8 * KiB, 12 * KiB, 16 * KiB, 24 * KiB, 32 * KiB, 48 * KiB, 80 * KiB])
TIMEOUTS = st.sampled_from([0.0, 0.25, 1.0, 3.0, 3.0, None])


def _span(nbytes: int) -> int:
    return min(-(-nbytes // ALIGN) * ALIGN, CAPACITY) if nbytes <= CAPACITY else nbytes


@dataclass
class Pending:
    """One allocation in flight, and how it ended."""

    session: int
    nbytes: int
    timeout: float | None
    start: float
    task: asyncio.Task[None] | None = None
    end: float | None = None
    error: str | None = None
    buffer: af.Buffer | None = None
    queued: bool = False  # still waiting once everything ready at its start had run

    @property
    def deadline(self) -> float | None:
        return None if self.timeout is None else self.start + self.timeout


@dataclass
class Model:
    """What the machine knows: every unit's live buffer or last death frontier."""

    owner: list[af.Buffer | None] = field(default_factory=lambda: [None] * UNITS)
    death: list[af.Frontier | None] = field(default_factory=lambda: [None] * UNITS)


class ContextsAndPool(RuleBasedStateMachine):
    """Random allocations, frees, work and admissions on one shared pool."""

    def __init__(self) -> None:
        super().__init__()
        self.loop = new_virtual_loop(idle_timeout=None)
        self.stack = contextlib.AsyncExitStack()
        self.rt: af.Runtime = self.run(
            self.stack.enter_async_context(af.open_runtime([FakeDevice("g", memory=CAPACITY)]))
        )
        rt = self.rt
        self.contexts = {
            "g": self.call(rt.create_context, "g", max_memory=16 * KiB),
            "b": self.call(
                rt.create_context, "b", max_memory=32 * KiB, base_memory=8 * KiB, qos="burstable"
            ),
            "e1": self.call(rt.create_context, "e1", max_memory=32 * KiB, qos="best_effort"),
            "e2": self.call(rt.create_context, "e2", max_memory=32 * KiB, qos="best_effort"),
        }
        self.sessions = [
            self.run(self.stack.enter_async_context(rt.session(self.contexts[name])))
            for name in ("g", "b", "e1", "e1", "e2")
        ]
        self.extra: af.ExecutionContext | None = None
        self.model = Model()
        self.pending: list[Pending] = []
        self.live: list[af.Buffer] = []
        self.failures: list[str] = []

    # -- driving the loop ------------------------------------------------------------

    def run(self, awaitable: Any) -> Any:
        return self.loop.run_until_complete(awaitable)

    def call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` on the loop (runtime calls expect a running loop)."""

        async def call() -> Any:
            return fn(*args, **kwargs)

        return self.run(call())

    def settle(self) -> None:
        """Let everything ready at the current virtual instant run."""
        for _ in range(8):
            self.run(asyncio.sleep(0))

    @property
    def now(self) -> float:
        return self.rt.now()

    # -- the model -------------------------------------------------------------------

    def ceiling(self, ctx: af.ExecutionContext, kept: int) -> int:
        others = sum(
            self.rt.usage(other).reserved for other in self.rt.contexts if other is not ctx
        )
        return min(self.rt.usage(ctx).limit, CAPACITY - others) - kept

    def kept(self, session: af.Session) -> list[af.Buffer]:
        return [b for b in self.live if b.owner is session]

    def can_ever_fit(self, session: af.Session, nbytes: int) -> bool:
        """Whether freeing by every other holder could serve the request (the model's view)."""
        kept = self.kept(session)
        if _span(nbytes) > self.ceiling(session.context, sum(b.charged for b in kept)):
            return False
        cursor = largest = 0
        for buf in sorted(kept, key=lambda b: b.offset or 0):
            assert buf.offset is not None
            largest = max(largest, buf.offset - cursor)
            cursor = buf.offset + buf.charged
        return nbytes <= max(largest, CAPACITY - cursor)

    def granted(self, buf: af.Buffer) -> None:
        block = buf.block
        assert block is not None and buf.offset is not None
        assert buf.charged == block.span and buf.offset % ALIGN == 0
        known = block.requester | self.rt.completed
        for unit in range(buf.offset // ALIGN, (buf.offset + buf.charged + ALIGN - 1) // ALIGN):
            if self.model.owner[unit] is not None:
                self.failures.append(f"{buf!r} overlaps {self.model.owner[unit]!r}")
            death = self.model.death[unit]
            if death is not None and not known.dominates(death):
                self.failures.append(f"{buf!r} handed out before its death {death!r}")
            self.model.owner[unit] = buf
        self.live.append(buf)

    def release(self, buf: af.Buffer, death: af.Frontier) -> None:
        assert buf.offset is not None
        for unit in range(buf.offset // ALIGN, (buf.offset + buf.charged + ALIGN - 1) // ALIGN):
            self.model.owner[unit] = None
            self.model.death[unit] = death
        self.live.remove(buf)

    async def allocate_one(self, pending: Pending) -> None:
        session = self.sessions[pending.session]
        try:
            buf = await session.allocate(pending.nbytes, timeout=pending.timeout)
        except af.MemoryBudgetError as exc:
            pending.error = str(exc)
        else:
            pending.buffer = buf
            self.granted(buf)
        pending.end = self.now

    # -- rules -----------------------------------------------------------------------

    @rule(index=st.integers(0, 4), nbytes=SMALL, timeout=TIMEOUTS)
    def allocate_small(self, index: int, nbytes: int, timeout: float | None) -> None:
        self.allocate(index, nbytes, timeout)

    @rule(index=st.integers(0, 4), nbytes=SMALL, timeout=TIMEOUTS)
    def allocate_small_too(self, index: int, nbytes: int, timeout: float | None) -> None:
        self.allocate(index, nbytes, timeout)

    @rule(index=st.integers(0, 4), nbytes=SIZES, timeout=TIMEOUTS)
    def allocate(self, index: int, nbytes: int, timeout: float | None) -> None:
        session = self.sessions[index]
        possible = self.can_ever_fit(session, nbytes)
        pending = Pending(index, nbytes, timeout, self.now)
        pending.task = self.call(asyncio.ensure_future, self.allocate_one(pending))
        self.pending.append(pending)
        self.settle()
        pending.queued = pending.end is None
        if not possible:
            assert pending.end == pending.start and pending.error is not None, (
                f"{nbytes} bytes can never fit for session {index} but did not fail at once"
            )

    @precondition(lambda self: self.live)
    @rule(pick=st.integers(0, 10_000))
    def free(self, pick: int) -> None:
        buf = self.live[pick % len(self.live)]
        death = buf.context.death_frontier()
        session = next(s for s in self.sessions if s is buf.owner)
        self.release(buf, death)
        self.call(session.free, buf)
        self.settle()

    @precondition(lambda self: self.live)
    @rule(pick=st.integers(0, 10_000))
    def free_too(self, pick: int) -> None:
        self.free(pick)

    @rule(index=st.integers(0, 4), cost=st.sampled_from([0.1, 0.5, 2.0]))
    def work(self, index: int, cost: float) -> None:
        self.call(self.sessions[index].submit, cost=cost, name="work")
        self.settle()

    @rule(dt=st.sampled_from([0.1, 0.25, 0.5, 1.0, 3.0]))
    def advance(self, dt: float) -> None:
        self.run(asyncio.sleep(dt))
        self.settle()

    @precondition(lambda self: self.extra is None)
    @rule()
    def admit(self) -> None:
        try:
            self.extra = self.call(self.rt.create_context, "x", max_memory=24 * KiB)
        except af.AdmissionError:
            assert "x" not in {c.name for c in self.rt.contexts}
        self.settle()

    @precondition(lambda self: self.extra is not None)
    @rule()
    def close(self) -> None:
        assert self.extra is not None
        self.call(self.rt.close_context, self.extra)
        self.extra = None
        self.settle()

    # -- invariants ------------------------------------------------------------------

    @invariant()
    def nothing_went_wrong_inside(self) -> None:
        assert not self.failures, self.failures[:3]

    @invariant()
    def budgets_hold_and_equal_the_spans_held(self) -> None:
        assert self.rt.available_memory("g") >= 0
        for ctx in self.contexts.values():
            used, _, limit = self.rt.usage(ctx)
            assert used <= limit
            assert used == sum(b.charged for b in self.live if b.context is ctx)
        pool = self.contexts["g"].device.memory
        assert pool.statistics().bytes_in_use == sum(b.charged for b in self.live)

    @invariant()
    def no_wait_outlives_its_timeout_or_can_never_fit(self) -> None:
        for pending in self.pending:
            if pending.end is not None:
                deadline = pending.deadline
                if deadline is not None:
                    assert pending.end <= deadline + EPSILON
                    if pending.error is not None and "within" in pending.error:
                        assert pending.end == pytest.approx(deadline, abs=EPSILON)
                continue
            deadline = pending.deadline
            assert deadline is None or self.now <= deadline + EPSILON, pending
            session = self.sessions[pending.session]
            assert self.can_ever_fit(session, pending.nbytes), (
                f"{pending} waits though it can never fit"
            )

    def teardown(self) -> None:
        try:
            for _ in range(50):
                if all(p.end is not None for p in self.pending):
                    break
                for buf in list(self.live):
                    self.release(buf, buf.context.death_frontier())
                    self.call(buf.owner.free, buf)  # type: ignore[attr-defined]
                self.run(asyncio.sleep(10.0))
                self.settle()
            assert all(p.end is not None for p in self.pending), "an allocation never ended"
            for buf in list(self.live):
                self.release(buf, buf.context.death_frontier())
                self.call(buf.owner.free, buf)  # type: ignore[attr-defined]
            assert not self.failures, self.failures[:3]
            for ctx in self.contexts.values():
                assert self.rt.usage(ctx).used == 0 and ctx.statistics().waiting == 0
            assert self.contexts["g"].device.memory.statistics().bytes_in_use == 0
            self.run(self.stack.aclose())
        finally:
            self.loop.close()


def test_a_grant_that_fragments_the_pool_refuses_its_holders_impossible_waiter_at_once() -> None:
    """A session's own new block leaving no extent its waiter fits refuses that waiter at once."""

    async def main() -> None:
        async with af.open_runtime([FakeDevice("g", memory=CAPACITY)]) as rt:
            mine = rt.create_context("mine", max_memory=CAPACITY, qos="best_effort")
            other = rt.create_context("other", max_memory=CAPACITY, qos="best_effort")
            async with rt.session(mine) as s, rt.session(other) as o:
                head = await o.allocate(16 * KiB)
                kept = await s.allocate(4 * KiB)
                rest = [await o.allocate(n * KiB) for n in (20, 4, 20)]
                assert [b.offset for b in (head, kept, *rest)] == [
                    n * KiB for n in (0, 16, 20, 40, 44)
                ]
                waiter = asyncio.ensure_future(s.allocate(40 * KiB, timeout=3.0))
                await asyncio.sleep(0)
                assert not waiter.done()  # others' frees could still open 44 KiB at 20 KiB
                o.free(rest[1])
                await asyncio.sleep(0)
                assert not waiter.done()
                hole = await s.allocate(4 * KiB)  # the only free extent: at 40 KiB
                assert hole.offset == 40 * KiB
                await asyncio.sleep(0)
                assert waiter.done() and rt.now() == 0.0
                with pytest.raises(af.MemoryBudgetError, match="fragmented"):
                    waiter.result()
                assert mine.statistics().waiting == 0
                for buf in (head, rest[0], rest[2]):
                    o.free(buf)
                s.free(kept)
                s.free(hole)

    run_virtual(main)


def test_a_request_over_the_budget_now_is_refused_at_once_if_its_own_blocks_fragment() -> None:
    """A request the budget cannot take now is refused at once if its own blocks fragment."""

    async def main() -> None:
        async with af.open_runtime([FakeDevice("g", memory=CAPACITY)]) as rt:
            mine = rt.create_context("mine", max_memory=CAPACITY, qos="best_effort")
            other = rt.create_context("other", max_memory=CAPACITY, qos="best_effort")
            async with rt.session(mine) as s, rt.session(other) as o:
                bufs = [await (s if n == 4 else o).allocate(n * KiB) for n in (16, 4, 20, 4, 20)]
                assert [b.offset for b in bufs] == [n * KiB for n in (0, 16, 20, 40, 44)]
                assert rt.available_memory("g") == 0
                with pytest.raises(af.MemoryBudgetError, match="fragmented"):
                    await s.allocate(24 * KiB, timeout=3.0)
                assert rt.now() == 0.0 and mine.statistics().waiting == 0
                for buf in bufs:
                    (s if buf.context is mine else o).free(buf)

    run_virtual(main)


ContextsAndPool.TestCase.settings = settings(
    max_examples=20,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_contexts_and_pool_under_fragmentation_and_timeouts = ContextsAndPool.TestCase


@pytest.mark.slow
class TestContextsAndPoolLonger(ContextsAndPool.TestCase):  # type: ignore[name-defined,misc]
    """The same machine, longer sequences and more of them."""

    settings = settings(
        max_examples=60,
        stateful_step_count=80,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
