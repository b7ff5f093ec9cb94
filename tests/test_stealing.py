"""Work stealing: stages bound to a device when ready, victims chosen by topology."""

from __future__ import annotations

import asyncio

import pytest

import asyncfront as af
from asyncfront.devices.fake import FakeDeviceError
from asyncfront.testing import FakeDevice, run_virtual

GPUS = [f"gpu{i}" for i in range(4)]


def gpus() -> list[FakeDevice]:
    return [FakeDevice(name) for name in GPUS]


async def one_second() -> str:
    await asyncio.sleep(1.0)
    return "done"


def offer(name: str, seconds: float, candidates: tuple[str, ...] = tuple(GPUS)) -> af.StealOffer:
    return af.StealOffer(name, frozenset(candidates), seconds)


# -- the pure parts ---------------------------------------------------------------------


def test_topology_ring_and_grid_neighbours_and_hops() -> None:
    """A ring links each device to the next; a grid to its four neighbours; hops by BFS."""
    ring = af.Topology.ring(GPUS)
    assert set(ring.neighbours("gpu0")) == {"gpu1", "gpu3"}
    assert ring.hops("gpu0", "gpu2") == 2 and ring.hops("gpu1", "gpu1") == 0
    grid = af.Topology.grid([f"s{i}" for i in range(9)], 3)
    assert set(grid.neighbours("s4")) == {"s1", "s3", "s5", "s7"}
    assert set(grid.neighbours("s0")) == {"s1", "s3"}
    assert grid.hops("s0", "s8") == 4
    torus = af.Topology.grid([f"s{i}" for i in range(9)], 3, wrap=True)
    assert set(torus.neighbours("s0")) == {"s1", "s2", "s3", "s6"}
    assert torus.hops("s0", "s8") == 2
    assert af.Topology([("a", "b")]).hops("a", "c") == float("inf")


def test_topology_refuses_bad_links() -> None:
    """A self-link, a negative hop cost or a grid that does not divide raise ValueError."""
    with pytest.raises(ValueError, match="itself"):
        af.Topology([("a", "a")])
    with pytest.raises(ValueError, match="hop_seconds"):
        af.Topology([("a", "b")], hop_seconds=-1)
    with pytest.raises(ValueError, match="cannot be 4 columns"):
        af.Topology.grid(GPUS[:3], 4)


def test_choose_victim_no_stealing_takes_nothing() -> None:
    """Stealing.NONE never names a victim."""
    backlogs = {"gpu0": [offer("a", 1.0)]}
    assert af.choose_victim("gpu1", backlogs, None, af.Stealing.NONE) is None


def test_choose_victim_neighbours_only_steals_from_neighbours() -> None:
    """Neighbour-only stealing ignores a busier device two hops away."""
    line = af.Topology([("gpu0", "gpu1"), ("gpu1", "gpu2"), ("gpu2", "gpu3")])
    backlogs = {"gpu3": [offer("far", 9.0)], "gpu1": [offer("near", 1.0)]}
    assert af.choose_victim("gpu0", backlogs, line, af.Stealing.NEIGHBOURS) == ("gpu1", 0)
    assert (
        af.choose_victim("gpu0", {"gpu3": backlogs["gpu3"]}, line, af.Stealing.NEIGHBOURS) is None
    )
    # global stealing takes the busiest, however far
    assert af.choose_victim("gpu0", backlogs, line, af.Stealing.GLOBAL) == ("gpu3", 0)


def test_choose_victim_takes_the_newest_stage_it_may_run() -> None:
    """The thief takes the newest offer whose candidates include it; ties go to fewer hops."""
    ring = af.Topology.ring(GPUS)
    backlogs = {
        "gpu1": [offer("old", 1.0), offer("new", 1.0), offer("pinned", 5.0, ("gpu1",))],
        "gpu2": [offer("x", 1.0), offer("y", 1.0)],
    }
    # gpu1 offers gpu0 two seconds (the pinned one is not for it), gpu2 too: one hop wins
    assert af.choose_victim("gpu0", backlogs, ring, af.Stealing.GLOBAL) == ("gpu1", 1)
    assert af.choose_victim("gpu3", backlogs, ring, af.Stealing.GLOBAL) == ("gpu2", 1)


# -- binding at ready time --------------------------------------------------------------


