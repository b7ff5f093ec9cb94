"""A real fine-tune whose Adam moments page to a file and back every step (scenario B2c).

A 2-layer GPT-2, built from a config under a fixed seed, fine-tunes on a fixed text on
the CPU. Its Adam moments live in pager pages (``PagedOptimizerState``): after each
forward pass they are copied to host memory and written to a page file on the storage
queue while the backward pass runs, read back before the optimizer step, and the step
waits for both (``train_sem`` and ``page_sem`` as in B2c). The same fine-tune then runs
with PyTorch's own optimizer state; the program prints both, checks that losses and
final weights are bit-identical, shows each step's page-out against its backward pass,
and can write the paged run's trace (Perfetto JSON, or an HTML timeline).

Run: python examples/finetune_paging.py [--steps N] [--dir DIR] [--trace PATH] [--html PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from typing import Any

import torch

import asyncfront as af
from asyncfront.scenarios.finetune_paging import FinetuneReport, finetune_devices, run_finetune


async def finetune(
    directory: str, paged: bool, steps: int, trace: str | None, html: str | None
) -> FinetuneReport:
    async with af.open_runtime(finetune_devices(directory)) as rt:
        report = await run_finetune(rt, paged=paged, steps=steps)
    if trace:
        rt.trace.export_perfetto(trace)
    if html:
        rt.trace.export_html(html)
    return report


def same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument(
        "--dir", default=None, help="where the page file goes (default: a temp dir)"
    )
    parser.add_argument("--trace", default=None, help="write the paged run's Perfetto trace here")
    parser.add_argument("--html", default=None, help="write the paged run's HTML timeline here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as directory:
        paged = asyncio.run(finetune(directory, True, args.steps, args.trace, args.html))
        plain = asyncio.run(finetune(directory, False, args.steps, None, None))
    print(paged.describe())
    print(plain.describe())
    for step in paged.steps:
        out = step.page_out_interval
        assert out is not None
        start = step.backward.started_at
        begin, end = (out[0] - start) * 1e3, (out[1] - start) * 1e3
        print(
            f"step {step.step}: page-out {begin:+.1f} to {end:+.1f} ms from the backward's "
            f"start (backward {step.backward.duration * 1e3:.1f} ms)"
        )
    identical = paged.losses == plain.losses and same(paged.weights, plain.weights)
    print(f"losses and final weights bit-identical: {identical}")
    assert identical, "paging the optimizer state changed the fine-tune"


if __name__ == "__main__":
    main()
