"""Which failures are the database's (or the network's) and worth retrying, not the input's."""

from __future__ import annotations

from sqlalchemy.exc import DBAPIError, DisconnectionError
from sqlalchemy.exc import TimeoutError as PoolTimeout

# DBAPIError subclasses that mean the statement or the data is wrong: retrying cannot help
_PERMANENT = ("IntegrityError", "ProgrammingError", "DataError", "NotSupportedError")
# the driver's own connection errors, when they reach us unwrapped (asyncpg at connect time)
_DRIVER = {"CannotConnectNowError", "ConnectionDoesNotExistError", "PostgresConnectionError",
           "ConnectionFailureError", "AdminShutdownError", "CrashShutdownError",
           "TooManyConnectionsError", "QueryCanceledError", "InterfaceError"}


def unavailable(exc: BaseException | None) -> bool:
    """True if `exc` (or what caused it) says the database could not be reached or answered:
    refused or dropped connections, timeouts, a server starting up or shutting down. A
    channel keeps such a delivery unconfirmed (or answers 5xx) so the platform sends it again."""
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
