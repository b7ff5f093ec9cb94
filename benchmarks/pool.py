"""Allocate/free throughput: BufferPool's death-frontier checks against a plain free list.

Every allocator runs the same pre-generated random sequence of allocations and frees
(sizes log-uniform between 256 B and 64 KiB, up to 512 blocks live, 4 queues taking
turns). The baseline is a first-fit free list with split and coalesce and no frontiers.
BufferPool runs it twice:

* ``dominated``: every requester knows every queue's latest epoch, so every reuse
  passes the first rule (the requester dominates the death frontier);
* ``cross-queue``: a requester knows only its own queue, completion lags each queue by
  a few epochs, so reuse goes through the completed frontier or waits; a wait is
  carried out by completing exactly the missing epochs (what the runtime would do),
  then retrying.

Run ``python benchmarks/pool.py --ops 100000``; see docs/benchmarks.md for figures.
"""

from __future__ import annotations

import argparse
import bisect
import math
import random
import sys
import time
import timeit
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import interleaved, ratio, table, write_section

from asyncfront import Frontier, axis
from asyncfront.memory import Block, BufferPool, Wait

QUEUES = tuple(axis(device=0, queue=q) for q in range(4))
MAX_LIVE = 512
CAPACITY = 64 << 20
ALIGNMENT = 256
COMPLETION_LAG = 4  # epochs each queue's completion trails its submissions


class FirstFitFreeList:
    """The baseline: first-fit over free extents kept in address order, split and coalesce."""

    def __init__(self, capacity: int, alignment: int) -> None:
        self.alignment = alignment
        self._by_start: dict[int, int] = {0: capacity}  # start -> length
        self._by_end: dict[int, int] = {capacity: 0}  # end -> start
        self._starts: list[int] = [0]
        self._live: dict[int, int] = {}  # start -> length

    def allocate(self, nbytes: int) -> int | None:
        mask = self.alignment - 1
        span = (nbytes + mask) & ~mask
        by_start = self._by_start
        for i, start in enumerate(self._starts):
            length = by_start[start]
            if length >= nbytes:
                if span < length:  # split: the extent starts later, same end
                    del by_start[start]
                    by_start[start + span] = length - span
                    self._by_end[start + length] = start + span
                    self._starts[i] = start + span
                else:
                    span = length
                    self._remove(start, length)
                self._live[start] = span
                return start
        return None

    def free(self, start: int) -> None:
        length = self._live.pop(start)
        end = start + length
        left = self._by_end.get(start)
        right_length = self._by_start.get(end)
        # Coalesce by growing a neighbour in place, as BufferPool does.
        if left is not None:
            if right_length is not None:
                self._remove(end, right_length)
                end += right_length
            del self._by_end[start]
            self._by_start[left] = end - left
            self._by_end[end] = left
        elif right_length is not None:
            del self._by_start[end]
            self._by_start[start] = length + right_length
            self._by_end[end + right_length] = start
            starts = self._starts
            starts[bisect.bisect_left(starts, end)] = start
        else:
            self._insert(start, length)

    def _insert(self, start: int, length: int) -> None:
        self._by_start[start] = length
        self._by_end[start + length] = start
        bisect.insort(self._starts, start)

    def _remove(self, start: int, length: int) -> None:
        del self._by_start[start]
        del self._by_end[start + length]
        starts = self._starts
        del starts[bisect.bisect_left(starts, start)]


@dataclass(frozen=True)
class Step:
    """One operation: allocate ``nbytes`` for a queue, or free the live block at ``pick``.

    The frontiers are built with the workload, outside the timed runs: a runtime has
    its queues' frontiers at hand already.
    """

    queue: int
    epoch: int  # the queue's epoch when the step is issued
    own: Frontier  # {queue: epoch}: a requester's own knowledge, or a death frontier
    everything: Frontier  # every queue's latest epoch: a requester that knows it all
    nbytes: int = 0  # > 0: an allocation
    pick: float = 0.0  # frees the live block at index int(pick * live)


def make_workload(pairs: int, seed: int) -> list[Step]:
    """``pairs`` allocations and as many frees, interleaved, from one random seed."""
    rng = random.Random(seed)
    steps: list[Step] = []
    latest = dict.fromkeys(QUEUES, 0)
    live = allocated = 0
    low, high = math.log(256), math.log(64 << 10)
    while allocated < pairs or live:
        q = rng.randrange(len(QUEUES))
        latest[QUEUES[q]] += 1
        epoch = latest[QUEUES[q]]
        own = Frontier.single(QUEUES[q], epoch)
        allocate = allocated < pairs and (live == 0 or (live < MAX_LIVE and rng.random() < 0.5))
        if allocate:
            nbytes = int(math.exp(rng.uniform(low, high)))
            steps.append(Step(q, epoch, own, Frontier(latest), nbytes=nbytes))
            live += 1
            allocated += 1
        else:
            steps.append(Step(q, epoch, own, own, pick=rng.random()))
            live -= 1
    return steps


def run_free_list(steps: list[Step]) -> dict[str, int]:
    """Replay the steps on the first-fit free list."""
    heap = FirstFitFreeList(CAPACITY, ALIGNMENT)
    live: list[int] = []
    for step in steps:
        if step.nbytes:
            offset = heap.allocate(step.nbytes)
            if offset is None:
                raise SystemExit("baseline ran out of memory: raise CAPACITY")
            live.append(offset)
        else:
            i = int(step.pick * len(live))
            live[i], live[-1] = live[-1], live[i]
            heap.free(live.pop())
    return {}


