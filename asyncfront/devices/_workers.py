"""The worker threads of a thread-pool device, and chained execution of its queues' work.

Each queue of the device has a *line* here: the submissions the queue has shown the
device (its FIFO, read on the loop thread whenever the queue touches the device: a head
that blocks, through ``watch_wait``, or work handed over), in order. A worker that
finishes a submission picks the next piece of work itself, on its own thread: work the
loop handed over (a queue's submission whose waits the loop has met, or a plain call),
or the head of a line whose waits are met by semaphore values already reached or by
submissions of this device that ran successfully on a worker and whose signals the loop
will deliver. That is a wait met on the device's own worker,
without a round trip through the loop: a dependent chain of no-op submissions across the
device's queues runs back to back on one thread. The loop still does everything else for
each submission, in order (waits, frontiers, signals, failures, trace): it finds the work
already done and takes its result without a coroutine (``execute_now``), and since the
queues wait with semaphore callbacks, each signal readies the next link's queue at once,
so a run of links done ahead is caught up in one loop callback; completions the loop
awaits reach it in batches, one loop wake-up for everything that finished meanwhile.

The worker-side choice keeps the queues' guarantees: one submission of a line at a time,
in FIFO order; at every submission boundary the highest-priority ready work next (work
the loop arbitrated and handed over is never held back; work run ahead never passes
higher-priority ready work that it cannot run itself, such as a submission with working
memory, a coroutine function, or a queue waiting on the loop for a slot); a failed
submission promises nothing, so its consumers wait for the loop to fail them; nothing runs
ahead once the runtime is closing.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections import deque
from collections.abc import Callable
from types import FunctionType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .._queue import DeviceQueue, Submission
    from .._runtime import Runtime
    from .._semaphore import TimelineSemaphore
    from ._base import SlotArbiter

__all__ = ("AHEAD_LIMIT", "WorkerPool")

AHEAD_LIMIT = 64
"""How many submissions of one queue may have run ahead of the loop's bookkeeping.

It bounds the results held for the loop and the work already done when a closing runtime
fails what the loop had not yet processed; the worker resumes once the loop has caught up
with half of them, so a long chain costs one thread wake-up per ``AHEAD_LIMIT // 2``.
"""

# How a line's submission can run: on a worker with nothing to call, on a worker, or only
# through the loop (working memory to reserve first, a coroutine function to await there).
_VIRTUAL, _THREAD, _LOOP = 0, 1, 2
_CO_COROUTINE = inspect.CO_COROUTINE


class _Run:
    """One piece of worker work: a queue's submission or a plain call, and its outcome."""

    __slots__ = ("call", "done", "error", "future", "result", "sub")

    def __init__(self, sub: Submission | None, call: Callable[[], Any] | None = None) -> None:
        self.sub = sub
        self.call = call
        self.done = False
        self.result: Any = None
        self.error: BaseException | None = None
        self.future: asyncio.Future[Any] | None = None


class _Line:
    """What the device knows of one queue's submissions (see the module docstring)."""

    __slots__ = ("ahead", "busy", "capped", "forced", "mirrored", "pending", "queue")

    def __init__(self, queue: DeviceQueue) -> None:
        self.queue = queue
        self.pending: deque[Submission] = deque()  # not started, FIFO order
        self.ahead: deque[_Run] = deque()  # started on a worker, result not yet taken
        self.forced: _Run | None = None  # handed over by the loop, not yet started
        self.busy = False  # a worker (or the loop, for a coroutine) runs its work now
        self.mirrored = 0  # the latest epoch shown to the device
        self.capped = False  # its ready head waits for the loop to take results first


def _kind(sub: Submission) -> int:
    fn = sub.fn
    if sub.memory is not None:
        return _LOOP
    if fn is None:
        return _VIRTUAL
    if (
        type(fn) is FunctionType
        and not fn.__code__.co_flags & _CO_COROUTINE
        and getattr(fn, "_is_coroutine_marker", None) is None
    ):
        # A plain function that is neither ``async def`` nor marked as a coroutine
        # function: what ``inspect.iscoroutinefunction`` decides, without its unwrapping.
        return _THREAD
    return _LOOP if inspect.iscoroutinefunction(fn) else _THREAD


