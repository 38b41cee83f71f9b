"""Votes and corrections, each stored with its platform delivery in one transaction.

Who may give feedback on what: a voter is an identity (`channel:id`); an answer takes
feedback only from its own channel, and in a private channel (the web chat) only from the
person who asked. Anything else is `UnknownAnswer`, exactly like an id that does not exist.
"""

from __future__ import annotations

from collections.abc import Collection

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from bots.core.types import PRIVATE_CHANNELS, FeedbackResult, InboundMessage, channel_of
from storage import conversations, events
from storage import feedback as store
from storage.feedback import Delivery, Stored


def check_reviewers(reviewers: Collection[str]) -> frozenset[str]:
    """Reviewers as identities; a private channel's identities (the web's, issued to any
    browser that asks) are refused: they are never reviewers."""
    for who in reviewers:
        if channel_of(who) in PRIVATE_CHANNELS:
            raise ValueError(f"{who!r}: {channel_of(who)} identities are never reviewers")
    return frozenset(reviewers)


class FeedbackDesk:
    """Stores feedback for every channel; reviewers' corrections are trusted (approved)."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession], *,
                 reviewers: Collection[str]) -> None:
        self._sessions, self.reviewers = sessions, check_reviewers(reviewers)

    def trusted(self, who: str, *, operator: bool = False) -> bool:
        """Whether feedback from `who` is trusted: a configured reviewer, or a person the
        channel authenticated as one of its operators."""
        return operator or who in self.reviewers

    async def vote(self, *, answer_id: int, voter_id: str, rating: int, source: str,
                   reason: str | None = None, delivery: Delivery | None = None,
                   operator: bool = False) -> FeedbackResult:
        async with self._sessions() as s:
            stored = await store.record_vote(
                s, answer_id=answer_id, voter_id=voter_id, rating=rating, source=source,
                reason=reason, trusted=self.trusted(voter_id, operator=operator),
                delivery=delivery, **_where(voter_id))
        return _result(stored)

    async def correct(self, *, answer_id: int, voter_id: str, text: str, source: str,
                      delivery: Delivery | None = None, operator: bool = False
                      ) -> FeedbackResult:
        async with self._sessions() as s:
            stored = await store.record_correction(
                s, answer_id=answer_id, voter_id=voter_id, text=text, source=source,
                trusted=self.trusted(voter_id, operator=operator), delivery=delivery,
                **_where(voter_id))
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
            await store.record_correction(s, answer_id=answer.id, voter_id=msg.author,
                                          text=msg.text, source=source,
                                          trusted=self.trusted(msg.author),
                                          **_where(msg.author))
        return True


def _where(voter: str) -> dict[str, str | None]:
    """Which answers `voter` may give feedback on (see the module docstring)."""
    channel = channel_of(voter)
    return {"channel": channel, "asked_by": voter if channel in PRIVATE_CHANNELS else None}


def _result(stored: Stored) -> FeedbackResult:
    fb = stored.feedback
    assert fb.id is not None
    return FeedbackResult(id=fb.id, answer_id=fb.answer_id, voter_id=fb.voter_id, rating=fb.rating,
                          correction=fb.correction, trusted=fb.trusted,
                          review_status=fb.review_status, first_delivery=stored.first_delivery)
