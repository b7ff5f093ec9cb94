"""Liveness of the core: cancelled work, stall detection, multi-waits, bad input refused."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import looptime
import pytest
import structlog

import asyncfront as af
from asyncfront.testing import FakeDevice, VirtualStallError, run_virtual

# -- work that raises CancelledError ---------------------------------------------------


def test_work_raising_cancelled_error_fails_only_its_submission() -> None:
    """A CancelledError out of the work fails that submission and its signals; the queue goes on."""

    async def main() -> None:
        async with af.open_runtime([FakeDevice("gpu"), FakeDevice("npu")]) as rt:
            q, other = rt.queue("gpu", name="q"), rt.queue("npu", name="other")
            done = af.TimelineSemaphore(name="done")

            async def work() -> None:
                inner = asyncio.ensure_future(asyncio.sleep(10))
                asyncio.get_running_loop().call_later(1, inner.cancel)
                await inner

            a = q.submit(work, name="a", signals=[(done, 1)])
            b = q.submit(lambda: "b ran", name="b", cost=1)
            downstream = other.submit(lambda: "never", waits=[(done, 1)], name="down")
            with pytest.raises(af.CancelledWorkError, match=r"work 'a' on queue 'q' raised Canc"):
                await a
            assert isinstance(a.exception().__cause__, asyncio.CancelledError)  # type: ignore[union-attr]
            assert await b == "b ran"
            with pytest.raises(af.SemaphoreFailedError) as err:
                await downstream
            assert isinstance(err.value.root_cause, af.CancelledWorkError)
            assert isinstance(done.failure, af.CancelledWorkError)
            assert await q.submit(lambda: "later") == "later"  # the queue is still open

    run_virtual(main)


def test_runtime_cancellation_still_closes_queues() -> None:
    """Leaving the runtime on an error cancels running work: it fails with StalledError."""
    subs: dict[str, af.Submission] = {}

    async def main() -> None:
        async with af.open_runtime([FakeDevice("gpu")]) as rt:
            q = rt.queue("gpu")
            subs["long"] = q.submit(asyncio.sleep, 100, name="long")
            subs["after"] = q.submit(lambda: 1, name="after")
            await asyncio.sleep(1)
            raise KeyError("abort")

    with pytest.raises(KeyError):
        run_virtual(main)
    assert isinstance(subs["long"].exception(), af.StalledError)
    assert "runtime closed before 'long' finished" in str(subs["long"].exception())
    assert isinstance(subs["after"].exception(), af.StalledError)


# -- the stall detector ------------------------------------------------------------------


def test_drain_aborts_only_waits_nothing_left_can_satisfy() -> None:
    """At close, work behind a stalled head still satisfies waits on other queues."""
    subs: dict[str, af.Submission] = {}

    async def main() -> None:
        async with af.open_runtime([FakeDevice("a"), FakeDevice("b")], stall_timeout=0.5) as rt:
            qa, qb = rt.queue("a", name="qa"), rt.queue("b", name="qb")
            orphan, y = af.TimelineSemaphore(name="orphan"), af.TimelineSemaphore(name="y")
            subs["X"] = qa.submit(lambda: "X", waits=[(orphan, 1)], name="X", cost=1)
            subs["Y"] = qa.submit(lambda: "Y", signals=[(y, 1)], name="Y", cost=1)
            subs["Z"] = qb.submit(lambda: "Z", waits=[(y, 1)], name="Z", cost=1)

    run_virtual(main)
    err = subs["X"].exception()
    assert isinstance(err, af.StalledError)
    assert str(err) == (
        "submission 'X' on queue 'qa' waits for semaphore 'orphan' to reach 1 (value 0) "
        "and nothing queued signals it"
    )
    assert subs["Y"].result() == "Y"
    assert subs["Z"].result() == "Z"


def test_drain_follows_a_chain_of_stalls_across_queues() -> None:
    """Aborting one head lets the next run; a wait satisfied by work behind a head survives."""
    subs: dict[str, af.Submission] = {}

    async def main() -> None:
        devices = [FakeDevice("a"), FakeDevice("b"), FakeDevice("c")]
        async with af.open_runtime(devices, stall_timeout=0.5) as rt:
            qa, qb, qc = (rt.queue(n, name=f"q{n}") for n in "abc")
            orphan = af.TimelineSemaphore(name="orphan")
            s1, s2 = af.TimelineSemaphore(name="s1"), af.TimelineSemaphore(name="s2")
            subs["A1"] = qa.submit(waits=[(orphan, 1)], name="A1")
            subs["A2"] = qa.submit(lambda: 1, signals=[(s1, 1)], name="A2")
            subs["B1"] = qb.submit(waits=[(orphan, 2)], name="B1")
            subs["B2"] = qb.submit(lambda: 2, waits=[(s1, 1)], signals=[(s2, 1)], name="B2")
            subs["C1"] = qc.submit(lambda: 3, waits=[(s2, 1)], name="C1")

    run_virtual(main)
    assert isinstance(subs["A1"].exception(), af.StalledError)
    assert isinstance(subs["B1"].exception(), af.StalledError)
    assert [subs[n].result() for n in ("A2", "B2", "C1")] == [1, 2, 3]


def test_drain_fails_a_same_queue_deadlock_and_names_the_signaller() -> None:
    """A head waiting on what only work behind it signals fails at close, naming that work."""
    subs: dict[str, af.Submission] = {}

    async def main() -> None:
        async with af.open_runtime([FakeDevice("gpu")], stall_timeout=0.5) as rt:
            q = rt.queue("gpu", name="q")
            s = af.TimelineSemaphore(name="s")
            subs["last"] = q.submit(lambda: 2, waits=[(s, 1)], name="last")
            subs["first"] = q.submit(lambda: 1, signals=[(s, 1)], name="first")

    run_virtual(main)
    err = subs["last"].exception()
    assert isinstance(err, af.StalledError)
    assert "only 'first', queued behind it on the same queue, signals it" in str(err)
    assert subs["first"].result() == 1


def test_open_runtime_reports_a_stall_without_failing_it() -> None:
    """While open, a stall is logged after stall_timeout naming queue, semaphore and value."""

    async def main() -> None:
        async with af.open_runtime([FakeDevice("gpu")], stall_timeout=2.0) as rt:
            q = rt.queue("gpu", name="decode")
            kv = af.TimelineSemaphore(name="kv")
            sub = q.submit(lambda: "ok", waits=[(kv, 3)], name="step")
            await asyncio.sleep(5)
            assert sub.state is af.SubmissionState.WAITING  # reported, not failed
            kv.signal(3)
            assert await sub == "ok"

    with structlog.testing.capture_logs() as logs:
        run_virtual(main)
    stalls = [e for e in logs if e["event"] == "stall"]
    assert len(stalls) == 1
    assert stalls[0]["log_level"] == "warning"
    assert stalls[0]["waits"] == [
        "queue 'decode': submission 'step' waits for semaphore 'kv' to reach 3 (value 0); "
        "nothing queued signals it"
    ]


def test_no_stall_is_reported_while_work_runs() -> None:
    """A queue blocked behind long-running work on another queue is not a stall."""

    async def main() -> None:
        async with af.open_runtime([FakeDevice("a"), FakeDevice("b")], stall_timeout=1.0) as rt:
            qa, qb = rt.queue("a"), rt.queue("b")
            s = af.TimelineSemaphore(name="s")
            qb.submit(waits=[(s, 1)])
            await qa.submit(lambda: None, signals=[(s, 1)], cost=10)

    with structlog.testing.capture_logs() as logs:
        run_virtual(main)
    assert [e for e in logs if e["event"] == "stall"] == []


def test_collective_step_on_a_stalled_member_still_fails_at_close() -> None:
    """A collective step whose parts wait on an orphan semaphore fails at close, not hangs."""

    async def main() -> af.CollectiveStep:
        async with af.open_runtime([FakeDevice("g0"), FakeDevice("g1")], stall_timeout=0.5) as rt:
            channel = rt.collective([rt.queue("g0"), rt.queue("g1")], name="tp")
            orphan = af.TimelineSemaphore(name="orphan")
            done = af.TimelineSemaphore(name="done")
            step = channel.submit(lambda rank: rank, waits=[(orphan, 1)], signals=[(done, 1)])
            after = rt.queue("g0").submit(lambda: "after", waits=[(done, 1)])
        assert isinstance(after.exception(), af.SemaphoreFailedError | af.StalledError)
        return step

    step = run_virtual(main)
    assert isinstance(step.exception(), af.StalledError)


# -- waits on several semaphores ---------------------------------------------------------


def test_wait_all_fails_when_a_later_semaphore_fails_first() -> None:
    """wait_all raises as soon as any semaphore fails, while an earlier one is still pending."""

    async def main() -> None:
        a, b = af.TimelineSemaphore(name="a"), af.TimelineSemaphore(name="b")
        boom = ValueError("b broke")
        loop = asyncio.get_running_loop()
        loop.call_later(1, b.fail, boom)
        with pytest.raises(af.SemaphoreFailedError, match="'b' failed") as err:
            await asyncio.wait_for(af.wait_all([(a, 1), (b, 1)]), 10)
        assert err.value.__cause__ is boom
        assert loop.time() == pytest.approx(1)
        assert a.statistics().waiters == 0 and b.statistics().waiters == 0

    run_virtual(main)


def test_wait_all_with_an_already_failed_semaphore_raises_at_once() -> None:
    """A failed semaphore anywhere in wait_all's list fails it without waiting."""

    async def main() -> None:
        a, b = af.TimelineSemaphore(name="a"), af.TimelineSemaphore(name="b")
        b.fail(KeyError("gone"))
        with pytest.raises(af.SemaphoreFailedError, match="'b' failed"):
            await af.wait_all([(a, 1), (b, 1)])
        assert a.statistics().waiters == 0

    run_virtual(main)


