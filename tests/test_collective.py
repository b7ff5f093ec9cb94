"""Collective channels: one frontier entry per step, completion tracking, failures, all-reduce."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import asyncfront as af
from asyncfront.testing import FakeDevice, run_virtual

ROOT = Path(__file__).resolve().parents[1]


def four_gpus() -> list[FakeDevice]:
    return [FakeDevice(f"gpu{i}") for i in range(4)]


def test_channel_axis_is_a_named_collective_axis_known_to_the_runtime() -> None:
    """rt.collective makes a COLLECTIVE-domain axis, names it and registers it."""

    async def main() -> None:
        async with af.open_runtime(four_gpus()) as rt:
            ch = rt.collective([rt.queue(f"gpu{i}") for i in range(4)], name="tp")
            other = rt.collective([rt.queue("gpu0")], name="ep")
            assert af.axis_fields(ch.axis).domain == af.Domain.COLLECTIVE
            assert ch.axis != other.axis
            assert af.axis_name(ch.axis) == "tp"
            assert ch.axis in rt._known_axes
            assert ch.world_size == 4 and ch.ranks() == (0, 1, 2, 3)
            assert "tp" in repr(ch) and ch.statistics().members == 4

    run_virtual(main)


def test_tensor_parallel_step_contributes_a_single_frontier_entry() -> None:
    """Scenario C1: a step over four queues signals waits | {channel: k}, no member axes."""

    async def main() -> None:
        devices = [FakeDevice("cpu", kind="cpu"), *four_gpus()]
        async with af.open_runtime(devices) as rt:
            members = [rt.queue(f"gpu{i}", name=f"tp{i}") for i in range(4)]
            ch = rt.collective(members, name="tp")
            pre, post = rt.queue("cpu", name="pre"), rt.queue("cpu", name="post")
            tokens, attention, ffn = (af.TimelineSemaphore(name=n) for n in ("tok", "attn", "ffn"))
            pre.submit(signals=[(tokens, 1)], cost=0.1)
            layer_a = ch.submit(
                lambda rank: rank, waits=[(tokens, 1)], signals=[(attention, 1)], cost=1.0
            )
            layer_b = ch.submit(
                lambda rank: rank * 10, waits=[(attention, 1)], signals=[(ffn, 1)], cost=1.0
            )
            reply = post.submit(waits=[(ffn, 1)], cost=0.1)
            assert await layer_a == [0, 1, 2, 3]
            assert await layer_b == [0, 10, 20, 30]
            await reply
            assert layer_a.frontier == af.Frontier({pre.axis: 1, ch.axis: 1})
            assert attention.frontier == layer_a.frontier
            assert layer_b.frontier == af.Frontier({pre.axis: 1, ch.axis: 2})
            assert reply.frontier == af.Frontier({pre.axis: 1, ch.axis: 2, post.axis: 1})
            assert not any(q.axis in reply.frontier for q in members)

    run_virtual(main)


def test_step_completes_when_the_slowest_member_finishes() -> None:
    """The step's signal waits for every member's part; downstream starts after the slowest."""

    async def main() -> None:
        devices = [FakeDevice("gpu0"), FakeDevice("gpu1", speed=0.5), FakeDevice("cpu", kind="cpu")]
        async with af.open_runtime(devices) as rt:
            ch = rt.collective([rt.queue("gpu0"), rt.queue("gpu1")], name="tp")
            done = af.TimelineSemaphore(name="done")
            step = ch.submit(signals=[(done, 1)], cost=1.0)
            after = rt.queue("cpu").submit(waits=[(done, 1)], cost=0.5)
            await after
            finished = [p.finished_at for p in step.parts]
            assert finished == [1.0, 2.0]
            assert after.started_at == 2.0

    run_virtual(main)


def test_completed_frontier_advances_on_the_channel_axis() -> None:
    """rt.completed reads the channel's epochs, and wait_completed waits on them."""

    async def main() -> None:
        async with af.open_runtime(four_gpus()) as rt:
            ch = rt.collective([rt.queue(f"gpu{i}") for i in range(4)], name="tp")
            steps = [ch.submit(cost=1.0) for _ in range(3)]
            assert [s.epoch for s in steps] == [1, 2, 3]
            assert rt.completed.get(ch.axis) == 0
            await rt.wait_completed(af.Frontier({ch.axis: 2}))
            assert rt.now() == 2.0 and steps[1].done() and not steps[2].done()
            assert rt.completed.get(ch.axis) == 2
            assert rt.is_complete(af.Frontier({ch.axis: 2}))
            await steps[2]
            assert ch.completed_epoch == 3 and rt.completed.get(ch.axis) == 3
            assert ch.frontier == af.Frontier({ch.axis: 3})

    run_virtual(main)


