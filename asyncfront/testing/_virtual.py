"""Running async code on a virtual-time event loop (looptime)."""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import looptime

from .._runtime import stall_note

__all__ = ("VirtualStallError", "new_virtual_loop", "run_virtual")

T = TypeVar("T")


class VirtualStallError(looptime.IdleTimeoutError):
    """A virtual-time loop went idle while runtime queues waited on semaphores.

    A ``looptime.IdleTimeoutError`` (so code catching that still catches it) whose
    message names each stalled queue, submission, semaphore and value, and why nothing
    left can satisfy it; ``__cause__`` is looptime's own error.
    """

    def __init__(self, stalls: list[str]) -> None:
        super().__init__(
            "the event loop went idle with runtime queues stalled: " + "; ".join(stalls)
        )
        self.stalls = tuple(stalls)


# Idle loop iterations (each an I/O poll) beyond the first before the virtual clock
# jumps to the next timer: looptime polls once when nothing is ready, then ``noop_cycles``
# more times. Its default, 42, gives threads and I/O time to schedule callbacks before
# time moves; fake devices schedule everything on the loop itself, where a callback
# scheduled by a callback is seen by the very next iteration, so the one poll suffices
# and a sequential chain in virtual time costs one idle iteration per clock jump.
DEFAULT_NOOP_CYCLES = 0


# looptime's record of the loop's executor futures (run_in_executor), which it scans on
# every loop iteration: a WeakSet, whose iteration enters a guard and a generator even
# when it is empty, as it is under fake devices. The attribute is name-mangled in
# looptime's loop class; where it is absent (another looptime), the loop is left as is.
_SYNC_FUTURES = "_LoopTimeEventLoop__sync_futures"


class _ExecutorFutures(weakref.WeakSet["asyncio.Future[Any]"]):
    """A WeakSet of futures whose iteration costs nothing while it is empty."""

    def __iter__(self) -> Iterator[asyncio.Future[Any]]:
        if not self.data:  # type: ignore[attr-defined]  # WeakSet keeps its refs there
            return iter(())
        return super().__iter__()


def new_virtual_loop(
    start: float = 0.0,
    idle_timeout: float | None = 1.0,
    *,
    noop_cycles: int = DEFAULT_NOOP_CYCLES,
) -> asyncio.AbstractEventLoop:
    """A new asyncio loop whose clock jumps to the next timer whenever nothing is ready.

    ``idle_timeout`` (real seconds) turns a loop with nothing scheduled and nothing
    ready, a hang, into ``looptime.IdleTimeoutError`` in every waiting task.
    ``noop_cycles`` is how many idle iterations, each polling I/O without waiting, the
    loop runs before it moves the clock beyond the one it always runs (so 0 polls once):
    raise it (looptime's default is 42) when threads or sockets must get a word in
    before virtual time jumps.

    Raises:
        ValueError: ``noop_cycles`` is negative.
    """
    if isinstance(noop_cycles, bool) or not isinstance(noop_cycles, int) or noop_cycles < 0:
        raise ValueError(f"noop_cycles must be an int >= 0, got {noop_cycles!r}")
    loop = looptime.new_event_loop(start=start, idle_timeout=idle_timeout, noop_cycles=noop_cycles)
    _cheap_executor_scan(loop)
    return loop


def _cheap_executor_scan(loop: asyncio.AbstractEventLoop) -> None:
    """Make a looptime loop's scan of its executor futures free while there are none."""
    futures = getattr(loop, _SYNC_FUTURES, None)
    if type(futures) is weakref.WeakSet:
        executor_futures = _ExecutorFutures()
        executor_futures |= futures
        setattr(loop, _SYNC_FUTURES, executor_futures)


def run_virtual(
    main: Callable[..., Coroutine[Any, Any, T]],
    *args: Any,
    start: float = 0.0,
    idle_timeout: float | None = 1.0,
    noop_cycles: int = DEFAULT_NOOP_CYCLES,
) -> T:
    """Run ``main(*args)`` on a fresh virtual-time loop and return its result.

    ``asyncio.sleep`` and every timer cost no wall time, so fake devices simulate hours
    of work in milliseconds. Do not use threads inside: they do not advance virtual time.
    ``start``, ``idle_timeout`` and ``noop_cycles`` are those of :func:`new_virtual_loop`.

    Raises:
        VirtualStallError: the loop went idle (a hang) while runtime queues were stalled;
            the message names each stalled queue, semaphore and value.
        looptime.IdleTimeoutError: the loop went idle with no queue stalled.
    """
    loop = new_virtual_loop(start=start, idle_timeout=idle_timeout, noop_cycles=noop_cycles)
    previous = _current_loop()
    try:
        asyncio.set_event_loop(loop)
        try:
            return loop.run_until_complete(main(*args))
        except looptime.IdleTimeoutError as exc:
            stalls = stall_note(loop)
            if stalls and not isinstance(exc, VirtualStallError):
                raise VirtualStallError(stalls) from exc
            raise
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