def test_wait_all_merges_frontiers_and_cancellation_leaves_no_waiter() -> None:
    """wait_all returns the merged frontier; a cancelled wait_all withdraws every waiter."""

    async def main() -> None:
        a, b = af.TimelineSemaphore(name="a"), af.TimelineSemaphore(name="b")
        loop = asyncio.get_running_loop()
        loop.call_later(1, b.signal, 1, af.Frontier({7: 2}))
        loop.call_later(2, a.signal, 1, af.Frontier({5: 1}))
        assert await af.wait_all([(a, 1), (b, 1)]) == af.Frontier({5: 1, 7: 2})
        task = asyncio.ensure_future(af.wait_all([(a, 2), (b, 2)]))
        await asyncio.sleep(1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert a.statistics().waiters == 0 and b.statistics().waiters == 0

    run_virtual(main)


def test_wait_any_still_returns_the_first_satisfied() -> None:
    """wait_any returns the index of the first semaphore to reach its value."""

    async def main() -> None:
        a, b = af.TimelineSemaphore(name="a"), af.TimelineSemaphore(name="b")
        asyncio.get_running_loop().call_later(1, b.signal, 1)
        assert (await af.wait_any([(a, 1), (b, 1)]))[0] == 1
        assert a.statistics().waiters == 0

    run_virtual(main)


def test_submission_with_several_waits_fails_when_a_later_wait_fails() -> None:
    """A submission fails as soon as any wait fails, even while an earlier one is pending."""

    async def main() -> None:
        async with af.open_runtime([FakeDevice("gpu"), FakeDevice("npu")]) as rt:
            q, other = rt.queue("gpu", name="q"), rt.queue("npu")
            a, b = af.TimelineSemaphore(name="a"), af.TimelineSemaphore(name="b")
            out = af.TimelineSemaphore(name="out")
            boom = RuntimeError("b's producer broke")
            loop = asyncio.get_running_loop()
            loop.call_later(1, b.fail, boom)
            sub = q.submit(lambda: 1, waits=[(a, 1), (b, 1)], signals=[(out, 1)], name="two")
            down = other.submit(waits=[(out, 1)])
            with pytest.raises(af.SemaphoreFailedError, match="'b' failed"):
                await sub
            assert loop.time() == pytest.approx(1)
            with pytest.raises(af.SemaphoreFailedError) as err:
                await down
            assert err.value.root_cause is boom
            assert a.statistics().waiters == 0
            a.signal(1)
            assert await q.submit(lambda: "next", waits=[(a, 1)]) == "next"

    run_virtual(main)


def test_stalled_wait_of_a_multi_wait_reaches_its_signals() -> None:
    """At close, a stalled later wait fails the submission and its signals at once."""
    subs: dict[str, af.Submission] = {}

    async def main() -> None:
        async with af.open_runtime([FakeDevice("a"), FakeDevice("b")], stall_timeout=0.5) as rt:
            qa, qb = rt.queue("a", name="qa"), rt.queue("b", name="qb")
            a, orphan = af.TimelineSemaphore(name="a"), af.TimelineSemaphore(name="orphan")
            out = af.TimelineSemaphore(name="out")
            subs["two"] = qa.submit(waits=[(a, 1), (orphan, 1)], signals=[(out, 1)], name="two")
            subs["down"] = qb.submit(waits=[(out, 1)], name="down")
            subs["late"] = qb.submit(lambda: "late", signals=[(a, 1)], name="late", cost=5)

    run_virtual(main)
    err = subs["two"].exception()
    assert isinstance(err, af.StalledError) and "'orphan'" in str(err)
    down = subs["down"].exception()
    assert isinstance(down, af.SemaphoreFailedError)
    assert isinstance(down.root_cause, af.StalledError)
    assert subs["late"].result() == "late"


# -- options and values refused ----------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"frontier_capacity": 0}, "frontier_capacity must be an int >= 1, got 0"),
        ({"frontier_capacity": 2.5}, "frontier_capacity must be an int >= 1, got 2.5"),
        ({"trace_capacity": -1}, "trace_capacity must be an int >= 0, got -1"),
        ({"stall_timeout": -1.0}, r"stall_timeout must be a finite number of seconds > 0, got -1"),
        ({"stall_timeout": math.nan}, "stall_timeout must be .* got nan"),
        ({"stall_timeout": math.inf}, "stall_timeout must be .* got inf"),
        ({"stall_timeout": 0}, "stall_timeout must be .* got 0"),
        ({"node": 256}, r"node must be an int in 0..255, got 256"),
    ],
)
def test_open_runtime_refuses_bad_options(options: dict[str, Any], message: str) -> None:
    """open_runtime refuses out-of-range options at open with a ValueError naming them."""
    device = FakeDevice("gpu")

    async def main() -> None:
        async with af.open_runtime([device], **options):
            pytest.fail("opened")

    with pytest.raises(ValueError, match=message):
        run_virtual(main)
    assert device.index == -1  # nothing was changed


