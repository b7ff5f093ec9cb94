"""Resizing a collective channel between steps: the frontier chain stays unbroken."""

from __future__ import annotations

import pytest

import asyncfront as af
from asyncfront.devices.fake import FakeDeviceError
from asyncfront.testing import FakeDevice, run_virtual


def gpus(n: int = 4) -> list[FakeDevice]:
    return [FakeDevice(f"gpu{i}") for i in range(n)]


def test_resized_channel_first_step_dominates_the_last_step_before() -> None:
    """The next channel's first step waits on, and its frontier dominates, the last step."""

    async def main() -> None:
        async with af.open_runtime(gpus()) as rt:
            qs = [rt.queue(f"gpu{i}") for i in range(4)]
            two = rt.collective(qs[:2], name="req")
            first = two.submit(name="s0", cost=1.0)
            last = two.submit(name="s1", cost=1.0)
            four = two.resize(qs)  # before the old steps ran: the hand-off is pending
            grown = four.submit(name="s2", cost=0.5)
            await grown
            assert last.frontier is not None and grown.frontier is not None
            assert grown.frontier.dominates(last.frontier)
            assert grown.frontier.dominates(first.frontier)  # type: ignore[arg-type]
            assert grown.frontier.get(two.axis) == 2 and grown.frontier.get(four.axis) == 1
            # qs[2] and qs[3] were idle, yet their parts started only after s1 ended
            assert min(p.started_at or 0.0 for p in grown.parts) >= max(
                p.finished_at or 0.0 for p in last.parts
            )
            assert four.name == "req~1" and two.successor == "req~1" and two.closed

    run_virtual(main)


def test_resize_after_the_last_step_ran_still_chains() -> None:
    """A resize after the old channel drained hands its frontier on at once."""

    async def main() -> None:
        async with af.open_runtime(gpus()) as rt:
            qs = [rt.queue(f"gpu{i}") for i in range(4)]
            ch = rt.collective(qs, name="req")
            last = ch.submit(name="s0", cost=1.0)
            await last
            one = ch.resize(qs[:1])
            nxt = one.submit(name="s1", cost=1.0)
            await nxt
            assert nxt.frontier is not None and last.frontier is not None
            assert nxt.frontier.dominates(last.frontier)
            again = one.resize(qs[1:3])
            assert again.name == "req~2"
            final = again.submit(name="s2", cost=1.0)
            await final
            assert final.frontier is not None and final.frontier.dominates(nxt.frontier)
            assert final.frontier.dominates(last.frontier)

    run_virtual(main)


def test_old_channel_refuses_steps_after_a_resize() -> None:
    """Submitting to a resized channel raises, naming its successor; nothing is queued."""

    async def main() -> None:
        async with af.open_runtime(gpus(2)) as rt:
            qs = [rt.queue("gpu0"), rt.queue("gpu1")]
            ch = rt.collective(qs, name="req")
            ch.submit(name="s0", cost=1.0)
            nxt = ch.resize(qs[:1])
            with pytest.raises(RuntimeError, match=r"'req' was resized into 'req~1'"):
                ch.submit(name="late", cost=1.0)
            with pytest.raises(RuntimeError, match="resized"):
                ch.resize(qs)
            assert ch.statistics().submitted_epoch == 1
            await nxt.submit(name="s1", cost=1.0)

    run_virtual(main)


def test_failed_last_step_fails_the_next_channels_first_step() -> None:
    """A failure of the old channel's last step travels into the resized channel."""

    async def main() -> None:
        devices = gpus(2)
        async with af.open_runtime(devices) as rt:
            qs = [rt.queue("gpu0"), rt.queue("gpu1")]
            ch = rt.collective(qs, name="req")
            devices[1].fail_next(name="s0[1]")
            bad = ch.submit(name="s0", cost=1.0)
            nxt = ch.resize(qs[:1])
            after = nxt.submit(name="s1", cost=1.0)
            with pytest.raises(FakeDeviceError):
                await bad
            with pytest.raises(af.SemaphoreFailedError) as info:
                await after
            assert isinstance(info.value.root_cause, FakeDeviceError)
            # already failed when resized: the same
            third = nxt.resize(qs)
            with pytest.raises(af.SemaphoreFailedError):
                await third.submit(name="s2", cost=1.0)

    run_virtual(main)


def test_invalid_resize_changes_nothing() -> None:
    """A resize to no queues raises and leaves the channel open for steps."""

    async def main() -> None:
        async with af.open_runtime(gpus(2)) as rt:
            ch = rt.collective([rt.queue("gpu0")], name="req")
            with pytest.raises(ValueError, match="at least one member"):
                ch.resize([])
            assert not ch.closed
            await ch.submit(name="s0", cost=1.0)

    run_virtual(main)


def test_drained_resized_channels_leave_the_runtime() -> None:
    """A resized channel that ran its steps is forgotten; axes are never reused."""

    async def main() -> None:
        async with af.open_runtime(gpus(2)) as rt:
            qs = [rt.queue("gpu0"), rt.queue("gpu1")]
            ch = rt.collective(qs, name="req")
            axes = {ch.axis}
            for k in range(5):
                await ch.submit(name=f"s{k}", cost=1.0)
                ch = ch.resize(qs[: 1 + k % 2])
                axes.add(ch.axis)
            await ch.submit(name="last", cost=1.0)
            assert len(axes) == 6
            assert rt._channels == [ch]
            other = rt.collective(qs, name="other")
            assert other.axis not in axes

    run_virtual(main)