class EpochTracker:
    """Each queue's epochs complete ``COMPLETION_LAG`` behind its submissions.

    Reading builds the completed frontier from a dict, as ``Runtime.completed`` does after
    each completion (it caches the frontier in between); here epochs advance with every
    operation, the worst case. The pool reads it only when the requester's own frontier
    does not settle the decision.
    """

    def __init__(self) -> None:
        self.submitted = dict.fromkeys(QUEUES, 0)
        self.forced = dict.fromkeys(QUEUES, 0)  # completed early by a wait

    def complete(self, ax: int, epoch: int) -> None:
        self.forced[ax] = max(self.forced[ax], epoch)

    def __call__(self) -> Frontier:
        forced = self.forced
        return Frontier(
            {ax: max(epoch - COMPLETION_LAG, forced[ax], 0) for ax, epoch in self.submitted.items()}
        )


def run_pool(steps: list[Step], *, dominated: bool) -> dict[str, int]:
    """Replay the steps on a BufferPool; requesters and deaths follow the queues' epochs."""
    tracker = EpochTracker()
    pool = BufferPool(CAPACITY, alignment=ALIGNMENT, completed=tracker, name="bench")
    live: list[Block] = []
    for step in steps:
        tracker.submitted[QUEUES[step.queue]] = step.epoch
        if step.nbytes:
            requester = step.everything if dominated else step.own
            decision = pool.try_allocate(step.nbytes, requester)
            while not isinstance(decision, Block):
                if not isinstance(decision, Wait):
                    raise SystemExit("pool ran out of memory: raise CAPACITY")
                for missing_axis, epoch in decision.frontier:
                    tracker.complete(missing_axis, epoch)
                decision = pool.try_allocate(step.nbytes, requester)
            live.append(decision)
        else:
            i = int(step.pick * len(live))
            live[i], live[-1] = live[-1], live[i]
            pool.free(live.pop(), step.own)
    stats = pool.statistics()
    return {
        "fresh": stats.fresh_allocations,
        "dominated": stats.reuses_dominated,
        "completed": stats.reuses_completed,
        "waits": stats.waits,
    }


def timed(
    run: Callable[[], dict[str, int]], counts: dict[str, dict[str, int]], label: str
) -> float:
    """µs per allocate+free pair of one run, garbage collection on as a user has it."""
    start = time.perf_counter()
    counts[label] = run()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", type=int, default=100_000, help="allocate+free pairs")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--rounds", type=int, default=5, help="runs per row, taking turns (median kept)"
    )
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite docs/benchmarks.md")
    args = parser.parse_args()

    steps = make_workload(args.ops, args.seed)
    counts: dict[str, dict[str, int]] = {}
    rows: list[tuple[str, Callable[[], dict[str, int]]]] = [
        ("free list, first fit (baseline)", lambda: run_free_list(steps)),
        ("BufferPool, dominated", lambda: run_pool(steps, dominated=True)),
        ("BufferPool, cross-queue", lambda: run_pool(steps, dominated=False)),
    ]
    ops = args.ops

    def sample(label: str, run: Callable[[], dict[str, int]]) -> Callable[[], float]:
        return lambda: timed(run, counts, label) / ops * 1e6

    # Rows take turns within each round, so a slow spell on a shared machine does not
    # land on one row only.
    figures = interleaved([(label, sample(label, run)) for label, run in rows], args.rounds)
    base = figures[rows[0][0]]
    table_rows = []
    for label, figure in figures.items():
        detail = ", ".join(f"{key} {value:,}" for key, value in counts[label].items())
        table_rows.append(
            [
                label,
                f"{2 * ops / (figure.median * ops / 1e6):,.0f}",
                figure.format(),
                ratio(figure, base),
                detail,
            ]
        )
    text = table(
        ["allocator", "ops/s (median)", "µs per allocate+free pair", "vs baseline", "reuse"],
        table_rows,
        align="lrrrl",
    )
    tracker = EpochTracker()
    tracker.submitted = dict.fromkeys(QUEUES, 100)
    reads = 100_000
    read = timeit.timeit(tracker, number=reads) / reads * 1e6
    print(f"{ops:,} allocate+free pairs, seed {args.seed}, {args.rounds} interleaved rounds")
    print(text)
    print(f"(rebuilding the completed frontier, as after each completion: {read:.2f} µs a read)")
    if not args.no_docs:
        body = (
            "What death-frontier checks cost: `BufferPool` against a plain first-fit free "
            "list with split and coalesce and no frontiers (the baseline, written in the "
            "benchmark with the same data structures), all replaying one pre-generated "
            f"random sequence of {ops:,} allocations and {ops:,} frees (sizes log-uniform "
            "from 256 B to 64 KiB, 256-byte alignment, at most 512 blocks live in 64 MiB, 4 "
            "queues taking turns), with garbage collection on. **dominated**: every "
            "requester knows every queue's latest epoch (rule 1 decides every reuse); "
            "**cross-queue**: a requester knows only its own queue and completion trails "
            "each queue by 4 epochs (rule 2 and the completed frontier decide most reuse). "
            f"Rows take turns, {args.rounds} rounds; medians (min-max), ratios of medians "
            "(per-round range).\n\n"
            + text
            + f"\n\nRebuilding the completed frontier from its dict, as after each "
            f"completion: {read:.2f} µs a read (the runtime caches it between completions)."
        )
        write_section("pool", "BufferPool allocate/free (`benchmarks/pool.py`)", body)


if __name__ == "__main__":
    main()
