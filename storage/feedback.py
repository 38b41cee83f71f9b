"""Feedback: one live vote and/or correction per voter per answer, and its queries.

The write path (votes, corrections; every change bumps the row's revision) first; then the
learning loop's reads (feedback with its answers that runs have not yet learned from, voters'
first activity, the conversations' transcripts and recorded splits, the threshold's count),
the review queue and the feedback on the answers the canary compares.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import bindparam, case, exists, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased

from storage import memory
from storage.events import record_event
from storage.models import (
    AnswerStatus,
    Conversation,
    Feedback,
    FeedbackRole,
    Message,
    ReviewStatus,
    Role,
    RunFeedback,
    RunStatus,
    TrainingRun,
    utcnow,
)
from storage.runs import CONSUMING
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
    channel: str | None = None, asked_by: str | None = None,
) -> Stored:
    """Set this voter's live vote on an answer (a second vote replaces the first), and record
    its delivery, in one transaction. With `channel` (and `asked_by`), only an answer in a
    conversation of that channel (to a question of that author) is one: see `_require_answer`."""
    if rating not in (1, -1):
        raise ValueError("rating must be +1 or -1")
    await _require_answer(session, answer_id, channel, asked_by)
    now = utcnow()
    values = dict(answer_id=answer_id, voter_id=voter_id, rating=rating, reason=reason,
                  source=source, trusted=trusted, created_at=now, updated_at=now)
    stmt = upsert(session)(Feedback).values(**values).on_conflict_do_update(
        index_elements=["answer_id", "voter_id"],
        set_=dict(rating=rating, reason=reason, updated_at=now,
                  revision=_next_revision((Feedback.rating, rating), (Feedback.reason, reason))),
    )
    await session.execute(stmt)
    if trusted:  # a trusted voter's word may turn a memory answer's entry down
        await memory.judge_by_votes(session, answer_id=answer_id)
    return await _finish(session, answer_id, voter_id, delivery)


async def record_correction(
    session: AsyncSession, *, answer_id: int, voter_id: str, text: str, source: str,
    trusted: bool, delivery: Delivery | None = None, channel: str | None = None,
    asked_by: str | None = None,
) -> Stored:
    """Store a better answer (trusted ones approved, others await review) and record its
    delivery, in one transaction; `channel` and `asked_by` as for `record_vote`."""
    text = text.strip()
    if not text:
        raise ValueError("a correction needs text")
    await _require_answer(session, answer_id, channel, asked_by)
    now = utcnow()
    review = ReviewStatus.APPROVED if trusted else ReviewStatus.PENDING
    values = dict(answer_id=answer_id, voter_id=voter_id, correction=text, source=source,
                  trusted=trusted, review_status=review, created_at=now, updated_at=now)
    stmt = upsert(session)(Feedback).values(**values).on_conflict_do_update(
        index_elements=["answer_id", "voter_id"],
        set_=dict(correction=text, trusted=trusted, review_status=review, updated_at=now,
                  revision=_next_revision((Feedback.correction, text), (Feedback.trusted, trusted),
                                          (Feedback.review_status, review))),
    )
    await session.execute(stmt)
    fid = await session.scalar(select(Feedback.id).where(Feedback.answer_id == answer_id,
                                                         Feedback.voter_id == voter_id))
    if trusted:  # approved: the next customer is answered from it (storage.memory)
        await memory.remember_correction(session, feedback_id=fid, approved_by=voter_id)
        await memory.judge_by_votes(session, answer_id=answer_id)  # it may restate an entry
    else:
        await memory.retire_correction(session, feedback_id=fid)
    return await _finish(session, answer_id, voter_id, delivery)


def _next_revision(*changes: tuple[Any, Any]) -> Any:
    """The stored row's revision, bumped if any (column, new value) changes it: a repeated
    delivery changes nothing, so it is nothing new to learn from."""
    changed = or_(*(column.is_distinct_from(value) for column, value in changes))
    return case((changed, Feedback.revision + 1), else_=Feedback.revision)


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


async def _require_answer(session: AsyncSession, answer_id: int, channel: str | None,
                          asked_by: str | None) -> None:
    """Raise UnknownAnswer unless `answer_id` is an answer, in a conversation of `channel`
    and replying to a question by `asked_by` (each when given). Every refusal is the same
    error with the same message: a caller learns nothing about answers it may not touch."""
    question = aliased(Message)
    stmt = (select(Message.role, Conversation.channel, question.author_id)
            .join(Conversation, Conversation.id == Message.conversation_id)
            .outerjoin(question, question.id == Message.reply_to_id)
            .where(Message.id == answer_id))
    found = (await session.execute(stmt)).one_or_none()
    if (found is None or found.role != Role.ASSISTANT
            or (channel is not None and found.channel != channel)
            or (asked_by is not None and found.author_id != asked_by)):
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
    revision: int = 1
    source: str = ""  # the channel it came through ("web", "telegram", ...)
    fresh: bool = True  # this revision is new to the reader (see unlearned_feedback)
    adapter: str | None = None  # what served the answer (None: the base model)
    from_memory: bool = False  # the answer was an approved answer sent as it is
    memory_refs: tuple[int, ...] = ()  # the approved answers its prompt quoted (entry ids)


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


# a run that recorded a revision in one of these roles has settled it for the runs after it
# that continue from its adapter; held-out and capped rows stay new to them
SETTLED = (FeedbackRole.TRAINED, FeedbackRole.UNUSED, FeedbackRole.QUARANTINED)


def _recorded(runs: Any, roles: Collection[str] = ()) -> Any:
    """Whether a run among `runs` (ids, or a subquery) recorded the row's current revision."""
    where = [RunFeedback.feedback_id == Feedback.id, RunFeedback.revision == Feedback.revision,
             RunFeedback.run_id.in_(runs)]
    return exists().where(*where, *([RunFeedback.role.in_(roles)] if roles else []))