class WorkerPool:
    """``workers`` threads that run a device's work, chaining ready work on their own.

    The loop side (:meth:`take`, :meth:`run`, :meth:`call`, :meth:`show`) runs on the
    event loop's thread; the workers share the state with it under one lock.
    """

    def __init__(self, name: str, workers: int, arbiter: SlotArbiter, *, chains: bool) -> None:
        self.name = name
        self.workers = workers
        self.chains = chains
        # At most the device's slots run at once, work taken up ahead of the loop included.
        self._capacity = arbiter.capacity
        self._running = 0  # work running on the workers, and coroutines on the loop
        self._gated = False  # a worker went idle because every slot was running
        self._arbiter = arbiter
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._threads: list[threading.Thread] = []
        self._idle = 0
        self._stopping = False
        self._jobs: deque[_Run] = deque()
        self._lines: dict[DeviceQueue, _Line] = {}
        self._order: list[_Line] = []  # the lines, scanned from a rotating start
        self._turn = 0
        # semaphore -> the highest value that work run here successfully will signal it
        # to, once the loop delivers that work's completion
        self._promised: dict[TimelineSemaphore, int] = {}
        self._outbox: list[_Run] = []
        self._posted = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runtime: Runtime | None = None
        self.chained = 0  # submissions whose work ran before the loop handed them over
        from .._queue import SubmissionState  # a cycle at import time; loaded by now

        self._finished = (SubmissionState.COMPLETED, SubmissionState.FAILED)

    # -- life ----------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop, runtime: Runtime) -> None:
        """Bind to the runtime's loop; threads start on demand."""
        self._loop = loop
        self._runtime = runtime
        self._stopping = False

    def stop(self) -> list[threading.Thread]:
        """Stop running ahead and let the workers end once queued work is done.

        Returns the threads to join (off the loop thread: running work cannot be
        interrupted).
        """
        with self._lock:
            self._stopping = True
            self._wake.notify_all()
            threads, self._threads = self._threads, []
        return threads

    def forget(self) -> None:
        """Drop every record (the device closed): nothing keeps submissions alive."""
        with self._lock:
            self._lines.clear()
            self._order.clear()
            self._promised.clear()
            self._jobs.clear()
            self._outbox.clear()
        self._runtime = None

    @property
    def started(self) -> bool:
        """Whether the pool is bound to a loop and not stopping."""
        return self._loop is not None and not self._stopping

    def _spawn(self) -> None:
        """Start a thread when work waits and no worker is idle (lock held)."""
        if self._idle == 0 and len(self._threads) < self.workers and not self._stopping:
            thread = threading.Thread(
                target=self._work,
                name=f"asyncfront-{self.name}_{len(self._threads)}",
                daemon=True,
            )
            self._threads.append(thread)
            thread.start()
        elif self._idle:
            self._wake.notify()

    # -- the loop side -------------------------------------------------------------

    def call(self, call: Callable[[], Any]) -> asyncio.Future[Any]:
        """Run ``call`` on a worker; the returned future resolves on the loop."""
        loop = self._loop
        if loop is None or self._stopping:
            raise RuntimeError(f"device {self.name!r} is not started")
        run = _Run(None, call)
        run.future = loop.create_future()
        with self._lock:
            self._jobs.append(run)
            self._spawn()
        return run.future

    def show(self, queue: DeviceQueue) -> None:
        """Show the device the queue's current and queued submissions (loop thread)."""
        line = self._lines.get(queue)
        if line is not None:
            fifo = queue._fifo
            last = fifo[-1].epoch if fifo else queue._current.epoch if queue._current else 0
            if last <= line.mirrored:
                return  # shown already
        if not self.chains:
            return
        with self._lock:
            try:
                self._mirror(queue)
            except Exception as exc:  # the queue's wait must not fail for the device's sake
                self._stop_chaining(exc)

    def take(self, sub: Submission) -> Any:
        """``(True, result)`` if a worker already ran ``sub``, raising its error; else None.

        Lock-free: only the loop removes a line's runs, and a worker marks a run done
        only after storing its outcome.
        """
        line = self._lines.get(sub.queue)
        if line is None:
            return None
        ahead = line.ahead
        if not ahead:
            return None
        run: _Run | None = ahead[0]
        if run is None or run.sub is not sub:
            run = self._find(line, sub)
            if run is None:
                return None
        if not run.done or (run.result is not None and inspect.isawaitable(run.result)):
            return None  # still running; or an awaitable result, which run() hands back
        ahead.popleft()
        if line.capped and len(ahead) <= AHEAD_LIMIT // 2:
            with self._lock:
                line.capped = False
                if self._idle:
                    self._wake.notify()  # the line had reached its limit: run ahead again
        if run.error is not None:
            error, run.error = run.error, None
            raise error
        return (True, run.result)

    async def run(self, sub: Submission) -> Any:
        """Run ``sub``'s plain-function work on a worker, or take what a worker ran."""
        loop = self._loop
        if loop is None or self._stopping:
            raise RuntimeError(f"device {self.name!r} is not started")
        fut: asyncio.Future[Any] = loop.create_future()
        with self._lock:
            line = self._mirror(sub.queue) if self.chains else None
            run = None if line is None else self._find(line, sub)
            if run is not None:
                if run.done:
                    line.ahead.popleft()  # type: ignore[union-attr]
                    if run.error is not None:
                        raise run.error
                    return run.result
                run.future = fut  # running on a worker now
            else:
                run = _Run(sub)
                run.future = fut
                if line is not None:
                    self._drop_before(line, sub)
                    line.forced = run
                else:
                    run.call = _bound(sub)
                    self._jobs.append(run)
                self._spawn()
        try:
            return await fut
        except asyncio.CancelledError:
            with self._lock:
                if line is not None and line.forced is run:
                    line.forced = None  # not started: it never will be
                else:
                    with_jobs = self._jobs
                    if run in with_jobs:
                        with_jobs.remove(run)
            raise

    async def run_on_loop(self, sub: Submission, work: Callable[[], Any]) -> Any:
        """Await ``work`` (a coroutine function's call) on the loop, holding the line."""
        line = None
        if self.chains:
            with self._lock:
                line = self._mirror(sub.queue)
                self._drop_before(line, sub)
                line.busy = True
                self._running += 1
        try:
            return await work()
        finally:
            if line is not None:
                with self._lock:
                    line.busy = False
                    self._running -= 1
                    if self._idle:
                        self._wake.notify()

    def _mirror(self, queue: DeviceQueue) -> _Line:
        """The queue's line, updated with the submissions it holds now (lock held)."""
        line = self._lines.get(queue)
        if line is None:
            self._prune_lines()
            line = self._lines[queue] = _Line(queue)
            self._order.append(line)
        mirrored = line.mirrored
        current = queue._current
        pending = line.pending
        if current is not None and current.epoch > mirrored:
            pending.append(current)
            mirrored = current.epoch
        fifo = queue._fifo
        if fifo and fifo[-1].epoch > mirrored:
            new = []
            for sub in reversed(fifo):
                if sub.epoch <= mirrored:
                    break
                new.append(sub)
            pending.extend(reversed(new))
            mirrored = fifo[-1].epoch
        line.mirrored = mirrored
        finished = self._finished
        while pending and pending[0].state in finished:
            pending.popleft()  # the loop finished it without the device
        ahead = line.ahead
        while ahead and ahead[0].sub is not None and ahead[0].sub.state in finished:
            ahead.popleft()  # its waits failed on the loop: its result is never taken
        if len(self._promised) > 64 + 4 * len(self._order):
            self._prune_promises()
        return line

    @staticmethod
    def _find(line: _Line, sub: Submission) -> _Run | None:
        """``sub``'s run among the line's work run ahead, dropping older ones (loop thread).

        The loop takes a queue's submissions in order, so a run ahead of an earlier
        submission that it never took belongs to work that failed on the loop's side.
        """
        ahead = line.ahead
        epoch = sub.epoch
        while ahead and ahead[0].sub is not sub and ahead[0].sub.epoch < epoch:  # type: ignore[union-attr]
            ahead.popleft()
        if ahead and ahead[0].sub is sub:
            return ahead[0]
        return None

    @staticmethod
    def _drop_before(line: _Line, sub: Submission) -> None:
        """Forget the line's pending submissions older than ``sub``: the loop passed them."""
        pending = line.pending
        while pending and pending[0].epoch < sub.epoch:
            pending.popleft()
        if pending and pending[0] is sub:
            pending.popleft()

    def _prune_lines(self) -> None:
        """Drop the lines of queues that closed and drained (lock held)."""
        dead = [ln for ln in self._order if ln.queue._closed and not ln.queue._busy()]
        for line in dead:
            if not line.busy and line.forced is None:
                self._order.remove(line)
                del self._lines[line.queue]

    def _prune_promises(self) -> None:
        """Drop promises the semaphores have reached, or can no longer keep (lock held)."""
        self._promised = {
            sem: value
            for sem, value in self._promised.items()
            if sem._failure is None and sem._value < value
        }

    def _deliver(self) -> None:
        """On the loop: resolve the futures of everything that finished since last time."""
        with self._lock:
            box, self._outbox = self._outbox, []
            self._posted = False
        for run in box:
            fut = run.future
            if fut is None or fut.done():
                continue
            if run.error is not None:
                fut.set_exception(run.error)
            else:
                fut.set_result(run.result)
            run.error = None

    # -- the workers ---------------------------------------------------------------

    def _pick(self) -> tuple[_Line | None, _Run] | None:
        """The next work for a worker, or None (lock held). See the module docstring."""
        if self.chains and self._running >= self._capacity:
            self._gated = True  # as many running as the device has slots
            return None
        if self._jobs:
            self._running += 1
            return None, self._jobs.popleft()
        if not self.chains:
            return None  # every piece of work is a job
        while True:
            choice = self._choose()
            if choice is None:
                return None
            line, forced = choice
            self._running += 1
            if forced:
                run = line.forced
                assert run is not None
                line.forced = None
                line.busy = True
                return line, run
            sub = line.pending.popleft()
            self.chained += 1
            if sub.fn is None:  # chosen, so neither working memory nor a coroutine
                self._running -= 1
                self._promise(sub)  # nothing to call: what it signals holds at once
                continue
            run = _Run(sub)
            line.ahead.append(run)
            line.busy = True
            return line, run

    def _choose(self) -> tuple[_Line, bool] | None:
        """The line whose work runs next, and whether the loop handed that work over."""
        order = self._order
        if not order:
            return None
        runtime = self._runtime
        # Work runs ahead only under the default policy: a deadline or SLO policy must see
        # every ready submission of a tier to choose among them.
        ahead_allowed = (
            self.chains
            and not self._stopping
            and runtime is not None
            and runtime._open
            and self._arbiter.chooser is None
        )
        # Higher-priority ready work that cannot run ahead here holds back what would.
        blocking = self._arbiter.highest_waiting() if ahead_allowed else None
        forced_line: _Line | None = None
        forced_priority = 0
        ahead_line: _Line | None = None
        ahead_priority = 0
        count = len(order)
        start = self._turn % count
        self._turn = start + 1
        promised = self._promised
        finished = self._finished
        for i in range(count):
            line = order[(start + i) % count]
            if line.busy:
                continue
            priority = line.queue.priority
            if line.forced is not None:
                if forced_line is None or priority > forced_priority:
                    forced_line, forced_priority = line, priority
                continue
            if not ahead_allowed:
                continue
            pending = line.pending
            while pending and pending[0].state in finished:
                pending.popleft()  # the loop finished it without the device (a barrier)
            if not pending:
                continue
            sub = pending[0]
            # Every wait met by a value or by work that ran here (inline: runs per link).
            ready = True
            for sem, value in sub.waits:
                if sem._failure is not None or (
                    sem._value < value and promised.get(sem, -1) < value
                ):
                    ready = False
                    break
            if not ready:
                continue
            kind = _kind(sub)
            if kind == _LOOP or len(line.ahead) >= AHEAD_LIMIT:
                if kind != _LOOP:
                    line.capped = True
                if blocking is None or priority > blocking:
                    blocking = priority
                continue
            if ahead_line is None or priority > ahead_priority:
                ahead_line, ahead_priority = line, priority
        if forced_line is not None:
            # The loop granted it a slot and started it: it goes before anything taken up.
            return forced_line, True
        if ahead_line is None or (blocking is not None and ahead_priority < blocking):
            return None
        return ahead_line, False

    def _promise(self, sub: Submission) -> None:
        """Record what ``sub``, done here without an error, will signal (lock held)."""
        promised = self._promised
        for sem, value in sub.signals:
            if promised.get(sem, -1) < value:
                promised[sem] = value

    def _work(self) -> None:
        """A worker thread's loop: pick, run, record, until the pool stops."""
        lock = self._lock
        with lock:
            picked = self._wait_for_work()
        while picked is not None:
            line, run = picked
            try:
                call = run.call
                if call is not None:
                    run.result = call()
                else:
                    sub = run.sub
                    assert sub is not None and sub.fn is not None
                    run.result = sub.fn(*sub.args, **sub.kwargs)
            except BaseException as exc:  # the loop raises it where the work's await is
                run.error = exc
            with lock:
                run.done = True
                self._running -= 1
                if self._gated and self._idle:
                    self._gated = False
                    self._wake.notify()  # a slot freed for the worker that found none
                if line is not None:
                    line.busy = False
                    sub = run.sub
                    # Working memory is released by the loop once it takes the result:
                    # its consumers wait for the loop's signal, after that release.
                    if run.error is None and sub is not None and sub.memory is None:
                        self._promise(sub)
                if run.future is not None:
                    self._outbox.append(run)
                    if not self._posted:
                        self._posted = True
                        loop = self._loop
                        if loop is not None and not loop.is_closed():
                            loop.call_soon_threadsafe(self._deliver)
                del line, run, picked
                picked = self._wait_for_work()

    def _wait_for_work(self) -> tuple[_Line | None, _Run] | None:
        """The next work, waiting for it; None once the pool stops (lock held)."""
        picked = self._pick_safely()
        while picked is None:
            if self._stopping:
                return None
            self._idle += 1
            self._wake.wait()
            self._idle -= 1
            picked = self._pick_safely()
        return picked

    def _pick_safely(self) -> tuple[_Line | None, _Run] | None:
        """:meth:`_pick`; should choosing ever fail, stop chaining rather than the worker.

        A worker that died would leave the work handed to it waiting forever; without
        chaining, every submission still runs as the loop hands it over.
        """
        try:
            return self._pick()
        except Exception as exc:
            if not self.chains:
                raise
            self._stop_chaining(exc)
            return self._pick()

    def _stop_chaining(self, exc: Exception) -> None:
        """Run only what the loop hands over from now on (lock held); log why."""
        self.chains = False
        runtime = self._runtime
        if runtime is not None and runtime._log_warning:
            runtime._log.warning(
                "chaining_disabled", device=self.name, error=f"{type(exc).__name__}: {exc}"
            )
        for line in self._order:  # hand the loop's work over the plain way
            if line.forced is not None:
                self._jobs.append(line.forced)
                line.forced = None
        if self._jobs and self._idle:
            self._wake.notify_all()


def _bound(sub: Submission) -> Callable[[], Any]:
    fn = sub.fn
    assert fn is not None
    args, kwargs = sub.args, sub.kwargs
    return lambda: fn(*args, **kwargs)