def test_unbound_stage_is_queued_only_when_ready_and_its_frontier_names_the_device() -> None:
    """The stage gets its queue and epoch when its waits are met; its frontier names where."""

    async def main() -> None:
        async with af.open_runtime(gpus()) as rt:
            g = rt.graph("job")
            first = g.stage("first", None, device="gpu0", cost=2.0)
            g.stage("later", None, after=first, cost=1.0, bind="ready")
            run = await g.submit()
            later = run["later"]
            assert isinstance(later, af.StageBinding)
            assert later.submission is None and later.state is af.SubmissionState.PENDING
            assert later.home in GPUS and later.frontier is None
            await run.wait()
            assert later.submission is not None and later.device is not None
            assert later.bound_at == 2.0 and later.ready_at == 2.0
            queue = later.submission.queue
            assert queue.device.name == later.device and queue.name.endswith(".bound.p0")
            frontier = later.frontier
            assert frontier is not None and frontier.get(queue.axis) == later.submission.epoch
            assert frontier.dominates(run["first"].frontier)  # type: ignore[arg-type]
            assert later.submission.annotations is not None
            assert later.submission.annotations["binding"]["device"] == later.device
            assert later.submission.annotations["stage"] == "later"
            assert "later" in run.placements  # the home placement chose

    run_virtual(main)


def run_all_homed_on_gpu0(
    stealing: af.Stealing, topology: af.Topology | None
) -> tuple[float, af.BinderStatistics, dict[str, str]]:
    """Eight one-second stages without cost estimates: placement homes them all on gpu0."""

    async def main() -> tuple[float, af.BinderStatistics, dict[str, str]]:
        async with af.open_runtime(gpus()) as rt:
            rt.binder.configure(stealing=stealing, topology=topology)
            g = rt.graph("burst")
            for i in range(8):
                g.stage(f"t{i}", one_second, bind="ready")
            run = await g.submit()
            assert {h.home for h in run.submissions.values()} == {"gpu0"}  # type: ignore[union-attr]
            await run.results()
            ran = {n: h.device for n, h in run.submissions.items()}  # type: ignore[union-attr]
            return rt.now(), rt.binder.statistics(), ran  # type: ignore[return-value]

    return run_virtual(main)


def test_without_stealing_each_device_runs_its_own_backlog() -> None:
    """Stealing.NONE: every stage runs on its home, one after another."""
    end, stats, ran = run_all_homed_on_gpu0(af.Stealing.NONE, None)
    assert set(ran.values()) == {"gpu0"}
    assert stats.stolen == 0 and stats.bound == 8
    assert end == 8.0


def test_global_stealing_spreads_the_backlog_over_idle_devices() -> None:
    """Stealing.GLOBAL: idle devices take stages from gpu0's backlog; makespan falls."""
    end, stats, ran = run_all_homed_on_gpu0(af.Stealing.GLOBAL, None)
    assert set(ran.values()) == set(GPUS)
    assert stats.stolen == 6 and stats.ran == {d: 2 for d in GPUS}
    assert end == 2.0


def test_neighbour_only_stealing_never_takes_from_a_non_neighbour() -> None:
    """On a line gpu0-gpu1-gpu2-gpu3 only gpu1 may take from gpu0's backlog."""
    line = af.Topology([("gpu0", "gpu1"), ("gpu1", "gpu2"), ("gpu2", "gpu3")])
    end, stats, ran = run_all_homed_on_gpu0(af.Stealing.NEIGHBOURS, line)
    assert set(ran.values()) == {"gpu0", "gpu1"}
    assert stats.stolen == 4 and stats.stolen_hops == 4
    assert end == 4.0


def test_steal_over_hops_costs_hop_seconds_on_the_thief() -> None:
    """With hop_seconds a steal runs a transfer on the thief's queue before the stage."""
    ring = af.Topology.ring(GPUS, hop_seconds=0.25)
    end, stats, ran = run_all_homed_on_gpu0(af.Stealing.GLOBAL, ring)
    assert stats.stolen > 0 and stats.stolen_hops >= stats.stolen
    assert len(set(ran.values())) > 1
    assert end > 2.0  # the same split as without hop costs, plus the moves


def test_failure_upstream_fails_the_unbound_stage_and_its_dependants() -> None:
    """A failed wait fails the unbound stage (never bound) and everything after it."""

    async def main() -> None:
        devices = gpus()
        async with af.open_runtime(devices) as rt:
            devices[0].fail_next(name="source")
            g = rt.graph("job")
            src = g.stage("source", None, device="gpu0", cost=1.0)
            mid = g.stage("mid", None, after=src, cost=1.0, bind="ready")
            g.stage("sink", None, after=mid, device="gpu1", cost=1.0)
            g.stage("other", None, cost=1.0, bind="ready")
            run = await g.submit()
            with pytest.raises(af.GraphError) as info:
                await run.results()
            err = info.value
            assert err.origins == ("source",)
            assert set(err.failed) == {"source", "mid", "sink"}
            assert run["mid"].submission is None  # type: ignore[union-attr]
            assert isinstance(err.causes["sink"], FakeDeviceError)
            assert run.result("other") is None
            assert rt.binder.statistics().waiting == 0

    run_virtual(main)


