"""Human hand-off: who holds a conversation, and the messages relayed meanwhile.

A hand-off is open while it is `waiting` (a person was asked for) or `held` (an agent took
it over); at most one per conversation (a partial unique index), and every replica reads it
before answering, so the bot steps back everywhere at once. Every change is one conditional
update: two replicas racing for the same transition see one winner.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from storage import feedback as feedback_store
from storage.events import record_event
from storage.models import (
    Conversation,
    Feedback,
    Handoff,
    HandoffMessage,
    HandoffStatus,
    InboundEvent,
    Message,
    Role,
    utcnow,
)

OPEN = (HandoffStatus.WAITING, HandoffStatus.HELD)
SOURCE = "handoff"  # the feedback source (kind) of the preference pairs agents' replies make


def _aware(when: datetime | None) -> datetime | None:
    return when if when is None or when.tzinfo else when.replace(tzinfo=UTC)


async def _fresh(session: AsyncSession, handoff_id: int) -> Handoff | None:
    stmt = select(Handoff).where(Handoff.id == handoff_id)
    return (await session.execute(stmt.execution_options(populate_existing=True))).scalar()


async def open_for(session: AsyncSession, *, conversation_id: int) -> Handoff | None:
    """The conversation's open hand-off, if any (one indexed read on every turn)."""
    stmt = select(Handoff).where(Handoff.conversation_id == conversation_id,
                                 Handoff.status.in_(OPEN))
    return (await session.execute(stmt.execution_options(populate_existing=True))).scalar()


async def open_in(session: AsyncSession, *, conversation_id: int | None, channel: str,
                  chat_id: str, user_id: str) -> Handoff | None:
    """The open hand-off of the conversation, or else of this user in this chat (a new
    top-level message in a Slack DM is a new thread, still with the person): one read."""
    mine = (Handoff.channel == channel) & (Handoff.chat_id == chat_id) & (
        Handoff.user_id == user_id)
    where = mine if conversation_id is None else (
        (Handoff.conversation_id == conversation_id) | mine)
    stmt = (select(Handoff).where(Handoff.status.in_(OPEN), where)
            .order_by((Handoff.conversation_id == (conversation_id or 0)).desc(),
                      Handoff.id.desc()).limit(1))
    return (await session.execute(stmt.execution_options(populate_existing=True))).scalar()


async def latest_in(session: AsyncSession, *, channel: str, chat_id: str, user_id: str
                    ) -> Handoff | None:
    """The newest hand-off of this user in this chat, open or not (the web chat's poll)."""
    stmt = (select(Handoff).where(Handoff.channel == channel, Handoff.chat_id == chat_id,
                                  Handoff.user_id == user_id)
            .order_by(Handoff.id.desc()).limit(1))
    return (await session.execute(stmt.execution_options(populate_existing=True))).scalar()


async def get(session: AsyncSession, *, handoff_id: int) -> Handoff | None:
    return await _fresh(session, handoff_id)


async def by_agent_ref(session: AsyncSession, *, agent_chat: str, agent_ref: str
                       ) -> Handoff | None:
    """The newest hand-off whose agents' side is `agent_ref` in `agent_chat`."""
    stmt = (select(Handoff).where(Handoff.agent_chat == agent_chat,
                                  Handoff.agent_ref == agent_ref)
            .order_by(Handoff.id.desc()).limit(1))
    return (await session.execute(stmt.execution_options(populate_existing=True))).scalar()


async def request(session: AsyncSession, *, conversation_id: int, channel: str, chat_id: str,
                  thread_id: str, user_id: str, reason: str) -> tuple[Handoff, bool]:
    """Open a hand-off for the conversation (the bot's last answer in it becomes the pair's
    rejected side); (the open one, False) if it has one already."""
    last = (await session.execute(
        select(Message.id, Message.adapter).where(
            Message.conversation_id == conversation_id, Message.role == Role.ASSISTANT,
            Message.status == "ok").order_by(Message.id.desc()).limit(1))).first()
    row = Handoff(conversation_id=conversation_id, channel=channel, chat_id=chat_id,
                  thread_id=thread_id, user_id=user_id, reason=reason,
                  answer_id=last[0] if last else None, adapter=last[1] if last else None)
    session.add(row)
    try:
        await session.commit()
    except IntegrityError:
        await session.rollback()
        existing = await open_for(session, conversation_id=conversation_id)
        if existing is None:
            raise
        return existing, False
    await session.refresh(row)
    return row, True


async def set_agent_ref(session: AsyncSession, *, handoff_id: int, agent_chat: str,
                        agent_ref: str) -> None:
    await session.execute(update(Handoff).where(Handoff.id == handoff_id)
                          .values(agent_chat=agent_chat, agent_ref=agent_ref))
    await session.commit()


async def set_error(session: AsyncSession, *, handoff_id: int, error: str) -> None:
    await session.execute(update(Handoff).where(Handoff.id == handoff_id)
                          .values(error=error[:64]))
    await session.commit()


