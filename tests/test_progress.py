"""Progress: rich bars on a terminal, silence everywhere else."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console

import asyncfront as af
from asyncfront.__main__ import main
from asyncfront._progress import progress
from asyncfront.devices import CpuDevice


def test_nothing_is_printed_when_not_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    """Without a terminal, a progress block draws nothing on stdout or stderr."""
    with progress("loading", total=3) as shown:
        for _ in range(3):
            shown.advance()
    assert capsys.readouterr() == ("", "")


def test_a_terminal_shows_the_bar() -> None:
    """On a (forced) terminal the description and the step count are drawn."""
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=100)
    with progress("paging out 3 pages", total=3, console=console) as shown:
        for _ in range(3):
            shown.advance()
    text = out.getvalue()
    assert "paging out 3 pages" in text and "3/3" in text


def test_nested_operations_report_through_the_outer_bar_only() -> None:
    """A progress block inside another draws nothing of its own."""
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=100)
    with progress("outer", total=1, console=console) as outer:
        with progress("inner", total=1, console=console) as inner:
            inner.advance()
        outer.advance()
    assert "outer" in out.getvalue() and "inner" not in out.getvalue()


def test_environment_forces_progress_on_and_off(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """ASYNCFRONT_PROGRESS=1 draws on stderr even when it is not a terminal; 0 never draws."""
    monkeypatch.setenv("ASYNCFRONT_PROGRESS", "1")
    with progress("forced", total=1) as shown:
        shown.advance()
    captured = capsys.readouterr()
    assert captured.out == "" and "forced" in captured.err
    monkeypatch.setenv("ASYNCFRONT_PROGRESS", "0")
    console = Console(file=io.StringIO(), force_terminal=True)
    with progress("off", total=1, console=console) as shown:
        shown.advance()
    assert console.file.getvalue() == ""  # type: ignore[attr-defined]


def test_demo_is_quiet_off_a_terminal_and_shows_progress_on_one(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The simulated demo writes no progress to a pipe, and a bar to a terminal's stderr."""
    assert main(["demo", "--simulated", "--trace", ""]) == 0
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("ASYNCFRONT_PROGRESS", "1")
    assert main(["demo", "--simulated", "--trace", ""]) == 0
    captured = capsys.readouterr()
    assert "simulating the voice pipeline" in captured.err
    assert "simulating" not in captured.out


async def test_weight_loads_show_progress_on_a_terminal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """ensure_resident draws a bar per load on a terminal, nothing otherwise."""
    torch = pytest.importorskip("torch")
    async with af.open_runtime([CpuDevice("gpu0", memory=1 << 20)]) as rt:
        rt.create_context("bert", device="gpu0", max_memory=64 * af.KiB)
        rt.create_context("t5", device="gpu0", max_memory=64 * af.KiB)
        await rt.ensure_resident(rt.weights("bert", {"w": torch.zeros(8, 8)}), "gpu0")
        assert capsys.readouterr().err == ""
        monkeypatch.setenv("ASYNCFRONT_PROGRESS", "1")
        await rt.ensure_resident(rt.weights("t5", {"w": torch.zeros(8, 8)}), "gpu0")
        assert "loading t5" in capsys.readouterr().err