def test_per_member_callables_and_arguments() -> None:
    """A sequence of callables runs one per member, with the shared arguments and no rank."""

    async def main() -> None:
        async with af.open_runtime(four_gpus()) as rt:
            ch = rt.collective([rt.queue(f"gpu{i}") for i in range(4)])
            shards = [lambda x, i=i: f"shard{i}({x})" for i in range(4)]
            assert await ch.submit(shards, "h") == [f"shard{i}(h)" for i in range(4)]
            assert await ch.submit(lambda rank, x, scale=1: rank * x * scale, 2, scale=3) == [
                0,
                6,
                12,
                18,
            ]
            with pytest.raises(TypeError, match="4 callables"):
                ch.submit(shards[:2])
            assert await ch.submit() == [None] * 4  # a pure barrier step

    run_virtual(main)


def test_failing_member_fails_the_step_and_its_dependants_but_not_the_channel() -> None:
    """One member's error fails the step, its signals and their waiters; later steps still run."""

    async def main() -> None:
        async with af.open_runtime([*four_gpus(), FakeDevice("cpu", kind="cpu")]) as rt:
            ch = rt.collective([rt.queue(f"gpu{i}") for i in range(4)], name="tp")
            out = af.TimelineSemaphore(name="out")
            boom = RuntimeError("NaN in shard 2")

            def layer(rank: int) -> int:
                if rank == 2:
                    raise boom
                return rank

            bad = ch.submit(layer, signals=[(out, 1)], cost=1.0)
            downstream = rt.queue("cpu").submit(waits=[(out, 1)])
            with pytest.raises(RuntimeError, match="NaN in shard 2"):
                await bad
            assert [name for name, _ in bad.errors] == ["layer[2]"]
            with pytest.raises(af.SemaphoreFailedError) as failed:
                await downstream
            assert failed.value.__cause__ is boom
            assert out.failure is boom
            assert rt.completed.get(ch.axis) == 1  # a failed step still completes its epoch
            assert await ch.submit(lambda rank: rank, cost=1.0) == [0, 1, 2, 3]

    run_virtual(main)


def test_upstream_failure_travels_through_the_channel() -> None:
    """A failed wait fails every part, and the step fails its signals with the original cause."""

    async def main() -> None:
        async with af.open_runtime(four_gpus()) as rt:
            ch = rt.collective([rt.queue(f"gpu{i}") for i in range(2)], name="tp")
            upstream, out = af.TimelineSemaphore(name="up"), af.TimelineSemaphore(name="out")
            step = ch.submit(waits=[(upstream, 1)], signals=[(out, 1)], cost=1.0)
            cause = ValueError("tokenizer crashed")
            upstream.fail(cause)
            with pytest.raises(af.SemaphoreFailedError):
                await step
            assert out.failure is cause

    run_virtual(main)


