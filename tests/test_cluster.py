"""asyncfront on a two-node Ray cluster on this machine: ordering, frontiers, failure."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator

import pytest

from asyncfront import Domain, GraphError, SemaphoreFailedError, axis_fields

ray = pytest.importorskip("ray")

from ray import cloudpickle  # noqa: E402

from asyncfront.cluster import (  # noqa: E402
    Cluster,
    ClusterError,
    ClusterStatistics,
    DeliveryFaults,
    LocalRayCluster,
    NodeLostError,
    NodeStatistics,
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


def _exists(path: str) -> bool:
    """Whether a file exists at ``path``."""
    return os.path.exists(path)


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
        with pytest.raises(ValueError, match="a collective on node 1 takes this node's queues"):
            n1.collective([q0])
        with pytest.raises(ValueError, match="a collective on node 0 lists a queue twice"):
            n0.collective([q0, q0])
        with pytest.raises(ValueError, match="needs at least one queue"):
            n0.collective([])
        with pytest.raises(TypeError, match="a function for node 0 cannot be pickled"):
            await n0.run(lambda rt: lock)
        assert cluster.statistics().pending_submissions == 0


async def test_collective_steps_and_run_on_a_node(ray_address: str) -> None:
    """A node's collective runs fn(rank) on each member; node.run sees the node's runtime."""

    def boom(rt: object) -> None:
        raise RemoteBoom("no runtime for you")

    async with open_cluster(ray_address, nodes=2) as cluster:
        n1 = cluster.nodes[1]
        q1, q2 = n1.queue("cpu"), n1.queue("cpu")
        channel = n1.collective([q1, q2], name="tp")
        done = cluster.semaphore("done", owner=n1)
        step = channel.submit(lambda rank, x: rank * 10 + x, 7, signals=[(done, 1)])
        assert await step == [7, 17]
        final = await done.wait(1)
        channel_axis = await channel.ready()
        assert axis_fields(channel_axis).domain == Domain.COLLECTIVE
        assert axis_fields(channel_axis).node == 1
        assert final.get(channel_axis) == 1
        assert await n1.run(lambda rt: rt.node) == 1  # type: ignore[attr-defined]
        with pytest.raises(RemoteBoom, match="no runtime for you"):
            await n1.run(boom)


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
    """Leaving drains the work, stops the node runtimes, refuses new work, merges the trace."""
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
    document = trace.to_perfetto()
    processes = {e["args"]["name"] for e in document["traceEvents"] if e["name"] == "process_name"}
    assert processes == {"node 0", "node 1"}
    (work,) = [e for e in document["traceEvents"] if e.get("ph") == "X"]
    assert work["pid"] == 2 and work["args"]["node"] == 1


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


def _layer(seed: int, width: int) -> object:
    """A small deterministic layer: the same weights on every node and here."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(width, width, generator=generator) / width**0.5
    return lambda x: torch.tanh(x @ weight)


def _micro_batch(index: int, width: int) -> object:
    import torch

    return torch.randn(2, width, generator=torch.Generator().manual_seed(1000 + index))


def _c2_devices(directory: str) -> object:
    """Node 0: a CPU, plus the KV sessions' GPU budget, host memory and NVMe; node 1: a CPU."""

    def devices(index: int) -> list[object]:
        from asyncfront.devices.cpu import CpuDevice
        from asyncfront.scenarios.kv_paging import kv_devices

        cpu: list[object] = [CpuDevice("cpu", workers=2)]
        return cpu + kv_devices(directory, sessions=8) if index == 0 else cpu

    return devices


async def _page_kv_sessions(rt: object) -> dict[str, object]:
    """Run the KV sessions under node 0's pager; what the pipeline test checks of them."""
    from asyncfront.scenarios.kv_paging import run_kv_paging

    report = await run_kv_paging(rt, sessions=8)  # type: ignore[arg-type]
    return {
        "idle": report.idle_digest,
        "resumed": report.resumed_digest,
        "evicted": report.evicted_for_growth,
        "page_outs": report.statistics.page_outs,
        "nvme": report.queues["nvme"].axis,
        "page_out_frontier": report.page_out_frontier.as_dict(),
    }