async def take(session: AsyncSession, *, handoff_id: int, agent_id: str,
               agent_name: str) -> Handoff | None:
    """`agent_id` takes the hand-off over (from waiting, or from another agent); None if it is
    closed. The returned row says who holds it."""
    now = utcnow()
    await session.execute(
        update(Handoff).where(Handoff.id == handoff_id, Handoff.status.in_(OPEN),
                              Handoff.agent_id.is_distinct_from(agent_id))
        .values(status=HandoffStatus.HELD, agent_id=agent_id, agent_name=agent_name[:128],
                taken_at=now, last_agent_at=now))
    await session.commit()
    row = await _fresh(session, handoff_id)
    return row if row is not None and row.status != HandoffStatus.CLOSED else None


async def close(session: AsyncSession, *, handoff_id: int, by: str) -> bool:
    """Hand the conversation back to the bot; False if it was closed already."""
    done = await session.execute(
        update(Handoff).where(Handoff.id == handoff_id, Handoff.status.in_(OPEN))
        .values(status=HandoffStatus.CLOSED, closed_at=utcnow(), closed_by=by[:160]))
    await session.commit()
    return bool(done.rowcount)  # type: ignore[attr-defined]


async def add_message(session: AsyncSession, *, handoff_id: int, direction: str, author_id: str,
                      text: str, delivery: tuple[str, str] | None) -> tuple[int, bool] | None:
    """Store a message to relay, with its platform delivery in one transaction: (its id, True);
    for a delivery seen before, (the message it stored, False) if that one is not relayed
    yet, else None."""
    if delivery is not None:
        event = await record_event(session, channel=delivery[0], event_id=delivery[1],
                                   commit=False)
        if event is None:
            await session.rollback()
            stored = await _by_delivery(session, delivery)
            return (stored, False) if stored is not None else None
    row = HandoffMessage(handoff_id=handoff_id, direction=direction, author_id=author_id,
                         text=text)
    session.add(row)
    await session.flush()
    if delivery is not None:
        await session.execute(update(InboundEvent).where(
            InboundEvent.channel == delivery[0], InboundEvent.external_event_id == delivery[1])
            .values(payload={"handoff_message": row.id}))
    await session.commit()
    assert row.id is not None
    return row.id, True


async def _by_delivery(session: AsyncSession, delivery: tuple[str, str]) -> int | None:
    payload = (await session.execute(select(InboundEvent.payload).where(
        InboundEvent.channel == delivery[0],
        InboundEvent.external_event_id == delivery[1]))).scalar()
    mid = (payload or {}).get("handoff_message") if isinstance(payload, dict) else None
    if mid is None:
        return None
    delivered = (await session.execute(select(HandoffMessage.delivered_at).where(
        HandoffMessage.id == mid))).first()
    return int(mid) if delivered is not None and delivered[0] is None else None


async def mark_message(session: AsyncSession, *, message_id: int, error: str | None = None
                       ) -> None:
    """A relayed message arrived (or failed for good with `error`)."""
    values = {"error": error[:64]} if error else {"delivered_at": utcnow(), "error": None}
    await session.execute(update(HandoffMessage).where(HandoffMessage.id == message_id)
                          .values(**values))
    await session.commit()


async def undelivered(session: AsyncSession, *, handoff_id: int, direction: str
                      ) -> list[HandoffMessage]:
    stmt = (select(HandoffMessage).where(HandoffMessage.handoff_id == handoff_id,
                                         HandoffMessage.direction == direction,
                                         HandoffMessage.delivered_at.is_(None))
            .order_by(HandoffMessage.id))
    return list((await session.execute(stmt)).scalars())


async def messages(session: AsyncSession, *, handoff_id: int) -> list[HandoffMessage]:
    stmt = select(HandoffMessage).where(HandoffMessage.handoff_id == handoff_id).order_by(
        HandoffMessage.id)
    return list((await session.execute(stmt)).scalars())


async def user_wrote(session: AsyncSession, *, handoff_id: int) -> None:
    """The user wrote again after an agent's reply: later agent messages answer something
    else, so they no longer join the preference pair."""
    await session.execute(update(Handoff).where(Handoff.id == handoff_id,
                                                Handoff.last_agent_at.is_not(None),
                                                Handoff.feedback_id.is_not(None))
                          .values(pair_open=False))
    await session.commit()


async def agent_wrote(session: AsyncSession, *, handoff: Handoff, agent_id: str, text: str,
                      trusted: bool) -> int | None:
    """Note an agent's message; while the pair is open, it joins the preference pair on the
    bot's last answer (a correction of source `handoff`: chosen = the agent's words,
    rejected = the bot's answer), trusted or awaiting review like any correction. Returns
    the pair's feedback id, if any."""
    await session.execute(update(Handoff).where(Handoff.id == handoff.id)
                          .values(last_agent_at=utcnow()))
    await session.commit()
    if handoff.answer_id is None or not handoff.pair_open or not text.strip():
        return handoff.feedback_id
    chosen = text
    if handoff.feedback_id is not None:
        prior = (await session.execute(select(Feedback.correction).where(
            Feedback.id == handoff.feedback_id))).scalar()
        if prior:
            chosen = f"{prior}\n{text}"
    stored = await feedback_store.record_correction(
        session, answer_id=handoff.answer_id, voter_id=agent_id, text=chosen, source=SOURCE,
        trusted=trusted)
    fid = stored.feedback.id
    await session.execute(update(Handoff).where(Handoff.id == handoff.id)
                          .values(feedback_id=fid))
    await session.commit()
    return fid


