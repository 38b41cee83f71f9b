"""Async engine and sessions for SQLite (file, WAL, busy timeout) and PostgreSQL (asyncpg)."""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, DisconnectionError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

SQLITE_BUSY_TIMEOUT_MS = 10_000
IDLE_PING_S = 10.0
COMMAND_TIMEOUT_S = 30.0  # a statement running longer fails (PostgreSQL)
CONNECT_TIMEOUT_S = 10.0


# DBAPIError subclasses that mean the statement or the data is wrong: retrying cannot help
_PERMANENT = ("IntegrityError", "ProgrammingError", "DataError", "NotSupportedError")
# the driver's own connection errors, when they reach us unwrapped (asyncpg at connect time)
_DRIVER = {"CannotConnectNowError", "ConnectionDoesNotExistError", "PostgresConnectionError",
           "ConnectionFailureError", "AdminShutdownError", "CrashShutdownError",
           "TooManyConnectionsError", "QueryCanceledError", "InterfaceError"}


def unavailable(exc: BaseException | None) -> bool:
    """True if `exc` (or what caused it) says the database could not be reached or answered:
    refused or dropped connections, timeouts, a server starting up or shutting down. A
    channel keeps such a delivery unconfirmed (or answers 5xx) so the platform sends it again;
    the training loop retries its bookkeeping."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, (OSError, TimeoutError, PoolTimeout, DisconnectionError)):
            return True
        if type(exc).__name__ in _DRIVER and not isinstance(exc, DBAPIError):
            return True
        if isinstance(exc, DBAPIError):
            return exc.connection_invalidated or type(exc).__name__ not in _PERMANENT
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


class DatabaseNotReady(RuntimeError):
    """The database is unreachable or not migrated (storage.migrate.check_ready); the message
    says what to run."""


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


def make_engine(url: str, *, pool_size: int = 40, idle_ping_s: float = IDLE_PING_S,
                command_timeout_s: float | None = COMMAND_TIMEOUT_S,
                connect_timeout_s: float = CONNECT_TIMEOUT_S) -> AsyncEngine:
    """An engine whose statements never hang: on PostgreSQL each has `command_timeout_s`
    (None: no limit, for migrations), connecting has `connect_timeout_s`, and TCP keepalive
    plus a TCP user timeout notice a database host that stopped answering. SQL errors never
    carry the statement's parameters (users' text) into logs.

    Connections are kept once opened, up to `pool_size`, and a turn waits for one beyond
    that: no overflow. An overflow connection is closed when it is given back to a full pool,
    and under a steady load above the pool's size that meant a new connection for about one
    turn in ten on PostgreSQL (a server process, authentication, asyncpg's set-up;
    docs/benchmarks.md, Telegram) and one in four on SQLite (a thread, the file opened, four
    PRAGMAs: SQLAlchemy keeps 5 and opens 10 more by default)."""
    url = normalise_url(url)
    u = make_url(url)
    if u.drivername.startswith("sqlite"):
        if u.database and u.database != ":memory:":
            Path(u.database).parent.mkdir(parents=True, exist_ok=True)
        from storage.sqlite_driver import DBAPI, inline_reads

        engine = create_async_engine(  # writes on the loop's thread, reads one trip to its own
            url, module=DBAPI, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
            hide_parameters=True, pool_size=pool_size, max_overflow=0,
            pool_timeout=connect_timeout_s * 2)
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        event.listen(engine.sync_engine, "before_cursor_execute", inline_reads)
        return engine
    engine = create_async_engine(
        url, pool_size=pool_size, max_overflow=0, hide_parameters=True,
        pool_timeout=connect_timeout_s * 2,
        connect_args={"command_timeout": command_timeout_s, "timeout": connect_timeout_s})
    IdlePing(idle_ping_s).install(engine)
    event.listen(engine.sync_engine, "connect", _keepalive(command_timeout_s or 60.0))
    return engine


def _keepalive(user_timeout_s: float) -> Any:
    """Probe an idle connection after 10 s, every 5 s, 3 times; drop one whose sent data is
    unacknowledged for `user_timeout_s` (Linux): a silent host fails, it does not hang."""

    def on_connect(dbapi_conn: Any, _record: Any) -> None:
        transport = getattr(getattr(dbapi_conn, "_connection", None), "_transport", None)
        sock = transport.get_extra_info("socket") if transport is not None else None
        if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
            return
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for name, value in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3),
                            ("TCP_USER_TIMEOUT", int(user_timeout_s * 1000))):
            if hasattr(socket, name):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)

    return on_connect


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


class IdlePing:
    """Ping a pooled PostgreSQL connection before use only if it sat idle for `idle_s`.

    SQLAlchemy's `pool_pre_ping` pings at every checkout, and with asyncpg a ping is three
    round trips (BEGIN, an empty query, ROLLBACK): 12 of a turn's 28. A connection in steady
    use is known to be alive; one that sat idle may have been dropped (a database restart, an
    idle timeout on the way), and a failed ping makes the pool replace it before anyone
    uses it. A connection that breaks while in use fails that one operation, and SQLAlchemy
    then recycles every connection of the pool.
    """

    def __init__(self, idle_s: float) -> None:
        self.idle_s = idle_s

    def install(self, engine: AsyncEngine) -> None:
        event.listen(engine.sync_engine.pool, "checkin", self._checkin)
        event.listen(engine.sync_engine.pool, "checkout", self._checkout)

    @staticmethod
    def _checkin(_dbapi_conn: Any, record: Any) -> None:
        if record is not None:
            record.info["idle_since"] = time.monotonic()

    def _checkout(self, dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        since = record.info.pop("idle_since", None)
        if since is None or time.monotonic() - since < self.idle_s:
            return  # new, or in use a moment ago
        try:  # runs inside SQLAlchemy's greenlet: the adapted connection awaits the ping
            dbapi_conn.ping()
        except Exception as exc:
            raise DisconnectionError(f"pooled connection failed its idle ping: {exc}") from exc


def session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, class_=AsyncSession, expire_on_commit=False)
