"""Scenario B1: speculative decoding on GPU 0 of a workstation, in virtual time.

Llama-3-8B (5 GiB) verifies what its quantized draft model (1 GiB) proposes, both
resident on GPU 0 of the workstation (hardware configuration B). Each draft round
proposes ``DRAFT_TOKENS`` tokens on the ``gpu0.draft`` queue; each verify round checks
one draft round on the ``gpu0.verify`` queue. The two queues are two streams of one
GPU (``concurrency=2``), so their work can overlap.

How the speculation is modelled (the graph API does not fit: what runs next depends
on what the target accepted, so a host coroutine drives the queues and semaphores):

- Round ``r+1`` is drafted *speculatively* as soon as round ``r`` is drafted: it waits
  only for ``drafted`` (the draft semaphore), assumes every token of round ``r`` will be
  accepted, and runs while round ``r`` is verified. Its frontier therefore lacks the
  verify epoch of round ``r``: the structural mark of speculation.
- Verify round ``r`` waits for ``drafted`` at round ``r``'s value and, through the verify
  queue's FIFO, for verify round ``r-1``; it signals ``verified`` at ``r``. The host
  submits it once verify ``r-1``'s outcome is known, since what it checks depends on it.
- The acceptance of each verify round comes from a seeded pattern (or an explicit
  one): the number of leading draft tokens the target agrees with, each accepted with
  probability ``ACCEPT_PROBABILITY``. On a rejection at position ``j`` the target emits
  its own token there (the correction); a fully accepted round adds no bonus token.
- A rejection in round ``r`` invalidates the draft entries whose frontier is *later* on
  the draft axis than round ``r``'s draft and *earlier* on the verify axis than verify
  ``r``: exactly the speculative round ``r+1``, built on the rejected tokens.
  :func:`invalidated_by` makes that decision from frontiers alone. Earlier rounds and
  round ``r``'s accepted prefix are untouched. The host then redrafts round ``r+1``
  from the corrected context, waiting for ``verified`` at ``r``, so the redraft cannot
  overlap the verify that caused it.

Numbers chosen (seconds, as in scenario B2): a draft round of 4 tokens 0.02, a verify
round 0.05. Whisper, Bark and the transfers between the GPUs are left out here (B2 runs
them with a serial draft/verify loop).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from .._budget import GiB
from .._frontier import Frontier, axis_name
from .._queue import DeviceQueue, Submission
from .._runtime import Runtime, open_runtime
from .._semaphore import TimelineSemaphore
from ..devices.fake import FakeDevice

__all__ = (
    "ACCEPT_PROBABILITY",
    "DEFAULT_ROUNDS",
    "DEFAULT_SEED",
    "DRAFT_TOKENS",
    "MAX_ROUNDS",
    "MODELS",
    "SECONDS",
    "DraftRound",
    "SpeculativeReport",
    "VerifyRound",
    "acceptance_pattern",
    "invalidated_by",
    "run_speculative_decoding",
    "simulate",
    "speculative_devices",
)

DRAFT_TOKENS = 4
"""Tokens the draft model proposes per round."""
SECONDS = {"draft": 0.020, "verify": 0.050}
"""Seconds per round on GPU 0: the draft proposes 4 tokens, the target verifies them."""
MODELS = {"llama": 5 * GiB, "llama-draft": 1 * GiB}
"""Weights resident on GPU 0: Llama-3-8B and its quantized draft model (configuration B)."""
ACCEPT_PROBABILITY = 0.8
"""Chance that the target agrees with one draft token, in the seeded pattern."""
DEFAULT_ROUNDS = 8
DEFAULT_SEED = 7
MAX_ROUNDS = 64
"""The most verify rounds the command line runs (each shows as its own timeline row)."""


def speculative_devices() -> list[FakeDevice]:
    """GPU 0 of the workstation: 24 GiB, two streams (draft and target run side by side)."""
    return [FakeDevice("gpu0", kind="gpu", memory=24 * GiB, concurrency=2)]


def acceptance_pattern(
    rounds: int, seed: int, probability: float = ACCEPT_PROBABILITY
) -> list[int]:
    """Accepted tokens per verify round: leading successes of ``DRAFT_TOKENS`` seeded draws."""
    rng = random.Random(seed)
    pattern = []
    for _ in range(rounds):
        accepted = 0
        while accepted < DRAFT_TOKENS and rng.random() < probability:
            accepted += 1
        pattern.append(accepted)
    return pattern


@dataclass
class DraftRound:
    """One draft submission: the tokens it proposes for verify round ``round``.

    Attributes:
        round: the verify round its tokens feed.
        start: the position of its first token in the reply.
        speculative: drafted before the previous round's verify finished.
        submission: the draft queue's submission (its epoch is its draft-axis entry).
        invalidated: a rejection made its tokens worthless (they were built on rejected ones).
    """

    round: int
    start: int
    speculative: bool
    submission: Submission
    invalidated: bool = False

    @property
    def positions(self) -> range:
        """The positions of the tokens it proposes."""
        return range(self.start, self.start + DRAFT_TOKENS)

    @property
    def epoch(self) -> int:
        """Its epoch on the draft axis."""
        return self.submission.epoch


@dataclass
class VerifyRound:
    """One verify submission and its outcome."""

    round: int
    draft: DraftRound
    submission: Submission
    accepted: int
    invalidated: tuple[DraftRound, ...] = ()

    @property
    def rejected_at(self) -> int | None:
        """The position of the first rejected draft token, or None if all were accepted."""
        return None if self.accepted == DRAFT_TOKENS else self.draft.start + self.accepted

    @property
    def rejected_positions(self) -> range:
        """Positions of this round's own draft tokens that the target rejected."""
        return range(self.draft.start + self.accepted, self.draft.start + DRAFT_TOKENS)


