"""Soak: memory stays flat over long runs of submissions, allocations, contexts and graphs.

Four parts run one after another on one runtime, as a long-lived server would run
them, with the defaults a user gets (the trace on at its default capacity, logging at
its quiet default):

- submissions: 10^6 through 8 queues on 4 fake devices; each waits on the latest
  submission of another queue and signals its own semaphore (at most 4,096 outstanding);
- allocate/free: 2 x 10^5 cycles through two contexts' sessions (sizes 4 KiB to 1 MiB);
- contexts: 10^5 cycles of create_context, one allocation, close_context (every 100th
  context also runs work, so its queue starts, drains and retires);
- graph runs: 2 x 10^4 runs of a three-stage graph over two devices, after warm-up runs
  that refill the trace with graph records (they are larger: each carries its stage's
  annotations).

The process's resident memory (RSS, ``/proc/self/statm``) is sampled every tenth of a
part (every 10^5 submissions, 2 x 10^4 allocate/free cycles, 10^4 contexts, 2,000
graph runs). A part's warm-up is its first tenth; for the submissions it lasts until
the trace is full (its first sample with the trace at its bound). Its growth is the
largest sample after warm-up minus the warm-up sample; the baseline is that warm-up
sample, measured in the same run. Every part must grow less than 5 MiB.

Run: ``python benchmarks/soak.py`` (several minutes; rewrites its section of
docs/benchmarks.md) or ``python benchmarks/soak.py --quick`` (a tenth of each part,
no docs unless ``--write-docs``). Exits 1 if a part grew 5 MiB or more.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import asyncfront as af
from asyncfront.testing import FakeDevice

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "benchmarks.md"
BEGIN = "<!-- soak:begin (benchmarks/soak.py rewrites this section) -->"
END = "<!-- soak:end -->"
LIMIT_MIB = 5.0
SAMPLES = 10

SUBMISSIONS = 1_000_000
ALLOCATIONS = 200_000
CONTEXTS = 100_000
GRAPH_RUNS = 20_000


def rss_mib() -> float:
    """Resident memory of this process in MiB."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


@dataclass
class Part:
    """One part's samples: (operations done, RSS MiB, wall seconds)."""

    name: str
    operations: int
    unit: str
    samples: list[tuple[int, float, float]] = field(default_factory=list)
    note: str = ""
    warm_index: int | None = 0  # the sample that ends warm-up (None: not reached yet)

    @property
    def warm(self) -> float:
        return self.samples[self.warm_index or 0][1]

    @property
    def after(self) -> list[float]:
        """RSS samples after warm-up (the warm-up sample itself if there are none)."""
        start = (self.warm_index or 0) + 1
        return [rss for _, rss, _ in self.samples[start:]] or [self.warm]

    @property
    def growth(self) -> float:
        return max(self.after) - self.warm

    @property
    def seconds(self) -> float:
        return self.samples[-1][2]


