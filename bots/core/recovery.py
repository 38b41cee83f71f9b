"""Recovery: finish the turns a crash or shutdown left open, on this process or another."""

from __future__ import annotations

import asyncio
import logging

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from bots.core import payload
from bots.core.leases import Leases
from bots.core.turns import Turns
from bots.core.types import Resumed, SinkFor
from chatloop.telemetry import hooks
from storage import conversations, events
from storage.conversations import TurnStart
from storage.models import InboundEvent

log = logging.getLogger(__name__)
MAX_RESUMES = 5  # a turn resumed this often without finishing is closed as failed


class Recovery:
    def __init__(self, *, sessions: async_sessionmaker[AsyncSession], turns: Turns,
                 leases: Leases) -> None:
        self._sessions, self._turns, self._leases = sessions, turns, leases

    async def resume(self, channel: str, sink_for: SinkFor) -> int:
        """Generate the answers never stored and deliver the ones stored but not shown. Only
        events no live process holds are taken (each by one process). Returns how many."""
        async with self._sessions() as s:
            pending = await events.pending_events(s, channel=channel)
        resumed = 0
        for event in pending:
            if event.payload is None or event.message_id is None or event.id is None:
                continue
            if await self._resume_one(event, sink_for):
                resumed += 1
        return resumed

    @hooks.resuming
    async def _resume_one(self, event: InboundEvent, sink_for: SinkFor) -> bool:
        assert event.id is not None and event.message_id is not None and event.payload
        if not await self._leases.claim(event.id):
            return False  # another process took it meanwhile
        async with self._sessions() as s:
            question = await conversations.get_message(s, message_id=event.message_id)
            stored = await conversations.stored_answer(s, question_id=event.message_id)
        assert question is not None
        turn = TurnStart(question.conversation_id, event.message_id, event.id)
        if event.attempts >= MAX_RESUMES:  # this claim would be one more: it keeps failing
            log.error("%s event %s failed %s resumes: given up", event.channel,
                      event.external_event_id, event.attempts)
            hooks.given_up(event.channel)
            await self._turns.close(turn, "gave_up")
            return False
        self._leases.hold(event.id)
        async with self._leases.holding(event.id):
            msg = payload.load(event.payload)
            log.info("resuming %s event %s", event.channel, event.external_event_id)
            sink = await sink_for(msg, Resumed(event.id, event.shown_ref))
            if stored is not None and stored.id is not None:
                await self._turns.deliver(turn, stored.id, stored.text, sink, stored.adapter)
            else:
                await self._turns.run(turn, question.text, sink)
        return True

    async def resume_forever(self, channel: str, sink_for: SinkFor) -> None:
        """Resume, every lease period, what crashed processes (other replicas) left open."""
        while True:
            await asyncio.sleep(self._leases.lease_s)
            try:
                if resumed := await self.resume(channel, sink_for):
                    log.info("answered %s %s events another process left open", resumed,
                             channel)
            except Exception:  # the database may be away for a while: try again later
                log.exception("resuming %s events failed", channel)
