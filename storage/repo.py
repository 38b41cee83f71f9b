"""Repository functions: keyword-only, session first, one transaction each unless stated."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from storage.models import (
    AnswerStatus,
    Conversation,
    EventStatus,
    Feedback,
    InboundEvent,
    Message,
    ReviewStatus,
    Role,
    utcnow,
)


@dataclass(frozen=True, slots=True)
class TurnStart:
    conversation_id: int
    question_id: int
    event_id: int


@dataclass(frozen=True, slots=True)
class AnswerMeta:
    model: str
    adapter: str | None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    ttft_ms: float | None = None
    latency_ms: float | None = None
    finish_reason: str | None = None
    error_kind: str | None = None


async def current_conversation(
    session: AsyncSession, *, channel: str, chat_id: str, thread_id: str = ""
) -> int:
    """The id of the chat's current conversation (latest epoch), created if there is none."""
    key = (Conversation.channel == channel, Conversation.external_chat_id == chat_id,
           Conversation.external_thread_id == thread_id)
    stmt = select(Conversation.id).where(*key).order_by(Conversation.epoch.desc()).limit(1)
    found = (await session.execute(stmt)).scalar()
    if found is not None:
        return found
    conv = Conversation(channel=channel, external_chat_id=chat_id, external_thread_id=thread_id)
    session.add(conv)
    try:
        await session.commit()
    except IntegrityError:  # a concurrent first message created it: use that one
        await session.rollback()
        return (await session.execute(stmt)).scalar_one()
    assert conv.id is not None
    return conv.id


async def reset_conversation(
    session: AsyncSession, *, channel: str, chat_id: str, thread_id: str = ""
) -> int:
    """Start a new conversation for this chat; earlier turns stay stored but leave the history."""
    return await _new_epoch(session, channel=channel, chat_id=chat_id, thread_id=thread_id)


async def _new_epoch(session: AsyncSession, *, channel: str, chat_id: str, thread_id: str) -> int:
    for _ in range(5):  # a concurrent creator may take the same epoch: read again and retry
        key = (Conversation.channel == channel, Conversation.external_chat_id == chat_id,
               Conversation.external_thread_id == thread_id)
        top = (await session.execute(select(func.max(Conversation.epoch)).where(*key))).scalar()
        conv = Conversation(channel=channel, external_chat_id=chat_id,
                            external_thread_id=thread_id, epoch=0 if top is None else top + 1)
        session.add(conv)
        try:
            await session.commit()
        except IntegrityError:
            await session.rollback()
            continue
        assert conv.id is not None
        return conv.id
    raise RuntimeError("could not create a conversation under contention")


async def begin_turn(
    session: AsyncSession,
    *,
    channel: str,
    event_id: str,
    conversation_id: int,
    text: str,
    author_id: str | None,
    external_message_id: str | None = None,
    payload: dict[str, Any] | None = None,
) -> TurnStart | None:
    """Record the inbound event and the question in one transaction; None if already seen."""
    event = InboundEvent(channel=channel, external_event_id=event_id, payload=payload)
    question = Message(conversation_id=conversation_id, role=Role.USER, text=text,
                       author_id=author_id, external_message_id=external_message_id)
    session.add(event)
    session.add(question)
    try:
        await session.flush()
        event.message_id = question.id
        await session.commit()
    except IntegrityError:
        await session.rollback()
        return None
    assert question.id is not None and event.id is not None
    return TurnStart(conversation_id, question.id, event.id)


async def record_event(
    session: AsyncSession, *, channel: str, event_id: str, payload: dict[str, Any] | None = None
) -> int | None:
    """Record a delivery that starts no turn (a command, a vote); None if already seen."""
    event = InboundEvent(channel=channel, external_event_id=event_id, payload=payload,
                         status=EventStatus.DONE)
    session.add(event)
    try:
        await session.commit()
    except IntegrityError:
        await session.rollback()
        return None
    return event.id


async def history(session: AsyncSession, *, conversation_id: int, before_id: int,
                  limit: int) -> list[Message]:
    """The last `limit` messages of the exchanges asked before `before_id`, in order.

    Only answered exchanges count: a failed answer and its question are left out, and so is a
    question still being answered (two messages in one thread can be recorded before either
    is answered; the later one then sees the earlier exchange once its answer is stored).
    """
    if limit <= 0:
        return []
    asked_before = Message.id < before_id
    answer_to_earlier = (Message.role == Role.ASSISTANT) & (Message.reply_to_id < before_id)
    stmt = (select(Message)
            .where(Message.conversation_id == conversation_id, asked_before | answer_to_earlier)
            .order_by(Message.id.desc()).limit(limit * 2 + 4))
    rows = list((await session.execute(stmt)).scalars())
    answers = {m.reply_to_id: m for m in rows
               if m.role == Role.ASSISTANT and m.status == AnswerStatus.OK}
    questions = sorted((m for m in rows if m.role == Role.USER and m.id in answers),
                       key=lambda m: m.id or 0)
    kept = [msg for q in questions for msg in (q, answers[q.id])]
    return kept[-limit:]


async def finish_turn(
    session: AsyncSession,
    *,
    turn: TurnStart,
    text: str,
    status: AnswerStatus,
    meta: AnswerMeta,
    external_message_id: str | None = None,
) -> int:
    """Store the answer (ok or failed, never an empty success).

    A failed turn closes its inbound event; an ok one leaves it "answered" until
    `mark_delivered`, so a crash between storing and delivering re-delivers the stored answer.
    """
    if status == AnswerStatus.OK and not text:
        raise ValueError("an ok answer needs text")
    answer = Message(conversation_id=turn.conversation_id, role=Role.ASSISTANT, text=text,
                     reply_to_id=turn.question_id, status=status,
                     external_message_id=external_message_id, **asdict(meta))
    session.add(answer)
    ev_status = EventStatus.ANSWERED if status == AnswerStatus.OK else EventStatus.FAILED
    await session.execute(update(InboundEvent).where(InboundEvent.id == turn.event_id)
                          .values(status=ev_status))
    await session.commit()
    assert answer.id is not None
    return answer.id


