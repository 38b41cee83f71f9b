"""Deleting people's data: a person (forget), a conversation, and conversations past retention.

Each is one transaction with its audit entry. What is deleted:
- a person (`telegram:123`): every conversation in which they are the only person who wrote
  (a private chat, a web chat) with everything in it; in a shared one (a group, a channel)
  their messages and the answers to them; their votes and corrections everywhere; the
  feedback on every answer deleted; the copy of each deleted message in its inbound event
  (payload, and the link to the message: the event row stays as the idempotency record,
  marked done); and as an actor in the audit log they become their salted hash. Their
  salted hash is kept (storage.privacy), so later datasets and exports leave them out.
  The hand-offs they asked for, with every message relayed in them, and the messages
  they relayed in any other (as an agent).
- a conversation: everything in it, the same way (its hand-offs too).
- retention: every message older than the cutoff with the answers to it, the same way, and
  conversations left empty.

Messages that arrive while it runs are kept (later datasets leave a forgotten person's out).
What it deleted (`Erased`) tells the caller which dataset rows to remove (feedback.erasure).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, delete, exists, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from storage import audit, memory, privacy
from storage.models import (
    AuditLog,
    Conversation,
    EventStatus,
    Feedback,
    Handoff,
    HandoffMessage,
    InboundEvent,
    Message,
    Role,
)
from storage.privacy import chunks


@dataclass
class Erased:
    """What a deletion removed, and which dataset rows must go with it."""

    conversations: set[int] = field(default_factory=set)  # lost messages: their rows go
    answers: set[int] = field(default_factory=set)  # answers whose rows go (e.g. voted on)
    identity_hash: str | None = None
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def anything(self) -> bool:
        return any(self.counts.values())


async def forget_identity(session: AsyncSession, *, identity: str, actor: str) -> Erased:
    """Delete a person's data (see the module docstring), keep their salted hash, and
    record the audit entry; one transaction, committed."""
    h = (await privacy.hashes(session, [identity]))[identity]  # may commit a new salt first
    mine = (await session.execute(select(Message.id, Message.conversation_id)
                                  .where(Message.author_id == identity))).all()
    touched = {c for _, c in mine}
    shared: set[int] = set()
    for part in chunks(touched):  # someone else (or nobody known) wrote there too
        others = (Message.author_id.is_(None)) | (Message.author_id != identity)
        stmt = select(Message.conversation_id).distinct().where(
            Message.conversation_id.in_(part), Message.role == Role.USER, others)
        shared.update((await session.execute(stmt)).scalars())
    whole = touched - shared
    voted = (await session.execute(select(Feedback.answer_id)
                                   .where(Feedback.voter_id == identity))).scalars()
    erased = Erased(conversations=set(touched), answers=set(voted), identity_hash=h)
    ids = {m for m, _ in mine} | await _messages_of(session, whole)
    erased.counts = await _erase(session, ids, whole)
    erased.counts["feedback"] += await _count(session, delete(Feedback)
                                              .where(Feedback.voter_id == identity))
    erased.counts.update(await _erase_handoffs(
        session, (Handoff.user_id == identity) | Handoff.conversation_id.in_(whole),
        author=identity))
    if entries := await memory.erase(session, identity=identity):  # their answer memory
        erased.counts["memory_entries"] = entries
    await session.execute(privacy.mark_forgotten(session, h))
    await session.execute(update(AuditLog).where(AuditLog.actor == identity)
                          .values(actor=f"forgotten:{h[:16]}"))
    audit.record(session, actor=actor, action=audit.Action.FORGET, target=f"identity:{h[:16]}",
                 detail=dict(erased.counts))
    await session.commit()
    return erased


async def forget_conversation(session: AsyncSession, *, conversation_id: int,
                              actor: str) -> Erased:
    """Delete a conversation with everything in it, and record the audit entry; one
    transaction, committed. Nothing is deleted (and nothing recorded) if there is none."""
    if await session.get(Conversation, conversation_id) is None:
        return Erased()
    erased = Erased(conversations={conversation_id})
    ids = await _messages_of(session, {conversation_id})
    erased.counts = await _erase(session, ids, {conversation_id})
    erased.counts.update(await _erase_handoffs(
        session, Handoff.conversation_id == conversation_id))
    if entries := await memory.erase(session):  # entries of corrections deleted with it
        erased.counts["memory_entries"] = entries
    audit.record(session, actor=actor, action=audit.Action.FORGET,
                 target=f"conversation:{conversation_id}", detail=dict(erased.counts))
    await session.commit()
    return erased


async def delete_older_than(session: AsyncSession, *, cutoff: datetime, actor: str,
                            days: int) -> Erased:
    """Retention: delete every message from before `cutoff` (with the answers to it) and the
    conversations left empty, and record the audit entry if anything went; one transaction,
    committed."""
    old = (await session.execute(select(Message.id, Message.conversation_id)
                                 .where(Message.created_at < cutoff))).all()
    erased = Erased(conversations={c for _, c in old})
    erased.counts = await _erase(session, {m for m, _ in old}, set())
    empty = ~exists().where(Message.conversation_id == Conversation.id)
    erased.counts["conversations"] = await _count(session, delete(Conversation).where(
        Conversation.created_at < cutoff, empty))
    if entries := await memory.erase(session):  # entries of corrections deleted with them
        erased.counts["memory_entries"] = entries
    if erased.anything:
        audit.record(session, actor=actor, action=audit.Action.RETENTION,
                     target=f"older than {days} days", detail={
                         "cutoff": cutoff.isoformat(), **erased.counts})
        await session.commit()
    else:
        await session.rollback()
    return erased


async def _messages_of(session: AsyncSession, conversations: set[int]) -> set[int]:
    ids: set[int] = set()
    for part in chunks(conversations):
        stmt = select(Message.id).where(Message.conversation_id.in_(part))
        ids.update((await session.execute(stmt)).scalars())
    return ids


async def _erase(session: AsyncSession, ids: set[int], conversations: set[int]
                 ) -> dict[str, int]:
    """Delete these messages, the answers to them, the feedback on them and their events'
    payloads, then these conversations (in the caller's transaction)."""
    for part in list(chunks(ids)):  # an answer goes with its question
        ids.update((await session.execute(select(Message.id)
                                          .where(Message.reply_to_id.in_(part)))).scalars())
    counts = {"messages": 0, "feedback": 0, "event_payloads": 0, "conversations": 0}
    for part in chunks(ids):
        counts["feedback"] += await _count(session, delete(Feedback)
                                           .where(Feedback.answer_id.in_(part)))
        counts["event_payloads"] += await _count(session, update(InboundEvent).where(
            InboundEvent.message_id.in_(part)).values(
            payload=None, message_id=None, status=EventStatus.DONE, owner=None,
            lease_until=None))
    for role in (Role.ASSISTANT, None):  # answers first: they refer to their questions
        for part in chunks(ids):
            where: ColumnElement[bool] = Message.id.in_(part)
            if role is not None:
                where = where & (Message.role == role)
            counts["messages"] += await _count(session, delete(Message).where(where))
    for part in chunks(conversations):
        counts["conversations"] += await _count(session, delete(Conversation)
                                                .where(Conversation.id.in_(part)))
    return counts


async def _erase_handoffs(session: AsyncSession, where: ColumnElement[bool], *,
                          author: str | None = None) -> dict[str, int]:
    """Delete the hand-offs `where` selects with every message relayed in them (both ways),
    and the relayed messages `author` wrote in any other (an agent who is forgotten)."""
    handoffs = set((await session.execute(select(Handoff.id).where(where))).scalars())
    mine = HandoffMessage.handoff_id.in_(handoffs)
    if author is not None:
        mine = mine | (HandoffMessage.author_id == author)
    counts = {"handoff_messages": await _count(session, delete(HandoffMessage).where(mine)),
              "handoffs": await _count(session, delete(Handoff).where(Handoff.id.in_(handoffs)))}
    return {k: n for k, n in counts.items() if n}  # counted where there were any


async def _count(session: AsyncSession, stmt: Any) -> int:
    # nothing of these tables is loaded in the session: no need to synchronise it
    result = await session.execute(stmt.execution_options(synchronize_session=False))
    return int(result.rowcount)  # type: ignore[attr-defined]
