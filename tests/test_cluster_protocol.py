"""The cluster wire protocol's pure parts: order restoring, idempotent semaphore pushes."""

from __future__ import annotations

import asyncio
import itertools
import random

import pytest

from asyncfront import Frontier, SemaphoreFailedError, TimelineSemaphore, axis
from asyncfront.cluster import (
    DeliveryFaults,
    NodeLostError,
    NodeRuntime,
    RemoteWorkError,
    SemaphoreRef,
    SemaphoreUpdate,
    Sequencer,
    apply_update,
)

pytest.importorskip("ray")

from asyncfront.cluster._protocol import (
    decode_frontier,
    dumps,
    encode_frontier,
    pack_exception,
    unpack_exception,
)


def test_sequencer_restores_order_and_drops_duplicates() -> None:
    """Batches offered shuffled and duplicated come out once each, in sequence order."""
    rng = random.Random(7)
    offers = [n for n in range(1, 51) for _ in range(rng.randint(1, 3))]
    rng.shuffle(offers)
    sequencer: Sequencer[int] = Sequencer()
    released = list(itertools.chain.from_iterable(sequencer.offer(n, n) for n in offers))
    assert released == list(range(1, 51))
    assert sequencer.expected == 51
    assert sequencer.held == 0


def test_sequencer_holds_early_batches() -> None:
    """A batch that arrives before its predecessor is held, then released after it."""
    sequencer: Sequencer[str] = Sequencer()
    assert sequencer.offer(2, "b") == []
    assert sequencer.held == 1
    assert sequencer.offer(1, "a") == ["a", "b"]
    assert sequencer.offer(1, "a") == []


