"""Canary evaluation: promote when the canary's 👎 rate is shown not worse, else roll back.

A non-inferiority test on two proportions (Agresti-Caffo interval): promote once
the upper confidence bound of (canary 👎 rate - control 👎 rate) is below the
margin; roll back as soon as the canary is significantly worse, or when it has
had `max_votes` votes without proving itself. The control is the active
adapter (or the base model), over the same period.

What counts as a vote is the dataset's rule (feedback.policy.judge_votes): each answer
whose votes make a label is one vote, liked or not, under the same trust weights,
distinct-voter minimum, per-user cap and burst quarantine. So one voter's thirty 👍 on
thirty answers are no evidence, and the canary waits.

Beside the 👎 rate, the hand-off rate (answers after which the user asked for a person,
storage.handoff.rates): the same test on answers; a canary that sends more people to
humans is not promoted.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from chatloop.telemetry import hooks
from feedback.policy import DatasetPolicy, judge_votes
from storage import adapters, audit
from storage import handoff as handoff_store
from storage.feedback import FeedbackRow, feedback_on_adapters, first_seen


class Decision(StrEnum):
    PROMOTE = "promote"
    ROLLBACK = "rollback"
    WAIT = "wait"
    NONE = "none"  # no canary


@dataclass(frozen=True)
class CanaryPolicy:
    min_votes: int = 30
    max_votes: int = 300
    margin: float = 0.05  # how much higher a 👎 rate we accept
    z: float = 1.645  # one-sided 95 %
    # how much higher a hand-off rate (answers after which the user asked for a person) we
    # accept: the same test on answers, beside the 👎 rate; a canary that sends more people
    # to humans is rolled back, and promoted only once shown not worse
    handoff_margin: float = 0.05


@dataclass(frozen=True, slots=True)
class Votes:
    """Judged answers (`n`) and how many of them were disliked."""

    n: int
    down: int


def tally(labels: Mapping[int, bool], rows: Sequence[FeedbackRow], adapter: str | None
          ) -> Votes:
    """The judged answers (answer id -> liked?) among those `adapter` served."""
    served = {r.answer_id for r in rows if r.adapter == adapter}
    verdicts = [liked for answer, liked in labels.items() if answer in served]
    return Votes(len(verdicts), sum(not liked for liked in verdicts))


def decide(canary: Votes, control: Votes, policy: CanaryPolicy) -> Decision:
    if canary.n < policy.min_votes:
        return Decision.WAIT
    pc = (canary.down + 1) / (canary.n + 2)
    pa = (control.down + 1) / (control.n + 2)
    se = math.sqrt(pc * (1 - pc) / (canary.n + 2) + pa * (1 - pa) / (control.n + 2))
    diff = pc - pa
    if diff - policy.z * se > 0:
        return Decision.ROLLBACK  # significantly worse
    if diff + policy.z * se < policy.margin:
        return Decision.PROMOTE  # not worse by more than the margin
    return Decision.ROLLBACK if canary.n >= policy.max_votes else Decision.WAIT


@dataclass(frozen=True, slots=True)
class CanaryOutcome:
    decision: Decision
    canary: str | None = None
    canary_votes: Votes | None = None
    control_votes: Votes | None = None
    # answers served (`n`) and how many a hand-off followed
    canary_handoffs: Votes | None = None
    control_handoffs: Votes | None = None


def decide_with_handoffs(votes: Decision, canary: Votes, control: Votes,
                         policy: CanaryPolicy) -> Decision:
    """The votes' decision, vetoed by the hand-off rate: significantly more hand-offs roll
    the canary back; a promotion waits until its hand-off rate is shown not worse."""
    handed = decide(canary, control, replace(policy, margin=policy.handoff_margin,
                                             max_votes=sys.maxsize))
    if handed == Decision.ROLLBACK:
        return Decision.ROLLBACK
    if votes == Decision.PROMOTE and handed != Decision.PROMOTE:
        return Decision.WAIT
    return votes


@hooks.canary_evaluated
async def evaluate_canary(sessions: async_sessionmaker[AsyncSession], policy: CanaryPolicy,
                          *, rules: DatasetPolicy) -> CanaryOutcome:
    """Decide on the current canary, counting votes by `rules` (the learning loop's dataset
    policy), and apply the decision to the registry."""
    async with sessions() as s:
        state = await adapters.serving(s)
        if state.canary is None:
            return CanaryOutcome(Decision.NONE)
        control = state.active.name if state.active else None
        rows = await feedback_on_adapters(s, adapters=[state.canary.name, control],
                                          since=state.canary.updated_at)
        seen = await first_seen(s, voters={r.voter_id for r in rows})
        labels = judge_votes(rows, seen, rules).labels
        cv, av = tally(labels, rows, state.canary.name), tally(labels, rows, control)
        rates = await handoff_store.rates(s, since=state.canary.updated_at)
        ch, ah = (Votes(rates.get(a, (0, 0))[1], rates.get(a, (0, 0))[0])
                  for a in (state.canary.name, control))
        decision = decide_with_handoffs(decide(cv, av, policy), ch, ah, policy)
        tainted = state.canary.tainted_at is not None
        if tainted:  # trained on data since forgotten: never promoted
            decision = Decision.ROLLBACK
        if decision == Decision.PROMOTE:
            await adapters.promote(s, name=state.canary.name)
        elif decision == Decision.ROLLBACK:
            await adapters.rollback(s)
        if decision in (Decision.PROMOTE, Decision.ROLLBACK):
            detail = {"canary": [cv.n, cv.down], "control": [av.n, av.down], "tainted": tainted,
                      "handoffs": {"canary": [ch.n, ch.down], "control": [ah.n, ah.down]}}
            await audit.log(s, actor=audit.CANARY, action=str(decision),
                            target=f"adapter:{state.canary.name}", detail=detail)
    return CanaryOutcome(decision, state.canary.name, cv, av, ch, ah)
