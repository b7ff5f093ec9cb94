"""Blocking waits for synchronous callers: every wait has a timeout and sees a crash.

A synchronous caller on another thread waits for a result computed on the runtime's
loop. The wait ends when the result is ready, when ``timeout`` seconds pass (the work
is then cancelled and :class:`TimeoutError` names what timed out), or when the thread
hosting the runtime ends first (:class:`RuntimeCrashedError` names the crash), so no
caller waits forever on a runtime that can no longer answer.
"""

from __future__ import annotations

import concurrent.futures
from typing import Any, TypeVar

from ._queue import StalledError

__all__ = ("RuntimeCrashedError", "check_timeout", "wait_blocking")

T = TypeVar("T")


class RuntimeCrashedError(RuntimeError):
    """The thread hosting the runtime ended, or crashed, while a caller waited on it."""


def valid_timeout(timeout: object) -> bool:
    """Whether ``timeout`` is None or a number of seconds >= 0."""
    return timeout is None or (
        isinstance(timeout, (int, float)) and not isinstance(timeout, bool) and timeout >= 0
    )


def check_timeout(timeout: object, what: str) -> None:
    """Refuse a ``timeout`` that is not None or seconds >= 0, before anything is scheduled.

    Raises:
        ValueError: naming ``what`` and the value.
    """
    if not valid_timeout(timeout):
        raise ValueError(f"{what}: timeout must be None or seconds >= 0, got {timeout!r}")


_CLOSING_GRACE = 5.0
"""Seconds a caller whose work failed with StalledError waits to learn whether a crash
closed the runtime (its thread ends right after the close)."""


def _crash_of(ended: concurrent.futures.Future[None], timeout: float) -> BaseException | None:
    """The crash that ended the runtime's thread within ``timeout`` seconds, else None."""
    try:
        ended.result(timeout)
    except concurrent.futures.TimeoutError:
        return None
    except concurrent.futures.CancelledError:
        return None
    except BaseException as crash:
        return crash
    return None


def wait_blocking(
    future: concurrent.futures.Future[T],
    what: str,
    timeout: float | None = None,
    ended: concurrent.futures.Future[None] | None = None,
) -> T:
    """The result of ``future``, waiting at most ``timeout`` seconds.

    Args:
        future: the result, computed on the runtime's loop.
        what: what is waited for, for error messages ("call to 'load'").
        timeout: seconds to wait; None waits as long as the runtime runs.
        ended: resolves when the thread hosting the runtime ends (with its crash as
            exception, if it crashed); None when the loop is not ours to watch.

    Raises:
        TimeoutError: not done within ``timeout``; the work was cancelled.
        RuntimeCrashedError: the runtime's thread ended first (``__cause__``: its crash).
        ValueError: ``timeout`` is negative or not a number.
        Exception: whatever the work raised.
    """
    if not valid_timeout(timeout):
        future.cancel()
        raise ValueError(f"{what}: timeout must be None or seconds >= 0, got {timeout!r}")
    waited: list[concurrent.futures.Future[Any]] = [future]
    if ended is not None:
        waited.append(ended)
    concurrent.futures.wait(waited, timeout, return_when=concurrent.futures.FIRST_COMPLETED)
    if future.done():
        if not future.cancelled():
            error = future.exception()
            if error is None:
                return future.result()
            if ended is not None and isinstance(error, StalledError):
                # Work fails with StalledError while its runtime closes; when the close
                # comes from a crash, the caller hears of the crash, not of the stall.
                ended_by_crash = _crash_of(ended, _CLOSING_GRACE)
                if ended_by_crash is not None:
                    raise RuntimeCrashedError(
                        f"the runtime's thread crashed while {what} was waiting: "
                        f"{type(ended_by_crash).__name__}: {ended_by_crash}"
                    ) from ended_by_crash
            return future.result()
        closed_first = True  # the runtime cancelled it while shutting down
    else:
        future.cancel()
        closed_first = False
    if ended is not None and ended.done():
        crash = None if ended.cancelled() else ended.exception()
        if crash is None:
            raise RuntimeCrashedError(f"the runtime's thread ended before {what} finished")
        raise RuntimeCrashedError(
            f"the runtime's thread crashed while {what} was waiting: "
            f"{type(crash).__name__}: {crash}"
        ) from crash
    if closed_first:
        raise RuntimeCrashedError(f"{what} was cancelled: the runtime closed before it finished")
    raise TimeoutError(f"{what} did not finish within {timeout} s; it was cancelled")
