"""Repository functions: keyword-only, session first, one transaction each unless stated."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, func, insert, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession

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

# The turn path's functions take a plain connection too: no ORM session to set up per turn
Executor = AsyncSession | AsyncConnection


@dataclass(frozen=True, slots=True)
class TurnStart:
    conversation_id: int
    question_id: int
    event_id: int


@dataclass(frozen=True, slots=True)
class HistoryMessage:
    role: str
    text: str


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


# The turn path runs these for every message: built once, with bound parameters, on the
# tables (not the ORM classes), so a call costs an execute and not a statement build plus an
# ORM flush: that cut a turn's CPU from 9.6 to 5.8 ms on SQLite (benchmarks/core_overhead.py).
_messages = Message.__table__  # type: ignore[attr-defined]
_events = InboundEvent.__table__  # type: ignore[attr-defined]
_conversations = Conversation.__table__  # type: ignore[attr-defined]
_INSERT_MESSAGE = insert(_messages).returning(_messages.c.id)
_INSERT_EVENT = insert(_events).returning(_events.c.id)
_INSERT_CONVERSATION = insert(_conversations).returning(_conversations.c.id)
_SET_EVENT_STATUS = (update(_events).where(_events.c.id == bindparam("event_row"))
                     .values(status=bindparam("new_status")))
_SET_MESSAGE_EXTERNAL_ID = (update(_messages).where(_messages.c.id == bindparam("message_row"))
                            .values(external_message_id=bindparam("external_id")))
_CURRENT_CONVERSATION = (
    select(_conversations.c.id)
    .where(_conversations.c.channel == bindparam("channel"),
           _conversations.c.external_chat_id == bindparam("chat_id"),
           _conversations.c.external_thread_id == bindparam("thread_id"))
    .order_by(_conversations.c.epoch.desc()).limit(1)
)


def _values(table: Any, prefix: str, columns: Collection[str]) -> dict[str, Any]:
    return {c: bindparam(prefix + c, type_=table.c[c].type) for c in columns}


def _prefixed(prefix: str, values: dict[str, Any]) -> dict[str, Any]:
    return {prefix + k: v for k, v in values.items()}


# On PostgreSQL, writes that belong together are one statement (data-modifying CTEs), atomic
# by itself: with an autocommit connection (`turn_engine`) a turn then takes 5 round trips
# to the database instead of 16 (BEGIN and COMMIT included). SQLite has no such statements.
_QUESTION_COLUMNS = ("conversation_id", "role", "text", "author_id", "external_message_id",
                     "created_at")
_EVENT_COLUMNS = ("channel", "external_event_id", "payload", "status", "received_at", "owner",
                  "lease_until")
_ANSWER_COLUMNS = ("conversation_id", "role", "text", "reply_to_id", "status",
                   "external_message_id", "created_at", *AnswerMeta.__dataclass_fields__)
_question = (insert(_messages).values(_values(_messages, "q_", _QUESTION_COLUMNS))
             .returning(_messages.c.id).cte("question"))
_BEGIN_TURN_PG = (
    insert(_events)
    .from_select([*_EVENT_COLUMNS, "message_id"],
                 select(*_values(_events, "e_", _EVENT_COLUMNS).values(), _question.c.id))
    .returning(_events.c.id, _events.c.message_id)
)
_answer = (insert(_messages).values(_values(_messages, "a_", _ANSWER_COLUMNS))
           .returning(_messages.c.id).cte("answer"))
_FINISH_TURN_PG = select(_answer.c.id).add_cte(_SET_EVENT_STATUS.cte("answered"))
_DELIVERED_PG = _SET_EVENT_STATUS.add_cte(_SET_MESSAGE_EXTERNAL_ID.cte("shown"))


def turn_engine(engine: AsyncEngine) -> AsyncEngine:
    """The engine for the turn path (`current_conversation`, `begin_turn`, `history`,
    `finish_turn`, `mark_delivered`): on PostgreSQL, where each of their writes is a single
    statement, an autocommit one, so BEGIN and COMMIT cost no round trips; else `engine`."""
    if _postgres(engine):
        return engine.execution_options(isolation_level="AUTOCOMMIT")
    return engine


def _postgres(session: Executor | AsyncEngine) -> bool:
    bind = session.get_bind() if isinstance(session, AsyncSession) else session
    return bind.dialect.name == "postgresql"


_HISTORY = (
    select(_messages.c.id, _messages.c.role, _messages.c.text, _messages.c.reply_to_id,
           _messages.c.status)
    .where(_messages.c.conversation_id == bindparam("conversation_id"),
           (_messages.c.id < bindparam("before_id"))
           | ((_messages.c.role == Role.ASSISTANT)
              & (_messages.c.reply_to_id < bindparam("before_id"))))
    .order_by(_messages.c.id.desc()).limit(bindparam("rows"))
)


async def current_conversation(
    session: Executor, *, channel: str, chat_id: str, thread_id: str = ""
) -> int:
    """The id of the chat's current conversation (latest epoch), created if there is none."""
    key = dict(channel=channel, chat_id=chat_id, thread_id=thread_id)
    found = (await session.execute(_CURRENT_CONVERSATION, key)).scalar()
    if found is not None:
        return int(found)
    try:
        created = (await session.execute(_INSERT_CONVERSATION, dict(
            channel=channel, external_chat_id=chat_id, external_thread_id=thread_id, epoch=0,
            created_at=utcnow()))).scalar_one()
        await session.commit()
    except IntegrityError:  # a concurrent first message created it: use that one
        await session.rollback()
        return int((await session.execute(_CURRENT_CONVERSATION, key)).scalar_one())
    return int(created)


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
    session: Executor,
    *,
    channel: str,
    event_id: str,
    conversation_id: int,
    text: str,
    author_id: str | None,
    external_message_id: str | None = None,
    payload: dict[str, Any] | None = None,
    owner: str | None = None,
    lease_until: datetime | None = None,
) -> TurnStart | None:
    """Record the inbound event and the question in one transaction; None if already seen.

    `owner` holds the event until `lease_until` (renewed while the turn runs); no other
    process resumes it before that.
    """
    now = utcnow()
    question = dict(conversation_id=conversation_id, role=Role.USER, text=text,
                    author_id=author_id, external_message_id=external_message_id, created_at=now)
    event = dict(channel=channel, external_event_id=event_id, payload=payload,
                 status=EventStatus.RECEIVED, received_at=now, owner=owner,
                 lease_until=lease_until)
    try:
        if _postgres(session):
            row = (await session.execute(_BEGIN_TURN_PG, {**_prefixed("q_", question),
                                                          **_prefixed("e_", event)})).one()
            question_id, event_row = row.message_id, row.id
        else:
            question_id = (await session.execute(_INSERT_MESSAGE, question)).scalar_one()
            event_row = (await session.execute(_INSERT_EVENT, dict(
                event, message_id=question_id))).scalar_one()
        await session.commit()
    except IntegrityError:  # the event is already recorded: the question fails with it
        await session.rollback()
        return None
    return TurnStart(conversation_id, int(question_id), int(event_row))


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


