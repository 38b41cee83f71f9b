"""Shared fixtures: real SQLite and PostgreSQL databases, the prepared model, a scripted backend."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy.engine import make_url

from inference.batching import cap_onednn_isa
from storage.db import make_engine, session_factory
from storage.migrate import upgrade_async

ROOT = Path(__file__).resolve().parent.parent
PG_URL = os.environ.get("CHATLOOP_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
MODEL_DIR = Path(os.environ.get("CHATLOOP_MODEL", ROOT / "var/models/SmolLM2-135M-Instruct"))
# the answer memory's default embedder, prepared beside the model (tests run from other
# directories too)
os.environ.setdefault("CHATLOOP_MEMORY_EMBEDDER", f"minilm:{ROOT / 'var/models/all-MiniLM-L6-v2'}")
# as a serving process does on importing inference.embedded, but before any test's first bf16
# product, whichever test runs first (inference.batching.ONEDNN_ISA)
cap_onednn_isa()


async def _fresh_pg_database() -> tuple[str, str]:
    name = f"chatloop_t_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(PG_URL.replace("postgresql+asyncpg", "postgresql"))
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    return name, make_url(PG_URL).set(database=name).render_as_string(hide_password=False)


async def _drop_pg_database(name: str) -> None:
    admin = await asyncpg.connect(PG_URL.replace("postgresql+asyncpg", "postgresql"))
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@asynccontextmanager
async def database_at(kind: str, revision: str, tmp_path: Path) -> AsyncIterator[str]:
    """A database migrated up to `revision`: a SQLite file under `tmp_path`, or a new
    database on the PostgreSQL server (dropped afterwards)."""
    if kind == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'chatloop.db'}"
        await upgrade_async(url, revision)
        yield url
        return
    name, url = await _fresh_pg_database()
    try:
        await upgrade_async(url, revision)
        yield url
    finally:
        await _drop_pg_database(name)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A freshly migrated database: a SQLite file, or a new database on the PostgreSQL server."""
    async with database_at(request.param, "head", tmp_path) as url:
        yield url


@pytest.fixture
async def sessions(db_url: str):  # type: ignore[no-untyped-def]
    engine = make_engine(db_url)
    yield session_factory(engine)
    await engine.dispose()


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """The prepared bundled model (`make test` prepares it before pytest starts)."""
    if not (MODEL_DIR / "config.json").exists():
        pytest.fail(f"no prepared model at {MODEL_DIR}: run `chatloop model prepare` first")
    return MODEL_DIR