async def test_pipeline_over_a_link_matches_one_node(ray_address: str, tmp_path: object) -> None:
    """C2 on CPU tensors: split layers, collectives per node, a link, KV paged on node 0."""
    torch = pytest.importorskip("torch")
    width, layers, split, batches = 16, 4, 2, 6
    devices = _c2_devices(str(tmp_path))
    async with open_cluster(ray_address, nodes=2, devices=devices) as cluster:  # type: ignore[arg-type]
        n0, n1 = cluster.nodes
        link = cluster.link(n0, n1, name="activations")
        front_q, back_q = n0.queue("cpu", name="front"), n1.queue("cpu", name="back")
        front_c = n0.collective([front_q], name="front_tp")
        back_c = n1.collective([back_q], name="back_tp")
        front = cluster.semaphore("front", owner=n0)
        front_synced = cluster.semaphore("front_synced", owner=n0)
        back = cluster.semaphore("back", owner=n1)
        back_synced = cluster.semaphore("back_synced", owner=n1)

        def run_layers(lo: int, hi: int, x: object) -> object:
            for k in range(lo, hi):
                x = _layer(k, width)(x)  # type: ignore[operator]
            return x

        go = cluster.semaphore("go", owner=n0)
        go_q = n0.queue("cpu", name="go")
        transfers, outputs = [], []
        for m in range(1, batches + 1):
            x = front_q.submit(
                run_layers,
                0,
                split,
                _micro_batch(m, width),
                waits=[(go, 1)],
                signals=[(front, m)],
                name=f"front{m}",
            )
            # Each stage ends in a step of its node's collective channel (a barrier here).
            front_c.submit(None, waits=[(front, m)], signals=[(front_synced, m)])
            transfer = link.send(x, waits=[(front_synced, m)])
            transfers.append(transfer)
            outputs.append(
                back_q.submit(
                    run_layers,
                    split,
                    layers,
                    transfer.received,
                    waits=[(link.received, m)],
                    signals=[(back, m)],
                    name=f"back{m}",
                )
            )
            back_c.submit(None, waits=[(back, m)], signals=[(back_synced, m)])
        # Node 0 computes only once everything, node 1's stages included, is queued.
        go_q.submit(None, signals=[(go, 1)])
        # Meanwhile many chat sessions' KV blocks share node 0's budget under its pager.
        paging = asyncio.ensure_future(n0.run(_page_kv_sessions))
        results = [await o for o in outputs]
        final = await back_synced.wait(batches)
        kv = await paging
        axes = {
            name: await q.ready()
            for name, q in (
                ("front", front_q),
                ("back", back_q),
                ("send", link.send_queue),
                ("recv", link.recv_queue),
                ("front collective", front_c),
                ("back collective", back_c),
            )
        }
    trace = cluster.trace
    queued = min(r["origin"] + r["submitted_at"] for r in trace.records(1) if r["queue"] == "back")
    computed = min(r["origin"] + r["started_at"] for r in trace.records(0) if r["queue"] == "front")
    assert queued < computed
    expected = [run_layers(0, layers, _micro_batch(m, width)) for m in range(1, batches + 1)]
    for got, want in zip(results, expected, strict=True):
        assert torch.equal(got, want)
    for name, queue_axis in axes.items():
        assert final.get(queue_axis) >= 1, name
    assert final.get(axes["front collective"]) == batches
    assert final.get(axes["back collective"]) == batches
    for name in ("front collective", "back collective"):
        assert axis_fields(axes[name]).domain == Domain.COLLECTIVE, name
    assert {axis_fields(a).node for a in (axes["front"], axes["send"])} == {0}
    assert {axis_fields(a).node for a in (axes["back"], axes["recv"])} == {1}
    assert axis_fields(axes["front collective"]).node == 0
    assert axis_fields(axes["back collective"]).node == 1
    # The idle session's block went to node 0's storage under the LRU and came back intact.
    assert kv["page_outs"] >= 1 and kv["evicted"]
    assert axis_fields(kv["nvme"]).node == 0  # type: ignore[arg-type]
    assert kv["page_out_frontier"].get(kv["nvme"], 0) >= 1  # type: ignore[attr-defined]
    assert kv["resumed"] == kv["idle"]


