"""Arbitration policies: pure decisions, and what devices run next under each of them."""

from __future__ import annotations

import asyncio
import math

import pytest

import asyncfront as af
from asyncfront._policy import critical_paths
from asyncfront.testing import FakeDevice, run_virtual


def work(seq: int, **kw: object) -> af.ReadyWork:
    """A ready-work record with defaults for the fields a test does not care about."""
    fields: dict[str, object] = {"name": f"w{seq}", "priority": 0, "sequence": seq, "ready_at": 0.0}
    fields.update(kw)
    return af.ReadyWork(**fields)  # type: ignore[arg-type]


# -- the decisions, without a loop ---------------------------------------------------


def test_priority_policy_chooses_first_come() -> None:
    """PriorityPolicy picks the work that became ready first, whatever its deadline."""
    ready = [work(3, deadline_at=1.0), work(1, deadline_at=9.0), work(2)]
    assert af.PriorityPolicy().choose(ready, now=0.0) == 1


def test_edf_chooses_earliest_deadline_and_ages_work_without_one() -> None:
    """EDF picks the earliest deadline; work without one wins once it waited max_wait."""
    policy = af.EDFPolicy(max_wait=10.0)
    ready = [work(1), work(2, deadline_at=8.0), work(3, deadline_at=5.0)]
    assert policy.choose(ready, now=0.0) == 2
    # the deadline-less work became ready at 0: its key is 10, earlier than a deadline of 12
    later = [work(1), work(2, deadline_at=12.0, ready_at=3.0)]
    assert policy.choose(later, now=4.0) == 0


def test_edf_ties_go_to_the_earliest_ready() -> None:
    """Equal keys are served first come, first served."""
    ready = [work(5, deadline_at=3.0), work(4, deadline_at=3.0), work(6, deadline_at=3.0)]
    assert af.EDFPolicy().choose(ready, now=0.0) == 1


def test_slo_chooses_least_slack_not_earliest_deadline() -> None:
    """SLO picks the smallest deadline - remaining: a long path left beats an earlier deadline."""
    policy = af.SLOPolicy()
    short_path = work(1, deadline_at=10.0, remaining=1.0)  # latest start 9
    long_path = work(2, deadline_at=12.0, remaining=8.0)  # latest start 4
    assert af.EDFPolicy().choose([short_path, long_path], now=0.0) == 0
    assert policy.choose([short_path, long_path], now=0.0) == 1
    assert policy.slack(long_path, now=1.0) == 3.0
    assert policy.slack(work(3), now=1.0) is None


def test_slo_serves_work_that_can_still_make_it_before_hopeless_work() -> None:
    """Work whose slack is negative yields to feasible work, even with an earlier deadline."""
    policy = af.SLOPolicy(max_wait=100.0)
    hopeless = work(1, deadline_at=5.0, remaining=4.0, ready_at=0.0)  # latest start 1 < now
    feasible = work(2, deadline_at=30.0, remaining=4.0, ready_at=2.0)
    assert policy.choose([hopeless, feasible], now=2.0) == 1
    assert af.EDFPolicy(max_wait=100.0).choose([hopeless, feasible], now=2.0) == 0


def test_slo_hopeless_work_runs_once_it_waited_max_wait() -> None:
    """Aging: after max_wait, hopeless work goes before younger feasible work."""
    policy = af.SLOPolicy(max_wait=10.0)
    hopeless = work(1, deadline_at=5.0, remaining=4.0, ready_at=0.0)
    fresh = work(2, deadline_at=60.0, remaining=4.0, ready_at=11.0)
    assert policy.choose([hopeless, fresh], now=11.0) == 0


@pytest.mark.parametrize("policy", [af.PriorityPolicy(), af.EDFPolicy(), af.SLOPolicy()])
def test_a_policy_refuses_an_empty_ready_set(policy: af.Policy) -> None:
    """choose() on no work is a clear error."""
    with pytest.raises(ValueError, match="got none"):
        policy.choose([], now=0.0)


@pytest.mark.parametrize("bad", [0, -1.0, math.nan, True, "5"])
def test_max_wait_must_be_positive(bad: object) -> None:
    """A max_wait that is not a number > 0 is refused with its value named."""
    with pytest.raises(ValueError, match="max_wait must be"):
        af.EDFPolicy(max_wait=bad)  # type: ignore[arg-type]


def test_slo_predictor_must_be_callable() -> None:
    """SLOPolicy refuses a predictor that is not callable."""
    with pytest.raises(TypeError, match="predictor must be callable"):
        af.SLOPolicy(predictor=3.0)  # type: ignore[arg-type]


