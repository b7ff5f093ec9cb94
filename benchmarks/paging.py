"""Paging throughput: the pager against raw sequential file I/O of the same bytes, same run.

Page-out: N blocks of device memory go device → host (copy queue) → page file (storage
queue) through ``Pager.page_out``, all submitted at once; raw: one thread writes the
same blocks' memory to a file with an ``os.pwrite`` loop. Page-in: ``Pager.page_in``
of every block (file → host → device) against an ``os.preadv`` loop into preallocated
memory. "staged" is the pager's default path through the host tier; "direct" is
``Pager(direct=True)``, where the storage device reads and writes device memory itself
(the "device" here is a CpuDevice, so CPU memory; on CUDA with KvikIO it would be
GPUDirect Storage). Both sides write into the same directory, end their writes with
one ``os.fsync`` of their file inside the timed region, and before the reads both
files are fsynced and dropped from the page cache (``POSIX_FADV_DONTNEED``) unless
``--warm`` keeps them cached. Every round trip is checked bit for bit outside the
timed region. Raw and pager runs alternate; each figure is the best of ``--repeat``.

With aiofiles installed, one more row reads the raw file whole with aiofiles
(``f.read()`` into a new bytes object), for comparison.

Run: ``python benchmarks/paging.py [--dir DIR] [--blocks 64] [--block-mib 4] [--repeat 3]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import asyncfront as af
from asyncfront.devices import CpuDevice, StorageDevice
from asyncfront.memory import Pager, Tier

MiB = 1 << 20


def drop_cache(path: Path, warm: bool) -> None:
    """fsync ``path`` and, unless ``warm``, evict its pages from the page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        if not warm:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def raw_write(path: Path, blocks: list[Any]) -> float:
    """Sequential pwrite of every block, then one fsync; seconds."""
    start = time.perf_counter()
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
    return time.perf_counter() - start


def raw_read(path: Path, blocks: list[Any]) -> float:
    """Sequential preadv into every block's memory; seconds."""
    start = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        offset = 0
        for block in blocks:
            view = memoryview(block.numpy())
            done = 0
            while done < len(view):
                n = os.preadv(fd, [view[done:]], offset + done)
                if n == 0:
                    raise EOFError(path)
                done += n
            offset += done
    finally:
        os.close(fd)
    return time.perf_counter() - start


async def aiofiles_read(path: Path) -> float | None:
    """Whole-file read with aiofiles (None when it is not installed); seconds."""
    try:
        import aiofiles
    except ImportError:
        return None
    start = time.perf_counter()
    async with aiofiles.open(path, "rb") as f:
        await f.read()
    return time.perf_counter() - start


async def pager_round_trip(
    directory: Path, sources: list[Any], staging_blocks: int, warm: bool, direct: bool
) -> tuple[float, float]:
    """Page every block out and back in through a Pager; seconds for each direction."""
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
        pager = Pager(rt, host=host, copy=copy, storage=queue, file="pages.bin", direct=direct)
        async with pager:
            pages = []
            for source in sources:
                page = await pager.allocate(device, (block_bytes,), torch.uint8)
                async with pager.use(page) as use:
                    await device.queue.submit(
                        use.tensor.copy_, source, waits=[use.wait], signals=[use.signal]
                    )
                pages.append(page)

            start = time.perf_counter()
            await asyncio.gather(*(pager.page_out(page, Tier.FILE) for page in pages))
            await nvme.sync(queue, "pages.bin")
            out_seconds = time.perf_counter() - start

            drop_cache(directory / "pages.bin", warm)
            start = time.perf_counter()
            await asyncio.gather(*(pager.page_in(page) for page in pages))
            in_seconds = time.perf_counter() - start

            for page, source in zip(pages, sources, strict=True):
                async with pager.use(page) as use:
                    same = await device.queue.submit(
                        torch.equal, use.tensor, source, waits=[use.wait], signals=[use.signal]
                    )
                if not same:
                    raise AssertionError(f"{page!r} did not round-trip bit for bit")
    return out_seconds, in_seconds


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


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--dir", default=None, help="directory for the files (default: /tmp)")
    parser.add_argument("--blocks", type=int, default=64)
    parser.add_argument("--block-mib", type=int, default=4)
    parser.add_argument("--staging", type=int, default=8, help="host staging budget, in blocks")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--warm", action="store_true", help="read from the page cache")
    args = parser.parse_args()

    block_bytes = args.block_mib * MiB
    total_mib = args.blocks * args.block_mib
    gen = torch.Generator().manual_seed(0)
    sources = [
        torch.randint(0, 256, (block_bytes,), dtype=torch.uint8, generator=gen)
        for _ in range(args.blocks)
    ]
    readback = [torch.empty_like(s) for s in sources]
    root = Path(tempfile.mkdtemp(prefix="asyncfront-paging-", dir=args.dir))
    best: dict[str, float] = {}

    def keep(label: str, seconds: float | None) -> None:
        if seconds is not None:
            best[label] = min(best.get(label, float("inf")), seconds)

    try:
        for _ in range(args.repeat):
            raw = root / "raw.bin"
            keep("raw write", raw_write(raw, sources))
            drop_cache(raw, args.warm)
            keep("raw read", raw_read(raw, readback))
            if not all(torch.equal(a, b) for a, b in zip(sources, readback, strict=True)):
                raise AssertionError("raw round trip differs")
            drop_cache(raw, args.warm)
            keep("aiofiles read", await aiofiles_read(raw))
            raw.unlink()
            for mode, direct in (("staged", False), ("direct", True)):
                run_dir = root / f"pager-{mode}"
                run_dir.mkdir()
                out_s, in_s = await pager_round_trip(
                    run_dir, sources, args.staging, args.warm, direct
                )
                keep(f"page-out {mode}", out_s)
                keep(f"page-in {mode}", in_s)
                shutil.rmtree(run_dir)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    cache = "warm page cache" if args.warm else "page cache dropped before reads"
    print(f"{args.blocks} blocks x {args.block_mib} MiB = {total_mib} MiB, best of {args.repeat}")
    print(f"dir {root.parent} ({filesystem(root.parent)}), fsync at the end of writes, {cache}")
    print(
        f"nproc {os.cpu_count()}, Python {platform.python_version()}, torch {torch.__version__}, "
        f"{platform.system()} {platform.release()}"
    )
    print()
    print(f"| {'':18} | {'MiB/s':>6} | {'of raw':>6} |")
    print(f"| {'-' * 18} | {'-' * 6}:| {'-' * 6}:|")
    rows = [
        ("raw write", "raw write"),
        ("page-out staged", "raw write"),
        ("page-out direct", "raw write"),
        ("raw read", "raw read"),
        ("page-in staged", "raw read"),
        ("page-in direct", "raw read"),
        ("aiofiles read", "raw read"),
    ]
    for label, baseline in rows:
        if label not in best:
            continue
        rate = total_mib / best[label]
        ratio = best[baseline] / best[label]
        print(f"| {label:18} | {rate:6.0f} | {ratio:6.0%} |")


if __name__ == "__main__":
    if sys.platform != "linux":
        sys.exit("this benchmark uses posix_fadvise and preadv: run it on Linux")
    asyncio.run(main())