def test_runtime_refuses_a_non_device_and_changes_no_device() -> None:
    """A bad devices list is refused before any device is touched."""
    gpu = FakeDevice("gpu")
    with pytest.raises(TypeError, match="devices must be Device instances, got 'cpu'"):
        af.Runtime([gpu, "cpu"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="two devices are named 'gpu'"):
        af.Runtime([gpu, FakeDevice("gpu")])
    assert gpu.index == -1


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        ("3", TypeError, r"signal value must be an int, got '3' \(str\)"),
        (1.5, TypeError, r"signal value must be an int, got 1.5 \(float\)"),
        (2**64, ValueError, r"must be at most 2\*\*64 - 1 \(the counter is 64-bit\)"),
    ],
)
def test_signal_refuses_values_that_are_not_64_bit_ints(
    value: object, error: type[Exception], message: str
) -> None:
    """signal() wants an int in 0..2**64-1 and changes nothing otherwise."""
    sem = af.TimelineSemaphore(name="s")
    with pytest.raises(error, match=message):
        sem.signal(value)  # type: ignore[arg-type]
    assert sem.value == 0
    sem.signal(2**64 - 1)
    assert sem.value == 2**64 - 1


def test_signal_accepts_a_mapping_frontier_and_refuses_other_things() -> None:
    """signal(v, frontier={...}) converts a mapping; anything else is a TypeError saying what."""
    sem = af.TimelineSemaphore(name="s")
    sem.signal(1, frontier={3: 2})
    assert sem.frontier == af.Frontier({3: 2})
    with pytest.raises(TypeError, match="frontier must be a Frontier or a mapping of axis"):
        sem.signal(2, frontier=[(3, 4)])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="frontier must be a Frontier or a mapping"):
        sem.signal(2, frontier={"x": 1})  # type: ignore[dict-item]
    assert sem.value == 1 and sem.frontier == af.Frontier({3: 2})


