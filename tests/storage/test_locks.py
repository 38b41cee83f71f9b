"""Cluster-wide locks: named leases (SQLite and PostgreSQL), advisory locks (PostgreSQL)."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest

from storage import locks

TTL = timedelta(seconds=1)


async def test_a_lease_has_one_holder_until_it_expires_or_is_released(sessions) -> None:  # type: ignore[no-untyped-def]
    async with sessions() as s:
        assert await locks.acquire_lease(s, name="x", holder="a", ttl=TTL)
        assert not await locks.acquire_lease(s, name="x", holder="b", ttl=TTL)
        assert await locks.acquire_lease(s, name="other", holder="b", ttl=TTL)  # by name
        assert await locks.acquire_lease(s, name="x", holder="a", ttl=TTL)  # renewal
        await locks.release_lease(s, name="x", holder="b")  # not b's: nothing happens
        assert not await locks.acquire_lease(s, name="x", holder="b", ttl=TTL)
        await asyncio.sleep(1.2)  # a stopped renewing
        assert await locks.acquire_lease(s, name="x", holder="b", ttl=TTL)
        await locks.release_lease(s, name="x", holder="b")
        assert await locks.acquire_lease(s, name="x", holder="a", ttl=TTL)


@pytest.mark.parametrize("db_url", [pytest.param("postgres", marks=pytest.mark.postgres)],
                         indirect=True)
async def test_an_advisory_lock_is_held_by_one_connection(sessions) -> None:  # type: ignore[no-untyped-def]
    engine = sessions.kw["bind"]
    async with engine.connect() as a, engine.connect() as b:
        assert await locks.try_advisory_lock(a, key=42)
        assert not await locks.try_advisory_lock(b, key=42)
        await locks.ping(a)
        await locks.advisory_unlock(a, key=42)
        assert await locks.try_advisory_lock(b, key=42)
        await locks.advisory_unlock(b, key=42)
