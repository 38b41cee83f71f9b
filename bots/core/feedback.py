"""Votes and corrections, each stored with its platform delivery in one transaction."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from bots.core.types import FeedbackResult, InboundMessage
from storage import conversations, events
from storage import feedback as store
from storage.feedback import Delivery, Stored


class FeedbackDesk:
    """Stores feedback for every channel; reviewers' corrections are trusted (approved)."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession], *,
                 reviewer_ids: frozenset[str]) -> None:
        self._sessions, self.reviewer_ids = sessions, reviewer_ids

    async def vote(self, *, answer_id: int, voter_id: str, rating: int, source: str,
                   reason: str | None = None, delivery: Delivery | None = None
                   ) -> FeedbackResult:
        async with self._sessions() as s:
            stored = await store.record_vote(
                s, answer_id=answer_id, voter_id=voter_id, rating=rating, source=source,
                reason=reason, trusted=voter_id in self.reviewer_ids, delivery=delivery)
        return _result(stored)

    async def correct(self, *, answer_id: int, voter_id: str, text: str, source: str,
                      delivery: Delivery | None = None) -> FeedbackResult:
        async with self._sessions() as s:
            stored = await store.record_correction(
                s, answer_id=answer_id, voter_id=voter_id, text=text, source=source,
                trusted=voter_id in self.reviewer_ids, delivery=delivery)
        return _result(stored)

    async def reviewer_reply(self, msg: InboundMessage, *, source: str) -> bool:
        """A reviewer answering in a conversation after the bot: their reply corrects its
        latest answer, stored with the delivery in one transaction. False if this delivery
        was seen before or there is no answer to correct."""
        async with self._sessions() as s:
            if await events.record_event(s, channel=msg.channel, event_id=msg.event_id,
                                         commit=False) is None:
                await s.rollback()
                return False
            conv = await conversations.find_conversation(
                s, channel=msg.channel, chat_id=msg.chat_id, thread_id=msg.thread_id)
            answer = None
            if conv is not None:
                answer = await conversations.latest_answer(s, conversation_id=conv)
            if answer is None or answer.id is None or not msg.text:
                await s.commit()
                return False
            await store.record_correction(s, answer_id=answer.id, voter_id=msg.user_id,
                                          text=msg.text, source=source,
                                          trusted=msg.user_id in self.reviewer_ids)
        return True


def _result(stored: Stored) -> FeedbackResult:
    fb = stored.feedback
    assert fb.id is not None
    return FeedbackResult(id=fb.id, answer_id=fb.answer_id, voter_id=fb.voter_id, rating=fb.rating,
                          correction=fb.correction, trusted=fb.trusted,
                          review_status=fb.review_status, first_delivery=stored.first_delivery)
