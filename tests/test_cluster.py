"""asyncfront on a two-node Ray cluster on this machine: ordering, frontiers, failure."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest

from asyncfront import SemaphoreFailedError, axis_fields

ray = pytest.importorskip("ray")

from ray import cloudpickle  # noqa: E402

from asyncfront.cluster import (  # noqa: E402
    ClusterError,
    DeliveryFaults,
    LocalRayCluster,
    NodeLostError,
    open_cluster,
)

# Work defined here travels by value: the node processes cannot import this module.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

LOSS_BOUND = 10.0  # seconds within which a lost node's failure reaches every dependant


def _processes_mentioning(text: str) -> list[int]:
    """Pids of processes whose command line contains ``text``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(int(entry))
    return found


def _alive(pids: list[int]) -> list[int]:
    """The pids among ``pids`` that still run."""
    return [pid for pid in pids if os.path.exists(f"/proc/{pid}")]


@pytest.fixture(scope="session")
def ray_address() -> Iterator[str]:
    """A two-node Ray cluster on 127.0.0.1 for the whole session, torn down at its end."""
    local = LocalRayCluster(nodes=2)
    address = local.start()
    temp_dir = local.temp_dir
    assert temp_dir is not None
    try:
        yield address
    finally:
        local.stop()
    assert _processes_mentioning(temp_dir) == []


class RemoteBoom(Exception):
    """An error raised by remote work, defined in the test module."""


async def test_submissions_keep_fifo_order_under_reordered_duplicated_batches(
    ray_address: str,
) -> None:
    """Batches and pushes delayed, reordered and duplicated still give FIFO order, once each."""
    faults = DeliveryFaults(seed=11, max_delay=0.01, duplicate=0.5)
    async with open_cluster(ray_address, nodes=2, delivery_faults=faults) as cluster:
        n0, n1 = cluster.nodes
        q1 = n1.queue("cpu")
        subs = []
        for i in range(120):
            subs.append(q1.submit(lambda i=i: i, name=f"w{i}"))
            if i % 4 == 3:
                await asyncio.sleep(0)  # end the loop turn: a new batch
        assert cluster.statistics().batches_sent >= 30
        results = [await s for s in subs]
        assert results == list(range(120))
        assert [s.epoch for s in subs] == list(range(1, 121))
        # Pushes: node 0 signals 1..30; node 1 waits for each value in turn.
        q0 = n0.queue("cpu")
        ticks = cluster.semaphore("ticks", owner=n0)
        waiters = [q1.submit(None, waits=[(ticks, v)], name=f"after{v}") for v in range(1, 31)]
        producers = [q0.submit(None, signals=[(ticks, v)]) for v in range(1, 31)]
        await asyncio.gather(*producers, *waiters)
        q0_axis = await q0.ready()
        for value, waiter in enumerate(waiters, start=1):
            assert waiter.frontier is not None
            assert waiter.frontier.get(q0_axis) >= value
        assert (await ticks.wait(30)).get(q0_axis) == 30


async def test_cross_node_pipeline_submitted_last_stage_first(ray_address: str) -> None:
    """A pipeline alternating nodes, submitted back to front, runs front to back."""
    async with open_cluster(ray_address, nodes=2) as cluster:
        stages = 6
        # A queue per stage: one FIFO holding a later stage ahead of its producer would wait.
        queues = [cluster.nodes[k % 2].queue("cpu", name=f"stage{k}") for k in range(stages)]
        sems = [cluster.semaphore(f"stage{k}", owner=cluster.nodes[k % 2]) for k in range(stages)]
        subs = {}
        for k in reversed(range(stages)):
            waits = [(sems[k - 1], 1)] if k else []
            subs[k] = queues[k].submit(
                lambda k=k: k * 10, waits=waits, signals=[(sems[k], 1)], name=f"stage{k}"
            )
        results = [await subs[k] for k in range(stages)]
        assert results == [k * 10 for k in range(stages)]
        final = await sems[-1].wait(1)
        # Node 1's final frontier carries node 0's axes: their node field says so.
        assert {axis_fields(a).node for a, _ in final} == {0, 1}
        for k in range(1, stages):
            assert subs[k].frontier is not None and subs[k - 1].frontier is not None
            assert subs[k].frontier >= subs[k - 1].frontier
        axes = [await q.ready() for q in queues]
        assert [axis_fields(a).node for a in axes] == [k % 2 for k in range(stages)]
        assert all(final.get(a) == 1 for a in axes)


async def test_remote_exception_reaches_driver_and_dependants_with_its_type(
    ray_address: str,
) -> None:
    """A remote work's error reaches its awaiter and every dependant with its type and message."""

    def boom() -> None:
        raise RemoteBoom("stage 0 broke")

    async with open_cluster(ray_address, nodes=2) as cluster:
        n0, n1 = cluster.nodes
        a = cluster.semaphore("a", owner=n0)
        b = cluster.semaphore("b", owner=n1)
        dependant = n1.queue("cpu").submit(lambda: 1, waits=[(a, 1)], signals=[(b, 1)])
        failing = n0.queue("cpu").submit(boom, signals=[(a, 1)])
        with pytest.raises(RemoteBoom, match="stage 0 broke"):
            await failing
        with pytest.raises(SemaphoreFailedError) as caught:
            await dependant
        assert type(caught.value.root_cause) is RemoteBoom
        with pytest.raises(SemaphoreFailedError) as at_driver:
            await b.wait(1)
        assert str(at_driver.value.root_cause) == "stage 0 broke"


