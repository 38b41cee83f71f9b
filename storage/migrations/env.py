"""Alembic environment: async engines, batch mode for SQLite ALTERs."""

import asyncio

from alembic import context
from sqlalchemy.engine import Connection
from sqlmodel import SQLModel

import storage.models  # noqa: F401  (registers the tables)
from storage.db import make_engine

target_metadata = SQLModel.metadata


def _run(connection: Connection) -> None:
    sqlite = connection.dialect.name == "sqlite"
    if sqlite:
        # A batch ALTER copies a table, drops the old one and renames the copy: with foreign
        # keys enforced the drop fails while rows elsewhere reference it. Off for the
        # migration (outside any transaction, where SQLite honours it), checked after.
        connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=sqlite,
    )
    with context.begin_transaction():
        context.run_migrations()
        if sqlite:
            broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
            if broken:
                raise RuntimeError(f"the migration left {len(broken)} rows whose parent row "
                                   f"is missing, e.g. {broken[:3]}; rolled back")


async def _run_async() -> None:
    engine = make_engine(context.config.attributes["database_url"], command_timeout_s=None)
    async with engine.connect() as conn:
        await conn.run_sync(_run)
        await conn.commit()
    await engine.dispose()


if context.is_offline_mode():
    context.configure(
        url=context.config.attributes["database_url"],
        target_metadata=target_metadata,
        literal_binds=True,
    )
    with context.begin_transaction():
        context.run_migrations()
else:
    asyncio.run(_run_async())