class Sampler:
    """Calls ``sample()`` of a part every tenth of its operations."""

    def __init__(self, part: Part) -> None:
        self.part = part
        self.every = max(1, part.operations // SAMPLES)
        self.start = time.perf_counter()

    def tick(self, done: int) -> None:
        if done % self.every == 0:
            gc.collect()
            self.part.samples.append((done, rss_mib(), time.perf_counter() - self.start))
            n, rss, t = self.part.samples[-1]
            label = f"{self.part.name:<14} {n:>10,} {self.part.unit:<12}"
            print(f"  {label} RSS {rss:7.1f} MiB  {t:7.1f} s")


async def submissions(rt: af.Runtime, part: Part) -> None:
    queues = [rt.queue(d) for d in rt.devices.values() for _ in range(2)]
    sems = [rt.semaphore(name=f"s{i}") for i in range(len(queues))]
    counts = [0] * len(queues)
    outstanding: collections.deque[af.Submission] = collections.deque()
    sampler = Sampler(part)
    part.warm_index = None  # warm-up lasts until the trace is full
    for n in range(1, part.operations + 1):
        q = n % len(queues)
        other = (q + 3) % len(queues)
        waits = [(sems[other], counts[other])] if counts[other] else []
        counts[q] += 1
        outstanding.append(queues[q].submit(waits=waits, signals=[(sems[q], counts[q])]))
        if len(outstanding) > 4096:
            await outstanding.popleft()
        if n % sampler.every == 0:
            while outstanding:
                await outstanding.popleft()
            sampler.tick(n)
            if part.warm_index is None and len(rt.trace) == rt.trace.capacity:
                part.warm_index = len(part.samples) - 1
    part.note = f"trace {len(rt.trace):,} records kept, {rt.trace.dropped:,} dropped"


async def allocations(rt: af.Runtime, part: Part) -> None:
    a = rt.create_context("a", device="gpu", max_memory=256 * af.MiB)
    b = rt.create_context("b", device="gpu", max_memory=256 * af.MiB, qos=af.QoS.BURSTABLE)
    sizes = [4 * af.KiB << (i % 9) for i in range(97)]  # 4 KiB .. 1 MiB
    sampler = Sampler(part)
    async with rt.session(a) as sa, rt.session(b) as sb:
        held: collections.deque[tuple[af.Session, af.Buffer]] = collections.deque()
        for n in range(1, part.operations + 1):
            s = sa if n % 3 else sb
            held.append((s, await s.allocate(sizes[n % len(sizes)])))
            if len(held) > 32:
                owner, buf = held.popleft()
                owner.free(buf)
            sampler.tick(n)
        while held:
            owner, buf = held.popleft()
            owner.free(buf)
    rt.close_context(a)
    rt.close_context(b)


async def contexts(rt: af.Runtime, part: Part) -> None:
    sampler = Sampler(part)
    for n in range(1, part.operations + 1):
        ctx = rt.create_context(f"c{n}", device="gpu", max_memory=af.MiB)
        async with rt.session(ctx) as s:
            await s.allocate(64 * af.KiB)
            if n % 100 == 0:
                await s.run(sum, (1, 2))
        rt.close_context(ctx)
        if n % sampler.every == 0:
            await asyncio.sleep(0)  # let the last closed queue's task end
        sampler.tick(n)
    part.note = f"{len(rt.queues)} queues (the submissions' 8) and {len(rt.contexts)} contexts left"


async def graph_runs(rt: af.Runtime, part: Part) -> None:
    async def one_run() -> None:
        g = rt.graph("rag")
        tok = g.stage("tokenize", str.split, "what is a frontier", device="cpu")
        emb = g.stage("embed", len, tok, device="gpu")
        g.stage("answer", lambda n, words: f"{words[-1]}:{n}", emb, tok, device="cpu")
        run = await g.submit()
        await run.results()

    # Warm-up: refill the trace with graph records (three per run, each with its stage's
    # annotations, larger than a plain submission's) before the baseline sample.
    warmup = rt.trace.capacity // 3 + 1
    start = time.perf_counter()
    for _ in range(warmup):
        await one_run()
    gc.collect()
    part.samples.append((0, rss_mib(), time.perf_counter() - start))
    part.note = f"after {warmup:,} warm-up runs that refilled the trace"
    print(f"  {part.name:<14} {'warm-up':>10} {warmup:,} runs RSS {part.samples[0][1]:7.1f} MiB")
    sampler = Sampler(part)
    for n in range(1, part.operations + 1):
        await one_run()
        sampler.tick(n)


Body = Callable[[af.Runtime, Part], Awaitable[None]]


def run_parts(parts: list[tuple[Body, Part]]) -> list[Part]:
    """Run every part in turn on one runtime: a GiB "gpu", a "cpu" and two more devices."""

    async def main() -> None:
        devices = [
            FakeDevice("gpu", memory=af.GiB),
            FakeDevice("cpu", kind="cpu"),
            FakeDevice("d2"),
            FakeDevice("d3"),
        ]
        async with af.open_runtime(devices) as rt:
            for body, part in parts:
                await body(rt, part)

    asyncio.run(main())
    return [part for _, part in parts]


def machine() -> str:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next(
                (ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), ""
            )
    except OSError:
        pass
    return (
        f"{os.cpu_count()} cores ({model or platform.processor() or 'unknown CPU'}), "
        f"{platform.system()} {platform.release()}, Python {platform.python_version()}"
    )


def commit() -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return "unknown"
    return f"{head}{' + local changes' if dirty else ''}" if head else "unknown"


def section(parts: list[Part], command: str, started: str) -> str:
    lines = [
        BEGIN,
        "## Soak: memory over long runs (`benchmarks/soak.py`)",
        "",
        "Four parts in turn on one runtime with the defaults a user gets (trace on at its default "
        f"capacity of {af.DEFAULT_TRACE_CAPACITY:,} records, quiet logging); RSS sampled every "
        "tenth of a part. The baseline of each part is its own warm-up sample (after its "
        "first tenth; for the submissions, the first sample with the trace at its bound; "
        "for the graph runs, after warm-up runs that refill the trace with graph records); "
        f"growth is the largest later sample minus it, and must stay under {LIMIT_MIB:g} MiB.",
        "",
        "Command:",
        "",
        "```sh",
        command,
        "```",
        "",
        f"Machine: {machine()}; shared with other work during the run. Commit: {commit()}, "
        f"run {started}.",
        "",
        "| part | operations | wall s | RSS at warm-up MiB | RSS after, MiB | growth MiB | |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for p in parts:
        after = p.after
        verdict = "ok" if p.growth < LIMIT_MIB else "**over**"
        lines.append(
            f"| {p.name} | {p.operations:,} {p.unit} | {p.seconds:.0f} | {p.warm:.1f} | "
            f"{min(after):.1f} to {max(after):.1f} | {p.growth:+.2f} | {verdict} |"
        )
    lines += ["", "Samples (operations: RSS MiB):", ""]
    for p in parts:
        samples = ", ".join(f"{n:,}: {rss:.1f}" for n, rss, _ in p.samples)
        lines.append(f"- {p.name} ({p.note}): {samples}" if p.note else f"- {p.name}: {samples}")
    lines += ["", END]
    return "\n".join(lines)


def write_docs(text: str) -> None:
    doc = DOCS.read_text(encoding="utf-8")
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.DOTALL)
    if pattern.search(doc):
        doc = pattern.sub(lambda _: text, doc)
    else:
        doc = doc.rstrip("\n") + "\n\n" + text + "\n"
    DOCS.write_text(doc, encoding="utf-8")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="a tenth of every part")
    parser.add_argument("--write-docs", action="store_true", help="rewrite docs after --quick")
    parser.add_argument("--no-docs", action="store_true", help="leave docs/benchmarks.md alone")
    args = parser.parse_args()
    scale = 10 if args.quick else 1
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(machine())
    parts = run_parts(
        [
            (submissions, Part("submissions", SUBMISSIONS // scale, "submissions")),
            (allocations, Part("allocate/free", ALLOCATIONS // scale, "cycles")),
            (contexts, Part("contexts", CONTEXTS // scale, "create/close")),
            (graph_runs, Part("graph runs", GRAPH_RUNS // scale, "runs")),
        ]
    )
    for p in parts:
        print(f"{p.name:<14} growth after warm-up {p.growth:+.2f} MiB ({p.note})")
    command = "python benchmarks/soak.py" + (" --quick" if args.quick else "")
    if not args.no_docs and (not args.quick or args.write_docs):
        write_docs(section(parts, command, started))
        print(f"wrote the soak section of {DOCS.relative_to(ROOT)}")
    return 0 if all(p.growth < LIMIT_MIB for p in parts) else 1


if __name__ == "__main__":
    sys.exit(main())
