"""The asyncfront pytest plugin: ``virtual_runtime`` and ``fake_device`` fixtures.

Installed with asyncfront (the ``pytest11`` entry point ``asyncfront``), so a suite
uses the fixtures without imports:

* ``fake_device(name, **options)`` makes a :class:`~asyncfront.testing.FakeDevice`
  (a fresh name when none is given).
* ``virtual_runtime`` is an open runtime, for ``async def`` tests run by pytest-asyncio,
  on the devices of the ``virtual_runtime_devices`` fixture (override it to choose
  them). The test's event loop runs in virtual time for the test: timers cost no wall
  time, and a test in which nothing can ever happen fails after a second instead of
  hanging: with :class:`~asyncfront.testing.VirtualStallError` naming each stalled
  queue, submission, semaphore and value when runtime queues are stalled, as
  :func:`~asyncfront.testing.run_virtual` does, else with looptime's
  ``IdleTimeoutError`` (which that error subclasses). Like
  :func:`~asyncfront.testing.run_virtual`, the loop polls I/O once before its clock
  jumps to the next timer (looptime's default is 42 times).
"""

from __future__ import annotations

import asyncio
import itertools
import weakref
from collections.abc import AsyncIterator, Callable, Generator
from typing import Any

import looptime
import pytest

from .._runtime import Runtime, open_runtime, stall_note
from ..devices.fake import FakeDevice
from ._virtual import DEFAULT_NOOP_CYCLES, VirtualStallError, _cheap_executor_scan

__all__ = ("fake_device", "virtual_runtime", "virtual_runtime_devices")

try:  # pytest-asyncio runs async fixtures in its strict mode only when marked as its own
    from pytest_asyncio import fixture as _async_fixture
except ImportError:  # pragma: no cover - then pytest itself says the async fixture needs a plugin
    _async_fixture = pytest.fixture  # type: ignore[assignment]

GiB = 1 << 30

FakeDeviceFactory = Callable[..., FakeDevice]

# The runtime a test's virtual_runtime opened, weakly: the hook below names the stalls
# of a hang in it.
_VIRTUAL_RUNTIME = pytest.StashKey["weakref.ref[Runtime]"]()


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
async def virtual_runtime(
    virtual_runtime_devices: list[FakeDevice], request: pytest.FixtureRequest
) -> AsyncIterator[Runtime]:
    """An open runtime on ``virtual_runtime_devices``, the test's loop in virtual time.

    For ``async def`` tests run by pytest-asyncio (auto mode, or ``@pytest.mark.asyncio``
    in strict mode).
    Leaving drains the runtime's queues, as ``open_runtime`` does. A hang with queues
    stalled fails the test with :class:`~asyncfront.testing.VirtualStallError`.
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
    _cheap_executor_scan(patched)
    with patched.looptime_enabled():
        async with open_runtime(virtual_runtime_devices) as rt:
            request.node.stash[_VIRTUAL_RUNTIME] = weakref.ref(rt)
            yield rt


@pytest.hookimpl(wrapper=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> Generator[None, object, object]:
    """A test on ``virtual_runtime`` that hangs with queues stalled names the stalls."""
    __tracebackhide__ = True
    try:
        return (yield)
    except looptime.IdleTimeoutError as exc:
        ref = pyfuncitem.stash.get(_VIRTUAL_RUNTIME, None)
        rt = None if ref is None else ref()
        loop = None if rt is None else rt._loop
        if rt is None or loop is None or isinstance(exc, VirtualStallError):
            raise
        rt._note_stall()  # the hang ended the test, not a wait inside the runtime
        stalls = stall_note(loop)
        if not stalls:
            raise
        raise VirtualStallError(stalls) from exc
