"""Paging throughput: the pager against raw sequential file I/O of the same bytes, same run.

Page-out: N blocks of device memory go device → host (copy queue) → page file (storage
queue) through ``Pager.page_out``, all submitted at once; raw: one thread writes the
same blocks' memory to a file with an ``os.pwrite`` loop. Page-in: ``Pager.page_in``
of every block (file → host → device) against an ``os.preadv`` loop into preallocated
memory. "staged" is the pager's default path through the host tier; "direct" is
``Pager(direct=True)``, where the storage device reads and writes device memory itself
(the "device" here is a CpuDevice, so CPU memory; on CUDA with KvikIO it would be
GPUDirect Storage). The pager's default verifies the file tier (a CRC32C per page on
page-out, checked on page-in); rows marked "no CRC" are ``Pager(verify=False)``, to
show what the checksums cost. Both sides write into the same directory, end their
writes with one ``os.fsync`` of their file inside the timed region, and before every
read both files are fsynced and dropped from the page cache (``POSIX_FADV_DONTNEED``)
unless ``--warm`` keeps them cached. Every round trip is checked bit for bit outside
the timed region. "raw read + CRC32C" is the raw loop reading 1 MiB pieces and folding
each into a CRC32C as it arrives, the least a verified read costs. Raw and pager runs
alternate within each repeat. Each row gives the median of ``--repeat`` runs, their
spread (slowest-fastest), the median's share of the raw loop's median, and the median
of each run's share of the raw run of the same repeat ("paired": steadier where other
work shares the machine), and the CPU seconds the process spent per GiB moved (all
threads, kernel time included: what a path costs whether or not the CPUs are busy).

With aiofiles installed, one more row reads the raw file whole with aiofiles
(``f.read()`` into a new bytes object), for comparison. ``--crc`` first measures the
checksum functions alone on one block in memory: ``crc32c`` (the one the storage device
uses), ``google-crc32c`` when installed, and ``zlib.crc32``.

Run: ``python benchmarks/paging.py [--dir DIR] [--blocks 64] [--block-mib 4] [--repeat 5]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch

import asyncfront as af
from asyncfront.devices import CpuDevice, StorageDevice
from asyncfront.memory import Pager, Tier

MiB = 1 << 20


class Timing(NamedTuple):
    """Wall seconds of one timed transfer, and the CPU seconds the process spent in it."""

    seconds: float
    cpu: float


def clock() -> Timing:
    """Now, on both clocks (all of the process's threads count for the CPU clock)."""
    return Timing(time.perf_counter(), time.process_time())


def since(start: Timing) -> Timing:
    """What passed on both clocks since ``start``."""
    now = clock()
    return Timing(now.seconds - start.seconds, now.cpu - start.cpu)


def drop_cache(path: Path, warm: bool) -> None:
    """fsync ``path`` and, unless ``warm``, evict its pages from the page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        if not warm:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def raw_write(path: Path, blocks: list[Any]) -> Timing:
    """Sequential pwrite of every block, then one fsync."""
    start = clock()
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        offset = 0
        for block in blocks:
            view = memoryview(block.numpy())
            done = 0
            while done < len(view):
                done += os.pwrite(fd, view[done:], offset + done)
            offset += done
        os.fsync(fd)
    finally:
        os.close(fd)
    return since(start)


def raw_read(path: Path, blocks: list[Any], checksum: bool = False) -> Timing:
    """Sequential preadv into every block's memory.

    With ``checksum``, each block is read in 1 MiB pieces and each piece's CRC32C is
    folded in right after it arrives, as the storage device does: the least a verified
    read can cost.
    """
    import crc32c

    piece = MiB if checksum else None
    start = clock()
    fd = os.open(path, os.O_RDONLY)
    try:
        offset = 0
        for block in blocks:
            view = memoryview(block.numpy())
            crc = 0
            done = 0
            while done < len(view):
                end = len(view) if piece is None else min(done + piece, len(view))
                n = os.preadv(fd, [view[done:end]], offset + done)
                if n == 0:
                    raise EOFError(path)
                if checksum:
                    crc = crc32c.crc32c(view[done : done + n], crc)
                done += n
            offset += done
    finally:
        os.close(fd)
    return since(start)


async def aiofiles_read(path: Path) -> Timing | None:
    """Whole-file read with aiofiles (None when it is not installed)."""
    try:
        import aiofiles
    except ImportError:
        return None
    start = clock()
    async with aiofiles.open(path, "rb") as f:
        await f.read()
    return since(start)


async def pager_round_trip(
    directory: Path,
    sources: list[Any],
    staging_blocks: int,
    warm: bool,
    direct: bool,
    verify: bool,
) -> tuple[Timing, Timing]:
    """Page every block out and back in through a Pager; the timing of each direction."""
    block_bytes = sources[0].numel()
    total = block_bytes * len(sources)
    devices = [
        CpuDevice("gpu0", workers=2, memory=total),
        CpuDevice("host", workers=2, memory=staging_blocks * block_bytes),
        StorageDevice(directory, name="nvme", workers=2),
    ]
    async with af.open_runtime(devices, trace=False) as rt:
        device = rt.create_context("kv", device="gpu0", max_memory=total)
        host = rt.create_context("host", device="host", max_memory=staging_blocks * block_bytes)
        nvme = rt.device("nvme")
        assert isinstance(nvme, StorageDevice)
        queue = nvme.queue(name="nvme.pages")
        copy = rt.queue("host", name="copy")
        pager = Pager(
            rt,
            host=host,
            copy=copy,
            storage=queue,
            file="pages.bin",
            direct=direct,
            verify=verify,
        )
        async with pager:
            pages = []
            for source in sources:
                page = await pager.allocate(device, (block_bytes,), torch.uint8)
                async with pager.use(page) as use:
                    await device.queue.submit(
                        use.tensor.copy_, source, waits=[use.wait], signals=[use.signal]
                    )
                pages.append(page)

            start = clock()
            await asyncio.gather(*(pager.page_out(page, Tier.FILE) for page in pages))
            await nvme.sync(queue, "pages.bin")
            out_timing = since(start)

            drop_cache(directory / "pages.bin", warm)
            start = clock()
            await asyncio.gather(*(pager.page_in(page) for page in pages))
            in_timing = since(start)

            for page, source in zip(pages, sources, strict=True):
                async with pager.use(page) as use:
                    same = await device.queue.submit(
                        torch.equal, use.tensor, source, waits=[use.wait], signals=[use.signal]
                    )
                if not same:
                    raise AssertionError(f"{page!r} did not round-trip bit for bit")
    return out_timing, in_timing


def filesystem(path: Path) -> str:
    """The filesystem type and device of ``path`` (from ``df``)."""
    try:
        out = subprocess.run(
            ["df", "-T", str(path)], capture_output=True, text=True, check=True
        ).stdout.splitlines()[-1]
        fields = out.split()
        return f"{fields[1]} on {fields[0]}"
    except (OSError, subprocess.CalledProcessError, IndexError):
        return "unknown"


def crc_throughput(block: Any, repeat: int) -> list[tuple[str, float, float, float]]:
    """GB/s of each checksum function over ``block`` in memory: (name, median, min, max)."""
    view = memoryview(block.numpy())
    frozen = bytes(view)  # google-crc32c takes read-only buffers only
    functions: list[tuple[str, Callable[[], object]]] = []
    import crc32c

    functions.append(("crc32c (used)", lambda: crc32c.crc32c(view)))
    try:
        import google_crc32c
    except ImportError:
        pass
    else:
        functions.append(
            (f"google-crc32c ({google_crc32c.implementation})", lambda: google_crc32c.value(frozen))
        )
    functions.append(("zlib.crc32", lambda: zlib.crc32(view)))
    rows = []
    for name, fn in functions:
        rates = []
        for _ in range(repeat):
            start = time.perf_counter()
            fn()
            rates.append(len(view) / (time.perf_counter() - start) / 1e9)
        rows.append((name, statistics.median(rates), min(rates), max(rates)))
    return rows


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--dir", default=None, help="directory for the files (default: /tmp)")
    parser.add_argument("--blocks", type=int, default=64)
    parser.add_argument("--block-mib", type=int, default=4)
    parser.add_argument("--staging", type=int, default=8, help="host staging budget, in blocks")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--warm", action="store_true", help="read from the page cache")
    parser.add_argument("--crc", action="store_true", help="also time the checksum functions")
    args = parser.parse_args()

    load_at_start = os.getloadavg()
    block_bytes = args.block_mib * MiB
    total_mib = args.blocks * args.block_mib
    gen = torch.Generator().manual_seed(0)
    sources = [
        torch.randint(0, 256, (block_bytes,), dtype=torch.uint8, generator=gen)
        for _ in range(args.blocks)
    ]
    readback = [torch.empty_like(s) for s in sources]
    crc_rows = crc_throughput(sources[0], max(args.repeat, 7)) if args.crc else []
    root = Path(tempfile.mkdtemp(prefix="asyncfront-paging-", dir=args.dir))
    runs: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}

    def keep(label: str, timing: Timing | None) -> None:
        if timing is not None:
            runs.setdefault(label, []).append(timing.seconds)
            cpu.setdefault(label, []).append(timing.cpu)

    modes = [
        ("staged", False, True),
        ("direct", True, True),
        ("staged, no CRC", False, False),
        ("direct, no CRC", True, False),
    ]
    try:
        for _ in range(args.repeat):
            raw = root / "raw.bin"
            keep("raw write", raw_write(raw, sources))
            drop_cache(raw, args.warm)
            keep("raw read", raw_read(raw, readback))
            if not all(torch.equal(a, b) for a, b in zip(sources, readback, strict=True)):
                raise AssertionError("raw round trip differs")
            drop_cache(raw, args.warm)
            keep("raw read + CRC32C", raw_read(raw, readback, checksum=True))
            drop_cache(raw, args.warm)
            keep("aiofiles read", await aiofiles_read(raw))
            raw.unlink()
            for mode, direct, verify in modes:
                run_dir = root / f"pager-{mode.replace(', ', '-').replace(' ', '-')}"
                run_dir.mkdir()
                out_timing, in_timing = await pager_round_trip(
                    run_dir, sources, args.staging, args.warm, direct, verify
                )
                keep(f"page-out {mode}", out_timing)
                keep(f"page-in {mode}", in_timing)
                shutil.rmtree(run_dir)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    cache = "warm page cache" if args.warm else "page cache dropped before every read"
    print(f"{args.blocks} blocks x {args.block_mib} MiB = {total_mib} MiB, {args.repeat} runs")
    print(f"dir {root.parent} ({filesystem(root.parent)}), fsync at the end of writes, {cache}")
    print(
        f"nproc {os.cpu_count()}, Python {platform.python_version()}, torch {torch.__version__}, "
        f"{platform.system()} {platform.release()}"
    )
    start_load = ", ".join(f"{x:.1f}" for x in load_at_start)
    end_load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"load average (1, 5, 15 min) at the start {start_load}, at the end {end_load}")
    if crc_rows:
        print()
        print(f"checksum of one {args.block_mib} MiB block in memory, GB/s:")
        print(f"| {'function':28} | {'median':>6} | {'spread':>11} |")
        print(f"| {'-' * 28} | {'-' * 6}:| {'-' * 11}:|")
        for name, median, low, high in crc_rows:
            print(f"| {name:28} | {median:6.2f} | {low:5.2f}-{high:5.2f} |")
    print()
    print("MiB/s: median of the runs, spread (slowest-fastest), median's share of raw's median,")
    print("the median of each run's share of the raw run of its repeat (paired), and the CPU")
    print("time of the process (all threads) per GiB moved, median")
    head = f"| {'':24} | {'median':>6} | {'spread':>11} | {'of raw':>6} | {'paired':>6} |"
    print(f"{head} {'CPU s/GiB':>9} |")
    print(f"| {'-' * 24} | {'-' * 6}:| {'-' * 11}:| {'-' * 6}:| {'-' * 6}:| {'-' * 9}:|")
    rows = [("raw write", "raw write")]
    rows += [(f"page-out {mode}", "raw write") for mode, _, _ in modes]
    rows += [("raw read", "raw read"), ("raw read + CRC32C", "raw read")]
    rows += [(f"page-in {mode}", "raw read") for mode, _, _ in modes]
    rows += [("aiofiles read", "raw read")]
    for label, baseline in rows:
        if label not in runs:
            continue
        rates = [total_mib / seconds for seconds in runs[label]]
        median = statistics.median(rates)
        ratio = median / statistics.median(total_mib / s for s in runs[baseline])
        spread = f"{min(rates):5.0f}-{max(rates):5.0f}"
        paired = statistics.median(
            base / seconds for base, seconds in zip(runs[baseline], runs[label], strict=True)
        )
        cpu_per_gib = statistics.median(cpu[label]) * 1024 / total_mib
        row = f"| {label:24} | {median:6.0f} | {spread:>11} | {ratio:6.0%} | {paired:6.0%} |"
        print(f"{row} {cpu_per_gib:9.3f} |")


if __name__ == "__main__":
    if sys.platform != "linux":
        sys.exit("this benchmark uses posix_fadvise and preadv: run it on Linux")
    asyncio.run(main())