_ANSWER, _QUESTION = aliased(Message, name="answer"), aliased(Message, name="question")


async def _rows(session: AsyncSession, fresh: Any, *where: Any) -> list[FeedbackRow]:
    """Feedback rows on successful answers (`_ANSWER`), in id order, `fresh` computed by the
    database."""
    answer, question = _ANSWER, _QUESTION
    stmt = (select(Feedback.id, Feedback.answer_id, Feedback.voter_id, Feedback.rating,
                   Feedback.correction, Feedback.trusted, Feedback.review_status,
                   Feedback.created_at, answer.conversation_id, answer.text, question.id,
                   question.text, Feedback.revision, Feedback.source, fresh, answer.adapter,
                   answer.memory_entry_id, answer.memory_refs)
            .join(answer, answer.id == Feedback.answer_id)
            .join(question, question.id == answer.reply_to_id)
            .where(answer.status == AnswerStatus.OK, *where)
            .order_by(Feedback.id))
    return [FeedbackRow(fid, aid, voter, rating, correction, bool(trusted), review,
                        _aware(created), conversation, answer_text, qid, question_text, rev,
                        source, bool(new), adapter, entry is not None, tuple(refs or ()))
            for (fid, aid, voter, rating, correction, trusted, review, created, conversation,
                 answer_text, qid, question_text, rev, source, new, adapter, entry, refs)
            in (await session.execute(stmt)).all()]


async def unlearned_feedback(session: AsyncSession, *, learned_by: Collection[int]
                             ) -> list[FeedbackRow]:
    """What a candidate continuing from the runs `learned_by` has yet to learn: every row of
    each answer that has a row whose current revision none of them settled (SETTLED). An
    answer's label is so recomputed from all its votes when one changes or a voter arrives;
    `fresh` marks the rows that are new themselves."""
    settled = _recorded(list(learned_by), SETTLED)
    open_answers = select(Feedback.answer_id).where(~settled)
    return await _rows(session, case((settled, False), else_=True),
                       Feedback.answer_id.in_(open_answers))


async def feedback_on_adapters(session: AsyncSession, *, adapters: Collection[str | None],
                               since: datetime) -> list[FeedbackRow]:
    """Feedback on the answers these adapters (None: the base model) served since `since`."""
    names = [a for a in adapters if a is not None]
    served = [_ANSWER.adapter.in_(names)] + ([_ANSWER.adapter.is_(None)] if None in adapters
                                             else [])
    return await _rows(session, True, _ANSWER.created_at >= since, or_(*served))


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


async def eligible_count(session: AsyncSession) -> int:
    """What the training threshold counts: votes and approved corrections whose current
    revision no finished run has read (CONSUMING; a failed run consumed nothing)."""
    finished = select(TrainingRun.id).where(TrainingRun.status.in_(CONSUMING))
    stmt = select(func.count()).select_from(Feedback).where(
        or_(Feedback.rating.is_not(None), Feedback.review_status == ReviewStatus.APPROVED),
        ~_recorded(finished))
    return int((await session.execute(stmt)).scalar() or 0)


async def passed_heldout(session: AsyncSession, *, conversation_ids: Collection[int]
                         ) -> set[int]:
    """Those of these conversations that a run which passed (succeeded) held out."""
    ids = sorted(conversation_ids)
    out: set[int] = set()
    for i in range(0, len(ids), 1000):  # bounded IN lists
        stmt = (select(Message.conversation_id).distinct()
                .join(Feedback, Feedback.answer_id == Message.id)
                .join(RunFeedback, RunFeedback.feedback_id == Feedback.id)
                .join(TrainingRun, TrainingRun.id == RunFeedback.run_id)
                .where(Message.conversation_id.in_(ids[i:i + 1000]),
                       RunFeedback.role == FeedbackRole.HELDOUT,
                       TrainingRun.status == RunStatus.SUCCEEDED))
        out.update((await session.execute(stmt)).scalars())
    return out


async def release_heldout(session: AsyncSession, *, conversation_ids: Collection[int]) -> None:
    """Held-out conversations become trained on: their recorded split turns False (and
    commit); the one way a split changes."""
    ids = sorted(conversation_ids)
    for i in range(0, len(ids), 1000):
        await session.execute(update(Conversation).where(
            Conversation.id.in_(ids[i:i + 1000]), Conversation.heldout.is_(True))
            .values(heldout=False))
    await session.commit()


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


async def review_correction(session: AsyncSession, *, feedback_id: int, approve: bool,
                            actor: str | None = None) -> bool:
    """Approve or reject a pending correction, and commit; False if none has this id. An
    approved one becomes an answer-memory entry approved by `actor` (same transaction)."""
    status = ReviewStatus.APPROVED if approve else ReviewStatus.REJECTED
    result = await session.execute(
        update(Feedback)
        .where(Feedback.id == feedback_id, Feedback.review_status == ReviewStatus.PENDING)
        .values(review_status=status, updated_at=utcnow(), revision=Feedback.revision + 1))
    if approve and result.rowcount:  # type: ignore[attr-defined]
        await memory.remember_correction(session, feedback_id=feedback_id, approved_by=actor)
    await session.commit()
    return bool(result.rowcount)  # type: ignore[attr-defined]