def invalidated_by(
    drafts: Sequence[DraftRound], rejected: VerifyRound, draft_axis: int, verify_axis: int
) -> list[DraftRound]:
    """The draft entries a rejection in ``rejected`` invalidates, decided from frontiers.

    An entry is invalid when its frontier is past the rejected round's draft on the
    draft axis (it built on those tokens) and short of the rejecting verify's epoch on
    the verify axis (it did not know the outcome). Entries without a frontier yet (still
    waiting) are judged by their draft epoch alone: they cannot have seen the verify.
    """
    draft_epoch = rejected.draft.epoch
    verify_epoch = rejected.submission.epoch
    invalid = []
    for d in drafts:
        frontier = d.submission.frontier
        if frontier is None:
            if d.epoch > draft_epoch:
                invalid.append(d)
        elif frontier.get(draft_axis) > draft_epoch and frontier.get(verify_axis) < verify_epoch:
            invalid.append(d)
    return invalid


@dataclass
class SpeculativeReport:
    """Every draft and verify round, the reply and the axes."""

    drafts: list[DraftRound]
    verifies: list[VerifyRound]
    reply: list[tuple[int, str]]  # accepted tokens: (position, "draft EPOCH" or "target ROUND")
    draft_axis: int
    verify_axis: int

    @property
    def elapsed(self) -> float:
        """When the last verify finished, in seconds."""
        return max(v.submission.finished_at or 0.0 for v in self.verifies)

    @property
    def serial_time(self) -> float:
        """What the same rounds take when each draft waits for the previous verify."""
        drafts = len(self.drafts) - sum(d.invalidated for d in self.drafts)
        return drafts * SECONDS["draft"] + len(self.verifies) * SECONDS["verify"]

    def describe(self) -> str:
        """Each round's timing, acceptance and invalidations; the final frontier."""
        lines = [
            f"speculative decoding: {len(self.verifies)} rounds of {DRAFT_TOKENS} draft tokens, "
            f"{len(self.reply)} tokens in {self.elapsed:.3f} s "
            f"(serial draft-then-verify: {self.serial_time:.3f} s)"
        ]
        for d in self.drafts:
            sub = d.submission
            kind = "speculative" if d.speculative else "redraft" if d.round > 1 else "first"
            mark = "  INVALIDATED" if d.invalidated else ""
            lines.append(
                f"  draft  r{d.round} epoch {d.epoch:2} {kind:<12} tokens {d.start}-"
                f"{d.start + DRAFT_TOKENS - 1} {sub.started_at:.3f}-{sub.finished_at:.3f} s{mark}"
            )
        for v in self.verifies:
            sub = v.submission
            note = f"rejects at {v.rejected_at}" if v.rejected_at is not None else "accepts all"
            lines.append(
                f"  verify r{v.round} epoch {sub.epoch:2} accepts {v.accepted}/{DRAFT_TOKENS} "
                f"({note}) {sub.started_at:.3f}-{sub.finished_at:.3f} s"
            )
        last = self.verifies[-1].submission.frontier or Frontier()
        names = ", ".join(f"{axis_name(a)}={e}" for a, e in last)
        lines.append(f"last verify frontier: {{{names}}}")
        return "\n".join(lines)


