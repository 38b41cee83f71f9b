"""Revision 0005_identities: ids stored before identities become `channel:id`."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from sqlalchemy import text

from storage.db import make_engine, session_factory
from storage.migrate import alembic_config, upgrade_async
from storage.models import AdapterVersion, Conversation, Message, TrainingRun
from tests.conftest import database_at

BEFORE = "0004_conversation_split"
NOW = datetime(2026, 11, 30, 10, tzinfo=UTC)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def old_db(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A database migrated only up to the revision before identities."""
    async with database_at(request.param, BEFORE, tmp_path) as url:
        yield url


class OldRows:
    """Writes rows as releases before identities stored them (raw SQL: no models)."""

    def __init__(self, conn: Any) -> None:
        self.conn, self.ids = conn, 0

    async def _insert(self, table: str, **values: Any) -> int:
        self.ids += 1
        values["id"] = self.ids
        names = ", ".join(values)
        await self.conn.execute(text(f"INSERT INTO {table} ({names}) VALUES "
                                     f"({', '.join(':' + k for k in values)})"), values)
        return self.ids

    async def turn(self, channel: str, chat: str, author: str,
                   payload: dict[str, Any] | None = None) -> int:
        """A conversation with one question by `author` and its answer; the answer's id."""
        conv = await self._insert("conversation", channel=channel, external_chat_id=chat,
                                  external_thread_id="", epoch=0, created_at=NOW)
        question = await self._insert("message", conversation_id=conv, role="user", text="q",
                                      author_id=author, created_at=NOW)
        await self._insert("inboundevent", channel=channel, external_event_id=f"ev{question}",
                           status="done", received_at=NOW, message_id=question, attempts=0,
                           payload=json.dumps(payload or {"user_id": author}))
        return await self._insert("message", conversation_id=conv, role="assistant",
                                  text="a", reply_to_id=question, status="ok", created_at=NOW)

    async def feedback(self, answer: int, voter: str, source: str, *, trusted: bool = False,
                       review: str | None = None, correction: str | None = None) -> int:
        return await self._insert("feedback", answer_id=answer, voter_id=voter, rating=-1,
                                  correction=correction, source=source, trusted=trusted,
                                  review_status=review, created_at=NOW, updated_at=NOW)


async def _rows(url: str, sql: str) -> dict[int, tuple[Any, ...]]:
    engine = make_engine(url)
    try:
        async with engine.connect() as conn:
            return {row[0]: tuple(row[1:]) for row in (await conn.execute(text(sql))).all()}
    finally:
        await engine.dispose()


async def test_stored_ids_become_identities_of_their_channel(old_db: str) -> None:
    engine = make_engine(old_db)
    async with engine.begin() as conn:
        old = OldRows(conn)
        tg = await old.turn("telegram", "111", "111")
        own_vote = await old.feedback(tg, "111", "telegram")
        converted = await old.feedback(tg, "telegram:222", "telegram")
        forged = await old.feedback(tg, "333", "web")  # the web once voted on any answer
        slack = await old.turn("slack", "C1", "U222", {"user_id": "U222", "team": "T111"})
        slack_vote = await old.feedback(slack, "U222", "slack")
        agent = await old.feedback(slack, "U444", "slack_thread")  # team: the conversation's
        lone = await old.turn("slack", "C2", "U333")  # no team recorded anywhere
        web = await old.turn("web", "tab1", "visitor1")
        typed = await old.feedback(web, "telegram:111", "web", trusted=True, review="approved",
                                   correction="Typed in as a reviewer.")
        long_id = await old.feedback(web, "x" * 128, "web")
    await engine.dispose()

    await upgrade_async(old_db)  # head

    authors = await _rows(old_db, "SELECT id, author_id FROM message WHERE role = 'user'")
    assert {a for (a,) in authors.values()} == {
        "telegram:111", "slack:T111/U222", "slack:U333", "web:visitor1"}
    voters = await _rows(old_db, "SELECT id, voter_id, trusted, review_status FROM feedback")
    assert voters[own_vote][0] == "telegram:111"
    assert voters[converted][0] == "telegram:222"  # already an identity: left alone
    assert voters[forged][0] == "web:333"  # not a Telegram user's vote
    assert voters[slack_vote][0] == "slack:T111/U222"
    assert voters[agent][0] == "slack:T111/U444"
    assert voters[typed] == ("web:telegram:111", False, "pending")  # back to review
    assert voters[long_id][0].startswith("web:sha256:") and len(voters[long_id][0]) <= 128
    assert lone  # its question's author is slack:U333 above: the bare id, no team known

    # and back: bare ids again (but the trust taken from web feedback stays taken)
    await asyncio.to_thread(command.downgrade, alembic_config(old_db), BEFORE)
    authors = await _rows(old_db, "SELECT id, author_id FROM message WHERE role = 'user'")
    assert {a for (a,) in authors.values()} == {"111", "U222", "U333", "visitor1"}
    voters = await _rows(old_db, "SELECT id, voter_id FROM feedback")
    assert (voters[own_vote], voters[slack_vote], voters[forged]) == (("111",), ("U222",),
                                                                      ("web:333",))


async def test_sqlite_migrations_go_down_and_up_with_rows_referencing_altered_tables(
        tmp_path) -> None:  # type: ignore[no-untyped-def]
    """SQLite's batch ALTERs recreate tables (trainingrun, adapterversion, message): rows in
    other tables referencing them must not stop a downgrade or an upgrade."""
    async with database_at("sqlite", "head", tmp_path) as url:
        engine = make_engine(url)
        async with session_factory(engine)() as s:
            run = TrainingRun(status="succeeded")
            chat = Conversation(channel="test", external_chat_id="c")
            s.add_all([run, chat])
            await s.flush()
            question = Message(conversation_id=chat.id, role="user", text="hi",
                               author_id="test:u")
            s.add(question)
            await s.flush()
            s.add(Message(conversation_id=chat.id, role="assistant", text="hello",
                          reply_to_id=question.id))
            s.add(AdapterVersion(name="fb-v1", path="/nowhere", rank=8, run_id=run.id))
            await s.commit()
        await engine.dispose()
        await asyncio.to_thread(command.downgrade, alembic_config(url), "0006_feedback_revisions")
        await upgrade_async(url, "head")
        assert list((await _rows(url, "SELECT id, reply_to_id FROM message")).values()) == [
            (None,), (1,)]
        assert await _rows(url, "SELECT id, status FROM trainingrun") == {1: ("succeeded",)}
