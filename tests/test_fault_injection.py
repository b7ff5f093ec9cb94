"""Randomized fault injection: random DAGs on fake devices, faults of every kind.

Each case builds a random DAG of 10-60 nodes over 2-5 fake devices (random concurrency,
queues with random priorities), submits it in a random order (consumers before their
producers across queues), injects faults (work that raises, device faults, work that
raises CancelledError, waits nothing signals, host tasks cancelled while waiting),
watches it with observers that are cancelled at random, and sometimes aborts the
runtime. It then checks the outcome against what the DAG implies: every failure
reaches exactly its dependants with its root cause, everything else completes with the
right value, frontiers dominate their ancestors', nothing hangs, no waiter is left.
"""

from __future__ import annotations

import asyncio
import random
import re
from dataclasses import dataclass, field
from typing import Any

import pytest

import asyncfront as af
from asyncfront.testing import FakeDevice, run_virtual

KINDS = ("ok", "ok", "ok", "ok", "async", "raise", "device", "cancelled", "orphan", "host")


class NodeError(RuntimeError):
    """A fault a node's work raises (or its device injects)."""

    def __init__(self, node: int) -> None:
        super().__init__(f"node {node} broke")
        self.node = node


class HostCancelled(RuntimeError):
    """A host node's task was cancelled before it signalled."""

    def __init__(self, node: int) -> None:
        super().__init__(f"host node {node} was cancelled")
        self.node = node


class Abort(Exception):
    """Raised inside the runtime to abort it."""


@dataclass
class Case:
    """One random DAG and what happened to it."""

    seed: int
    parents: list[list[int]]
    kinds: list[str]
    queue_of: list[int]
    order: list[int]
    abort_at: float | None
    results: dict[int, int] = field(default_factory=dict)
    subs: dict[int, af.Submission] = field(default_factory=dict)
    sems: list[af.TimelineSemaphore] = field(default_factory=list)
    host_frontiers: dict[int, af.Frontier] = field(default_factory=dict)
    host_cancelled: set[int] = field(default_factory=set)
    host_failed_at: dict[int, float] = field(default_factory=dict)
    observers: list[tuple[str, Any, bool]] = field(default_factory=list)
    observed: list[Any] = field(default_factory=list)
    orphan: af.TimelineSemaphore | None = None
    aborted: bool = False


def value_of(node: int, parent_values: list[int]) -> int:
    """The value a node computes from its parents' values."""
    return (node * 7919 + sum(parent_values) * 31) % 1_000_003


def origin(exc: BaseException | None) -> int | None:
    """The node whose fault is the root cause of ``exc`` (None: the runtime closing)."""
    while isinstance(exc, af.SemaphoreFailedError):
        exc = exc.root_cause
    if isinstance(exc, NodeError | HostCancelled):
        return exc.node
    if isinstance(exc, af.CancelledWorkError):
        found = re.search(r"work 'n(\d+)'", str(exc))
        assert found, exc
        return int(found.group(1))
    if isinstance(exc, af.StalledError):
        found = re.match(r"submission 'n(\d+)' on queue .* and ", str(exc))
        return int(found.group(1)) if found else None
    raise AssertionError(f"unexpected root cause {exc!r}")


def make_case(seed: int) -> tuple[Case, list[FakeDevice], list[tuple[int, int]]]:
    """A random DAG, its devices and its queues ``(device index, priority)``."""
    rng = random.Random(seed)
    devices = [
        FakeDevice(f"d{i}", concurrency=rng.randint(1, 3), speed=rng.choice((0.5, 1.0, 2.0)))
        for i in range(rng.randint(2, 5))
    ]
    queues = [
        (d, rng.randint(-2, 2)) for d in range(len(devices)) for _ in range(rng.randint(1, 2))
    ]
    n = rng.randint(10, 60)
    parents = [
        sorted(rng.sample(range(i), min(i, rng.choice((0, 1, 1, 2, 2, 3))))) for i in range(n)
    ]
    kinds = [rng.choice(KINDS) for _ in range(n)]
    queue_of = [rng.randrange(len(queues)) for _ in range(n)]
    # A random global order, but each queue keeps its nodes in DAG order (a queue whose
    # head waited on work behind it would deadlock by construction, not by a fault).
    shuffled = list(range(n))
    rng.shuffle(shuffled)
    per_queue: dict[int, list[int]] = {}
    for node in range(n):
        per_queue.setdefault(queue_of[node], []).append(node)
    cursor = dict.fromkeys(per_queue, 0)
    order = []
    for node in shuffled:
        q = queue_of[node]
        order.append(per_queue[q][cursor[q]])
        cursor[q] += 1
    abort_at = rng.uniform(0.0, 4.0) if rng.random() < 0.15 else None
    return Case(seed, parents, kinds, queue_of, order, abort_at), devices, queues


