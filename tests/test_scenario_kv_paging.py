"""Scenario B2b: an idle session's KV cache paged to NVMe under pressure and back, bit for bit."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from asyncfront.scenarios.kv_paging import KvPagingReport, simulate

pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> KvPagingReport:
    return asyncio.run(simulate(tmp_path_factory.mktemp("nvme"), sessions=6, idle=3, grower=1))


def test_the_idle_sessions_kv_is_paged_out_under_pressure(report: KvPagingReport) -> None:
    """When the budget is full and a session grows, the idle session's block goes to NVMe."""
    assert report.evicted_for_growth == ("kv/s3",)
    nvme, llama = report.queues["nvme"].axis, report.queues["llama"].axis
    out = report.page_out_frontier
    assert out.get(nvme) >= 1  # written on the storage axis ...
    assert out.get(report.queues["copy"].axis) >= 1  # ... from the host copy ...
    assert out.get(llama) >= 1  # ... after the session's last decode


def test_another_session_uses_the_freed_memory(report: KvPagingReport) -> None:
    """The growing session's new block takes the device memory the idle block left."""
    assert report.growth_offset is not None and report.growth_offset == report.idle_offset
    assert report.grown.done() and report.grown.exception() is None


def test_the_idle_session_resumes_with_bit_identical_kv(report: KvPagingReport) -> None:
    """After the page-in, the resumed decode finds exactly the KV the session left."""
    assert report.resumed_digest == report.idle_digest
    assert report.statistics.page_ins == 1 and report.statistics.bytes_in == report.block_bytes


def test_the_resumed_frontier_carries_the_storage_axis(report: KvPagingReport) -> None:
    """The resumed decode's frontier has the read on the storage axis, after the page-out."""
    nvme = report.queues["nvme"].axis
    resumed = report.resumed_frontier
    assert resumed.get(nvme) > report.page_out_frontier.get(nvme)  # the read came after the write
    assert resumed >= report.page_out_frontier


def test_example_program_runs(tmp_path: Path) -> None:
    """examples/kv_paging.py runs and reports an identical round trip."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "kv_paging.py"), "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert "identical" in out.stdout and "nvme.kv" in out.stdout


@pytest.mark.parametrize("sessions", [2, 3])
def test_the_example_runs_with_few_sessions(tmp_path: Path, sessions: int) -> None:
    """examples/kv_paging.py --sessions 2 (or 3) picks sessions that exist and round-trips."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "kv_paging.py"), "--dir", str(tmp_path),
         "--sessions", str(sessions)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert f"{sessions} sessions" in out.stdout and "identical" in out.stdout
    assert "Traceback" not in out.stderr and "Stalled" not in out.stderr


@pytest.mark.parametrize("sessions", ["1", "0", "-2", "65"])
def test_the_example_refuses_a_session_count_out_of_range(tmp_path: Path, sessions: str) -> None:
    """An out-of-range --sessions is a one-line usage error, exit status 2, no traceback."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "kv_paging.py"), "--dir", str(tmp_path),
         "--sessions", sessions],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2
    assert (
        f"error: sessions must be 2..64 (one session goes idle while another grows), not {sessions}"
        in out.stderr
    )
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"sessions": 1}, "sessions must be 2..64"),
        ({"sessions": 4, "idle": 5}, "idle must be a session 1..4, not 5"),
        ({"sessions": 4, "idle": 2, "grower": 2}, "both are 2"),
    ],
)
def test_the_scenario_refuses_sessions_it_cannot_run(
    tmp_path: Path, options: dict[str, int], message: str
) -> None:
    """simulate refuses impossible sessions with a ValueError before it opens anything."""
    with pytest.raises(ValueError, match=message):
        asyncio.run(simulate(tmp_path, **options))
    assert list(tmp_path.iterdir()) == []