def _moe_parts(width: int, experts: int) -> tuple[object, list[object]]:
    """A router (gates and top-1 dispatch) and ``experts`` expert layers, deterministic."""
    import torch

    gate_w = torch.randn(width, experts, generator=torch.Generator().manual_seed(77))

    def route(x: object) -> object:
        scores = torch.softmax(x @ gate_w, dim=-1)  # type: ignore[operator]
        top = scores.argmax(dim=-1)
        mask = torch.nn.functional.one_hot(top, experts).to(x.dtype)  # type: ignore[attr-defined]
        weights = (scores * mask).T.unsqueeze(-1)  # (experts, tokens, 1)
        return torch.cat([weights * x, weights], dim=-1)  # per-expert tokens and gate weight

    return route, [_layer(500 + e, width) for e in range(experts)]


async def test_cross_node_moe_matches_one_node(ray_address: str) -> None:
    """C3 across nodes: router on node 0, experts on node 1, tensors over links both ways."""
    torch = pytest.importorskip("torch")
    width, experts, tokens = 8, 3, 5
    async with open_cluster(ray_address, nodes=2) as cluster:
        n0, n1 = cluster.nodes
        out_link, back_link = cluster.link(n0, n1, name="nic1"), cluster.link(n1, n0, name="nic2")
        routed = cluster.semaphore("routed", owner=n0)
        expert_sems = [cluster.semaphore(f"expert{e}", owner=n1) for e in range(experts)]
        gathered = cluster.semaphore("gathered", owner=n1)
        combined = cluster.semaphore("combined", owner=n0)
        expert_queues = [n1.queue("cpu", name=f"expert{e}") for e in range(experts)]

        def run_expert(e: int, dispatch: object) -> object:
            _, layers = _moe_parts(width, experts)
            return layers[e](dispatch[e, :, :width])  # type: ignore[index, operator]

        def stack(dispatch: object, *outs: object) -> object:
            weights = dispatch[:, :, width:]  # type: ignore[index]
            return torch.stack(outs) * weights  # type: ignore[arg-type]

        tokens_x = torch.randn(tokens, width, generator=torch.Generator().manual_seed(5))
        route, _ = _moe_parts(width, experts)
        dispatch = n0.queue("cpu", name="router").submit(route, tokens_x, signals=[(routed, 1)])
        there = out_link.send(dispatch, waits=[(routed, 1)])
        outs = [
            q.submit(
                run_expert,
                e,
                there.received,
                waits=[(out_link.received, 1)],
                signals=[(expert_sems[e], 1)],
            )
            for e, q in enumerate(expert_queues)
        ]
        stacked = n1.queue("cpu", name="gather").submit(
            stack,
            there.received,
            *outs,
            waits=[(s, 1) for s in expert_sems],
            signals=[(gathered, 1)],
        )
        home = back_link.send(stacked, waits=[(gathered, 1)])
        result = n0.queue("cpu", name="combine").submit(
            lambda parts: parts.sum(dim=0),
            home.received,
            waits=[(back_link.received, 1)],
            signals=[(combined, 1)],
        )
        got = await result
        frontier = result.frontier
        assert frontier is not None
        nic_axes = [
            await q.ready()
            for q in (
                out_link.send_queue,
                out_link.recv_queue,
                back_link.send_queue,
                back_link.recv_queue,
            )
        ]
        expert_axes = [await q.ready() for q in expert_queues]
    _, layers = _moe_parts(width, experts)
    routed_local = route(tokens_x)
    want = sum(
        layers[e](routed_local[e, :, :width]) * routed_local[e, :, width:]  # type: ignore[operator, index]
        for e in range(experts)
    )
    assert torch.allclose(got, want)
    assert all(frontier.get(a) == 1 for a in nic_axes + expert_axes)
    assert {axis_fields(a).node for a in expert_axes} == {1}


