"""Scenario B1: speculative decoding with draft and verify rounds overlapping on GPU 0."""

from __future__ import annotations

import pytest

from asyncfront import open_runtime
from asyncfront.scenarios import get_scenario
from asyncfront.scenarios.speculative_decoding import (
    DRAFT_TOKENS,
    SpeculativeReport,
    acceptance_pattern,
    run_speculative_decoding,
    simulate,
    speculative_devices,
)
from asyncfront.testing import run_virtual

PATTERN = [4, 1, 4, 0, 4]


@pytest.fixture(scope="module")
def report() -> SpeculativeReport:
    async def main() -> SpeculativeReport:
        result, _ = await simulate()
        return result

    return run_virtual(main)


@pytest.fixture(scope="module")
def patterned() -> SpeculativeReport:
    async def main() -> SpeculativeReport:
        async with open_runtime(speculative_devices()) as rt:
            return await run_speculative_decoding(rt, rounds=len(PATTERN), acceptance=PATTERN)

    return run_virtual(main)


def test_seeded_pattern_is_deterministic(report: SpeculativeReport) -> None:
    """The default seed gives the same acceptances, reply length and end time every run."""
    assert acceptance_pattern(8, 7) == [4, 4, 4, 1, 3, 2, 1, 4]
    assert [v.accepted for v in report.verifies] == [4, 4, 4, 1, 3, 2, 1, 4]
    assert len(report.reply) == 27  # 23 accepted draft tokens + 4 corrections
    assert report.elapsed == pytest.approx(0.5)
    assert report.serial_time == pytest.approx(0.56)


def test_speculative_draft_overlaps_the_verify_it_speculates_past(
    report: SpeculativeReport,
) -> None:
    """Every speculative draft of round r+1 runs while round r is being verified."""
    speculative = [d for d in report.drafts if d.speculative]
    assert len(speculative) == 7
    for d in speculative:
        v = report.verifies[d.round - 2].submission
        s = d.submission
        assert s.started_at is not None and s.finished_at is not None
        assert v.started_at is not None and v.finished_at is not None
        assert s.started_at < v.finished_at and v.started_at < s.finished_at


def test_draft_frontier_lacks_the_verify_axis(report: SpeculativeReport) -> None:
    """Drafts before any rejection carry no verify axis; later ones lack the round they skip."""
    first_rejection = next(v for v in report.verifies if v.rejected_at is not None)
    for d in report.drafts:
        frontier = d.submission.frontier
        assert frontier is not None
        if d.epoch <= first_rejection.draft.epoch + 1:
            assert report.verify_axis not in frontier
        if d.speculative:
            skipped = report.verifies[d.round - 2].submission
            assert frontier.get(report.verify_axis) < skipped.epoch
    for v in report.verifies:
        frontier = v.submission.frontier
        assert frontier is not None
        assert frontier.get(report.draft_axis) == v.draft.epoch
        assert frontier.get(report.verify_axis) == v.round


def test_rejection_invalidates_exactly_the_later_draft(patterned: SpeculativeReport) -> None:
    """A rejection in round r invalidates round r+1's speculative draft and nothing earlier."""
    by_round = {v.round: [d.epoch for d in v.invalidated] for v in patterned.verifies}
    # drafts: r1=1, r2=2 (spec), r3=3 (spec, built on r2's rejected tokens), r3 redraft=4,
    # r4=5 (spec), r5=6 (spec, built on r4's rejected tokens), r5 redraft=7
    assert by_round == {1: [], 2: [3], 3: [], 4: [6], 5: []}
    assert [d.epoch for d in patterned.drafts if d.invalidated] == [3, 6]
    rejected = {p for v in patterned.verifies for p in v.rejected_positions}
    rejected |= {p for d in patterned.drafts if d.invalidated for p in d.positions}
    assert sorted(rejected) == list(range(5, 18))
    # the reply keeps every earlier accepted token: r2's prefix (4), then the target's 5
    assert patterned.reply == [(p, "draft 1") for p in range(4)] + [
        (4, "draft 2"),
        (5, "target 2"),
        *[(p, "draft 4") for p in range(6, 10)],
        (10, "target 4"),
        *[(p, "draft 7") for p in range(11, 15)],
    ]


def test_seeded_run_invalidates_one_speculative_round_per_rejection(
    report: SpeculativeReport,
) -> None:
    """Each rejection before the last round invalidates the next speculative draft only."""
    for v in report.verifies:
        if v.rejected_at is None or v.round == len(report.verifies):
            assert v.invalidated == ()
        else:
            (only,) = v.invalidated
            assert only.speculative and only.round == v.round + 1
            assert only.positions.start == v.draft.start + DRAFT_TOKENS
    used = {origin for _, origin in report.reply}
    assert not used & {f"draft {d.epoch}" for d in report.drafts if d.invalidated}
    assert [d.epoch for d in report.drafts if d.invalidated] == [5, 7, 9, 11]


def test_redraft_waits_for_the_rejecting_verify(report: SpeculativeReport) -> None:
    """A redraft starts after the verify that rejected, and its frontier includes it."""
    redrafts = [d for d in report.drafts if not d.speculative and d.round > 1]
    assert len(redrafts) == 4
    for d in redrafts:
        v = report.verifies[d.round - 2]
        assert v.rejected_at is not None and d.start == v.rejected_at + 1
        frontier = d.submission.frontier
        assert frontier is not None
        assert frontier.get(report.verify_axis) >= v.submission.epoch
        assert (d.submission.started_at or 0.0) >= (v.submission.finished_at or 0.0)


def test_registered_with_rounds_and_seed() -> None:
    """The registry runs B1 with --rounds and --seed."""
    scenario = get_scenario("speculative_decoding")
    assert scenario.section == "B1" and dict(scenario.options) == {"rounds": 8, "seed": 7}

    async def main() -> SpeculativeReport:
        result, _ = await scenario.simulate(rounds=3, seed=1)
        assert isinstance(result, SpeculativeReport)
        return result

    result = run_virtual(main)
    assert [v.accepted for v in result.verifies] == acceptance_pattern(3, 1)