def test_stage_with_no_live_candidate_fails_naming_it() -> None:
    """Retiring every candidate fails the stage with BindingError naming it."""

    async def main() -> None:
        async with af.open_runtime(gpus()) as rt:
            for name in ("gpu2", "gpu3"):
                rt.binder.retire(name)
            g = rt.graph("job")
            g.stage("lonely", None, cost=1.0, candidates=["gpu2", "gpu3"], bind="ready")
            g.stage("after", None, after="lonely", device="gpu0")
            run = await g.submit()
            with pytest.raises(af.GraphError, match="lonely") as info:
                await run.results()
            assert isinstance(info.value.failed["lonely"], af.BindingError)
            assert "['gpu2', 'gpu3']" in str(info.value.failed["lonely"])
            assert info.value.origins == ("lonely",)

    run_virtual(main)


def test_retiring_a_device_moves_its_ready_backlog_to_a_live_candidate() -> None:
    """A retired home's ready stages move; a stage left with no live candidate fails."""

    async def main() -> None:
        async with af.open_runtime(gpus()[:2]) as rt:
            g = rt.graph("job")
            g.stage("busy", one_second, bind="ready", candidates=["gpu0"])
            g.stage("moves", one_second, bind="ready", candidates=["gpu0", "gpu1"])
            g.stage("stuck", one_second, bind="ready", candidates=["gpu0"])
            g.stage("blocker", one_second, device="gpu1")
            run = await g.submit()
            await asyncio.sleep(0.5)
            assert run["moves"].home == "gpu0"  # type: ignore[union-attr]
            rt.binder.retire("gpu0")
            await run.wait()
            assert run.result("busy") == "done"  # bound before: it stays
            assert run["moves"].device == "gpu1"  # type: ignore[union-attr]
            assert isinstance(run.exceptions()["stuck"], af.BindingError)
            assert rt.binder.statistics().retired == ("gpu0",)

    run_virtual(main)


def test_closing_the_runtime_fails_pending_unbound_stages() -> None:
    """A stage waiting on a semaphore nobody signals fails at close, and so do its signals."""

    async def main() -> tuple[af.StageBinding, af.TimelineSemaphore]:
        async with af.open_runtime(gpus()) as rt:
            never = rt.semaphore(name="never")
            out = rt.semaphore(name="out")
            orphan = rt.binder.submit(
                None, (), {}, waits=[(never, 1)], signals=[(out, 1)], name="orphan",
                cost=None, priority=0, candidates=GPUS, home="gpu1",
            )  # fmt: skip
            assert rt.binder.statistics().waiting == 1
        return orphan, out

    orphan, out = run_virtual(main)
    error = orphan.exception()
    assert isinstance(error, af.StalledError) and "'orphan'" in str(error)
    assert out.failure is error


def test_bad_bind_arguments_raise_and_define_nothing() -> None:
    """An unknown bind, or bind='ready' with a device, raises ValueError; no stage is added."""

    async def main() -> None:
        async with af.open_runtime(gpus()) as rt:
            g = rt.graph("job")
            with pytest.raises(ValueError, match="bind must be one of"):
                g.stage("x", None, bind="later")
            with pytest.raises(ValueError, match="without a device"):
                g.stage("y", None, device="gpu0", bind="ready")
            assert len(g) == 0
            with pytest.raises(ValueError, match="needs a topology"):
                rt.binder.configure(stealing=af.Stealing.NEIGHBOURS)
            with pytest.raises(ValueError, match="lacks"):
                rt.binder.configure(topology=af.Topology([("gpu0", "tpu9")]))
            assert rt.binder.stealing is af.Stealing.NONE and rt.binder.topology is None

    run_virtual(main)


def test_chained_stages_keep_their_binding() -> None:
    """Graph.chain copies a stage's bind; every copy is bound when ready."""

    async def main() -> None:
        async with af.open_runtime(gpus()) as rt:
            rt.binder.configure(stealing="global")
            g = rt.graph("stream")
            g.stage("step", one_second, bind="ready")
            g.chain("step", 3)
            run = await g.submit()
            await run.results()
            assert all(isinstance(h, af.StageBinding) for h in run.submissions.values())
            assert "bound when ready" in repr(g["step[0]"])

    run_virtual(main)


