"""The node runtime: a Ray async actor that runs an ordinary :class:`~asyncfront.Runtime`.

Everything here runs on the actor's event loop and never blocks it: submissions arrive
in sequenced batches, semaphore updates are pushed to subscribers fire-and-forget, and
results and the states of semaphores a sender waits on go back over a stream to it
(or answer its long polls where that stream does not connect).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import inspect
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, SupportsIndex

from .._collective import CollectiveChannel, CollectiveStep
from .._frontier import Frontier
from .._queue import DeviceQueue, Submission
from .._runtime import Runtime, open_runtime
from .._semaphore import TimelineSemaphore
from ..devices._base import Device
from ._errors import ClusterError, NodeLostError
from ._protocol import (
    DeliveryFaults,
    EncodedFrontier,
    SemaphoreRef,
    SemaphoreUpdate,
    Sequencer,
    ValueRef,
    apply_update,
    decode_frontier,
    dumps,
    encode_frontier,
    loads,
    pack_exception,
    root_cause,
    unpack_exception,
)

__all__ = ("NodeRuntime", "NodeStatistics")

# What a node tells a sender about one finished submission:
# ("done", submission id, epoch, encoded frontier, ok, pickled result or packed error,
#  name of the failed semaphore that made it fail or None)
_MISSING = object()
_POLL_WAIT = 5.0  # seconds a poll waits for news before it answers empty
# A poll answers at most this often per sender: news that arrives in quick succession
# goes back in one answer instead of one Ray call each.
_POLL_INTERVAL = 0.002
# A result stream carries at most one frame per this many seconds (per sender).
_FRAME_INTERVAL = 0.001


@dataclass(frozen=True)
class NodeStatistics:
    """A snapshot of the records a node runtime keeps for its senders.

    Each count returns to its level before a graph run once the run finished and the
    driver dropped its submissions (see ``docs/cluster.md``).

    Attributes:
        node: the node's index.
        semaphores: semaphores it holds, its own and its mirrors of other nodes'.
        owned_semaphores: those of them it owns.
        subscriptions: subscribers of its own semaphores, summed over them.
        forgotten: semaphores it dropped as owner that still wait for a late
            subscription (to drop it on arrival instead of making them again).
        results: results kept for later work that takes them, including copies of
            other nodes' results.
        errors: packed errors of failed submissions kept for copies asked later.
        copies_awaited: copies of other nodes' results its work waits for or has.
        copy_requests: submissions here whose result other nodes asked for.
        released: results dropped by the driver before their copy arrived.
        queues: queues it created for its senders.
    """

    node: int
    semaphores: int
    owned_semaphores: int
    subscriptions: int
    forgotten: int
    results: int
    errors: int
    copies_awaited: int
    copy_requests: int
    released: int
    queues: int


class _OwnedSemaphore(TimelineSemaphore):
    """The owner's semaphore: every signal and failure is pushed to its subscribers."""

    __slots__ = ("_on_change",)

    def __init__(self, initial: int, name: str, on_change: Callable[[str], None]) -> None:
        super().__init__(initial, name=name)
        self._on_change = on_change

    def signal(
        self, value: SupportsIndex, frontier: Frontier | Mapping[int, int] | None = None
    ) -> None:
        super().signal(value, frontier)
        self._on_change(self.name)

    def fail(self, exc: BaseException) -> bool:
        took = super().fail(exc)
        if took:
            self._on_change(self.name)
        return took


class _ChannelQueue:
    """A collective channel in a remote queue's place: its steps are the submissions."""

    __slots__ = ("channel",)

    def __init__(self, channel: CollectiveChannel) -> None:
        self.channel = channel

    @property
    def name(self) -> str:
        return self.channel.name

    @property
    def axis(self) -> int:
        return self.channel.axis

    def submit(self, fn: Any, *args: Any, **kwargs: Any) -> CollectiveStep:
        return self.channel.submit(fn, *args, **kwargs)

    def statistics(self) -> Any:
        return self.channel.statistics()


def _keep_nothing(sub_id: int, value: Any) -> None:
    return None


def _import_torch_if_installed() -> None:
    import importlib.util
    import sys

    with _IMPORTS:  # taken even when imported: another thread may be importing it now
        if "torch" not in sys.modules and importlib.util.find_spec("torch") is not None:
            import torch  # noqa: F401


def _loads_locked(payload: bytes) -> Any:
    with _IMPORTS:
        return loads(payload)


class _RemoteQueue:
    """A local queue created for remote senders, and the reporter of its results."""

    __slots__ = ("finished", "queue", "reporter", "wakeup")

    def __init__(self, queue: DeviceQueue | _ChannelQueue) -> None:
        self.queue = queue
        # (submission id, sender, local submission): results reported in FIFO order
        self.finished: deque[tuple[int, str, Submission | CollectiveStep]] = deque()
        self.wakeup: asyncio.Future[None] | None = None
        self.reporter: asyncio.Task[None] | None = None