def _declare(model: str, resident: bool) -> object:
    """A function for node.run: declare ``model`` on the node, resident on its CPU or not."""

    def declare(rt: object) -> None:
        models = rt.declared_models  # type: ignore[attr-defined]
        if model not in {m.name for m in models.models}:
            rt.declare_model(model, 1 << 20, load_time=0.5)  # type: ignore[attr-defined]
        rt.declare_resident(model, "cpu", resident)  # type: ignore[attr-defined]

    return declare


async def test_result_taken_by_work_on_another_node_is_copied_there(ray_address: str) -> None:
    """A submission taking another node's result gets a copy; the producer's error if it failed."""

    def boom() -> int:
        raise RemoteBoom("no value")

    async with open_cluster(ray_address, nodes=2) as cluster:
        n0, n1 = cluster.nodes
        q0, q1 = n0.queue("cpu"), n1.queue("cpu")
        gate = cluster.semaphore("gate", owner=n0)
        # The consumer is queued on node 1 before its producer on node 0 may run.
        made = q0.submit(lambda: [1, 2, 3], waits=[(gate, 1)])
        used = q1.submit(lambda xs, k: sum(xs) * k, made, k=10)
        twice = q1.submit(lambda xs: len(xs), made)  # a second use on node 1: one copy
        n0.queue("cpu").submit(None, signals=[(gate, 1)])
        assert await used == 60 and await twice == 3
        failing = q0.submit(boom)
        dependant = q1.submit(lambda x: x, failing)
        with pytest.raises(RemoteBoom):
            await failing
        with pytest.raises(SemaphoreFailedError) as caught:
            await dependant
        assert type(caught.value.root_cause) is RemoteBoom
        assert str(caught.value.root_cause) == "no value"


async def test_copy_from_a_lost_node_fails_its_taker(ray_address: str) -> None:
    """Work waiting for a copy of a lost node's result fails with NodeLostError, in time."""
    async with open_cluster(ray_address, nodes=2) as cluster:
        n0, n1 = cluster.nodes
        never = cluster.semaphore("never", owner=n1)
        pending = n0.queue("cpu").submit(lambda: 1, waits=[(never, 1)])
        taker = n1.queue("cpu").submit(lambda x: x, pending)
        await n1.queue("cpu").submit(None)  # node 1 has taken the taker
        os.kill(await n0.pid(), signal.SIGKILL)
        async with asyncio.timeout(LOSS_BOUND):
            with pytest.raises(SemaphoreFailedError) as caught:
                await taker
        assert isinstance(caught.value.root_cause, NodeLostError)
        assert caught.value.root_cause.node == 0


async def test_graph_across_nodes_passes_results_and_carries_both_nodes_axes(
    ray_address: str,
) -> None:
    """A graph's stages run on their nodes, results cross nodes, the frontier names both."""
    from asyncfront.cluster import ClusterGraphRun

    async with open_cluster(ray_address, nodes=2) as cluster:
        n0, n1 = cluster.nodes
        graph = cluster.graph("span")
        a = graph.stage("a", lambda: 3, node=n0)
        b = graph.stage("b", lambda x: x * 10, a, node=n1)
        c = graph.stage("c", lambda x, y: x + y, b, y=a, node=0)
        graph.stage("d", node=n1, after=c)
        runs: list[ClusterGraphRun] = [await graph.submit(), await graph.submit()]
        for run in runs:
            assert await run.results() == {"a": 3, "b": 30, "c": 33, "d": None}
            assert [run.node_of(s) for s in "abcd"] == [0, 1, 0, 1]
            assert {axis_fields(axis).node for axis, _ in run.frontier} == {0, 1}
            fa, fb, fc, fd = (run[s].frontier for s in "abcd")
            assert fa is not None and fb is not None and fc is not None and fd is not None
            assert fd >= fc >= fb >= fa and fc != fb != fa
            assert run.frontier == fd  # the one sink holds the whole run's history
        assert runs[0].name != runs[1].name and runs[1].statistics().completed == 4


