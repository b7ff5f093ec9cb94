"""The paged KV cache: page-out and page-in of a session's cache, and its cost per decoded token.

Page-out / page-in: a ``PagedKVCache`` shaped like GPT-2 small's attention (12 layers,
12 heads of 64, float32) holding ``--tokens`` positions in pages of ``--page-tokens``
(64, the default) is filled through its ``update`` (the transformers Cache API), paged
out to the page file (``PagedKVCache.page_out``: device → host on the copy queue, host →
file on the storage queue, with the pager's defaults) and paged back in (``page_in``).
The baseline, in the
same run and alternating with it, is a raw sequential ``os.pwrite`` of the same bytes
from one buffer, then ``os.pread`` into preallocated memory. Both end their writes with
one ``os.fsync`` inside the timed region, and both files are dropped from the page cache
(``POSIX_FADV_DONTNEED``) before the reads. Every round trip is checked bit for bit
outside the timed region.

Decode: greedy decoding of ``--decode`` tokens with a 2-layer GPT-2 (from a config, fixed
seed) on transformers' ``DynamicCache`` called directly (the baseline), on a
``PagedKVCache`` through ``cache.run`` on a CPU device queue (a worker thread per step),
and on a ``PagedKVCache`` inline on the event loop (``reserve`` + ``pinned``). All three
produce the same tokens (checked). Per-token medians and spread over ``--repeat`` runs.
``--threads`` sets torch's intra-op threads (default: torch's own choice).

Run: ``python benchmarks/kv_cache_paging.py [--dir DIR] [--tokens 1024] [--decode 64]
[--repeat 5]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import transformers

import asyncfront as af
from asyncfront.devices import CpuDevice, StorageDevice
from asyncfront.memory import Pager, Tier
from asyncfront.models import DEFAULT_PAGE_TOKENS, PagedKVCache

MiB = 1 << 20
LAYERS, HEADS, HEAD_DIM = 12, 12, 64


def drop_cache(path: Path) -> None:
    """fsync ``path`` and evict its pages from the page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def raw_round_trip(path: Path, data: Any) -> tuple[float, float]:
    """Seconds to pwrite ``data`` (one buffer) + fsync, and to pread it back after a drop."""
    view = memoryview(data.numpy()).cast("B")
    start = time.perf_counter()
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        done = 0
        while done < len(view):
            done += os.pwrite(fd, view[done:], done)
        os.fsync(fd)
    finally:
        os.close(fd)
    write = time.perf_counter() - start
    drop_cache(path)
    out = torch.empty_like(data)
    target = memoryview(out.numpy()).cast("B")
    start = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        done = 0
        while done < len(target):
            done += os.preadv(fd, [target[done:]], done)
    finally:
        os.close(fd)
    read = time.perf_counter() - start
    assert torch.equal(out, data)
    return write, read


async def paged_round_trip(
    directory: Path, tokens: int, page_tokens: int, seed: int
) -> tuple[float, float, int]:
    """Seconds for a filled cache's page-out (+ fsync) and page-in after a drop; its bytes."""
    pages_per_layer = -(-tokens // page_tokens)
    page_bytes = 2 * HEADS * page_tokens * HEAD_DIM * 4
    need = LAYERS * pages_per_layer * page_bytes
    storage = StorageDevice(directory, name="nvme")
    devices = [
        CpuDevice("gpu0", memory=need + MiB),
        CpuDevice("host", memory=need + MiB),
        storage,
    ]
    async with af.open_runtime(devices) as rt:
        llm = rt.create_context("llm", device="gpu0", max_memory=need + MiB)
        host = rt.create_context("host", device="host", max_memory=need + MiB)
        pager = Pager(
            rt,
            host=host,
            copy=rt.queue("host", name="copy"),
            storage=storage.queue(),
            file="kv.bin",
        )
        async with pager:
            cache = PagedKVCache(
                pager, llm, layers=LAYERS, heads=HEADS, head_dim=HEAD_DIM, page_tokens=page_tokens
            )
            gen = torch.Generator().manual_seed(seed)
            kv = [torch.randn(2, 1, HEADS, tokens, HEAD_DIM, generator=gen) for _ in range(LAYERS)]

            def fill() -> None:
                for i, layer in enumerate(kv):
                    cache.update(layer[0], layer[1], i)

            await cache.run(llm.queue, fill)
            start = time.perf_counter()
            await cache.page_out(Tier.FILE)
            fsync(directory / "kv.bin")
            out = time.perf_counter() - start
            drop_cache(directory / "kv.bin")
            start = time.perf_counter()
            await cache.page_in()
            back = time.perf_counter() - start

            def check() -> bool:
                return all(
                    torch.equal(cache.paged_layers[i].keys, layer[0])
                    and torch.equal(cache.paged_layers[i].values, layer[1])
                    for i, layer in enumerate(kv)
                )

            assert await cache.run(llm.queue, check)
            nbytes = cache.statistics().nbytes
            await cache.aclose()
    return out, back, nbytes


def tiny_gpt2() -> Any:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2, n_embd=64, n_head=4, vocab_size=256, n_positions=256,
        initializer_range=0.3, bos_token_id=0, eos_token_id=None,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config).eval()


