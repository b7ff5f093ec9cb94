"""The asyncfront pytest plugin: ``virtual_runtime`` and ``fake_device`` fixtures.

Installed with asyncfront (the ``pytest11`` entry point ``asyncfront``), so a suite
uses the fixtures without imports:

* ``fake_device(name, **options)`` makes a :class:`~asyncfront.testing.FakeDevice`
  (a fresh name when none is given).
* ``virtual_runtime`` is an open runtime, for ``async def`` tests run by pytest-asyncio,
  on the devices of the ``virtual_runtime_devices`` fixture (override it to choose
  them). The test's event loop runs in virtual time for the test: timers cost no wall
  time, and a test in which nothing can ever happen fails with
  ``looptime.IdleTimeoutError`` after a second instead of hanging. Like
  :func:`~asyncfront.testing.run_virtual`, the loop polls I/O once before its clock
  jumps to the next timer (looptime's default is 42 times).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable
from typing import Any

import looptime
import pytest

from .._runtime import Runtime, open_runtime
from ..devices.fake import FakeDevice
from ._virtual import DEFAULT_NOOP_CYCLES

__all__ = ("fake_device", "virtual_runtime", "virtual_runtime_devices")

try:  # pytest-asyncio runs async fixtures in its strict mode only when marked as its own
    from pytest_asyncio import fixture as _async_fixture
except ImportError:  # pragma: no cover - then pytest itself says the async fixture needs a plugin
    _async_fixture = pytest.fixture  # type: ignore[assignment]

GiB = 1 << 30

FakeDeviceFactory = Callable[..., FakeDevice]


@pytest.fixture
def fake_device() -> FakeDeviceFactory:
    """A factory of fake devices: ``fake_device("gpu", memory=8 << 30, speed=2.0)``."""
    numbers = itertools.count()

    def make(name: str | None = None, **options: Any) -> FakeDevice:
        return FakeDevice(name if name is not None else f"fake{next(numbers)}", **options)

    return make


@pytest.fixture
def virtual_runtime_devices(fake_device: FakeDeviceFactory) -> list[FakeDevice]:
    """The devices ``virtual_runtime`` opens on: a GPU with 8 GiB and a CPU.

    Override this fixture (in a test module or ``conftest.py``) for other hardware.
    """
    return [fake_device("gpu", kind="gpu", memory=8 * GiB), fake_device("cpu", kind="cpu")]


@_async_fixture
async def virtual_runtime(virtual_runtime_devices: list[FakeDevice]) -> AsyncIterator[Runtime]:
    """An open runtime on ``virtual_runtime_devices``, the test's loop in virtual time.

    For ``async def`` tests run by pytest-asyncio (auto mode, or ``@pytest.mark.asyncio``
    in strict mode).
    Leaving drains the runtime's queues, as ``open_runtime`` does.
    """
    loop = asyncio.get_running_loop()
    if not isinstance(loop, asyncio.BaseEventLoop):
        raise TypeError(f"virtual_runtime needs an asyncio event loop, not {type(loop).__name__}")
    # Virtual time starts at 0 so that the runtime's clock (loop time minus its origin)
    # reads exactly: 0.0 + 5.0 - 0.0 is 5.0, where an origin taken from the real clock
    # (say 91234.567891) leaves 5.000000000000028. pytest-asyncio's fresh loop has no
    # timers yet whose real-clock deadlines this would reorder.
    # One idle poll before the clock jumps, as run_virtual does: fake devices schedule
    # everything on the loop, so looptime's 42 polls per timer only cost system calls.
    patched = looptime.patch_event_loop(
        loop, start=0.0, idle_timeout=1.0, noop_cycles=DEFAULT_NOOP_CYCLES, _enabled=False
    )
    with patched.looptime_enabled():
        async with open_runtime(virtual_runtime_devices) as rt:
            yield rt
