"""Feedback storage on SQLite and PostgreSQL: one live vote per voter, corrections, deliveries."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from storage import feedback
from storage.feedback import Delivery
from storage.models import Feedback, InboundEvent
from tests.storage.test_conversations import _answer, _turn


async def test_vote_is_one_per_voter_and_changeable(sessions) -> None:  # type: ignore[no-untyped-def]
    turn = await _turn(sessions)
    answer = await _answer(sessions, turn)
    async with sessions() as s:
        await feedback.record_vote(s, answer_id=answer, voter_id="v", rating=1, source="test")
        fb = (await feedback.record_vote(s, answer_id=answer, voter_id="v", rating=-1,
                                         source="test", reason="wrong")).feedback
        await feedback.record_vote(s, answer_id=answer, voter_id="w", rating=1, source="test")
        assert (fb.rating, fb.reason) == (-1, "wrong")
        rows = (await s.execute(select(Feedback).order_by(Feedback.voter_id))).scalars().all()
        assert [(r.voter_id, r.rating) for r in rows] == [("v", -1), ("w", 1)]


async def test_correction_joins_the_vote_and_trust_sets_review(sessions) -> None:  # type: ignore[no-untyped-def]
    turn = await _turn(sessions)
    answer = await _answer(sessions, turn)
    async with sessions() as s:
        await feedback.record_vote(s, answer_id=answer, voter_id="v", rating=-1, source="test")
        fb = (await feedback.record_correction(s, answer_id=answer, voter_id="v", text="better",
                                          source="test", trusted=False)).feedback
        assert (fb.rating, fb.correction, fb.review_status) == (-1, "better", "pending")
        fb = (await feedback.record_correction(s, answer_id=answer, voter_id="r", text="best",
                                          source="test", trusted=True)).feedback
        assert (fb.trusted, fb.review_status) == (True, "approved")


async def test_feedback_on_a_question_or_unknown_id_is_refused(sessions) -> None:  # type: ignore[no-untyped-def]
    turn = await _turn(sessions)
    async with sessions() as s:
        with pytest.raises(feedback.UnknownAnswer):
            await feedback.record_vote(s, answer_id=turn.question_id, voter_id="v", rating=1,
                                   source="test")
        with pytest.raises(feedback.UnknownAnswer):
            await feedback.record_vote(s, answer_id=99999, voter_id="v", rating=1, source="test")


async def test_feedback_is_taken_only_on_its_channel_and_from_its_asker(sessions) -> None:  # type: ignore[no-untyped-def]
    answer = await _answer(sessions, await _turn(sessions))  # channel "test", asked by "u1"
    refusals = []
    async with sessions() as s:
        for where in ({"channel": "web"}, {"channel": "test", "asked_by": "u2"},
                      {"asked_by": "test:u1"}):
            with pytest.raises(feedback.UnknownAnswer) as refused:
                await feedback.record_vote(s, answer_id=answer, voter_id="u2", rating=1,
                                           source="test", **where)
            refusals.append(str(refused.value))
            with pytest.raises(feedback.UnknownAnswer):
                await feedback.record_correction(s, answer_id=answer, voter_id="u2", text="x",
                                                 source="test", trusted=True, **where)
        with pytest.raises(feedback.UnknownAnswer) as missing:
            await feedback.record_vote(s, answer_id=answer + 100, voter_id="u2", rating=1,
                                       source="test", channel="test")
        # the same words as for an id that does not exist: nothing tells them apart
        assert set(refusals) == {f"no answer with id {answer}"}
        assert str(missing.value) == f"no answer with id {answer + 100}"
        assert (await s.execute(select(func.count()).select_from(Feedback))).scalar() == 0
        fb = (await feedback.record_vote(s, answer_id=answer, voter_id="u1", rating=1,
                                         source="test", channel="test", asked_by="u1")).feedback
        assert (fb.answer_id, fb.voter_id) == (answer, "u1")


async def test_a_vote_and_its_delivery_are_stored_together_once(sessions) -> None:  # type: ignore[no-untyped-def]
    turn = await _turn(sessions)
    answer = await _answer(sessions, turn)
    delivery = Delivery("test", "update-7")
    async with sessions() as s:
        first = await feedback.record_vote(s, answer_id=answer, voter_id="v", rating=-1,
                                           source="test", delivery=delivery)
        again = await feedback.record_vote(s, answer_id=answer, voter_id="v", rating=-1,
                                           source="test", delivery=delivery)
        fixed = await feedback.record_correction(s, answer_id=answer, voter_id="v", text="x",
                                                 source="test", trusted=False,
                                                 delivery=Delivery("test", "update-8"))
        assert (first.first_delivery, again.first_delivery, fixed.first_delivery) == (
            True, False, True)
        events = (await s.execute(select(func.count()).select_from(InboundEvent)
                                  .where(InboundEvent.external_event_id.like("update-%"))))
        assert events.scalar() == 2
        assert (await s.execute(select(func.count()).select_from(Feedback))).scalar() == 1


async def test_feedback_on_an_unknown_answer_records_no_delivery(sessions) -> None:  # type: ignore[no-untyped-def]
    async with sessions() as s:
        with pytest.raises(feedback.UnknownAnswer):
            await feedback.record_vote(s, answer_id=4242, voter_id="v", rating=1, source="test",
                                       delivery=Delivery("test", "update-9"))
        await s.rollback()
        assert (await s.execute(select(func.count()).select_from(InboundEvent))).scalar() == 0