class NodeRuntime:
    """One node of a cluster: its devices, its runtime, its semaphores, its inboxes.

    Created by :func:`asyncfront.open_cluster` as a Ray actor pinned to its node; the
    methods are the actor's remote interface.
    """

    def __init__(
        self,
        index: int,
        devices: bytes,
        stall_timeout: float,
        faults: DeliveryFaults | None,
    ) -> None:
        self.index = index
        self._devices_factory = devices
        self._stall_timeout = stall_timeout
        self._faults = faults.reseeded(index + 1) if faults is not None else None
        self._runtime: Runtime | None = None
        self._stack = contextlib.AsyncExitStack()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._peers: list[Any] = []
        self._queues: dict[tuple[str, int], _RemoteQueue] = {}
        self._sequencers: dict[str, Sequencer[_Batch]] = {}
        self._sems: dict[str, TimelineSemaphore] = {}
        self._refs: dict[str, SemaphoreRef] = {}
        self._subscribers: dict[str, set[int | str]] = {}
        # Semaphores dropped here as their owner whose subscription from these nodes had
        # not arrived yet: when it does, it is dropped too instead of making them again.
        self._forgotten: dict[str, set[int]] = {}
        self._dirty: set[str] = set()
        self._flush_scheduled = False
        self._lost: dict[int, NodeLostError] = {}
        self._outbox: dict[str, list[tuple[Any, ...]]] = {}
        self._outbox_ready: dict[str, asyncio.Event] = {}
        self._last_answer: dict[str, float] = {}
        self._stopped: asyncio.Event | None = None
        # Results kept for later submissions on this node that take them as arguments;
        # a sender releases each once it no longer holds the submission.
        self._values: dict[int, Any] = {}
        self._released: set[int] = set()  # released before they finished
        # Copies of results between nodes: the nodes waiting for a result of this node
        # (sent when it is reported), the packed errors of failed submissions (a copy
        # asked for later fails with them), and the copies this node waits for.
        self._copy_targets: dict[int, list[int]] = {}
        self._errors: dict[int, bytes] = {}
        self._arrivals: dict[int, tuple[TimelineSemaphore, int]] = {}
        self._inbox: dict[str, deque[_Batch]] = {}
        self._consumers: dict[str, asyncio.Task[None]] = {}
        self._dist_ready: asyncio.Future[Any] | None = None
        # (link, message) -> local semaphore the sender's announcement signals once
        self._announced: dict[tuple[int, int], TimelineSemaphore] = {}
        self._inbound: dict[tuple[int, int], tuple[tuple[int, ...], str]] = {}
        self._link_sends: dict[int, tuple[int, int, int]] = {}  # sub id -> link, message, peer
        self._recv_peers: dict[int, int] = {}  # link -> the node that sends on it
        # Semaphore pushes go to peers over a direct TCP stream when it is up (a Ray
        # actor call costs several times a stream write); Ray carries them otherwise.
        self._push_server: asyncio.Server | None = None
        self._push_writers: dict[int, asyncio.StreamWriter] = {}
        self._push_readers: set[asyncio.Task[None]] = set()
        self._push_token = b""
        # Results and states go back to a sender over its stream where it connected.
        self._result_writers: dict[str, asyncio.StreamWriter] = {}
        self._results_scheduled: set[str] = set()
        self._last_frame: dict[str, float] = {}

    # -- life ------------------------------------------------------------------------

    async def start(self, peers: list[Any]) -> list[tuple[str, str, int]]:
        """Build the devices, open the runtime; returns (name, kind, index) per device."""
        self._loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        self._peers = list(peers)
        self._dist_ready = self._loop.create_future()
        factory = loads(self._devices_factory)
        devices: list[Device] = list(factory(self.index))
        if not any(d.name == "nic" for d in devices):
            from ..devices.cpu import CpuDevice

            nic = CpuDevice("nic", workers=4)
            nic.kind = "nic"
            devices.append(nic)
        self._runtime = await self._stack.enter_async_context(
            open_runtime(devices, node=self.index, stall_timeout=self._stall_timeout)
        )
        return [(d.name, d.kind, d.index) for d in self._runtime.devices.values()]

    async def run(self, payload: bytes) -> bytes:
        """Run a pickled ``fn(runtime)`` on this loop; answers (ok, result or packed error)."""
        try:
            fn = await asyncio.to_thread(_loads_locked, payload)
            # ``fn`` runs on the loop and may import torch: do that here, off the loop and
            # under the import lock (the link's thread may be importing torch too).
            await asyncio.to_thread(_import_torch_if_installed)
            result = fn(self._require_runtime())
            if inspect.isawaitable(result):
                result = await result
        except Exception as exc:
            return dumps((False, pack_exception(exc)))
        try:
            return dumps((True, result))
        except Exception as exc:
            failure = TypeError(
                f"the result of a function run on node {self.index} cannot be pickled: {exc}"
            )
            return dumps((False, pack_exception(failure)))

    async def placement_candidates(
        self, asks: tuple[tuple[Any, str | None], ...]
    ) -> list[list[Any] | None]:
        """How this node sees each ``(StageNeeds, device name or None)``: its candidates."""
        from ._graph import node_candidates

        return node_candidates(asks, self._require_runtime())

    async def endpoint(self, token: bytes) -> tuple[str, int]:
        """Open this node's push stream server; returns its address and port.

        A connection must open with ``token`` (the cluster's secret, from the driver);
        one that does not is closed before anything it sends is unpickled.
        """
        import ray

        self._push_token = token

        host = str(ray.util.get_node_ip_address())  # type: ignore[no-untyped-call]
        if self._push_server is None:
            self._push_server = await asyncio.start_server(self._push_connection, host, 0)
        port = int(self._push_server.sockets[0].getsockname()[1])
        return host, port

    async def connect(self, endpoints: list[tuple[str, int] | None]) -> list[int]:
        """Open a push stream to every other node's endpoint; returns the nodes reached.

        A peer that cannot be reached keeps getting its pushes as Ray actor calls.
        """
        reached = []
        for peer, address in enumerate(endpoints):
            if peer == self.index or address is None or peer in self._push_writers:
                continue
            try:
                _, writer = await asyncio.wait_for(asyncio.open_connection(*address), 10.0)
            except (OSError, TimeoutError):
                continue
            sock = writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            writer.write(self._push_token)
            self._push_writers[peer] = writer
            reached.append(peer)
        return reached

    async def stream_results(self, sender: str, host: str, port: int, token: bytes) -> bool:
        """Send ``sender``'s news over a stream to ``host:port`` from now on; whether it connected.

        Where it does not connect, the sender's long polls carry the news, as before.
        """
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 10.0)
        except (OSError, TimeoutError):
            return False
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        writer.write(token + self.index.to_bytes(2, "big"))
        self._result_writers[sender] = writer
        if self._outbox.get(sender):
            self._schedule_results(sender)
        return True

    def _schedule_results(self, sender: str) -> None:
        """Write ``sender``'s news soon: at most one frame per interval, many events each."""
        if sender in self._results_scheduled:
            return
        self._results_scheduled.add(sender)
        assert self._loop is not None
        delay = self._last_frame.get(sender, 0.0) + _FRAME_INTERVAL - self._loop.time()
        if delay > 0:
            self._loop.call_later(delay, self._flush_results, sender)
        else:
            self._loop.call_soon(self._flush_results, sender)

    def _flush_results(self, sender: str) -> None:
        self._results_scheduled.discard(sender)
        events = self._outbox.pop(sender, None)
        if not events:
            return
        writer = self._result_writers.get(sender)
        if writer is None or writer.is_closing():
            # The stream broke: the long poll takes the news from here on.
            self._result_writers.pop(sender, None)
            self._outbox[sender] = events + self._outbox.get(sender, [])
            ready = self._outbox_ready.get(sender)
            if ready is not None:
                ready.set()
            return
        frame = dumps(events)
        writer.write(len(frame).to_bytes(4, "big") + frame)
        assert self._loop is not None
        self._last_frame[sender] = self._loop.time()

    def _end_result_streams(self) -> None:
        """Write what is left to every result stream, then its end (a zero length)."""
        for sender in list(self._result_writers):
            self._flush_results(sender)
            writer = self._result_writers.pop(sender, None)
            if writer is not None and not writer.is_closing():
                writer.write(b"\0\0\0\0")
                writer.close()

    async def _push_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Apply every push frame (a 4-byte length, then pickled updates) a peer sends."""
        task = asyncio.current_task()
        assert task is not None
        self._push_readers.add(task)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            token = await reader.readexactly(len(self._push_token))
            if not hmac.compare_digest(token, self._push_token):
                return
            while True:
                header = await reader.readexactly(4)
                frame = await reader.readexactly(int.from_bytes(header, "big"))
                self._apply_pushes(loads(frame))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._push_readers.discard(task)
            writer.close()

    async def lifetime(self) -> int:
        """Answers when the node stops: a caller sees the actor's death as an error."""
        assert self._stopped is not None
        await self._stopped.wait()
        return self.index

    async def ping(self) -> int:
        """The heartbeat: answers from the event loop, so a blocked loop misses it."""
        return self.index

    def pid(self) -> int:
        """The process id of the node runtime (for tests and operators)."""
        return os.getpid()

    async def block_event_loop(self, seconds: float) -> None:
        """Block the node's event loop for ``seconds`` (a test aid: a hung node)."""
        time.sleep(seconds)  # noqa: ASYNC251 (blocking is the point)

    async def stop(self) -> list[dict[str, Any]]:
        """Drain and close the runtime; returns its trace as plain records."""
        runtime = self._runtime
        records: list[dict[str, Any]] = []
        if runtime is not None:
            try:
                await self._stack.aclose()
            finally:
                self._runtime = None
                records = _trace_records(runtime)
        for entry in self._queues.values():
            if entry.reporter is not None:
                entry.reporter.cancel()
        for entry in self._queues.values():
            self._report_finished(entry)
        self._end_result_streams()
        self._close_push_streams()
        for event in self._outbox_ready.values():
            event.set()
        if self._stopped is not None:
            self._stopped.set()
        return records

    def _close_push_streams(self) -> None:
        for writer in self._push_writers.values():
            writer.close()
        self._push_writers.clear()
        for task in self._push_readers:
            task.cancel()
        if self._push_server is not None:
            self._push_server.close()
            self._push_server = None

    # -- submissions -----------------------------------------------------------------

    async def submit_batch(
        self,
        sender: str,
        seq: int,
        items: list[tuple[Any, ...]],
        functions: list[bytes | str] | None = None,
    ) -> None:
        """Take one batch of a sender's items; run them in the sender's order.

        ``functions`` are the batch's distinct functions, pickled once each (or the
        message saying why one could not be); a submission names its function by index.
        """
        sequencer = self._sequencers.get(sender)
        if sequencer is None:
            sequencer = self._sequencers[sender] = Sequencer()
        released = sequencer.offer(seq, (items, functions or []))
        if not released:
            return
        inbox = self._inbox.get(sender)
        if inbox is None:
            inbox = self._inbox[sender] = deque()
        inbox.extend(released)
        if sender not in self._consumers:
            self._consumers[sender] = asyncio.get_running_loop().create_task(
                self._consume(sender), name=f"asyncfront:inbox:{sender}"
            )

    async def _consume(self, sender: str) -> None:
        """Take a sender's batches in order; work and values are unpickled off the loop.

        Unpickling may import modules (torch, for a tensor): on the loop that would stall
        every queue and the heartbeat for as long as the import takes.
        """
        inbox = self._inbox[sender]
        try:
            while inbox:
                batch, functions = inbox.popleft()
                if functions or any(_payload(item) is not None for item in batch):
                    decoded = await asyncio.to_thread(_decode_batch, batch, functions)
                else:  # nothing to unpickle: no thread hop
                    decoded = [(True, None)] * len(batch)
                for item, payload in zip(batch, decoded, strict=True):
                    self._take(sender, item, payload)
        finally:
            del self._consumers[sender]

    def _take(self, sender: str, item: tuple[Any, ...], payload: tuple[bool, Any]) -> None:
        kind = item[0]
        if kind == "submit":
            self._submit(sender, item, payload)
        elif kind == "release":
            for sub_id in item[1]:
                self._errors.pop(sub_id, None)
                value = self._values.pop(sub_id, _MISSING)
                arrival = self._arrivals.pop(sub_id, None)
                if value is _MISSING and arrival is not None:
                    sem = arrival[0]
                    if sem.value < 1 and sem.failure is None:
                        # Its copy is still on the way: dropped when it arrives.
                        self._released.add(sub_id)
        elif kind == "forget":
            for name, owner, waiters in item[1]:
                self._forget_semaphore(name, owner, waiters)
        elif kind == "copy":
            _, sub_id, target = item
            self._copy_request(sub_id, target)
        elif kind in ("link_send", "link_recv"):
            self._link_item(sender, item, payload)
        elif kind == "collective":
            _, qid, members, name = item
            runtime = self._require_runtime()
            queues = []
            for member in members:
                queue = self._queues[(sender, member)].queue
                if not isinstance(queue, DeviceQueue):
                    raise ValueError(f"a collective's members are queues, not {queue.name!r}")
                queues.append(queue)
            channel = runtime.collective(queues, name=name)
            entry = self._queues[(sender, qid)] = _RemoteQueue(_ChannelQueue(channel))
            entry.reporter = asyncio.get_running_loop().create_task(
                self._report(entry), name=f"asyncfront:report:{channel.name}"
            )
            self._emit(sender, ("queue", qid, channel.axis, channel.name))
        elif kind == "queue":
            _, qid, device, priority, name = item
            runtime = self._require_runtime()
            queue = runtime.queue(device, priority=priority, name=name)
            entry = self._queues[(sender, qid)] = _RemoteQueue(queue)
            entry.reporter = asyncio.get_running_loop().create_task(
                self._report(entry), name=f"asyncfront:report:{queue.name}"
            )
            self._emit(sender, ("queue", qid, queue.axis, queue.name))
        else:
            raise ValueError(f"unknown item kind {kind!r}")

    def _submit(self, sender: str, item: tuple[Any, ...], decoded: tuple[bool, Any]) -> None:
        _, sub_id, qid, _, waits, signals, name, cost = item
        entry = self._queues[(sender, qid)]
        try:
            local_waits = [(self._semaphore(SemaphoreRef(*ref)), v) for ref, v in waits]
            local_signals = [(self._semaphore(SemaphoreRef(*ref)), v) for ref, v in signals]
        except Exception as exc:
            self._submit_failed(sender, sub_id, exc)
            return
        try:
            ok, work = decoded
            if not ok:
                raise work
            fn, args, kwargs = work if work is not None else (None, (), {})
            for ref in (*args, *kwargs.values()):
                if isinstance(ref, ValueRef) and ref.node is not None:
                    local_waits.append((self._arrival(ref.submission, ref.node), 1))
            collective = isinstance(entry.queue, _ChannelQueue)
            if fn is not None:
                fn = self._keeping(fn, sub_id, args, kwargs, keeps=not collective)
            sub = entry.queue.submit(
                fn, *args, waits=local_waits, signals=local_signals, name=name, cost=cost, **kwargs
            )
        except Exception as exc:
            # Nothing will run: fail what it would have signalled so dependants fail too.
            for sem, value in local_signals:
                if sem.value < value:
                    sem.fail(exc)
            self._submit_failed(sender, sub_id, exc)
            return
        entry.finished.append((sub_id, sender, sub))
        wakeup = entry.wakeup
        if wakeup is not None:
            entry.wakeup = None
            wakeup.set_result(None)

    def _keeping(
        self,
        fn: Callable[..., Any],
        sub_id: int,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        keeps: bool = True,
    ) -> Callable[..., Any]:
        """``fn`` with earlier results put in for ValueRef arguments, keeping its result.

        A collective step's parts do not keep theirs: the step keeps the list of them.
        """
        keep = self._keep if keeps else _keep_nothing
        refs = any(isinstance(a, ValueRef) for a in args) or any(
            isinstance(v, ValueRef) for v in kwargs.values()
        )
        resolve = self._resolve
        if inspect.iscoroutinefunction(fn):

            async def run_async(*a: Any, **k: Any) -> Any:
                if refs:
                    a, k = resolve(a, k)
                result = await fn(*a, **k)
                keep(sub_id, result)
                return result

            return run_async

        def run(*a: Any, **k: Any) -> Any:
            if refs:
                a, k = resolve(a, k)
            result = fn(*a, **k)
            keep(sub_id, result)
            return result

        return run

    def _submit_failed(self, sender: str, sub_id: int, exc: BaseException) -> None:
        """A submission that could not be queued: report it, fail the copies asked of it."""
        packed = pack_exception(exc)
        self._errors[sub_id] = packed
        for target in self._copy_targets.pop(sub_id, ()):
            self._fail_copy(sub_id, target, packed)
        self._emit(sender, ("done", sub_id, 0, ((), ()), False, packed, None))

    # -- copies of results between nodes ----------------------------------------------

    def _copy_request(self, sub_id: int, target: int) -> None:
        """Node ``target`` runs work taking this node's result ``sub_id``: send it a copy."""
        value = self._values.get(sub_id, _MISSING)
        if value is not _MISSING:
            self._send_copy(sub_id, target, value)
            return
        error = self._errors.get(sub_id)
        if error is not None:
            self._fail_copy(sub_id, target, error)
            return
        # Not finished yet: sent when it is reported.
        self._copy_targets.setdefault(sub_id, []).append(target)

    def _send_copy(self, sub_id: int, target: int, value: Any) -> None:
        if target in self._lost:
            return
        try:
            payload = dumps(value)
        except Exception as exc:
            failure = TypeError(f"the result of submission {sub_id} cannot be pickled: {exc}")
            self._fail_copy(sub_id, target, pack_exception(failure))
            return
        self._peers[target].take_copy.remote(sub_id, self.index, True, payload)

    def _fail_copy(self, sub_id: int, target: int, error: bytes) -> None:
        if target not in self._lost:
            self._peers[target].take_copy.remote(sub_id, self.index, False, error)

    def _arrival(self, sub_id: int, source: int) -> TimelineSemaphore:
        """The local semaphore that a copy of ``source``'s result ``sub_id`` signals."""
        entry = self._arrivals.get(sub_id)
        if entry is not None:
            return entry[0]
        sem = TimelineSemaphore(name=f"copy of submission {sub_id} from node {source}")
        assert self._loop is not None
        sem.bind(self._loop)
        self._arrivals[sub_id] = (sem, source)
        lost = self._lost.get(source)
        if lost is not None:
            sem.fail(lost)
        return sem

    async def take_copy(self, sub_id: int, source: int, ok: bool, payload: bytes) -> None:
        """A copy of node ``source``'s result ``sub_id`` (or the error it failed with)."""
        if sub_id in self._released and sub_id not in self._arrivals:
            self._released.discard(sub_id)  # nothing that takes it is left
            return
        sem = self._arrival(sub_id, source)
        if sem.value >= 1 or sem.failure is not None:
            return
        if not ok:
            sem.fail(unpack_exception(payload))
            return
        try:
            value = await asyncio.to_thread(_loads_locked, payload)
        except Exception as exc:
            sem.fail(TypeError(f"a copy of submission {sub_id} cannot be unpickled: {exc}"))
            return
        if sem.value >= 1 or sem.failure is not None:
            return
        if sub_id in self._released:  # nothing that takes it is left
            self._released.discard(sub_id)
            self._arrivals.pop(sub_id, None)
            return
        self._values[sub_id] = value
        sem.signal(1)

    def _keep(self, sub_id: int, value: Any) -> None:
        """Keep a result for later arguments, unless the sender already released it."""
        released = self._released
        if sub_id in released:
            released.discard(sub_id)
        else:
            self._values[sub_id] = value

    def _resolve(
        self, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        def value(v: Any) -> Any:
            if not isinstance(v, ValueRef):
                return v
            try:
                return self._values[v.submission]
            except KeyError:
                raise RuntimeError(
                    f"node {self.index}: an argument is the result of a submission that has "
                    "not finished here (wait for it: its signal, before using its result)"
                ) from None

        return tuple(value(a) for a in args), {k: value(v) for k, v in kwargs.items()}

    # -- links -----------------------------------------------------------------------

    def free_port(self) -> tuple[str, int]:
        """An address of this node and a free TCP port on it, for a process group."""
        import ray

        host = str(ray.util.get_node_ip_address())  # type: ignore[no-untyped-call]
        with socket.socket() as sock:
            sock.bind((host, 0))
            return host, int(sock.getsockname()[1])

    async def init_links(self, host: str, port: int, world: int, timeout: float) -> None:
        """Join the gloo process group of every node (rank = node index)."""
        assert self._dist_ready is not None
        try:
            await asyncio.to_thread(_init_group, host, port, self.index, world, timeout)
        except Exception as exc:
            if not self._dist_ready.done():
                self._dist_ready.set_exception(exc)
            raise
        if not self._dist_ready.done():
            self._dist_ready.set_result(None)

    async def links_failed(self, message: str) -> None:
        """The process group could not form: every link work fails with ``message``."""
        ready = self._dist_ready
        if ready is not None and not ready.done():
            ready.set_exception(ClusterError(message))

    def _link_item(self, sender: str, item: tuple[Any, ...], decoded: tuple[bool, Any]) -> None:
        kind, sub_id, qid, link, message, peer, _, waits, signals, name = item
        entry = self._queues[(sender, qid)]
        try:
            local_waits = [(self._semaphore(SemaphoreRef(*ref)), v) for ref, v in waits]
            local_signals = [(self._semaphore(SemaphoreRef(*ref)), v) for ref, v in signals]
            if kind == "link_send":
                ok, value = decoded
                if not ok:
                    raise value
                fn = self._sender_work(link, message, peer, value, sub_id)
            else:
                self._recv_peers[link] = peer
                local_waits.append((self._announcement(link, message), 1))
                fn = self._receiver_work(link, message, peer, sub_id)
            sub = entry.queue.submit(fn, waits=local_waits, signals=local_signals, name=name)
        except Exception as exc:
            for sem, value in local_signals:
                if sem.value < value:
                    sem.fail(exc)
            self._emit(sender, ("done", sub_id, 0, ((), ()), False, pack_exception(exc), None))
            return
        if kind == "link_send":
            fn.holder.append(sub)  # type: ignore[attr-defined]
            self._link_sends[sub_id] = (link, message, peer)
        entry.finished.append((sub_id, sender, sub))
        wakeup = entry.wakeup
        if wakeup is not None:
            entry.wakeup = None
            wakeup.set_result(None)

    def _announcement(self, link: int, message: int) -> TimelineSemaphore:
        key = (link, message)
        sem = self._announced.get(key)
        if sem is None:
            sem = self._announced[key] = TimelineSemaphore(name=f"link{link}.announced{message}")
            assert self._loop is not None
            sem.bind(self._loop)
            lost = self._lost.get(self._recv_peers.get(link, -1))
            if lost is not None:
                sem.fail(lost)
        return sem

    async def announce(
        self,
        link: int,
        message: int,
        shape: tuple[int, ...],
        dtype: str,
        frontier: EncodedFrontier,
    ) -> None:
        """A sender says what message ``message`` of ``link`` is and the frontier it left with."""
        self._inbound[(link, message)] = (tuple(shape), dtype)
        sem = self._announcement(link, message)
        if sem.value < 1:
            sem.signal(1, decode_frontier(frontier))

    async def message_failed(self, link: int, message: int, error: bytes) -> None:
        """The send of ``message`` failed: its receive fails with the same error."""
        self._announcement(link, message).fail(unpack_exception(error))

    def _sender_work(
        self, link: int, message: int, peer: int, value: Any, sub_id: int
    ) -> Callable[..., Any]:
        holder: list[Submission] = []
        dist_ready = self._dist_ready
        assert dist_ready is not None

        async def send() -> None:
            await dist_ready  # torch is imported by then, off the loop
            import torch

            tensor = self._resolve((value,), {})[0][0]
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"a link sends tensors, got {type(tensor).__name__}")
            tensor = tensor.detach().contiguous()
            frontier = holder[0].frontier
            assert frontier is not None
            self._peers[peer].announce.remote(
                link,
                message,
                tuple(tensor.shape),
                str(tensor.dtype).removeprefix("torch."),
                encode_frontier(frontier),
            )
            await asyncio.to_thread(_send_tensor, tensor, peer, _tag(link, message))

        send.holder = holder  # type: ignore[attr-defined]
        return send

    def _receiver_work(self, link: int, message: int, peer: int, sub_id: int) -> Callable[..., Any]:
        dist_ready = self._dist_ready
        assert dist_ready is not None
        keep = self._keep

        async def receive() -> None:
            await dist_ready
            shape, dtype = self._inbound.pop((link, message))
            self._announced.pop((link, message), None)
            tensor = await asyncio.to_thread(_recv_tensor, shape, dtype, peer, _tag(link, message))
            keep(sub_id, tensor)

        return receive

    async def _report(self, entry: _RemoteQueue) -> None:
        """Report each finished submission of one queue to its sender, in FIFO order."""
        loop = asyncio.get_running_loop()
        finished = entry.finished
        while True:
            if not finished:
                entry.wakeup = loop.create_future()
                await entry.wakeup
                continue
            sub = finished[0][2]
            if not sub.done():
                with contextlib.suppress(Exception):
                    await sub
            self._report_one(*finished.popleft())

    def _report_finished(self, entry: _RemoteQueue) -> None:
        while entry.finished and entry.finished[0][2].done():
            self._report_one(*entry.finished.popleft())

    def _report_one(self, sub_id: int, sender: str, sub: Submission | CollectiveStep) -> None:
        link_send = self._link_sends.pop(sub_id, None)
        if link_send is not None and sub.exception() is not None:
            # The receive waits for this message's announcement: fail it instead.
            link, message, peer = link_send
            if peer not in self._lost:
                packed = pack_exception(root_cause(sub.exception()))  # type: ignore[arg-type]
                self._peers[peer].message_failed.remote(link, message, packed)
        frontier = sub.frontier
        encoded = encode_frontier(frontier) if frontier is not None else ((), ())
        exc = sub.exception()
        if exc is None and sub_id not in self._values:
            # Barriers, collective steps and sends keep theirs now (a copy may ask for it).
            self._keep(sub_id, sub._result)
        targets = self._copy_targets.pop(sub_id, None)
        if exc is None:
            for target in targets or ():
                self._send_copy(sub_id, target, self._values.get(sub_id, sub._result))
            try:
                payload = dumps(sub._result)
            except Exception as error:
                failure = TypeError(f"the result of {sub.name!r} cannot be pickled: {error}")
                self._emit(
                    sender,
                    ("done", sub_id, sub.epoch, encoded, False, pack_exception(failure), None),
                )
                return
            self._emit(sender, ("done", sub_id, sub.epoch, encoded, True, payload, None))
            return
        failed_sem = None
        from .._semaphore import SemaphoreFailedError

        if isinstance(exc, SemaphoreFailedError):
            failed_sem = exc.semaphore.name
        packed = pack_exception(root_cause(exc))
        if sub_id in self._released:
            self._released.discard(sub_id)
        else:
            self._errors[sub_id] = packed
        for target in targets or ():
            self._fail_copy(sub_id, target, packed)
        self._emit(sender, ("done", sub_id, sub.epoch, encoded, False, packed, failed_sem))

    # -- semaphores ------------------------------------------------------------------

    def _semaphore(self, ref: SemaphoreRef) -> TimelineSemaphore:
        """This node's semaphore for ``ref``: the real one on its owner, else a mirror."""
        sem = self._sems.get(ref.name)
        if sem is not None:
            known = self._refs[ref.name]
            if known != ref:
                raise ValueError(
                    f"semaphore {ref.name!r} is owned by node {known.owner} with initial "
                    f"value {known.initial}, not node {ref.owner} / {ref.initial}"
                )
            return sem
        if ref.owner == self.index:
            sem = _OwnedSemaphore(ref.initial, ref.name, self._changed)
        else:
            sem = TimelineSemaphore(ref.initial, name=ref.name)
        assert self._loop is not None
        sem.bind(self._loop)
        self._sems[ref.name] = sem
        self._refs[ref.name] = ref
        if ref.owner != self.index:
            lost = self._lost.get(ref.owner)
            if lost is not None:
                sem.fail(lost)
            elif 0 <= ref.owner < len(self._peers):
                self._peers[ref.owner].subscribe.remote(tuple(ref), self.index)
            else:
                sem.fail(
                    ValueError(
                        f"semaphore {ref.name!r} names node {ref.owner}, not in "
                        f"the cluster of {len(self._peers)} nodes"
                    )
                )
        return sem

    def _forget_semaphore(self, name: str, owner: int, waiters: Iterable[int]) -> None:
        """Drop every record of a finished graph run's semaphore ``name``.

        The sender says so once every submission that waits on it or signals it is done.
        On the owner, ``waiters`` are the nodes that subscribe to it: one whose
        subscription has not arrived yet is remembered until it does.
        """
        self._sems.pop(name, None)
        self._refs.pop(name, None)
        subscribers = self._subscribers.pop(name, set())
        self._dirty.discard(name)
        if owner == self.index:
            missing = {w for w in waiters if w not in subscribers and w not in self._lost}
            if missing:
                self._forgotten[name] = missing

    async def subscribe(self, ref: tuple[str, int, int], subscriber: int | str) -> None:
        """Push every state of the semaphore ``ref`` to ``subscriber`` (node or driver)."""
        late = self._forgotten.get(ref[0])
        if late is not None and subscriber in late:
            late.discard(subscriber)  # its run finished: nothing is left to push
            if not late:
                del self._forgotten[ref[0]]
            return
        sem_ref = SemaphoreRef(*ref)
        sem = self._semaphore(sem_ref)
        self._subscribers.setdefault(sem_ref.name, set()).add(subscriber)
        if sem.value > sem_ref.initial or sem.failure is not None:
            self._changed(sem_ref.name)

    def _changed(self, name: str) -> None:
        self._dirty.add(name)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            assert self._loop is not None
            self._loop.call_soon(self._flush_pushes)

    def _flush_pushes(self) -> None:
        """Send the latest state of every changed semaphore to its subscribers."""
        self._flush_scheduled = False
        dirty, self._dirty = self._dirty, set()
        to_nodes: dict[int, list[SemaphoreUpdate]] = {}
        for name in dirty:
            subscribers = self._subscribers.get(name)
            sem = self._sems.get(name)
            if not subscribers or sem is None:
                continue
            failure = sem.failure
            update = SemaphoreUpdate(
                name,
                sem.value,
                encode_frontier(sem.frontier),
                pack_exception(failure) if failure is not None else None,
            )
            for target in subscribers:
                if isinstance(target, str):
                    self._emit(target, ("sem", *update))
                elif target not in self._lost:
                    to_nodes.setdefault(target, []).append(update)
        for target, updates in to_nodes.items():
            self._send_push(target, updates)

    def _send_push(self, target: int, updates: list[SemaphoreUpdate]) -> None:
        if self._faults is not None:
            assert self._loop is not None
            self._faults.deliver(self._loop, self._push_now, target, updates)
        else:
            self._push_now(target, updates)

    def _push_now(self, target: int, updates: list[SemaphoreUpdate]) -> None:
        if target in self._lost:
            return
        raw = [tuple(u) for u in updates]
        writer = self._push_writers.get(target)
        if writer is not None and not writer.is_closing():
            frame = dumps(raw)
            writer.write(len(frame).to_bytes(4, "big") + frame)
            return
        self._peers[target].push.remote(raw)

    async def push(self, updates: list[tuple[Any, ...]]) -> None:
        """Apply semaphore states pushed by their owners (idempotent, any order)."""
        self._apply_pushes(updates)

    def _apply_pushes(self, updates: list[tuple[Any, ...]]) -> None:
        for raw in updates:
            update = SemaphoreUpdate(*raw)
            sem = self._sems.get(update.name)
            if sem is not None and not isinstance(sem, _OwnedSemaphore):
                apply_update(sem, update)

    async def node_lost(self, node: int, reason: str) -> None:
        """Fail every mirror of a semaphore that ``node`` owned; it will never signal."""
        if node in self._lost:
            return
        error = self._lost[node] = NodeLostError(node, reason)
        for name, ref in self._refs.items():
            if ref.owner == node:
                self._sems[name].fail(error)
        for subscribers in self._subscribers.values():
            subscribers.discard(node)
        for name, late in list(self._forgotten.items()):
            late.discard(node)
            if not late:
                del self._forgotten[name]
        writer = self._push_writers.pop(node, None)
        if writer is not None:
            writer.close()
        for (link, _), sem in self._announced.items():
            if self._recv_peers.get(link) == node:
                sem.fail(error)
        for sem, source in self._arrivals.values():
            if source == node:
                sem.fail(error)
        for targets in self._copy_targets.values():
            while node in targets:
                targets.remove(node)

    # -- results to senders ----------------------------------------------------------

    def _emit(self, sender: str, event: tuple[Any, ...]) -> None:
        if self._faults is not None and event[0] == "sem":
            assert self._loop is not None
            self._faults.deliver(self._loop, self._emit_now, sender, event)
        else:
            self._emit_now(sender, event)

    def _emit_now(self, sender: str, event: tuple[Any, ...]) -> None:
        box = self._outbox.get(sender)
        if box is None:
            box = self._outbox[sender] = []
        box.append(event)
        if sender in self._result_writers:
            self._schedule_results(sender)
            return
        ready = self._outbox_ready.get(sender)
        if ready is None:
            ready = self._outbox_ready[sender] = asyncio.Event()
        ready.set()

    async def poll(self, sender: str) -> bytes:
        """Everything new for ``sender`` (results, queue axes, semaphore states), pickled.

        Waits until there is news, the node stops, or a few seconds pass (then answers
        with nothing, so a caller that went away leaves no call pending for long).
        """
        ready = self._outbox_ready.get(sender)
        if ready is None:
            ready = self._outbox_ready[sender] = asyncio.Event()
        if not self._outbox.get(sender):
            stopped = self._stopped is not None and self._stopped.is_set()
            if not stopped:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(ready.wait(), _POLL_WAIT)
        loop = asyncio.get_running_loop()
        wait = self._last_answer.get(sender, 0.0) + _POLL_INTERVAL - loop.time()
        if wait > 0 and not (self._stopped is not None and self._stopped.is_set()):
            await asyncio.sleep(wait)
        ready.clear()
        events = self._outbox.pop(sender, [])
        self._last_answer[sender] = loop.time()
        return dumps(events)

    # -- helpers ---------------------------------------------------------------------

    def _require_runtime(self) -> Runtime:
        if self._runtime is None:
            raise RuntimeError(f"node {self.index} has no open runtime")
        return self._runtime

    async def trace_records(self) -> list[dict[str, Any]]:
        """The runtime's trace so far, as plain records."""
        runtime = self._runtime
        return _trace_records(runtime) if runtime is not None else []

    async def semaphore_state(self, name: str) -> tuple[int, tuple[Any, ...], bool] | None:
        """(value, encoded frontier, failed) of this node's semaphore ``name``, if it has one."""
        sem = self._sems.get(name)
        if sem is None:
            return None
        return (sem.value, encode_frontier(sem.frontier), sem.failure is not None)

    async def statistics(self) -> NodeStatistics:
        """A snapshot of the records this node keeps (see :class:`NodeStatistics`)."""
        return NodeStatistics(
            node=self.index,
            semaphores=len(self._sems),
            owned_semaphores=sum(1 for ref in self._refs.values() if ref.owner == self.index),
            subscriptions=sum(len(s) for s in self._subscribers.values()),
            forgotten=len(self._forgotten),
            results=len(self._values),
            errors=len(self._errors),
            copies_awaited=len(self._arrivals),
            copy_requests=len(self._copy_targets),
            released=len(self._released),
            queues=len(self._queues),
        )

    async def queue_statistics(self) -> list[dict[str, Any]]:
        """Each remote queue's statistics as a plain dict."""
        out = []
        for entry in self._queues.values():
            stats = entry.queue.statistics()
            out.append({**stats.__dict__, "axis": entry.queue.axis})
        return out


