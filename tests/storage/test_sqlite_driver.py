"""The one-trip aiosqlite cursor (storage.sqlite_driver) behaves as SQLAlchemy's own."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError, OperationalError

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