async def run_case(
    case: Case, devices: list[FakeDevice], queue_specs: list[tuple[int, int]]
) -> None:
    """Submit the case's DAG with its faults and observers, then leave the runtime."""
    rng = random.Random(case.seed + 1)
    n = len(case.parents)
    loop = asyncio.get_running_loop()
    case.sems = [af.TimelineSemaphore(name=f"s{i}") for i in range(n)]
    case.orphan = af.TimelineSemaphore(name="orphan")
    tasks: list[asyncio.Task[Any]] = []
    hosts: list[asyncio.Task[None]] = []

    def compute(node: int) -> int:
        value = value_of(node, [case.results[p] for p in case.parents[node]])
        case.results[node] = value
        return value

    def work_for(node: int) -> Any:
        kind = case.kinds[node]
        if kind == "raise":

            def broken() -> None:
                raise NodeError(node)

            return broken
        if kind == "cancelled":

            async def cancelled() -> None:
                inner = asyncio.ensure_future(asyncio.sleep(100))
                loop.call_later(rng.uniform(0, 0.5), inner.cancel)
                await inner

            return cancelled
        if kind == "async":
            pause = rng.uniform(0, 0.3)

            async def slow() -> int:
                await asyncio.sleep(pause)
                return compute(node)

            return slow
        return lambda: compute(node)

    async def host(node: int) -> None:
        sem = case.sems[node]
        try:
            frontier = await af.wait_all([(case.sems[p], 1) for p in case.parents[node]])
            await asyncio.sleep(rng.uniform(0, 0.5))
        except af.SemaphoreFailedError as exc:
            case.host_failed_at[node] = loop.time()
            sem.fail(exc.root_cause)
            return
        except asyncio.CancelledError:
            case.host_failed_at[node] = loop.time()
            case.host_cancelled.add(node)
            sem.fail(HostCancelled(node))
            raise
        compute(node)
        case.host_frontiers[node] = frontier
        sem.signal(1, frontier)

    async def observe(kind: str, target: Any) -> Any:
        if kind == "submission":
            return await target
        if kind == "semaphore":
            return await target.wait(1)
        return await af.wait_all(target)

    try:
        async with asyncio.timeout(10_000):
            async with af.open_runtime(devices, stall_timeout=5.0) as rt:
                queues = [
                    rt.queue(f"d{d}", priority=p, name=f"q{i}")
                    for i, (d, p) in enumerate(queue_specs)
                ]
                for node in case.order:
                    kind = case.kinds[node]
                    waits = [(case.sems[p], 1) for p in case.parents[node]]
                    if kind == "host":
                        hosts.append(asyncio.ensure_future(host(node)))
                        continue
                    if kind == "orphan":
                        waits.insert(0, (case.orphan, 1))
                    q = queues[case.queue_of[node]]
                    if kind == "device":
                        q.device.fail_next(NodeError(node), name=f"n{node}")
                    case.subs[node] = q.submit(
                        work_for(node),
                        waits=waits,
                        signals=[(case.sems[node], 1)],
                        name=f"n{node}",
                        cost=rng.choice((None, 0.0, rng.uniform(0, 1))),
                    )
                for _ in range(rng.randint(0, 8)):
                    kind = rng.choice(("submission", "semaphore", "wait_all"))
                    target: Any
                    if kind == "submission" and case.subs:
                        target = case.subs[rng.choice(sorted(case.subs))]
                    elif kind == "wait_all":
                        target = [(case.sems[i], 1) for i in rng.sample(range(n), min(n, 3))]
                    else:
                        kind, target = "semaphore", case.sems[rng.randrange(n)]
                    cancel = rng.random() < 0.5
                    case.observers.append((kind, target, cancel))
                    task = asyncio.ensure_future(observe(kind, target))
                    tasks.append(task)
                    if cancel:
                        loop.call_later(rng.uniform(0, 3), task.cancel)
                for task in hosts:
                    if rng.random() < 0.2:
                        loop.call_later(rng.uniform(0, 2), task.cancel)
                if case.abort_at is not None:
                    await asyncio.sleep(case.abort_at)
                    case.aborted = True
                    raise Abort()
    finally:
        for task in hosts:
            if not task.done():
                task.cancel()
        await asyncio.gather(*hosts, return_exceptions=True)
        case.observed = list(await asyncio.gather(*tasks, return_exceptions=True))


def failed_at(case: Case, node: int) -> float:
    """When a failed node failed (loop time)."""
    sub = case.subs.get(node)
    if sub is None:
        return case.host_failed_at.get(node, float("inf"))
    assert sub.finished_at is not None
    return sub.finished_at