async def test_graph_defined_last_stage_first_runs_in_dependency_order(ray_address: str) -> None:
    """Stages defined back to front, linked afterwards, run front to back across nodes."""
    from asyncfront import GraphDefinitionError

    async with open_cluster(ray_address, nodes=2) as cluster:
        n0, n1 = cluster.nodes
        graph = cluster.graph("backwards")
        last = graph.stage("last", lambda: "last", node=n1)
        middle = graph.stage("middle", lambda: "middle", node=n0)
        first = graph.stage("first", lambda: "first", node=n1)
        graph.add_dependency(last, middle)
        graph.add_dependency(middle, "first")
        with pytest.raises(GraphDefinitionError, match="would close a cycle"):
            graph.add_dependency(first, last)
        assert [s.name for s in graph.order()] == ["first", "middle", "last"]
        run = await graph.submit()
        assert await run.results() == {"first": "first", "middle": "middle", "last": "last"}
        f_first, f_middle, f_last = (run[s].frontier for s in ("first", "middle", "last"))
        assert f_first is not None and f_middle is not None and f_last is not None
        assert f_last >= f_middle >= f_first
        assert run.sinks == ("last",)
        # Node 1's queue holds 'last' behind 'first': its frontier has its own axis at 2.
        assert {axis_fields(axis).node: epoch for axis, epoch in f_last}.get(1) == 2


async def test_graph_failure_travels_to_dependants_on_every_node(ray_address: str) -> None:
    """A failing stage fails its dependants on both nodes; an independent branch finishes."""
    from asyncfront import GraphError

    def boom() -> int:
        raise RemoteBoom("stage a broke")

    async with open_cluster(ray_address, nodes=2) as cluster:
        n0, n1 = cluster.nodes
        graph = cluster.graph("failing")
        a = graph.stage("a", boom, node=n0)
        b = graph.stage("b", lambda x: x, a, node=n1)
        graph.stage("c", lambda: "c", node=n0, after=b)
        graph.stage("other", lambda: "fine", node=n1)
        run = await graph.submit()
        with pytest.raises(GraphError) as caught:
            await run.results()
        error = caught.value
        assert error.origins == ("a",)
        assert set(error.failed) == {"a", "b", "c"}
        assert {type(e) for e in error.causes.values()} == {RemoteBoom}
        assert run.result("other") == "fine"
        assert isinstance(run.exceptions()["c"], SemaphoreFailedError)
        assert run.statistics().failed == 3 and run.statistics().completed == 1


async def test_graph_places_a_model_stage_on_the_node_where_it_is_resident(
    ray_address: str,
) -> None:
    """A stage with a model and no node goes to the node holding the model, and follows it."""
    from asyncfront import PlacementError

    async with open_cluster(ray_address, nodes=2) as cluster:
        n0, n1 = cluster.nodes
        await n0.run(_declare("encoder", resident=False))
        await n1.run(_declare("encoder", resident=True))
        graph = cluster.graph("placed")
        pre = graph.stage("pre", lambda: 2, node=n0)
        graph.stage("encode", lambda x: x + 1, pre, model="encoder", cost=0.01)
        run = await graph.submit()
        assert await run.results() == {"pre": 2, "encode": 3}
        placed = run.placements["encode"]
        assert (placed.node, placed.device, placed.reason) == (1, "cpu", "resident")
        assert placed.resident_on == (1,) and run.node_of("encode") == 1
        assert placed.as_dict()["resident"] == ["1:cpu"]
        # The weights move to node 0: the next run follows them.
        await n1.run(_declare("encoder", resident=False))
        await n0.run(_declare("encoder", resident=True))
        again = await graph.submit()
        assert await again.results() == {"pre": 2, "encode": 3}
        assert again.placements["encode"].node == 0 and again.node_of("encode") == 0
        # A model no node knows: refused at submit, nothing queued, no semaphore left.
        lost = cluster.graph("nowhere")
        lost.stage("x", lambda: 1, node=n0)
        lost.stage("y", lambda x: x, "x", model="unknown")
        before = cluster.statistics()
        with pytest.raises(PlacementError, match="no node of the cluster can take model"):
            await lost.submit()
        after = cluster.statistics()
        assert after.semaphores == before.semaphores
        assert after.pending_submissions == before.pending_submissions == 0