_PAYLOAD_AT = {"submit": 3, "link_send": 6}
# A sender's batch: its items, and the distinct functions they run, pickled once each.
_Batch = tuple[list[tuple[Any, ...]], list[bytes | str]]
# Unpickling may import torch while the process group's thread imports torch.distributed;
# torch does not survive being imported from two threads at once.
_IMPORTS = threading.Lock()


def _decode_batch(
    batch: list[tuple[Any, ...]], functions: list[bytes | str]
) -> list[tuple[bool, Any]]:
    """Unpickle each item's work or value: (True, value) or (False, the error)."""
    out: list[tuple[bool, Any]] = []
    with _IMPORTS:
        fns = [_decode_function(f) for f in functions]
        for item in batch:
            out.append(_decode_item(item, fns))
    return out


def _decode_function(data: bytes | str) -> Any:
    """A batch's function, or the error that stands for it."""
    if isinstance(data, str):
        return TypeError(data)
    try:
        return loads(data)
    except Exception as exc:
        return exc


def _payload(item: tuple[Any, ...]) -> Any:
    """What of an item must be unpickled (None: nothing)."""
    at = _PAYLOAD_AT.get(item[0])
    return item[at] if at is not None else None


def _decode_item(item: tuple[Any, ...], functions: list[Any]) -> tuple[bool, Any]:
    payload = _payload(item)
    if payload is None:
        return (True, None)
    try:
        if item[0] == "submit":
            slot, arguments = payload
            fn = functions[slot] if slot >= 0 else None
            if isinstance(fn, BaseException):
                raise fn
            args, kwargs = loads(arguments) if arguments is not None else ((), {})
            return (True, (fn, args, kwargs))
        return (True, loads(payload))
    except Exception as exc:
        return (False, exc)


