"""The frontier algebra: lattice laws, bounded capacity, axis layout and construction."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import asyncfront as af
from asyncfront import Domain, Frontier, Order
from asyncfront._frontier import _covers, _merge_scan

# Enough examples to find counterexamples over the small axis pool, few enough to stay fast.
PROPERTY = settings(max_examples=60, deadline=None, database=None)

# A small pool of axes makes overlapping frontiers (the interesting case) common; the two
# extremes of the 64-bit range check that nothing assumes small axis values.
AXIS_POOL = [
    af.axis(),
    af.axis(device=1),
    af.axis(device=1, queue=2),
    af.axis(node=3, device=2, queue=1),
    af.axis(domain=Domain.COLLECTIVE, ordinal=7),
    af.axis(domain=Domain.HOST, ordinal=1),
    af.axis(incarnation=1),
    (1 << 64) - 1,
]

axes_st = st.sampled_from(AXIS_POOL)
epochs_st = st.integers(min_value=1, max_value=6)
# One epoch per pool axis, 0 meaning absent: cheaper to draw than a dict of unique keys.
entries_st = st.lists(
    st.integers(min_value=0, max_value=5), min_size=len(AXIS_POOL), max_size=len(AXIS_POOL)
).map(lambda epochs: {ax: e for ax, e in zip(AXIS_POOL, epochs, strict=True) if e})
frontiers = entries_st.map(Frontier)


@st.composite
def same_axes_pairs(draw: st.DrawFn) -> tuple[Frontier, Frontier]:
    """Two frontiers over exactly the same axes (the fast path)."""
    axes = draw(st.lists(axes_st, unique=True, max_size=len(AXIS_POOL)))
    first = draw(st.lists(epochs_st, min_size=len(axes), max_size=len(axes)))
    second = draw(st.lists(epochs_st, min_size=len(axes), max_size=len(axes)))
    return Frontier(zip(axes, first, strict=True)), Frontier(zip(axes, second, strict=True))


def epochs(f: Frontier) -> tuple[int, ...]:
    """The epochs of a frontier in axis order."""
    return tuple(e for _, e in f)


def ref_merge(a: Mapping[int, int], b: Mapping[int, int]) -> dict[int, int]:
    """Component-wise max over plain dicts: the model the merge scan must agree with."""
    return {ax: max(a.get(ax, 0), b.get(ax, 0)) for ax in a.keys() | b.keys()}


def ref_dominates(a: Mapping[int, int], b: Mapping[int, int]) -> bool:
    """Every entry of b is at most the same axis in a, over plain dicts."""
    return all(a.get(ax, 0) >= epoch for ax, epoch in b.items())


# -- lattice laws ------------------------------------------------------------------------


@PROPERTY
@given(frontiers, frontiers)
def test_merge_is_commutative(a: Frontier, b: Frontier) -> None:
    """a | b equals b | a."""
    assert a | b == b | a


@PROPERTY
@given(frontiers, frontiers, frontiers)
def test_merge_is_associative(a: Frontier, b: Frontier, c: Frontier) -> None:
    """(a | b) | c equals a | (b | c)."""
    assert (a | b) | c == a | (b | c)


@PROPERTY
@given(frontiers)
def test_merge_is_idempotent(a: Frontier) -> None:
    """a | a equals a."""
    assert a | a == a


@PROPERTY
@given(frontiers, frontiers)
def test_merge_matches_componentwise_max(a: Frontier, b: Frontier) -> None:
    """merge is the component-wise maximum, with entries sorted by axis."""
    merged = a.merge(b)
    assert merged.as_dict() == ref_merge(a.as_dict(), b.as_dict())
    assert list(merged.axes) == sorted(merged.axes)


@PROPERTY
@given(frontiers, frontiers)
def test_dominates_matches_model(a: Frontier, b: Frontier) -> None:
    """dominates and >= say every entry of b is at most the same axis in a."""
    expected = ref_dominates(a.as_dict(), b.as_dict())
    assert a.dominates(b) is expected
    assert (a >= b) is expected
    assert (b <= a) is expected


@PROPERTY
@given(frontiers)
def test_dominance_is_reflexive(a: Frontier) -> None:
    """Every frontier dominates itself."""
    assert a.dominates(a)
    assert a >= a
    assert not a > a


@PROPERTY
@given(frontiers, frontiers)
def test_dominance_is_antisymmetric(a: Frontier, b: Frontier) -> None:
    """Frontiers that dominate each other are equal."""
    if a >= b and b >= a:
        assert a == b
    else:
        assert a != b


@PROPERTY
@given(frontiers, frontiers, frontiers)
def test_dominance_is_transitive(a: Frontier, b: Frontier, c: Frontier) -> None:
    """a >= b and b >= c imply a >= c (checked on chains built by merging)."""
    low = c
    mid = b | c
    high = a | b | c
    assert high >= mid >= low
    assert high >= low
    if a >= b and b >= c:
        assert a >= c


@PROPERTY
@given(frontiers, frontiers)
def test_strict_order_is_dominance_without_equality(a: Frontier, b: Frontier) -> None:
    """a > b and a < b hold exactly for strict dominance either way."""
    assert (a > b) is (a.dominates(b) and a != b)
    assert (a < b) is (b.dominates(a) and a != b)


@PROPERTY
@given(frontiers, frontiers)
def test_compare_is_consistent_with_dominates(a: Frontier, b: Frontier) -> None:
    """compare gives EQUAL, BEFORE, AFTER or CONCURRENT exactly as dominance says."""
    a_ge_b, b_ge_a = a.dominates(b), b.dominates(a)
    expected = {
        (True, True): Order.EQUAL,
        (False, True): Order.BEFORE,
        (True, False): Order.AFTER,
        (False, False): Order.CONCURRENT,
    }[(a_ge_b, b_ge_a)]
    assert a.compare(b) is expected


@PROPERTY
@given(frontiers, frontiers)
def test_compare_is_antisymmetric(a: Frontier, b: Frontier) -> None:
    """Swapping the operands of compare swaps BEFORE and AFTER."""
    swap = {
        Order.EQUAL: Order.EQUAL,
        Order.BEFORE: Order.AFTER,
        Order.AFTER: Order.BEFORE,
        Order.CONCURRENT: Order.CONCURRENT,
    }
    assert b.compare(a) is swap[a.compare(b)]


def test_compare_examples() -> None:
    """compare names the four relations on hand-written frontiers."""
    x, y = AXIS_POOL[0], AXIS_POOL[1]
    a = Frontier({x: 1})
    assert a.compare(Frontier({x: 1})) is Order.EQUAL
    assert a.compare(Frontier({x: 2})) is Order.BEFORE
    assert Frontier({x: 1, y: 1}).compare(a) is Order.AFTER
    assert a.compare(Frontier({y: 1})) is Order.CONCURRENT


@PROPERTY
@given(frontiers, frontiers)
def test_merge_is_an_upper_bound(a: Frontier, b: Frontier) -> None:
    """a | b dominates both a and b."""
    merged = a | b
    assert merged >= a
    assert merged >= b


@PROPERTY
@given(frontiers, frontiers, frontiers)
def test_merge_is_the_least_upper_bound(a: Frontier, b: Frontier, c: Frontier) -> None:
    """Lowering any entry of a | b loses an upper bound; any upper bound dominates a | b."""
    merged = a | b
    for ax, epoch in merged:
        lowered = Frontier({**merged.as_dict(), ax: epoch - 1})
        assert not (lowered >= a and lowered >= b)
    upper = c | a | b
    assert upper >= merged
    if c >= a and c >= b:
        assert c >= merged


@PROPERTY
@given(frontiers, frontiers)
def test_merge_adds_nothing_beyond_the_union(a: Frontier, b: Frontier) -> None:
    """a | b has exactly the union of the axes of a and b."""
    assert set((a | b).axes) == set(a.axes) | set(b.axes)


@PROPERTY
@given(frontiers, frontiers)
def test_undominated_is_empty_exactly_when_dominated(a: Frontier, b: Frontier) -> None:
    """a.undominated(b) is empty exactly when a dominates b."""
    assert (not a.undominated(b)) is a.dominates(b)


@PROPERTY
@given(frontiers, frontiers)
def test_undominated_lists_the_missing_waits(a: Frontier, b: Frontier) -> None:
    """a.undominated(b) holds the entries of b that a does not cover, and covers the gap."""
    rest = a.undominated(b)
    expected = {ax: e for ax, e in b.as_dict().items() if a.get(ax) < e}
    assert rest.as_dict() == expected
    assert b >= rest
    assert a | rest >= b


@PROPERTY
@given(frontiers, axes_st)
def test_get_of_missing_axis_is_zero(a: Frontier, ax: int) -> None:
    """get returns the stored epoch, or 0 for an axis not present."""
    assert a.get(ax) == a.as_dict().get(ax, 0)
    assert (ax in a) is (a.get(ax) > 0)


def test_get_and_contains_on_empty_frontier() -> None:
    """The empty frontier reads 0 everywhere and is falsy."""
    empty = Frontier()
    assert empty.get(AXIS_POOL[0]) == 0
    assert AXIS_POOL[0] not in empty
    assert "not an axis" not in empty
    assert not empty
    assert len(empty) == 0


@PROPERTY
@given(entries_st)
def test_iteration_is_in_axis_order(entries: dict[int, int]) -> None:
    """Iterating a frontier yields (axis, epoch) pairs in ascending axis order."""
    f = Frontier(entries)
    assert list(f) == sorted(entries.items())
    assert f.axes == tuple(sorted(entries))
    assert len(f) == len(entries)
    assert bool(f) is bool(entries)


@PROPERTY
@given(entries_st)
def test_construction_order_does_not_matter(entries: dict[int, int]) -> None:
    """Frontiers built from the same entries in any order are equal and hash alike."""
    forward = Frontier(list(entries.items()))
    backward = Frontier(list(reversed(entries.items())))
    assert forward == backward
    assert hash(forward) == hash(backward)


@PROPERTY
@given(frontiers, frontiers)
def test_equality_and_hash_are_consistent(a: Frontier, b: Frontier) -> None:
    """Equal frontiers hash alike, and equality means equal entries."""
    assert (a == b) is (a.as_dict() == b.as_dict())
    if a == b:
        assert hash(a) == hash(b)
    assert len({a, b, Frontier(a.as_dict())}) == (1 if a == b else 2)


def test_frontier_does_not_equal_other_types() -> None:
    """A frontier never equals a dict with the same entries, and does not order with one."""
    f = Frontier({AXIS_POOL[0]: 1})
    assert f != {AXIS_POOL[0]: 1}
    with pytest.raises(TypeError):
        _ = f >= {AXIS_POOL[0]: 1}  # type: ignore[operator]


@PROPERTY
@given(same_axes_pairs())
def test_fast_path_agrees_with_general_path(pair: tuple[Frontier, Frontier]) -> None:
    """On frontiers with the same axes, merge and dominates agree with the merge scans."""
    a, b = pair
    assert a.axes == b.axes
    # The public operations take the same-axes fast path; the scans are the general path.
    assert ((a | b).axes, epochs(a | b)) == _merge_scan(a.axes, epochs(a), b.axes, epochs(b))
    assert a.dominates(b) is _covers(a.axes, epochs(a), b.axes, epochs(b))
    assert b.dominates(a) is _covers(b.axes, epochs(b), a.axes, epochs(a))
    assert (a | b).as_dict() == ref_merge(a.as_dict(), b.as_dict())
    assert a.dominates(b) is ref_dominates(a.as_dict(), b.as_dict())


@PROPERTY
@given(same_axes_pairs())
def test_merge_of_identical_frontiers_returns_an_equal_frontier(
    pair: tuple[Frontier, Frontier],
) -> None:
    """Merging a frontier with an equal one (same axes and epochs) returns it unchanged."""
    a, _ = pair
    twin = Frontier(a.as_dict())
    assert a | twin == a
    assert a.compare(twin) is Order.EQUAL


@PROPERTY
@given(frontiers, axes_st, st.integers(min_value=0, max_value=8))
def test_with_epoch_raises_only_upward(a: Frontier, ax: int, epoch: int) -> None:
    """with_epoch makes the axis read at least epoch and leaves other axes alone."""
    updated = a.with_epoch(ax, epoch)
    assert updated.get(ax) == max(a.get(ax), epoch)
    assert updated >= a
    assert {k: v for k, v in updated if k != ax} == {k: v for k, v in a if k != ax}
    assert updated == a | Frontier({ax: epoch})


def test_single_builds_one_entry() -> None:
    """Frontier.single makes a one-entry frontier, and an empty one for epoch 0."""
    ax = AXIS_POOL[2]
    assert Frontier.single(ax, 4) == Frontier({ax: 4})
    assert Frontier.single(ax, 0) == Frontier()


# -- bounded capacity ----------------------------------------------------------------


@PROPERTY
@given(frontiers, st.integers(min_value=1, max_value=len(AXIS_POOL) + 1), st.data())
def test_truncated_is_a_bounded_lower_bound(
    a: Frontier, capacity: int, data: st.DataObject
) -> None:
    """truncated keeps at most capacity entries, a subset of the original, and keeps keep."""
    keep = data.draw(st.sampled_from(a.axes)) if a else None
    cut = a.truncated(capacity, keep=keep)
    assert len(cut) == min(capacity, len(a))
    assert a >= cut
    assert all(a.get(ax) == e for ax, e in cut)
    if keep is not None:
        assert cut.get(keep) == a.get(keep)


@PROPERTY
@given(frontiers, st.integers(min_value=1, max_value=len(AXIS_POOL)))
def test_truncated_drops_the_smallest_epochs(a: Frontier, capacity: int) -> None:
    """Every dropped entry has an epoch no larger than every kept one."""
    cut = a.truncated(capacity)
    dropped = [e for ax, e in a if ax not in cut]
    if dropped:
        assert max(dropped) <= min(e for _, e in cut)


def test_truncated_keeps_the_named_axis_even_with_the_smallest_epoch() -> None:
    """keep survives truncation although its epoch is the smallest."""
    x, y, z = AXIS_POOL[:3]
    f = Frontier({x: 1, y: 5, z: 9})
    assert f.truncated(2) == Frontier({y: 5, z: 9})
    assert f.truncated(2, keep=x) == Frontier({x: 1, z: 9})
    assert f.truncated(1, keep=x) == Frontier({x: 1})


def test_truncated_within_capacity_is_unchanged() -> None:
    """A frontier that fits is returned as is."""
    f = Frontier({AXIS_POOL[0]: 3, AXIS_POOL[1]: 2})
    assert f.truncated(2) == f
    assert f.truncated(af.DEFAULT_FRONTIER_CAPACITY) == f


def test_truncated_rejects_a_capacity_below_one() -> None:
    """A capacity of 0 is an error naming the value."""
    with pytest.raises(ValueError, match="got 0"):
        Frontier({AXIS_POOL[0]: 1}).truncated(0)


def test_default_capacity_is_64() -> None:
    """The default frontier capacity is 64 entries."""
    assert af.DEFAULT_FRONTIER_CAPACITY == 64


# -- axes --------------------------------------------------------------------------------


@PROPERTY
@given(
    node=st.integers(0, 255),
    device=st.integers(0, 255),
    queue=st.integers(0, 2**32 - 1),
    incarnation=st.integers(0, 255),
)
def test_queue_axis_bit_layout(node: int, device: int, queue: int, incarnation: int) -> None:
    """A queue axis is incarnation<<56 | node<<48 | QUEUE<<40 | device<<32 | queue (32 bits)."""
    value = af.axis(node, Domain.QUEUE, device, queue, incarnation)
    assert value == incarnation << 56 | node << 48 | device << 32 | queue
    assert 0 <= value < 1 << 64
    fields = af.axis_fields(value)
    assert fields == af.AxisFields(incarnation, node, Domain.QUEUE, device << 32 | queue)
    assert (fields.device, fields.queue) == (device, queue)


@PROPERTY
@given(
    node=st.integers(0, 255),
    domain=st.sampled_from(list(Domain)),
    ordinal=st.integers(0, (1 << 40) - 1),
    incarnation=st.integers(0, 255),
)
def test_axis_with_ordinal_round_trips(
    node: int, domain: Domain, ordinal: int, incarnation: int
) -> None:
    """axis_fields decodes exactly the fields axis encoded, for every domain."""
    value = af.axis(node, domain, incarnation=incarnation, ordinal=ordinal)
    assert value == incarnation << 56 | node << 48 | int(domain) << 40 | ordinal
    assert af.axis_fields(value) == (incarnation, node, int(domain), ordinal)


def test_domain_values() -> None:
    """Domains are QUEUE=0, COLLECTIVE=1, HOST=3."""
    assert (Domain.QUEUE, Domain.COLLECTIVE, Domain.HOST) == (0, 1, 3)
    assert af.axis_fields(af.axis(domain=Domain.HOST, ordinal=5)).domain == Domain.HOST


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("node", 256),
        ("node", -1),
        ("domain", 256),
        ("device", 256),
        ("device", -1),
        ("incarnation", 256),
        ("incarnation", -1),
    ],
)
def test_axis_rejects_out_of_range_fields(field: str, value: int) -> None:
    """Every byte field outside 0..255 raises ValueError naming the field and value."""
    with pytest.raises(ValueError, match=rf"{field} must be in 0\.\.255, got {value}"):
        af.axis(**{field: value})


@pytest.mark.parametrize("queue", [-1, 2**32])
def test_axis_rejects_out_of_range_queue(queue: int) -> None:
    """A queue slot outside 32 bits raises ValueError naming the range and value."""
    with pytest.raises(ValueError, match=rf"queue must be in 0\.\.4294967295, got {queue}"):
        af.axis(queue=queue)


@pytest.mark.parametrize("ordinal", [-1, 1 << 40])
def test_axis_rejects_out_of_range_ordinal(ordinal: int) -> None:
    """An ordinal outside 40 bits raises ValueError naming it."""
    with pytest.raises(ValueError, match=f"got {ordinal}"):
        af.axis(domain=Domain.HOST, ordinal=ordinal)


def test_axis_names_are_readable() -> None:
    """Unnamed axes decode to their fields; named axes use their name in reprs."""
    queue_axis = af.axis(node=1, device=2, queue=3, incarnation=4)
    host_axis = af.axis(node=5, domain=Domain.HOST, incarnation=6, ordinal=9)
    odd_axis = af.axis(domain=2, ordinal=7)
    assert af.axis_name(queue_axis) == "q(n1.d2.q3#4)"
    assert af.axis_name(host_axis) == "host(n5.9#6)"
    assert af.axis_name(odd_axis) == "domain2(n0.7#0)"

    named = af.axis(node=250, device=250, queue=250, incarnation=250)
    af.set_axis_name(named, "gpu0.compute")
    assert af.axis_name(named) == "gpu0.compute"
    f = Frontier({named: 7, queue_axis: 2})
    assert repr(f) == "Frontier({q(n1.d2.q3#4): 2, gpu0.compute: 7})"


def test_empty_frontier_repr() -> None:
    """The empty frontier reads as Frontier({})."""
    assert repr(Frontier()) == "Frontier({})"


# -- construction ------------------------------------------------------------------------


def test_construct_from_mapping_pairs_and_nothing() -> None:
    """A mapping, an iterable of pairs and no argument all build frontiers."""
    x, y = AXIS_POOL[0], AXIS_POOL[1]
    from_mapping = Frontier({y: 2, x: 1})
    from_pairs = Frontier(iter([(y, 2), (x, 1)]))
    assert from_mapping == from_pairs
    assert list(from_mapping) == [(x, 1), (y, 2)]
    assert Frontier() == Frontier({}) == Frontier([])
    assert len(Frontier()) == 0


def test_zero_epochs_are_dropped() -> None:
    """An entry with epoch 0 is not stored (it reads as 0 anyway)."""
    x, y = AXIS_POOL[0], AXIS_POOL[1]
    f = Frontier({x: 0, y: 3})
    assert f.axes == (y,)
    assert f == Frontier({y: 3})
    assert Frontier({x: 0}) == Frontier()


def test_negative_epoch_raises() -> None:
    """A negative epoch is a ValueError naming the value."""
    with pytest.raises(ValueError, match="got -1"):
        Frontier({AXIS_POOL[0]: -1})


@pytest.mark.parametrize(
    "pairs",
    [[(1, 2), (1, 3)], [(1, 2), (1, 2)], [(1, 0), (1, 5)], [(1, 5), (1, 0)], [(1, 0), (1, 0)]],
)
def test_duplicate_axes_raise(pairs: list[tuple[int, int]]) -> None:
    """An axis given twice is an error, whatever the epochs (zero included)."""
    with pytest.raises(ValueError, match="appears twice"):
        Frontier(pairs)


def test_non_integer_entries_raise() -> None:
    """Entries must be (int, int) pairs."""
    with pytest.raises(TypeError, match="pairs"):
        Frontier([(1, 1.5)])  # type: ignore[list-item]


@PROPERTY
@given(st.one_of(st.tuples(frontiers, frontiers), same_axes_pairs()))
def test_merge_returns_a_dominating_operand_itself(pair: tuple[Frontier, Frontier]) -> None:
    """When one operand dominates the other, merge returns that operand, not a copy."""
    a, b = pair
    merged = a | b
    if a.dominates(b):
        assert merged is a
    elif b.dominates(a):
        assert merged is b
    else:
        assert merged.dominates(a) and merged.dominates(b)
        assert merged.as_dict() == ref_merge(a.as_dict(), b.as_dict())


def _ranked_truncation(f: Frontier, capacity: int, keep: int | None) -> Frontier:
    """The truncation rule spelled out: keep first, then the larger epoch, then the larger axis."""
    ranked = sorted(f, key=lambda entry: (entry[0] == keep, entry[1], entry[0]), reverse=True)
    return Frontier(ranked[:capacity])


tied_frontiers = st.dictionaries(
    axes_st, st.integers(min_value=1, max_value=2), min_size=0, max_size=len(AXIS_POOL)
).map(Frontier)


@PROPERTY
@given(
    st.one_of(frontiers, tied_frontiers),
    st.integers(min_value=1, max_value=len(AXIS_POOL) + 1),
    st.one_of(st.none(), axes_st),
)
def test_truncated_keeps_exactly_the_ranked_entries(
    a: Frontier, capacity: int, keep: int | None
) -> None:
    """truncated keeps keep, then the largest epochs, ties going to the larger axis."""
    assert a.truncated(capacity, keep=keep) == _ranked_truncation(a, capacity, keep)


@PROPERTY
@given(frontiers, axes_st, st.integers(min_value=0, max_value=8))
def test_with_epoch_is_a_merge_with_one_entry(a: Frontier, ax: int, epoch: int) -> None:
    """with_epoch(axis, epoch) equals merging {axis: epoch}, a new axis included in order."""
    raised = a.with_epoch(ax, epoch)
    assert raised == a.merge(Frontier.single(ax, epoch))
    assert list(raised.axes) == sorted(raised.axes)
