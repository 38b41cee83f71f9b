"""Inbound events (the idempotency record of every platform delivery) and their leases."""

from __future__ import annotations

from collections.abc import Collection
from datetime import timedelta
from typing import Any

from sqlalchemy import Interval, bindparam, func, insert, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from storage.models import EventStatus, InboundEvent, utcnow
from storage.sql import Executor, is_postgres, upsert

events = InboundEvent.__table__  # type: ignore[attr-defined]
INSERT_EVENT = insert(events).returning(events.c.id)
SET_EVENT_STATUS = (update(events).where(events.c.id == bindparam("event_row"))
                    .values(status=bindparam("new_status")))
OPEN = (EventStatus.RECEIVED, EventStatus.ANSWERED)  # a turn still to answer or to deliver
# renewing leases runs on every turn (`Leases.confirm`): built once, not per call
_HELD = (events.c.id.in_(bindparam("lease_events", expanding=True)),
         events.c.owner == bindparam("lease_owner"))
_RENEW_UNTIL = (update(events).where(*_HELD).returning(events.c.id)
                .values(lease_until=bindparam("new_lease_until",
                                              type_=events.c.lease_until.type)))
_RENEW_FOR_PG = (update(events).where(*_HELD).returning(events.c.id)  # the database's clock
                 .values(lease_until=func.now() + bindparam("lease_for", type_=Interval())))


async def record_event(
    session: Executor, *, channel: str, event_id: str, payload: dict[str, Any] | None = None,
    commit: bool = True,
) -> int | None:
    """Record a delivery that starts no turn (a command, a vote); None if already seen.

    With `commit=False` it joins the caller's transaction (a vote and its delivery record
    are one): a duplicate inserts nothing and does not abort the transaction."""
    stmt = (upsert(session)(events)
            .values(channel=channel, external_event_id=event_id, payload=payload,
                    status=EventStatus.DONE, received_at=utcnow())
            .on_conflict_do_nothing(index_elements=["channel", "external_event_id"])
            .returning(events.c.id))
    row = (await session.execute(stmt)).scalar()
    if commit:
        await session.commit()
    return None if row is None else int(row)


async def pending_events(session: AsyncSession, *, channel: str) -> list[InboundEvent]:
    """Events whose turn never finished or whose answer was never delivered, and that no live
    process holds (no lease, or an expired one): to resume, after `claim_event`."""
    stmt = (select(InboundEvent).where(InboundEvent.channel == channel,
                                       InboundEvent.status.in_(OPEN), _free(session))
            .order_by(InboundEvent.id))
    return list((await session.execute(stmt)).scalars())


def db_now(session: Executor) -> Any:
    """Now by the database's clock on PostgreSQL (replicas' clocks may differ; the leases
    they compare must not), by this host's on SQLite (one host)."""
    return func.now() if is_postgres(session) else utcnow()


def lease_end(session: Executor, lease_s: float) -> Any:
    return db_now(session) + timedelta(seconds=lease_s)


def _free(session: Executor) -> Any:
    """No process holds the event: no lease, or one that has run out."""
    return or_(events.c.lease_until.is_(None), events.c.lease_until < db_now(session))


async def claim_event(session: AsyncSession, *, event_id: int, owner: str,
                      lease_s: float) -> bool:
    """Take an open event that no live process holds (counting the attempt), for `lease_s`
    by the database's clock; False if another took it first."""
    result = await session.execute(
        update(events).where(events.c.id == event_id, events.c.status.in_(OPEN),
                             _free(session))
        .values(owner=owner, lease_until=lease_end(session, lease_s),
                attempts=events.c.attempts + 1))
    await session.commit()
    return result.rowcount == 1  # type: ignore[attr-defined]


async def note_shown(session: AsyncSession, *, event_id: int, ref: str) -> None:
    """Remember the platform message showing this event's answer while it streams."""
    await session.execute(update(events).where(events.c.id == event_id).values(shown_ref=ref))
    await session.commit()


async def renew_leases(session: Executor, *, event_ids: Collection[int], owner: str,
                       lease_s: float | None, commit: bool = True) -> set[int]:
    """Extend by `lease_s` from the database's now (or, with None, give up) the leases on
    these events that `owner` still holds; returns their ids. One missing was taken over by
    another process (this one stalled past its lease): its turn must stop. `commit=False`
    leaves the renewal in the caller's transaction (the rows stay locked until it ends)."""
    if not event_ids:
        return set()
    held = {"lease_events": list(event_ids), "lease_owner": owner}
    if lease_s is None:
        stmt, values = _RENEW_UNTIL, {"new_lease_until": None}
    elif is_postgres(session):
        stmt, values = _RENEW_FOR_PG, {"lease_for": timedelta(seconds=lease_s)}
    else:
        stmt, values = _RENEW_UNTIL, {"new_lease_until": lease_end(session, lease_s)}
    result = await session.execute(stmt, held | values)
    renewed = {int(i) for i in result.scalars()}
    if commit:
        await session.commit()
    return renewed
