"""Answer memory entries: approved answers the gateway may answer from, and their reads.

An entry is made when a correction is approved (trusted at once, or approved in review) in
the same transaction, or imported by an operator. Entries are never deleted: disabling or
erasing one (a forgotten person's) changes its status and bumps `updated_at`, so that every
replica, polling `changed_since`, drops it from its in-process index within seconds. An
erased entry keeps no text. Embeddings are a cache: whoever embeds an entry stores the vector
with the embedder's name, and a process using another embedder computes its own.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import and_, case, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased

from storage.models import (
    Feedback,
    MemoryEntry,
    MemoryStatus,
    Message,
    Role,
    utcnow,
)
from storage.privacy import chunks
from storage.sql import upsert

CORRECTION, IMPORT = "correction", "import"
VOTES = "votes"  # `disabled_by` of an entry its trusted voters turned down
PENDING = "pending review"  # `disabled_by` of a correction changed back to awaiting review


@dataclass(frozen=True, slots=True)
class NewEntry:
    question: str
    answer: str
    context: str | None = None


@dataclass(frozen=True, slots=True)
class EntryRow:
    """An entry as the in-process index needs it (a changed one: re-read in full)."""

    id: int
    question: str
    answer: str
    context: str | None
    status: str
    updated_at: datetime
    embedder: str | None
    embedding: bytes | None


@dataclass(frozen=True, slots=True)
class EntryStats:
    """An entry as operators see it: what it says, how often it answered, trusted votes."""

    id: int
    question: str
    answer: str
    source: str
    status: str
    disabled_by: str | None
    approved_by: str | None
    created_at: datetime
    uses: int
    up: int
    down: int
    context: str | None = None  # the exchange before the question


def _aware(when: datetime) -> datetime:
    return when if when.tzinfo else when.replace(tzinfo=UTC)


# ---- writes (the caller's transaction unless said otherwise) ----


async def remember_correction(session: AsyncSession, *, feedback_id: int,
                              approved_by: str | None) -> int | None:
    """Make (or renew) the entry of an approved correction: its answer's question, the
    exchange before it and the correction; None if the feedback has no correction."""
    answer, question = aliased(Message), aliased(Message)
    row = (await session.execute(
        select(Feedback.correction, question.text, question.author_id, question.id,
               question.conversation_id)
        .join(answer, answer.id == Feedback.answer_id)
        .join(question, question.id == answer.reply_to_id)
        .where(Feedback.id == feedback_id))).one_or_none()
    if row is None or not (row.correction or "").strip():
        return None
    context = await _context(session, conversation_id=row.conversation_id, before=row.id)
    now = utcnow()
    values = dict(question=row.text, context=context, answer=row.correction, source=CORRECTION,
                  feedback_id=feedback_id, asked_by=row.author_id, approved_by=approved_by,
                  status=MemoryStatus.ACTIVE, disabled_by=None, updated_at=now,
                  embedder=None, embedding=None)
    stmt = upsert(session)(MemoryEntry).values(created_at=now, **values)
    stmt = stmt.on_conflict_do_update(index_elements=["feedback_id"], set_=values)
    await session.execute(stmt.returning(MemoryEntry.id))
    return await session.scalar(select(MemoryEntry.id).where(
        MemoryEntry.feedback_id == feedback_id))


async def _context(session: AsyncSession, *, conversation_id: int, before: int) -> str | None:
    """The exchange before a question (its question and answer), for follow-ups."""
    stmt = (select(Message.role, Message.text).where(
        Message.conversation_id == conversation_id, Message.id < before)
        .order_by(Message.id.desc()).limit(2))
    rows = list(reversed((await session.execute(stmt)).all()))
    return "\n".join(f"{r.role}: {r.text}" for r in rows) or None


async def retire_correction(session: AsyncSession, *, feedback_id: int) -> None:
    """A correction no longer approved (changed, awaiting review again) answers no more."""
    await session.execute(update(MemoryEntry).where(
        MemoryEntry.feedback_id == feedback_id, MemoryEntry.status == MemoryStatus.ACTIVE)
        .values(status=MemoryStatus.DISABLED, disabled_by=PENDING, updated_at=utcnow()))


async def add_entries(session: AsyncSession, entries: Sequence[NewEntry], *, actor: str,
                      embedder: str | None = None,
                      embeddings: Sequence[bytes] | None = None) -> list[int]:
    """Insert imported entries (with their embeddings, when given) and commit; their ids."""
    now = utcnow()
    rows = [MemoryEntry(question=e.question, answer=e.answer, context=e.context, source=IMPORT,
                        approved_by=actor, created_at=now, updated_at=now,
                        embedder=embedder if embeddings else None,
                        embedding=embeddings[i] if embeddings else None)
            for i, e in enumerate(entries)]
    session.add_all(rows)
    await session.commit()
    return [r.id for r in rows if r.id is not None]


async def set_status(session: AsyncSession, *, entry_id: int, status: MemoryStatus,
                     by: str) -> bool:
    """Enable or disable an entry (not an erased one) and commit; False if none has this id."""
    result = await session.execute(update(MemoryEntry).where(
        MemoryEntry.id == entry_id, MemoryEntry.status != MemoryStatus.ERASED).values(
        status=status, disabled_by=None if status == MemoryStatus.ACTIVE else by,
        updated_at=utcnow()))
    await session.commit()
    return bool(result.rowcount)  # type: ignore[attr-defined]


async def store_embeddings(session: AsyncSession, *, embedder: str,
                           vectors: Iterable[tuple[EntryRow, bytes]]) -> None:
    """Cache embeddings of entries unchanged since they were read, and commit."""
    for row, blob in vectors:
        await session.execute(update(MemoryEntry).where(
            MemoryEntry.id == row.id, MemoryEntry.updated_at == row.updated_at)
            .values(embedder=embedder, embedding=blob))
    await session.commit()


async def judge_by_votes(session: AsyncSession, *, answer_id: int) -> None:
    """After a trusted vote or correction on a memory answer: disable its entry while it has
    more 👎 than 👍 from distinct trusted voters (over all the answers it gave), and give an
    entry that votes disabled back once it no longer has."""
    entry = await session.scalar(select(Message.memory_entry_id).where(Message.id == answer_id))
    if entry is None:
        return
    up, down = (await _votes(session, [entry])).get(entry, (0, 0))
    now = utcnow()
    if down > up:
        await session.execute(update(MemoryEntry).where(
            MemoryEntry.id == entry, MemoryEntry.status == MemoryStatus.ACTIVE)
            .values(status=MemoryStatus.DISABLED, disabled_by=VOTES, updated_at=now))
    else:
        await session.execute(update(MemoryEntry).where(
            MemoryEntry.id == entry, MemoryEntry.status == MemoryStatus.DISABLED,
            MemoryEntry.disabled_by == VOTES)
            .values(status=MemoryStatus.ACTIVE, disabled_by=None, updated_at=now))


async def erase(session: AsyncSession, *, identity: str | None = None) -> int:
    """Tombstone the entries whose correction is gone (deleted with its person or
    conversation) and, with `identity`, those that person asked or approved (in the caller's
    transaction): no text stays. How many."""
    gone = and_(MemoryEntry.source == CORRECTION, MemoryEntry.feedback_id.is_not(None),
                ~select(Feedback.id).where(Feedback.id == MemoryEntry.feedback_id).exists())
    who = [MemoryEntry.asked_by == identity, MemoryEntry.approved_by == identity] \
        if identity else []
    result = await session.execute(
        update(MemoryEntry).where(MemoryEntry.status != MemoryStatus.ERASED, or_(gone, *who))
        .values(status=MemoryStatus.ERASED, question="", answer="", context=None,
                asked_by=None, approved_by=None, embedding=None, embedder=None,
                updated_at=utcnow())
        .execution_options(synchronize_session=False))
    return int(result.rowcount)  # type: ignore[attr-defined]


# ---- reads ----


async def versions_since(session: AsyncSession, *, since: datetime | None
                         ) -> list[tuple[int, datetime]]:
    """(id, updated_at) of the entries changed at or after `since` (every one if None)."""
    stmt = select(MemoryEntry.id, MemoryEntry.updated_at)
    if since is not None:
        stmt = stmt.where(MemoryEntry.updated_at >= since)
    return [(i, _aware(at)) for i, at in (await session.execute(stmt)).all()]


async def rows(session: AsyncSession, *, ids: Iterable[int]) -> list[EntryRow]:
    """These entries in full (with their cached embeddings)."""
    out: list[EntryRow] = []
    for part in chunks(set(ids)):
        stmt = select(MemoryEntry.id, MemoryEntry.question, MemoryEntry.answer,
                      MemoryEntry.context, MemoryEntry.status, MemoryEntry.updated_at,
                      MemoryEntry.embedder, MemoryEntry.embedding).where(
            MemoryEntry.id.in_(part))
        out.extend(EntryRow(i, q, a, c, st, _aware(at), name, emb)
                   for i, q, a, c, st, at, name, emb in (await session.execute(stmt)).all())
    return out


async def entries(session: AsyncSession, *, status: str | None = None) -> list[EntryStats]:
    """Entries with their use count and trusted votes, in id order (not the erased ones
    unless asked for by `status`)."""
    stmt = select(MemoryEntry.id, MemoryEntry.question, MemoryEntry.answer, MemoryEntry.source,
                  MemoryEntry.status, MemoryEntry.disabled_by, MemoryEntry.approved_by,
                  MemoryEntry.created_at, MemoryEntry.context).order_by(MemoryEntry.id)
    stmt = stmt.where(MemoryEntry.status == status) if status else stmt.where(
        MemoryEntry.status != MemoryStatus.ERASED)
    rows = (await session.execute(stmt)).all()
    ids = [r.id for r in rows]
    uses: dict[int, int] = {}
    for part in chunks(set(ids)):
        uses.update((await session.execute(
            select(Message.memory_entry_id, func.count()).where(
                Message.memory_entry_id.in_(part), Message.role == Role.ASSISTANT)
            .group_by(Message.memory_entry_id))).all())
    votes = await _votes(session, ids)
    return [EntryStats(r.id, r.question, r.answer, r.source, r.status, r.disabled_by,
                       r.approved_by, _aware(r.created_at), uses.get(r.id, 0),
                       *votes.get(r.id, (0, 0)), r.context) for r in rows]


async def _votes(session: AsyncSession, ids: Sequence[int]) -> dict[int, tuple[int, int]]:
    """Per entry: distinct trusted voters whose latest word on its answers is 👍, and 👎. A
    👎 whose correction is, word for word, the answer of an entry approved before it (this
    one included) is no word against the entry: the voter wrote what the entry said (a
    reviewer who marks every answer, then gives the right one) or what another entry says
    (the memory picked the wrong entry for the question and the correction names the right
    one, as a support team's saved replies do). A 👎 corrected in other words counts: the
    entry's answer may be what is wrong."""
    out: dict[int, tuple[int, int]] = {}
    approved = aliased(MemoryEntry)
    for part in chunks(set(ids)):
        approved_answer = select(approved.id).where(
            func.trim(approved.answer) == func.trim(Feedback.correction),
            approved.created_at <= Feedback.updated_at,
            or_(approved.feedback_id.is_(None),  # not the entry this correction made
                approved.feedback_id != Feedback.id)).exists()
        per_voter = (select(Message.memory_entry_id.label("entry"), Feedback.voter_id,
                            func.sum(Feedback.rating).label("net"))
                     .join(Message, Message.id == Feedback.answer_id)
                     .where(Message.memory_entry_id.in_(part), Feedback.trusted.is_(True),
                            Feedback.rating.is_not(None), ~approved_answer)
                     .group_by(Message.memory_entry_id, Feedback.voter_id).subquery())
        stmt = select(per_voter.c.entry,
                      func.sum(case((per_voter.c.net > 0, 1), else_=0)),
                      func.sum(case((per_voter.c.net < 0, 1), else_=0))).group_by(
            per_voter.c.entry)
        out.update({e: (int(u or 0), int(d or 0)) for e, u, d in
                    (await session.execute(stmt)).all()})
    return out