async def test_errors_knowable_at_submit_raise_there(ray_address: str) -> None:
    """Malformed pairs, foreign signals, passed values and unpicklable work raise at submit."""
    async with open_cluster(ray_address, nodes=2) as cluster:
        n0, n1 = cluster.nodes
        q0 = n0.queue("cpu")
        a = cluster.semaphore("a", owner=n0)
        with pytest.raises(TypeError, match="ClusterSemaphore, int"):
            q0.submit(None, waits=[(a, "1")])  # type: ignore[list-item]
        with pytest.raises(ValueError, match="owned by node 0: only work on its owner"):
            n1.queue("cpu").submit(None, signals=[(a, 1)])
        await q0.submit(None, signals=[(a, 1)])
        with pytest.raises(ValueError, match="signal value 1 for semaphore 'a' must exceed 1"):
            q0.submit(None, signals=[(a, 1)])
        lock = __import__("threading").Lock()
        with pytest.raises(TypeError, match="cannot be pickled"):
            q0.submit(lambda: lock)
        with pytest.raises(KeyError, match="no device named 'gpu'"):
            n0.queue("gpu")
        with pytest.raises(ValueError, match="a semaphore named 'a' exists"):
            cluster.semaphore("a", owner=n1)
        assert cluster.statistics().pending_submissions == 0


async def test_killed_node_fails_its_semaphores_and_every_dependant(ray_address: str) -> None:
    """Killing node 0's runtime fails its semaphores with NodeLostError on both sides, in time."""
    async with open_cluster(ray_address, nodes=2) as cluster:
        n0, n1 = cluster.nodes
        started = cluster.semaphore("started", owner=n0)
        never = cluster.semaphore("never", owner=n0)
        after = cluster.semaphore("after", owner=n1)
        q0, q1 = n0.queue("cpu"), n1.queue("cpu")
        await q0.submit(None, signals=[(started, 1)])
        on_lost = q0.submit(None, waits=[(never, 1)], name="on-lost-node")
        dependant = q1.submit(None, waits=[(never, 1)], signals=[(after, 1)], name="dependant")
        later = q1.submit(None, waits=[(after, 1)], name="later")
        await started.wait(1)
        os.kill(await n0.pid(), signal.SIGKILL)
        async with asyncio.timeout(LOSS_BOUND):
            with pytest.raises(NodeLostError, match="node 0 was lost"):
                await on_lost
            for sub in (dependant, later):
                with pytest.raises(SemaphoreFailedError) as caught:
                    await sub
                assert isinstance(caught.value.root_cause, NodeLostError)
                assert caught.value.root_cause.node == 0
            with pytest.raises(SemaphoreFailedError) as at_driver:
                await after.wait(1)
            assert isinstance(at_driver.value.root_cause, NodeLostError)
        assert n0.lost is not None and cluster.statistics().lost_nodes == (0,)
        with pytest.raises(NodeLostError):
            q0.submit(None)


async def test_hung_node_is_lost_by_missed_heartbeat(ray_address: str) -> None:
    """A node whose event loop stops answering is declared lost within the bound."""
    async with open_cluster(
        ray_address, nodes=2, heartbeat_interval=0.5, heartbeat_timeout=2.0
    ) as cluster:
        n0, n1 = cluster.nodes
        gate = cluster.semaphore("gate", owner=n1)
        waiting = n0.queue("cpu").submit(None, waits=[(gate, 1)])
        await n0.queue("cpu").submit(None)  # node 0 is up and took the waiting work
        n1.actor.block_event_loop.remote(60.0)
        async with asyncio.timeout(LOSS_BOUND):
            with pytest.raises(SemaphoreFailedError) as caught:
                await waiting
        lost = caught.value.root_cause
        assert isinstance(lost, NodeLostError) and lost.node == 1
        assert "missed a heartbeat" in lost.reason


async def test_closed_cluster_leaves_no_node_runtime_behind(ray_address: str) -> None:
    """Leaving the cluster drains its work, stops its node runtimes and refuses new work."""
    async with open_cluster(ray_address, nodes=2) as cluster:
        pids = [await node.pid() for node in cluster.nodes]
        queue = cluster.nodes[1].queue("cpu")
        last = queue.submit(lambda: "done")
    assert last.result() == "done"
    with pytest.raises(ClusterError, match="closed"):
        queue.submit(None)
    for _ in range(100):
        if not _alive(pids):
            break
        await asyncio.sleep(0.1)
    assert not _alive(pids)
    trace = cluster.trace
    assert trace.nodes == (0, 1) and len(trace.records(1)) == 1


@pytest.mark.slow
def test_local_cluster_opens_and_closes_clean() -> None:
    """open_cluster(address=None) starts its own two-node cluster and leaves no process behind."""
    script = textwrap.dedent(
        """
        import asyncio, sys
        from asyncfront.cluster import open_cluster

        async def main():
            async with open_cluster(nodes=2) as cluster:
                q = cluster.nodes[1].queue("cpu")
                print(await q.submit(lambda: 41 + 1))
                import ray
                print(ray.get_runtime_context().gcs_address)
                print(cluster.nodes[0].actor is not None)
        asyncio.run(main())
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=110, check=False
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.split()
    assert lines[0] == "42"
    gcs_port = lines[1].rsplit(":", 1)[1]
    assert _processes_mentioning(f"--gcs-address=127.0.0.1:{gcs_port}") == []
    assert _processes_mentioning(f"127.0.0.1:{gcs_port}") == []
