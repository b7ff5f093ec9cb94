"""KV paging of an idle chat session to NVMe and back (scenario B2b), for real on the CPU.

Six chat sessions share a KV budget of one block each. Session 3 goes idle; session 1
outgrows its block, so the pager writes session 3's block to a page file and session 1
reuses the memory; then session 3 resumes, its block is read back and the decode finds
its KV bit for bit. The scenario is `asyncfront/scenarios/kv_paging.py`; this program
runs it and prints who was paged, the bytes moved, timings and frontiers.

Run: python examples/kv_paging.py [--dir DIR] [--sessions N]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile

from asyncfront.scenarios.kv_paging import MAX_SESSIONS, MIN_SESSIONS, check_sessions, simulate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--dir", default=None, help="where the page file goes (default: a temp dir)"
    )
    parser.add_argument(
        "--sessions",
        type=int,
        default=6,
        help=f"chat sessions sharing the KV budget, {MIN_SESSIONS}..{MAX_SESSIONS} (default 6)",
    )
    args = parser.parse_args()
    try:
        check_sessions(args.sessions)
    except ValueError as error:
        parser.error(str(error))
    with tempfile.TemporaryDirectory(dir=args.dir) as directory:
        report = asyncio.run(simulate(directory, sessions=args.sessions))
    print(report.describe())
    nvme = report.queues["nvme"].axis
    assert report.idle_digest == report.resumed_digest, "the KV did not survive the round trip"
    assert report.resumed_frontier.get(nvme) > 0, (
        "the resumed decode does not carry the storage axis"
    )


if __name__ == "__main__":
    main()