def check_case(case: Case) -> None:
    """Every outcome is what the DAG and the injected faults imply."""
    n = len(case.parents)
    hosts = {i for i in range(n) if case.kinds[i] == "host"}
    failed: list[bool] = [False] * n
    roots: list[set[int | None]] = [set() for _ in range(n)]
    frontiers: dict[int, af.Frontier] = {}
    for node in range(n):  # DAG order: parents first
        sub = case.subs.get(node)
        sem = case.sems[node]
        bad_parents = [p for p in case.parents[node] if failed[p]]
        kind = case.kinds[node]
        own_fault = (
            kind in ("raise", "device", "cancelled", "orphan") or node in case.host_cancelled
        )
        if node in case.host_cancelled:
            expected_roots = {node}  # cancelled before any failure reached it
        elif bad_parents:
            expected_roots = set().union(*(roots[p] for p in bad_parents))
        elif own_fault:
            expected_roots = {node}
        else:
            expected_roots = set()
        if sub is not None and (kind == "orphan" or any(p in hosts for p in case.parents[node])):
            # The drain fails the waits nothing queued can signal (an orphan, a host
            # node's semaphore): that may come before, or with, a failure from upstream.
            error = sub.exception()
            if isinstance(error, af.StalledError) and origin(error) == node:
                first = min((failed_at(case, p) for p in bad_parents), default=float("inf"))
                assert sub.finished_at is not None and sub.finished_at <= first + 1e-9
                expected_roots = {node}
        if sub is not None:
            assert sub.done(), f"n{node} is {sub.state.value}"
            error = sub.exception()
        else:
            error = sem.failure
        if case.aborted and error is not None and origin(error) is None:
            # the runtime closed before it (or an ancestor) finished
            failed[node], roots[node] = True, {None}
            continue
        if case.aborted and sub is None and error is None and sem.value == 0:
            failed[node], roots[node] = True, {None}  # a host node whose parents never ran
            continue
        if expected_roots:
            assert error is not None, f"n{node} should have failed from {expected_roots}"
            assert origin(error) in expected_roots, (
                f"n{node} failed from {origin(error)}, expected one of {expected_roots}: {error!r}"
            )
            assert sem.failure is not None and origin(sem.failure) == origin(error)
            failed[node], roots[node] = True, {origin(error)}
            if sub is not None and bad_parents and not case.aborted:
                # it fails as soon as the first of its waits fails, not when all have ended
                first = min(failed_at(case, p) for p in bad_parents)
                prev = [
                    s
                    for s in case.subs.values()
                    if s.queue is sub.queue and s.epoch == sub.epoch - 1
                ]
                ready = max([prev[0].finished_at or 0.0] if prev else [sub.submitted_at])
                assert sub.finished_at is not None
                if first != float("inf"):
                    assert sub.finished_at <= max(first, ready) + 1e-9, f"n{node} failed late"
            continue
        assert error is None, f"n{node} should have completed, failed with {error!r}"
        expected = value_of(node, [case.results[p] for p in case.parents[node]])
        assert case.results.get(node) == expected
        assert sem.value == 1
        if sub is not None:
            assert sub.result() == expected
            frontier = sub.frontier
        else:
            frontier = case.host_frontiers[node]
        assert frontier is not None
        for p in case.parents[node]:
            assert frontier.dominates(frontiers[p]), f"n{node}'s frontier misses n{p}'s"
        frontiers[node] = frontier
    for (kind, target, cancelled), outcome in zip(case.observers, case.observed, strict=True):
        if isinstance(outcome, asyncio.CancelledError):
            assert cancelled, f"an observer of a {kind} was cancelled by no one"
            continue
        if kind == "submission":
            if target.exception() is not None:
                assert outcome is target.exception()
            else:
                assert outcome == target.result()
        elif kind == "semaphore":
            if target.failure is not None:
                assert isinstance(outcome, af.SemaphoreFailedError)
            else:
                assert isinstance(outcome, af.Frontier)
        else:
            if any(sem.failure is not None for sem, _ in target):
                assert isinstance(outcome, af.SemaphoreFailedError)
            else:
                assert isinstance(outcome, af.Frontier)
    assert case.orphan is not None
    for sem in (*case.sems, case.orphan):
        assert sem.statistics().waiters == 0, f"{sem!r} keeps waiters"


def run_seed(seed: int) -> None:
    """Build, run and check one case."""
    case, devices, queues = make_case(seed)
    try:
        run_virtual(run_case, case, devices, queues, idle_timeout=2.0)
    except Abort:
        assert case.aborted
    else:
        assert not case.aborted
    check_case(case)


def _run_seeds(seeds: range) -> None:
    for seed in seeds:
        try:
            run_seed(seed)
        except BaseException as exc:
            raise AssertionError(f"fault injection failed for seed {seed}: {exc!r}") from exc


def test_random_dags_with_faults() -> None:
    """240 random DAGs with injected faults: failures reach exactly their dependants."""
    _run_seeds(range(240))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_many_random_dags_with_faults(request: pytest.FixtureRequest) -> None:
    """3,000 more random DAGs with injected faults (run with ``-m slow``)."""
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("the larger fault-injection run needs -m slow (a few minutes)")
    _run_seeds(range(1000, 4000))
