"""A two-stage pipeline across two nodes of a local Ray cluster, on a laptop.

Starts a two-node Ray cluster on 127.0.0.1 (a private temp dir, removed at the end), runs
stage 1 of each request on node 0 and stage 2 on node 1, submitted second stage first,
and prints each result with the nodes its frontier names. Pass ``--address auto`` to
run on a cluster started with ``ray start`` instead.

Run: python examples/cluster_pipeline.py [--requests 4] [--address auto]
"""

from __future__ import annotations

import argparse
import asyncio

import asyncfront as af


def tokenize(text: str) -> list[str]:
    return text.split()


def count(words: list[str]) -> int:
    return len(words)


async def main(requests: int, address: str | None) -> None:
    async with af.open_cluster(address, nodes=2) as cluster:
        first, second = cluster.nodes
        stage1, stage2 = first.queue("cpu", name="tokenize"), second.queue("cpu", name="count")
        tokenized = cluster.semaphore("tokenized", owner=first)
        counted = cluster.semaphore("counted", owner=second)
        texts = [f"request {i} has {'many ' * i}words" for i in range(1, requests + 1)]
        # Stage 2 is queued first; it runs once node 0 signals. (Results stay on their
        # node for work there; tensors cross nodes over cluster.link, see docs/cluster.md.)
        outs = []
        for i, text in enumerate(texts, start=1):
            outs.append(
                stage2.submit(
                    lambda text=text: count(tokenize(text)),
                    waits=[(tokenized, i)],
                    signals=[(counted, i)],
                    name=f"count{i}",
                )
            )
        for i, text in enumerate(texts, start=1):
            stage1.submit(tokenize, text, signals=[(tokenized, i)], name=f"tokenize{i}")
        for i, out in enumerate(outs, start=1):
            words = await out
            nodes = sorted({af.axis_fields(a).node for a, _ in out.frontier or ()})
            print(f"request {i}: {words} words; its frontier names nodes {nodes}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=4)
    parser.add_argument("--address", default=None)
    args = parser.parse_args()
    asyncio.run(main(args.requests, args.address))