def test_critical_paths_take_the_longest_branch() -> None:
    """The remaining path of a stage is its estimate plus its longest chain of dependants."""
    estimates = {"a": 1.0, "b": 2.0, "c": 5.0, "d": 1.0}
    dependants = {"a": ["b", "c"], "b": ["d"], "c": ["d"]}
    paths = critical_paths(estimates, dependants, ["a", "b", "c", "d"])
    assert paths == {"a": 7.0, "b": 3.0, "c": 6.0, "d": 1.0}


def test_slo_statistics_attainment() -> None:
    """Attainment is met over finished runs, and 1.0 before any run finished."""
    assert af.SLOStatistics("w", runs=4, met=3, missed=1).attainment == 0.75
    assert af.SLOStatistics("w", runs=0, met=0, missed=0).attainment == 1.0


# -- devices under a policy, in virtual time -------------------------------------------


def run_order(policy: af.Policy | None, deadlines: list[float]) -> list[str]:
    """Names in the order one busy device starts work queued with ``deadlines``."""

    async def main() -> list[str]:
        started: list[str] = []
        async with af.open_runtime([FakeDevice("gpu")], policy=policy) as rt:
            rt.queue("gpu").submit(cost=1.0, name="blocker")
            subs = []
            for deadline in deadlines:
                q = rt.queue("gpu")
                subs.append(q.submit(cost=1.0, name=f"d{deadline:g}", deadline=deadline))
                assert subs[-1].deadline_at == deadline
            for sub in subs:
                await sub
            started = [s.name for s in sorted(subs, key=lambda s: s.started_at or 0.0)]
        return started

    return run_virtual(main)


def test_default_policy_keeps_first_come_first_served() -> None:
    """With no policy given, ready work of one priority runs in the order it got ready."""
    assert run_order(None, [30.0, 10.0, 20.0]) == ["d30", "d10", "d20"]


def test_edf_device_runs_earliest_deadline_first() -> None:
    """An EDF device runs its queues' ready heads by deadline."""
    assert run_order(af.EDFPolicy(), [30.0, 10.0, 20.0]) == ["d10", "d20", "d30"]


def test_a_policy_reorders_only_within_a_priority() -> None:
    """A higher-priority queue still goes first, whatever the lower one's deadline."""

    async def main() -> list[str]:
        async with af.open_runtime([FakeDevice("gpu")], policy=af.EDFPolicy()) as rt:
            rt.queue("gpu").submit(cost=1.0, name="blocker")
            low = rt.queue("gpu", priority=0).submit(cost=1.0, name="low", deadline=1.0)
            high = rt.queue("gpu", priority=5).submit(cost=1.0, name="high", deadline=50.0)
            mid = rt.queue("gpu", priority=5).submit(cost=1.0, name="mid", deadline=20.0)
            await low
            subs = [low, high, mid]
            return [s.name for s in sorted(subs, key=lambda s: s.started_at or 0.0)]

    assert run_virtual(main) == ["mid", "high", "low"]


def test_graph_deadline_flows_to_stages_without_their_own() -> None:
    """A run's deadline becomes every stage's deadline_at unless the stage sets its own."""

    async def main() -> None:
        async with af.open_runtime([FakeDevice("gpu")]) as rt:
            g = rt.graph("g", deadline=10.0)
            g.stage("a", device="gpu", cost=1.0)
            g.stage("b", device="gpu", cost=1.0, after="a", deadline=4.0)
            run = await g.submit()
            assert run.deadline_at == 10.0
            assert run["a"].deadline_at == 10.0 and run["b"].deadline_at == 4.0
            await run.wait()
            assert run.met_deadline is True
            late = await g.submit(deadline_at=rt.now() + 0.5)
            assert late["a"].deadline_at == rt.now() + 0.5
            await late.wait()
            assert late.met_deadline is False
            plain = await rt.graph("plain").submit()
            assert plain.deadline_at is None and plain.met_deadline is None
            assert rt.slo_statistics() == {"g": af.SLOStatistics("g", runs=2, met=1, missed=1)}

    run_virtual(main)


def test_a_stage_bound_when_ready_carries_its_runs_deadline() -> None:
    """A bind='ready' stage hands its run's deadline and plan to the submission it becomes."""

    async def main() -> None:
        async with af.open_runtime(
            [FakeDevice("gpu0"), FakeDevice("gpu1")], policy=af.EDFPolicy()
        ) as rt:
            g = rt.graph("g", deadline=10.0)
            g.stage("a", cost=1.0, bind="ready")
            g.stage("b", cost=1.0, after="a", bind="ready")
            run = await g.submit()
            await run.wait()
            for stage in ("a", "b"):
                binding = run[stage]
                assert isinstance(binding, af.StageBinding)
                assert binding.submission is not None
                assert binding.submission.deadline_at == 10.0
            assert run.met_deadline is True
            assert rt.slo_statistics() == {"g": af.SLOStatistics("g", runs=1, met=1, missed=0)}

    run_virtual(main)


