"""Conversations and their turns: the turn path's statements, history, answers.

Keyword-only functions taking the session (or, on the turn path, a plain connection from
`storage.sql.turn_engine`) first; one transaction each unless stated.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import Interval, bindparam, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from storage.events import INSERT_EVENT, SET_EVENT_STATUS, events
from storage.models import AnswerStatus, Conversation, EventStatus, Message, Role, utcnow
from storage.sql import Executor, bound_values, is_postgres, prefixed


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
    memory_entry_id: int | None = None  # answered with this memory entry as it is
    memory_refs: list[int] | None = None  # the memory entries the prompt quoted


# The turn path runs these for every message: built once, with bound parameters, on the
# tables (not the ORM classes), so a call costs an execute and not a statement build plus an
# ORM flush: that cut a turn's CPU from 9.6 to 5.8 ms on SQLite (benchmarks/core_overhead.py).
_messages = Message.__table__  # type: ignore[attr-defined]
_conversations = Conversation.__table__  # type: ignore[attr-defined]
_INSERT_MESSAGE = insert(_messages).returning(_messages.c.id)
_INSERT_CONVERSATION = insert(_conversations).returning(_conversations.c.id)
_SET_MESSAGE_EXTERNAL_ID = (update(_messages).where(_messages.c.id == bindparam("message_row"))
                            .values(external_message_id=bindparam("external_id")))
_CURRENT_CONVERSATION = (
    select(_conversations.c.id)
    .where(_conversations.c.channel == bindparam("channel"),
           _conversations.c.external_chat_id == bindparam("chat_id"),
           _conversations.c.external_thread_id == bindparam("thread_id"))
    .order_by(_conversations.c.epoch.desc()).limit(1)
)


# On PostgreSQL, writes that belong together are one statement (data-modifying CTEs), atomic
# by itself: with an autocommit connection (`turn_engine`) a turn then takes 5 round trips
# to the database instead of 16 (BEGIN and COMMIT included). SQLite has no such statements.
_QUESTION_COLUMNS = ("conversation_id", "role", "text", "author_id", "external_message_id",
                     "created_at")
_EVENT_COLUMNS = ("channel", "external_event_id", "payload", "status", "received_at", "owner",
                  "lease_until")
_ANSWER_COLUMNS = ("conversation_id", "role", "text", "reply_to_id", "status",
                   "external_message_id", "created_at", *AnswerMeta.__dataclass_fields__)
_question = (insert(_messages).values(bound_values(_messages, "q_", _QUESTION_COLUMNS))
             .returning(_messages.c.id).cte("question"))
# the lease's end by the database's clock (`e_lease_for`: an interval; NULL, no lease)
_EVENT_VALUES = {**bound_values(events, "e_", _EVENT_COLUMNS),
                 "lease_until": func.now() + bindparam("e_lease_for", type_=Interval())}
_BEGIN_TURN_PG = (
    insert(events)
    .from_select([*_EVENT_COLUMNS, "message_id"],
                 select(*_EVENT_VALUES.values(), _question.c.id))
    .returning(events.c.id, events.c.message_id)
)
_answer = (insert(_messages).values(bound_values(_messages, "a_", _ANSWER_COLUMNS))
           .returning(_messages.c.id).cte("answer"))
_FINISH_TURN_PG = select(_answer.c.id).add_cte(SET_EVENT_STATUS.cte("answered"))
_DELIVERED_PG = SET_EVENT_STATUS.add_cte(_SET_MESSAGE_EXTERNAL_ID.cte("shown"))


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
    lease_s: float | None = None,
) -> TurnStart | None:
    """Record the inbound event and the question in one transaction; None if already seen.

    `owner` holds the event for `lease_s` by the database's clock (renewed while the turn
    runs); no other process resumes it before that.
    """
    now = utcnow()
    lease_for = timedelta(seconds=lease_s) if lease_s is not None else None
    lease_until = now + lease_for if lease_for is not None else None  # SQLite: one host
    question = dict(conversation_id=conversation_id, role=Role.USER, text=text,
                    author_id=author_id, external_message_id=external_message_id, created_at=now)
    event = dict(channel=channel, external_event_id=event_id, payload=payload,
                 status=EventStatus.RECEIVED, received_at=now, owner=owner,
                 lease_until=lease_until)
    try:
        if is_postgres(session):
            values = {**prefixed("q_", question), **prefixed("e_", event),
                      "e_lease_for": lease_for}
            row = (await session.execute(_BEGIN_TURN_PG, values)).one()
            question_id, event_row = row.message_id, row.id
        else:
            question_id = (await session.execute(_INSERT_MESSAGE, question)).scalar_one()
            event_row = (await session.execute(INSERT_EVENT, dict(
                event, message_id=question_id))).scalar_one()
        await session.commit()
    except IntegrityError:  # the event is already recorded: the question fails with it
        await session.rollback()
        return None
    return TurnStart(conversation_id, int(question_id), int(event_row))


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
    if is_postgres(session):
        answer_id = (await session.execute(_FINISH_TURN_PG, {**prefixed("a_", answer),
                                                             **closed})).scalar_one()
    else:
        answer_id = (await session.execute(_INSERT_MESSAGE, answer)).scalar_one()
        await session.execute(SET_EVENT_STATUS, closed)
    await session.commit()
    return int(answer_id)


async def mark_delivered(session: Executor, *, turn: TurnStart, answer_id: int,
                         external_message_id: str | None) -> None:
    """The channel has shown the answer (or given up for good): close the inbound event."""
    done = dict(event_row=turn.event_id, new_status=EventStatus.DONE)
    shown = dict(message_row=answer_id, external_id=external_message_id)
    if external_message_id is None:
        await session.execute(SET_EVENT_STATUS, done)
    elif is_postgres(session):
        await session.execute(_DELIVERED_PG, {**shown, **done})
    else:
        await session.execute(_SET_MESSAGE_EXTERNAL_ID, shown)
        await session.execute(SET_EVENT_STATUS, done)
    await session.commit()


async def get_message(session: AsyncSession, *, message_id: int) -> Message | None:
    return await session.get(Message, message_id)


async def stored_answer(session: AsyncSession, *, question_id: int) -> Message | None:
    """The ok answer stored for a question, if any."""
    stmt = (select(Message).where(Message.reply_to_id == question_id,
                                  Message.status == AnswerStatus.OK)
            .order_by(Message.id.desc()).limit(1))
    return (await session.execute(stmt)).scalar()


async def find_conversation(
    session: AsyncSession, *, channel: str, chat_id: str, thread_id: str = ""
) -> int | None:
    """The id of the chat's current conversation, or None if it has none (nothing is created)."""
    key = dict(channel=channel, chat_id=chat_id, thread_id=thread_id)
    return (await session.execute(_CURRENT_CONVERSATION, key)).scalar()


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
