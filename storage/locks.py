"""Cluster-wide locks: named expiring leases (a row; SQLite and PostgreSQL) and PostgreSQL
session-level advisory locks (held by a connection; released by the server if it dies)."""

from __future__ import annotations

import socket
from datetime import timedelta

from sqlalchemy import delete, select, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from storage.models import Lease, utcnow
from storage.sql import upsert


async def acquire_lease(session: AsyncSession, *, name: str, holder: str,
                        ttl: timedelta) -> bool:
    """Take or renew the lease `name` for `ttl` (and commit): True if `holder` holds it now,
    False while another holder's lease has not expired."""
    now = utcnow()
    stmt = upsert(session)(Lease).values(name=name, holder=holder, expires_at=now + ttl)
    stmt = stmt.on_conflict_do_update(
        index_elements=["name"], set_={"holder": holder, "expires_at": now + ttl},
        where=(Lease.holder == holder) | (Lease.expires_at < now))
    await session.execute(stmt)
    await session.commit()
    held = await session.get(Lease, name, populate_existing=True)
    return held is not None and held.holder == holder


async def release_lease(session: AsyncSession, *, name: str, holder: str) -> None:
    """Give up the lease if `holder` holds it (and commit)."""
    await session.execute(delete(Lease).where(Lease.name == name, Lease.holder == holder))
    await session.commit()


async def try_advisory_lock(conn: AsyncConnection, *, key: int) -> bool:
    """Take the advisory lock `key` for this connection's session, without waiting."""
    got = (await conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": key})).scalar()
    await conn.commit()
    return bool(got)


async def advisory_unlock(conn: AsyncConnection, *, key: int) -> None:
    await conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
    await conn.commit()


async def ping(conn: AsyncConnection) -> None:
    """Raises if the connection (and so any advisory lock it holds) is gone."""
    await conn.execute(text("SELECT 1"))


def heartbeat_name(role: str, host: str | None = None) -> str:
    """The heartbeat row of the `role` process (the scheduler) on `host` (default: this one)."""
    return f"heartbeat:{role}:{host or socket.gethostname()}"[:64]


async def beat(session: AsyncSession, *, name: str, holder: str, ttl: timedelta) -> None:
    """Record that `holder` is alive for `ttl` from now under `name` (and commit): a
    heartbeat, taken over from whoever wrote it before (a restarted process)."""
    now = utcnow()
    stmt = upsert(session)(Lease).values(name=name, holder=holder, expires_at=now + ttl)
    stmt = stmt.on_conflict_do_update(index_elements=["name"],
                                      set_={"holder": holder, "expires_at": now + ttl})
    await session.execute(stmt)
    await session.commit()


async def alive(session: AsyncSession, *, name: str) -> bool:
    """Whether the heartbeat (or lease) `name` was renewed within its time to live."""
    found = await session.execute(select(Lease.name).where(Lease.name == name,
                                                           Lease.expires_at > utcnow()))
    return found.first() is not None