def test_values_above_64_bits_are_refused_everywhere() -> None:
    """initial, wait, wait_all and submit's waits and signals refuse values above 2**64-1."""
    with pytest.raises(ValueError, match="initial value must be at most 2"):
        af.TimelineSemaphore(2**64)
    with pytest.raises(TypeError, match="initial value must be an int"):
        af.TimelineSemaphore("1")  # type: ignore[arg-type]
    sem = af.TimelineSemaphore(name="s")

    async def main() -> None:
        with pytest.raises(ValueError, match="wait value must be at most 2"):
            await sem.wait(2**64)
        with pytest.raises(ValueError, match="wait_all: value for semaphore 's' must be at most"):
            await af.wait_all([(sem, 2**64)])
        async with af.open_runtime([FakeDevice("gpu")]) as rt:
            q = rt.queue("gpu", name="q")
            with pytest.raises(ValueError, match="signals value for semaphore 's' must be at most"):
                q.submit(signals=[(sem, 2**64)])
            with pytest.raises(ValueError, match="waits value for semaphore 's' must be at most"):
                q.submit(waits=[(sem, 2**64)])
            assert q.submitted_epoch == 0

    run_virtual(main)
    assert sem.statistics().waiters == 0


def test_frontier_refuses_axes_that_are_not_unsigned_64_bit() -> None:
    """Frontier entries: axes and epochs are unsigned 64-bit integers."""
    with pytest.raises(ValueError, match="axis must be an unsigned 64-bit integer, got -5"):
        af.Frontier({-5: 1})
    with pytest.raises(ValueError, match="unsigned 64-bit integer, got 18446744073709551616"):
        af.Frontier({2**64: 1})
    with pytest.raises(ValueError, match=r"must be at most 2\*\*64 - 1"):
        af.Frontier({1: 2**64})
    assert af.Frontier({2**64 - 1: 1}).get(2**64 - 1) == 1


