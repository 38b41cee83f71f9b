"""Storage behaviour on SQLite and PostgreSQL (every test runs on both)."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import func, select

from storage import conversations, events
from storage.models import AnswerStatus, Conversation, EventStatus, InboundEvent, Message
from storage.sql import turn_engine


async def _turn(sessions, event_id: str = "e1", chat: str = "c1", text: str = "hi"):  # type: ignore[no-untyped-def]
    async with sessions() as s:
        conv = await conversations.current_conversation(s, channel="test", chat_id=chat)
        return await conversations.begin_turn(s, channel="test", event_id=event_id,
                                              conversation_id=conv, text=text, author_id="u1")


async def _answer(sessions, turn, text: str = "hello") -> int:  # type: ignore[no-untyped-def]
    async with sessions() as s:
        return await conversations.finish_turn(s, turn=turn, text=text, status=AnswerStatus.OK,
                                      meta=conversations.AnswerMeta(model="m", adapter=None))


async def test_duplicate_event_starts_no_second_turn(sessions) -> None:  # type: ignore[no-untyped-def]
    first = await _turn(sessions)
    again = await _turn(sessions)
    assert first is not None and again is None
    async with sessions() as s:
        assert (await s.execute(select(func.count()).select_from(Message))).scalar() == 1


@pytest.mark.parametrize("via", ["session", "turn engine"])  # the core's: autocommit on PG
async def test_concurrent_duplicate_inserts_record_exactly_one(sessions, via: str) -> None:  # type: ignore[no-untyped-def]
    opener = sessions if via == "session" else turn_engine(sessions.kw["bind"]).connect
    async with sessions() as s:
        conv = await conversations.current_conversation(s, channel="test", chat_id="c1")

    async def attempt() -> conversations.TurnStart | None:
        async with opener() as s:
            return await conversations.begin_turn(s, channel="test", event_id="same",
                                                  conversation_id=conv, text="hi", author_id="u1")

    results = await asyncio.gather(*(attempt() for _ in range(12)))
    assert sum(r is not None for r in results) == 1
    async with sessions() as s:
        assert (await s.execute(select(func.count()).select_from(InboundEvent))).scalar() == 1
        assert (await s.execute(select(func.count()).select_from(Message))).scalar() == 1


@pytest.mark.parametrize("via", ["session", "turn engine"])  # the core's turn path: connection
async def test_concurrent_first_messages_share_one_conversation(sessions, via: str) -> None:  # type: ignore[no-untyped-def]
    opener = sessions if via == "session" else turn_engine(sessions.kw["bind"]).connect

    async def first() -> int:
        async with opener() as s:
            return await conversations.current_conversation(s, channel="test", chat_id="new")

    ids = await asyncio.gather(*(first() for _ in range(8)))
    async with sessions() as s:
        current = await conversations.current_conversation(s, channel="test", chat_id="new")
        assert (await s.execute(select(func.count()).select_from(Conversation))).scalar() == 1
    assert set(ids) == {current}


async def test_stored_answer_keeps_metadata_and_event_closes_on_delivery(sessions) -> None:  # type: ignore[no-untyped-def]
    turn = await _turn(sessions)
    async with sessions() as s:
        meta = conversations.AnswerMeta(model="m", adapter="fb-v1", prompt_tokens=10,
                                        completion_tokens=5, ttft_ms=12.5, latency_ms=80.0,
                                        finish_reason="stop")
        answer_id = await conversations.finish_turn(s, turn=turn, text="hello",
                                                    status=AnswerStatus.OK, meta=meta)
        answer = await s.get(Message, answer_id)
        event = await s.get(InboundEvent, turn.event_id)
        assert answer is not None and event is not None
        assert (answer.adapter, answer.completion_tokens, answer.ttft_ms) == ("fb-v1", 5, 12.5)
        assert answer.reply_to_id == turn.question_id and event.status == EventStatus.ANSWERED
        assert [e.id for e in await events.pending_events(s, channel="test")] == [turn.event_id]
        assert (await conversations.stored_answer(s, question_id=turn.question_id)).id == answer_id
        await conversations.mark_delivered(s, turn=turn, answer_id=answer_id,
                                           external_message_id="42")
    async with sessions() as s:
        assert (await s.get(InboundEvent, turn.event_id)).status == EventStatus.DONE
        assert (await s.get(Message, answer_id)).external_message_id == "42"
        assert await events.pending_events(s, channel="test") == []


async def test_unfinished_turn_is_pending_for_resume(sessions) -> None:  # type: ignore[no-untyped-def]
    turn = await _turn(sessions)
    async with sessions() as s:
        pending = await events.pending_events(s, channel="test")
    assert [e.id for e in pending] == [turn.event_id]


async def test_empty_ok_answer_is_refused(sessions) -> None:  # type: ignore[no-untyped-def]
    turn = await _turn(sessions)
    async with sessions() as s:
        with pytest.raises(ValueError):
            await conversations.finish_turn(s, turn=turn, text="", status=AnswerStatus.OK,
                                   meta=conversations.AnswerMeta(model="m", adapter=None))


async def test_history_skips_failed_answers_and_their_questions(sessions) -> None:  # type: ignore[no-untyped-def]
    t1 = await _turn(sessions, "e1", text="q1")
    await _answer(sessions, t1, "a1")
    t2 = await _turn(sessions, "e2", text="q2")
    async with sessions() as s:
        await conversations.finish_turn(s, turn=t2, text="", status=AnswerStatus.FAILED,
                               meta=conversations.AnswerMeta(model="m", adapter=None,
                                                    error_kind="unavailable"))
    t3 = await _turn(sessions, "e3", text="q3")
    async with sessions() as s:
        past = await conversations.history(s, conversation_id=t3.conversation_id,
                                  before_id=t3.question_id, limit=10)
    assert [m.text for m in past] == ["q1", "a1"]


async def test_reset_starts_a_new_conversation(sessions) -> None:  # type: ignore[no-untyped-def]
    t1 = await _turn(sessions, "e1")
    async with sessions() as s:
        new = await conversations.reset_conversation(s, channel="test", chat_id="c1")
    t2 = await _turn(sessions, "e2")
    assert new != t1.conversation_id and t2.conversation_id == new


async def test_history_of_interleaved_turns_pairs_each_answer_with_its_question(sessions) -> None:  # type: ignore[no-untyped-def]
    t1 = await _turn(sessions, "e1", text="q1")
    t2 = await _turn(sessions, "e2", text="q2")  # recorded before q1 is answered
    async with sessions() as s:
        assert await conversations.history(s, conversation_id=t2.conversation_id,
                                  before_id=t2.question_id, limit=10) == []  # q1 is unanswered
    await _answer(sessions, t1, "a1")
    await _answer(sessions, t2, "a2")
    t3 = await _turn(sessions, "e3", text="q3")
    async with sessions() as s:
        for_t2 = await conversations.history(s, conversation_id=t2.conversation_id,
                                    before_id=t2.question_id, limit=10)
        for_t3 = await conversations.history(s, conversation_id=t3.conversation_id,
                                    before_id=t3.question_id, limit=10)
        last_two = await conversations.history(s, conversation_id=t3.conversation_id,
                                      before_id=t3.question_id, limit=2)
    assert [m.text for m in for_t2] == ["q1", "a1"]
    assert [m.text for m in for_t3] == ["q1", "a1", "q2", "a2"]
    assert [m.text for m in last_two] == ["q2", "a2"]