def test_a_closed_runtime_that_stole_work_is_freed_without_the_collector() -> None:
    """The binder, its queues and its handles keep no cycle through a closed runtime.

    (Through the binder directly: a graph and its stages form a cycle of their own.)
    """
    import gc
    import weakref

    async def main() -> tuple[weakref.ref[af.Runtime], weakref.ref[af.StageBinder]]:
        async with af.open_runtime(gpus()) as rt:
            rt.binder.configure(stealing=af.Stealing.GLOBAL)
            handles = [
                rt.binder.submit(
                    one_second,
                    (),
                    {},
                    waits=(),
                    signals=(),
                    name=f"t{i}",
                    cost=None,
                    priority=0,
                    candidates=GPUS,
                    home="gpu0",
                )
                for i in range(6)
            ]
            for handle in handles:
                await handle
            assert rt.binder.statistics().stolen == 4
            refs = (weakref.ref(rt), weakref.ref(rt.binder))
            del handles, handle
        del rt
        return refs

    gc.collect()
    gc.disable()
    try:
        refs = run_virtual(main)
        assert [r() for r in refs] == [None, None]
    finally:
        gc.enable()


def test_binder_refuses_unknown_candidates_and_changes_nothing() -> None:
    """A raw binder submission naming an unknown device raises KeyError; nothing is held."""

    async def main() -> None:
        async with af.open_runtime(gpus()) as rt:
            with pytest.raises(KeyError, match="tpu9"):
                rt.binder.submit(
                    None, (), {}, waits=(), signals=(), name="x", cost=1.0, priority=0,
                    candidates=["gpu0", "tpu9"], home="gpu0",
                )  # fmt: skip
            with pytest.raises(ValueError, match="not among its candidates"):
                rt.binder.submit(
                    None, (), {}, waits=(), signals=(), name="x", cost=1.0, priority=0,
                    candidates=["gpu0"], home="gpu1",
                )  # fmt: skip
            stats = rt.binder.statistics()
            assert stats.waiting == 0 and stats.bound == 0 and not stats.ready
            assert rt.binder.pending_seconds("gpu0") == 0.0

    run_virtual(main)


def test_pending_seconds_count_unbound_work_until_it_is_bound() -> None:
    """Placement sees unbound stages' costs on their home until they are bound or fail."""

    async def main() -> None:
        async with af.open_runtime(gpus()[:2]) as rt:
            g = rt.graph("job")
            first = g.stage("first", None, device="gpu1", cost=4.0)
            g.stage("a", None, after=first, cost=2.0, bind="ready", candidates=["gpu0"])
            run = await g.submit()
            assert rt.binder.pending_seconds("gpu0") == 2.0
            await run.results()
            assert rt.binder.pending_seconds("gpu0") == 0.0

    run_virtual(main)


def test_leaving_the_runtime_runs_every_unbound_stage_that_can_run() -> None:
    """Exiting the runtime drains waiting and ready unbound stages before it closes."""

    async def main() -> af.GraphRun:
        async with af.open_runtime(gpus()[:2]) as rt:
            g = rt.graph("job")
            head = g.stage("head", one_second, device="gpu1")
            for i in range(4):
                g.stage(f"t{i}", one_second, after=head, bind="ready", candidates=["gpu0"])
            run = await g.submit()
        return run

    run = run_virtual(main)
    assert [run.result(f"t{i}") for i in range(4)] == ["done"] * 4


def test_a_failed_wait_at_submission_fails_at_once_and_leaves_no_waiter() -> None:
    """A wait already failed fails the stage at once; waits registered before it are dropped."""

    async def main() -> None:
        async with af.open_runtime(gpus()) as rt:
            pending, broken = rt.semaphore(name="pending"), rt.semaphore(name="broken")
            broken.fail(ValueError("upstream"))
            out = rt.semaphore(name="out")
            handle = rt.binder.submit(
                None, (), {}, waits=[(pending, 1), (broken, 1)], signals=[(out, 1)],
                name="doomed", cost=1.0, priority=0, candidates=GPUS, home="gpu0",
            )  # fmt: skip
            assert handle.done() and isinstance(handle.exception(), af.SemaphoreFailedError)
            assert pending.statistics().waiters == 0
            assert isinstance(out.failure, ValueError)
            assert rt.binder.statistics().waiting == 0
            assert rt.binder.pending_seconds("gpu0") == 0.0

    run_virtual(main)