def test_submit_refuses_work_that_is_not_callable() -> None:
    """submit('not callable') is a TypeError at submit, and nothing is queued."""

    async def main() -> None:
        async with af.open_runtime([FakeDevice("gpu")]) as rt:
            q = rt.queue("gpu", name="q")
            with pytest.raises(TypeError, match=r"'q': work must be callable .*'not callable'"):
                q.submit("not callable")  # type: ignore[arg-type]
            assert q.submitted_epoch == 0 and q.statistics().pending == 0

    run_virtual(main)


# -- same-queue deadlocks ----------------------------------------------------------------


def test_submit_warns_when_a_signal_feeds_an_earlier_wait_on_the_same_queue() -> None:
    """A later submission signalling what an earlier pending one on its queue waits for warns."""

    async def main() -> None:
        async with af.open_runtime([FakeDevice("gpu")]) as rt:
            q = rt.queue("gpu", name="q")
            s = af.TimelineSemaphore(name="s")
            last = q.submit(waits=[(s, 1)], name="last")
            q.submit(signals=[(s, 1)], name="first")
            s.signal(2)  # from elsewhere: the queue does not hang
            await last

    with structlog.testing.capture_logs() as logs:
        run_virtual(main)
    warned = [e for e in logs if e["event"] == "same_queue_wait"]
    assert len(warned) == 1
    assert warned[0]["log_level"] == "warning"
    assert (warned[0]["queue"], warned[0]["submission"], warned[0]["earlier"]) == (
        "q",
        "first",
        "last",
    )
    assert (warned[0]["semaphore"], warned[0]["value"]) == ("s", 1)