def test_gap_filling_work_stays_off_the_collective_frontier() -> None:
    """Scenario C1: low-priority embedding fills the TP gaps, its frontier free of the channel."""

    async def main() -> None:
        devices = [FakeDevice("cpu", kind="cpu"), FakeDevice("gpu0"), FakeDevice("gpu1")]
        async with af.open_runtime(devices) as rt:
            ch = rt.collective([rt.queue("gpu0", priority=10), rt.queue("gpu1", priority=10)])
            bge = rt.queue("gpu0", priority=0, name="bge")
            layer = af.TimelineSemaphore(name="layer")
            feeder = rt.queue("cpu", name="feeder")
            # layer n waits on host work, leaving the GPUs idle in between
            steps = []
            for n in range(1, 4):
                host = af.TimelineSemaphore(name=f"host{n}")
                feeder.submit(signals=[(host, 1)], cost=1.0)
                steps.append(ch.submit(waits=[(host, 1)], signals=[(layer, n)], cost=0.5))
            batches = [bge.submit(cost=0.25) for _ in range(6)]
            for step in steps:
                await step
            first_end, second_start = steps[0].parts[0].finished_at, steps[1].parts[0].started_at
            assert first_end is not None and second_start is not None
            assert any(first_end <= (b.started_at or 0) < second_start for b in batches)
            assert all(b.frontier is not None and ch.axis not in b.frontier for b in batches)
            assert all(s.frontier is not None and bge.axis not in s.frontier for s in steps)

    run_virtual(main)


def test_runtime_exit_waits_for_pending_steps() -> None:
    """Leaving the runtime drains the channel: a step submitted last still completes."""

    async def main() -> af.CollectiveStep:
        async with af.open_runtime(four_gpus()) as rt:
            ch = rt.collective([rt.queue(f"gpu{i}") for i in range(4)], name="tp")
            step = ch.submit(cost=3.0)
        assert rt.completed.get(ch.axis) == 1
        return step

    assert run_virtual(main).done()


def test_stalled_step_fails_at_exit_instead_of_hanging() -> None:
    """A step waiting on a semaphore nothing will signal fails with StalledError when draining."""

    async def main() -> af.CollectiveStep:
        async with af.open_runtime(four_gpus(), stall_timeout=0.5) as rt:
            ch = rt.collective([rt.queue("gpu0"), rt.queue("gpu1")], name="tp")
            never = af.TimelineSemaphore(name="never")
            step = ch.submit(waits=[(never, 1)], cost=1.0)
        return step

    step = run_virtual(main)
    assert isinstance(step.exception(), af.StalledError)
    assert "never" in str(step.exception())


def test_member_validation() -> None:
    """Channels need distinct queues of their runtime; submit checks signals and cost."""

    async def main() -> None:
        async with af.open_runtime(four_gpus()) as rt:
            q = rt.queue("gpu0")
            with pytest.raises(ValueError, match="at least one"):
                rt.collective([])
            with pytest.raises(ValueError, match="appears twice"):
                rt.collective([q, q])
            ch = rt.collective([q])
            sem = af.TimelineSemaphore(initial=3, name="s")
            with pytest.raises(ValueError, match="must exceed its current value 3"):
                ch.submit(signals=[(sem, 2)])
            with pytest.raises(ValueError, match="cost"):
                ch.submit(cost=-1.0)

    run_virtual(main)


# -- all-reduce --------------------------------------------------------------------------


def test_all_reduce_sums_tensors_in_place_as_one_step() -> None:
    """all_reduce sums one CPU tensor per member into every one of them, a single channel step."""
    torch = pytest.importorskip("torch")

    async def main() -> None:
        async with af.open_runtime(four_gpus()) as rt:
            ch = rt.collective([rt.queue(f"gpu{i}") for i in range(4)], name="tp")
            tensors = [
                torch.arange(7, dtype=torch.float32).reshape(7, 1) * (r + 1) for r in range(4)
            ]
            expected = torch.arange(7, dtype=torch.float32).reshape(7, 1) * 10
            done = af.TimelineSemaphore(name="reduced")
            step = ch.all_reduce(tensors, signals=[(done, 1)], cost=0.2)
            result = await step
            assert all(r is t for r, t in zip(result, tensors, strict=True))
            for t in tensors:
                assert torch.equal(t, expected)
            assert step.epoch == 1 and done.frontier == af.Frontier({ch.axis: 1})
            small = [torch.tensor([float(r)]) for r in range(4)]  # fewer elements than members
            await ch.all_reduce(small)
            assert [t.item() for t in small] == [6.0] * 4
            assert rt.completed.get(ch.axis) == 2

    run_virtual(main)


