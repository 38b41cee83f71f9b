"""👍 / 👎 buttons and corrections: stored through the core, each delivery acted on once.

Votes and corrections are upserts stored with their delivery record in one transaction; a
redelivered update stores the same value again but sends nothing twice.
"""

from __future__ import annotations

import logging

from aiogram.types import User

from bots.core import ConversationCore, ReplySink, UnknownAnswer
from bots.core.types import HandoffView
from bots.telegram.convert import CHANNEL, Correct, Vote, correction_prompt
from bots.telegram.outbound import DeliveryError, Target, TelegramApi

log = logging.getLogger(__name__)
THANKS_UP = "Thanks for the feedback!"
THANKS_DOWN = "Thanks. You can reply to my next message with a better answer."
GONE = "That answer is no longer available."


class Feedback:
    def __init__(self, core: ConversationCore, api: TelegramApi, me: User) -> None:
        self._core, self._api, self._me = core, api, me

    async def first_delivery(self, update_id: int) -> bool:
        """Record a delivery that starts no turn; False if it was seen before."""
        return await self._core.record_delivery(CHANNEL, str(update_id))

    async def vote(self, vote: Vote) -> HandoffView | None:
        """Store the vote; a hand-off it opened (CHATLOOP_HANDOFF_AFTER_DOWNVOTES), if any."""
        toast = THANKS_UP if vote.rating > 0 else THANKS_DOWN
        fresh, handoff = False, None
        try:
            stored = await self._core.vote(answer_id=vote.answer_id, voter_id=vote.voter_id,
                                           rating=vote.rating, source=CHANNEL,
                                           event_id=str(vote.update_id))
            fresh, handoff = stored.first_delivery, stored.handoff
        except UnknownAnswer:
            toast = GONE
        finally:  # the button spins until answered, whatever happened
            await self._answer(vote.query_id, toast)
        if fresh and vote.rating < 0 and vote.where is not None:
            where = Target(vote.where.chat_id, vote.where.thread_id, vote.answer_message_id)
            try:
                await self._api.send_html(where, correction_prompt(vote.answer_id, self._me),
                                          quote=True)
            except DeliveryError as exc:
                log.warning("correction prompt for answer %s not sent: %s", vote.answer_id, exc)
        return handoff

    async def correct(self, fix: Correct, sink: ReplySink) -> None:
        text = fix.text.strip()
        if not text:
            await sink.notice("Please send the better answer as text.")
            return
        try:
            stored = await self._core.correct(answer_id=fix.answer_id, voter_id=fix.voter_id,
                                              text=text, source=CHANNEL,
                                              event_id=str(fix.update_id))
        except UnknownAnswer:
            await sink.notice(GONE)
            return
        if stored.first_delivery:
            review = "" if stored.trusted else " A reviewer will check it before I learn from it."
            await sink.notice(f"Thanks! I saved your better answer.{review}")

    async def stale_button(self, query_id: str) -> None:
        await self._answer(query_id, None)

    async def _answer(self, query_id: str, text: str | None) -> None:
        try:
            await self._api.answer_callback(query_id, text)
        except DeliveryError as exc:  # e.g. "query is too old" after a restart
            log.info("answerCallbackQuery %s failed: %s", query_id, exc)