def test_no_same_queue_warning_for_a_pipeline_in_order() -> None:
    """Producer before consumer on one queue, or waits already met, do not warn."""

    async def main() -> None:
        async with af.open_runtime([FakeDevice("gpu")]) as rt:
            q = rt.queue("gpu")
            s = af.TimelineSemaphore(name="s")
            q.submit(signals=[(s, 1)])
            q.submit(waits=[(s, 1)], signals=[(s, 2)])
            done = q.submit(waits=[(s, 2)])
            await done
            q.submit(waits=[(s, 2)])
            q.submit(signals=[(s, 3)])
            chain = af.TimelineSemaphore(name="chain")
            q.submit(signals=[(chain, 1)])
            for i in range(1, 20):  # each waits on the one ahead of it and signals the next
                last = q.submit(waits=[(chain, i)], signals=[(chain, i + 1)])
            await last
            assert q._unmet == {} and q._signalled == {}

    with structlog.testing.capture_logs() as logs:
        run_virtual(main)
    assert [e for e in logs if e["event"] == "same_queue_wait"] == []


def test_a_wait_that_work_ahead_signals_is_no_same_queue_wait() -> None:
    """A later signal below a multi-wait's unmet value warns of nothing the queue meets itself."""

    async def main() -> None:
        async with af.open_runtime([FakeDevice("gpu")]) as rt:
            q = rt.queue("gpu")
            s = af.TimelineSemaphore(name="s")
            q.submit(lambda: None, signals=[(s, 3)], name="A")
            q.submit(waits=[(s, 3), (s, 10)], name="B")  # A meets 3; only 10 is unmet
            q.submit(signals=[(s, 5)], name="C")  # 5 cannot meet B's 10: no warning
            s.signal(10)
            await q.submit()

    with structlog.testing.capture_logs() as logs:
        run_virtual(main)
    assert [e for e in logs if e["event"] == "same_queue_wait"] == []


def test_open_stall_report_names_both_sides_of_a_same_queue_deadlock() -> None:
    """While open, the stall report names the stalled head and the later work it needs."""

    async def main() -> None:
        async with af.open_runtime([FakeDevice("gpu")], stall_timeout=1.0) as rt:
            q = rt.queue("gpu", name="q")
            s = af.TimelineSemaphore(name="s")
            subs["last"] = q.submit(waits=[(s, 1)], name="last")
            subs["first"] = q.submit(signals=[(s, 1)], name="first")
            await asyncio.sleep(3)
            assert subs["last"].state is af.SubmissionState.WAITING

    subs: dict[str, af.Submission] = {}
    with structlog.testing.capture_logs() as logs:
        run_virtual(main)
    assert isinstance(subs["last"].exception(), af.StalledError)  # at close
    assert subs["first"].exception() is None
    stalls = [e for e in logs if e["event"] == "stall"]
    assert [e["waits"] for e in stalls] == [
        [
            "queue 'q': submission 'last' waits for semaphore 's' to reach 1 (value 0); "
            "only 'first', queued behind it on the same queue, signals it"
        ]
    ]


def test_run_virtual_idle_error_names_the_stalled_queues() -> None:
    """Under run_virtual a hang raises an IdleTimeoutError naming queue, semaphore and value."""

    async def main() -> None:
        async with af.open_runtime([FakeDevice("gpu")], stall_timeout=100.0) as rt:
            q = rt.queue("gpu", name="q")
            s = af.TimelineSemaphore(name="s")
            last = q.submit(lambda: 2, waits=[(s, 1)], name="last")
            q.submit(lambda: 1, signals=[(s, 1)], name="first")
            await last

    with pytest.raises(VirtualStallError) as err:
        run_virtual(main, idle_timeout=0.2)
    assert isinstance(err.value, looptime.IdleTimeoutError)
    assert err.value.stalls == (
        "queue 'q': submission 'last' waits for semaphore 's' to reach 1 (value 0); "
        "only 'first', queued behind it on the same queue, signals it",
    )


def test_run_virtual_idle_error_without_a_runtime_stays_looptimes() -> None:
    """A hang with no stalled queue raises looptime's own IdleTimeoutError."""

    async def main() -> None:
        await asyncio.get_running_loop().create_future()

    with pytest.raises(looptime.IdleTimeoutError) as err:
        run_virtual(main, idle_timeout=0.2)
    assert not isinstance(err.value, VirtualStallError)