def _tag(link: int, message: int) -> int:
    return (link << 20) | (message & 0xFFFFF)


def _init_group(host: str, port: int, rank: int, world: int, timeout: float) -> None:
    import datetime

    with _IMPORTS:
        import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://{host}:{port}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=timeout),
        )


def _send_tensor(tensor: Any, peer: int, tag: int) -> None:
    import torch.distributed as dist

    dist.send(tensor, dst=peer, tag=tag)


def _recv_tensor(shape: tuple[int, ...], dtype: str, peer: int, tag: int) -> Any:
    import torch
    import torch.distributed as dist

    buffer = torch.empty(shape, dtype=getattr(torch, dtype))
    dist.recv(buffer, src=peer, tag=tag)
    return buffer


def _trace_records(runtime: Runtime) -> list[dict[str, Any]]:
    records: Iterable[Any] = runtime.trace
    origin = runtime.trace.origin
    return [
        {
            "queue": r.queue,
            "axis": r.axis,
            "device": r.device,
            "name": r.name,
            "epoch": r.epoch,
            "submitted_at": r.submitted_at,
            "started_at": r.started_at,
            "finished_at": r.finished_at,
            "frontier": encode_frontier(r.frontier),
            "waits": r.waits,
            "signals": r.signals,
            "error": r.error,
            "origin": origin,
        }
        for r in records
    ]
