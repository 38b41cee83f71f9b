"""Alembic, driven from code: `chatloop db upgrade` and the schema check (check_ready)."""

from __future__ import annotations

import asyncio
from functools import cache
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.exc import OperationalError, ProgrammingError
from sqlalchemy.ext.asyncio import AsyncEngine

from storage.db import DatabaseNotReady, normalise_url, redacted

MIGRATIONS = Path(__file__).parent / "migrations"


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["database_url"] = normalise_url(url)
    return cfg


@cache
def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
    assert head is not None
    return head


def upgrade(url: str, revision: str = "head") -> None:
    """Migrate the database at `url` (blocking; call from a thread inside an event loop)."""
    command.upgrade(alembic_config(url), revision)


async def upgrade_async(url: str, revision: str = "head") -> None:
    await asyncio.to_thread(upgrade, url, revision)


async def check_ready(engine: AsyncEngine) -> None:
    """Raise DatabaseNotReady unless the database answers and is at the latest revision."""
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
