"""Feedback: one live vote and/or correction per voter per answer, and its queries.

The write path (votes, corrections) first; then the learning loop's reads (feedback with
its answers, voters' first activity, the conversations' transcripts and recorded splits),
the review queue and the vote tallies the canary compares.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import bindparam, case, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased

from storage.events import record_event
from storage.models import (
    AnswerStatus,
    Conversation,
    Feedback,
    Message,
    ReviewStatus,
    Role,
    utcnow,
)
from storage.sql import upsert


class UnknownAnswer(LookupError):
    """Feedback was given on a message that is not a stored answer."""


@dataclass(frozen=True, slots=True)
class Delivery:
    """The platform delivery that carried a vote or correction (recorded with it, once)."""

    channel: str
    event_id: str


@dataclass(frozen=True, slots=True)
class Stored:
    """What storing a vote or correction did: the live row, and whether its delivery is new."""

    feedback: Feedback
    first_delivery: bool


async def record_vote(
    session: AsyncSession, *, answer_id: int, voter_id: str, rating: int, source: str,
    reason: str | None = None, trusted: bool = False, delivery: Delivery | None = None,
) -> Stored:
    """Set this voter's live vote on an answer (a second vote replaces the first), and record
    its delivery, in one transaction."""
    if rating not in (1, -1):
        raise ValueError("rating must be +1 or -1")
    await _require_answer(session, answer_id)
    now = utcnow()
    values = dict(answer_id=answer_id, voter_id=voter_id, rating=rating, reason=reason,
                  source=source, trusted=trusted, created_at=now, updated_at=now)
    stmt = upsert(session)(Feedback).values(**values).on_conflict_do_update(
        index_elements=["answer_id", "voter_id"],
        set_=dict(rating=rating, reason=reason, updated_at=now),
    )
    await session.execute(stmt)
    return await _finish(session, answer_id, voter_id, delivery)


async def record_correction(
    session: AsyncSession, *, answer_id: int, voter_id: str, text: str, source: str,
    trusted: bool, delivery: Delivery | None = None,
) -> Stored:
    """Store a better answer (trusted ones approved, others await review) and record its
    delivery, in one transaction."""
    if not text.strip():
        raise ValueError("a correction needs text")
    await _require_answer(session, answer_id)
    now = utcnow()
    review = ReviewStatus.APPROVED if trusted else ReviewStatus.PENDING
    values = dict(answer_id=answer_id, voter_id=voter_id, correction=text, source=source,
                  trusted=trusted, review_status=review, created_at=now, updated_at=now)
    stmt = upsert(session)(Feedback).values(**values).on_conflict_do_update(
        index_elements=["answer_id", "voter_id"],
        set_=dict(correction=text, trusted=trusted, review_status=review, updated_at=now),
    )
    await session.execute(stmt)
    return await _finish(session, answer_id, voter_id, delivery)


async def _finish(session: AsyncSession, answer_id: int, voter_id: str,
                  delivery: Delivery | None) -> Stored:
    first = True
    if delivery is not None:
        first = await record_event(session, channel=delivery.channel,
                                   event_id=delivery.event_id, commit=False) is not None
    await session.commit()
    stmt = select(Feedback).where(Feedback.answer_id == answer_id, Feedback.voter_id == voter_id)
    row = (await session.execute(stmt.execution_options(populate_existing=True))).scalar_one()
    return Stored(row, first)


async def _require_answer(session: AsyncSession, answer_id: int) -> None:
    msg = await session.get(Message, answer_id)
    if msg is None or msg.role != Role.ASSISTANT:
        raise UnknownAnswer(f"no answer with id {answer_id}")


# ---- the learning loop's reads ----


@dataclass(frozen=True, slots=True)
class FeedbackRow:
    """A live feedback row on a successful answer, with the answer and its question."""

    id: int
    answer_id: int
    voter_id: str
    rating: int | None
    correction: str | None
    trusted: bool
    review_status: str | None
    created_at: datetime  # timezone-aware
    conversation_id: int
    answer: str
    question_id: int
    question: str


@dataclass(frozen=True, slots=True)
class TranscriptMessage:
    """A stored message of a conversation, as prompt contexts need it."""

    id: int
    role: str
    text: str
    reply_to_id: int | None
    status: str | None


def _aware(when: datetime) -> datetime:
    """SQLite returns naive timestamps; every one stored is UTC."""
    return when if when.tzinfo else when.replace(tzinfo=UTC)


async def feedback_since(session: AsyncSession, *, since: int) -> list[FeedbackRow]:
    """Feedback with id > `since` on answers that succeeded, in id order."""
    answer, question = aliased(Message), aliased(Message)
    stmt = (select(Feedback.id, Feedback.answer_id, Feedback.voter_id, Feedback.rating,
                   Feedback.correction, Feedback.trusted, Feedback.review_status,
                   Feedback.created_at, answer.conversation_id, answer.text, question.id,
                   question.text)
            .join(answer, answer.id == Feedback.answer_id)
            .join(question, question.id == answer.reply_to_id)
            .where(Feedback.id > since, answer.status == AnswerStatus.OK)
            .order_by(Feedback.id))
    return [FeedbackRow(fid, aid, voter, rating, correction, bool(trusted), review,
                        _aware(created), conversation, answer_text, qid, question_text)
            for (fid, aid, voter, rating, correction, trusted, review, created, conversation,
                 answer_text, qid, question_text) in (await session.execute(stmt)).all()]


async def first_seen(session: AsyncSession, *, voters: Collection[str]) -> dict[str, datetime]:
    """When each of these voters was first active (their first vote or message)."""
    seen: dict[str, datetime] = {}
    if not voters:
        return seen
    for who, when in ((Feedback.voter_id, Feedback.created_at),
                      (Message.author_id, Message.created_at)):
        stmt = select(who, func.min(when)).where(who.in_(list(voters))).group_by(who)
        for voter, first in (await session.execute(stmt)).all():
            first = _aware(first)
            seen[voter] = min(seen.get(voter, first), first)
    return seen


async def transcripts(session: AsyncSession, *, conversation_ids: Collection[int]
                      ) -> dict[int, list[TranscriptMessage]]:
    """Every stored message of these conversations, in order, by conversation."""
    out: dict[int, list[TranscriptMessage]] = {}
    if not conversation_ids:
        return out
    stmt = (select(Message.conversation_id, Message.id, Message.role, Message.text,
                   Message.reply_to_id, Message.status)
            .where(Message.conversation_id.in_(list(conversation_ids)))
            .order_by(Message.conversation_id, Message.id))
    for conversation, *message in (await session.execute(stmt)).all():
        out.setdefault(conversation, []).append(TranscriptMessage(*message))
    return out


async def recorded_splits(session: AsyncSession, *, conversation_ids: Collection[int]
                          ) -> dict[int, bool]:
    """The split recorded for those of these conversations that have one: held out for the
    gate (True) or trained on (False)."""
    ids = sorted(conversation_ids)
    out: dict[int, bool] = {}
    for i in range(0, len(ids), 1000):  # bounded IN lists
        stmt = select(Conversation.id, Conversation.heldout).where(
            Conversation.id.in_(ids[i:i + 1000]), Conversation.heldout.is_not(None))
        out.update({c: bool(h) for c, h in (await session.execute(stmt)).all()})
    return out


async def record_splits(session: AsyncSession, *, splits: Mapping[int, bool]) -> None:
    """Record these conversations' splits where none is recorded yet (a concurrent builder's
    decision wins), and commit."""
    if not splits:
        return
    table = Conversation.__table__  # type: ignore[attr-defined]
    stmt = (update(table).where(table.c.id == bindparam("cid"), table.c.heldout.is_(None))
            .values(heldout=bindparam("held")))
    await (await session.connection()).execute(
        stmt, [{"cid": c, "held": h} for c, h in splits.items()])
    await session.commit()


async def eligible_count(session: AsyncSession, *, since: int) -> int:
    """Votes and approved corrections with id > `since` (what the training threshold counts)."""
    stmt = select(func.count()).select_from(Feedback).where(
        Feedback.id > since,
        or_(Feedback.rating.is_not(None), Feedback.review_status == ReviewStatus.APPROVED))
    return int((await session.execute(stmt)).scalar() or 0)


# ---- the review queue ----


@dataclass(frozen=True, slots=True)
class PendingCorrection:
    feedback_id: int
    voter_id: str
    question: str
    answer: str
    correction: str


async def pending_corrections(session: AsyncSession, *, limit: int = 50
                              ) -> list[PendingCorrection]:
    """Corrections awaiting review, oldest first."""
    answer, question = aliased(Message), aliased(Message)
    stmt = (select(Feedback.id, Feedback.voter_id, question.text, answer.text,
                   Feedback.correction)
            .join(answer, answer.id == Feedback.answer_id)
            .join(question, question.id == answer.reply_to_id)
            .where(Feedback.review_status == ReviewStatus.PENDING,
                   Feedback.correction.is_not(None))
            .order_by(Feedback.id).limit(limit))
    return [PendingCorrection(fid, voter, q, a, correction or "")
            for fid, voter, q, a, correction in (await session.execute(stmt)).all()]


async def review_correction(session: AsyncSession, *, feedback_id: int, approve: bool) -> bool:
    """Approve or reject a pending correction, and commit; False if none has this id."""
    status = ReviewStatus.APPROVED if approve else ReviewStatus.REJECTED
    result = await session.execute(
        update(Feedback)
        .where(Feedback.id == feedback_id, Feedback.review_status == ReviewStatus.PENDING)
        .values(review_status=status, updated_at=utcnow()))
    await session.commit()
    return bool(result.rowcount)  # type: ignore[attr-defined]


# ---- the canary's tallies ----


@dataclass(frozen=True, slots=True)
class Votes:
    n: int
    down: int


async def votes_on(session: AsyncSession, *, adapter: str | None, since: datetime) -> Votes:
    """Votes on answers served by `adapter` (None: the base model) since `since`."""
    route = Message.adapter.is_(None) if adapter is None else Message.adapter == adapter
    down = func.coalesce(func.sum(case((Feedback.rating < 0, 1), else_=0)), 0)
    stmt = (select(func.count(), down)
            .select_from(Feedback).join(Message, Message.id == Feedback.answer_id)
            .where(route, Message.created_at >= since, Feedback.rating.is_not(None)))
    n, bad = (await session.execute(stmt)).one()
    return Votes(int(n), int(bad))
