"""What the aggregates' statements share: the executor type, the dialect test, bound values."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from sqlalchemy import bindparam
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession

# The turn path's functions take a plain connection too: no ORM session to set up per turn
Executor = AsyncSession | AsyncConnection


def is_postgres(session: Executor | AsyncEngine) -> bool:
    bind = session.get_bind() if isinstance(session, AsyncSession) else session
    return bind.dialect.name == "postgresql"


def turn_engine(engine: AsyncEngine) -> AsyncEngine:
    """The engine for the turn path (`storage.conversations`): on PostgreSQL, where each of
    its writes is a single statement, an autocommit one, so BEGIN and COMMIT cost no round
    trips; on SQLite one whose reads (indexed lookups of a few rows) run on the event loop's
    thread, as writes do (`storage.sqlite_driver`)."""
    if is_postgres(engine):
        return engine.execution_options(isolation_level="AUTOCOMMIT")
    from storage.sqlite_driver import INLINE_READS

    return engine.execution_options(**{INLINE_READS: True})


def bound_values(table: Any, prefix: str, columns: Collection[str]) -> dict[str, Any]:
    """Bind parameters named `prefix + column` for these columns (one statement, two rows)."""
    return {c: bindparam(prefix + c, type_=table.c[c].type) for c in columns}


def prefixed(prefix: str, values: dict[str, Any]) -> dict[str, Any]:
    return {prefix + k: v for k, v in values.items()}


def upsert(session: Executor) -> Any:
    """The dialect's INSERT, which has ON CONFLICT on both SQLite and PostgreSQL."""
    return postgresql.insert if is_postgres(session) else sqlite.insert
