"""Async engine and sessions for SQLite (file, WAL, busy timeout) and PostgreSQL (asyncpg)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError, ProgrammingError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

SQLITE_BUSY_TIMEOUT_MS = 10_000


class DatabaseNotReady(RuntimeError):
    """The database is unreachable or not migrated; the message says what to run."""


def normalise_url(url: str) -> str:
    """Accept plain `sqlite:///` and `postgresql://` URLs and pick the async drivers."""
    u = make_url(url)
    if u.drivername in ("sqlite", "sqlite+pysqlite"):
        u = u.set(drivername="sqlite+aiosqlite")
    elif u.drivername in ("postgresql", "postgres", "postgresql+psycopg2"):
        u = u.set(drivername="postgresql+asyncpg")
    return u.render_as_string(hide_password=False)


def redacted(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)


def make_engine(url: str, *, pool_size: int = 20) -> AsyncEngine:
    url = normalise_url(url)
    u = make_url(url)
    if u.drivername.startswith("sqlite"):
        if u.database and u.database != ":memory:":
            Path(u.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(
            url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}
        )
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine
    return create_async_engine(url, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, class_=AsyncSession, expire_on_commit=False)


async def check_ready(engine: AsyncEngine) -> None:
    """Raise DatabaseNotReady unless the database answers and is at the latest revision."""
    from storage.migrate import head_revision

    where = redacted(str(engine.url))
    try:
        async with engine.connect() as conn:
            current = (await conn.execute(text("SELECT version_num FROM alembic_version"))).scalar()
    except (OperationalError, ProgrammingError) as exc:
        if _is_missing_table(exc):
            raise DatabaseNotReady(
                f"database {where} is not migrated: run `chatloop db upgrade`"
            ) from exc
        raise DatabaseNotReady(f"database {where} is unreachable: {_first_line(exc)}") from exc
    except OSError as exc:
        raise DatabaseNotReady(f"database {where} is unreachable: {exc}") from exc
    if current != head_revision():
        raise DatabaseNotReady(
            f"database {where} is at revision {current}, not {head_revision()}: "
            "run `chatloop db upgrade`"
        )


def _is_missing_table(exc: Exception) -> bool:
    orig = getattr(exc, "orig", None)
    name = type(orig).__name__ if orig is not None else ""
    return name == "UndefinedTableError" or "no such table" in str(orig)


def _first_line(exc: Exception) -> str:
    orig = getattr(exc, "orig", exc)
    return str(orig).strip().splitlines()[0] if str(orig).strip() else type(orig).__name__