def step(model: Any, cache: Any, ids: Any) -> Any:
    with torch.no_grad():
        return model(ids, cache=cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)


def decode_dynamic(model: Any, count: int) -> tuple[float, list[int]]:
    cache = transformers.DynamicCache()
    ids, tokens = torch.tensor([[5, 17, 42, 99, 3]]), []
    start = time.perf_counter()
    for _ in range(count):
        ids = step(model, cache, ids)
        tokens.append(int(ids))
    return (time.perf_counter() - start) / count, tokens


async def decode_paged(
    directory: Path, model: Any, count: int, inline: bool
) -> tuple[float, list[int]]:
    storage = StorageDevice(directory, name="nvme")
    devices = [CpuDevice("gpu0", memory=64 * MiB), CpuDevice("host", memory=8 * MiB), storage]
    async with af.open_runtime(devices) as rt:
        llm = rt.create_context("llm", device="gpu0", max_memory=64 * MiB)
        host = rt.create_context("host", device="host", max_memory=8 * MiB)
        pager = Pager(rt, host=host, copy=rt.queue("host", name="copy"), storage=storage.queue())
        async with pager:
            cache = PagedKVCache.for_model(model, pager, llm)
            ids, tokens = torch.tensor([[5, 17, 42, 99, 3]]), []
            start = time.perf_counter()
            for _ in range(count):
                if inline:
                    await cache.reserve(ids.shape[-1])
                    async with cache.pinned():
                        ids = step(model, cache, ids)
                else:
                    ids = await cache.run(llm.queue, step, model, cache, ids)
                tokens.append(int(ids))
            seconds = (time.perf_counter() - start) / count
            await cache.aclose()
    return seconds, tokens


def summary(values: list[float], scale: float, unit: str) -> str:
    values = [v * scale for v in values]
    return (
        f"median {statistics.median(values):8.2f} {unit}  "
        f"(min {min(values):.2f}, max {max(values):.2f}, n={len(values)})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--dir", default=None, help="where the files go (default: a temp dir)")
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--decode", type=int, default=64)
    parser.add_argument("--page-tokens", type=int, default=DEFAULT_PAGE_TOKENS)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: its own)"
    )
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    versions = f"torch {torch.__version__}, transformers {transformers.__version__}"
    print(f"{platform.platform()}, {os.cpu_count()} CPUs, {versions}, "
          f"{torch.get_num_threads()} torch threads")  # fmt: skip
    results: dict[str, list[float]] = {k: [] for k in ("out", "in", "raw out", "raw in")}
    nbytes = 0
    with tempfile.TemporaryDirectory(dir=args.dir) as name:
        directory = Path(name)
        for r in range(args.repeat):
            raw = torch.randn(LAYERS, 2, HEADS, args.tokens, HEAD_DIM)
            w, rd = raw_round_trip(directory / "raw.bin", raw)
            results["raw out"].append(w)
            results["raw in"].append(rd)
            out, back, nbytes = asyncio.run(
                paged_round_trip(directory, args.tokens, args.page_tokens, r)
            )
            results["out"].append(out)
            results["in"].append(back)
        shape = f"{LAYERS} layers x {HEADS} heads x {HEAD_DIM}"
        print(f"\nKV cache of {args.tokens} positions, {shape}, float32: "
              f"{nbytes / MiB:.1f} MiB in pages of {args.page_tokens}")  # fmt: skip
        for key, label in (
            ("out", "PagedKVCache.page_out (+fsync)"),
            ("raw out", "raw pwrite + fsync         "),
            ("in", "PagedKVCache.page_in (cold) "),
            ("raw in", "raw pread (cold)           "),
        ):
            mib_s = [nbytes / MiB / v for v in results[key]]
            print(f"  {label} {summary(results[key], 1e3, 'ms')}  "
                  f"{statistics.median(mib_s):7.0f} MiB/s")  # fmt: skip

        model = tiny_gpt2()
        decode: dict[str, list[float]] = {"dynamic": [], "run": [], "inline": []}
        expected = None
        for _ in range(args.repeat):
            seconds, tokens = decode_dynamic(model, args.decode)
            decode["dynamic"].append(seconds)
            expected = expected or tokens
            assert tokens == expected
            for kind in ("run", "inline"):
                seconds, tokens = asyncio.run(
                    decode_paged(directory, model, args.decode, kind == "inline")
                )
                assert tokens == expected, f"{kind} decoded other tokens"
                decode[kind].append(seconds)
        print(f"\ngreedy decode of {args.decode} tokens, 2-layer GPT-2, per token:")
        for key, label in (
            ("dynamic", "DynamicCache, direct call    "),
            ("run", "PagedKVCache, cache.run      "),
            ("inline", "PagedKVCache, reserve+pinned "),
        ):
            print(f"  {label} {summary(decode[key], 1e3, 'ms')}")


if __name__ == "__main__":
    main()