async def downvotes(session: AsyncSession, *, answer_id: int, voter_id: str
                    ) -> tuple[Conversation, int] | None:
    """The conversation of the answer, and how many of its answers `voter_id` has voted 👎."""
    conv = (await session.execute(select(Conversation).join(
        Message, Message.conversation_id == Conversation.id).where(
        Message.id == answer_id))).scalar()
    if conv is None:
        return None
    n = (await session.execute(select(func.count()).select_from(Feedback).join(
        Message, Message.id == Feedback.answer_id).where(
        Message.conversation_id == conv.id, Feedback.voter_id == voter_id,
        Feedback.rating < 0))).scalar()
    return conv, int(n or 0)


async def claim_idle(session: AsyncSession, *, channel: str, idle_s: float
                     ) -> list[Handoff]:
    """Close the held hand-offs of `channel` with no agent message for `idle_s` (each by one
    conditional update: of two replicas, one closes it) and return them."""
    cutoff = utcnow() - timedelta(seconds=idle_s)
    stale = (await session.execute(select(Handoff.id).where(
        Handoff.channel == channel, Handoff.status == HandoffStatus.HELD,
        func.coalesce(Handoff.last_agent_at, Handoff.taken_at) < cutoff))).scalars().all()
    won = []
    for hid in stale:
        done = await session.execute(update(Handoff).where(
            Handoff.id == hid, Handoff.status == HandoffStatus.HELD,
            func.coalesce(Handoff.last_agent_at, Handoff.taken_at) < cutoff).values(
            status=HandoffStatus.CLOSED, closed_at=utcnow(), closed_by="system:idle"))
        await session.commit()
        if done.rowcount:  # type: ignore[attr-defined]
            won.append(hid)
    return [h for hid in won if (h := await _fresh(session, hid)) is not None]


async def claim_waiting(session: AsyncSession, *, channel: str, wait_s: float
                        ) -> list[Handoff]:
    """The hand-offs of `channel` waiting longer than `wait_s` with no apology yet, each
    claimed (marked apologised) by one replica."""
    cutoff = utcnow() - timedelta(seconds=wait_s)
    late = (await session.execute(select(Handoff.id).where(
        Handoff.channel == channel, Handoff.status == HandoffStatus.WAITING,
        Handoff.apologised_at.is_(None), Handoff.requested_at < cutoff))).scalars().all()
    won = []
    for hid in late:
        done = await session.execute(update(Handoff).where(
            Handoff.id == hid, Handoff.status == HandoffStatus.WAITING,
            Handoff.apologised_at.is_(None)).values(apologised_at=utcnow()))
        await session.commit()
        if done.rowcount:  # type: ignore[attr-defined]
            won.append(hid)
    return [h for hid in won if (h := await _fresh(session, hid)) is not None]


async def listing(session: AsyncSession, *, statuses: Sequence[str] = OPEN, limit: int = 100
                  ) -> list[Handoff]:
    """Hand-offs by status, oldest request first (the console's inbox)."""
    stmt = (select(Handoff).where(Handoff.status.in_(list(statuses)))
            .order_by(Handoff.requested_at).limit(limit))
    return list((await session.execute(stmt)).scalars())


async def transcript(session: AsyncSession, *, conversation_id: int, limit: int = 10
                     ) -> list[tuple[str, str]]:
    """The conversation's last `limit` messages as (role, text), oldest first."""
    stmt = (select(Message.role, Message.text).where(
        Message.conversation_id == conversation_id, Message.text != "")
        .order_by(Message.id.desc()).limit(limit))
    return [(r, t) for r, t in reversed((await session.execute(stmt)).all())]


async def rates(session: AsyncSession, *, since: datetime) -> dict[str | None, tuple[int, int]]:
    """adapter (None: the base model) -> (hand-offs after its answers, its answers) since
    `since`: the hand-off rate per adapter, as the canary compares it."""
    answers = dict((await session.execute(
        select(Message.adapter, func.count()).where(
            Message.role == Role.ASSISTANT, Message.status == "ok", Message.created_at >= since)
        .group_by(Message.adapter))).all())
    handed = dict((await session.execute(
        select(Handoff.adapter, func.count()).where(
            Handoff.answer_id.is_not(None), Handoff.requested_at >= since)
        .group_by(Handoff.adapter))).all())
    return {a: (int(handed.get(a, 0)), int(n)) for a, n in answers.items()}


def aware(when: datetime | None) -> datetime | None:
    """SQLite's naive timestamps as the UTC they are."""
    return _aware(when)
