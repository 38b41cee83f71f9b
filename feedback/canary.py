"""Canary evaluation: promote when the canary's 👎 rate is shown not worse, else roll back.

A non-inferiority test on two proportions (Agresti-Caffo interval): promote once
the upper confidence bound of (canary 👎 rate - control 👎 rate) is below the
margin; roll back as soon as the canary is significantly worse, or when it has
had `max_votes` votes without proving itself. The control is the active
adapter (or the base model), over the same period.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from storage import adapters
from storage.feedback import Votes, votes_on


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


async def evaluate_canary(sessions: async_sessionmaker[AsyncSession],
                          policy: CanaryPolicy) -> CanaryOutcome:
    """Decide on the current canary and apply the decision to the registry."""
    async with sessions() as s:
        state = await adapters.serving(s)
        if state.canary is None:
            return CanaryOutcome(Decision.NONE)
        since = state.canary.updated_at
        cv = await votes_on(s, adapter=state.canary.name, since=since)
        av = await votes_on(s, adapter=state.active.name if state.active else None, since=since)
        decision = decide(cv, av, policy)
        if decision == Decision.PROMOTE:
            await adapters.promote(s, name=state.canary.name)
        elif decision == Decision.ROLLBACK:
            await adapters.rollback(s)
    return CanaryOutcome(decision, state.canary.name, cv, av)
