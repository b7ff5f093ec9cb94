"""A device with ``watches_waits`` is shown every queue head that blocks; the waits stay
the host's, ending on the semaphores' signals and failures as on any device."""

from __future__ import annotations

import asyncio

import pytest

import asyncfront as af
from asyncfront.testing import FakeDevice, run_virtual


class _Watching(FakeDevice):
    watches_waits = True

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.watched: list[tuple[str, str]] = []

    def watch_wait(self, submission: af.Submission) -> None:
        self.watched.append((submission.name, submission.state.value))


def test_each_blocking_head_is_shown_once_and_its_wait_ends_on_the_signal() -> None:
    """The hook sees each head that blocks, once, while it waits; the signal still ends it."""

    async def main() -> tuple[list[tuple[str, str]], list[str]]:
        device = _Watching("dev")
        async with af.open_runtime([device]) as rt:
            q = rt.queue("dev")
            gate = rt.semaphore(name="gate")
            ran: list[str] = []
            first = q.submit(ran.append, "first", waits=[(gate, 1), (gate, 2)], name="first")
            met = q.submit(ran.append, "met", waits=[(gate, 1)], name="met")
            plain = q.submit(ran.append, "plain", name="plain")
            await asyncio.sleep(1)
            assert device.watched == [("first", "waiting")]
            gate.signal(2)
            await plain
            assert first.done() and met.done()
        return device.watched, ran

    watched, ran = run_virtual(main)
    assert watched == [("first", "waiting")]  # met's wait was reached when it got there
    assert ran == ["first", "met", "plain"]


def test_a_watched_wait_fails_with_its_semaphore() -> None:
    """A failed semaphore fails the watched head that waits on it, and the queue goes on."""

    async def main() -> None:
        device = _Watching("dev")
        async with af.open_runtime([device]) as rt:
            q = rt.queue("dev")
            gate = rt.semaphore(name="gate")
            doomed = q.submit(lambda: None, waits=[(gate, 1)], name="doomed")
            after = q.submit(lambda: "after", name="after")
            await asyncio.sleep(1)
            gate.fail(ValueError("gate broke"))
            with pytest.raises(af.SemaphoreFailedError):
                await doomed
            assert await after == "after"
            assert device.watched == [("doomed", "waiting")]

    run_virtual(main)
