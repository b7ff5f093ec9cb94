"""The device conformance suite: every device passes it, and broken devices fail it."""

from __future__ import annotations

from typing import Any

import pytest

from asyncfront._queue import Submission
from asyncfront.devices import CpuDevice, Device
from asyncfront.testing import CONFORMANCE_CHECKS, FakeDevice, check_device_conformance


def fake(*, concurrency: int, memory: int | None) -> Device:
    return FakeDevice("fake", concurrency=concurrency, memory=memory or 0)


def cpu(*, concurrency: int, memory: int | None) -> Device:
    return CpuDevice("cpu", workers=concurrency, memory=memory)


def torch_cpu(*, concurrency: int, memory: int | None) -> Device:
    pytest.importorskip("torch")
    from asyncfront.devices import TorchDevice

    return TorchDevice("cpu", workers=concurrency, memory=memory)


@pytest.mark.parametrize("check", CONFORMANCE_CHECKS)
def test_fake_device_conforms(check: str) -> None:
    """FakeDevice passes every check in virtual time."""
    check_device_conformance(fake, virtual=True, checks=[check])


@pytest.mark.parametrize("check", CONFORMANCE_CHECKS)
def test_cpu_device_conforms(check: str) -> None:
    """CpuDevice passes every check in real time on its threads."""
    check_device_conformance(cpu, virtual=False, checks=[check])


@pytest.mark.parametrize("check", CONFORMANCE_CHECKS)
def test_torch_cpu_device_conforms(check: str) -> None:
    """TorchDevice('cpu') passes every check in real time on its threads."""
    pytest.importorskip("torch")
    check_device_conformance(torch_cpu, virtual=False, checks=[check])


def test_whole_suite_runs_by_default() -> None:
    """Without ``checks`` the suite runs every check."""
    check_device_conformance(fake, virtual=True)


def test_unknown_check_is_refused() -> None:
    """A misspelt check name is an error, not a silent pass."""
    with pytest.raises(ValueError, match="unknown conformance checks"):
        check_device_conformance(fake, virtual=True, checks=["fifo", "prioirty"])


class _LosesResults(FakeDevice):
    async def execute(self, submission: Submission) -> Any:
        await super().execute(submission)
        return None


class _SwallowsErrors(FakeDevice):
    async def execute(self, submission: Submission) -> Any:
        try:
            return await super().execute(submission)
        except ValueError:
            return None


class _IgnoresPriority(FakeDevice):
    async def acquire(self, priority: int) -> None:
        await super().acquire(0)  # first come, first served


class _OneSlotOnly(FakeDevice):
    def __init__(self, name: str, concurrency: int = 1, memory: int = 0) -> None:
        super().__init__(name, concurrency=1, memory=memory)


@pytest.mark.parametrize(
    ("device_class", "check", "message"),
    [
        (_LosesResults, "results", "returned None, not 21"),
        (_SwallowsErrors, "failure", "a raising work's submission completed"),
        (_IgnoresPriority, "priority", r"expected \['blocker', 'high0'"),
        (_OneSlotOnly, "concurrency", "with 1 slots, asked for 2"),
    ],
)
def test_suite_catches_broken_devices(
    device_class: type[FakeDevice], check: str, message: str
) -> None:
    """Each check fails, naming itself and the violation, on a device that breaks it."""

    def make(*, concurrency: int, memory: int | None) -> Device:
        return device_class("broken", concurrency=concurrency, memory=memory or 0)

    with pytest.raises(AssertionError, match=rf"check '{check}' failed: .*{message}"):
        check_device_conformance(make, virtual=True, checks=[check])


def test_memory_check_is_skipped_without_memory_capacity() -> None:
    """A device that tracks no memory passes the memory check without a pool."""

    def untracked(*, concurrency: int, memory: int | None) -> Device:
        return CpuDevice("cpu", workers=concurrency)

    check_device_conformance(untracked, virtual=False, checks=["memory"])
