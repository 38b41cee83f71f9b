"""The one-trip aiosqlite cursor (storage.sqlite_driver) behaves as SQLAlchemy's own."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine

from storage.db import make_engine
from storage.sqlite_driver import OneTripCursor


async def test_rows_counts_ids_and_errors_as_sqlalchemy_reports_them(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path}/t.db")
    try:
        async with engine.begin() as c:
            await c.execute(text("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT UNIQUE)"))
            raw = await c.get_raw_connection()
            assert isinstance(raw.dbapi_connection.cursor(), OneTripCursor)
            inserted = await c.execute(text("INSERT INTO t (v) VALUES ('a')"))
            assert inserted.lastrowid == 1 and inserted.rowcount == 1
            many = await c.execute(text("INSERT INTO t (v) VALUES (:v)"),
                                   [{"v": "b"}, {"v": "c"}, {"v": "d"}])
            assert many.rowcount == 3
            returned = await c.execute(text("UPDATE t SET v = v || '!' WHERE id > 2 "
                                            "RETURNING id"))
            assert sorted(returned.scalars()) == [3, 4]
            updated = await c.execute(text("UPDATE t SET v = v WHERE id <= 2"))
            assert updated.rowcount == 2
            rows = (await c.execute(text("SELECT id, v FROM t ORDER BY id"))).all()
            assert [tuple(r) for r in rows] == [(1, "a"), (2, "b"), (3, "c!"), (4, "d!")]
            assert (await c.execute(text("SELECT v FROM t WHERE id = 99"))).first() is None
            streamed = await c.stream(text("SELECT id FROM t ORDER BY id"))  # server side
            assert [r[0] async for r in streamed] == [1, 2, 3, 4]
        async with engine.connect() as c:
            with pytest.raises(IntegrityError):
                await c.execute(text("INSERT INTO t (v) VALUES ('a')"))
            await c.rollback()
            with pytest.raises(OperationalError):
                await c.execute(text("SELECT nothing FROM nowhere"))
            await c.rollback()
            assert (await c.execute(text("SELECT count(*) FROM t"))).scalar() == 4
    finally:
        await engine.dispose()


async def test_a_rolled_back_transaction_leaves_nothing(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path}/t.db")
    try:
        async with engine.begin() as c:
            await c.execute(text("CREATE TABLE t (id INTEGER PRIMARY KEY)"))
        async with engine.connect() as c:
            await c.execute(text("INSERT INTO t (id) VALUES (1)"))
            await c.rollback()
        async with engine.connect() as c:
            assert (await c.execute(text("SELECT count(*) FROM t"))).scalar() == 0
    finally:
        await engine.dispose()


# -- one writer at a time, on the event loop's thread -----------------------------------------


@contextlib.asynccontextmanager
async def table_engine(path: Path) -> AsyncIterator[AsyncEngine]:
    """An engine on a new SQLite file holding table t (id, unique v)."""
    engine = make_engine(f"sqlite:///{path}")
    try:
        async with engine.begin() as c:
            await c.execute(text("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT UNIQUE)"))
        yield engine
    finally:
        await engine.dispose()


async def test_concurrent_write_transactions_in_one_process_all_land(tmp_path: Path) -> None:
    async with table_engine(tmp_path / "t.db") as engine:

        async def write(i: int) -> None:
            async with engine.begin() as c:  # two statements with other turns between them
                await c.execute(text("INSERT INTO t (v) VALUES (:v)"), {"v": f"a{i}"})
                await asyncio.sleep(0)
                await c.execute(text("INSERT INTO t (v) VALUES (:v)"), {"v": f"b{i}"})

        await asyncio.wait_for(asyncio.gather(*(write(i) for i in range(60))), 60)
        async with engine.connect() as c:
            assert (await c.execute(text("SELECT count(*) FROM t"))).scalar() == 120


async def test_a_failed_or_cancelled_writer_lets_the_next_one_write(tmp_path: Path) -> None:
    async with table_engine(tmp_path / "t.db") as engine:
        async with engine.connect() as c:
            await c.execute(text("INSERT INTO t (v) VALUES ('a')"))
            with pytest.raises(IntegrityError):
                await c.execute(text("INSERT INTO t (v) VALUES ('a')"))
            await c.rollback()
        holding = asyncio.Event()

        async def stuck() -> None:
            async with engine.connect() as c:
                await c.execute(text("INSERT INTO t (v) VALUES ('b')"))
                holding.set()
                await asyncio.Event().wait()

        task = asyncio.create_task(stuck())
        await asyncio.wait_for(holding.wait(), 30)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        async with engine.begin() as c:  # not "database is locked" ten seconds later
            await asyncio.wait_for(c.execute(text("INSERT INTO t (v) VALUES ('c')")), 5)
        async with engine.connect() as c:
            rows = (await c.execute(text("SELECT v FROM t ORDER BY v"))).scalars().all()
        assert rows == ["c"]  # 'a' and 'b' were rolled back


async def test_a_task_writing_on_two_connections_fails_as_sqlite_would(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("storage.db.SQLITE_BUSY_TIMEOUT_MS", 300)
    async with table_engine(tmp_path / "t.db") as engine:
        async with engine.connect() as first, engine.connect() as second:
            await first.execute(text("INSERT INTO t (v) VALUES ('a')"))
            with pytest.raises(OperationalError, match="database is locked"):
                await asyncio.wait_for(second.execute(text("INSERT INTO t (v) VALUES ('b')")),
                                       10)
            await second.rollback()
            await first.commit()


HOLD_LOCK = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
conn.execute("INSERT INTO t (v) VALUES ('other process')")
print("holding", flush=True)
time.sleep(float(sys.argv[2]))
conn.execute("COMMIT")
"""


async def test_a_write_waits_for_another_process_without_blocking_the_loop(
        tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    async with table_engine(path) as engine:
        other = await asyncio.create_subprocess_exec(
            sys.executable, "-c", HOLD_LOCK, str(path), "1.5", stdout=asyncio.subprocess.PIPE)
        assert other.stdout is not None
        assert await asyncio.wait_for(other.stdout.readline(), 30) == b"holding\n"
        gaps: list[float] = []

        async def ticker() -> None:
            last = time.monotonic()
            while True:
                await asyncio.sleep(0.02)
                now = time.monotonic()
                gaps.append(now - last)
                last = now

        ticking = asyncio.create_task(ticker())
        started = time.monotonic()
        async with engine.begin() as c:
            await c.execute(text("INSERT INTO t (v) VALUES ('this process')"))
        waited = time.monotonic() - started
        ticking.cancel()
        await other.wait()
        assert other.returncode == 0
        assert waited > 0.5  # it did wait for the other process's transaction
        assert max(gaps) < 0.5  # in SQLite's busy handler on the thread, not on the loop
        async with engine.connect() as c:
            rows = (await c.execute(text("SELECT v FROM t ORDER BY id"))).scalars().all()
        assert rows == ["other process", "this process"]


async def test_a_failed_autocommit_write_does_not_keep_the_lock(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("storage.db.SQLITE_BUSY_TIMEOUT_MS", 3000)
    async with table_engine(tmp_path / "t.db") as engine:
        async with engine.execution_options(isolation_level="AUTOCOMMIT").connect() as first:
            await first.execute(text("INSERT INTO t (v) VALUES ('a')"))
            with pytest.raises(IntegrityError):
                await first.execute(text("INSERT INTO t (v) VALUES ('a')"))
            started = time.monotonic()
            async with engine.begin() as second:  # while `first` is still checked out
                await second.execute(text("INSERT INTO t (v) VALUES ('b')"))
            assert time.monotonic() - started < 2