class _Tripwire:
    """Unpickling it creates a file: proof that a frame was unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (self.path, "w"))


async def test_results_stream_back_and_a_stranger_is_refused(
    ray_address: str, tmp_path: object
) -> None:
    """Results come back over each node's stream; a stranger without the secret goes unread."""
    import pickle

    async with open_cluster(ray_address, nodes=2) as cluster:
        assert cluster.statistics().result_streams == (0, 1)
        server = cluster._result_server
        assert server is not None
        host, port = server.sockets[0].getsockname()[:2]
        tripwire = os.path.join(str(tmp_path), "unpickled")
        frame = pickle.dumps([_Tripwire(tripwire)])
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"x" * 32 + (0).to_bytes(2, "big") + len(frame).to_bytes(4, "big") + frame)
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), 10) == b""  # closed by the driver
        writer.close()
        assert not _exists(tripwire)
        results = [await cluster.nodes[k % 2].queue("cpu").submit(lambda k=k: k) for k in range(4)]
        assert results == [0, 1, 2, 3]
        assert cluster.statistics().result_streams == (0, 1)


async def _records(cluster: Cluster) -> tuple[ClusterStatistics, list[NodeStatistics]]:
    """The driver's statistics, less its counters of traffic, and every node's."""
    stats = cluster.statistics()
    stats = dataclasses.replace(stats, batches_sent=0, submissions_sent=0)
    return stats, [await node.statistics() for node in cluster.nodes]


async def _settle_records(
    cluster: Cluster, expected: tuple[ClusterStatistics, list[NodeStatistics]]
) -> tuple[ClusterStatistics, list[NodeStatistics]]:
    """The records once they equal ``expected``, or as they are after a few seconds.

    Releases and forgets travel fire-and-forget in the next batches, so the nodes' records
    go a moment after the driver dropped its own.
    """
    gc.collect()
    records = await _records(cluster)
    for _ in range(100):
        if records == expected:
            break
        await asyncio.sleep(0.05)
        records = await _records(cluster)
    return records


async def test_graph_runs_leave_no_records_on_the_driver_or_any_node(ray_address: str) -> None:
    """50 runs of a graph across nodes, then a failed one: every record count is back."""

    def boom(x: int) -> int:
        time.sleep(0.2)  # its dependant is still pending when the driver waits for the run
        raise RemoteBoom(f"stage b broke on {x}")

    async with open_cluster(ray_address, nodes=2) as cluster:
        n0, n1 = cluster.nodes
        graph = cluster.graph("churn")
        a = graph.stage("a", lambda: 1, node=n0)
        b = graph.stage("b", lambda x: x + 1, a, node=n1)
        graph.stage("c", lambda x, y: x + y, b, y=a, node=n0)
        # One run first: the default queues (one per node) and the driver's view of
        # them exist from then on, as they do in a long-lived cluster.
        assert (await (await graph.submit()).results())["c"] == 3
        before = await _settle_records(cluster, await _records(cluster))
        assert before[0].semaphores == 0 and before[0].graph_runs == 0
        for _ in range(50):
            run = await graph.submit()
            assert (await run.results())["c"] == 3
        del run
        assert await _settle_records(cluster, before) == before
        failing = cluster.graph("failing")
        x = failing.stage("x", lambda: 1, node=n0)
        y = failing.stage("y", boom, x, node=n1)
        failing.stage("z", lambda v, w: v + w, y, w=x, node=n0)
        failed = await failing.submit()
        with pytest.raises(GraphError):
            await failed.results()
        assert cluster.statistics().graph_runs == 0
        error = failed.exceptions()["z"]
        del failed
        assert await _settle_records(cluster, before) == before
        # The error's semaphore, gone from every record, still says that it failed.
        assert isinstance(error, SemaphoreFailedError)
        assert isinstance(error.semaphore.failure, RemoteBoom)
        with pytest.raises(SemaphoreFailedError):
            await asyncio.wait_for(error.semaphore.wait(1), 5)


