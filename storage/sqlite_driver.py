"""SQLite through aiosqlite: writes on the event loop's thread, one writer at a time; reads
one trip to the connection's thread per statement.

aiosqlite runs each connection on a thread of its own, and SQLAlchemy's adapter goes there
three or four times a statement: to create a cursor, to execute, to fetch the rows, to close
the cursor. Each trip is a queue hand-off and an event-loop wake-up (about 30 µs of CPU; a
`SELECT 1` costs 120 µs through the adapter against 16 µs through SQLAlchemy's synchronous
pysqlite). `OneTripCursor` does the four in one function on the connection's thread and
keeps what the finished cursor leaves (description, rowcount, lastrowid, the rows).
`make_engine` passes `DBAPI` as the engine's `module`; everything else (the pool,
server-side cursors, error translation) is SQLAlchemy's aiosqlite dialect unchanged.

Writes run on the event loop's own thread, one writer at a time per database file in a
process. SQLite lets one connection write at a time, from its first writing statement to its
commit. With every statement a trip to a thread, that span was several trips long, each a
wait for the thread and then for the GIL, while other connections that wanted to write slept
in SQLite's busy handler (1, 2, 5, 10 ... 100 ms between tries): at 200 concurrent turns,
four tenths of the connection threads' time. Now a connection takes its file's
`asyncio.Lock` (queued on the event loop, never sleeping in SQLite) before its first writing
statement, runs that statement, the rest of its transaction and the commit right away on the
loop's thread (a few tens of microseconds each), and gives the lock back when the
transaction ends. A first write that finds another process writing (SQLite answers busy at
once: the busy handler is off for that try) goes to the connection's thread and waits there
as before. Reads (SELECT, PRAGMA, EXPLAIN) outside a write stay on the connection's thread,
beside the writer (WAL), except on connections with the execution option `INLINE_READS`
(`storage.sql.turn_engine`: the turn path's reads are indexed lookups of a few rows), where a
trip to the thread cost more than the read: waiting for the GIL while the event loop ran other
turns, a read took 14 ms at 200 concurrent turns. A long write (erasing a heavy user's
history) pauses the event loop for its length, as it would have held every other writer back
anyway. A writer that waits longer than the busy timeout for the lock fails as SQLite would
("database is locked").
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import sqlite3
import weakref
from dataclasses import dataclass
from typing import Any

import aiosqlite
from sqlalchemy.dialects.sqlite.aiosqlite import (
    AsyncAdapt_aiosqlite_connection,
    AsyncAdapt_aiosqlite_cursor,
    AsyncAdapt_aiosqlite_dbapi,
)
from sqlalchemy.util import EMPTY_DICT, await_


@dataclass(frozen=True, slots=True)
class _Finished:
    """What a sqlite3 cursor leaves once its statement ran and its rows were fetched."""

    description: Any
    rowcount: int
    lastrowid: int | None
    arraysize: int = 1


_NOTHING_YET = _Finished(None, -1, None)


_READS = ("SELECT", "PRAGMA", "EXPLAIN")
INLINE_READS = "chatloop_sqlite_inline_reads"  # execution option: reads on the loop's thread
_BUSY = (5, 6)  # SQLITE_BUSY, SQLITE_LOCKED: another connection holds the lock

Outcome = tuple[_Finished, list[Any], bool]


def _writes(operation: str) -> bool:
    """Whether a statement may write (take SQLite's write lock): all but plain reads."""
    return not operation.lstrip()[:7].upper().startswith(_READS)


def _run(conn: sqlite3.Connection, operation: str, parameters: Any, many: bool) -> Outcome:
    """The statement, its rows, the cursor closed, and whether a transaction is open after
    it."""
    cursor = conn.cursor()
    try:
        if many:
            cursor.executemany(operation, parameters)
        elif parameters is None:
            cursor.execute(operation)
        else:
            cursor.execute(operation, parameters)
        rows = cursor.fetchall() if cursor.description else []
        return _Finished(cursor.description, cursor.rowcount, cursor.lastrowid,
                         cursor.arraysize), rows, conn.in_transaction
    finally:
        cursor.close()


def _try_first_write(conn: sqlite3.Connection, operation: str, parameters: Any, many: bool,
                     busy_ms: int) -> Outcome | None:
    """A transaction's first write, without waiting: None if another process holds the
    file's write lock (the empty transaction is rolled back)."""
    conn.execute("PRAGMA busy_timeout=0")
    try:
        return _run(conn, operation, parameters, many)
    except sqlite3.OperationalError as exc:
        if exc.sqlite_errorcode & 0xFF not in _BUSY:
            raise
        if conn.in_transaction:
            conn.rollback()
        return None
    finally:
        conn.execute(f"PRAGMA busy_timeout={busy_ms}")


class _Writers:
    """The write lock of each database file, per event loop (see the module docstring)."""

    def __init__(self) -> None:
        self._locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop,
                                               dict[str, asyncio.Lock]] = (
            weakref.WeakKeyDictionary())

    def lock(self, database: str) -> asyncio.Lock:
        by_file = self._locks.setdefault(asyncio.get_running_loop(), {})
        return by_file.setdefault(database, asyncio.Lock())