def test_all_reduce_on_cpu_threads() -> None:
    """all_reduce on real CpuDevice queues (worker threads) gives the same sums."""
    torch = pytest.importorskip("torch")

    async def main() -> None:
        async with af.open_runtime([af.devices.CpuDevice("cpu", workers=2)]) as rt:
            ch = rt.collective([rt.queue("cpu") for _ in range(3)], name="host")
            tensors = [torch.full((1000,), float(r)) for r in range(3)]
            await ch.all_reduce(tensors)
            assert all(bool((t == 3.0).all()) for t in tensors)

    asyncio.run(main())


def test_all_reduce_checks_its_tensors() -> None:
    """One contiguous tensor per member, all of the same shape and dtype."""
    torch = pytest.importorskip("torch")

    async def main() -> None:
        async with af.open_runtime(four_gpus()) as rt:
            ch = rt.collective([rt.queue("gpu0"), rt.queue("gpu1")], name="tp")
            with pytest.raises(ValueError, match="one tensor per member"):
                ch.all_reduce([torch.zeros(2)])
            with pytest.raises(ValueError, match="tensor 1 is"):
                ch.all_reduce([torch.zeros(2), torch.zeros(3)])
            with pytest.raises(ValueError, match="not contiguous"):
                ch.all_reduce([torch.zeros(2, 2), torch.zeros(2, 2).t()])
            assert ch.submitted_epoch == 0

    run_virtual(main)


def test_backend_needs_an_initialized_process_group() -> None:
    """backend='gloo' without torch.distributed initialized is a clear error."""
    torch = pytest.importorskip("torch")
    if not torch.distributed.is_available() or torch.distributed.is_initialized():
        pytest.skip("needs torch.distributed, not yet initialized")

    async def main() -> None:
        async with af.open_runtime(four_gpus()) as rt:
            with pytest.raises(RuntimeError, match="init_process_group"):
                rt.collective([rt.queue("gpu0")], name="tp", backend="gloo")

    run_virtual(main)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


WORKER = textwrap.dedent(
    """
    import asyncio, datetime, sys
    import torch
    import torch.distributed as dist
    import asyncfront as af

    rank, port = int(sys.argv[1]), sys.argv[2]
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
        timeout=datetime.timedelta(seconds=30),
    )

    async def main():
        async with af.open_runtime([af.devices.CpuDevice("cpu", workers=2)], node=rank) as rt:
            members = [rt.queue("cpu"), rt.queue("cpu")]
            ch = rt.collective(members, name="tp", backend="gloo")
            tensors = [torch.full((5,), float(r + 1)) for r in ch.ranks()]
            step = ch.all_reduce(tensors)
            await step
            only_channel = step.frontier.axes == (ch.axis,)
            print(ch.ranks(), ch.world_size, [t.tolist() for t in tensors], only_channel)

    try:
        asyncio.run(main())
    finally:
        dist.destroy_process_group()
    """
)


def test_all_reduce_across_two_processes_over_gloo(tmp_path: Path) -> None:
    """With a gloo process group, all_reduce sums the members of both processes (loopback only)."""
    torch = pytest.importorskip("torch")
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    port = str(_free_port())
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if sys.platform == "linux":
        env["GLOO_SOCKET_IFNAME"] = "lo"  # gloo's own traffic stays on loopback too
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(rank), port],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for rank in range(2)
    ]
    outputs = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=90)
            assert proc.returncode == 0, err
            outputs.append(out.strip())
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    total = [10.0] * 5  # 1 + 2 + 3 + 4: two members in each of two processes
    assert outputs[0] == f"(0, 1) 4 {[total, total]} True"
    assert outputs[1] == f"(2, 3) 4 {[total, total]} True"
