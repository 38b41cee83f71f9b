"""The operator console's wiring: its Operations are the learning loop's own code paths
(feedback.review's decision, feedback.canary's non-inferiority test, feedback.erasure's
forget), handed to bots.console so that the gateway imports no training code itself."""

from __future__ import annotations

import math
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from bots.console import CanaryView, Console, Operations
from chatloop.settings import Settings


def console_operations(settings: Settings, sessions: async_sessionmaker[AsyncSession], *,
                       canary_policy: Any, rules: Any) -> Operations:
    """`canary_policy` and `rules`: the scheduler's CanaryPolicy and the loop's
    DatasetPolicy (chatloop.app's schedule_config and loop_config)."""

    async def decide(session: AsyncSession, feedback_id: int, approve: bool, actor: str
                     ) -> None:
        from feedback import review

        await review.decide(session, feedback_id=feedback_id, approve=approve, actor=actor)

    async def canary() -> CanaryView | None:
        return await canary_view(sessions, policy=canary_policy, rules=rules)

    async def forget(identity: str, actor: str) -> str:
        from feedback import erasure

        report = await erasure.forget_person(sessions, identity=identity,
                                             runs_dir=settings.learn.runs_dir.resolve(),
                                             adapters_dir=settings.learn.adapters_dir.resolve(),
                                             actor=actor)
        c = report.erased.counts
        tainted = (f"; tainted adapters: {', '.join(report.tainted_adapters)}"
                   if report.tainted_adapters else "")
        return (f"forgot {identity}: deleted {c.get('messages', 0)} messages, "
                f"{c.get('feedback', 0)} votes and corrections, {report.rows} dataset rows"
                + tainted)

    return Operations(decide=decide, canary=canary, forget=forget,
                      served=settings.learn.memory_voice())


async def canary_view(sessions: async_sessionmaker[AsyncSession], *, policy: Any, rules: Any
                      ) -> CanaryView | None:
    """The canary's votes and the test's state, counted as feedback.canary.evaluate_canary
    counts them (the same reads, judge_votes, tally and decide), without acting on them."""
    from feedback.canary import decide, tally
    from feedback.policy import judge_votes
    from storage import adapters
    from storage.feedback import feedback_on_adapters, first_seen

    async with sessions() as s:
        state = await adapters.serving(s)
        if state.canary is None:
            return None
        control = state.active.name if state.active else None
        rows = await feedback_on_adapters(s, adapters=[state.canary.name, control],
                                          since=state.canary.updated_at)
        seen = await first_seen(s, voters={r.voter_id for r in rows})
    labels = judge_votes(rows, seen, rules).labels
    cv, av = tally(labels, rows, state.canary.name), tally(labels, rows, control)
    tainted = state.canary.tainted_at is not None
    decision = "rollback" if tainted else str(decide(cv, av, policy))
    pc, pa = (cv.down + 1) / (cv.n + 2), (av.down + 1) / (av.n + 2)  # as decide computes
    se = math.sqrt(pc * (1 - pc) / (cv.n + 2) + pa * (1 - pa) / (av.n + 2))
    diff = pc - pa
    return CanaryView(canary=state.canary.name, control=control, canary_n=cv.n,
                      canary_down=cv.down, control_n=av.n, control_down=av.down,
                      decision=decision, diff=diff, lower=diff - policy.z * se,
                      upper=diff + policy.z * se, margin=policy.margin,
                      min_votes=policy.min_votes, max_votes=policy.max_votes, tainted=tainted)


def build_console(settings: Settings, sessions: async_sessionmaker[AsyncSession], *,
                  canary_policy: Any, rules: Any) -> Console:
    c = settings.console
    ops = console_operations(settings, sessions, canary_policy=canary_policy, rules=rules)
    return Console(sessions, ops,
                   session_hours=c.session_hours, user_header=c.user_header,
                   trusted_proxies=c.trusted_proxies, login_attempts=c.login_attempts)
