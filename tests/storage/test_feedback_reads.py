"""The learning loop's feedback reads, the review queue and the canary's tallies (SQLite and
PostgreSQL)."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import update

from storage import conversations, feedback
from storage.models import AnswerStatus, Message, utcnow
from tests.storage.test_conversations import _answer, _turn


async def _exchange(sessions, n: int, *, chat: str | None = None,  # type: ignore[no-untyped-def]
                    status: AnswerStatus = AnswerStatus.OK, adapter: str | None = None) -> int:
    """Question `q{n}` and its answer `a{n}`; returns the answer id."""
    turn = await _turn(sessions, event_id=f"e{n}", chat=chat or f"c{n}", text=f"q{n}")
    async with sessions() as s:
        return await conversations.finish_turn(
            s, turn=turn, text=f"a{n}" if status == AnswerStatus.OK else "", status=status,
            meta=conversations.AnswerMeta(model="m", adapter=adapter))


async def test_feedback_since_joins_answers_and_questions_on_ok_answers_only(sessions) -> None:  # type: ignore[no-untyped-def]
    ok = await _exchange(sessions, 1)
    failed = await _exchange(sessions, 2, status=AnswerStatus.FAILED)
    async with sessions() as s:
        await feedback.record_vote(s, answer_id=ok, voter_id="v", rating=1, source="t")
        await feedback.record_vote(s, answer_id=failed, voter_id="v", rating=-1, source="t")
        await feedback.record_correction(s, answer_id=ok, voter_id="r", text="Better.",
                                         source="t", trusted=True)
        rows = await feedback.feedback_since(s, since=0)
        later = await feedback.feedback_since(s, since=rows[0].id)
    assert [(r.voter_id, r.rating, r.correction, r.review_status) for r in rows] == [
        ("v", 1, None, None), ("r", None, "Better.", "approved")]
    first = rows[0]
    assert (first.answer_id, first.answer, first.question) == (ok, "a1", "q1")
    assert first.question_id < first.answer_id and first.created_at.tzinfo is not None
    assert [r.voter_id for r in later] == ["r"] and rows[1].trusted


async def test_first_seen_is_a_voters_first_vote_or_message(sessions) -> None:  # type: ignore[no-untyped-def]
    answer = await _exchange(sessions, 1)  # asked by u1
    month_ago = utcnow() - timedelta(days=30)
    async with sessions() as s:
        await s.execute(update(Message).where(Message.author_id == "u1")
                        .values(created_at=month_ago))
        await s.commit()
        for voter in ("u1", "new"):
            await feedback.record_vote(s, answer_id=answer, voter_id=voter, rating=1, source="t")
        seen = await feedback.first_seen(s, voters={"u1", "new", "nobody"})
        assert await feedback.first_seen(s, voters=set()) == {}
    assert set(seen) == {"u1", "new"}
    assert abs(seen["u1"] - month_ago) < timedelta(seconds=1)
    assert utcnow() - seen["new"] < timedelta(minutes=1)


async def test_transcripts_are_every_message_of_the_conversations_in_order(sessions) -> None:  # type: ignore[no-untyped-def]
    a1 = await _exchange(sessions, 1, chat="x")
    await _exchange(sessions, 2, chat="x", status=AnswerStatus.FAILED)
    other = await _exchange(sessions, 3, chat="y")
    async with sessions() as s:
        conv_x = (await conversations.get_message(s, message_id=a1)).conversation_id
        conv_y = (await conversations.get_message(s, message_id=other)).conversation_id
        found = await feedback.transcripts(s, conversation_ids={conv_x})
        assert await feedback.transcripts(s, conversation_ids=[]) == {}
    assert list(found) == [conv_x] and conv_y != conv_x
    assert [(m.role, m.text, m.status) for m in found[conv_x]] == [
        ("user", "q1", None), ("assistant", "a1", "ok"), ("user", "q2", None),
        ("assistant", "", "failed")]
    assert found[conv_x][1].reply_to_id == found[conv_x][0].id


async def test_a_conversations_split_is_recorded_once(sessions) -> None:  # type: ignore[no-untyped-def]
    ids = []
    for n in range(3):
        answer = await _exchange(sessions, n)
        async with sessions() as s:
            ids.append((await conversations.get_message(s, message_id=answer)).conversation_id)
    async with sessions() as s:
        assert await feedback.recorded_splits(s, conversation_ids=ids) == {}
        await feedback.record_splits(s, splits={ids[0]: True, ids[1]: False})
        await feedback.record_splits(s, splits={ids[0]: False, ids[2]: True})  # first one wins
        await feedback.record_splits(s, splits={})
        assert await feedback.recorded_splits(s, conversation_ids=ids) == {
            ids[0]: True, ids[1]: False, ids[2]: True}


async def test_eligible_feedback_is_votes_and_approved_corrections(sessions) -> None:  # type: ignore[no-untyped-def]
    answer = await _answer(sessions, await _turn(sessions))
    async with sessions() as s:
        await feedback.record_vote(s, answer_id=answer, voter_id="v", rating=-1, source="t")
        await feedback.record_correction(s, answer_id=answer, voter_id="u", text="Hm.",
                                         source="t", trusted=False)
        assert await feedback.eligible_count(s, since=0) == 1
        [pending] = await feedback.pending_corrections(s)
        assert (pending.voter_id, pending.question, pending.answer, pending.correction) == (
            "u", "hi", "hello", "Hm.")
        assert await feedback.review_correction(s, feedback_id=pending.feedback_id,
                                                approve=True)
        assert not await feedback.review_correction(s, feedback_id=pending.feedback_id,
                                                    approve=False)  # no longer pending
        assert await feedback.pending_corrections(s) == []
        assert await feedback.eligible_count(s, since=0) == 2
        assert await feedback.eligible_count(s, since=pending.feedback_id) == 0


async def test_a_rejected_correction_is_neither_pending_nor_eligible(sessions) -> None:  # type: ignore[no-untyped-def]
    answer = await _answer(sessions, await _turn(sessions))
    async with sessions() as s:
        await feedback.record_correction(s, answer_id=answer, voter_id="u", text="No.",
                                         source="t", trusted=False)
        [pending] = await feedback.pending_corrections(s, limit=5)
        assert await feedback.review_correction(s, feedback_id=pending.feedback_id,
                                                approve=False)
        assert await feedback.pending_corrections(s) == []
        assert await feedback.eligible_count(s, since=0) == 0


async def test_votes_on_count_an_adapters_votes_since_a_time(sessions) -> None:  # type: ignore[no-untyped-def]
    canary = [await _exchange(sessions, n, adapter="fb-v1") for n in range(3)]
    base = await _exchange(sessions, 9)
    async with sessions() as s:
        for i, answer in enumerate(canary):
            await feedback.record_vote(s, answer_id=answer, voter_id="v", rating=-1 if i else 1,
                                       source="t")
        await feedback.record_vote(s, answer_id=base, voter_id="v", rating=-1, source="t")
        await feedback.record_correction(s, answer_id=base, voter_id="w", text="x", source="t",
                                         trusted=True)  # no rating: not a vote
        hour_ago = utcnow() - timedelta(hours=1)
        assert await feedback.votes_on(s, adapter="fb-v1", since=hour_ago) == feedback.Votes(3, 2)
        assert await feedback.votes_on(s, adapter=None, since=hour_ago) == feedback.Votes(1, 1)
        assert await feedback.votes_on(s, adapter="fb-v2", since=hour_ago) == feedback.Votes(0, 0)
        later = utcnow() + timedelta(minutes=1)
        assert await feedback.votes_on(s, adapter="fb-v1", since=later) == feedback.Votes(0, 0)