def _updates(count: int) -> list[SemaphoreUpdate]:
    owner_axis = axis(node=0, device=0, queue=0)
    frontier = Frontier()
    out = []
    for value in range(1, count + 1):
        frontier = frontier.merge(Frontier({owner_axis: value, axis(node=1): value // 2 + 1}))
        out.append(SemaphoreUpdate("s", value, encode_frontier(frontier), None))
    return out


def test_apply_update_is_idempotent_and_order_insensitive() -> None:
    """Any order and any duplication of an owner's pushes leaves the mirror at the last state."""
    updates = _updates(20)
    rng = random.Random(3)
    for _ in range(20):
        shuffled = updates + rng.sample(updates, 10)
        rng.shuffle(shuffled)
        mirror = TimelineSemaphore(name="s")
        for update in shuffled:
            apply_update(mirror, update)
        assert mirror.value == 20
        assert mirror.frontier == decode_frontier(updates[-1].frontier)


def test_apply_update_failure_lands_after_its_value() -> None:
    """A failure push raises the value to where the owner failed, then fails the mirror."""
    mirror = TimelineSemaphore(name="s")
    failed = SemaphoreUpdate("s", 3, encode_frontier(Frontier()), pack_exception(KeyError("x")))
    assert apply_update(mirror, failed)
    assert mirror.value == 3
    assert isinstance(mirror.failure, KeyError)
    assert not apply_update(mirror, _updates(5)[-1])  # a failed mirror stays as it is
    with pytest.raises(SemaphoreFailedError):
        mirror.query()


class _Unpicklable(Exception):
    def __init__(self, a: int, b: int) -> None:
        super().__init__(f"{a}/{b}")


def test_errors_travel_with_type_and_message() -> None:
    """Errors keep type and message on the wire; one that cannot travel is a RemoteWorkError."""
    back = unpack_exception(pack_exception(NodeLostError(3, "its runtime actor died")))
    assert isinstance(back, NodeLostError)
    assert (back.node, str(back)) == (3, "node 3 was lost: its runtime actor died")
    plain = unpack_exception(pack_exception(ZeroDivisionError("division by zero")))
    assert type(plain) is ZeroDivisionError and str(plain) == "division by zero"
    odd = unpack_exception(pack_exception(_Unpicklable(1, 2)))
    assert isinstance(odd, RemoteWorkError)
    assert odd.type_name.endswith("_Unpicklable") and odd.message == "1/2"


def test_delivery_faults_reject_bad_settings() -> None:
    """DeliveryFaults names the bad number."""
    with pytest.raises(ValueError, match="duplicate must be a probability"):
        DeliveryFaults(duplicate=1.5)
    with pytest.raises(ValueError, match="max_delay must be >= 0"):
        DeliveryFaults(max_delay=-1.0)


def test_batch_pickles_each_function_once_and_decodes_every_item() -> None:
    """A batch carries each distinct function once; every item decodes to its own work."""
    from asyncfront.cluster._cluster import _encode_batch, _Work
    from asyncfront.cluster._node import _decode_batch
    from asyncfront.cluster._protocol import dumps

    def item(sub_id: int, work: _Work | None) -> tuple[object, ...]:
        return ("submit", sub_id, 1, work, (), (), f"w{sub_id}", None)

    batch = [
        item(1, _Work(abs, dumps(((-1,), {})))),
        item(2, _Work(abs, dumps(((-2,), {})))),
        item(3, _Work(max, dumps(((1, 5), {})))),
        item(4, None),  # a barrier
        ("release", [7, 8]),
        item(5, _Work(abs, None)),
    ]
    items, functions = _encode_batch(batch)
    assert len(functions) == 2  # abs and max, once each
    assert [i[3] for i in items if i[0] == "submit"][3] is None
    decoded = _decode_batch(items, functions)
    works = [value for ok, value in decoded]
    assert all(ok for ok, _ in decoded)
    assert [w[0](*w[1], **w[2]) for w in (works[0], works[1], works[2])] == [1, 2, 5]
    assert works[3] is None and works[4] is None
    assert works[5] == (abs, (), {})


def test_function_that_stops_pickling_fails_only_its_items() -> None:
    """A function that no longer pickles when its batch leaves fails its items, named."""
    import threading

    from asyncfront.cluster._cluster import _encode_batch, _Work
    from asyncfront.cluster._node import _decode_batch

    lock = threading.Lock()

    def holds_lock() -> object:
        return lock

    batch = [
        ("submit", 1, 1, _Work(holds_lock, None), (), (), "locked", None),
        ("submit", 2, 1, _Work(abs, None), (), (), "fine", None),
    ]
    items, functions = _encode_batch(batch)
    (ok1, error), (ok2, work) = _decode_batch(items, functions)
    assert not ok1 and isinstance(error, TypeError)
    assert "work 'locked' cannot be pickled" in str(error)
    assert ok2 and work == (abs, (), {})


def _node(index: int) -> NodeRuntime:
    """A node runtime's handlers on the running loop, with no runtime and no peers."""
    node = NodeRuntime(index, b"", 1.0, None)
    node._loop = asyncio.get_running_loop()
    return node


async def test_owner_drops_a_forgotten_semaphore_and_a_late_subscription_adds_nothing() -> None:
    """Forgotten before node 1 subscribed: the late subscription is absorbed, not re-made."""
    owner = _node(0)
    ref = ("g#1.a~r1", 0, 0)
    owner._semaphore(SemaphoreRef(*ref))
    owner._forget_semaphore(ref[0], 0, (1,))
    stats = await owner.statistics()
    assert (stats.semaphores, stats.subscriptions, stats.forgotten) == (0, 0, 1)
    await owner.subscribe(ref, 1)
    stats = await owner.statistics()
    assert (stats.semaphores, stats.subscriptions, stats.forgotten) == (0, 0, 0)
    # Subscribed first, forgotten after: everything goes at once.
    ref = ("g#2.a~r2", 0, 0)
    await owner.subscribe(ref, 1)
    assert (await owner.statistics()).subscriptions == 1
    owner._forget_semaphore(ref[0], 0, (1,))
    stats = await owner.statistics()
    assert (stats.semaphores, stats.subscriptions, stats.forgotten) == (0, 0, 0)


async def test_lost_subscriber_ends_the_wait_for_its_late_subscription() -> None:
    """A node lost before its subscription arrived leaves no record on the owner."""
    owner = _node(0)
    owner._forget_semaphore("g#1.a~r1", 0, (1, 2))
    assert (await owner.statistics()).forgotten == 1
    await owner.node_lost(1, "its runtime actor died")
    assert (await owner.statistics()).forgotten == 1  # node 2's subscription may still come
    await owner.node_lost(2, "its runtime actor died")
    assert (await owner.statistics()).forgotten == 0


async def test_mirror_forgets_and_ignores_later_pushes() -> None:
    """A mirror dropped after its run ignores pushes that arrive later."""

    class Peer:
        def __init__(self) -> None:
            self.subscribed: list[tuple[tuple[str, int, int], int]] = []
            self.subscribe = self

        def remote(self, ref: tuple[str, int, int], subscriber: int) -> None:
            self.subscribed.append((ref, subscriber))

    mirror = _node(1)
    peer = Peer()
    mirror._peers = [peer, None]
    sem = mirror._semaphore(SemaphoreRef("g#1.a~r1", 0, 0))
    assert peer.subscribed == [(("g#1.a~r1", 0, 0), 1)]
    mirror._forget_semaphore("g#1.a~r1", 0, ())
    mirror._apply_pushes([tuple(SemaphoreUpdate("g#1.a~r1", 1, encode_frontier(Frontier()), None))])
    stats = await mirror.statistics()
    assert (stats.semaphores, stats.forgotten) == (0, 0)
    assert sem.value == 0


@pytest.mark.parametrize("ok", [True, False])
async def test_copy_arriving_after_its_release_leaves_nothing(ok: bool) -> None:
    """A copy released before it arrived is dropped on arrival, result or error alike."""
    taker = _node(1)
    taker._arrival(7, 0)
    taker._take("driver", ("release", [7]), (True, None))
    assert (await taker.statistics()).released == 1
    payload = dumps(41) if ok else pack_exception(RuntimeError("the producer broke"))
    await taker.take_copy(7, 0, ok, payload)
    stats = await taker.statistics()
    assert (stats.results, stats.copies_awaited, stats.released) == (0, 0, 0)


async def test_release_of_a_failed_submission_keeps_nothing() -> None:
    """Releasing a submission that failed here drops its error and remembers nothing."""
    node = _node(0)
    node._errors[5] = pack_exception(RuntimeError("broke"))
    node._take("driver", ("release", [5]), (True, None))
    stats = await node.statistics()
    assert (stats.errors, stats.released) == (0, 0)


async def test_error_of_a_run_failed_while_awaited_does_not_keep_the_run_alive() -> None:
    """Waiting for a run gives no stage error a traceback: holding one pins no run."""
    import weakref
    from types import SimpleNamespace

    from asyncfront.cluster import ClusterGraphRun, RemoteSubmission

    loop = asyncio.get_running_loop()
    queue = SimpleNamespace(node=SimpleNamespace(cluster=SimpleNamespace(_loop=loop), index=0))
    first = RemoteSubmission(queue, "first", 1)  # type: ignore[arg-type]
    second = RemoteSubmission(queue, "second", 2)  # type: ignore[arg-type]
    run = ClusterGraphRun(None, 1, "g#1", {"first": first, "second": second}, ("second",), {})  # type: ignore[arg-type]
    loop.call_soon(first._finish, 1)
    loop.call_later(0.01, second._fail, RuntimeError("second broke"))
    await run.wait()
    error = run.exceptions()["second"]
    alive = weakref.ref(run)
    del run, first, second
    assert alive() is None
    assert isinstance(error, RuntimeError) and error.__traceback__ is None