def test_failed_stage_misses_the_slo() -> None:
    """A run with a failed stage counts as missed, however early it ended."""

    async def main() -> None:
        async with af.open_runtime([FakeDevice("gpu")]) as rt:
            g = rt.graph("g", deadline=10.0)
            g.stage("a", lambda: 1 / 0, device="gpu", cost=1.0)
            run = await g.submit()
            await run.wait()
            assert run.met_deadline is False
            assert rt.slo_statistics()["g"].missed == 1

    run_virtual(main)


def test_slo_device_starts_the_stage_with_less_slack() -> None:
    """Under SLOPolicy a long workflow's first stage beats a short one's earlier deadline."""

    async def main() -> list[str]:
        async with af.open_runtime([FakeDevice("gpu")], policy=af.SLOPolicy()) as rt:
            rt.queue("gpu").submit(cost=1.0, name="blocker")
            short = rt.graph("short")
            short.stage("s0", device=rt.queue("gpu"), cost=1.0)
            long = rt.graph("long")
            long.stage("l0", device=rt.queue("gpu"), cost=1.0)
            long.stage("l1", device=rt.queue("gpu"), cost=6.0, after="l0")
            a = await short.submit(deadline=8.0)  # latest start 7
            b = await long.submit(deadline=10.0)  # latest start 3
            await a.wait()
            await b.wait()
            assert a.met_deadline and b.met_deadline
            return [h.name for h in sorted((a["s0"], b["l0"]), key=lambda s: s.started_at or 0)]

    assert run_virtual(main) == ["l0", "s0"]


def test_history_replaces_a_missing_cost_in_estimates() -> None:
    """A stage without cost= is estimated from its measured run time in earlier runs."""

    async def main() -> None:
        async with af.open_runtime([FakeDevice("gpu")]) as rt:

            async def work() -> None:
                await asyncio.sleep(2.0)

            g = rt.graph("g")
            g.stage("a", work, device="gpu")
            assert g.estimate("a", rt.device("gpu")) == 0.0
            await (await g.submit()).wait()
            assert g.estimate("a", rt.device("gpu")) == 2.0
            rt.device("gpu").policy = af.SLOPolicy(predictor=lambda stage: 7.0)
            assert g.estimate("a", rt.device("gpu")) == 7.0
            rt.device("gpu").policy = None

    run_virtual(main)


def test_open_runtime_policy_applies_to_devices_without_one_and_is_restored() -> None:
    """policy= sets devices that have none of their own, and closing restores their default."""
    own = af.SLOPolicy()
    a, b = FakeDevice("a"), FakeDevice("b")
    b.policy = own
    edf = af.EDFPolicy()

    async def main() -> None:
        async with af.open_runtime([a, b], policy=edf):
            assert a.policy is edf and b.policy is own

    run_virtual(main)
    assert isinstance(a.policy, af.PriorityPolicy) and b.policy is own


def test_bad_policies_are_refused() -> None:
    """A policy that is not a Policy is refused by open_runtime and by a device."""
    device = FakeDevice("gpu")
    with pytest.raises(TypeError, match=r"must be an asyncfront\.Policy"):
        device.policy = "edf"  # type: ignore[assignment]
    assert isinstance(device.policy, af.PriorityPolicy)

    async def main() -> None:
        async with af.open_runtime([device], policy="edf"):  # type: ignore[arg-type]
            pass

    with pytest.raises(TypeError, match=r"policy must be an asyncfront\.Policy"):
        run_virtual(main)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"deadline": -1.0}, "deadline must be >= 0"),
        ({"deadline": math.inf}, "finite number"),
        ({"deadline_at": "soon"}, "finite number"),
        ({"deadline": 1.0, "deadline_at": 2.0}, "not both"),
    ],
)
def test_bad_deadlines_are_refused_and_change_nothing(kw: dict[str, object], match: str) -> None:
    """A bad deadline raises ValueError naming it, and the queue's epoch does not move."""

    async def main() -> None:
        async with af.open_runtime([FakeDevice("gpu")]) as rt:
            q = rt.queue("gpu")
            with pytest.raises(ValueError, match=match):
                q.submit(cost=1.0, **kw)  # type: ignore[arg-type]
            assert q.submitted_epoch == 0
            g = rt.graph("g")
            g.stage("a", device="gpu")
            with pytest.raises(ValueError, match=match):
                await g.submit(**kw)  # type: ignore[arg-type]
            assert q.submitted_epoch == 0 and rt.default_queue("gpu").submitted_epoch == 0

    run_virtual(main)