async def mark_delivered(session: AsyncSession, *, turn: TurnStart, answer_id: int,
                         external_message_id: str | None) -> None:
    """The channel has shown the answer (or given up for good): close the inbound event."""
    if external_message_id is not None:
        await session.execute(update(Message).where(Message.id == answer_id)
                              .values(external_message_id=external_message_id))
    await session.execute(update(InboundEvent).where(InboundEvent.id == turn.event_id)
                          .values(status=EventStatus.DONE))
    await session.commit()


async def pending_events(session: AsyncSession, *, channel: str) -> list[InboundEvent]:
    """Events whose turn never finished or whose answer was never delivered: to resume."""
    open_ = (EventStatus.RECEIVED, EventStatus.ANSWERED)
    stmt = (select(InboundEvent).where(InboundEvent.channel == channel,
                                       InboundEvent.status.in_(open_))
            .order_by(InboundEvent.id))
    return list((await session.execute(stmt)).scalars())


async def get_message(session: AsyncSession, *, message_id: int) -> Message | None:
    return await session.get(Message, message_id)


async def stored_answer(session: AsyncSession, *, question_id: int) -> Message | None:
    """The ok answer stored for a question, if any."""
    stmt = (select(Message).where(Message.reply_to_id == question_id,
                                  Message.status == AnswerStatus.OK)
            .order_by(Message.id.desc()).limit(1))
    return (await session.execute(stmt)).scalar()


def _upsert(session: AsyncSession) -> Any:
    name = session.get_bind().dialect.name
    return postgresql.insert if name == "postgresql" else sqlite.insert


async def record_vote(
    session: AsyncSession, *, answer_id: int, voter_id: str, rating: int, source: str,
    reason: str | None = None, trusted: bool = False,
) -> Feedback:
    """Set this voter's live vote on an answer (a second vote replaces the first)."""
    if rating not in (1, -1):
        raise ValueError("rating must be +1 or -1")
    await _require_answer(session, answer_id)
    now = utcnow()
    values = dict(answer_id=answer_id, voter_id=voter_id, rating=rating, reason=reason,
                  source=source, trusted=trusted, created_at=now, updated_at=now)
    stmt = _upsert(session)(Feedback).values(**values)
    stmt = stmt.on_conflict_do_update(
        index_elements=["answer_id", "voter_id"],
        set_=dict(rating=rating, reason=reason, updated_at=now),
    )
    await session.execute(stmt)
    await session.commit()
    return await _feedback(session, answer_id, voter_id)


async def record_correction(
    session: AsyncSession, *, answer_id: int, voter_id: str, text: str, source: str,
    trusted: bool,
) -> Feedback:
    """Store a better answer; trusted (reviewer) corrections are approved, others await review."""
    if not text.strip():
        raise ValueError("a correction needs text")
    await _require_answer(session, answer_id)
    now = utcnow()
    review = ReviewStatus.APPROVED if trusted else ReviewStatus.PENDING
    values = dict(answer_id=answer_id, voter_id=voter_id, correction=text, source=source,
                  trusted=trusted, review_status=review, created_at=now, updated_at=now)
    stmt = _upsert(session)(Feedback).values(**values)
    stmt = stmt.on_conflict_do_update(
        index_elements=["answer_id", "voter_id"],
        set_=dict(correction=text, trusted=trusted, review_status=review, updated_at=now),
    )
    await session.execute(stmt)
    await session.commit()
    return await _feedback(session, answer_id, voter_id)


class UnknownAnswer(LookupError):
    """Feedback was given on a message that is not a stored answer."""


async def _require_answer(session: AsyncSession, answer_id: int) -> None:
    msg = await session.get(Message, answer_id)
    if msg is None or msg.role != Role.ASSISTANT:
        raise UnknownAnswer(f"no answer with id {answer_id}")


async def _feedback(session: AsyncSession, answer_id: int, voter_id: str) -> Feedback:
    stmt = select(Feedback).where(Feedback.answer_id == answer_id, Feedback.voter_id == voter_id)
    row = (await session.execute(stmt.execution_options(populate_existing=True))).scalar_one()
    return row


async def find_conversation(
    session: AsyncSession, *, channel: str, chat_id: str, thread_id: str = ""
) -> int | None:
    """The id of the chat's current conversation, or None if it has none (nothing is created)."""
    key = (Conversation.channel == channel, Conversation.external_chat_id == chat_id,
           Conversation.external_thread_id == thread_id)
    stmt = select(Conversation.id).where(*key).order_by(Conversation.epoch.desc()).limit(1)
    return (await session.execute(stmt)).scalar()


async def latest_answer(session: AsyncSession, *, conversation_id: int) -> Message | None:
    """The conversation's most recent successful answer, if any."""
    stmt = (select(Message).where(Message.conversation_id == conversation_id,
                                  Message.role == Role.ASSISTANT,
                                  Message.status == AnswerStatus.OK)
            .order_by(Message.id.desc()).limit(1))
    return (await session.execute(stmt)).scalar()


async def set_error_kind(session: AsyncSession, *, message_id: int, error_kind: str) -> None:
    """Note a problem found after the answer was stored (e.g. the platform refused delivery)."""
    await session.execute(update(Message).where(Message.id == message_id)
                          .values(error_kind=error_kind[:64]))
    await session.commit()
