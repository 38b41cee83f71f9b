"""Revision 0006_feedback_revisions: the id watermarks of runs before it become consumed
revisions, so an upgraded deployment's next run continues where the last one left off."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from storage import feedback
from storage.db import make_engine, session_factory
from storage.migrate import upgrade_async
from tests.conftest import database_at

BEFORE = "0005_identities"
NOW = datetime(2026, 11, 30, 10, tzinfo=UTC)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def old_db(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A database migrated only up to the revision before feedback revisions."""
    async with database_at(request.param, BEFORE, tmp_path) as url:
        yield url


async def _insert(conn: Any, table: str, **values: Any) -> int:
    names = ", ".join(values)
    await conn.execute(text(f"INSERT INTO {table} ({names}) VALUES "
                            f"({', '.join(':' + k for k in values)})"), values)
    return int(values["id"])


async def _answer_with_feedback(conn: Any, n: int, *, heldout: bool | None) -> int:
    """Conversation, question, answer and a vote, all numbered `n`; the feedback id."""
    await _insert(conn, "conversation", id=n, channel="telegram", external_chat_id=f"c{n}",
                  external_thread_id="", epoch=0, created_at=NOW, heldout=heldout)
    await _insert(conn, "message", id=2 * n, conversation_id=n, role="user", text="q",
                  author_id=f"telegram:{n}", created_at=NOW)
    await _insert(conn, "message", id=2 * n + 1, conversation_id=n, role="assistant",
                  text="a", reply_to_id=2 * n, status="ok", created_at=NOW)
    return await _insert(conn, "feedback", id=n, answer_id=2 * n + 1, voter_id=f"telegram:{n}",
                         rating=1, source="telegram", trusted=False, created_at=NOW,
                         updated_at=NOW)


async def test_old_watermarks_become_consumed_revisions(old_db: str) -> None:
    engine = make_engine(old_db)
    async with engine.begin() as conn:
        trained, held, newer = [await _answer_with_feedback(conn, n, heldout=h)
                                for n, h in ((1, False), (2, True), (3, None))]
        for run, status, watermark in ((1, "succeeded", held), (2, "failed", newer)):
            await _insert(conn, "trainingrun", id=run, status=status, trigger="cron",
                          feedback_watermark=watermark, started_at=NOW)
        await _insert(conn, "adapterversion", id=1, name="fb-v1", status="active",
                      path="/a/fb-v1", rank=8, run_id=1, feedback_watermark=held,
                      created_at=NOW, updated_at=NOW)
    await engine.dispose()
    await upgrade_async(old_db)
    engine = make_engine(old_db)
    try:
        async with engine.connect() as conn:
            recorded = (await conn.execute(text(
                "SELECT run_id, feedback_id, revision, role FROM runfeedback "
                "ORDER BY feedback_id"))).all()
        sessions = session_factory(engine)
        async with sessions() as s:
            unlearned = await feedback.unlearned_feedback(s, learned_by=[1])
            eligible = await feedback.eligible_count(s)
    finally:
        await engine.dispose()
    assert [tuple(r) for r in recorded] == [(1, trained, 1, "trained"), (1, held, 1, "heldout")]
    assert [r.id for r in unlearned] == [held, newer]  # held out: trained on later
    assert eligible == 1  # the failed run's feedback was never seen