async def history(session: Executor, *, conversation_id: int, before_id: int,
                  limit: int) -> list[HistoryMessage]:
    """The last `limit` messages of the exchanges asked before `before_id`, in order.

    Only answered exchanges count: a failed answer and its question are left out, and so is a
    question still being answered (two messages in one thread can be recorded before either
    is answered; the later one then sees the earlier exchange once its answer is stored).
    """
    if limit <= 0:
        return []
    rows = (await session.execute(_HISTORY, dict(conversation_id=conversation_id,
                                                 before_id=before_id, rows=limit * 2 + 4))).all()
    answers = {m.reply_to_id: m for m in rows
               if m.role == Role.ASSISTANT and m.status == AnswerStatus.OK}
    questions = sorted((m for m in rows if m.role == Role.USER and m.id in answers),
                       key=lambda m: m.id)
    kept = [HistoryMessage(msg.role, msg.text) for q in questions for msg in (q, answers[q.id])]
    return kept[-limit:]


async def finish_turn(
    session: Executor,
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
    answer = dict(conversation_id=turn.conversation_id, role=Role.ASSISTANT, text=text,
                  reply_to_id=turn.question_id, status=status,
                  external_message_id=external_message_id, created_at=utcnow(), **asdict(meta))
    closed = dict(event_row=turn.event_id, new_status=EventStatus.ANSWERED
                  if status == AnswerStatus.OK else EventStatus.FAILED)
    if _postgres(session):
        answer_id = (await session.execute(_FINISH_TURN_PG, {**_prefixed("a_", answer),
                                                             **closed})).scalar_one()
    else:
        answer_id = (await session.execute(_INSERT_MESSAGE, answer)).scalar_one()
        await session.execute(_SET_EVENT_STATUS, closed)
    await session.commit()
    return int(answer_id)


async def mark_delivered(session: Executor, *, turn: TurnStart, answer_id: int,
                         external_message_id: str | None) -> None:
    """The channel has shown the answer (or given up for good): close the inbound event."""
    done = dict(event_row=turn.event_id, new_status=EventStatus.DONE)
    shown = dict(message_row=answer_id, external_id=external_message_id)
    if external_message_id is None:
        await session.execute(_SET_EVENT_STATUS, done)
    elif _postgres(session):
        await session.execute(_DELIVERED_PG, {**shown, **done})
    else:
        await session.execute(_SET_MESSAGE_EXTERNAL_ID, shown)
        await session.execute(_SET_EVENT_STATUS, done)
    await session.commit()


async def pending_events(session: AsyncSession, *, channel: str) -> list[InboundEvent]:
    """Events whose turn never finished or whose answer was never delivered, and that no live
    process holds (no lease, or an expired one): to resume, after `claim_event`."""
    stmt = (select(InboundEvent).where(InboundEvent.channel == channel,
                                       InboundEvent.status.in_(_OPEN), _free())
            .order_by(InboundEvent.id))
    return list((await session.execute(stmt)).scalars())


_OPEN = (EventStatus.RECEIVED, EventStatus.ANSWERED)  # a turn still to answer or to deliver


def _free() -> Any:
    """No process holds the event: no lease, or one that has run out."""
    return or_(_events.c.lease_until.is_(None), _events.c.lease_until < utcnow())


async def claim_event(session: AsyncSession, *, event_id: int, owner: str,
                      lease_until: datetime) -> bool:
    """Take an open event that no live process holds (counting the attempt); False if another
    took it first."""
    result = await session.execute(
        update(_events).where(_events.c.id == event_id, _events.c.status.in_(_OPEN), _free())
        .values(owner=owner, lease_until=lease_until, attempts=_events.c.attempts + 1))
    await session.commit()
    return result.rowcount == 1  # type: ignore[attr-defined]


async def note_shown(session: AsyncSession, *, event_id: int, ref: str) -> None:
    """Remember the platform message showing this event's answer while it streams."""
    await session.execute(update(_events).where(_events.c.id == event_id)
                          .values(shown_ref=ref))
    await session.commit()


async def renew_leases(session: AsyncSession, *, event_ids: Collection[int], owner: str,
                       lease_until: datetime | None) -> int:
    """Extend (or, with None, give up) `owner`'s leases on these events; returns how many."""
    if not event_ids:
        return 0
    result = await session.execute(
        update(_events).where(_events.c.id.in_(list(event_ids)), _events.c.owner == owner)
        .values(lease_until=lease_until))
    await session.commit()
    return int(result.rowcount)  # type: ignore[attr-defined]


async def get_message(session: AsyncSession, *, message_id: int) -> Message | None:
    return await session.get(Message, message_id)


async def stored_answer(session: AsyncSession, *, question_id: int) -> Message | None:
    """The ok answer stored for a question, if any."""
    stmt = (select(Message).where(Message.reply_to_id == question_id,
                                  Message.status == AnswerStatus.OK)
            .order_by(Message.id.desc()).limit(1))
    return (await session.execute(stmt)).scalar()


def _upsert(session: AsyncSession) -> Any:
    return postgresql.insert if _postgres(session) else sqlite.insert


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
