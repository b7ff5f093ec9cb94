"""PyTorch pipeline overhead: three stages through asyncfront queues against a plain loop.

Each iteration runs three stages of ``--matmuls`` float32 matmuls of ``--size`` square
matrices. The direct version calls the stages one after another in a loop. The
asyncfront version puts each stage on its own queue of one ``TorchDevice("cpu")``,
links the stages of an iteration by semaphores and submits all ``--n`` iterations as a
stream before awaiting the last. Both run in the same process, alternately, and each
time is the best of ``--repeat`` runs: wall time, and the CPU time of the whole process
(every thread). The overhead is the median, over the repeats, of each queued run's time
divided by the loop run's just before it: pairing cancels the drift of other load on a
shared machine better than comparing two minima.

Run: ``python benchmarks/torch_overhead.py [--n 20] [--repeat 15] [--workers 1]
[--threads T]``. With one worker the device runs one stage at a time, like the loop, so
the difference is the scheduling overhead; more workers let iterations overlap across
stages. ``--threads`` sets ``OMP_NUM_THREADS`` and ``MKL_NUM_THREADS`` before torch
loads, so the loop and every worker thread start with the same intra-op thread count.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import time
from typing import TYPE_CHECKING, Any

import asyncfront as af
from asyncfront.devices import TorchDevice

if TYPE_CHECKING:
    import torch


def stage(x: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
    """One pipeline stage: a chain of matmuls."""
    for w in weights:
        x = x @ w
    return x


def stage_after(previous: af.Submission, weights: list[torch.Tensor]) -> torch.Tensor:
    """A stage fed by the previous stage's result (complete: this stage waited for it)."""
    return stage(previous.result(), weights)


Timing = tuple[float, float]  # (wall seconds, process CPU seconds)


def direct(inputs: list[torch.Tensor], stages: list[list[torch.Tensor]]) -> Timing:
    """Wall and CPU seconds to run every iteration's stages in a plain loop."""
    start, cpu = time.perf_counter(), time.process_time()
    for x in inputs:
        y = x
        for weights in stages:
            y = stage(y, weights)
    return time.perf_counter() - start, time.process_time() - cpu


async def through_queues(
    inputs: list[torch.Tensor], stages: list[list[torch.Tensor]], workers: int
) -> Timing:
    """Wall and CPU seconds from the first submit to the last result, runtime open."""
    device = TorchDevice("cpu", workers=workers)
    async with af.open_runtime([device], trace=False) as rt:
        queues = [rt.queue(device, name=f"stage{k}") for k in range(len(stages))]
        links = [rt.semaphore(name=f"after{k}") for k in range(len(stages) - 1)]
        await queues[0].submit(stage, inputs[0], stages[0])  # warm the threads
        start, cpu = time.perf_counter(), time.process_time()
        last: af.Submission | None = None
        for i, x in enumerate(inputs, start=1):
            sub = queues[0].submit(stage, x, stages[0], signals=[(links[0], i)])
            for k in range(1, len(stages)):
                signals = [(links[k], i)] if k < len(links) else []
                sub = queues[k].submit(
                    stage_after, sub, stages[k], waits=[(links[k - 1], i)], signals=signals
                )
            last = sub
        assert last is not None
        await last
        return time.perf_counter() - start, time.process_time() - cpu


def measure(size: int, args: argparse.Namespace) -> tuple[list[Timing], list[Timing]]:
    """Alternate loop and queued runs on ``size``-square matrices; their timings."""
    import torch

    torch.manual_seed(0)
    scale = size**-0.5  # keeps the activations' magnitude steady along the chain
    stages = [
        [torch.randn(size, size) * scale for _ in range(args.matmuls)] for _ in range(args.stages)
    ]
    inputs = [torch.randn(size, size) for _ in range(args.n)]
    direct(inputs[:3], stages)  # warm-up: threads, caches
    loop: list[Timing] = []
    queued: list[Timing] = []
    for _ in range(args.repeat):
        loop.append(direct(inputs, stages))
        queued.append(asyncio.run(through_queues(inputs, stages, args.workers)))
    return loop, queued


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--n", type=int, default=10, help="iterations per run")
    parser.add_argument("--repeat", type=int, default=30, help="runs per figure (best kept)")
    parser.add_argument("--size", type=int, default=512, help="matrix side")
    parser.add_argument("--matmuls", type=int, default=3, help="matmuls per stage")
    parser.add_argument("--stages", type=int, default=3, help="pipeline stages")
    parser.add_argument("--workers", type=int, default=1, help="TorchDevice worker threads")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = parser.parse_args()
    if args.threads is not None:
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
    import torch  # after the thread count is in the environment

    loop, queued = measure(args.size, args)
    tiny_loop, tiny_queued = measure(16, args)

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cores": os.cpu_count(),
        "torch threads": torch.get_num_threads(),
    }
    print(", ".join(f"{k} {v}" for k, v in info.items()))
    print(
        f"{args.stages} stages x {args.matmuls} matmuls of {args.size}x{args.size} float32, "
        f"n={args.n}, workers={args.workers}, best of {args.repeat}"
    )
    per_iteration = 1e3 / args.n
    print(f"{'ms per iteration':<20} {'wall':>8} {'cpu':>8}")
    for label, timings in (("direct loop", loop), ("asyncfront queues", queued)):
        wall, cpu = (min(t[k] for t in timings) * per_iteration for k in (0, 1))
        print(f"{label:<20} {wall:8.3f} {cpu:8.3f}")
    wall, cpu = (
        statistics.median((q[k] / d[k] - 1) * 100 for d, q in zip(loop, queued, strict=True))
        for k in (0, 1)
    )
    print(f"{'overhead (paired)':<20} {wall:+7.1f}% {cpu:+7.1f}%")
    # The same pipeline on 16x16 matrices is nearly all scheduling: its extra time per
    # iteration is asyncfront's fixed cost, a steadier estimate on a busy machine.
    fixed = (min(t[0] for t in tiny_queued) - min(t[0] for t in tiny_loop)) * per_iteration
    share = fixed / (min(t[0] for t in loop) * per_iteration) * 100
    print(f"fixed cost: {fixed:.3f} ms per iteration ({share:.1f}% of the loop's iteration)")


if __name__ == "__main__":
    main()
