"""Engine behaviour on PostgreSQL: a pooled connection dropped while idle is replaced."""

from __future__ import annotations

import asyncpg
import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from storage.db import make_engine
from tests.conftest import PG_URL

PID = text("SELECT pg_backend_pid()")


async def _drop(pid: int) -> None:
    admin = await asyncpg.connect(PG_URL)
    try:  # waits (up to 5 s) until the backend has gone
        assert await admin.fetchval("SELECT pg_terminate_backend($1, 5000)", pid)
    finally:
        await admin.close()


@pytest.mark.postgres
async def test_a_connection_dropped_while_idle_is_replaced_before_use() -> None:
    engine = make_engine(PG_URL, pool_size=1, idle_ping_s=0.0)  # every reuse counts as idle
    try:
        async with engine.connect() as conn:
            pid = (await conn.execute(PID)).scalar_one()
        await _drop(pid)  # e.g. a database restart while the gateway was quiet
        async with engine.connect() as conn:
            assert (await conn.execute(PID)).scalar_one() != pid
    finally:
        await engine.dispose()


@pytest.mark.postgres
async def test_a_connection_in_steady_use_is_not_pinged_and_one_failure_recycles_it() -> None:
    engine = make_engine(PG_URL, pool_size=1, idle_ping_s=3600.0)
    try:
        async with engine.connect() as conn:
            pid = (await conn.execute(PID)).scalar_one()
        await _drop(pid)
        with pytest.raises(DBAPIError):  # no ping: the dead connection is used, once
            async with engine.connect() as conn:
                await conn.execute(PID)
        async with engine.connect() as conn:
            assert (await conn.execute(PID)).scalar_one() != pid
    finally:
        await engine.dispose()