async def test_graph_qos_sets_each_stage_queue_priority_as_a_local_graph_does(
    ray_address: str,
) -> None:
    """qos= on a graph or stage picks the tier's queue priority; priority= still works."""
    from asyncfront import QoS

    async with open_cluster(ray_address, nodes=2) as cluster:
        n0, n1 = cluster.nodes
        graph = cluster.graph("tiers", qos=QoS.BURSTABLE)
        graph.stage("inherits", lambda: 1, node=n0)
        graph.stage("own", lambda: 2, node=n1, qos="best-effort")
        graph.stage("numbered", lambda: 3, node=n1, priority=7)
        graph.stage("zero", lambda: 4, node=n0, priority=0)
        run = await graph.submit()
        assert await run.results() == {"inherits": 1, "own": 2, "numbered": 3, "zero": 4}
        priorities = {name: sub.queue.priority for name, sub in run.submissions.items()}
        assert priorities == {
            "inherits": QoS.BURSTABLE.priority,
            "own": QoS.BEST_EFFORT.priority,
            "numbered": 7,
            "zero": 0,
        }
        assert graph["own"].qos is QoS.BEST_EFFORT and graph["own"].queue_priority == 0
        with pytest.raises(ValueError, match=r"qos= or priority=, not both"):
            graph.stage("both", lambda: 0, node=n0, qos=QoS.GUARANTEED, priority=1)
        with pytest.raises(ValueError, match=r"has its own \(priority 0\)"):
            graph.stage("queued", lambda: 0, device=n0.queue("cpu"), qos=QoS.GUARANTEED)
        with pytest.raises(ValueError, match=r"names no tier"):
            graph.stage("unknown", lambda: 0, node=n0, qos="platinum")
        with pytest.raises(ValueError, match=r"names no tier"):
            cluster.graph("bad", qos="platinum")
        assert [s.name for s in graph.stages] == ["inherits", "own", "numbered", "zero"]


async def test_graph_runs_leave_no_records_under_reordered_duplicated_messages(
    ray_address: str,
) -> None:
    """Batches and pushes delayed, reordered and duplicated: run records still all go."""
    faults = DeliveryFaults(seed=5, max_delay=0.01, duplicate=0.5)
    async with open_cluster(ray_address, nodes=2, delivery_faults=faults) as cluster:
        n0, n1 = cluster.nodes
        graph = cluster.graph("shaken")
        a = graph.stage("a", lambda: 2, node=n0)
        b = graph.stage("b", lambda x: x * 3, a, node=n1)
        c = graph.stage("c", lambda x: x + 1, a, node=n1)
        graph.stage("d", lambda x, y: x + y, b, c, node=n0)
        assert (await (await graph.submit()).results())["d"] == 9
        before = await _settle_records(cluster, await _records(cluster))
        runs = [await graph.submit() for _ in range(20)]  # in flight together
        assert [(await r.results())["d"] for r in runs] == [9] * 20
        del runs
        assert await _settle_records(cluster, before) == before
