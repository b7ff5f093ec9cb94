"""Running async code on a virtual-time event loop (looptime)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import looptime

__all__ = ("new_virtual_loop", "run_virtual")

T = TypeVar("T")


def new_virtual_loop(
    start: float = 0.0, idle_timeout: float | None = 1.0
) -> asyncio.AbstractEventLoop:
    """A new asyncio loop whose clock jumps to the next timer whenever nothing is ready.

    ``idle_timeout`` (real seconds) turns a loop with nothing scheduled and nothing
    ready, a hang, into ``looptime.IdleTimeoutError`` in every waiting task.
    """
    return looptime.new_event_loop(start=start, idle_timeout=idle_timeout)


def run_virtual(
    main: Callable[..., Coroutine[Any, Any, T]],
    *args: Any,
    start: float = 0.0,
    idle_timeout: float | None = 1.0,
) -> T:
    """Run ``main(*args)`` on a fresh virtual-time loop and return its result.

    ``asyncio.sleep`` and every timer cost no wall time, so fake devices simulate hours
    of work in milliseconds. Do not use threads inside: they do not advance virtual time.
    """
    loop = new_virtual_loop(start=start, idle_timeout=idle_timeout)
    previous = _current_loop()
    try:
        asyncio.set_event_loop(loop)
        return loop.run_until_complete(main(*args))
    finally:
        try:
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            # Restore whatever loop the thread had: dropping it would leave it unclosed.
            asyncio.set_event_loop(previous)
            loop.close()


def _current_loop() -> asyncio.AbstractEventLoop | None:
    """The thread's set event loop, without creating one."""
    policy = asyncio.get_event_loop_policy()
    local = getattr(policy, "_local", None)
    loop = getattr(local, "_loop", None)
    return loop if isinstance(loop, asyncio.AbstractEventLoop) and not loop.is_closed() else None
