"""What every `chatloop` command shares: the settings, logging, the one-line exit, the
database, and running a learning-loop cycle by hand."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, NoReturn, TypeVar

import typer
from pydantic import ValidationError

from chatloop.settings import Settings, describe_error

T = TypeVar("T")


def load_settings() -> Settings:
    """The settings from the environment and `.env`; a bad one exits naming its variable."""
    try:
        return Settings()
    except ValidationError as exc:
        die(f"bad configuration: {describe_error(exc)}")


def die(message: str, code: int = 2) -> NoReturn:
    """Print `chatloop: message` on stderr and exit with `code`."""
    typer.echo(f"chatloop: {message}", err=True)
    raise typer.Exit(code)


def setup_logging() -> None:
    """Log lines on stderr at INFO, as text or JSON (CHATLOOP_LOG_FORMAT)."""
    from chatloop.telemetry.logs import configure_logging

    configure_logging(load_settings().gateway.log_format, level=logging.INFO, stream=sys.stderr)


def start_telemetry(settings: Settings, service: str) -> Any:
    """/metrics on CHATLOOP_HOST:CHATLOOP_METRICS_PORT, and spans when exported over OTLP or
    logged as JSON (chatloop.telemetry); returns the metrics server, if any."""
    from sqlalchemy.engine import make_url

    from chatloop import telemetry

    url, gateway = make_url(settings.storage.database_url), settings.gateway
    return telemetry.start(service=service, host=gateway.host,
                           metrics_port=gateway.metrics_port, log_format=gateway.log_format,
                           salt=f"{url.host or ''}:{url.port or ''}/{url.database or ''}")


@asynccontextmanager
async def database() -> AsyncIterator[tuple[Any, Any]]:
    """The engine and sessions of CHATLOOP_DATABASE_URL, which must be migrated."""
    from storage.db import make_engine, session_factory
    from storage.migrate import check_ready

    engine = make_engine(load_settings().storage.database_url)
    try:
        await check_ready(engine)
        yield engine, session_factory(engine)
    finally:
        await engine.dispose()


def run(main: Callable[[], Awaitable[T]]) -> T:
    """Run a command's coroutine; the errors an operator can act on exit in one line."""
    from feedback.review import NotPending
    from storage.adapters import RegistryError
    from storage.db import DatabaseNotReady

    try:
        return asyncio.run(main())  # type: ignore[arg-type]
    except (DatabaseNotReady, RegistryError, NotPending) as exc:
        die(str(exc))


async def cycle(settings: Settings, sessions: Any, cfg: Any, *, trigger: str) -> Any:
    """One learning-loop cycle on the configured backend (`train --now`, `forget --retrain`)."""
    from chatloop.app import make_backend
    from feedback.loop import run_cycle

    backend = make_backend(settings)
    try:
        return await run_cycle(sessions, backend, cfg, trigger=trigger)
    finally:
        await backend.aclose()


def report_cycle(result: Any) -> None:
    """Print a cycle's outcome and reasons; a failed run exits 1."""
    typer.echo(f"run #{result.run_id}: {result.status} {result.adapter or ''}")
    for reason in result.reasons:
        typer.echo(f"  {reason}")
    if result.status == "failed":
        raise typer.Exit(1)