def test_a_failing_policy_falls_back_to_first_come_and_nothing_hangs() -> None:
    """A policy whose choose raises gives the slot to the oldest ready work and says why."""

    class Broken(af.Policy):
        def choose(self, ready: object, now: float) -> int:  # type: ignore[override]
            raise RuntimeError("boom")

    async def main() -> None:
        device = FakeDevice("gpu")
        async with af.open_runtime([device], policy=Broken()) as rt:
            rt.queue("gpu").submit(cost=1.0)
            first = rt.queue("gpu").submit(cost=1.0, name="first")
            second = rt.queue("gpu").submit(cost=1.0, name="second")
            await second
            assert first.started_at == 1.0 and second.started_at == 2.0
            error = device.policy_error
            assert error is not None and "boom" in error

    run_virtual(main)


def test_ready_work_holds_values_not_submissions() -> None:
    """What a policy sees of waiting work is plain data: no reference to the submission."""

    async def main() -> None:
        device = FakeDevice("gpu")
        async with af.open_runtime([device], policy=af.EDFPolicy()) as rt:
            rt.queue("gpu").submit(cost=1.0)
            rt.queue("gpu").submit(cost=2.0, name="x", deadline=5.0)
            await asyncio.sleep(0.5)
            (seen,) = device._arbiter.ready_work()
            assert (seen.name, seen.deadline_at, seen.remaining) == ("x", 5.0, 2.0)
            assert all(not isinstance(v, af.Submission) for v in vars_of(seen))

    run_virtual(main)


def vars_of(record: af.ReadyWork) -> list[object]:
    """The field values of a ready-work record."""
    return [getattr(record, f) for f in record.__slots__]


def test_a_stage_refuses_deadline_at() -> None:
    """deadline_at= on a stage is refused (it is a run's), naming where it belongs."""

    async def main() -> None:
        async with af.open_runtime([FakeDevice("gpu")]) as rt:
            g = rt.graph("g")
            with pytest.raises(TypeError, match=r"graph\.submit\(deadline_at="):
                g.stage("a", print, device="gpu", deadline_at=3.0)
            assert len(g) == 0

    run_virtual(main)


@pytest.mark.parametrize(("max_wait", "starts_at"), [(3.0, 4.0), (math.inf, 11.0)])
def test_aging_lets_work_without_a_deadline_pass_a_stream_of_deadlines(
    max_wait: float, starts_at: float
) -> None:
    """Under EDF, work without a deadline runs once its aging key (ready + max_wait) is earliest."""

    async def main() -> float | None:
        async with af.open_runtime(
            [FakeDevice("gpu")], policy=af.EDFPolicy(max_wait=max_wait)
        ) as rt:
            rt.queue("gpu").submit(cost=1.0, name="blocker")
            stream = rt.queue("gpu")
            for i in range(10):
                stream.submit(cost=1.0, name=f"s{i}", deadline_at=0.5 + i)
            plain = rt.queue("gpu").submit(cost=1.0, name="plain")
            await plain
            return plain.started_at

    assert run_virtual(main) == starts_at


def test_a_cancelled_request_leaves_no_stale_entry() -> None:
    """A slot request cancelled while waiting is withdrawn: it keeps no free slot from others."""

    async def main() -> None:
        device = FakeDevice("gpu")
        async with af.open_runtime([device], policy=af.EDFPolicy()) as rt:
            holder = rt.queue("gpu").submit(cost=1.0)
            await asyncio.sleep(0.1)
            waiter = asyncio.ensure_future(device.acquire(0, holder))
            await asyncio.sleep(0.1)
            assert device.statistics().waiting_queues == 1
            waiter.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiter
            assert device._arbiter.ready_work() == () and device.statistics().waiting_queues == 0
            await holder
            assert device._arbiter.try_acquire()  # nothing stale blocks the free slot
            device.release()

    run_virtual(main)


def test_highest_waiting_sees_requests_queued_under_a_policy() -> None:
    """A worker asking for the highest waiting priority sees a non-default policy's requests."""

    async def main() -> None:
        from asyncfront.devices._base import SlotArbiter

        loop = asyncio.get_running_loop()
        arbiter = SlotArbiter(1, policy=af.EDFPolicy())
        assert arbiter.try_acquire()
        assert arbiter.highest_waiting() is None
        low, high = loop.create_future(), loop.create_future()
        arbiter.enqueue_work(work(1, priority=1), low)
        arbiter.enqueue_work(work(2, priority=5), high)
        assert arbiter.highest_waiting() == 5
        high.cancel()
        assert arbiter.highest_waiting() == 1

    asyncio.run(main())