async def run_speculative_decoding(
    rt: Runtime, *, rounds: int = DEFAULT_ROUNDS, acceptance: Sequence[int] | None = None
) -> SpeculativeReport:
    """Run ``rounds`` verify rounds on ``rt`` (holding :func:`speculative_devices`).

    ``acceptance`` gives the accepted tokens per round (default: the seeded pattern).

    Raises:
        ValueError: fewer than one round, or an acceptance outside 0..DRAFT_TOKENS.
    """
    if rounds < 1:
        raise ValueError(f"speculative decoding needs at least 1 round, got {rounds}")
    pattern = (
        list(acceptance) if acceptance is not None else acceptance_pattern(rounds, DEFAULT_SEED)
    )
    if len(pattern) < rounds or any(not 0 <= a <= DRAFT_TOKENS for a in pattern):
        raise ValueError(
            f"acceptance needs {rounds} values in 0..{DRAFT_TOKENS}, got {pattern[:rounds]}"
        )
    for model, size in MODELS.items():
        rt.declare_model(model, size, resident_on=["gpu0"])
    draft_q: DeviceQueue = rt.queue("gpu0", name="gpu0.draft")
    verify_q: DeviceQueue = rt.queue("gpu0", name="gpu0.verify")
    drafted: TimelineSemaphore = rt.semaphore(name="drafted")
    verified: TimelineSemaphore = rt.semaphore(name="verified")
    drafts: list[DraftRound] = []
    verifies: list[VerifyRound] = []
    reply: list[tuple[int, str]] = []

    def draft(
        round_: int, start: int, speculative: bool, waits: list[tuple[TimelineSemaphore, int]]
    ) -> DraftRound:
        value = len(drafts) + 1
        sub = draft_q.submit(
            name=f"draft r{round_}", cost=SECONDS["draft"], waits=waits, signals=[(drafted, value)]
        )
        entry = DraftRound(round_, start, speculative, sub)
        drafts.append(entry)
        return entry

    current = draft(1, 0, False, [])
    for r in range(1, rounds + 1):
        accepted = pattern[r - 1]
        sub = verify_q.submit(
            lambda a=accepted: a,
            name=f"verify r{r}",
            cost=SECONDS["verify"],
            waits=[(drafted, drafts.index(current) + 1)],
            signals=[(verified, r)],
        )
        ahead = draft(r + 1, current.start + DRAFT_TOKENS, True, []) if r < rounds else None
        await sub
        outcome = VerifyRound(r, current, sub, accepted)
        verifies.append(outcome)
        reply.extend((p, f"draft {current.epoch}") for p in current.positions[:accepted])
        if accepted == DRAFT_TOKENS:
            if ahead is not None:
                current = ahead
            continue
        reply.append((current.start + accepted, f"target {r}"))
        if ahead is not None:
            # Its frontier settles once it has run; the redraft queues behind it anyway.
            await ahead.submission
        outcome.invalidated = tuple(invalidated_by(drafts, outcome, draft_q.axis, verify_q.axis))
        for d in outcome.invalidated:
            d.invalidated = True
        if r < rounds:
            current = draft(r + 1, current.start + accepted + 1, False, [(verified, r)])
    return SpeculativeReport(drafts, verifies, reply, draft_q.axis, verify_q.axis)


async def simulate(
    *, rounds: int = DEFAULT_ROUNDS, seed: int = DEFAULT_SEED, trace_path: str | None = None
) -> tuple[SpeculativeReport, str]:
    """Open a runtime on GPU 0, run B1 with the seeded acceptances; return report and timeline.

    Writes a Perfetto trace to ``trace_path`` when given.
    """
    async with open_runtime(speculative_devices()) as rt:
        report = await run_speculative_decoding(
            rt, rounds=rounds, acceptance=acceptance_pattern(rounds, seed)
        )
    if trace_path is not None:
        rt.trace.export_perfetto(trace_path)
    return report, rt.trace.format_timeline()
