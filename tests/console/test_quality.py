"""The quality page's per-day roll-up: closed days come from the stored roll-up, and it
follows votes changed on old answers, forgotten conversations and (after its maximum age)
writes made behind storage's back, always matching a count made from the rows."""

from __future__ import annotations

from collections import Counter
from datetime import date, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from storage import console as store
from storage.feedback import record_vote
from storage.forget import forget_conversation
from storage.models import Conversation, Feedback, Message, QualityDay, utcnow
from tests.console.conftest import seed_history


def counted(counts: dict[date, list[store.Count]]) -> Counter[tuple[Any, ...]]:
    return Counter({(d, c.channel, c.adapter, c.status, c.error_kind): (c.answers, c.up, c.down)
                    for d, rows in counts.items() for c in rows if c.answers})


async def from_rows(sessions: Any, first: date) -> Counter[tuple[Any, ...]]:
    """The same counts, made in Python from every answer and vote."""
    async with sessions() as s:
        answers = (await s.execute(select(Message, Conversation.channel).join(
            Conversation, Conversation.id == Message.conversation_id).where(
            Message.role == "assistant"))).all()
        votes = (await s.execute(select(Feedback.answer_id, Feedback.rating))).all()
    up = Counter(a for a, r in votes if r == 1)
    down = Counter(a for a, r in votes if r == -1)
    out: dict[tuple[Any, ...], list[int]] = {}
    for m, channel in answers:
        day = m.created_at.date()
        if day < first:
            continue
        key = (day, channel, m.adapter, m.status,
               m.error_kind if m.status == "failed" else None)
        n = out.setdefault(key, [0, 0, 0])
        n[0] += 1
        n[1] += up[m.id]
        n[2] += down[m.id]
    return Counter({k: tuple(v) for k, v in out.items()})


async def quality(sessions: Any, first: date, **kw: Any) -> Counter[tuple[Any, ...]]:
    async with sessions() as s:
        return counted(await store.quality_counts(s, first=first, **kw))


async def test_the_rollup_matches_the_rows_and_follows_changes(sessions: Any,
                                                               tmp_path: Path) -> None:
    await seed_history(sessions, tmp_path, days=10)
    first = utcnow().date() - timedelta(days=9)
    assert await quality(sessions, first) == await from_rows(sessions, first)
    async with sessions() as s:
        stored = (await s.execute(select(func.count()).select_from(QualityDay))).scalar_one()
        old = (await s.execute(select(Message.id, Message.conversation_id).where(
            Message.role == "assistant", Message.status == "ok",
            Message.created_at < utcnow() - timedelta(days=5)).order_by(Message.id))).all()
    assert stored >= 8  # the closed days

    async with sessions() as s:  # votes on a five-day-old answer: a new one, a changed one
        await record_vote(s, answer_id=old[0][0], voter_id="telegram:999", rating=-1,
                          source="telegram")
        await record_vote(s, answer_id=old[1][0], voter_id="telegram:998", rating=1,
                          source="telegram")
    assert await quality(sessions, first) == await from_rows(sessions, first)

    async with sessions() as s:
        await forget_conversation(s, conversation_id=old[2][1], actor="cli:test")
    assert await quality(sessions, first) == await from_rows(sessions, first)

    # an hour later (the forget's margin passed), a write behind storage's back is seen once
    # the roll-up is old enough
    hour = utcnow() + timedelta(hours=1)
    assert await quality(sessions, first, now=hour) == await from_rows(sessions, first)
    async with sessions() as s:
        conv = await s.get(Conversation, old[3][1])
        assert conv is not None
        s.add(Message(conversation_id=conv.id, role="assistant", text="late", status="ok",
                      created_at=conv.created_at + timedelta(seconds=5), adapter="late-v1"))
        await s.commit()
    truth = await from_rows(sessions, first)
    assert await quality(sessions, first, now=hour) != truth
    later = hour + store.ROLLUP_MAX_AGE + timedelta(minutes=1)
    for _ in range(12):  # one aged day recomputed per request
        if await quality(sessions, first, now=later) == truth:
            break
    assert await quality(sessions, first, now=later) == truth
