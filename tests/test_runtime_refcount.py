"""A closed runtime is freed by reference counting: no cycle keeps it or its trace alive."""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import pytest

import asyncfront as af
from asyncfront.devices import CpuDevice
from asyncfront.testing import FakeDevice, run_virtual


@pytest.fixture
def no_gc() -> Iterator[None]:
    """The cyclic collector off, so only reference counting can free anything."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


class _Tracked:
    """Whether an object is still alive, for objects that take no weak reference.

    The compiled core's classes (queues, semaphores) take none; they are tracked by the
    collector, so a live one is among ``gc.get_objects()``. Only its id and type are kept.
    """

    def __init__(self, obj: object) -> None:
        self._id = id(obj)
        self._type = type(obj)

    def __call__(self) -> object | None:
        for obj in gc.get_objects():
            if id(obj) == self._id and type(obj) is self._type:
                return obj
        return None


def _ref(obj: Any) -> Callable[[], object | None]:
    """A weak reference to ``obj``, or where it takes none, a :class:`_Tracked`."""
    try:
        return weakref.ref(obj)
    except TypeError:
        return _Tracked(obj)


Refs = tuple[Callable[[], object | None], ...]


def _freed(main: Callable[[], Coroutine[Any, Any, Refs]], *, virtual: bool = True) -> Refs:
    refs = run_virtual(main) if virtual else asyncio.run(main())
    return tuple(ref for ref in refs if ref() is not None)


def test_a_closed_runtime_after_a_pipeline_is_freed_without_the_collector(no_gc: None) -> None:
    """A runtime that ran a two-queue semaphore pipeline, and its trace, die with it."""

    async def main() -> Refs:
        async with af.open_runtime([FakeDevice("a"), FakeDevice("b")]) as rt:
            qa, qb = rt.queue("a"), rt.queue("b", priority=1)
            sem = af.TimelineSemaphore(name="s")
            for i in range(1, 20):
                qa.submit(lambda: None, signals=[(sem, i)], cost=0.001)
                qb.submit(lambda: None, waits=[(sem, i)])
            refs = (_ref(rt), _ref(rt.trace), _ref(qa), _ref(sem))
            del qa, qb, sem
        del rt
        return refs

    assert _freed(main) == ()


def test_a_runtime_closed_by_an_error_with_blocked_queues_is_freed(no_gc: None) -> None:
    """Leaving on an exception, with a queue cancelled mid-wait and its work failed, frees all."""

    async def main() -> Refs:
        refs: Refs = ()
        raised = False
        try:
            async with af.open_runtime([FakeDevice("a")], stall_timeout=10.0) as rt:
                q = rt.queue("a")
                sem = af.TimelineSemaphore(name="never")
                sub = q.submit(lambda: None, waits=[(sem, 1)])
                await asyncio.sleep(0.01)
                refs = (_ref(rt), _ref(rt.trace), _ref(q))
                del q, sem
                raise KeyError("boom")
        except KeyError:  # not kept: its traceback would hold this frame in a cycle
            raised = True
        assert raised
        assert isinstance(sub.exception(), af.StalledError)
        del rt, sub
        return refs

    assert _freed(main) == ()


def test_a_closed_runtime_with_contexts_and_sessions_is_freed(no_gc: None) -> None:
    """Contexts, their queues, sessions and buffers do not keep a closed runtime alive."""

    async def main() -> Refs:
        async with af.open_runtime([FakeDevice("gpu", memory=1 << 20)]) as rt:
            ctx = rt.create_context("model", max_memory=1 << 16)
            async with rt.session(ctx) as session:
                await session.allocate(1024)
                await ctx.queue.submit(lambda: None)
            refs = (_ref(rt), _ref(rt.trace), _ref(ctx))
            del ctx, session
        del rt
        return refs

    assert _freed(main) == ()


def test_a_closed_runtime_with_a_cpu_device_is_freed(no_gc: None) -> None:
    """Work run in a CpuDevice's threads leaves nothing that keeps the closed runtime alive."""

    async def main() -> Refs:
        async with af.open_runtime([CpuDevice("cpu", workers=2)]) as rt:
            q = rt.queue("cpu")
            for _ in range(10):
                q.submit(lambda: None)
            await q.submit(lambda: None)
            refs = (_ref(rt), _ref(rt.trace), _ref(q))
            del q
        del rt
        return refs

    assert _freed(main, virtual=False) == ()


async def test_a_queue_outliving_its_freed_runtime_says_so() -> None:
    """A queue kept past its runtime's end refuses work as closed and names the lost runtime."""
    async with af.open_runtime([FakeDevice("a")]) as rt:
        q = rt.queue("a")
        await q.submit(lambda: None)
    del rt
    gc.collect()
    with pytest.raises(RuntimeError, match=r"'a\.q0' is closed"):
        q.submit(lambda: None)
    with pytest.raises(RuntimeError, match="runtime was closed and freed"):
        _ = q.runtime
    q.close()  # harmless


def test_a_closed_runtime_that_ran_a_graph_is_freed_without_the_collector(no_gc: None) -> None:
    """A graph and its stages refer to each other, yet the runtime that ran it dies with it."""

    async def main() -> Refs:
        async with af.open_runtime([FakeDevice("a"), FakeDevice("b")]) as rt:
            g = rt.graph("g")
            g.stage("x", device="a", cost=0.001)
            g.stage("y", device="b", cost=0.001, after="x")
            run = await g.submit()
            await run.wait()
            refs = (_ref(rt), _ref(rt.trace))
            del run
        del rt
        return refs

    assert _freed(main) == ()