def inline_reads(_conn: Any, cursor: Any, _statement: str, _parameters: Any, context: Any,
                 _many: bool) -> None:
    """before_cursor_execute: a statement from a connection with `INLINE_READS` reads on the
    event loop's thread."""
    if context is not None and context.execution_options.get(INLINE_READS):
        cursor._inline = True


class OneTripCursor(AsyncAdapt_aiosqlite_cursor):
    __slots__ = ("_inline",)

    def __init__(self, adapt_connection: Any) -> None:  # no trip: nothing opened yet
        self._inline = False
        self._adapt_connection = adapt_connection
        self._connection = adapt_connection._connection
        self._cursor = _NOTHING_YET  # type: ignore[assignment]
        self._soft_closed_memoized = EMPTY_DICT
        self._rows = collections.deque()

    async def _execute_async(self, operation: Any, parameters: Any) -> Any:
        await self._one_trip(operation, parameters, many=False)

    async def _executemany_async(self, operation: Any, seq_of_parameters: Any) -> Any:
        await self._one_trip(operation, seq_of_parameters, many=True)

    async def _one_trip(self, operation: Any, parameters: Any, *, many: bool) -> None:
        adapted = self._adapt_connection
        conn = adapted._connection
        writes = _writes(operation)
        try:
            # in our write transaction (no one else's lock to wait for), or a read marked
            # INLINE_READS: here
            if adapted._writer is not None or (self._inline and not writes):
                outcome = _run(conn._conn, operation, parameters, many)
            elif writes:
                await adapted._start_writing()
                outcome = _try_first_write(conn._conn, operation, parameters, many,
                                           adapted._busy_ms)
                if outcome is None:  # another process writes: wait for it on the thread
                    outcome = await adapted._on_thread(_run, operation, parameters, many)
            else:
                outcome = await adapted._on_thread(_run, operation, parameters, many)
        except Exception:
            adapted._failed()
            raise
        finished, rows, in_transaction = outcome
        if not in_transaction:  # autocommit, or nothing written: no transaction to hold
            adapted._stop_writing()
        self._cursor = finished  # type: ignore[assignment]
        self._rows = collections.deque(rows)

    async def _async_soft_close(self) -> None:
        return None  # the sqlite3 cursor is closed already; the rows stay for the result

    def close(self) -> None:
        self._rows.clear()


class _Connection(AsyncAdapt_aiosqlite_connection):
    """aiosqlite's adapted connection; holds its file's write lock while it writes, and
    commits and rolls back on the event loop's thread (see the module docstring)."""

    __slots__ = ("_database", "_writer", "_busy_ms", "_trips")
    _cursor_cls = OneTripCursor

    def __init__(self, dbapi: Any, connection: Any, database: str, busy_ms: int) -> None:
        super().__init__(dbapi, connection)
        self._database, self._busy_ms = database, busy_ms
        self._writer: asyncio.Lock | None = None  # the file's lock, while this one writes
        self._trips = 0  # statements on the connection's thread not finished yet

    async def _on_thread(self, fn: Any, *args: Any) -> Outcome:
        conn = self._connection
        self._trips += 1

        def run() -> Outcome:
            try:
                return fn(conn._conn, *args)
            finally:
                self._trips -= 1

        async with self._execute_mutex:
            return await conn._execute(run)

    async def _start_writing(self) -> None:
        writer = self.dbapi.writers.lock(self._database)  # the running loop's
        try:
            async with asyncio.timeout(self._busy_ms / 1000):
                await writer.acquire()
        except TimeoutError:
            raise sqlite3.OperationalError("database is locked") from None
        self._writer = writer

    def _failed(self) -> None:
        """After a failed statement the write lock stays only with an open transaction,
        which the caller's rollback ends."""
        with contextlib.suppress(Exception):  # a closed connection: close() gave it back
            if not self._trips and not self._connection._conn.in_transaction:
                self._stop_writing()

    def _stop_writing(self) -> None:
        if self._writer is not None:
            writer, self._writer = self._writer, None
            writer.release()

    def _end(self, how: str) -> None:
        """Commit or roll back: here, unless a statement a cancelled task left on the
        connection's thread is still running (then after it, on that thread)."""
        try:
            if self._trips:
                getattr(super(), how)()
            elif conn := self._connection._connection:
                getattr(conn, how)()  # nothing open: sqlite3 does nothing
        except Exception as error:
            self._handle_exception(error)
        finally:
            self._stop_writing()

    def commit(self) -> None:
        self._end("commit")

    def rollback(self) -> None:
        self._end("rollback")

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._stop_writing()

    def terminate(self) -> None:
        try:
            super().terminate()
        finally:
            self._stop_writing()


class _DBAPI(AsyncAdapt_aiosqlite_dbapi):
    def __init__(self, aiosqlite: Any, sqlite: Any) -> None:
        super().__init__(aiosqlite, sqlite)
        self.writers = _Writers()

    def connect(self, *arg: Any, **kw: Any) -> _Connection:
        database = str(arg[0] if arg else kw.get("database", ""))
        kw["check_same_thread"] = False  # writes run on the event loop's thread
        connection = self.aiosqlite.connect(*arg, **kw)
        connection._thread.daemon = True  # as SQLAlchemy's: never keeps the process alive
        return _Connection(self, await_(connection), database,
                           int(float(kw.get("timeout", 5.0)) * 1000))


DBAPI = _DBAPI(aiosqlite, sqlite3)
